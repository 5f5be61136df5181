"""The acceptance table is the PRD's section 13: seven criteria, in its order and words, each with evidence, figures
and a verdict; judged from the phases' results (pure), and carried by phase 90 into ``run.json`` and ``index.html``
(the notebook executed on synthetic results of the other phases: no devstack)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from whatrack.runs import acceptance
from whatrack.runs.execute import _execute_phase, _kernel_manager_class, finish

ROOT = Path(__file__).resolve().parent.parent

PRD = ["BullMQ funciona com Upstash Redis", "Follow-ups agendados funcionam", "Webhook QStash recebido e validado",
       "Mensagens persistidas no banco", "Atualização em tempo real (Centrifugo)",
       "Logs disponíveis no Upstash Console", "Sem perda de dados em caso de falha"]

LAT = {"n": 10, "p50_ms": 120.0, "p95_ms": 300.0, "p99_ms": 350.0, "max_ms": 360.0}


def good_results() -> dict[str, dict[str, Any]]:
    """What the phases record on a passing offline run (the shapes of their ``runs.record`` calls)."""
    return {
        "00_prepare": {"phase": "00_prepare", "passed": True,
                       "checks": [{"name": "target probe found no blocker", "passed": True,
                                   "evidence": "probe: 0 blockers"}]},
        "10_redis_migration": {
            "phase": "10_redis_migration", "passed": True, "dry_run": False, "verify": "verify CLEAN: 45 keys",
            "workers": {"python": {"status": "ran", "jobs": 20, "completed": 20, "jobs_per_s": 9.5, "passed": True},
                        "node": {"status": "ran", "jobs": 50, "completed": 50, "jobs_per_s": 900.0, "passed": True}},
            "followups": {"jobs": 20, "delayed": 10, "fired": 20, "lateness": LAT, "sent_once": 20, "sent_twice": 0,
                          "never_sent": 0, "stored_outbound": 20, "published": 20, "passed": True},
            "checks": [{"name": "verify clean both ways", "passed": True, "evidence": "verify CLEAN"}]},
        "20_qstash_integration": {
            "phase": "20_qstash_integration", "passed": True,
            "fixtures": [{"file": "a.json", "stored": True}],
            "signatures": {"signed_delivered": 12, "fixtures": 12, "unsigned": 401, "forged": 401, "expired": 401,
                           "next_key": 200},
            "checks": [{"name": "every fixture ended as expected", "passed": True, "evidence": "12/12 ok"}]},
        "30_validation": {
            "phase": "30_validation", "passed": True,
            "load": {"accepted": 40, "commit_p50_ms": 30.0, "commit_p99_ms": 90.0, "stored_per_s": 50.0},
            "ledger": {"ok": 40, "lost": 0, "duplicated": 0, "unexpected": 0, "recovered": 0, "unknown": 0,
                       "total": 40},
            "subscriber": {"expected": 40, "deliveries": 40, "channels": 30, "missing": 0, "duplicated": 0,
                           "unexpected": 0, "recovered": 10, "live": 30, "latency": LAT, "passed": True},
            "subscriber_verdict": "40 stored, 40 received over WebSocket",
            "qstash_logs": {"summary": "PASS: found 40", "passed": True, "found": 40, "missing": 0, "unexpected": 0,
                            "unknown": 0, "messages": 40, "events": 120, "states": {"DELIVERED": 40}, "dlq": []},
            "faults": [{"scenario": "endpoint_sigkill", "passed": True, "ok": 30, "recovered": 0, "lost": 0,
                        "duplicated": 0},
                       {"scenario": "postgres_outage", "passed": True, "ok": 30, "recovered": 2, "lost": 0,
                        "duplicated": 0}]},
        "40_rollback": {"phase": "40_rollback", "passed": True, "rollback": "rollback verified"},
    }


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    return [r["verdict"] for r in rows]


def test_seven_criteria_in_the_prds_order_and_words_each_with_evidence_and_figures() -> None:
    rows = acceptance.judge(good_results())
    assert [r["criterion"] for r in rows] == PRD
    assert [r["number"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert all(r["gloss"] and r["evidence"] and r["figures"] for r in rows)
    assert verdicts(rows) == ["pass"] * 7
    by = {r["number"]: r for r in rows}
    assert by[2]["figures"]["lateness_p99_ms"] == 350.0 and "p99 350 ms" in by[2]["evidence"]
    assert by[5]["figures"]["latency_p50_ms"] == 120.0
    assert by[1]["figures"]["node_jobs_per_s"] == 900.0


def test_nothing_ran_is_no_evidence_for_every_criterion() -> None:
    assert verdicts(acceptance.judge({})) == ["no evidence"] * 7


def test_a_dry_run_phase_10_is_no_evidence_not_a_pass() -> None:
    res = good_results()
    res["10_redis_migration"] = {"phase": "10_redis_migration", "passed": None, "dry_run": True,
                                 "why": "cloud: a dry run", "workers": None, "followups": None}
    assert verdicts(acceptance.judge(res))[:2] == ["no evidence", "no evidence"]


def test_a_copy_without_workers_on_the_target_is_no_evidence_for_1_and_2() -> None:
    res = good_results()
    res["10_redis_migration"] |= {"workers": None, "followups": None}
    assert verdicts(acceptance.judge(res))[:3] == ["no evidence", "no evidence", "pass"]


def test_node_absent_does_not_fail_criterion_1_and_says_so() -> None:
    res = good_results()
    res["10_redis_migration"]["workers"]["node"] = {"status": "absent", "passed": None,
                                                    "reason": "node is not installed"}
    row = acceptance.judge(res)[0]
    assert row["verdict"] == "pass" and "node absent: Python worker only" in row["evidence"]


@pytest.mark.parametrize(("phase", "path", "value", "number"), [
    ("10_redis_migration", ("workers", "node", "passed"), False, 1),
    ("10_redis_migration", ("followups", "passed"), False, 2),
    ("20_qstash_integration", ("signatures", "expired"), 200, 3),
    ("20_qstash_integration", ("signatures", "next_key"), 401, 3),
    ("30_validation", ("ledger", "lost"), 1, 4),
    ("30_validation", ("subscriber", "passed"), False, 5),
    ("30_validation", ("qstash_logs", "passed"), False, 6),
    ("40_rollback", ("passed",), False, 7),
])
def test_each_failure_fails_its_own_criterion(phase: str, path: tuple[str, ...], value: Any, number: int) -> None:
    res = copy.deepcopy(good_results())
    target: Any = res[phase]
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    got = verdicts(acceptance.judge(res))
    assert got == ["fail" if n == number else "pass" for n in range(1, 8)]


def test_a_fault_scenario_that_lost_a_message_fails_criterion_7() -> None:
    res = good_results()
    res["30_validation"]["faults"][1] |= {"lost": 1, "passed": False}
    rows = acceptance.judge(res)
    assert rows[6]["verdict"] == "fail" and "postgres_outage: 30 ok, 2 recovered, 1 lost" in rows[6]["evidence"]


def test_cloud_without_rotation_evidence_is_no_evidence_for_criterion_3() -> None:
    res = good_results()
    res["20_qstash_integration"]["signatures"]["next_key"] = None
    assert acceptance.judge(res)[2]["verdict"] == "no evidence"


@pytest.mark.slow
def test_phase_90_puts_the_seven_criteria_into_run_json_and_the_index(tmp_path: Path) -> None:
    """Phase 90 executed (papermill, as ``whatrack run`` does) on synthetic results of the other phases."""
    run_dir = tmp_path / "run"
    for phase, res in good_results().items():
        (run_dir / phase).mkdir(parents=True)
        (run_dir / phase / "results.json").write_text(json.dumps(res), encoding="utf-8")
    src = ROOT / "notebooks" / "90_acceptance.ipynb"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSTASH", "UPSTASH", "CENTRIFUGO"))}
    rec = _execute_phase("90_acceptance", src, {}, run_dir / "90_acceptance", _kernel_manager_class(env), 300, [])
    assert rec["status"] == "passed", rec["error"]
    data: dict[str, Any] = {"run_id": "synthetic", "status": "passed", "started": None, "ended": None,
                            "duration_s": 0.0, "mode": "offline", "stack": None, "failure": None, "scan": None,
                            "command": "test", "provenance": {"packages": {}, "node_packages": {}},
                            "phases": [{"phase": p, "title": p, "status": "passed", "results": r, "duration_s": 1.0,
                                        "html": None, "notebook": None, "figures": [], "error": None,
                                        "parameters": {}, "defaults": {}} for p, r in good_results().items()] + [rec]}
    finish(run_dir, data, [])
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    assert [c["criterion"] for c in run["acceptance"]] == PRD
    assert [c["verdict"] for c in run["acceptance"]] == ["pass"] * 7
    assert all(c["evidence"] and c["figures"] for c in run["acceptance"])
    page = (run_dir / "index.html").read_text(encoding="utf-8")
    positions = [page.index(f'<b lang="pt">{name}</b>') for name in PRD]
    assert positions == sorted(positions)  # in the PRD's order
    assert "Scheduled follow-ups work" in page and "lateness_p99_ms" in page


def test_a_phase_that_did_not_run_leaves_its_criteria_without_evidence() -> None:
    res = good_results()
    del res["30_validation"]
    rows = acceptance.judge(res)
    assert verdicts(rows) == ["pass", "pass", "pass", "no evidence", "no evidence", "no evidence", "no evidence"]


# -- cloud mode: cloud-safe faults, the offline-only ones named with the offline run that proved them ---------------

def _phase30(run_dir: Path, recorded: str, faults: list[dict[str, Any]], *, mode: str | None,
             run_json_mode: str | None = None) -> None:
    (run_dir / "30_validation").mkdir(parents=True)
    res = {"phase": "30_validation", "recorded": recorded, "faults": faults} | ({"mode": mode} if mode else {})
    (run_dir / "30_validation" / "results.json").write_text(json.dumps(res), encoding="utf-8")
    if run_json_mode:
        (run_dir / "run.json").write_text(json.dumps({"mode": run_json_mode}), encoding="utf-8")


def _row(name: str, passed: bool = True) -> dict[str, Any]:
    return {"scenario": name, "passed": passed, "messages": 30, "ok": 30, "lost": 0 if passed else 2,
            "duplicated": 0, "recovered": 0}


def test_offline_proofs_pick_the_newest_offline_run_where_the_scenario_passed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _phase30(runs / "r1-old", "2026-12-01T10:00:00+00:00", [_row("postgres_outage"), _row("db_latency")],
             mode=None, run_json_mode="offline")  # a record before phase 30 wrote its mode: run.json's
    _phase30(runs / "r2-new", "2026-12-02T10:00:00+00:00", [_row("postgres_outage"), _row("db_latency", False)],
             mode="offline")
    _phase30(runs / "r3-cloud", "2026-12-03T10:00:00+00:00", [_row("db_latency")], mode="cloud")
    _phase30(runs / "r4-unknown", "2026-12-04T10:00:00+00:00", [_row("db_latency")], mode=None)
    (runs / "r5-broken" / "30_validation").mkdir(parents=True)
    (runs / "r5-broken" / "30_validation" / "results.json").write_text("{not json", encoding="utf-8")

    got = acceptance.offline_proofs(["postgres_outage", "db_latency", "broker_sigkill"], runs)
    assert got["postgres_outage"] is not None and got["postgres_outage"]["run"] == "r2-new"
    assert got["db_latency"] is not None and got["db_latency"]["run"] == "r1-old"  # r2 failed it; r3 is cloud
    assert got["broker_sigkill"] is None

    rows = {r["scenario"]: r for r in acceptance.offline_only_rows(
        [("db_latency", "slow link"), ("broker_sigkill", "broker killed")], runs)}
    assert rows["db_latency"]["status"] == "offline only" and rows["db_latency"]["proved_by"] == "r1-old"
    assert rows["db_latency"]["evidence"].startswith("proved offline in run r1-old (recorded 2026-12-01T10:00:00")
    assert rows["broker_sigkill"]["proved_by"] is None
    assert rows["broker_sigkill"]["evidence"] == "not yet proved offline: run `whatrack run 30` offline"


def test_criterion_7_passes_in_cloud_on_the_cloud_safe_faults_and_names_the_offline_only_ones() -> None:
    res = good_results()
    res["30_validation"]["faults"] = [_row("endpoint_sigkill"), _row("endpoint_5xx"), _row("duplicate_delivery")]
    res["30_validation"]["faults_offline_only"] = [
        {"scenario": "postgres_outage", "status": "offline only", "proved_by": "r2-new",
         "evidence": "proved offline in run r2-new"},
        {"scenario": "broker_sigkill", "status": "offline only", "proved_by": None,
         "evidence": acceptance.NOT_PROVED}]
    del res["40_rollback"]  # cloud: the rollback stayed a dry run
    row = acceptance.judge(res)[6]
    assert row["verdict"] == "pass"
    assert "duplicate_delivery: 30 ok, 0 recovered, 0 lost, 0 duplicated" in row["evidence"]
    assert "postgres_outage (proved offline in run r2-new)" in row["evidence"]
    assert "broker_sigkill (not yet proved offline" in row["evidence"]
    assert row["figures"]["offline_only"] == {"postgres_outage": "r2-new", "broker_sigkill": None}
