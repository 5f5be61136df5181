"""Migration throughput: keys per second for ``copy`` (both paths) and ``verify``, each as a ratio against a bare
pipelined DUMP/RESTORE loop over the same keys, measured in the same run on the same servers.

    .venv/bin/python bench/migration.py [--jobs 100000] [--batch 500]

The full-size migration check too (the test suite runs 20,000 jobs, tests/test_migration_big.py): each copy is
verified both ways and the bench fails (exit 1) on any missing, extra or mismatched key.

Legacy side: a plain redis-server; target: a TLS redis-server with a generated CA (the offline "Upstash").
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import redis
from migration_fixtures import make_jobs, make_other_keys

from whatrack import redis_tcp
from whatrack.devstack import servers, tls
from whatrack.migration import copy, verify
from whatrack.migration.verify import VerifyReport


def bare_dump_restore(source_url: str, target_url: str, ca: str, batch: int) -> int:
    """The baseline: SCAN, pipelined PTTL+DUMP, pipelined RESTORE REPLACE; no checks, no checkpoint."""
    src = redis.Redis.from_url(source_url)
    dst = redis_tcp.connect_sync(target_url, ca_bundle=ca)
    n = 0
    for db in (0, 3):
        src.execute_command("SELECT", db)
        cursor = 0
        while True:
            cursor, keys = src.scan(cursor=cursor, count=batch)
            pipe = src.pipeline(transaction=False)
            for k in keys:
                pipe.pttl(k)
                pipe.dump(k)
            raw = pipe.execute()
            wp = dst.pipeline(transaction=False)
            for i, k in enumerate(keys):
                wp.restore(k if db == 0 else b"db3:" + k, max(int(raw[2 * i]), 0), raw[2 * i + 1], replace=True)
            wp.execute()
            n += len(keys)
            if cursor == 0:
                break
    src.close()
    dst.close()
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    try:
        return _run(args, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(args: argparse.Namespace, d: Path) -> int:
    files = tls.make_ca_and_server_cert(d / "ca")
    ca = str(files.ca)
    with servers.RedisServer(d / "legacy") as a, servers.RedisServer(d / "upstash", tls=files) as b:
        t = time.perf_counter()
        make_jobs(a.url, args.jobs, realistic=300)
        make_other_keys(a.url)
        print(f"created {args.jobs} BullMQ jobs + other keys in {time.perf_counter() - t:.1f} s")
        target = redis_tcp.connect_sync(b.url, ca_bundle=ca)

        def timed(label: str, fn: object) -> tuple[str, int, float]:
            target.flushall() if label != "verify" else None
            t0 = time.perf_counter()
            n = fn()  # type: ignore[operator]
            return label, n, time.perf_counter() - t0

        rows = [timed("bare DUMP/RESTORE loop", lambda: bare_dump_restore(a.url, b.url, ca, args.batch))]
        rows.append(timed("copy --mode dump", lambda: copy(a.url, b.url, mode="dump", ca_bundle=ca, batch=args.batch,
                                                         checkpoint_path=d / "ck-dump.json", active_wait_s=0,
                                                         progress=False).copied))
        verdicts: list[VerifyReport] = []

        def checked() -> int:
            v = verify(a.url, b.url, ca_bundle=ca, batch=args.batch)
            verdicts.append(v)
            return v.source_keys

        rows.append(timed("verify", checked))
        rows.append(timed("copy --mode logical", lambda: copy(a.url, b.url, mode="logical", ca_bundle=ca,
                                                            batch=args.batch, checkpoint_path=d / "ck-log.json",
                                                            active_wait_s=0, progress=False).copied))
        rows.append(timed("verify", checked))
        target.close()
    bad = [v.verdict for v in verdicts if not v.ok or v.jobs < args.jobs]
    if bad:
        print(f"FAILED: the copy is not complete: {'; '.join(bad)}", file=sys.stderr)
        return 1
    base = rows[0][1] / rows[0][2]
    print(f"{'step':26} {'keys':>8} {'seconds':>8} {'keys/s':>9} {'vs bare loop':>12}")
    for label, n, s in rows:
        print(f"{label:26} {n:8d} {s:8.2f} {n / s:9.0f} {n / s / base:11.2f}x")
    return 0


if __name__ == "__main__":
    from whatrack.cli import run_script

    run_script(main)  # SIGTERM (timeout, CI) stops the servers it started, as Ctrl-C does
