"""Small real collaborators for the follow-up worker tests, until ``whatrack.store.api``/``uazapi``/``realtime`` land.

* :class:`StoreForTests`: the ``Store`` methods the worker uses, over a real Redis (so a worker subprocess and the
  test see the same data), idempotent on the job id like the real one (a unique constraint there, SET NX here).
* :class:`UazapiStandIn`: a Starlette app on uvicorn (its own process) that records ``POST /send/text`` in Redis
  and can be told to fail or hold sends; :class:`UazapiClientForTests` is a minimal httpx client for it that raises
  ``SendError`` like the real one.
* :class:`RealtimeForTests`: records publishes in a Redis list; can be told to fail.
* :func:`build_context_for_tests`: the ``--context`` factory a worker subprocess loads.
* :func:`stall_jobs`: takes waiting jobs and abandons them the way a SIGKILLed worker does, so that BullMQ's own
  stalled check puts them back in ``wait`` (``ats`` 1, ``stc`` 1): their next run is a rescued attempt.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import redis
import redis.asyncio as aredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from whatrack.devstack.servers import free_port, wait_for_port
from whatrack.errors import PublishError, SendError, StoreError
from whatrack.followups.jobs import KEY_PREFIX, MAX_STALLED_COUNT, QUEUE_NAME
from whatrack.followups.process import WorkerContext
from whatrack.settings import Settings

P = "t:"  # every key these doubles write starts with it


@dataclass(frozen=True)
class InstanceRefForTests:
    id: int
    organization_id: int
    name: str


@dataclass(frozen=True)
class LeadRefForTests:
    id: int
    organization_id: int
    phone: str
    remote_jid: str


@dataclass(frozen=True)
class StoredMessageForTests:
    message_id: str
    created: bool
    published: bool
    channel: str
    realtime: dict[str, Any] = field(default_factory=dict)


class StoreForTests:
    """The worker's view of ``whatrack.store.api.Store``, over Redis keys under ``t:``."""

    def __init__(self, url: str) -> None:
        self.r = aredis.Redis.from_url(url, decode_responses=True)

    async def aclose(self) -> None:
        await self.r.aclose()

    # set-up helpers for the tests
    async def add_instance(self, inst_id: int, org: int, name: str = "inst") -> None:
        await self.r.hset(f"{P}instance:{inst_id}", mapping={"organization_id": org, "name": name})

    async def add_lead(self, org: int, lead_id: int, phone: str) -> None:
        await self.r.hset(f"{P}lead:{org}:{lead_id}", mapping={"phone": phone, "remote_jid": f"{phone}@s.whatsapp.net"})

    async def add_reply(self, lead_id: int, at: datetime) -> None:
        await self.r.zadd(f"{P}replies:{lead_id}", {uuid.uuid4().hex: at.timestamp()})

    async def outbound(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key in await self.r.keys(f"{P}outbound:*"):
            out[key.split(":", 2)[2]] = json.loads(await self.r.get(key))
        return out

    async def save_calls(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.r.hgetall(f"{P}save_calls")).items()}

    # the Store interface
    async def get_instance(self, instance_id: int) -> InstanceRefForTests | None:
        h = await self.r.hgetall(f"{P}instance:{instance_id}")
        return InstanceRefForTests(instance_id, int(h["organization_id"]), h["name"]) if h else None

    async def find_lead(self, organization_id: int, lead_id: int) -> LeadRefForTests | None:
        h = await self.r.hgetall(f"{P}lead:{organization_id}:{lead_id}")
        return LeadRefForTests(lead_id, organization_id, h["phone"], h["remote_jid"]) if h else None

    async def lead_replied_since(self, lead_id: int, since: datetime) -> bool:
        return bool(await self.r.zcount(f"{P}replies:{lead_id}", f"({since.timestamp()}", "+inf"))

    async def save_outbound(self, inst: InstanceRefForTests, *, lead_id: int, text: str, job_id: str,
                            external_id: str, provider_id: str | None, sent_at: datetime) -> StoredMessageForTests:
        await self.r.hincrby(f"{P}save_calls", job_id, 1)
        delay = float(await self.r.get(f"{P}store:save_delay") or 0)
        if delay:
            await asyncio.sleep(delay)
        if int(await self.r.decr(f"{P}store:fail_saves")) >= 0:
            raise StoreError("database unavailable (injected by the test)")
        row = {"message_id": f"m-{job_id}", "instance_id": inst.id, "lead_id": lead_id, "text": text,
               "job_id": job_id, "external_id": external_id, "provider_id": provider_id,
               "sent_at": sent_at.isoformat(), "published": False}
        created = bool(await self.r.set(f"{P}outbound:{job_id}", json.dumps(row), nx=True))
        if not created:
            row = json.loads(await self.r.get(f"{P}outbound:{job_id}"))
        return StoredMessageForTests(row["message_id"], created, bool(row["published"]), f"org:{inst.organization_id}",
                                     {"text": text})

    async def add_echo(self, track_id: str, external_id: str) -> None:
        """What the endpoint stores when UAZAPI echoes a send that carried ``track_id``."""
        await self.r.set(f"{P}echo:{track_id}", external_id)

    async def find_outbound_by_track(self, inst: InstanceRefForTests, track_id: str) -> Any:
        await self.r.hincrby(f"{P}echo_lookups", track_id, 1)
        ext = await self.r.get(f"{P}echo:{track_id}")
        if ext is None:
            return None
        return SimpleNamespace(external_id=ext, provider_id=f"5511999990000:{ext}",
                               realtime={"sentAt": datetime.now(UTC).isoformat()})

    async def echo_lookups(self) -> dict[str, int]:
        return {k: int(v) for k, v in (await self.r.hgetall(f"{P}echo_lookups")).items()}

    async def mark_published(self, message_id: str) -> None:
        key = f"{P}outbound:{message_id.removeprefix('m-')}"
        row = json.loads(await self.r.get(key))
        row["published"] = True
        await self.r.set(key, json.dumps(row))


