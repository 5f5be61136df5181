"""A copy, a verify and a rollback that cannot destroy: a second copy over a target that holds one is refused (the
post-cutover write survives, the marker stays), ``--force`` says what it overwrites, checkpoints never land in the
working directory, the CLI says what comes next, and an empty legacy Redis is nothing to crash on."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import migration_fixtures
import pytest
from migration_fixtures import SOURCE_PW, TARGET_PW, Pair, clients, make_jobs, make_other_keys

from whatrack import cli
from whatrack.errors import MigrationError
from whatrack.migration import (
    CopyReport,
    copy,
    default_checkpoint,
    iso_ms,
    real_run,
    reset_devstack_target,
    rollback,
    verify,
)
from whatrack.migration.guard import parse_time_ms
from whatrack.migration.keys import CUTOVER_KEY

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig


def _small(pair: Pair) -> None:
    make_jobs(pair.source_url, 20, realistic=9)
    make_other_keys(pair.source_url, big=False)


def _copy(pair: Pair, **kw: Any) -> CopyReport:
    return copy(pair.source_url, pair.target_url, mode="dump", ca_bundle=pair.ca, active_wait_s=0, progress=False,
                **kw)


def test_second_copy_after_a_post_cutover_write_refuses_and_the_write_survives(mig: Pair, tmp_path: Path) -> None:
    _small(mig)
    ck = tmp_path / "ck.json"
    first = copy(mig.source_url, mig.target_url, mode="dump", ca_bundle=mig.ca, active_wait_s=0, progress=False,
                 checkpoint_path=ck)
    with clients(mig) as (_s, t):
        marker = t.hgetall(CUTOVER_KEY)
        t.hset("lead:1", "name", "changed on Upstash after the cutover")
        t.set("upstash-only", "new after the cutover")
    for again in (ck, None, tmp_path / "other.json"):  # the same checkpoint, none, another one: the marker decides
        with pytest.raises(MigrationError) as err:
            _copy(mig, checkpoint_path=again)
        msg = str(err.value)
        assert msg.startswith("copy refused:") and "cutover marker" in msg, msg
        assert f"at {iso_ms(first.cutover_ms)}" in msg
        assert "1 key(s) changed after the cutover (differ from the source: lead:1)" in msg
        assert "1 key(s) only on the target (upstash-only)" in msg
        for choice in ("`whatrack migrate verify`", "`whatrack migrate rollback`", "`whatrack migrate copy --force`"):
            assert choice in msg
        assert SOURCE_PW not in msg and TARGET_PW not in msg
    with clients(mig) as (s, t):
        assert t.hget("lead:1", "name") == b"changed on Upstash after the cutover"  # the write survived
        assert t.hgetall(CUTOVER_KEY) == marker  # the marker did not move
        assert s.hget("lead:1", "name") == b"Lead 1"
    assert json.loads(ck.read_text())["cutover_ms"] == first.cutover_ms
    v = verify(mig.source_url, mig.target_url, ca_bundle=mig.ca)
    assert v.samples["value"] == ["lead:1"] and v.samples["extra"] == ["upstash-only"]


def test_dry_run_over_a_copied_target_says_a_real_copy_would_be_refused(mig: Pair) -> None:
    _small(mig)
    _copy(mig)
    with clients(mig) as (_s, t):
        marker = t.hgetall(CUTOVER_KEY)
        t.hset("lead:2", "name", "changed")
    plan = _copy(mig, dry_run=True)
    verdict = plan.verdict
    assert "would pause 1 queue(s)" in verdict and "nothing written" in verdict
    assert "a real copy would be refused" in verdict and "lead:2" in verdict
    forced = _copy(mig, dry_run=True, force=True).verdict
    assert "copy --force: would overwrite 1 key(s) changed on the target (lead:2)" in forced
    with clients(mig) as (_s, t):
        assert t.hgetall(CUTOVER_KEY) == marker and t.hget("lead:2", "name") == b"changed"


def test_force_says_what_it_overwrites_and_that_the_marker_moves(mig: Pair, caplog: pytest.LogCaptureFixture) -> None:
    _small(mig)
    first = _copy(mig)
    old = first.cutover_ms
    with clients(mig) as (_s, t):
        t.hset("lead:1", "name", "changed")
    caplog.set_level(logging.INFO, logger="whatrack")
    rep = _copy(mig, force=True)
    forced = rep.forced
    assert forced.startswith("copy --force: overwriting 1 key(s) changed on the target (lead:1)")
    assert f"the cutover marker moves from {iso_ms(old)} to {iso_ms(rep.cutover_ms)}" in forced
    assert caplog.text.count("copy --force: overwriting") == 1  # said before the copy, once
    assert f"the cutover marker moved from {iso_ms(old)}" in rep.verdict
    with clients(mig) as (_s, t):
        assert t.hget("lead:1", "name") == b"Lead 1"
        assert int(t.hget(CUTOVER_KEY, "previous_at_ms")) == old
        assert int(t.hget(CUTOVER_KEY, "at_ms")) == rep.cutover_ms > old
    assert verify(mig.source_url, mig.target_url, ca_bundle=mig.ca).ok


def test_a_finished_checkpoint_refuses_even_when_the_target_was_emptied(mig: Pair, tmp_path: Path) -> None:
    make_other_keys(mig.source_url, big=False)
    ck = tmp_path / "ck.json"
    _copy(mig, checkpoint_path=ck)
    with clients(mig) as (_s, t):
        t.flushall()
    with pytest.raises(MigrationError, match=rf"checkpoint {ck} \(a copy at .*Z finished\)"):
        _copy(mig, checkpoint_path=ck)
    with clients(mig) as (_s, t):
        assert t.dbsize() == 0
    rep = _copy(mig, checkpoint_path=ck, force=True)
    assert "checkpoint" in rep.forced and not rep.resumed


def test_empty_legacy_redis_copies_verifies_and_rolls_back_nothing(mig: Pair) -> None:
    rep = _copy(mig)
    assert "nothing to copy: the source is empty" in rep.verdict
    assert verify(mig.source_url, mig.target_url, ca_bundle=mig.ca).ok
    dry = rollback(mig.source_url, mig.target_url, ca_bundle=mig.ca, dry_run=True, active_wait_s=0)
    assert dry.verdict.startswith(f"rollback (dry run) since {iso_ms(rep.cutover_ms)}:")
    assert "run without --dry-run" in dry.next_step
    back = rollback(mig.source_url, mig.target_url, ca_bundle=mig.ca, active_wait_s=0)
    assert back.ok and back.jobs_back == back.other_keys_back == back.deleted_on_source == 0, back.verdict
    assert "`whatrack migrate resume --source`" in back.next_step


def test_cli_copy_twice_verify_first_rollback_hint_and_checkpoint_place(
        mig: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    make_other_keys(mig.source_url, big=False)
    state = tmp_path / "state"
    monkeypatch.setenv("LEGACY_REDIS_URL", mig.source_url)
    monkeypatch.setenv("UPSTASH_REDIS_URL", mig.target_url)
    monkeypatch.setenv("WHATRACK_REDIS_CA_BUNDLE", mig.ca)
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    monkeypatch.delenv("WHATRACK_STACK_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert cli.main(["migrate", "verify"]) == 2
    assert capsys.readouterr().out == "nothing copied yet: run `whatrack migrate copy` first\n"
    assert cli.main(["migrate", "copy", "--dry-run", "--no-progress"]) == 0
    assert "would pause 0 queue(s)" in capsys.readouterr().out
    assert cli.main(["migrate", "copy", "--no-progress", "--active-wait", "0"]) == 0
    out, err = capsys.readouterr()
    ck = default_checkpoint(mig.source_url, mig.target_url)
    assert ck.is_relative_to(state / "whatrack" / "migration") and json.loads(ck.read_text())["done"]
    assert f"checkpoint: {ck}" in out
    said = out + err
    assert said.count("cutover at ") == 1 and said.count("queue(s)") == 1  # each message once
    assert list(cwd.iterdir()) == []  # nothing in the working directory
    assert cli.main(["migrate", "copy", "--no-progress", "--active-wait", "0"]) == 1
    err = capsys.readouterr().err
    assert "copy refused:" in err and f"checkpoint {ck} (a copy at" in err and "--force" in err
    assert cli.main(["migrate", "verify"]) == 0
    capsys.readouterr()
    assert cli.main(["migrate", "rollback", "--mode", "dump"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("rollback since 20") and "Z:" in lines[0]
    assert lines[-1].endswith("`whatrack migrate resume --source`")
    with pytest.raises(SystemExit):
        cli.main(["migrate", "--help"])
    assert "probe -> inventory -> copy --dry-run -> copy -> verify -> resume" in capsys.readouterr().out


def test_checkpoint_default_is_the_stack_folder_offline_else_the_state_folder(tmp_path: Path) -> None:
    s, t = "redis://:pw@127.0.0.1:1/0", "rediss://default:pw@127.0.0.1:2/0"
    stack = {"WHATRACK_STACK_DIR": str(tmp_path / "stack"), "HOME": str(tmp_path / "home")}
    assert default_checkpoint(s, t, environ=stack).parent == tmp_path / "stack" / "migration"
    cloud = {**stack, "WHATRACK_MODE": "cloud"}
    assert default_checkpoint(s, t, environ=cloud).parent == tmp_path / "home" / ".local/state/whatrack/migration"
    other = default_checkpoint(s, t.replace(":2/", ":3/"), environ=stack)
    assert other != default_checkpoint(s, t, environ=stack)  # one file per source/target pair
    assert "pw" not in default_checkpoint(s, t, environ=stack).name


def test_notebook_real_run_needs_the_target_host_in_cloud_mode() -> None:
    url = "rediss://default:pw@eu1-x.upstash.io:6379/0"
    real, why = real_run(url, "", cloud=True)
    assert not real and "confirm_target_host=eu1-x.upstash.io" in why and "pw" not in why
    assert real_run(url, "EU1-X.upstash.io", cloud=True)[0]
    with pytest.raises(MigrationError, match=r"'other.upstash.io' is not the host written into \(eu1-x.upstash.io\)"):
        real_run(url, "other.upstash.io", cloud=True)
    assert real_run("rediss://default:pw@localhost:1/0", "", cloud=False)[0]


def test_reset_refuses_anything_but_the_offline_devstack() -> None:
    with pytest.raises(MigrationError, match="only the offline devstack's target"):
        reset_devstack_target("rediss://default:pw@eu1-x.upstash.io:6379/0", cloud=False)
    with pytest.raises(MigrationError, match="only the offline devstack's target"):
        reset_devstack_target("rediss://default:pw@127.0.0.1:6379/0", cloud=True)


def test_times_are_iso_8601_both_ways() -> None:
    assert iso_ms(1764853806123) == "2025-12-04T13:10:06.123Z"
    assert parse_time_ms("2025-12-04T13:10:06.123Z") == parse_time_ms("1764853806123") == 1764853806123
    assert parse_time_ms("2025-12-04T13:10:06.123") == 1764853806123  # no zone: UTC
    with pytest.raises(MigrationError, match="not a time"):
        parse_time_ms("yesterday")
