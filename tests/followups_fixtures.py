"""Fixtures and helpers shared by tests/test_followups.py and tests/test_bullmq_parity.py (imported by both)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from bullmq import Job, Queue
from followups_support import RealtimeForTests, StoreForTests, UazapiClientForTests, UazapiStandIn

from whatrack.devstack import servers
from whatrack.followups.jobs import JOB_NAME, FollowupJob, open_queue, pooled_client
from whatrack.followups.process import WorkerContext, process_followup
from whatrack.followups.worker import FollowupWorker

ORG, INST, LEAD, PHONE = 1, 2, 3, "5511988887777"


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[Queue]:
    q = open_queue(redis_url)
    yield q
    await q.close()


@pytest.fixture(scope="module")
def uazapi_server(redis_server: servers.RedisServer) -> Iterator[UazapiStandIn]:
    s = UazapiStandIn(redis_server.url).start()
    yield s
    s.stop()


@pytest.fixture
def uazapi(uazapi_server: UazapiStandIn, redis_url: str) -> UazapiStandIn:
    """The stand-in, its state emptied with the rest of Redis (``redis_url`` flushes it)."""
    return uazapi_server


@pytest.fixture
async def ctx(redis_url: str, uazapi: UazapiStandIn) -> AsyncIterator[WorkerContext]:
    store, rt = StoreForTests(redis_url), RealtimeForTests(redis_url)
    ua = UazapiClientForTests(uazapi.url, "instance-token")
    await store.add_instance(INST, ORG)
    await store.add_lead(ORG, LEAD, PHONE)
    c = WorkerContext(store=store, uazapi=ua, realtime=rt, closers=[store.aclose, rt.aclose, ua.aclose])
    yield c
    await c.aclose()


@asynccontextmanager
async def running(url: str, processor: Callable[[Job], Awaitable[Any]], ctx: WorkerContext | None = None,
                  **kw: Any) -> AsyncIterator[FollowupWorker]:
    fw = FollowupWorker(url, processor, **kw)
    own = None
    if ctx is not None and ctx.redis is None:
        own = ctx.redis = pooled_client(url, max_connections=64)  # as serve() does: not the worker's pool
    await fw.start()
    try:
        yield fw
    finally:
        await fw.close(timeout=10)
        if own is not None and ctx is not None:
            await own.aclose()
            ctx.redis = None


async def wait_until(cond: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    """Poll ``cond``; a hang guard, not a speed check (the deadline is far above the expected time)."""
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def finished(queue: Queue, *ids: str) -> dict[str, str]:
    states: dict[str, str] = {}

    async def done() -> bool:
        for i in ids:
            states[i] = await queue.getJobState(i)
        return all(s in ("completed", "failed") for s in states.values())

    await wait_until(done, f"jobs {ids} to finish")
    return states


async def add(queue: Queue, job_id: str, data: dict[str, Any] | None = None, **opts: Any) -> str:
    job = await queue.add(JOB_NAME, data or FollowupJob(ORG, INST, LEAD, f"text of {job_id}",
                                                        datetime.now(UTC)).to_wire(), {"jobId": job_id, **opts})
    return str(job.id)


def handler(ctx: WorkerContext) -> Callable[[Job], Awaitable[Any]]:
    return lambda job: process_followup(ctx, job)


