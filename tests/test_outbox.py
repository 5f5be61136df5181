"""The realtime outbox: a Centrifugo outage costs no 5xx and no QStash retry; every message is published once.

Real parts: the endpoint over HTTP, PostgreSQL, the Centrifugo stand-in (stopped and started again on the same port,
its history kept in Redis), a real process killed with SIGKILL while it holds claimed rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from store_helpers import OWNER, T0, TOKEN, message
from test_webhook import CENT_KEY, CURRENT, NAMESPACES, NEXT, wait_published

from whatrack.devstack import centrifugo, servers
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.serving import serving
from whatrack.realtime import Realtime
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.store.api import InstanceRef, Store
from whatrack.store.write import Writer
from whatrack.webhook.app import create_app
from whatrack.webhook.publisher import Publisher

FAST: dict[str, Any] = {"sweep_s": 0.2, "backoff_s": (0.05, 0.5)}


class CountingRealtime(Realtime):
    """The real client, remembering every idempotency key it was asked to publish (to catch double publication)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.keys: list[str] = []

    async def publish_batch(self, items: list[tuple[str, dict[str, Any], str]]) -> list[bool]:
        ok = await super().publish_batch(items)
        self.keys.extend(k for (_, _, k), took in zip(items, ok, strict=True) if took)
        return ok


@pytest.fixture
async def store(make_pg_database: Callable[[], str]) -> AsyncIterator[Store]:
    s = Store.from_url(make_pg_database())
    await s.upgrade()
    yield s
    await s.aclose()


@pytest.fixture
async def inst(store: Store) -> InstanceRef:
    return await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)


async def _history(cent_api: str, rows: list[dict[str, Any]]) -> list[str]:
    """External ids of every publication in the rows' conversation channels."""
    rt = Realtime(cent_api, CENT_KEY)
    try:
        out: list[str] = []
        for cid in sorted({r["conversation_id"] for r in rows}):
            out += [str(p["externalId"]) for p in await rt.history(f"conversation:{cid}", limit=1000)]
        return out
    finally:
        await rt.aclose()


def _body(fixtures: Path, i: int) -> bytes:
    d = json.loads((fixtures / "messages_inbound_text.json").read_text())
    mid = f"OUTAGE{i:026d}"
    d["message"]["messageid"] = mid
    d["message"]["id"] = f"{d['message']['owner']}:{mid}"
    return json.dumps(d).encode()


async def test_centrifugo_outage_costs_no_5xx_and_each_message_is_published_once(
        make_pg_database: Callable[[], str], redis_url: str, fixtures_dir: Path) -> None:
    db_url = Settings.from_env({"DATABASE_URL": make_pg_database()}, env_files=()).database_url
    assert db_url
    store = Store.from_url(db_url)
    await store.upgrade()
    d = json.loads((fixtures_dir / "messages_inbound_text.json").read_text())
    await store.register_instance("Acme", d["instanceName"], d["token"], owner=d["owner"])
    cent_port, port = servers.free_port(), servers.free_port()
    public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    cent_api = f"http://127.0.0.1:{cent_port}/api"
    settings = Settings.from_env({
        "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
        "WEBHOOK_PUBLIC_URL": public, "CENTRIFUGO_API_URL": cent_api, "CENTRIFUGO_API_KEY": CENT_KEY}, env_files=())

    async def deliver(c: httpx.AsyncClient, i: int) -> httpx.Response:
        body = _body(fixtures_dir, i)
        return await c.post(public, content=body, headers={"Upstash-Signature": sign(body, public, CURRENT)})

    try:
        async with serving(create_app(settings, publisher_options=FAST), port=port), \
                httpx.AsyncClient(timeout=30) as c:
            async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES), port=cent_port):
                assert [(await deliver(c, i)).status_code for i in range(3)] == [200] * 3
                await wait_published(store)
            # Centrifugo is down: deliveries keep arriving, concurrently, and redeliveries too
            during = await asyncio.gather(*(deliver(c, i) for i in (*range(3, 23), 3, 4, 5)))
            assert [r.status_code for r in during] == [200] * 23, [r.text for r in during if r.status_code != 200]
            assert sorted(r.json()["status"] for r in during).count("stored") == 20
            rows = await store.message_rows()
            assert len(rows) == 23
            assert sum(r["published_at"] is None for r in rows) == 20  # nothing could be published
            async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES), port=cent_port):
                rows = await wait_published(store)
                seen = await _history(cent_api, rows)
            metrics = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
        assert sorted(seen) == sorted(str(r["external_id"]) for r in rows)  # each message exactly once
        assert 'whatrack_webhooks_total{outcome="transient"} 0.0' in metrics  # no 5xx, no QStash retry spent
        assert 'whatrack_webhooks_total{outcome="stored"} 23.0' in metrics
        assert "whatrack_realtime_publish_lag_seconds_count 23.0" in metrics
        assert "whatrack_realtime_outbox_messages 0.0" in metrics
    finally:
        await store.aclose()


