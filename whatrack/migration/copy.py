"""The cutover copy: pause the BullMQ queues, wait for active jobs, copy every key with its TTL, resumably.

DUMP/RESTORE ... REPLACE in pipelined batches where the two servers' formats match, a per-type logical copy (temp
key + RENAME) where they do not. The SCAN cursor and the counts go to a checkpoint file, replaced atomically after
every batch, so a crashed copy resumes where it was; a re-run is harmless because every write replaces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from whatrack import redis_tcp
from whatrack.errors import MigrationError
from whatrack.migration import queues as migration_queues
from whatrack.migration.keys import (
    BULL_PREFIX,
    CUTOVER_KEY,
    TMP_PREFIX,
    is_own_key,
    map_to_target,
    queue_key,
    url_db,
    with_db,
)
from whatrack.migration.probe import probe
from whatrack.migration.queues import find_queues, scan_batches, source_databases, wait_for_active
from whatrack.migration.values import queue_ttls, read_types, read_values, write_value
from whatrack.settings import mask_url

log = logging.getLogger("whatrack.migration.copy")

Mode = Literal["auto", "dump", "logical"]


@dataclass
class BatchResult:
    """What one batch did: keys written, keys gone before they could be read, RESTOREs redone logically."""

    copied: int = 0
    vanished: int = 0
    fallbacks: int = 0


def copy_batch(src: redis.Redis, dst: redis.Redis, pairs: Sequence[tuple[bytes, bytes]],
               mode: Literal["dump", "logical"]) -> BatchResult:
    """Copy each (source key, target key) pair with its remaining TTL; a RESTORE the target refuses is redone
    logically for that key.

    Raises:
        MigrationError: the target refused a write.
    """
    res = BatchResult()
    if not pairs:
        return res
    src_keys = [s for s, _ in pairs]
    logical: list[int] = []
    if mode == "dump":
        pipe = src.pipeline(transaction=False)
        for k in src_keys:
            pipe.pttl(k)
            pipe.dump(k)
        read_at = time.monotonic()
        raw = pipe.execute()
        spent = _ms_since(read_at)
        wpipe = dst.pipeline(transaction=False)
        restored: list[int] = []
        for i, (_s, d) in enumerate(pairs):
            pttl, payload = int(raw[2 * i]), raw[2 * i + 1]
            if pttl == -2 or payload is None:
                res.vanished += 1
                continue
            # a TTL read earlier has run down since: subtract the time spent, so the deadline stays absolute
            wpipe.restore(d, _remaining(pttl, spent), payload, replace=True)
            restored.append(i)
        for i, r in zip(restored, wpipe.execute(raise_on_error=False), strict=True):
            if isinstance(r, Exception):
                logical.append(i)
            else:
                res.copied += 1
        res.fallbacks = len(logical)
    else:
        logical = list(range(len(pairs)))
    if logical:
        keys = [src_keys[i] for i in logical]
        read_at = time.monotonic()
        meta = read_types(src, keys)
        values = read_values(src, keys, meta)
        wpipe = dst.pipeline(transaction=True)  # MULTI/EXEC: the batch's RENAMEs land together or not at all
        ttls: list[tuple[bytes, int]] = []
        for i, kv, (_t, pttl, _n) in zip(logical, values, meta, strict=True):
            if kv is None or pttl == -2:
                res.vanished += 1
                continue
            write_value(wpipe, dst, pairs[i][1], kv)
            ttls.append((pairs[i][1], pttl))
            res.copied += 1
        queue_ttls(wpipe, ttls, read_at)
        try:
            wpipe.execute()
        except redis.ResponseError as e:
            raise MigrationError(f"the target refused a logical write: {e}") from e
    return res


def _ms_since(t: float) -> int:
    return int((time.monotonic() - t) * 1000)


def _remaining(pttl: int, spent_ms: int) -> int:
    """The TTL to give the copy: none (0) for a key without one, else what is left, at least 1 ms."""
    return 0 if pttl < 0 else max(1, pttl - spent_ms)


@dataclass
class Checkpoint:
    """Where a copy is: the database being scanned (index into ``dbs``), the SCAN cursor, the running counts."""

    source: str
    target: str
    mode: str
    cutover_ms: int
    dbs: list[int]
    db_index: int = 0
    cursor: int = 0
    scanned: int = 0
    copied: int = 0
    vanished: int = 0
    fallbacks: int = 0
    per_db: dict[str, int] = field(default_factory=dict)
    done: bool = False

    def save(self, path: Path) -> None:
        """Write atomically: a temp file, fsync, rename over the old checkpoint (a crash leaves old or new)."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise MigrationError(f"checkpoint {path} is unreadable ({e}); delete it to start the copy over") from e


