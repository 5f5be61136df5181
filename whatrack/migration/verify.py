"""Verify a copy both ways: every key (missing, extra, type, value digest, TTL) and every BullMQ job (state,
attempts made, due time of delayed jobs, payload digest), with capped lists of the offenders and a one-line verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from whatrack import redis_tcp
from whatrack.migration.digest import Digester, Exists
from whatrack.migration.keys import (
    BULL_PREFIX,
    STATE_LISTS,
    STATE_ZSETS,
    delayed_due_ms,
    is_own_key,
    map_to_source,
    map_to_target,
    parse_bull_key,
    queue_key,
    url_db,
    with_db,
)
from whatrack.migration.queues import find_queues, scan_batches, source_databases
from whatrack.migration.values import CHUNK, digest, read_values
from whatrack.settings import mask_url
from whatrack.times import iso as iso_ms

log = logging.getLogger("whatrack.migration.verify")

#: Offending keys listed per kind; the counts are always complete.
SAMPLE_CAP = 20

KINDS = ("missing", "extra", "type", "value", "ttl", "job")


@dataclass
class VerifyReport:
    """Counts per kind of difference, capped samples of the offenders, and the verdict."""

    source: str
    target: str
    source_keys: int = 0
    target_keys: int = 0
    jobs: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    samples: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    @property
    def mismatched(self) -> int:
        return self.counts["type"] + self.counts["value"] + self.counts["ttl"] + self.counts["job"]

    @property
    def verdict(self) -> str:
        c = self.counts
        head = "CLEAN" if self.ok else "MISMATCH"
        first = next((f"; e.g. {k}: {self.samples[k][0]}" for k in KINDS if self.samples[k]), "")
        return (f"verify {head}: {self.source_keys} source keys, {self.target_keys} target keys, {self.jobs} jobs; "
                f"{c['missing']} missing, {c['extra']} extra, {c['type']} type, {c['value']} value, "
                f"{c['ttl']} ttl, {c['job']} job mismatches{first}")

    def flag(self, kind: str, what: str) -> None:
        self.counts[kind] += 1
        if len(self.samples[kind]) < SAMPLE_CAP:
            self.samples[kind].append(what)


def verify(source_url: str, target_url: str, *, ca_bundle: str | None = None, ttl_tolerance_s: float = 2.0,
           batch: int = 500, db_prefix_map: dict[int, str] | None = None, prefix: str = BULL_PREFIX,
           check_jobs: bool = True) -> VerifyReport:
    """Compare the source (all databases, remapped as the copy does) with the target, both ways.

    Never raises for a difference: differences are the report. Raises redis errors only when a server is gone.
    """
    t0 = time.monotonic()
    rep = VerifyReport(source=mask_url(source_url) or "", target=mask_url(target_url) or "")
    main_db = url_db(source_url)
    src = redis_tcp.connect_sync(source_url, ca_bundle=ca_bundle)
    dst = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    clients: dict[int, redis.Redis] = {main_db: src}
    tol_ms = int(ttl_tolerance_s * 1000)
    try:
        for db in source_databases(src, main_db):
            c = clients.setdefault(db, redis_tcp.connect_sync(with_db(source_url, db), ca_bundle=ca_bundle))
            for _cur, keys in scan_batches(c, 0, batch):
                keys = [k for k in keys if not is_own_key(k)]
                rep.source_keys += len(keys)
                _compare(rep, c, dst, keys, [map_to_target(db, k, db_prefix_map, main_db) for k in keys], tol_ms,
                         prefix)
        for _cur, keys in scan_batches(dst, 0, batch):
            keys = [k for k in keys if not is_own_key(k)]
            rep.target_keys += len(keys)
            by_db: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
            for k in keys:
                db, sk = map_to_source(k, db_prefix_map, main_db)
                by_db[db].append((k, sk))
            for db, pairs in by_db.items():
                if db not in clients:
                    clients[db] = redis_tcp.connect_sync(with_db(source_url, db), ca_bundle=ca_bundle)
                there_all = Exists(clients[db])([sk for _k, sk in pairs])
                for (k, _sk), there in zip(pairs, there_all, strict=True):
                    if not there and not 0 <= int(dst.pttl(k)) <= tol_ms:  # not one expiring right now
                        rep.flag("extra", k.decode(errors="replace"))
        if check_jobs:
            for q in sorted(set(find_queues(src, prefix)) | set(find_queues(dst, prefix))):
                _compare_jobs(rep, src, dst, q, prefix)
    finally:
        for c in {id(c): c for c in (*clients.values(), dst)}.values():
            with contextlib.suppress(redis.RedisError):
                c.close()
    rep.seconds = time.monotonic() - t0
    log.debug("%s (%.1f s)", rep.verdict, rep.seconds)  # the caller prints the verdict: said once
    return rep


def _compare(rep: VerifyReport, src: redis.Redis, dst: redis.Redis, skeys: list[bytes], tkeys: list[bytes],
             tol_ms: int, prefix: str = BULL_PREFIX) -> None:
    if not skeys:
        return
    t0 = time.monotonic()
    srows = Digester(src, CHUNK)(skeys)
    trows = Digester(dst, CHUNK)(tkeys)
    # the target was read later: its TTLs ran down by the time between the midpoints of the two reads
    gap_ms = int((time.monotonic() - t0) * 500)
    for sk, tk, (st, sp, sn, sd), (tt, tp, tn, td) in zip(skeys, tkeys, srows, trows, strict=True):
        name = tk.decode(errors="replace")
        if st == "none":
            continue  # expired on the source since the SCAN returned it
        if tt == "none":
            if not 0 <= sp <= tol_ms:  # a key with a TTL shorter than the tolerance may just have expired
                rep.flag("missing", name)
            continue
        if st != tt:
            rep.flag("type", f"{name} ({st} -> {tt})")
            continue
        if sd is None and td is None and sn == tn:  # too big for the script: digest in chunks on the client
            sd = digest(read_values(src, [sk])[0])
            td = digest(read_values(dst, [tk])[0])
        if sn != tn or sd != td:
            rep.flag("value", name)
            bk = parse_bull_key(sk, prefix)
            if bk is not None and bk.is_job_hash:
                _explain_job(rep, src, dst, sk, tk, f"{bk.queue}/{bk.job_id}")
        elif (sp < 0) != (tp < 0) or (sp >= 0 and abs(sp - gap_ms - tp) > tol_ms):
            rep.flag("ttl", f"{name} (pttl {sp} -> {tp} ms)")


def _explain_job(rep: VerifyReport, src: redis.Redis, dst: redis.Redis, sk: bytes, tk: bytes, job: str) -> None:
    """A job hash differs: say whether its attempts made or its payload did (other fields: the value count)."""
    s_reply: Any = src.hmget(sk, [b"atm", b"data"])
    t_reply: Any = dst.hmget(tk, [b"atm", b"data"])
    (satm, sdata), (tatm, tdata) = s_reply, t_reply
    if satm != tatm:
        rep.flag("job", f"{job}: attemptsMade {_n(satm)} -> {_n(tatm)}")
    if _h(sdata) != _h(tdata):
        rep.flag("job", f"{job}: payload digest {_h(sdata)} -> {_h(tdata)}")


def _job_states(c: redis.Redis, q: str, prefix: str) -> dict[str, tuple[str, int | None]]:
    """job id -> (state, due ms for delayed jobs), read from the state structures in chunks."""
    out: dict[str, tuple[str, int | None]] = {}
    for s in (*STATE_LISTS, *STATE_ZSETS):
        key = queue_key(q, s, prefix)
        for part in _chunks(c, key, s in STATE_ZSETS):
            for item in part:
                if s in STATE_ZSETS:
                    m, score = item
                    out[m.decode()] = (s, delayed_due_ms(score) if s == "delayed" else None)
                else:
                    out[item.decode()] = (s, None)
    return out


def _chunks(c: redis.Redis, key: bytes, zset: bool, size: int = 5000) -> Iterator[list[Any]]:
    """A list's or a zset's (with scores) members, ``size`` at a time."""
    start = 0
    while True:
        part: Any = (c.zrange(key, start, start + size - 1, withscores=True) if zset
                     else c.lrange(key, start, start + size - 1))
        yield part
        if len(part) < size:
            return
        start += size


def _compare_jobs(rep: VerifyReport, src: redis.Redis, dst: redis.Redis, q: str, prefix: str) -> None:
    """Per job: the same state and the same due time when delayed (attempts and payload: :func:`_explain_job`)."""
    a, b = _job_states(src, q, prefix), _job_states(dst, q, prefix)
    for jid in a.keys() | b.keys():
        if a.get(jid) != b.get(jid):
            rep.flag("job", f"{q}/{jid}: {_fmt(a.get(jid))} -> {_fmt(b.get(jid))}")
    rep.jobs += len(a.keys() | b.keys())
    # attempts made and payload are compared per job through the job hash digests of the key pass (_explain_job)


def _fmt(x: tuple[str, int | None] | None) -> str:
    if x is None:
        return "absent"
    return x[0] if x[1] is None else f"{x[0]} due {iso_ms(x[1])}"


def _n(x: bytes | None) -> str:
    return x.decode() if x else "0"


def _h(x: bytes | None) -> str:
    return hashlib.blake2b(x or b"", digest_size=8).hexdigest() if x is not None else "-"