_CLAIMER = """
import asyncio, sys
from whatrack.store.write import Writer

async def main() -> None:
    w = Writer(sys.argv[1], safe_url="-")
    claimed = await w.claim(1000, float(sys.argv[2]))
    print(len(claimed), flush=True)
    sys.stdin.read()  # killed here: claimed, never published or marked (or gone with the test: its stdin closes)

asyncio.run(main())
"""


async def test_rows_of_a_killed_publisher_are_published_by_another(store: Store, inst: InstanceRef,
                                                                   redis_url: str) -> None:
    for i in range(5):
        await store.save_message(inst, message(f"KILLED{i}"))
    url = store.engine.url.render_as_string(hide_password=False)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CLAIMER, url, "2", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, env=dict(os.environ))
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"5"
    assert store.writer is not None
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rt = CountingRealtime(f"{cent_base}/api", CENT_KEY)
        publisher = Publisher(store.writer, rt, **FAST)
        assert await publisher.drain() == 0  # claimed by the other process, whose lease still runs
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        publisher.start()
        try:
            rows = await wait_published(store)
        finally:
            await publisher.stop()
            await rt.aclose()
        assert sorted(await _history(f"{cent_base}/api", rows)) == [f"KILLED{i}" for i in range(5)]
    assert len(rt.keys) == 5


async def test_two_publishers_never_publish_a_message_twice(store: Store, inst: InstanceRef, redis_url: str) -> None:
    for i in range(60):
        await store.save_message(inst, message(f"TWO{i:03d}", lead_jid=f"55119{i:08d}@s.whatsapp.net",
                                               chat_jid=f"55119{i:08d}@s.whatsapp.net", lead_phone=f"55119{i:08d}"))
    url = store.engine.url.render_as_string(hide_password=False)
    other = Writer(url, safe_url="-")  # a second process's pool
    assert store.writer is not None
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rts = [CountingRealtime(f"{cent_base}/api", CENT_KEY) for _ in range(2)]
        pubs = [Publisher(w, rt, batch_size=7, **FAST) for w, rt in zip((store.writer, other), rts, strict=True)]
        for p in pubs:
            p.start()
        try:
            rows = await wait_published(store)
        finally:
            for p in pubs:
                await p.stop()
            for rt in rts:
                await rt.aclose()
            await other.aclose()
        keys = rts[0].keys + rts[1].keys
        assert sorted(keys) == sorted(f"msg:{OWNER}:TWO{i:03d}" for i in range(60))  # asked once each
        assert sum(p.published for p in pubs) == 60
        assert sorted(await _history(f"{cent_base}/api", rows)) == [f"TWO{i:03d}" for i in range(60)]


