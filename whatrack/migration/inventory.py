"""What a Redis holds before a migration: keys by prefix and type (SCAN in batches), and for every BullMQ queue
its job count per state and its job schedulers."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from whatrack import redis_tcp
from whatrack.migration.keys import BULL_PREFIX, is_own_key, key_prefix, queue_key, url_db, with_db
from whatrack.migration.queues import find_queues, scan_batches, source_databases, state_counts
from whatrack.settings import mask_url

log = logging.getLogger("whatrack.migration.inventory")


@dataclass
class QueueInventory:
    """One BullMQ queue: jobs per state, whether it is paused, its id counter and job schedulers (id -> next ms)."""

    name: str
    counts: dict[str, int]
    paused: bool
    last_id: int
    schedulers: dict[str, int] = field(default_factory=dict)

    @property
    def jobs(self) -> int:
        return sum(self.counts.values())


@dataclass
class Inventory:
    """Keys per (database, prefix, type), and the queues of the URL's database."""

    url: str
    keys: Counter[tuple[int, str, str]] = field(default_factory=Counter)
    queues: dict[str, QueueInventory] = field(default_factory=dict)

    @property
    def total_keys(self) -> int:
        return sum(self.keys.values())

    @property
    def verdict(self) -> str:
        jobs = sum(q.jobs for q in self.queues.values())
        dbs = sorted({d for d, _, _ in self.keys})
        return (f"inventory of {self.url}: {self.total_keys} keys in db {', '.join(map(str, dbs)) or '-'}; "
                f"{len(self.queues)} BullMQ queue(s) with {jobs} jobs")

    def to_rows(self) -> list[dict[str, Any]]:
        return [{"db": d, "prefix": p, "type": t, "keys": n} for (d, p, t), n in sorted(self.keys.items())]

    def queue_rows(self) -> list[dict[str, Any]]:
        return [{"queue": q.name, **q.counts, "paused": q.paused, "id": q.last_id, "schedulers": len(q.schedulers)}
                for q in self.queues.values()]

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.to_rows(), columns=["db", "prefix", "type", "keys"])


def inventory(url: str, *, ca_bundle: str | None = None, batch: int = 1000, prefix: str = BULL_PREFIX) -> Inventory:
    """Count ``url``'s keys by prefix and type in every database that has keys, and describe its BullMQ queues."""
    inv = Inventory(url=mask_url(url) or "")
    main_db = url_db(url)
    main = redis_tcp.connect_sync(url, ca_bundle=ca_bundle)
    try:
        for db in source_databases(main, main_db):
            c = main if db == main_db else redis_tcp.connect_sync(with_db(url, db), ca_bundle=ca_bundle)
            try:
                for _cur, keys in scan_batches(c, 0, batch):
                    keys = [k for k in keys if not is_own_key(k)]
                    pipe = c.pipeline(transaction=False)
                    for k in keys:
                        pipe.type(k)
                    for k, t in zip(keys, pipe.execute(), strict=True):
                        inv.keys[(db, key_prefix(k), t.decode() if isinstance(t, bytes) else str(t))] += 1
            finally:
                if c is not main:
                    with contextlib.suppress(redis.RedisError):
                        c.close()
        for q in find_queues(main, prefix):
            inv.queues[q] = _queue(main, q, prefix)
    finally:
        main.close()
    log.debug("%s", inv.verdict)  # the caller prints it: said once
    return inv


def _queue(c: redis.Redis, q: str, prefix: str) -> QueueInventory:
    paused = c.hget(queue_key(q, "meta", prefix), "paused") is not None
    last = int(c.get(queue_key(q, "id", prefix)) or 0)
    rows: Any = c.zrange(queue_key(q, "repeat", prefix), 0, -1, withscores=True)
    sched = {m.decode(): int(s) for m, s in rows}
    counts = state_counts(c, q, prefix)
    return QueueInventory(name=q, counts=counts, paused=paused, last_id=last, schedulers=sched)
