"""The fault matrix's follow-up row: the BullMQ worker SIGKILLed with jobs active, restarted, and every job proven
to have sent exactly one WhatsApp message, stored once and published once.

The worker runs as ``python -m whatrack.followups.jobs`` (a subprocess in its own session); the jobs are scheduled with
:func:`whatrack.followups.jobs.schedule_followup` on the "Upstash" Redis; the UAZAPI stand-in records every send (its
``/_dev/sends``), and echoes each one through QStash to the endpoint, which must deduplicate it against the worker's
row. The ledger's "sent" side is the jobs: a job that never sent is lost, a job that sent twice is a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from whatrack.devstack import guard, process
from whatrack.errors import StackError
from whatrack.proof.config import LoadConfig, MatrixConfig
from whatrack.proof.generate import LoadInstance, generate
from whatrack.proof.ledger import Observations, Sent, classify, collect
from whatrack.proof.load import EndpointProcess, LoadResult
from whatrack.proof.plots import latency_stats
from whatrack.settings import SECRET_ENV_NAMES, Settings

log = logging.getLogger("whatrack.proof.worker_faults")

#: The worker is killed once this share of the jobs has been sent.
KILL_AT = 0.3
#: A killed worker's jobs come back after lockDuration + stalledInterval (whatrack.followups.jobs: 8 s + 5 s); the wait
#: for all jobs allows for that plus the sends.
JOBS_TIMEOUT_S = 90.0


class WorkerProcess:
    """``python -m whatrack.followups.jobs`` as a subprocess in its own session."""

    def __init__(self, env: dict[str, str], concurrency: int = 8) -> None:
        self.env = env
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self._guard: str | None = None  # stopped by a guard process if this one dies first
        self._dir = tempfile.TemporaryDirectory(prefix="whatrack-worker-")
        self.log_path = os.path.join(self._dir.name, "worker.log")

    def start(self) -> None:
        child = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_NAMES and not k.startswith("WHATRACK_")}
        child.update(self.env, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "whatrack.followups.cli", "--concurrency",
                                          str(self.concurrency)], env=child, cwd=self._dir.name, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._guard = guard.watch(pid=self.proc.pid, started=process.created(self.proc.pid))

    def kill(self) -> None:
        """SIGKILL the whole process group now."""
        process.kill_popen(self.proc)
        guard.forget(self._guard)

    def stop(self) -> None:
        """SIGTERM to the process group (in-flight jobs finish), then SIGKILL after 20 s."""
        process.stop_popen(self.proc, grace=20.0)
        self.proc = None
        guard.forget(self._guard)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


async def _sends(base_url: str, prefix: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10.0) as c:
        r = await c.get(f"{base_url}/_dev/sends")
    r.raise_for_status()
    return [s for s in r.json()["sends"] if str(s.get("track_id", "")).startswith(prefix)]


async def run_worker_scenario(env: dict[str, str], stack_dir: Path, cfg: MatrixConfig, *, seed: int,
                              notes: list[str]) -> tuple[LoadResult, dict[str, Any]]:
    """Schedule ``cfg.followup_jobs`` follow-ups, SIGKILL the worker at :data:`KILL_AT`, restart it, reconcile.

    Raises:
        StackError: the stack lacks a part the scenario needs (UAZAPI stand-in, Upstash Redis).
    """
    from whatrack.demo import DEMO_NAME, DEMO_ORGANIZATION, DEMO_OWNER, DEMO_TOKEN
    from whatrack.followups.jobs import open_queue, schedule_followup
    from whatrack.realtime import Realtime
    from whatrack.store.api import Store
    from whatrack.uazapi.normalizer import normalize, parse_body

    for name in ("UAZAPI_BASE_URL", "UPSTASH_REDIS_URL", "DATABASE_URL"):
        if not env.get(name):
            raise StackError(f"the follow-up scenario needs {name} from the stack (whatrack stack up)")
    settings = Settings.from_env(env, env_files=())
    assert settings.database_url and settings.upstash_redis_url and settings.uazapi_base_url
    jobs = cfg.followup_jobs
    prefix = f"fu-{seed}-{int(time.time())}-"
    store = Store.from_url(settings.database_url)
    realtime = Realtime.from_settings(settings)
    # UAZAPI authenticates sends by the sending instance's token: the worker finds it in UAZAPI_INSTANCE_TOKENS
    # (the stack sets it for the demo instance; older stack envs lack it).
    worker = WorkerProcess(env | {"UAZAPI_INSTANCE_TOKENS": env.get("UAZAPI_INSTANCE_TOKENS")
                                  or f"{DEMO_NAME}:{DEMO_TOKEN}"})
    endpoint = EndpointProcess(env, workers=1)  # the echoes come back through QStash to the endpoint
    queue = open_queue(settings.upstash_redis_url, ca_bundle=settings.redis_ca_bundle)
    try:
        await store.upgrade()
        inst = await store.register_instance(DEMO_ORGANIZATION, DEMO_NAME, DEMO_TOKEN, owner=DEMO_OWNER)
        demo = LoadInstance(DEMO_NAME, DEMO_TOKEN, DEMO_OWNER)
        inbound = [w for w in generate(jobs * 4, seed=seed, instances=1, leads=jobs, only=[demo])
                   if w.direction == "inbound" and "group" not in w.template]
        lead_ids: list[int] = []
        for w in inbound:  # one inbound message per lead creates the leads the follow-ups go to
            ev = normalize(parse_body(w.body))
            stored = await store.save_message(inst, ev)  # type: ignore[arg-type]
            await store.mark_published(stored.message_id)  # set-up, not ledger: keep it out of the endpoint's outbox
            if stored.lead_id not in lead_ids:
                lead_ids.append(stored.lead_id)
        await asyncio.to_thread(endpoint.start)
        worker.start()
        t0 = time.time()
        job_ids = [f"{prefix}{j}" for j in range(jobs)]
        for j, job_id in enumerate(job_ids):
            await schedule_followup(queue, organization_id=inst.organization_id, instance_id=inst.id,
                                    lead_id=lead_ids[j % len(lead_ids)], text=f"follow-up {j}: ainda tem interesse?",
                                    run_at=datetime.now(UTC), job_id=job_id)
        deadline = time.monotonic() + JOBS_TIMEOUT_S
        while len({s["track_id"] for s in await _sends(settings.uazapi_base_url, prefix)}) < jobs * KILL_AT:
            if time.monotonic() > deadline:
                raise StackError(f"the follow-up worker sent nothing in {JOBS_TIMEOUT_S:.0f} s: {_tail(worker)}")
            await asyncio.sleep(0.05)
        worker.kill()
        done_at_kill = len({s["track_id"] for s in await _sends(settings.uazapi_base_url, prefix)})
        await asyncio.sleep(1.0)
        worker.start()
        notes.append(f"worker SIGKILLed after {done_at_kill}/{jobs} jobs sent, restarted 1 s later")
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = await queue.getJobCounts("completed", "failed", "active", "wait", "delayed")
            if counts.get("completed", 0) + counts.get("failed", 0) >= jobs and not counts.get("active"):
                break
            await asyncio.sleep(0.25)
        from_echo = await _count_from_echo(queue, job_ids)
        sends = await _sends(settings.uazapi_base_url, prefix)
        ok_sends: dict[str, list[dict[str, Any]]] = {j: [] for j in job_ids}
        for s in sends:
            if s.get("ok"):
                ok_sends.setdefault(s["track_id"], []).append(s)
        # Every WhatsApp message actually sent must be stored once and published once; a job that never sent is
        # lost; a job that sent twice is reported apart (the lead got the follow-up twice).
        sent = [Sent(x["id"], t0, "accepted", j) for j, v in ok_sends.items() for x in v]
        sent += [Sent(f"job:{j}", t0, "accepted", j) for j, v in ok_sends.items() if not v]
        double = sum(max(0, len(v) - 1) for v in ok_sends.values())
        await _wait_rows(store, {s.provider_id for s in sent}, inst.organization_id)
        obs = await collect(store, realtime, None, sent, organization_id=inst.organization_id)
        mine = {s.provider_id for s in sent}
        obs = Observations(rows=tuple(r for r in obs.rows if r.provider_id in mine), publications=obs.publications)
        ledger = classify(sent, obs)
    finally:
        with contextlib.suppress(Exception):
            await queue.close()
        await asyncio.to_thread(worker.close)
        await asyncio.to_thread(endpoint.close)
        await realtime.aclose()
        await store.aclose()
    stored_at = {r.provider_id: r.created_at for r in obs.rows}
    elapsed = max(max(stored_at.values(), default=t0) - t0, 1e-9)
    load = LoadResult(
        config=LoadConfig(n=jobs, seed=seed, progress=False), published=len(sent), accepted=len(sent),
        publish_s=1e-9, drain_s=elapsed, accepted_per_s=0.0, stored_per_s=len(obs.rows) / elapsed,
        commit=latency_stats((v - t0) * 1e3 for v in stored_at.values()), realtime=latency_stats([]), retries=0,
        dlq=0, replays=[], ledger=ledger, sent=sent)
    extra = {"double_sends": double, "jobs_sent": sum(1 for v in ok_sends.values() if v),
             "jobs_completed": counts.get("completed", 0),
             "jobs_failed": counts.get("failed", 0), "jobs_from_echo": from_echo}
    if from_echo:
        notes.append(f"{from_echo} rescued job(s) found their cut attempt's send by its echo: not sent again")
    if double:
        notes.append(f"{double} follow-ups sent twice to WhatsApp")
    return load, extra


async def _count_from_echo(queue: Any, job_ids: list[str]) -> int:
    """Jobs whose killed attempt had sent: the rescued run found the send's UAZAPI echo instead of sending again."""
    from bullmq import Job

    jobs = await asyncio.gather(*(Job.fromId(queue, j) for j in job_ids))
    return sum(1 for j in jobs if j is not None and isinstance(j.returnvalue, dict) and j.returnvalue.get("fromEcho"))


async def _wait_rows(store: Any, pids: set[str], org: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = await store.message_rows(organization_id=org)
        done = {r["provider_id"] for r in rows if r["published_at"] is not None}
        if pids <= done:
            return
        await asyncio.sleep(0.25)


def _tail(worker: WorkerProcess, n: int = 8) -> str:
    try:
        return " | ".join(Path(worker.log_path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