@dataclass
class CopyReport:
    """The outcome of :func:`copy`. ``cutover_ms`` is the rollback marker (epoch ms when the queues were paused)."""

    source: str
    target: str
    mode: str
    dry_run: bool
    cutover_ms: int
    queues: list[str]
    active_left: dict[str, int]
    scanned: int
    copied: int
    vanished: int
    fallbacks: int
    per_db: dict[int, int]
    resumed: bool
    seconds: float
    checkpoint: str | None

    @property
    def verdict(self) -> str:
        what = "would copy" if self.dry_run else "copied"
        dbs = ", ".join(f"db{d}: {n}" for d, n in sorted(self.per_db.items()))
        active = sum(self.active_left.values())
        tail = f"; {active} job(s) still active, copied with their locks" if active else ""
        return (f"copy {self.mode}{' (dry run)' if self.dry_run else ''}: {what} {self.copied} of {self.scanned} "
                f"keys ({dbs}) in {self.seconds:.1f} s, {self.vanished} expired meanwhile, {len(self.queues)} "
                f"queue(s) paused{', resumed from checkpoint' if self.resumed else ''}{tail}")


def choose_mode(source_url: str, target_url: str, mode: Mode, ca_bundle: str | None) -> Literal["dump", "logical"]:
    """``auto``: DUMP/RESTORE when the probe restored a source DUMP on the target, else logical.

    Raises:
        MigrationError: the probe found a blocker (the copy would put jobs at risk).
    """
    if mode in ("dump", "logical"):
        return mode
    rep = probe(target_url, ca_bundle=ca_bundle, source_url=source_url)
    if rep.blocking:
        raise MigrationError(rep.verdict + "; fix the blockers, then copy again")
    return "dump" if rep.dump_compatible else "logical"