class RealtimeForTests:
    """Records publishes in ``t:published``; ``t:realtime:fail`` > 0 makes the next publishes fail."""

    def __init__(self, url: str) -> None:
        self.r = aredis.Redis.from_url(url, decode_responses=True)

    async def aclose(self) -> None:
        await self.r.aclose()

    async def publish_message(self, stored: StoredMessageForTests) -> None:
        if int(await self.r.decr(f"{P}realtime:fail")) >= 0:
            raise PublishError("centrifugo unavailable (injected by the test)")
        await self.r.rpush(f"{P}published", stored.message_id)

    async def published(self) -> list[str]:
        return list(await self.r.lrange(f"{P}published", 0, -1))


@dataclass(frozen=True)
class SendResultForTests:
    message_id: str
    provider_id: str | None
    raw: dict[str, Any]


class UazapiClientForTests:
    """POST /send/text with the instance token; 5xx/429/network → retryable SendError, other 4xx → not."""

    def __init__(self, base_url: str, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, headers={"token": token}, timeout=30)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def send_text(self, number: str, text: str, *, track_source: str | None = None,
                        track_id: str | None = None) -> SendResultForTests:
        try:
            resp = await self.http.post("/send/text", json={"number": number, "text": text,
                                                            "track_source": track_source, "track_id": track_id})
        except httpx.TransportError as e:
            raise SendError(f"UAZAPI unreachable: {type(e).__name__}", retryable=True) from e
        if resp.status_code >= 400:
            retry = resp.status_code >= 500 or resp.status_code == 429
            raise SendError(f"UAZAPI answered {resp.status_code}", status=resp.status_code, retryable=retry)
        body = resp.json()
        return SendResultForTests(body["messageid"], body["id"], body)


