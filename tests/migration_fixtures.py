"""Test data for the migration tests and bench: BullMQ jobs in every state (made by the real ``bullmq`` package),
non-BullMQ keys of every type (some with TTLs, some big, some binary) and keys in database 3."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from bullmq import FlowProducer, Queue, Worker

from whatrack import redis_tcp
from whatrack.migration.keys import with_db

QUEUE = "followup"


@dataclass
class Made:
    """What was generated, for assertions."""

    jobs: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    active_ids: list[str] = field(default_factory=list)


def _conn(url: str, ca: str | None = None) -> Any:
    return redis_tcp.connect(url, ca_bundle=ca, decode_responses=True)


async def _realistic(url: str, made: Made, n: int, queue: str) -> None:
    """A representative subset the way production makes it: a worker completes, fails and retries jobs; a flow
    parent waits for its child; a scheduler, a dedup key; a few jobs left active with their lock."""
    q = Queue(queue, {"connection": _conn(url)})
    jobs = []
    for i in range(n):
        kind = ("ok", "fail", "retry")[i % 3]
        opts: dict[str, Any] = {"attempts": 1}
        if kind == "retry":
            opts = {"attempts": 3, "backoff": {"type": "fixed", "delay": 3_600_000}}
        jobs.append({"name": "follow-up", "data": {"leadId": i, "kind": kind}, "opts": opts})
    await q.addBulk(jobs)
    done = asyncio.Event()
    seen = 0

    async def process(job: Any, token: str) -> Any:
        nonlocal seen
        seen += 1
        if seen >= n:
            done.set()
        if job.data["kind"] != "ok":
            raise ValueError(f"lead {job.data['leadId']} failed")
        return {"sent": True}

    w = Worker(queue, process, {"connection": _conn(url), "concurrency": 20})
    await asyncio.wait_for(done.wait(), 120)
    await w.close()
    # flow: a parent in waiting-children, its child waiting
    fp = FlowProducer({"connection": _conn(url)})
    await fp.add({"name": "parent", "queueName": queue, "data": {"flow": 1},
                  "children": [{"name": "child", "queueName": queue, "data": {"child": 1}}]})
    await fp.close()
    await q.add("dedup", {"d": 1}, {"deduplication": {"id": "lead-7", "ttl": 600_000}})
    await q.add("custom", {"c": 1}, {"jobId": "lead-42-followup"})
    await q.upsertJobScheduler("daily-digest", {"every": 3_600_000}, "digest", {"digest": True})
    # two jobs left active with their lock, as a worker mid-job leaves them
    await q.addBulk([{"name": "long", "data": {"active": i}} for i in range(2)])
    hold = Worker(queue, process, {"connection": _conn(url), "autorun": False, "lockDuration": 600_000})
    for i in range(2):
        job = await hold.getNextJob(f"holder:{i}")
        if job is not None:
            made.active_ids.append(job.id)
    await hold.close(force=True)
    await q.close()


async def _bulk(url: str, made: Made, n: int, queue: str, chunk: int = 5000) -> None:
    """The rest through pipelined ``Queue.addBulk`` batches: waiting, delayed (1-10 h ahead), prioritized."""
    q = Queue(queue, {"connection": _conn(url)})
    for start in range(0, n, chunk):
        batch = []
        for i in range(start, min(n, start + chunk)):
            r = i % 10
            opts: dict[str, Any] = {}
            if r < 3:
                opts = {"delay": 3_600_000 * (1 + i % 10)}
            elif r < 5:
                opts = {"priority": 1 + i % 7}
            batch.append({"name": "follow-up", "data": {"leadId": i, "text": f"msg {i} ✓"}, "opts": opts})
        await q.addBulk(batch)
    await q.close()


def make_other_keys(url: str, *, big: bool = True) -> int:
    """Non-BullMQ keys of every type, some with TTLs, binary names and values; and keys in database 3."""
    made = 0
    with redis.Redis.from_url(url) as c:
        p = c.pipeline(transaction=False)
        for i in range(200):
            p.set(f"session:{i}", f"token-{i}", ex=3600 if i % 2 else None)
            p.rpush(f"inbox:{i}", *[f"m{j}" for j in range(5)])
            p.sadd(f"tags:{i}", "a", "b", f"t{i}")
            p.zadd(f"scores:{i}", {"x": 1.5, "y": i, "z": -0.25})
            p.hset(f"lead:{i}", mapping={"name": f"Lead {i}", "phone": f"5511{i:08d}"})
            if i % 4 == 0:
                p.expire(f"lead:{i}", 7200)
        p.set(b"bin:\xff\x00key", b"\x00\x01\xfe\xff")
        p.execute()
        made += 1001
        c.xadd("audit", {"ev": "boot"}, id="1-1")
        for i in range(50):
            c.xadd("audit", {"ev": f"e{i}", "n": str(i)})
        c.xgroup_create("audit", "auditors", id="0")
        c.xreadgroup("auditors", "a1", {"audit": ">"}, count=10)
        c.xack("audit", "auditors", *[e[0] for e in c.xrange("audit", count=10)])
        c.xadd("empty-stream", {"x": "1"}, id="5-0")
        c.xdel("empty-stream", "5-0")
        made += 2
        if big:
            c.rpush("biglist", *[f"item-{i}" for i in range(12_000)])
            c.hset("bighash", mapping={f"f{i}": str(i) for i in range(6_000)})
            c.zadd("bigzset", {f"m{i}": i * 0.5 for i in range(7_000)})
            c.sadd("bigset", *[f"s{i}" for i in range(6_000)])
            made += 4
    with redis.Redis.from_url(with_db(url, 3)) as c3:
        for i in range(20):
            c3.set(f"legacy:{i}", f"v{i}", ex=3600 if i % 2 else None)
            c3.hset(f"legacy-h:{i}", "f", "v")
        c3.rpush("legacy-list", "a", "b", "c")
        made += 41
    return made


def make_jobs(url: str, n: int, *, realistic: int = 300, queue: str = QUEUE) -> Made:
    """``n`` BullMQ jobs in every state on ``url``: ``realistic`` of them through a real worker, the rest bulk."""
    made = Made()
    t = time.perf_counter()
    asyncio.run(_realistic(url, made, realistic, queue))
    made.timings["realistic"] = time.perf_counter() - t
    rest = max(0, n - realistic - 7)
    t = time.perf_counter()
    asyncio.run(_bulk(url, made, rest, queue))
    made.timings["bulk"] = time.perf_counter() - t
    made.jobs = realistic + 7 + rest
    return made


# -- pytest fixtures (imported by the tests/test_migration*.py modules) -----------------------------------------------

import contextlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from whatrack.devstack import servers, tls  # noqa: E402

SOURCE_PW = "legacy-pw-Zq81x"
TARGET_PW = "upstash-pw-Yk27w"


@dataclass
class Pair:
    """A legacy Redis (plain TCP, 7.0) and an "Upstash" Redis (TLS with our CA, 7.0), both with passwords."""

    source_url: str
    target_url: str
    ca: str
    workdir: Path


@pytest.fixture(scope="session")
def _mig_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    d = tmp_path_factory.mktemp("migration")
    files = tls.make_ca_and_server_cert(d / "ca")
    with servers.RedisServer(d / "legacy", password=SOURCE_PW) as a, \
            servers.RedisServer(d / "upstash", tls=files, password=TARGET_PW) as b:
        yield Pair(a.url, b.url, str(files.ca), d)


def flush(pair: Pair) -> None:
    with redis.Redis.from_url(pair.source_url) as c:
        c.flushall()
    c2 = redis_tcp.connect_sync(pair.target_url, ca_bundle=pair.ca)
    try:
        c2.flushall()
    finally:
        c2.close()


@pytest.fixture
def mig(_mig_pair: Pair) -> Pair:
    """The session's legacy + TLS servers, emptied before the test."""
    flush(_mig_pair)
    return _mig_pair


def target_client(pair: Pair) -> redis.Redis:
    return redis_tcp.connect_sync(pair.target_url, ca_bundle=pair.ca)


@contextlib.contextmanager
def clients(pair: Pair) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    s = redis.Redis.from_url(pair.source_url)
    t = target_client(pair)
    try:
        yield s, t
    finally:
        s.close()
        t.close()


def source_key_count(pair: Pair) -> int:
    """Keys in the source's databases 0 and 3 (what a copy must carry)."""
    n = 0
    for db in (0, 3):
        with redis.Redis.from_url(with_db(pair.source_url, db)) as c:
            n += int(c.dbsize())
    return n
