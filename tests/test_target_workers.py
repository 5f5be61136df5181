"""BullMQ on the target (phase 10's workers): real follow-ups run by the Python worker process on the stack's TLS
Redis, each accounted for (fired, lateness, sent once, stored as outbound, published); a Node BullMQ worker running
jobs over TLS; and the accounting itself, which fails a follow-up sent twice or never stored."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from whatrack.proof.target_workers import ROOT, _followup_summary, node_check, run_followups


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from whatrack.devstack.stack import running_stack

    with running_stack(tmp_path_factory.mktemp("targetstack"), time_scale=0.2) as st:
        yield st.env()


@pytest.mark.slow
async def test_followups_fire_on_the_target_each_sent_once_stored_and_published(stack_env: dict[str, str]) -> None:
    got = await run_followups(stack_env, jobs=6, delayed=3, delay_s=1.0, seed=4242)
    assert got["passed"], got
    assert (got["fired"], got["sent_once"], got["stored_outbound"], got["published"]) == (6, 6, 6, 6)
    assert got["sent_twice"] == 0 and got["never_sent"] == 0
    assert got["lateness"]["n"] == 3 and got["python_jobs_per_s"] > 0


@pytest.mark.slow
async def test_a_node_bullmq_worker_runs_jobs_over_tls(stack_env: dict[str, str]) -> None:
    if shutil.which("node") is None or not (ROOT / "node_modules" / "bullmq").is_dir():
        pytest.skip("Node.js or npm bullmq is missing (make setup)")
    url = stack_env["UPSTASH_REDIS_URL"]
    assert url.startswith("rediss://")
    got = await node_check(url, ca_bundle=stack_env["WHATRACK_REDIS_CA_BUNDLE"], jobs=12)
    assert got["status"] == "ran" and got["passed"], got
    assert got["completed"] == got["completed_in_redis"] == 12 and got["jobs_per_s"] > 0


async def test_node_check_without_node_says_absent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `node` on the PATH
    got = await node_check("rediss://127.0.0.1:1", ca_bundle=None)
    assert got == {"status": "absent", "passed": None, "reason": "node is not installed"}


def _times(n: int) -> dict[str, dict[str, float | bool | None]]:
    return {f"j{i}": {"due": 1000.0 * i, "processed": 1000.0 * i + 50 * i, "finished": 1000.0 * i + 60 * i,
                      "failed": False, "reason": None} for i in range(n)}


def test_the_accounting_fails_a_double_send_and_an_unstored_send() -> None:
    ids = [f"j{i}" for i in range(4)]
    sends = {j: [{"id": f"p{j}", "ok": True}] for j in ids}
    rows = [{"provider_id": f"p{j}", "direction": "outbound", "published_at": 1.0} for j in ids]
    ok = _followup_summary(ids, 2, _times(4), sends, rows)
    assert ok["passed"] and ok["lateness"]["n"] == 2 and ok["lateness"]["max_ms"] == 150.0
    twice = _followup_summary(ids, 2, _times(4), sends | {"j1": sends["j1"] * 2}, rows)
    assert not twice["passed"] and twice["sent_twice"] == 1
    unstored = _followup_summary(ids, 2, _times(4), sends, rows[:3])
    assert not unstored["passed"] and unstored["stored_outbound"] == 3
    unpublished = _followup_summary(ids, 2, _times(4), sends, [*rows[:3], rows[3] | {"published_at": None}])
    assert not unpublished["passed"] and unpublished["published"] == 3
