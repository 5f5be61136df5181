"""The webhook path end to end over real HTTP: signed delivery → endpoint → PostgreSQL → outbox → Centrifugo stand-in.

The endpoint runs on PostgreSQL only (SQLite is refused at start-up). Deliveries are signed exactly as QStash signs
(``qstash_sign.sign``). The endpoint answers right after its commit; its outbox publisher publishes to Centrifugo.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from whatrack.devstack import centrifugo, servers
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.serving import serving
from whatrack.realtime import Realtime
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.store.api import Store
from whatrack.webhook.app import create_app

CURRENT = "sig_testCurrentKey0000000000000000"
NEXT = "sig_testNextKey000000000000000000"
CENT_KEY = "test-centrifugo-key"
#: Like a production Centrifugo config: a "conversation" namespace with history (channels are conversation:<id>).
NAMESPACES = {"conversation": centrifugo.LEDGER_NAMESPACE}


@dataclass
class Env:
    url: str  # the public webhook URL (what QStash signs as sub)
    store: Store
    cent_url: str
    realtime: Realtime
    fixtures: Path
    db_url: str

    def body(self, name: str) -> bytes:
        return (self.fixtures / name).read_bytes()

    async def post(self, body: bytes, *, key: str = CURRENT, url: str | None = None,
                   headers: dict[str, str] | None = None, signed: bool = True) -> httpx.Response:
        h = {"Content-Type": "application/json", **(headers or {})}
        if signed:
            h["Upstash-Signature"] = sign(body, url or self.url, key)
        async with httpx.AsyncClient(timeout=30) as c:
            return await c.post(self.url, content=body, headers=h)

    async def message_count(self) -> int:
        return (await self.store.counts())["message"]

    async def publications(self, conversation_id: int) -> list[dict[str, object]]:
        return await self.realtime.history(f"conversation:{conversation_id}")

    async def published_rows(self) -> list[dict[str, object]]:
        return await wait_published(self.store)


async def wait_published(store: Store, *, within_s: float = 30.0) -> list[dict[str, object]]:
    """The message rows once every one is marked published by the outbox publisher (fails after ``within_s``)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        rows = await store.message_rows()
        if all(r["published_at"] is not None for r in rows):
            return rows
        assert asyncio.get_running_loop().time() < deadline, f"not published within {within_s} s: {rows}"
        await asyncio.sleep(0.05)


@pytest.fixture
def db_url(make_migrated_database: Callable[[], str]) -> str:
    url = Settings.from_env({"DATABASE_URL": make_migrated_database()}, env_files=()).database_url
    assert url
    return url


async def _registered_store(db_url: str, fixtures: Path) -> Store:
    store = Store.from_url(db_url)
    await store.upgrade()
    d = json.loads((fixtures / "messages_inbound_text.json").read_text())
    await store.register_instance("Acme", d["instanceName"], d["token"], owner=d["owner"])
    return store


@pytest.fixture
async def env(db_url: str, redis_url: str, fixtures_dir: Path) -> AsyncIterator[Env]:
    store = await _registered_store(db_url, fixtures_dir)
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        port = servers.free_port()
        public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        settings = Settings.from_env({
            "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
            "WEBHOOK_PUBLIC_URL": public, "CENTRIFUGO_API_URL": f"{cent_base}/api", "CENTRIFUGO_API_KEY": CENT_KEY,
        }, env_files=())
        realtime = Realtime(f"{cent_base}/api", CENT_KEY)
        async with serving(create_app(settings), port=port):
            yield Env(public, store, f"{cent_base}/api", realtime, fixtures_dir, db_url)
        await realtime.aclose()
    await store.aclose()


async def test_signed_delivery_stores_every_row_and_publishes_once(env: Env) -> None:
    r = await env.post(env.body("messages_inbound_text.json"))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "stored"
    counts = await env.store.counts()
    for table in ("organization", "instance", "lead", "conversation", "ticket", "message"):
        assert counts[table] == 1, (table, counts)
    [row] = await env.published_rows()
    [pub] = await env.publications(row["conversation_id"])
    assert pub["senderType"] == "LEAD"
    assert pub["id"] == row["message_id"]
    assert pub["content"]


