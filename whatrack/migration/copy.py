"""The cutover copy: pause the BullMQ queues, wait for active jobs, copy every key with its TTL, resumably.

DUMP/RESTORE ... REPLACE in pipelined batches where the two servers' formats match, a per-type logical copy (temp
key + RENAME) where they do not. The SCAN cursor and the counts go to a checkpoint file, replaced atomically after
every batch, so a crashed copy resumes where it was (its writes all replace). A target that already holds a copy is
never copied over silently: see :mod:`whatrack.migration.guard`.
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
from whatrack.migration.guard import TargetState, inspect_target, read_marker
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
from whatrack.times import iso as iso_ms

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
    """The outcome of :func:`copy`. ``cutover_ms`` is the rollback marker (epoch ms when the queues were paused).

    ``refusal``: a dry run over a target that already holds a copy says what a real copy would refuse; ``forced``: what
    a ``force=True`` copy overwrote (and where the marker moved from, ``marker_moved_from``).
    """

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
    refusal: str | None = None
    forced: str | None = None
    marker_moved_from: int | None = None

    @property
    def verdict(self) -> str:
        n = len(self.queues)
        if self.dry_run:
            head = (f"copy {self.mode} (dry run): would copy {self.copied} of {self.scanned} keys{self._dbs()}, "
                    f"would pause {n} queue(s); nothing written")
            return head + (f"; {self.refusal}" if self.refusal else "")
        active = sum(self.active_left.values())
        moved = (f"; the cutover marker moved from {iso_ms(self.marker_moved_from)} to {iso_ms(self.cutover_ms)} "
                 "(--force)" if self.marker_moved_from else "")
        return (f"copy {self.mode}: copied {self.copied} of {self.scanned} keys{self._dbs()} in {self.seconds:.1f} s, "
                f"{self.vanished} expired meanwhile, {n} queue(s) paused, cutover at {iso_ms(self.cutover_ms)}"
                f"{', resumed from checkpoint' if self.resumed else ''}"
                f"{f'; {active} job(s) still active, copied with their locks' if active else ''}{moved}")

    def _dbs(self) -> str:
        if not self.scanned:
            return " (nothing to copy: the source is empty)"
        return " (" + ", ".join(f"db{d}: {n}" for d, n in sorted(self.per_db.items())) + ")"


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


@dataclass
class _Plan:
    """Before anything is written: resume a checkpoint, or start over; what is on the target if it holds a copy."""

    ck: Checkpoint | None
    state: TargetState


def _plan(source_url: str, target_url: str, dst: redis.Redis, path: Path | None, dry_run: bool,
          ca_bundle: str | None, db_prefix_map: dict[int, str] | None, prefix: str) -> _Plan:
    """Read the checkpoint and the target's marker; a checkpoint is resumed only when it is unfinished and the
    target's marker is the one that copy wrote (anything else means the target moved on since).

    Raises:
        MigrationError: the checkpoint is unreadable or belongs to another source/target pair.
    """
    ck = Checkpoint.load(path) if path else None
    if ck is not None and (ck.source, ck.target) != (mask_url(source_url), mask_url(target_url)):
        raise MigrationError(f"checkpoint {path} belongs to a copy of {ck.source} to {ck.target}; pass another "
                             "--checkpoint or delete it")
    marker = read_marker(dst)
    at_ms = int(marker["at_ms"]) if marker.get("at_ms") else None
    note = ""
    if ck is not None and not ck.done and at_ms == ck.cutover_ms:
        return _Plan(None if dry_run else ck, TargetState(target=mask_url(target_url) or ""))
    if ck is not None:
        note = (f"a copy at {iso_ms(ck.cutover_ms)} finished" if ck.done else
                f"an unfinished copy at {iso_ms(ck.cutover_ms)}, but the target's marker is "
                f"{iso_ms(at_ms) if at_ms else 'gone (was the target emptied?)'}")
    state = inspect_target(source_url, target_url, marker, checkpoint=str(path) if ck is not None else None,
                           checkpoint_note=note, ca_bundle=ca_bundle, db_prefix_map=db_prefix_map, prefix=prefix)
    return _Plan(None, state)


def copy(source_url: str, target_url: str, *, mode: Mode = "auto", checkpoint_path: str | Path | None = None,
         dry_run: bool = False, batch: int = 500, db_prefix_map: dict[int, str] | None = None,
         pause_queues: bool = True, active_wait_s: float = 30.0, progress: bool = True,
         ca_bundle: str | None = None, prefix: str = BULL_PREFIX, force: bool = False) -> CopyReport:
    """Copy every key of the source (all its databases) to the target's database.

    A target that already holds a copy (a cutover marker, or a finished checkpoint at ``checkpoint_path``) is not
    copied over: the error names what is there (keys changed after the cutover included) and the choices. With
    ``force=True`` the copy goes ahead, warns first what it overwrites, and reports where the marker moved from. An
    unfinished checkpoint of the copy whose marker is on the target is resumed. ``checkpoint_path`` None: no
    checkpoint (the CLI's default is :func:`~whatrack.migration.guard.default_checkpoint`).

    Raises:
        MigrationError: the target holds a copy (without ``force``), a blocker, a refused write, or a checkpoint
        that belongs to another copy.
    """
    t0 = time.monotonic()
    main_db = url_db(source_url)
    src = redis_tcp.connect_sync(source_url, ca_bundle=ca_bundle)
    dst = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    clients: dict[int, redis.Redis] = {main_db: src}
    path = Path(checkpoint_path) if checkpoint_path else None
    refusal = forced = None
    moved_from: int | None = None
    try:
        plan = _plan(source_url, target_url, dst, path, dry_run, ca_bundle, db_prefix_map, prefix)
        if plan.state.blocking:
            if dry_run:
                refusal = (plan.state.force_notice(int(time.time() * 1000), dry_run=True) if force
                           else plan.state.refusal(dry_run=True))
            elif not force:
                raise MigrationError(plan.state.refusal())
        chosen = choose_mode(source_url, target_url, mode, ca_bundle)
        queues = find_queues(src, prefix)
        ck, resumed = plan.ck, plan.ck is not None
        active_left: dict[str, int] = {}
        if not dry_run and pause_queues and queues:
            migration_queues.pause_queues(source_url, queues, ca_bundle=ca_bundle, prefix=prefix)
            active_left = wait_for_active(src, queues, active_wait_s, prefix)
        if ck is None:
            ck = Checkpoint(source=mask_url(source_url) or "", target=mask_url(target_url) or "", mode=chosen,
                            cutover_ms=int(time.time() * 1000), dbs=source_databases(src, main_db))
            if plan.state.blocking and not dry_run:
                forced, moved_from = plan.state.force_notice(ck.cutover_ms), plan.state.at_ms
                log.warning("%s", forced)
            if not dry_run:
                _mark_cutover(dst, src, queues, ck, prefix, moved_from)
        else:
            log.info("resuming copy from %s: db %d, cursor %d, %d keys copied", path, ck.dbs[ck.db_index],
                     ck.cursor, ck.copied)
            chosen = "dump" if ck.mode == "dump" else "logical"
        _copy_all(source_url, ck, clients, dst, None if dry_run else path, dry_run, batch, db_prefix_map, main_db,
                  chosen, progress, ca_bundle)
    finally:
        for c in {id(c): c for c in (*clients.values(), dst)}.values():
            with contextlib.suppress(redis.RedisError):
                c.close()
    rep = CopyReport(source=ck.source, target=ck.target, mode=chosen, dry_run=dry_run, cutover_ms=ck.cutover_ms,
                     queues=queues, active_left=active_left, scanned=ck.scanned, copied=ck.copied,
                     vanished=ck.vanished, fallbacks=ck.fallbacks, per_db={int(k): v for k, v in ck.per_db.items()},
                     resumed=resumed, seconds=time.monotonic() - t0, checkpoint=str(path) if path else None,
                     refusal=refusal, forced=forced, marker_moved_from=moved_from)
    log.debug("%s", rep.verdict)  # the caller prints it (the CLI, a notebook): said once
    return rep


def _copy_all(source_url: str, ck: Checkpoint, clients: dict[int, redis.Redis], dst: redis.Redis,
              path: Path | None, dry_run: bool, batch: int, db_prefix_map: dict[int, str] | None, main_db: int,
              chosen: Literal["dump", "logical"], progress: bool, ca_bundle: str | None) -> None:
    """The SCAN loop over every source database from where ``ck`` is, saving ``ck`` after each batch (to ``path``);
    marks the copy completed on the target at the end (not in a dry run)."""
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
            if path:
                ck.save(path)
            if bar is not None:
                bar.update(len(keys))
            if cursor == 0:
                break
    ck.done = True
    if path:
        ck.save(path)
    if bar is not None:
        bar.close()
    if not dry_run:
        dst.hset(CUTOVER_KEY, "completed_ms", int(time.time() * 1000))


def _mark_cutover(dst: redis.Redis, src: redis.Redis, queues: list[str], ck: Checkpoint, prefix: str,
                  previous_ms: int | None = None) -> None:
    """Record the cutover on the target: when, from where, and each queue's id counter (rollback reads it); a
    forced copy replaces the old marker whole (keeping its time as ``previous_at_ms``)."""
    ids = {q: _text(src.get(queue_key(q, "id", prefix)) or b"0") for q in queues}
    mapping: dict[Any, Any] = {"at_ms": ck.cutover_ms, "source": ck.source, "mode": ck.mode,
                               "queue_ids": json.dumps(ids)}
    if previous_ms is not None:
        mapping["previous_at_ms"] = previous_ms
    pipe = dst.pipeline(transaction=True)
    pipe.delete(CUTOVER_KEY)
    pipe.hset(CUTOVER_KEY, mapping=mapping)
    pipe.execute()


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _bar(total: int, initial: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="key", desc="copy", leave=False)
