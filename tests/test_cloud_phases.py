"""Cloud mode, honestly: every phase in one ``whatrack run`` with ``WHATRACK_MODE=cloud`` against a devstack's URLs
(as ``eval "$(whatrack stack env)"`` gives them: they must work exactly as a real cloud would), an empty legacy Redis,
the copy and the rollback left as dry runs, phase 30 running the cloud-safe fault scenarios against the QStash it is
given and listing the offline-only ones, phase 90 passing "no data loss on failure" on them. And the refusal, before
any kernel starts, of an offline-only scenario asked for in cloud mode."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import migration_fixtures
import pytest
from migration_fixtures import Pair

from whatrack.devstack.stack import Stack
from whatrack.errors import RunError
from whatrack.proof import scenarios
from whatrack.runs import acceptance
from whatrack.runs import execute as runs
from whatrack.runs import params as runs_params

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PHASE_30 = {"30_validation": NOTEBOOKS / "30_validation.ipynb"}


# -- the refusal, before any kernel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("item", ["30.faults=postgres_outage", "faults=endpoint_sigkill,db_resets",
                                  "30_validation.faults=worker_sigkill"])
def test_an_offline_only_fault_is_refused_in_cloud_mode_naming_it_and_the_cloud_safe_ones(item: str) -> None:
    offline_one = item.rsplit(",", 1)[-1].split("=")[-1]
    with pytest.raises(RunError) as e:
        runs_params.resolve(runs_params.parse_assignments([item]), PHASE_30, mode="cloud")
    text = str(e.value)
    assert e.value.phase == "30_validation"
    assert "refused in cloud mode" in text and f"{offline_one} is offline only" in text
    assert "cloud-safe scenarios run: baseline, endpoint_sigkill, duplicate_delivery, endpoint_5xx" in text
    # offline the same value is fine; without a mode (as before) nothing is checked against it
    assert runs_params.resolve(runs_params.parse_assignments([item]), PHASE_30, mode="offline")
    assert runs_params.resolve(runs_params.parse_assignments([item]), PHASE_30)


def test_cloud_safe_faults_and_none_pass_in_cloud_mode() -> None:
    for value in ("endpoint_sigkill,endpoint_5xx,duplicate_delivery,baseline", ""):
        got = runs_params.resolve([("30", "faults", value)], PHASE_30, mode="cloud")
        assert got == {"30_validation": {"faults": value}}
    with pytest.raises(RunError, match="unknown fault scenario"):
        runs_params.resolve([("30", "faults", "endpoint_sigkil")], PHASE_30, mode="cloud")


# -- every phase, one run, cloud mode -------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_phase_passes_in_cloud_mode_against_a_devstacks_urls(devstack: Stack, mig: Pair,
                                                                   tmp_path: Path) -> None:
    # The devstack's services as a cloud: its QStash broker, PostgreSQL and Centrifugo; the migration pair's empty
    # legacy Redis and TLS target. Nothing in the run knows it is a devstack.
    env = {**os.environ, **devstack.env(), "WHATRACK_MODE": "cloud", "LEGACY_REDIS_URL": mig.source_url,
           "UPSTASH_REDIS_URL": mig.target_url, "WHATRACK_REDIS_CA_BUNDLE": mig.ca}
    # seed 3: the endpoint_5xx front draws at least three 503s among its first 30 deliveries (seeded random).
    # serve=true: phases 20 and 30 serve the endpoint here on WEBHOOK_PUBLIC_URL (nothing else listens there); phase
    # 30's fault scenarios (the cloud default: every cloud-safe one) run their own there anyway, to kill it.
    assignments = ["serve=true", "30.messages=40", "30.fault_messages=30", "30.seed=3", "90.require_all=false"]
    out = runs.execute([], assignments=assignments, notebook_dir=NOTEBOOKS, runs_dir=tmp_path / "runs",
                       use_stack=False, environ=env)
    phases = {p["phase"]: p for p in out.data["phases"]}
    assert out.ok, (out.data["failure"], [(p["phase"], p["error"]) for p in out.data["phases"]])
    assert out.data["mode"] == "cloud" and out.data["stack"]["how"].startswith("none (cloud mode")
    assert list(phases) == ["00_prepare", "10_redis_migration", "20_qstash_integration", "30_validation",
                            "40_rollback", "90_acceptance"]
    assert all(p["status"] == "passed" for p in phases.values())

    copied, rolled = phases["10_redis_migration"]["results"], phases["40_rollback"]["results"]
    assert copied["dry_run"] is True and copied["passed"] is None  # no confirm_target_host: nothing copied
    assert rolled["dry_run"] is True and rolled["passed"] is None

    checked = phases["30_validation"]["results"]
    assert checked["mode"] == "cloud" and checked["ledger"]["lost"] == 0 and checked["ledger"]["total"] == 40
    rows = {r["scenario"]: r for r in checked["faults"]}
    assert list(rows) == list(scenarios.CLOUD_DEFAULT)  # the default `faults` in cloud mode: every cloud-safe fault
    for row in rows.values():
        assert row["passed"] and row["lost"] == 0 and row["duplicated"] == 0 and row["messages"] == 30, row
    assert "endpoint SIGKILLed at" in rows["endpoint_sigkill"]["notes"]
    answered = re.search(r"(\d+) answered 503", rows["endpoint_5xx"]["notes"])
    assert answered and int(answered.group(1)) >= 1, rows["endpoint_5xx"]["notes"]
    twice = "every webhook published 2 times: 60 QStash messages for 30 webhooks, 60 of them delivered"
    assert twice in rows["duplicate_delivery"]["notes"]
    listed = {r["scenario"]: r for r in checked["faults_offline_only"]}
    assert set(listed) == {s.name for s in scenarios.offline_only()}
    assert all(r["evidence"] == acceptance.NOT_PROVED for r in listed.values())  # no offline run in this runs dir

    criteria = {c["number"]: c for c in phases["90_acceptance"]["results"]["criteria"]}
    no_loss = criteria[7]
    assert no_loss["verdict"] == "pass", no_loss
    assert "duplicate_delivery: 30 ok" in no_loss["evidence"]
    assert "postgres_outage (not yet proved offline" in no_loss["evidence"]
    assert [criteria[n]["verdict"] for n in (4, 5, 6)] == ["pass", "pass", "pass"]
    text = json.dumps(json.loads((out.run_dir / "30_validation" / "30_validation.ipynb").read_text())["cells"])
    assert "offline only" in text and "Traceback" not in text