async def test_the_webhook_route_is_its_path_and_subpaths_for_post_only(env: Env) -> None:
    """The webhook's POSTs skip Starlette's router (``webhook.app._App``): the same paths and methods still reach it,
    and only those."""
    body = env.body("messages_inbound_text.json")
    suffixed = env.url + "/messages/text"  # UAZAPI may append /{event}/{type}; QStash signs the URL it was given
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(suffixed, content=body, headers={"Upstash-Signature": sign(body, suffixed, CURRENT)})
        assert (r.status_code, r.json()["status"]) == (200, "stored")
        assert (await c.post(env.url, content=body)).status_code == 401  # the route itself: no signature
        assert (await c.post(env.url + "X", content=body)).status_code == 404  # a longer name is another path
        assert (await c.get(env.url)).status_code == 405
        assert (await c.get(env.url.removesuffix(WEBHOOK_PATH) + "/healthz")).json() == {"status": "ok"}
    assert await env.message_count() == 1


async def test_outbound_message_is_ours_and_the_lead_is_the_chat(env: Env) -> None:
    assert (await env.post(env.body("messages_inbound_text.json"))).status_code == 200
    assert (await env.post(env.body("messages_outbound_text_fromme.json"))).status_code == 200
    counts = await env.store.counts()
    assert counts["lead"] == 1 and counts["conversation"] == 1 and counts["message"] == 2
    rows = await env.store.message_rows()
    assert {r["direction"] for r in rows} == {"inbound", "outbound"}
    async with env.store.engine.connect() as conn:
        senders = dict((await conn.execute(text("SELECT direction, sender_type FROM message"))).all())
    assert senders == {"inbound": "LEAD", "outbound": "USER"}


