"""BullMQ on the migrated target, proven by workers (phase 10, after the copy and its verify).

* :func:`run_followups`: the Python follow-up worker (``python -m whatrack.followups.cli``, its own process, as in
  production) runs real follow-ups on the target (Upstash offline: the devstack's TLS Redis): some due now (the worker's
  throughput, jobs/s), some delayed a few seconds (lateness: when BullMQ handed the job to the worker minus when it was
  due, p50/p99). Each job must send exactly one WhatsApp message through the UAZAPI stand-in (its ``/_dev/sends``,
  keyed by the job id as ``track_id``), stored once as an outbound message and published.
* :func:`node_check`: a Node BullMQ worker (npm ``bullmq``, ``tests/node/bullmq_target_worker.mjs``) runs jobs a Python
  producer adds on a check queue of the target, over verified TLS; the queue is obliterated afterwards. Without Node
  (or npm ``bullmq``) the result says ``absent`` and why: the criterion then rests on the Python worker alone.

The follow-ups use the demo instance (:mod:`whatrack.demo`: the one the UAZAPI stand-in serves and the bundled fixtures
name, so phase 20's replay registers the same) in the demo organization; its leads are created by one stored inbound
message each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from whatrack.errors import StackError
from whatrack.proof.plots import latency_stats
from whatrack.settings import SECRET_ENV_NAMES, Settings

log = logging.getLogger("whatrack.proof.target_workers")

ROOT = Path(__file__).resolve().parent.parent.parent
NODE_SCRIPT = ROOT / "tests" / "node" / "bullmq_target_worker.mjs"
CHECK_QUEUE = "whatrack-node-check"
JOBS_TIMEOUT_S = 90.0


def _rate(n: int, first_ms: float | None, last_ms: float | None) -> float | None:
    if not n or first_ms is None or last_ms is None:
        return None
    return round(n / max((last_ms - first_ms) / 1000, 1e-3), 1)


async def node_check(url: str, *, ca_bundle: str | None, jobs: int = 50, timeout_s: float = 60.0) -> dict[str, Any]:
    """Python adds ``jobs`` jobs on :data:`CHECK_QUEUE` of ``url``; a Node BullMQ worker runs them.

    Returns:
        ``{"status": "ran", "passed", "jobs", "completed", "failed", "jobs_per_s"}``, or ``{"status": "absent",
        "passed": None, "reason"}`` when Node or npm ``bullmq`` is missing.
    """
    from bullmq import Queue

    from whatrack.followups.jobs import pooled_client

    node = shutil.which("node")
    if node is None:
        return {"status": "absent", "passed": None, "reason": "node is not installed"}
    if not (ROOT / "node_modules" / "bullmq").is_dir() or not NODE_SCRIPT.is_file():
        return {"status": "absent", "passed": None, "reason": "npm bullmq or the worker script is missing"}
    queue = Queue(CHECK_QUEUE, {"connection": pooled_client(url, ca_bundle=ca_bundle)})
    try:
        await queue.obliterate({"force": True})
        await queue.addBulk([{"name": "check", "data": {"n": i}} for i in range(jobs)])
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_NAMES}
        env["BULLMQ_REDIS_URL"] = url
        if ca_bundle:
            env["NODE_EXTRA_CA_CERTS"] = ca_bundle
        r = await asyncio.to_thread(subprocess.run, [node, str(NODE_SCRIPT), CHECK_QUEUE, str(jobs), str(timeout_s)],
                                    env=env, cwd=str(ROOT), capture_output=True, timeout=timeout_s + 30, check=False)
        lines = [ln for ln in r.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
        seen = json.loads(lines[-1]) if lines else {}
        counts = await queue.getJobCounts("completed", "failed", "wait", "active")
    finally:
        with contextlib.suppress(Exception):
            await queue.obliterate({"force": True})
        await queue.close()
    completed = int(seen.get("completed", 0))
    out = {"status": "ran", "jobs": jobs, "completed": completed, "failed": int(seen.get("failed", 0)),
           "completed_in_redis": counts.get("completed", 0),
           "jobs_per_s": _rate(completed, seen.get("firstProcessedOn"), seen.get("lastFinishedOn")),
           "exit": r.returncode}
    out["passed"] = r.returncode == 0 and completed == jobs and counts.get("completed", 0) == jobs
    if r.returncode != 0:
        out["error"] = r.stderr.decode(errors="replace")[-400:]
    log.info("[target] Node BullMQ worker: %s", out)
    return out


async def _leads(store: Any, count: int, seed: int) -> tuple[Any, list[int]]:
    """The demo instance and ``count`` leads of it (one stored inbound message each)."""
    from whatrack.demo import DEMO_NAME, DEMO_ORGANIZATION, DEMO_OWNER, DEMO_TOKEN
    from whatrack.proof.generate import LoadInstance, generate
    from whatrack.uazapi.normalizer import normalize, parse_body

    inst = await store.register_instance(DEMO_ORGANIZATION, DEMO_NAME, DEMO_TOKEN, owner=DEMO_OWNER)
    me = LoadInstance(DEMO_NAME, DEMO_TOKEN, DEMO_OWNER)
    lead_ids: list[int] = []
    for w in generate(count * 6, seed=seed, instances=1, leads=count, only=[me]):
        if w.direction != "inbound" or "group" in w.template:
            continue
        stored = await store.save_message(inst, normalize(parse_body(w.body)))
        await store.mark_published(stored.message_id)  # set-up, not evidence: keep it out of the outbox
        if stored.lead_id not in lead_ids:
            lead_ids.append(stored.lead_id)
    if not lead_ids:
        raise StackError("no lead could be created for the follow-ups")
    return inst, lead_ids


async def _job_times(queue: Any, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    from bullmq import Job

    jobs = await asyncio.gather(*(Job.fromId(queue, j) for j in job_ids))
    # No "due" here: BullMQ resets a job's ``delay`` to 0 when it promotes it, so timestamp + delay is the add time.
    return {j.id: {"processed": j.processedOn, "finished": j.finishedOn, "failed": bool(j.failedReason),
                   "reason": j.failedReason} for j in jobs if j is not None}


async def run_followups(env: dict[str, str], *, jobs: int = 20, delayed: int = 10, delay_s: float = 3.0,
                        seed: int = 1) -> dict[str, Any]:
    """Run ``jobs`` follow-ups on the target with the Python worker (``delayed`` of them due in ``delay_s`` to
    ``2 * delay_s`` seconds) and account for each: fired, lateness, sent once, stored as outbound, published.

    Raises:
        StackError: a part is missing (UAZAPI stand-in, the target Redis) or the worker ran nothing.
    """
    from whatrack.followups.jobs import open_queue, schedule_followup
    from whatrack.proof.load import EndpointProcess
    from whatrack.proof.worker_faults import WorkerProcess
    from whatrack.store.api import Store

    settings = Settings.from_env(env, env_files=())
    for name in ("UAZAPI_BASE_URL", "UPSTASH_REDIS_URL", "DATABASE_URL"):
        if not env.get(name):
            raise StackError(f"the follow-ups on the target need {name} (whatrack stack up)")
    assert settings.database_url and settings.upstash_redis_url and settings.uazapi_base_url
    from whatrack.demo import DEMO_NAME, DEMO_TOKEN

    store = Store.from_url(settings.database_url)
    queue = open_queue(settings.upstash_redis_url, ca_bundle=settings.redis_ca_bundle)
    # UAZAPI authenticates a send by the instance's token: the worker finds it in UAZAPI_INSTANCE_TOKENS
    worker = WorkerProcess(env | {"UAZAPI_INSTANCE_TOKENS": env.get("UAZAPI_INSTANCE_TOKENS")
                                  or f"{DEMO_NAME}:{DEMO_TOKEN}"})
    endpoint = EndpointProcess(env, workers=1)  # the stand-in echoes each send through QStash to the endpoint
    prefix = f"target-{seed}-{int(time.time())}-"
    job_ids = [f"{prefix}{j}" for j in range(jobs)]
    try:
        await store.upgrade()
        inst, lead_ids = await _leads(store, min(jobs, 10), seed)
        await asyncio.to_thread(endpoint.start)
        worker.start()
        now = datetime.now(UTC)
        due_ms: dict[str, float] = {}
        for j, job_id in enumerate(job_ids):
            late = j >= jobs - delayed
            run_at = now + timedelta(seconds=delay_s * (1 + (j % max(delayed, 1)) / max(delayed, 1))) if late else now
            due_ms[job_id] = run_at.timestamp() * 1000
            await schedule_followup(queue, organization_id=inst.organization_id, instance_id=inst.id,
                                    lead_id=lead_ids[j % len(lead_ids)], text=f"follow-up {j}: ainda tem interesse?",
                                    run_at=run_at, job_id=job_id)
        times, per_job, rows = await _observe(queue, store, settings.uazapi_base_url, job_ids, prefix,
                                              inst.organization_id, JOBS_TIMEOUT_S + 2 * delay_s)
    finally:
        with contextlib.suppress(Exception):
            await queue.close()
        await asyncio.to_thread(worker.close)
        await asyncio.to_thread(endpoint.close)
        await store.aclose()
    for job_id, t in times.items():
        t["due"] = due_ms[job_id]
    return _followup_summary(job_ids, delayed, times, per_job, rows)


async def _observe(queue: Any, store: Any, uazapi_url: str, job_ids: list[str], prefix: str, organization_id: int,
                   timeout: float) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]],
                                        list[dict[str, Any]]]:
    """Wait for every job to finish, then read what each sent (UAZAPI stand-in) and the rows those sends became."""
    from whatrack.proof.worker_faults import _sends

    times: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = await _job_times(queue, job_ids)
        if len(times) == len(job_ids) and all(t["finished"] for t in times.values()):
            break
        await asyncio.sleep(0.25)
    sends = await _sends(uazapi_url, prefix)
    per_job = {j: [s for s in sends if s.get("track_id") == j and s.get("ok")] for j in job_ids}
    provider_ids = {s["id"] for v in per_job.values() for s in v}
    rows: list[dict[str, Any]] = []
    wait_rows = time.monotonic() + 30
    while time.monotonic() < wait_rows:
        rows = [r for r in await store.message_rows(organization_id=organization_id)
                if r["provider_id"] in provider_ids]
        if len(rows) >= len(provider_ids) and all(r["published_at"] for r in rows):
            break
        await asyncio.sleep(0.25)
    return times, per_job, rows


def _followup_summary(job_ids: list[str], delayed: int, times: dict[str, dict[str, Any]],
                      per_job: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of :func:`run_followups` (pure). Lateness: BullMQ's ``processedOn`` minus the ``run_at`` the job
    was scheduled for."""
    jobs = len(job_ids)
    late_ids = job_ids[jobs - delayed:] if delayed else []
    due_now = job_ids[:jobs - delayed]
    fired = [j for j in job_ids if times.get(j, {}).get("processed") is not None]
    lateness = latency_stats(times[j]["processed"] - times[j]["due"] for j in late_ids if j in fired)
    outbound = [r for r in rows if r["direction"] == "outbound"]
    stored_ids = {r["provider_id"] for r in outbound}
    sent_once = sum(1 for v in per_job.values() if len(v) == 1)
    sent_twice = sum(1 for v in per_job.values() if len(v) > 1)
    never = sum(1 for v in per_job.values() if not v)
    stored = sum(1 for v in per_job.values() if len(v) == 1 and v[0]["id"] in stored_ids)
    published = sum(1 for r in outbound if r["published_at"] is not None)
    now_times = [times[j] for j in due_now if times.get(j, {}).get("finished") is not None]
    rate = _rate(len(now_times), min((t["processed"] for t in now_times), default=None),
                 max((t["finished"] for t in now_times), default=None))
    failed = sorted({str(times[j]["reason"])[:120] for j in job_ids if times.get(j, {}).get("failed")})
    passed = (len(fired) == jobs and sent_once == jobs and not sent_twice and stored == jobs
              and published == jobs and len(outbound) == jobs)
    return {"jobs": jobs, "delayed": delayed, "fired": len(fired), "lateness": lateness.as_dict(),
            "sent_once": sent_once, "sent_twice": sent_twice, "never_sent": never, "stored_outbound": stored,
            "outbound_rows": len(outbound), "published": published, "python_jobs_per_s": rate,
            "due_now": len(due_now), "failed_reasons": failed, "passed": passed}
