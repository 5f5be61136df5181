"""A big queue: BullMQ jobs in every state, plus other keys of every type (TTLs, big keys, database 3), copied to the
TLS target by DUMP/RESTORE and by the logical path, each verified both ways: zero missing, extra or mismatched.

20,000 jobs in the test command, which keeps under its time budget; the full 100,000 run in ``make bench``
(bench/migration.py copies and verifies them with the same verdicts), or here with ``WHATRACK_BIG_JOBS=100000``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import migration_fixtures
import pytest
from migration_fixtures import QUEUE, Pair, clients, flush, make_jobs, make_other_keys, source_key_count

from whatrack.migration import copy, inventory, verify

_mig_pair = migration_fixtures._mig_pair
log = logging.getLogger(__name__)

#: Jobs in the big queue (bench/migration.py runs 100,000).
JOBS = int(os.environ.get("WHATRACK_BIG_JOBS", "20000"))


@pytest.mark.slow
@pytest.mark.timeout(900)  # 100,000 jobs (WHATRACK_BIG_JOBS) take ~1 min on an idle 2-core machine, more on a busy one
def test_big_queue_copy_and_verify_both_paths(_mig_pair: Pair, tmp_path: Path) -> None:
    pair = _mig_pair
    flush(pair)
    t = time.perf_counter()
    make_jobs(pair.source_url, JOBS, realistic=600)
    made_s = time.perf_counter() - t
    make_other_keys(pair.source_url)
    counts = inventory(pair.source_url).queues[QUEUE].counts
    assert sum(counts.values()) == JOBS
    for state in ("wait", "active", "delayed", "prioritized", "completed", "failed", "waiting-children"):
        assert counts[state] > 0, state
    timings = {f"create {JOBS} jobs": made_s}
    for mode in ("dump", "logical"):
        flush_target(pair)
        t = time.perf_counter()
        rep = copy(pair.source_url, pair.target_url, mode=mode, ca_bundle=pair.ca, active_wait_s=0,
                   checkpoint_path=tmp_path / f"{mode}.json", progress=False)
        timings[f"copy {mode}"] = time.perf_counter() - t
        assert rep.mode == mode and rep.fallbacks == 0 and rep.copied + rep.vanished == rep.scanned > JOBS
        t = time.perf_counter()
        v = verify(pair.source_url, pair.target_url, ca_bundle=pair.ca)
        timings[f"verify after {mode}"] = time.perf_counter() - t
        assert v.ok, v.verdict
        assert v.counts == dict.fromkeys(v.counts, 0) and v.jobs == JOBS
        # counted after the verify: keys only expire meanwhile (the worker's stalled-check has a 30 s PX), and SCAN
        # may repeat a key but never skips one present throughout
        total = source_key_count(pair)
        assert v.source_keys >= total and v.target_keys >= total
    # Logged, not printed: the test command stays quiet (pytest shows the log when the test fails; `make bench`
    # prints the throughput).
    log.info("%s", ", ".join(f"{k} {s:.1f} s" for k, s in timings.items()))


def flush_target(pair: Pair) -> None:
    with clients(pair) as (_s, t):
        t.flushall()
