"""The realtime outbox publisher: one task per endpoint process publishes committed messages to Centrifugo.

The webhook answers 2xx right after its commit; the statement that writes a message also writes its row in the outbox
(``message_outbox``, migration 0007), and the mark deletes that row and sets ``message.published_at``. Rows this
process writes are written already claimed for it (a lease, ``message_outbox.claimed_until``, set by the insert
itself) and handed to this task in memory after their commit (``Writer.publish_from_memory``: the write sends no
NOTIFY, which would serialize every commit database-wide). Other rows (the follow-up worker's, announced by ``NOTIFY
whatrack_outbox``; those of a process that died before publishing them, found by a periodic sweep; those given back
after an outage) it claims in batches with ``FOR UPDATE SKIP LOCKED`` in a short transaction. Either way it publishes
a batch with one Centrifugo ``batch`` call (an idempotency key per message) and marks the rows published in bulk.
When Centrifugo is down it gives the rows back and retries with a capped backoff: an outage costs no QStash retry and
no 5xx. Rows a killed process had claimed come back when their lease runs out, and the next sweep (of any process)
publishes them.

Safe with many processes on many hosts: SKIP LOCKED and the lease keep two publishers off the same row; a crash between
publishing and marking republishes with the same idempotency key, which Centrifugo deduplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from whatrack.errors import PublishError, StoreError
from whatrack.store import rows
from whatrack.store.write import OUTBOX_CHANNEL, Writer

if TYPE_CHECKING:
    import asyncpg

    from whatrack.metrics import Metrics
    from whatrack.realtime import Realtime

log = logging.getLogger("whatrack.webhook.publisher")

#: Rows per claim and per Centrifugo batch call. One publisher per process publishes one batch at a time (a chat's
#: messages stay in order), so under a backlog its rate is this size over one claim-publish-mark cycle: at 100 the
#: endpoint stored faster than it published (bench/webhook.py -c 96: stored 2,672/s, published 2,237/s); at 300 it
#: did again once the endpoint got faster (-c 256: stored 4,159/s, published 3,591/s); at 500 4,174 and 4,171, until
#: the endpoint got faster again (-c 256: stored 4,117/s, stored and published 3,912/s); at 1,000 4,022 and 4,017.
BATCH_SIZE = 1000
#: Seconds a claim lasts: well above one batch call (realtime.TIMEOUT_S), so that only a dead publisher loses it.
LEASE_S = 30.0
#: Seconds between sweeps when no NOTIFY arrives (a lost notification, a killed process's expired lease).
SWEEP_S = 2.0
#: Retry backoff after a failure (Centrifugo or the database): doubles from the first value up to the cap.
BACKOFF_S = (0.2, 5.0)
#: Seconds before a row Centrifugo refused (not an outage: e.g. an unknown namespace) is tried again.
REFUSED_RETRY_S = 60.0
#: Rows held in memory for publication, at most (beyond it, new rows are given back to the outbox and claimed later:
#: a publisher that falls behind keeps its backlog in the database, not in memory).
MEMORY_MAX = 10 * BATCH_SIZE


def publication(row: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """``(channel, data, idempotency_key)`` of a claimed outbox row."""
    return rows.channel(row["conversation_id"]), rows.realtime_payload(row), f"msg:{row['provider_id']}"


class Publisher:
    """Publishes the outbox of one database until stopped. :meth:`start` inside the event loop, :meth:`stop` after."""

    def __init__(self, writer: Writer, realtime: Realtime, *, metrics: Metrics | None = None,
                 batch_size: int = BATCH_SIZE, lease_s: float = LEASE_S, sweep_s: float = SWEEP_S,
                 backoff_s: tuple[float, float] = BACKOFF_S) -> None:
        self.writer = writer
        self.realtime = realtime
        self.metrics = metrics
        self.batch_size = batch_size
        self.lease_s = lease_s
        self.sweep_s = sweep_s
        self.backoff_s = backoff_s
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._unreceive: Callable[[], None] | None = None
        self._memory: deque[tuple[float, dict[str, Any]]] = deque()  # (monotonic time handed over, row)
        self._give_back: list[int] = []  # ids of rows claimed for this process that it will not publish from memory
        self._unmarked: list[int] = []  # published to Centrifugo, their mark failed: marked when the database answers
        self._claimed_at = 0.0
        self.published = 0  # messages this publisher marked published (tests and logs)

    def start(self) -> None:
        if self._task is None:
            self._unsubscribe = self.writer.on_saved(self.wake)
            self._unreceive = self.writer.publish_from_memory(self._receive, self.lease_s)
            self._task = asyncio.create_task(self.run(), name="whatrack-outbox-publisher")

    def _receive(self, rows: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for row in rows:
            if len(self._memory) < MEMORY_MAX:
                self._memory.append((now, row))
            else:
                self._give_back.append(row["id"])

    def wake(self) -> None:
        """Publish now (a message was just committed) rather than at the next sweep."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop the task (a batch in flight is abandoned: its lease brings it back), give the rows held in memory back
        to the outbox (for the other processes' publishers, at once), mark those published but not marked yet, and
        close the listener."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unreceive is not None:
            self._unreceive()
            self._unreceive = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._give_back += [row["id"] for _, row in self._memory]
        self._memory.clear()
        with contextlib.suppress(TimeoutError, StoreError):
            async with asyncio.timeout(5):  # else their lease brings them back (and the unmarked are published again)
                await self._return_given_back()
                await self._mark_unmarked()
        await self._close_listener()

    async def run(self) -> None:
        """Drain, then wait for a NOTIFY or the sweep; after a failure, back off (capped) and drain again."""
        delay = 0.0
        while True:
            await self._listen()
            self._wake.clear()  # what arrived before this drain is covered by it
            try:
                await self.drain()
                delay = 0.0
            except Exception as e:  # the task must outlive any failure: a dead publisher would publish nothing
                if self.metrics and isinstance(e, PublishError):
                    self.metrics.realtime_failures.inc()
                delay = min(self.backoff_s[1], max(self.backoff_s[0], delay * 2))
                if isinstance(e, StoreError | PublishError):
                    log.warning("[outbox] %s; retrying in %.1f s", e, delay)
                else:
                    log.exception("[outbox] unexpected failure; retrying in %.1f s", delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                continue
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns instead of raising when the cancellation
            # of stop() lands just as the wait ends, and the loop went on (stop() then waited for ever).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.sweep_s):
                    await self._wake.wait()

    async def drain(self) -> int:
        """Publish until nothing is left in memory or to claim; how many messages were marked published.

        The rows handed over in memory go first; the outbox is claimed from when they run out, and at least every
        ``sweep_s`` while they do not (rows of other processes and rows given back are not kept waiting by a
        steady stream of this process's own).

        Raises:
            PublishError: Centrifugo failed (the batch's rows were given back to the outbox).
            StoreError: the database failed.
        """
        total = 0
        try:
            while True:
                total += await self._mark_unmarked()
                await self._return_given_back()
                batch = self._from_memory()
                if not batch or time.monotonic() - self._claimed_at > self.sweep_s:
                    self._claimed_at = time.monotonic()
                    try:
                        claimed = await self.writer.claim(self.batch_size, self.lease_s)
                        if claimed:
                            total += await self._publish(claimed)
                    except BaseException:
                        self._give_back += [row["id"] for row in batch]  # not tried yet: back to the outbox
                        raise
                    if not claimed and not batch:
                        return total
                if batch:
                    total += await self._publish(batch)
        finally:
            await self._observe_depth()

    def _from_memory(self) -> list[dict[str, Any]]:
        """Up to a batch of the rows handed over in memory, oldest first. A row held for half its lease is given back
        instead: its lease could run out during the publication, and another publisher claim it meanwhile."""
        batch: list[dict[str, Any]] = []
        stale = time.monotonic() - self.lease_s / 2
        while self._memory and len(batch) < self.batch_size:
            at, row = self._memory.popleft()
            if at < stale:
                self._give_back.append(row["id"])
            else:
                batch.append(row)
        return batch

    async def _return_given_back(self) -> None:
        if self._give_back:
            ids, self._give_back = self._give_back, []
            await self.writer.give_back(ids)

    async def _publish(self, claimed: list[dict[str, Any]]) -> int:
        ids = [r["id"] for r in claimed]
        try:
            ok = await self.realtime.publish_batch([publication(r) for r in claimed])
        except PublishError:
            await self.writer.give_back(ids)
            raise
        done = [i for i, took in zip(ids, ok, strict=True) if took]
        refused = [i for i, took in zip(ids, ok, strict=True) if not took]
        try:
            marked = await self._mark(done)
        except StoreError:  # published all the same: mark them at the next try, not republish them after the lease
            self._unmarked += done
            raise
        if refused:
            log.warning("[outbox] Centrifugo refused %d message(s); trying them again in %.0f s", len(refused),
                        REFUSED_RETRY_S)
            await self.writer.release(refused, REFUSED_RETRY_S)
        return marked

    async def _mark(self, ids: list[int]) -> int:
        """Mark published rows; how many were marked now (a row marked already, by another publisher, is not)."""
        lags = await self.writer.mark_published(ids) if ids else []
        if self.metrics:
            for lag in lags:
                self.metrics.publish_lag.observe(max(lag, 0.0))
        self.published += len(lags)
        log.debug("[outbox] published %d message(s)", len(lags))
        return len(lags)

    async def _mark_unmarked(self) -> int:
        if not self._unmarked:
            return 0
        ids, self._unmarked = self._unmarked, []
        try:
            return await self._mark(ids)
        except BaseException:
            self._unmarked = ids + self._unmarked
            raise

    async def _observe_depth(self) -> None:
        if self.metrics is None:
            return
        with contextlib.suppress(StoreError):
            self.metrics.outbox_depth.set(await self.writer.depth())

    async def _listen(self) -> None:
        """(Re)open the LISTEN connection when it is not open; without one the sweep still publishes."""
        if self._listener is not None and not self._listener.is_closed():
            return
        await self._close_listener()
        try:
            self._listener = await self.writer.connect()
            await self._listener.add_listener(OUTBOX_CHANNEL, self._notified)
        except Exception as e:  # any failure here only costs latency: the sweep still runs
            log.debug("[outbox] cannot LISTEN (%s); sweeping every %.1f s", e, self.sweep_s)
            await self._close_listener()

    def _notified(self, *_: object) -> None:
        self.wake()

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
