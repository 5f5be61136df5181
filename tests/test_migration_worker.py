"""After the copy, a Python ``bullmq`` worker on the new Redis runs every waiting job exactly once, and delayed jobs
fire at their original due time, not at copy time plus their delay."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import migration_fixtures
from bullmq import Queue, Worker
from migration_fixtures import QUEUE, Pair, clients

from whatrack import redis_tcp
from whatrack.migration import copy, resume_queues, verify

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig

WAITING = 40
DELAYS_MS = (6000, 6500, 7000, 7500, 8000)
#: The brief's bound for "at the original due time"; bullmq-py's worker wakes within ~100 ms once its capabilities
#: are primed (protocols/bullmq.md §1.3 b).
DUE_SLACK_MS = 1000
#: How long the test sits between adding the jobs and copying them: a copy that restarted the delays would fire
#: them this much late, beyond the slack.
GAP_S = 1.6


async def _produce(url: str) -> tuple[list[str], dict[str, int]]:
    q = Queue(QUEUE, {"connection": redis_tcp.connect(url, decode_responses=True)})
    waiting = await q.addBulk([{"name": "follow-up", "data": {"n": i}} for i in range(WAITING)])
    due: dict[str, int] = {}
    for d in DELAYS_MS:
        job = await q.add("follow-up-delayed", {"delay": d}, {"delay": d})
        due[job.id] = job.timestamp + d
    await q.close()
    return [j.id for j in waiting], due


async def _consume(pair: Pair, expected: int) -> tuple[list[str], dict[str, int]]:
    runs: list[str] = []
    ran_at: dict[str, int] = {}
    done = asyncio.Event()

    async def process(job: Any, token: str) -> Any:
        runs.append(job.id)
        ran_at[job.id] = int(time.time() * 1000)
        if len(runs) >= expected:
            done.set()
        return "ok"

    conn = redis_tcp.connect(pair.target_url, ca_bundle=pair.ca, decode_responses=True)
    w = Worker(QUEUE, process, {"connection": conn, "autorun": False, "concurrency": 5, "drainDelay": 1})
    await w.blockingRedisConnection.getRedisVersion()  # or waits round up to whole seconds (bullmq.md §1.3 b)
    task = asyncio.ensure_future(w.run())
    # the worker waits on the paused queue; resuming it (as the operator does after verify) lets it go
    assert await asyncio.to_thread(resume_queues, pair.target_url, ca_bundle=pair.ca) == [QUEUE]
    await asyncio.wait_for(done.wait(), 30)
    await asyncio.sleep(0.5)  # a duplicate run would land here
    await w.close()
    await task
    return runs, ran_at


def test_worker_on_target_runs_each_job_once_and_delays_keep_due_time(mig: Pair) -> None:
    waiting_ids, due = asyncio.run(_produce(mig.source_url))
    time.sleep(GAP_S)
    rep = copy(mig.source_url, mig.target_url, mode="auto", ca_bundle=mig.ca, progress=False)
    assert verify(mig.source_url, mig.target_url, ca_bundle=mig.ca).ok
    with clients(mig) as (_s, t):
        assert t.hget(f"bull:{QUEUE}:meta", "paused") == b"1"
    runs, ran_at = asyncio.run(_consume(mig, WAITING + len(DELAYS_MS)))
    assert sorted(runs) == sorted(waiting_ids + list(due))  # every job, each exactly once
    assert len(runs) == len(set(runs))
    for jid, at in due.items():
        late = ran_at[jid] - at
        assert 0 <= late <= DUE_SLACK_MS, f"job {jid} ran {late} ms after its due time (copy at {rep.cutover_ms})"
    with clients(mig) as (s, t):
        assert t.zcard(f"bull:{QUEUE}:completed") == len(runs)
        assert s.zcard(f"bull:{QUEUE}:completed") == 0  # nothing ran on the paused source
