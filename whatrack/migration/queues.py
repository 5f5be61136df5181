"""BullMQ queues during a cutover: find them, pause and resume them the way BullMQ does, wait for active jobs.

Pausing goes through the ``bullmq`` package's ``Queue.pause()`` (the same Lua script Node runs: ``paused`` set in
``meta``, the marker removed, a ``paused`` event), so workers of either language stop taking jobs. In bullmq 3.4 /
BullMQ 5+ waiting jobs stay in ``wait`` while paused (the legacy ``paused`` list is only drained on resume).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import redis
from bullmq import Queue

from whatrack import redis_tcp
from whatrack.errors import MigrationError
from whatrack.migration.keys import BULL_PREFIX, STATE_LISTS, STATE_ZSETS, parse_bull_key, queue_key
from whatrack.settings import mask_url

log = logging.getLogger("whatrack.migration.queues")

#: SCAN page size: big enough to be quick, small enough that no single reply is large.
SCAN_COUNT = 1000


def find_queues(client: redis.Redis, prefix: str = BULL_PREFIX) -> list[str]:
    """Names of the BullMQ queues on ``client``'s database (any queue with a ``meta``, ``id`` or state key)."""
    names: set[str] = set()
    for suffix in ("meta", "id", "wait", "delayed", "active", "prioritized", "completed", "failed"):
        for key in client.scan_iter(match=f"{prefix}:*:{suffix}".encode(), count=SCAN_COUNT):
            bk = parse_bull_key(key, prefix)
            if bk is not None and bk.job_id is None:
                names.add(bk.queue)
    return sorted(names)


def state_counts(client: redis.Redis, queue: str, prefix: str = BULL_PREFIX) -> dict[str, int]:
    """Job count per state, read from the state structures themselves (LLEN / ZCARD)."""
    pipe = client.pipeline(transaction=False)
    for s in STATE_LISTS:
        pipe.llen(queue_key(queue, s, prefix))
    for s in STATE_ZSETS:
        pipe.zcard(queue_key(queue, s, prefix))
    return dict(zip((*STATE_LISTS, *STATE_ZSETS), (int(x) for x in pipe.execute()), strict=True))


async def _set_paused(url: str, queues: list[str], paused: bool, ca_bundle: str | None, prefix: str) -> None:
    for name in queues:
        conn = redis_tcp.connect(url, ca_bundle=ca_bundle, decode_responses=True)
        q = Queue(name, {"connection": conn, "prefix": prefix})
        try:
            await (q.pause() if paused else q.resume())
        finally:
            await q.close()  # closes ``conn`` too


def pause_queues(url: str, queues: list[str], *, ca_bundle: str | None = None, prefix: str = BULL_PREFIX) -> None:
    """Pause ``queues`` with BullMQ's own ``Queue.pause()``.

    Raises:
        MigrationError: the server refused the pause script.
    """
    client = redis_tcp.connect_sync(url, ca_bundle=ca_bundle)
    try:
        # A queue already paused (a resumed copy, an operator's pause) is left alone: pausing again would add a
        # second ``paused`` event to its events stream, a change after part of it may have been copied.
        todo = [q for q in queues if client.hget(queue_key(q, "meta", prefix), "paused") is None]
    finally:
        client.close()
    try:
        asyncio.run(_set_paused(url, todo, True, ca_bundle, prefix))
    except redis.RedisError as e:
        raise MigrationError(f"pausing queues on {mask_url(url)} failed: {e}") from e
    log.debug("paused %d queue(s) on %s (%d already paused)", len(todo), mask_url(url), len(queues) - len(todo))


def resume_queues(url: str, *, ca_bundle: str | None = None, prefix: str = BULL_PREFIX,
                  queues: list[str] | None = None) -> list[str]:
    """Resume every BullMQ queue on ``url`` (or just ``queues``) with ``Queue.resume()``; return their names.

    The copy leaves queues paused on the target so that nothing runs until the operator has checked the verify
    verdict and stopped the old workers; this is the switch that lets the new workers go.

    Raises:
        MigrationError: the server refused the resume script.
    """
    client = redis_tcp.connect_sync(url, ca_bundle=ca_bundle)
    try:
        names = queues if queues is not None else find_queues(client, prefix)
    finally:
        client.close()
    try:
        asyncio.run(_set_paused(url, names, False, ca_bundle, prefix))
    except redis.RedisError as e:
        raise MigrationError(f"resuming queues on {mask_url(url)} failed: {e}") from e
    log.debug("resumed %d queue(s) on %s: %s", len(names), mask_url(url), ", ".join(names))
    return names


def wait_for_active(client: redis.Redis, queues: list[str], timeout_s: float, prefix: str = BULL_PREFIX,
                    poll_s: float = 0.2) -> dict[str, int]:
    """Wait up to ``timeout_s`` until no queue has active jobs; return the active count left per queue (0s when
    drained). Jobs still active are copied with their lock: on the target they come back through BullMQ's stalled
    check after the lock expires (protocols/bullmq.md §4, pitfall 3)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = {q: int(client.llen(queue_key(q, "active", prefix))) for q in queues}
        if not any(left.values()) or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def scan_batches(client: redis.Redis, cursor: int, batch: int, match: bytes | None = None
                 ) -> Iterator[tuple[int, list[bytes]]]:
    """SCAN from ``cursor``, yielding (next cursor, keys) pages: never more than one page of keys in memory."""
    while True:
        cursor, keys = client.scan(cursor=cursor, match=match, count=batch)
        yield int(cursor), [k if isinstance(k, bytes) else k.encode() for k in keys]
        if int(cursor) == 0:
            return


def source_databases(client: redis.Redis, fallback: int) -> list[int]:
    """Databases that hold keys (from INFO keyspace), the URL's own first; just ``fallback`` if INFO is refused."""
    try:
        info = client.info("keyspace")
    except redis.ResponseError:
        return [fallback]
    dbs = sorted(int(str(k)[2:]) for k in info if str(k).startswith("db"))
    return [fallback, *(d for d in dbs if d != fallback)]