class UazapiStandIn:
    """UAZAPI's ``/send/text`` on loopback, in its own process (a thread would share the GIL with the worker under
    test and slow it down). It keeps its state in Redis, under ``t:uazapi:``, so the test reads and steers it there.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.r = redis.Redis.from_url(redis_url, decode_responses=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> UazapiStandIn:
        self.proc = subprocess.Popen([sys.executable, __file__, "uazapi", str(self.port), self.redis_url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
        self.r.close()

    # steering
    def fail_next(self, *statuses: int, job_id: str | None = None) -> None:
        """Answer the next sends (of ``job_id`` only, if given) with these statuses."""
        self.r.rpush(f"{P}uazapi:fail:{job_id}" if job_id else f"{P}uazapi:fail_plan", *statuses)

    def hold(self, seconds: float) -> None:
        self.r.set(f"{P}uazapi:hold_s", seconds)

    # reading
    @property
    def attempts(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(f"{P}uazapi:attempts", 0, -1)]

    @property
    def sends(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange(f"{P}uazapi:sends", 0, -1)]

    def sends_by_job(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sends:
            out[s["track_id"]] = out.get(s["track_id"], 0) + 1
        return out


def _uazapi_app(redis_url: str) -> Starlette:
    r = aredis.Redis.from_url(redis_url, decode_responses=True)

    async def send(request: Request) -> JSONResponse:
        body = await request.json()
        async with r.pipeline(transaction=False) as pipe:
            pipe.rpush(f"{P}uazapi:attempts", json.dumps(body))
            pipe.lpop(f"{P}uazapi:fail:{body.get('track_id')}")
            pipe.get(f"{P}uazapi:hold_s")
            _, planned, held = await pipe.execute()
        if planned is None:
            planned = await r.lpop(f"{P}uazapi:fail_plan")
        status, hold = int(planned or 200), float(held or 0)
        if hold:
            await asyncio.sleep(hold)
        if status != 200:
            return JSONResponse({"error": "injected"}, status_code=status)
        mid = uuid.uuid4().hex[:22].upper()
        await r.rpush(f"{P}uazapi:sends", json.dumps({**body, "messageid": mid, "at": datetime.now(UTC).timestamp()}))
        return JSONResponse({"id": f"5511999990000:{mid}", "messageid": mid, "status": "Sent",
                             "track_id": body.get("track_id")})

    return Starlette(routes=[Route("/send/text", send, methods=["POST"])])


async def stall_jobs(url: str, count: int) -> list[str]:
    """Take the next ``count`` waiting jobs as a worker does (``moveToActive``: ``ats`` 1), drop their locks as a
    SIGKILLed worker's expire, and run BullMQ's stalled check twice (the first marks them, the second moves them
    back to ``wait`` with ``stc`` 1). Returns their ids."""
    from bullmq import Worker

    async def never(job: Any, token: str) -> None:  # pragma: no cover: the worker never runs
        raise AssertionError("stall_jobs' worker must not process jobs")

    client = aredis.Redis.from_url(url, decode_responses=True)
    w = Worker(QUEUE_NAME, never, {"connection": client, "prefix": KEY_PREFIX, "autorun": False,
                                    "maxStalledCount": MAX_STALLED_COUNT, "stalledInterval": 60_000})
    ids: list[str] = []
    try:
        for _ in range(count):
            job = await w.moveToActive(uuid.uuid4().hex)
            assert job is not None, "stall_jobs: no waiting job"
            ids.append(str(job.id))
        await client.delete(*(f"{KEY_PREFIX}:{QUEUE_NAME}:{i}:lock" for i in ids))
        for _ in range(2):
            await client.delete(f"{KEY_PREFIX}:{QUEUE_NAME}:stalled-check")
            await w.runStalledJobsCheck()
        await client.delete(f"{KEY_PREFIX}:{QUEUE_NAME}:stalled-check")
    finally:
        await w.close()
        await client.aclose()
    return ids


async def build_context_for_tests(settings: Settings) -> WorkerContext:
    """``--context followups_support:build_context_for_tests`` for worker subprocesses."""
    assert settings.upstash_redis_url and settings.uazapi_base_url
    store = StoreForTests(settings.upstash_redis_url)
    rt = RealtimeForTests(settings.upstash_redis_url)
    ua = UazapiClientForTests(settings.uazapi_base_url, "instance-token")
    return WorkerContext(store=store, uazapi=ua, realtime=rt, closers=[store.aclose, rt.aclose, ua.aclose])


if __name__ == "__main__":  # python followups_support.py uazapi PORT REDIS_URL
    uvicorn.run(_uazapi_app(sys.argv[3]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning",
                lifespan="off", ws="none", http="httptools", access_log=False)