async def test_a_write_wakes_its_own_process_publisher_and_another_process_notifies(
        make_pg_database: Callable[[], str], redis_url: str) -> None:
    """No sweep runs (sweep_s = an hour): the webhook's write wakes the publisher of its process in memory (it sends
    no NOTIFY: that would serialize every commit); a row another process stores (the follow-up worker's) arrives
    by its NOTIFY."""
    url = make_pg_database()
    store = Store.from_url(url)
    await store.upgrade()
    inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
    assert store.writer is not None
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rt = CountingRealtime(f"{cent_base}/api", CENT_KEY)
        publisher = Publisher(store.writer, rt, sweep_s=3600.0)
        publisher.start()
        other = Store.from_url(url)  # another process's store: its writes cannot wake ours in memory
        try:
            while publisher._listener is None:  # the first drain (empty) ran and the LISTEN is open
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # past the first, empty drain: now waiting
            saved = await store.save_message(inst, message("WOKEN"))
            rows = await wait_published(store, within_s=5)
            assert [r["external_id"] for r in rows] == ["WOKEN"]
            sent = await other.save_outbound(inst, lead_id=saved.lead_id, text="follow-up", job_id="job-notify-1",
                                             external_id="3EB0NOTIFY0000000001", provider_id=None, sent_at=T0)
            rows = await wait_published(store, within_s=5)
        finally:
            await other.aclose()
            await publisher.stop()
            await rt.aclose()
            await store.aclose()
    assert rt.keys == [f"msg:{saved.provider_id}", f"msg:{sent.provider_id}"]
    assert sorted(r["external_id"] for r in rows) == ["3EB0NOTIFY0000000001", "WOKEN"]


def test_the_publish_lag_alert_fires_on_late_publications_and_on_a_stuck_outbox() -> None:
    from whatrack.alerts.rules import Snapshot, default_rules, publish_lag
    from whatrack.metrics import Metrics, parse

    assert "publish_lag" in {r.name for r in default_rules()}
    m = Metrics()

    def snap(t: float) -> Snapshot:
        return Snapshot(taken_at=t, metrics=parse(m.render().decode()))

    first = snap(0.0)
    for lag in (0.05, 0.2, 1.5):
        m.publish_lag.observe(lag)
    assert publish_lag(first, snap(30.0), 10).state == "ok"
    first = snap(30.0)
    m.publish_lag.observe(45.0)  # published 45 s after its commit: Centrifugo was down
    late = publish_lag(first, snap(60.0), 10)
    assert (late.state, late.value) == ("firing", 1.0)
    m.outbox_depth.set(7)
    first = snap(60.0)
    stuck = publish_lag(first, snap(90.0), 10)  # messages waiting, nothing published in the window
    assert (stuck.state, stuck.value) == ("firing", 7.0)
    m.publish_lag.observe(0.1)
    m.outbox_depth.set(0)
    assert publish_lag(snap(90.0), snap(120.0), 10).state == "ok"


def test_cent_reads_a_batch_reply_with_models_built_once() -> None:
    """cent leaves its result models incomplete and reads each reply with a new TypeAdapter: without
    ``realtime._complete_cent_models`` every reply rebuilt their schemas (5 ms of CPU per 32-publication batch)."""
    import inspect

    from cent import BatchRequest, PublishRequest, dto
    from pydantic import BaseModel

    incomplete = [name for name, obj in vars(dto).items() if inspect.isclass(obj) and issubclass(obj, BaseModel)
                  and obj is not BaseModel and not obj.__pydantic_generic_metadata__["parameters"]
                  and not obj.__pydantic_complete__]
    assert incomplete == []
    batch = BatchRequest(requests=[PublishRequest(channel=f"c:{i}", data={"i": i}) for i in range(3)], parallel=True)
    reply = batch.parse_response(json.dumps({"replies": [{"publish": {"offset": i, "epoch": "e"}} for i in range(3)]}))
    assert [r.offset for r in reply.result.replies] == [0, 1, 2]


