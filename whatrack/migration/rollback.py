"""Rollback: bring what changed on the target since the cutover back to the source, then verify both ways.

What counts as "changed since the cutover" (the marker :func:`copy` writes on the target, epoch ms):

* BullMQ jobs carry their own clock: a job hash whose ``timestamp`` (created), ``processedOn`` or ``finishedOn`` is
  at or after the cutover changed on the target; it goes back with its sub-keys (lock, logs, dependencies).
* Queue-level keys (``wait``, ``delayed``, ``completed``, ``meta``, ``id``, ...) change with every job move, so
  they always go back whole: small next to the jobs.
* Other keys have no modification time in Redis (OBJECT IDLETIME tracks access, keyspace notifications would have
  to be enabled before the cutover and are not guaranteed on Upstash), so a digest comparison finds them.
* A key that exists on the source but no longer on the target (a job removed on completion, a consumed key) is
  deleted on the source: after a rollback the source is what the target was.

The target's queues are paused first (BullMQ ``Queue.pause``), and the source's stay paused until the operator
resumes them (:func:`whatrack.migration.resume_queues`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import redis

from whatrack import redis_tcp
from whatrack.errors import MigrationError
from whatrack.migration.copy import Mode, copy_batch
from whatrack.migration.guard import NEXT_AFTER_ROLLBACK
from whatrack.migration.keys import (
    BULL_PREFIX,
    CUTOVER_KEY,
    is_own_key,
    map_to_source,
    map_to_target,
    parse_bull_key,
    queue_key,
    url_db,
    with_db,
)
from whatrack.migration.probe import probe
from whatrack.migration.queues import find_queues, pause_queues, scan_batches, source_databases, wait_for_active
from whatrack.migration.values import digest, read_values
from whatrack.migration.verify import VerifyReport, verify
from whatrack.settings import mask_url
from whatrack.times import iso as iso_ms

log = logging.getLogger("whatrack.migration.rollback")

_TIMES = (b"timestamp", b"processedOn", b"finishedOn")


@dataclass
class RollbackReport:
    """What went back: job keys, queue-level keys, other keys, deletions; and the verify of the result."""

    cutover_ms: int
    mode: str
    jobs_back: int
    queue_keys_back: int
    other_keys_back: int
    deleted_on_source: int
    dry_run: bool
    seconds: float
    verify: VerifyReport | None

    @property
    def ok(self) -> bool:
        return self.verify is None or self.verify.ok

    @property
    def verdict(self) -> str:
        if self.dry_run:
            return (f"rollback (dry run) since {iso_ms(self.cutover_ms)}: would bring {self.jobs_back} job key(s), "
                    f"{self.queue_keys_back} queue key(s), {self.other_keys_back} other key(s) back and delete "
                    f"{self.deleted_on_source} on the source; nothing written")
        v = self.verify.verdict if self.verify else "not verified"
        return (f"rollback since {iso_ms(self.cutover_ms)}: {self.jobs_back} job key(s), {self.queue_keys_back} "
                f"queue key(s), {self.other_keys_back} other key(s) back, {self.deleted_on_source} deleted on the "
                f"source; {v}")

    @property
    def next_step(self) -> str:
        """What the operator does next (the last line the CLI prints)."""
        return "dry run: nothing changed; run without --dry-run to roll back" if self.dry_run else NEXT_AFTER_ROLLBACK


def cutover_marker(target_url: str, *, ca_bundle: str | None = None) -> int | None:
    """The cutover time (epoch ms) the copy recorded on the target, or None."""
    c = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    try:
        v = c.hget(CUTOVER_KEY, "at_ms")
    finally:
        c.close()
    return int(v) if v is not None else None


def rollback(source_url: str, target_url: str, *, since: int | None = None, ca_bundle: str | None = None,
             mode: Mode = "auto", batch: int = 500, db_prefix_map: dict[int, str] | None = None,
             prefix: str = BULL_PREFIX, active_wait_s: float = 30.0, dry_run: bool = False,
             ttl_tolerance_s: float = 2.0) -> RollbackReport:
    """Copy the target's changes since ``since`` (default: the recorded cutover) back to the source, then verify.

    Raises:
        MigrationError: no cutover marker and no ``since``, or a refused write.
    """
    t0 = time.monotonic()
    since = since if since is not None else cutover_marker(target_url, ca_bundle=ca_bundle)
    if since is None:
        raise MigrationError(f"no cutover marker on {mask_url(target_url)}: nothing was copied there (run "
                             "`whatrack migrate copy` first), or pass since=<epoch ms> (--since, ISO-8601 too)")
    if mode == "auto":
        rep_probe = probe(source_url, ca_bundle=ca_bundle, source_url=target_url)
        chosen = "dump" if rep_probe.dump_compatible else "logical"
    else:
        chosen = mode
    main_db = url_db(source_url)
    dst = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    src_main = redis_tcp.connect_sync(source_url, ca_bundle=ca_bundle)
    srcs: dict[int, redis.Redis] = {main_db: src_main}
    counts = {"jobs": 0, "queue": 0, "other": 0, "deleted": 0}
    try:
        queues = find_queues(dst, prefix)
        if queues and not dry_run:
            pause_queues(target_url, queues, ca_bundle=ca_bundle, prefix=prefix)
            wait_for_active(dst, queues, active_wait_s, prefix)

        def src_for(db: int) -> redis.Redis:
            if db not in srcs:
                srcs[db] = redis_tcp.connect_sync(with_db(source_url, db), ca_bundle=ca_bundle)
            return srcs[db]

        for _cur, keys in scan_batches(dst, 0, batch):
            chosen_keys = _changed(dst, src_for, [k for k in keys if not is_own_key(k)], since, prefix,
                                   db_prefix_map, main_db, counts)
            if dry_run:
                continue
            by_db: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
            for k in chosen_keys:
                db, sk = map_to_source(k, db_prefix_map, main_db)
                by_db[db].append((k, sk))
            for db, pairs in by_db.items():
                copy_batch(dst, src_for(db), pairs, "dump" if chosen == "dump" else "logical")
        for db in source_databases(src_main, main_db):
            s = src_for(db)
            for _cur, keys in scan_batches(s, 0, batch):
                keys = [k for k in keys if not is_own_key(k)]
                pipe = dst.pipeline(transaction=False)
                for k in keys:
                    pipe.exists(map_to_target(db, k, db_prefix_map, main_db))
                gone = [k for k, there in zip(keys, pipe.execute(), strict=True) if not there]
                counts["deleted"] += len(gone)
                if gone and not dry_run:
                    s.delete(*gone)
    finally:
        for c in {id(c): c for c in (*srcs.values(), dst)}.values():
            with contextlib.suppress(redis.RedisError):
                c.close()
    ver = None if dry_run else verify(source_url, target_url, ca_bundle=ca_bundle, db_prefix_map=db_prefix_map,
                                      prefix=prefix, ttl_tolerance_s=ttl_tolerance_s)
    rep = RollbackReport(cutover_ms=since, mode=chosen, jobs_back=counts["jobs"], queue_keys_back=counts["queue"],
                         other_keys_back=counts["other"], deleted_on_source=counts["deleted"], dry_run=dry_run,
                         seconds=time.monotonic() - t0, verify=ver)
    log.debug("%s", rep.verdict)  # the caller prints it (the CLI, a notebook): said once
    return rep


def _changed(dst: redis.Redis, src_for: object, keys: list[bytes], since: int, prefix: str,
             db_prefix_map: dict[int, str] | None, main_db: int, counts: dict[str, int]) -> list[bytes]:
    """The keys of this batch that changed on the target since ``since`` (see the module docstring)."""
    out: list[bytes] = []
    job_keys: list[tuple[bytes, bytes]] = []  # (key, its job hash)
    others: list[bytes] = []
    for k in keys:
        bk = parse_bull_key(k, prefix)
        if bk is None:
            others.append(k)
        elif bk.job_id is None:
            out.append(k)
            counts["queue"] += 1
        else:
            job_keys.append((k, queue_key(bk.queue, bk.job_id, prefix)))
    if job_keys:
        pipe = dst.pipeline(transaction=False)
        for _k, h in job_keys:
            pipe.hmget(h, list(_TIMES))
        for (k, _h), times in zip(job_keys, pipe.execute(), strict=True):
            if any(t is not None and int(float(t)) >= since for t in times):
                out.append(k)
                counts["jobs"] += 1
    if others:
        tvals = read_values(dst, others)
        by_db: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        for i, k in enumerate(others):
            db, sk = map_to_source(k, db_prefix_map, main_db)
            by_db[db].append((i, sk))
        for db, items in by_db.items():
            svals = read_values(src_for(db), [sk for _i, sk in items])  # type: ignore[operator]
            for (i, _sk), sv in zip(items, svals, strict=True):
                if digest(sv) != digest(tvals[i]):
                    out.append(others[i])
                    counts["other"] += 1
    return out