def copy(source_url: str, target_url: str, *, mode: Mode = "auto", checkpoint_path: str | Path | None = None,
         dry_run: bool = False, batch: int = 500, db_prefix_map: dict[int, str] | None = None,
         pause_queues: bool = True, active_wait_s: float = 30.0, progress: bool = True,
         ca_bundle: str | None = None, prefix: str = BULL_PREFIX) -> CopyReport:
    """Copy every key of the source (all its databases) to the target's database.

    Raises:
        MigrationError: a blocker, a refused write, or a checkpoint that belongs to another copy.
    """
    t0 = time.monotonic()
    chosen = choose_mode(source_url, target_url, mode, ca_bundle)
    main_db = url_db(source_url)
    src = redis_tcp.connect_sync(source_url, ca_bundle=ca_bundle)
    dst = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    clients: dict[int, redis.Redis] = {main_db: src}
    path = Path(checkpoint_path) if checkpoint_path else None
    try:
        queues = find_queues(src, prefix)
        ck = Checkpoint.load(path) if path and not dry_run else None
        resumed = ck is not None and not ck.done
        if ck is not None and (ck.source, ck.target) != (mask_url(source_url), mask_url(target_url)):
            raise MigrationError(f"checkpoint {path} belongs to a copy of {ck.source} to {ck.target}; pass another "
                                 "--checkpoint or delete it")
        active_left: dict[str, int] = {}
        if not resumed:
            ck = None
        if not dry_run and pause_queues and queues:
            migration_queues.pause_queues(source_url, queues, ca_bundle=ca_bundle, prefix=prefix)
            active_left = wait_for_active(src, queues, active_wait_s, prefix)
        if ck is None:
            ck = Checkpoint(source=mask_url(source_url) or "", target=mask_url(target_url) or "", mode=chosen,
                            cutover_ms=int(time.time() * 1000), dbs=source_databases(src, main_db))
            if not dry_run:
                _mark_cutover(dst, src, queues, ck, prefix)
        else:
            log.info("resuming copy from %s: db %d, cursor %d, %d keys copied", path, ck.dbs[ck.db_index],
                     ck.cursor, ck.copied)
            chosen = "dump" if ck.mode == "dump" else "logical"
        if not dry_run:
            for k in dst.scan_iter(match=TMP_PREFIX + b"*", count=1000):  # leftovers of a crashed big-key write
                dst.delete(k)
        total = 0
        for db in ck.dbs:
            clients.setdefault(db, redis_tcp.connect_sync(with_db(source_url, db), ca_bundle=ca_bundle))
            total += int(clients[db].dbsize())
        bar = _bar(total, ck.scanned, progress)
        while ck.db_index < len(ck.dbs):
            db = ck.dbs[ck.db_index]
            c = clients[db]
            for cursor, keys in scan_batches(c, ck.cursor, batch):
                keys = [k for k in keys if not is_own_key(k)]
                if dry_run:
                    res = BatchResult(copied=len(keys))
                else:
                    pairs = [(k, map_to_target(db, k, db_prefix_map, main_db)) for k in keys]
                    res = copy_batch(c, dst, pairs, chosen)
                ck.scanned += len(keys)
                ck.copied += res.copied
                ck.vanished += res.vanished
                ck.fallbacks += res.fallbacks
                ck.per_db[str(db)] = ck.per_db.get(str(db), 0) + res.copied
                if cursor == 0:
                    ck.db_index, ck.cursor = ck.db_index + 1, 0
                else:
                    ck.cursor = cursor
                if path and not dry_run:
                    ck.save(path)
                if bar is not None:
                    bar.update(len(keys))
                if cursor == 0:
                    break
        ck.done = True
        if path and not dry_run:
            ck.save(path)
        if bar is not None:
            bar.close()
        if not dry_run:
            dst.hset(CUTOVER_KEY, "completed_ms", int(time.time() * 1000))
    finally:
        for c in {id(c): c for c in (*clients.values(), dst)}.values():
            with contextlib.suppress(redis.RedisError):
                c.close()
    rep = CopyReport(source=ck.source, target=ck.target, mode=chosen, dry_run=dry_run, cutover_ms=ck.cutover_ms,
                     queues=queues, active_left=active_left, scanned=ck.scanned, copied=ck.copied,
                     vanished=ck.vanished, fallbacks=ck.fallbacks, per_db={int(k): v for k, v in ck.per_db.items()},
                     resumed=resumed, seconds=time.monotonic() - t0, checkpoint=str(path) if path else None)
    log.info("%s", rep.verdict)
    return rep


def _mark_cutover(dst: redis.Redis, src: redis.Redis, queues: list[str], ck: Checkpoint, prefix: str) -> None:
    """Record the cutover on the target: when, from where, and each queue's id counter (rollback reads it)."""
    ids = {q: _text(src.get(queue_key(q, "id", prefix)) or b"0") for q in queues}
    dst.hset(CUTOVER_KEY, mapping={"at_ms": ck.cutover_ms, "source": ck.source, "mode": ck.mode,
                                   "queue_ids": json.dumps(ids)})


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _bar(total: int, initial: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="key", desc="copy", leave=False)