def test_the_requests_cent_sends_carry_the_json_values_json_dumps_would() -> None:
    """``realtime.request_json`` (aiohttp's ``json_serialize`` for cent's session) writes a batch as the same JSON
    value ``json.dumps`` does, non-ASCII text included; what msgspec refuses (a lone surrogate) is written by
    ``json.dumps``, as before, not dropped or raised."""
    from cent import BatchRequest, PublishRequest

    from whatrack.realtime import request_json

    data = {"id": 7, "content": "olá 👋 \"quoted\" \n", "sentAt": "2026-12-05T04:00:00.000Z", "n": 1.5e16}
    payload = BatchRequest(requests=[PublishRequest(channel="conversation:7", data=data, idempotency_key="msg:a")],
                           parallel=True).api_payload
    assert json.loads(request_json(payload)) == json.loads(json.dumps(payload)) == payload
    assert "olá 👋" in request_json(payload)
    assert request_json({"content": "\ud800"}) == json.dumps({"content": "\ud800"})


def test_a_batch_reply_is_read_as_cent_reads_it_with_adapters_built_once() -> None:
    """``realtime._Batch`` reads a batch reply with one adapter per reply type (cent 5.2 builds one per command):
    the same result as cent's own ``BatchRequest``, a refused command still a ``KeyError`` (the per-item fallback's
    cue), a reply that is not JSON a ``CentDecodeError``."""
    from cent import BatchRequest, CentDecodeError, PublishRequest

    from whatrack.realtime import _ADAPTERS, _Batch

    requests = [PublishRequest(channel=f"c:{i}", data={"i": i}) for i in range(3)]
    content = json.dumps({"replies": [{"publish": {"offset": i, "epoch": f"e{i}"}} for i in range(3)]})
    ours = _Batch(requests=requests, parallel=True).parse_response(content)
    cents = BatchRequest(requests=requests, parallel=True).parse_response(content)
    assert ours.model_dump() == cents.model_dump()
    assert [(r.offset, r.epoch) for r in ours.result.replies] == [(0, "e0"), (1, "e1"), (2, "e2")]
    adapters = dict(_ADAPTERS)
    _Batch(requests=requests, parallel=True).parse_response(content)
    assert _ADAPTERS == adapters and all(_ADAPTERS[t] is a for t, a in adapters.items())  # built once, reused
    refused = json.dumps({"replies": [{"publish": {"offset": 1}}, {"error": {"code": 102, "message": "unknown"}}]})
    with pytest.raises(KeyError):
        _Batch(requests=requests[:2], parallel=True).parse_response(refused)
    with pytest.raises(CentDecodeError):
        _Batch(requests=requests, parallel=True).parse_response("<html>bad gateway</html>")


async def test_a_batch_with_a_refused_publication_reports_which_and_publishes_the_rest_once(redis_url: str) -> None:
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rt = Realtime(f"{cent_base}/api", CENT_KEY)
        try:
            items = [("conversation:1", {"externalId": "A"}, "key-a"),
                     ("nonamespace:1", {"externalId": "B"}, "key-b"),  # a namespace Centrifugo does not have
                     ("conversation:1", {"externalId": "C"}, "key-c")]
            assert await rt.publish_batch(items) == [True, False, True]
            assert await rt.publish_batch([items[0], items[2]]) == [True, True]  # again: idempotent
            assert [p["externalId"] for p in await rt.history("conversation:1")] == ["A", "C"]
        finally:
            await rt.aclose()


async def _claims(store: Store) -> dict[str, bool]:
    """External id -> whether the row is claimed now (its lease runs)."""
    assert store.writer is not None
    pool = await store.writer.pool()
    got = await pool.fetch("SELECT m.external_id, coalesce(o.claimed_until > clock_timestamp(), false) AS claimed "
                           "FROM message m LEFT JOIN message_outbox o ON o.message_id = m.id")
    return {r["external_id"]: r["claimed"] for r in got}