async def test_same_delivery_twice_and_twenty_concurrent_store_once_publish_once(env: Env) -> None:
    body = env.body("messages_inbound_text.json")
    first, second = await env.post(body), await env.post(body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.json()["status"] == "duplicate"
    other = env.body("messages_inbound_image_caption.json")
    results = await asyncio.gather(*(env.post(other) for _ in range(20)))
    assert [r.status_code for r in results] == [200] * 20
    assert sorted(r.json()["status"] for r in results).count("stored") == 1
    assert await env.message_count() == 2
    rows = await env.published_rows()
    pubs = await env.publications(rows[0]["conversation_id"])
    assert sorted(p["externalId"] for p in pubs) == sorted(r["external_id"] for r in rows)  # once each


@pytest.mark.parametrize(
    ("case", "reason"),
    [("wrong_key", "bad_key"), ("wrong_url", "wrong_url"), ("expired", "expired"), ("body_changed", "body_changed"),
     ("missing", "missing")],
)
async def test_bad_signatures_get_401_and_store_nothing(env: Env, case: str, reason: str) -> None:
    import time

    body = env.body("messages_inbound_text.json")
    headers: dict[str, str] = {}
    send = body
    if case == "wrong_key":
        headers["Upstash-Signature"] = sign(body, env.url, "sig_NotOurKey000000000000000000000")
    elif case == "wrong_url":
        headers["Upstash-Signature"] = sign(body, env.url.replace("127.0.0.1", "evil.example"), CURRENT)
    elif case == "expired":
        from whatrack.devstack.qstash.sign import sign as s

        headers["Upstash-Signature"] = s(body, env.url, CURRENT, now=int(time.time()) - 400)
    elif case == "body_changed":
        headers["Upstash-Signature"] = sign(body, env.url, CURRENT)
        send = body.replace(b"Maria", b"Mario", 1)
        assert send != body and len(send) == len(body)
    r = await env.post(send, headers=headers, signed=False)
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_signature", "reason": reason}
    assert await env.message_count() == 0


async def test_next_key_passes(env: Env) -> None:
    r = await env.post(env.body("messages_inbound_text.json"), key=NEXT)
    assert r.status_code == 200
    assert await env.message_count() == 1


async def test_poison_payloads_go_to_the_dlq_without_rows(env: Env) -> None:
    unknown = json.loads(env.body("messages_inbound_text.json"))
    unknown["token"] = "00000000-0000-0000-0000-000000000000"
    cases = {
        "not_json": b'{"EventType": "messages", ',
        "no_message_id": env.body("messages_malformed_missing_messageid.json"),
        "unknown_instance": json.dumps(unknown).encode(),
    }
    for code, body in cases.items():
        r = await env.post(body)
        assert r.status_code == 489, (code, r.text)
        assert r.headers["Upstash-NonRetryable-Error"] == "true"
        assert r.json()["error"] == code
    assert await env.message_count() == 0


async def test_unknown_event_type_is_acknowledged(env: Env) -> None:
    d = json.loads(env.body("messages_inbound_text.json"))
    d["EventType"] = "presence"
    r = await env.post(json.dumps(d).encode())
    assert r.status_code == 200
    assert r.json()["status"] == "ignored"
    assert await env.message_count() == 0


async def test_receipt_updates_status(env: Env) -> None:
    assert (await env.post(env.body("messages_outbound_text_fromme.json"))).status_code == 200
    receipt = json.loads(env.body("messages_update_delivered.json"))
    [external_id] = [r["external_id"] for r in await env.store.message_rows()]
    receipt["event"]["MessageIDs"] = [external_id]
    r = await env.post(json.dumps(receipt).encode())
    assert r.status_code == 200 and r.json()["updated"] == 1
    async with env.store.engine.connect() as conn:
        assert (await conn.execute(text("SELECT status FROM message"))).scalar_one() == "delivered"


async def test_realtime_down_answers_200_and_publishes_once_when_back(db_url: str, redis_url: str,
                                                                     fixtures_dir: Path) -> None:
    store = await _registered_store(db_url, fixtures_dir)
    cent_port, port = servers.free_port(), servers.free_port()
    public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    settings = Settings.from_env({
        "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
        "WEBHOOK_PUBLIC_URL": public, "CENTRIFUGO_API_URL": f"http://127.0.0.1:{cent_port}/api",
        "CENTRIFUGO_API_KEY": CENT_KEY}, env_files=())
    body = (fixtures_dir / "messages_inbound_text.json").read_bytes()

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as c:
            return await c.post(public, content=body, headers={"Upstash-Signature": sign(body, public, CURRENT)})

    fast = {"sweep_s": 0.2, "backoff_s": (0.05, 0.5)}
    try:
        async with serving(create_app(settings, publisher_options=fast), port=port):
            r = await post()  # Centrifugo not running yet: stored, answered, not published
            assert r.status_code == 200 and r.json()["status"] == "stored", r.text
            assert (await post()).json()["status"] == "duplicate"
            [row] = await store.message_rows()
            assert row["published_at"] is None
            async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES), port=cent_port) as cent_base:
                [row] = await wait_published(store)
                rt = Realtime(f"{cent_base}/api", CENT_KEY)
                assert len(await rt.history(f"conversation:{row['conversation_id']}")) == 1
                await rt.aclose()
                async with httpx.AsyncClient() as c:
                    metrics = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
                assert 'whatrack_webhooks_total{outcome="transient"} 0.0' in metrics
                assert 'whatrack_webhooks_total{outcome="stored"} 1.0' in metrics
                assert "whatrack_realtime_publish_failures_total 0.0" not in metrics  # the outage was counted
                assert "whatrack_realtime_publish_lag_seconds_count 1.0" in metrics
    finally:
        await store.aclose()


async def test_the_endpoint_refuses_sqlite(tmp_path: Path) -> None:
    from whatrack.errors import ConfigError
    from whatrack.webhook.app import build_handler

    settings = Settings.from_env({
        "DATABASE_URL": f"sqlite:///{tmp_path}/w.db", "QSTASH_CURRENT_SIGNING_KEY": CURRENT,
        "QSTASH_NEXT_SIGNING_KEY": NEXT, "WEBHOOK_PUBLIC_URL": "http://127.0.0.1:9/x",
        "CENTRIFUGO_API_URL": "http://127.0.0.1:9/api", "CENTRIFUGO_API_KEY": CENT_KEY}, env_files=())
    with pytest.raises(ConfigError, match="PostgreSQL only"):
        build_handler(settings)


