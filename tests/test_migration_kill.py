"""The copy killed with SIGKILL half-way, then resumed: the same clean verdict, nothing appended twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import migration_fixtures
import pytest
from migration_fixtures import QUEUE, Pair, clients, make_jobs, make_other_keys

from whatrack.migration import verify
from whatrack.migration.keys import TMP_PREFIX

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig

JOBS = 3000
#: Small pages make many checkpoints, so "half-way" is a real place in the middle of the copy.
BATCH = 40


def _env(pair: Pair) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPSTASH_", "LEGACY_", "QSTASH_"))}
    env.update(LEGACY_REDIS_URL=pair.source_url, UPSTASH_REDIS_URL=pair.target_url,
               WHATRACK_REDIS_CA_BUNDLE=pair.ca)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["logical", "dump"])
def test_copy_killed_half_way_resumes_clean(mig: Pair, mode: str, tmp_path: Path) -> None:
    make_jobs(mig.source_url, JOBS, realistic=60)
    make_other_keys(mig.source_url)
    with clients(mig) as (s, _t):
        total = s.dbsize()
    ck = tmp_path / "ck.json"
    cmd = [sys.executable, "-m", "whatrack.migration.cli", "copy", "--mode", mode, "--batch", str(BATCH),
           "--checkpoint", str(ck), "--no-progress", "--active-wait", "0"]
    proc = subprocess.Popen(cmd, env=_env(mig), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state: dict[str, object] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = json.loads(ck.read_text())
        except (OSError, ValueError):
            state = {}
        if int(state.get("scanned", 0)) >= total // 2:  # type: ignore[call-overload]
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, output.decode()
    killed_at = json.loads(ck.read_text())
    assert not killed_at["done"] and 0 < killed_at["copied"] < total
    assert not verify(mig.source_url, mig.target_url, ca_bundle=mig.ca).ok  # half a copy is not clean

    out = subprocess.run(cmd, env=_env(mig), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from checkpoint" in out.stdout
    done = json.loads(ck.read_text())
    assert done["done"] and done["cutover_ms"] == killed_at["cutover_ms"]
    v = verify(mig.source_url, mig.target_url, ca_bundle=mig.ca)
    assert v.ok, v.verdict
    with clients(mig) as (s, t):
        for key in ("biglist", f"bull:{QUEUE}:wait", "inbox:0"):
            assert t.llen(key) == s.llen(key)
        for key in ("audit", f"bull:{QUEUE}:events"):
            assert t.xlen(key) == s.xlen(key)
        assert not list(t.scan_iter(match=TMP_PREFIX + b"*"))
