"""Parity with Node's BullMQ on one real Redis: Node producers → the Python worker, Python producers → a Node worker.

The Node side is npm ``bullmq`` from /work/main/node_modules, run by tests/node/bullmq_produce.mjs and
bullmq_worker.mjs.
"""
# ruff: noqa: F811  (pytest fixtures imported from followups_fixtures are redefined as parameters)

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bullmq import Job, Queue
from followups_fixtures import (  # noqa: F401  (fixtures)
    INST,
    LEAD,
    ORG,
    ctx,
    finished,
    handler,
    queue,
    running,
    uazapi,
    uazapi_server,
)
from followups_support import StoreForTests, UazapiStandIn

from whatrack.followups.jobs import ATTEMPTS, BACKOFF, JOB_NAME, FollowupJob, schedule_followup, to_iso
from whatrack.followups.process import WorkerContext, process_followup

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"

pytestmark = pytest.mark.node


@pytest.fixture(autouse=True)
def _node() -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Node BullMQ parity tests need Node.js 18+")
    if not (ROOT / "node_modules" / "bullmq").is_dir():
        pytest.skip("npm bullmq is missing: run `make setup` (npm ci) to install the Node peers")


def node(script: str, *args: str, stdin: str = "", timeout: float = 90) -> list[Any]:
    r = subprocess.run(["node", str(NODE_DIR / script), *args], input=stdin.encode(), capture_output=True,
                       timeout=timeout, check=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    return [json.loads(line) for line in r.stdout.decode().splitlines() if line.strip()]


async def test_node_producer_python_worker(queue: Queue, redis_url: str, ctx: WorkerContext,
                                           uazapi: UazapiStandIn) -> None:
    scheduled = to_iso(datetime.now(UTC) - timedelta(minutes=1))

    def data(text: str, **extra: Any) -> dict[str, Any]:
        return {"organizationId": ORG, "instanceId": INST, "leadId": LEAD, "text": text,
                "scheduledAt": scheduled, **extra}

    spec = [
        {"name": JOB_NAME, "data": data("Olá 👋🏽 — ação\nlinha 2", campaign={"id": 7, "tags": ["a", None, 2.5]}),
         "opts": {"jobId": "node-now"}},
        {"name": JOB_NAME, "data": data("later", runAt=to_iso(datetime.now(UTC) + timedelta(seconds=1.5))),
         "opts": {"jobId": "node-delayed", "delay": 1500}},
        {"name": JOB_NAME, "data": data("flaky"),
         "opts": {"jobId": "node-retry", "attempts": 2, "backoff": {"type": "fixed", "delay": 300}}},
        {"name": JOB_NAME, "data": {"organizationId": ORG, "instanceId": INST, "text": "no lead"},
         "opts": {"jobId": "node-malformed"}},
    ]
    uazapi.fail_next(503, job_id="node-retry")
    added = node("bullmq_produce.mjs", redis_url, stdin=json.dumps(spec))[0]
    assert [a["id"] for a in added] == ["node-now", "node-delayed", "node-retry", "node-malformed"]

    seen: dict[str, list[tuple[Job, float]]] = {}

    async def recording(job: Job) -> Any:
        seen.setdefault(str(job.id), []).append((job, time.time() * 1000))
        return await process_followup(ctx, job)

    async with running(redis_url, recording, ctx):
        states = await finished(queue, *(a["id"] for a in added))
    assert states == {"node-now": "completed", "node-delayed": "completed", "node-retry": "completed",
                      "node-malformed": "failed"}

    # the payload, field by field, as Node wrote it and as the worker reads it
    for s in spec[:3]:
        job, _ = seen[s["opts"]["jobId"]][0]
        assert job.name == JOB_NAME and job.data == s["data"]
        fu = FollowupJob.from_wire(job.data)
        assert (fu.organization_id, fu.instance_id, fu.lead_id, fu.text) == (ORG, INST, LEAD, s["data"]["text"])
        assert to_iso(fu.scheduled_at) == scheduled
    # Node's queue defaults reach the Python worker; per-job options win
    assert seen["node-now"][0][0].opts["attempts"] == ATTEMPTS and seen["node-now"][0][0].opts["backoff"] == BACKOFF
    # delayed: not before its due time
    job, ran_at = seen["node-delayed"][0]
    assert ran_at >= job.timestamp + 1500
    # retried once after a 503, sent once
    assert len(seen["node-retry"]) == 2
    retried = await Job.fromId(queue, "node-retry")
    assert retried is not None and retried.attemptsMade == 2
    by_job = uazapi.sends_by_job()
    assert by_job == {"node-now": 1, "node-delayed": 1, "node-retry": 1}
    sent_texts = {s["track_id"]: s["text"] for s in uazapi.sends}
    assert sent_texts["node-now"] == spec[0]["data"]["text"]
    # malformed: failed at once with a reason that names the field, nothing sent
    bad = await Job.fromId(queue, "node-malformed")
    assert bad is not None and bad.attemptsMade == 1 and "leadId is missing" in (bad.failedReason or "")
    assert isinstance(ctx.store, StoreForTests)
    assert sorted(await ctx.store.outbound()) == ["node-delayed", "node-now", "node-retry"]


async def test_python_producer_node_worker(queue: Queue, redis_url: str) -> None:
    now = datetime.now(UTC)
    await schedule_followup(queue, organization_id=ORG, instance_id=INST, lead_id=LEAD,
                            text="Oi, João! 😀 \"aspas\" \\ barra", run_at=now, job_id="py-now")
    await schedule_followup(queue, organization_id=ORG, instance_id=INST, lead_id=LEAD + 1, text="depois",
                            run_at=now + timedelta(seconds=1.2), job_id="py-delayed")
    flaky = FollowupJob(ORG, INST, LEAD, "node-fail-once please", now)
    await queue.add(JOB_NAME, flaky.to_wire(), {"jobId": "py-flaky", "backoff": {"type": "fixed", "delay": 200}})
    written: dict[str, Job] = {}
    for jid in ("py-now", "py-delayed", "py-flaky"):
        job = await Job.fromId(queue, jid)
        assert job is not None
        written[jid] = job

    lines = node("bullmq_worker.mjs", redis_url, "3")
    runs: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        runs.setdefault(line["id"], []).append(line)
    assert {k: len(v) for k, v in runs.items()} == {"py-now": 1, "py-delayed": 1, "py-flaky": 2}

    for jid, job in written.items():
        first = runs[jid][0]
        assert first["name"] == JOB_NAME
        assert first["data"] == job.data  # byte-for-byte the same JSON value
        fu, mine = FollowupJob.from_wire(first["data"]), FollowupJob.from_wire(job.data)
        for f in ("organization_id", "instance_id", "lead_id", "text", "scheduled_at", "run_at"):
            assert getattr(fu, f) == getattr(mine, f), f
        assert first["opts"]["attempts"] == ATTEMPTS
    assert runs["py-now"][0]["opts"]["backoff"] == BACKOFF
    assert runs["py-flaky"][0]["opts"]["backoff"] == {"type": "fixed", "delay": 200}
    due = written["py-delayed"].timestamp + written["py-delayed"].delay  # Node zeroes `delay` once it is due
    assert written["py-delayed"].delay > 1000 and runs["py-delayed"][0]["processedAt"] >= due
    assert [r["attemptsMade"] for r in runs["py-flaky"]] == [0, 1]
    # what Node returned and recorded, read back from Python
    for jid in written:
        assert await queue.getJobState(jid) == "completed"
    done = await Job.fromId(queue, "py-now")
    assert done is not None and done.returnvalue == {"node": True, "leadId": LEAD}
    flaky_done = await Job.fromId(queue, "py-flaky")
    assert flaky_done is not None and flaky_done.attemptsMade == 2
    assert "failing the first attempt on purpose" in (flaky_done.stacktrace[0] if flaky_done.stacktrace else "")