async def test_database_stopped_mid_test_then_back(tmp_path: Path, redis_url: str, fixtures_dir: Path) -> None:
    pg = servers.EmbeddedPostgres(tmp_path / "pg").start()
    try:
        db_url = Settings.from_env({"DATABASE_URL": pg.url}, env_files=()).database_url
        assert db_url
        store = await _registered_store(db_url, fixtures_dir)
        port = servers.free_port()
        public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
        body = (fixtures_dir / "messages_inbound_text.json").read_bytes()
        async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
            settings = Settings.from_env({
                "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
                "WEBHOOK_PUBLIC_URL": public, "CENTRIFUGO_API_URL": f"{cent_base}/api",
                "CENTRIFUGO_API_KEY": CENT_KEY}, env_files=())
            async with serving(create_app(settings), port=port), httpx.AsyncClient(timeout=60) as c:
                # warm the instance cache and the pool, so the failure is the database's, not the start-up's
                ok = await c.post(public, content=(fixtures_dir / "connection_connected.json").read_bytes(),
                                  headers={"Upstash-Signature": sign(
                                      (fixtures_dir / "connection_connected.json").read_bytes(), public, CURRENT)})
                assert ok.status_code == 200
                pg.stop()
                r = await c.post(public, content=body, headers={"Upstash-Signature": sign(body, public, CURRENT)})
                assert r.status_code == 503 and r.json()["error"] == "database_unavailable"
                pg.start()
                r = await c.post(public, content=body, headers={"Upstash-Signature": sign(body, public, CURRENT)})
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "stored"
                r = await c.post(public, content=body, headers={"Upstash-Signature": sign(body, public, CURRENT)})
                assert r.json()["status"] == "duplicate"
        assert (await store.counts())["message"] == 1
        await store.aclose()
    finally:
        pg.remove()


_SERVE_AND_REPORT_GC = """
import asyncio, gc, json, sys
import httpx
from whatrack.devstack import servers
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.serving import serving
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.webhook.app import create_app

async def main() -> None:
    db_url, body, key, flag = sys.argv[1], sys.argv[2].encode(), sys.argv[3], sys.argv[4] == "serving"
    port = servers.free_port()
    public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    settings = Settings.from_env({
        "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": key, "QSTASH_NEXT_SIGNING_KEY": key + "x",
        "WEBHOOK_PUBLIC_URL": public, "CENTRIFUGO_API_URL": "http://127.0.0.1:9/api",
        "CENTRIFUGO_API_KEY": "k"}, env_files=())
    async with serving(create_app(settings, serving=flag), port=port):
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.post(public, content=body, headers={"Upstash-Signature": sign(body, public, key)})
    print(json.dumps({"status": r.json().get("status"), "gen0": gc.get_threshold()[0],
                      "frozen": gc.get_freeze_count()}))

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["serving", "embedded"])
async def test_a_serving_process_tunes_its_garbage_collector_and_an_embedding_one_is_left_alone(
        db_url: str, fixtures_dir: Path, mode: str) -> None:
    from whatrack.gctune import GEN0_THRESHOLD

    store = await _registered_store(db_url, fixtures_dir)
    await store.aclose()
    body = (fixtures_dir / "messages_inbound_text.json").read_text()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SERVE_AND_REPORT_GC, db_url, body, CURRENT,
                                                mode, stdout=asyncio.subprocess.PIPE, env=dict(os.environ))
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["status"] == "stored"  # it serves as before
    if mode == "serving":
        assert report["gen0"] == GEN0_THRESHOLD and report["frozen"] > 10_000
    else:
        assert report["gen0"] == 700 and report["frozen"] == 0  # Python's defaults
