"""Phases 10 and 40 against an empty legacy Redis, in cloud mode, in one ``whatrack run``: phase 10 copies for real
only because its ``confirm_target_host`` names the target; phase 40, not told, stays a dry run. Nothing crashes on
the empty source: the phases say "nothing to show"."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

import migration_fixtures
import pytest
import redis
from migration_fixtures import Pair, clients

from whatrack.migration import iso_ms
from whatrack.migration.keys import CUTOVER_KEY
from whatrack.runs import execute as runs

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
def test_phases_10_and_40_on_an_empty_legacy_redis_in_cloud_mode(mig: Pair, tmp_path: Path) -> None:
    host = urlsplit(mig.target_url).hostname
    legacy_host = urlsplit(mig.source_url).hostname
    env = {**os.environ, "WHATRACK_MODE": "cloud", "LEGACY_REDIS_URL": mig.source_url,
           "UPSTASH_REDIS_URL": mig.target_url, "WHATRACK_REDIS_CA_BUNDLE": mig.ca}
    out = runs.execute(["10", "40"], assignments=[f"10.confirm_target_host={host}"], notebook_dir=NOTEBOOKS,
                       runs_dir=tmp_path / "runs", use_stack=False, environ=env)
    phases = {p["phase"]: p for p in out.data["phases"]}
    assert out.ok, (out.data["failure"], [(p["phase"], p["error"]) for p in out.data["phases"]])
    copied, rolled = phases["10_redis_migration"]["results"], phases["40_rollback"]["results"]

    assert copied["dry_run"] is False and copied["passed"] is True
    assert "nothing to copy: the source is empty" in copied["copy"] and copied["verify"].startswith("verify CLEAN")
    with clients(mig) as (s, t):
        assert int(t.hget(CUTOVER_KEY, "at_ms")) == copied["cutover_ms"]  # type: ignore[arg-type]
        assert s.dbsize() == 0 and t.dbsize() == 1  # the marker only

    assert rolled["dry_run"] is True and rolled["passed"] is None  # a dry run is no evidence
    assert rolled["rollback"].startswith(f"rollback (dry run) since {iso_ms(copied['cutover_ms'])}:")
    assert f"confirm_target_host={legacy_host}" in rolled["why"]

    for phase in ("10_redis_migration", "40_rollback"):
        text = json.dumps(json.loads((out.run_dir / phase / f"{phase}.ipynb").read_text())["cells"])
        assert "nothing to show" in text, phase
        assert "Traceback" not in text, phase
    with redis.Redis.from_url(mig.source_url) as legacy:
        assert legacy.dbsize() == 0  # the dry-run rollback wrote nothing