async def test_a_process_publishes_what_it_writes_from_memory_without_claiming_it_again(
        store: Store, inst: InstanceRef, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert store.writer is not None
    writer = store.writer
    claimed: list[str] = []
    claim = writer.claim

    async def spied_claim(limit: int, lease_s: float) -> list[dict[str, Any]]:
        got = await claim(limit, lease_s)
        claimed.extend(r["external_id"] for r in got)
        return got

    monkeypatch.setattr(writer, "claim", spied_claim)
    await store.save_message(inst, message("BEFORE"))  # no publisher yet: written unclaimed, for any publisher
    assert await _claims(store) == {"BEFORE": False}
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rt = CountingRealtime(f"{cent_base}/api", CENT_KEY)
        publisher = Publisher(writer, rt, **FAST)
        publisher.start()
        try:
            await wait_published(store)
            for i in range(40):
                await store.save_message(inst, message(f"MINE{i:02d}"))
            await store.save_message(inst, message("MINE00"))  # a redelivery: stored once, published once
            rows = await wait_published(store)
        finally:
            await publisher.stop()
            await rt.aclose()
        expected = sorted(["BEFORE", *(f"MINE{i:02d}" for i in range(40))])
        assert claimed == ["BEFORE"]  # the process's own rows were never claimed again
        assert sorted(rt.keys) == [f"msg:{OWNER}:{x}" for x in expected]  # each asked for once
        assert sorted(await _history(f"{cent_base}/api", rows)) == expected


_WRITER_THEN_KILLED = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from store_helpers import TOKEN, message
from whatrack.store.api import Store

async def main() -> None:
    store = Store.from_url(sys.argv[1])
    inst = await store.find_instance("inst-a", TOKEN)
    assert inst is not None and store.writer is not None
    store.writer.publish_from_memory(lambda rows: None, float(sys.argv[3]))  # a publisher that never publishes
    for i in range(5):
        await store.save_message(inst, message(f"ORPHAN{i}"))
    print("written", flush=True)
    sys.stdin.read()  # killed here: its rows written claimed, never published (or gone with the test's stdin)

asyncio.run(main())
"""


async def test_rows_a_killed_process_wrote_for_its_own_publisher_are_published_by_another(
        store: Store, inst: InstanceRef, redis_url: str) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _WRITER_THEN_KILLED, url,
                                                str(Path(__file__).parent), "2", stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, env=dict(os.environ))
    assert proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"written"
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    assert await _claims(store) == {f"ORPHAN{i}": True for i in range(5)}  # claimed by the dead process
    assert store.writer is not None
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rt = CountingRealtime(f"{cent_base}/api", CENT_KEY)
        publisher = Publisher(store.writer, rt, **FAST)
        assert await publisher.drain() == 0  # the dead process's lease still runs
        publisher.start()
        try:
            rows = await wait_published(store)  # its lease ran out: the sweep took them
        finally:
            await publisher.stop()
            await rt.aclose()
        assert sorted(await _history(f"{cent_base}/api", rows)) == [f"ORPHAN{i}" for i in range(5)]
    assert sorted(rt.keys) == [f"msg:{OWNER}:ORPHAN{i}" for i in range(5)]


async def test_a_stopped_publisher_gives_the_rows_it_held_back_at_once(store: Store, inst: InstanceRef) -> None:
    assert store.writer is not None
    rt = Realtime("http://127.0.0.1:9/api", CENT_KEY)  # never reached: the rows are given back before
    publisher = Publisher(store.writer, rt, **FAST)
    publisher.start()
    try:
        task = publisher._task
        assert task is not None
        task.cancel()  # the publishing task stops; the rows are still handed over to it in memory
        for i in range(3):
            await store.save_message(inst, message(f"HELD{i}"))
        assert await _claims(store) == {f"HELD{i}": True for i in range(3)}  # written claimed, held in memory
    finally:
        await publisher.stop()
        await rt.aclose()
    assert await _claims(store) == {f"HELD{i}": False for i in range(3)}  # given back: any publisher takes them now
    assert store.writer.publish_from_memory(lambda rows: None, 1.0) is not None  # and the hand-over is free again


async def test_a_row_written_for_a_publisher_that_stopped_before_its_commit_is_given_back_at_once(
        store: Store, inst: InstanceRef, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write's arguments carry the lease (claimed for this process's publisher); the publisher stops before the
    commit: nobody would publish the row until the lease ran out (30 s), so the writer gives it back itself."""
    assert store.writer is not None
    writer = store.writer
    remove = writer.publish_from_memory(lambda rows: None, 30.0)
    assert remove is not None
    entered, go = asyncio.Event(), asyncio.Event()
    run = writer.run

    async def held_run(op: str, fn: Any) -> Any:
        if op == "save_message":  # the write is on its way to the database
            entered.set()
            await go.wait()
        return await run(op, fn)

    monkeypatch.setattr(writer, "run", held_run)
    task = asyncio.create_task(store.save_message(inst, message("LATE")))
    await entered.wait()
    remove()  # the publisher stops (Publisher.stop) before the commit
    go.set()
    assert (await task).created  # answered at its commit; the hand-over (here: the giving back) follows it
    deadline = asyncio.get_running_loop().time() + 5  # "at once": long before the 30 s lease would end
    while await _claims(store) != {"LATE": False} and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert await _claims(store) == {"LATE": False}  # claimable by any publisher now


async def test_a_mark_that_failed_after_the_publication_is_retried_not_published_again(
        store: Store, inst: InstanceRef, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Centrifugo took the batch, then the database failed the mark (a reset, an outage): the rows are marked when
    the database answers again, not left claimed until their lease ends (30 s) and then published a second time."""
    from whatrack.errors import StoreError

    assert store.writer is not None
    writer = store.writer
    mark = writer.mark_published
    failures = [StoreError("database outbox_mark failed: ConnectionResetError")]

    async def failing_once(ids: list[int]) -> list[float]:
        if failures:
            raise failures.pop()
        return await mark(ids)

    monkeypatch.setattr(writer, "mark_published", failing_once)
    async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
        rt = CountingRealtime(f"{cent_base}/api", CENT_KEY)
        publisher = Publisher(writer, rt, lease_s=30.0, **FAST)
        publisher.start()
        try:
            saved = await store.save_message(inst, message("MARKME"))
            deadline = asyncio.get_running_loop().time() + 10  # well inside the 30 s lease
            while publisher.published < 1 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert not failures  # the first mark did fail
            assert publisher.published == 1
            rows = await store.message_rows()
            assert [r["published_at"] is not None for r in rows] == [True]
            assert rt.keys == [f"msg:{OWNER}:MARKME"]  # published once: the retry marked, it did not publish again
            assert await _history(f"{cent_base}/api", [{"conversation_id": saved.conversation_id}]) == ["MARKME"]
        finally:
            await publisher.stop()
            await rt.aclose()


# -- the outbox table (migration 0007) --------------------------------------------------------------------------------

async def _at_revision(store: Store, rev: str, *, down: bool = False) -> None:
    from alembic import command

    from whatrack.store.upgrade import alembic_config

    async with store.engine.begin() as conn:
        await conn.run_sync(lambda c: (command.downgrade if down else command.upgrade)(alembic_config(c), rev))


async def test_migration_0007_moves_unpublished_rows_and_their_leases_into_the_outbox_table_and_back(
        make_pg_database: Callable[[], str]) -> None:
    """Rows unpublished at the upgrade (claimed or not) are in ``message_outbox`` after it, with their lease; a row a
    process of the previous version marks (``published_at`` only) is dropped from the outbox by the next claim, never
    published again; the 34-parameter overload's rows reach the outbox; a job id is still unique, through a partial
    index; the downgrade gives the leases back and the unique constraint."""
    import asyncpg

    from whatrack.store.write import MESSAGE_COLUMNS, SAVE_MESSAGE, asyncpg_dsn

    url = make_pg_database()
    store = Store.from_url(url)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await _at_revision(store, "0006")
        inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        for mid in ("DONE", "FREE", "HELD", "OLDMARK"):
            await store.save_message(inst, message(mid))
        await conn.execute("UPDATE message SET published_at = now() WHERE external_id = 'DONE'")
        await conn.execute("UPDATE message SET publish_claimed_until = now() + interval '1 hour' "
                           "WHERE external_id = 'HELD'")
        await _at_revision(store, "head")

        outbox = ("SELECT m.external_id, o.claimed_until > now() AS held FROM message_outbox o "
                  "JOIN message m ON m.id = o.message_id ORDER BY m.external_id")
        assert [tuple(r) for r in await conn.fetch(outbox)] == [("FREE", None), ("HELD", True), ("OLDMARK", None)]
        assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = 'message' "
                                   "AND indexdef LIKE '%published_at%'") == 0  # the mark can be a HOT update
        job_index = "SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_message_job_id'"
        assert str(await conn.fetchval(job_index)).endswith("WHERE (job_id IS NOT NULL)")  # webhook rows: no entry
        await conn.execute("UPDATE message SET job_id = 'job-1' WHERE external_id = 'DONE'")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("UPDATE message SET job_id = 'job-1' WHERE external_id = 'FREE'")

        # A process of the previous version marks OLDMARK as 0006's publisher did: published_at only.
        await conn.execute("UPDATE message SET published_at = now(), publish_claimed_until = NULL "
                           "WHERE external_id = 'OLDMARK'")
        writer = store.writer
        assert writer is not None
        assert [r["external_id"] for r in await writer.claim(10, 30.0)] == ["FREE"]  # HELD's lease still runs
        assert [tuple(r) for r in await conn.fetch(outbox)] == [("FREE", True), ("HELD", True)]
        free = await conn.fetchval("SELECT id FROM message WHERE external_id = 'FREE'")
        assert len(await writer.mark_published([free])) == 1
        assert await writer.mark_published([free]) == []  # the first mark only
        assert await writer.depth() == 1

        # A process older than 0006 calls the 34-parameter overload: its row is unclaimed in the outbox.
        new = await store.save_message(inst, message("NEW35"))
        args = await conn.fetchrow("SELECT * FROM message WHERE id = $1", new.message_id)
        assert args is not None
        call = SAVE_MESSAGE.replace(", $35)", ")")
        lead = ("5511988887777@s.whatsapp.net", "5511988887777", None, False)
        values = {c: args[c] for c in MESSAGE_COLUMNS} | {"provider_id": "P34", "external_id": "OLD34"}
        row = await conn.fetchrow(call, inst.organization_id, inst.id, *lead, True,
                                  *(values[c] for c in MESSAGE_COLUMNS))
        assert row is not None and row["created"]
        assert [r[0] for r in await conn.fetch(outbox)] == ["HELD", "NEW35", "OLD34"]

        await _at_revision(store, "0006", down=True)
        got = {r["external_id"]: (r["published_at"] is not None, r["held"]) for r in await conn.fetch(
            "SELECT external_id, published_at, publish_claimed_until > now() AS held FROM message")}
        assert got == {"DONE": (True, None), "FREE": (True, None), "OLDMARK": (True, None), "HELD": (False, True),
                       "NEW35": (False, None), "OLD34": (False, None)}
        assert await conn.fetchval("SELECT to_regclass('message_outbox')") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_message_unpublished'") == 1
        assert "WHERE" not in str(await conn.fetchval(job_index))  # the unique constraint again
    finally:
        await conn.close()
        await store.aclose()
