from __future__ import annotations

from whatrack.migration.keys import (
    delayed_due_ms,
    is_upstash_host,
    key_prefix,
    map_to_source,
    map_to_target,
    parse_bull_key,
    url_db,
    with_db,
)


def test_bull_keys_are_classified() -> None:
    assert parse_bull_key(b"bull:followup:wait").job_id is None  # type: ignore[union-attr]
    assert parse_bull_key(b"bull:followup:repeat:abc").job_id is None  # type: ignore[union-attr]
    assert parse_bull_key(b"bull:followup:de:lead-7").job_id is None  # type: ignore[union-attr]
    job = parse_bull_key(b"bull:followup:42")
    assert job is not None and job.is_job_hash and job.job_id == "42" and job.queue == "followup"
    lock = parse_bull_key(b"bull:followup:42:lock")
    assert lock is not None and lock.job_id == "42" and lock.job_sub == "lock" and not lock.is_job_hash
    assert parse_bull_key(b"session:1") is None
    assert parse_bull_key(b"bull:onlyqueue") is None
    assert parse_bull_key(b"bull:\xff:1") is None


def test_db_remap_round_trips() -> None:
    assert map_to_target(0, b"k") == b"k"
    assert map_to_target(3, b"k") == b"db3:k"
    assert map_to_target(3, b"k", {3: "legacy3/"}) == b"legacy3/k"
    assert map_to_source(b"db3:k") == (3, b"k")
    assert map_to_source(b"legacy3/k", {3: "legacy3/"}) == (3, b"k")
    assert map_to_source(b"k") == (0, b"k")
    assert map_to_target(2, b"k", main_db=2) == b"k"
    assert map_to_source(b"k", main_db=2) == (2, b"k")


def test_urls_and_scores() -> None:
    assert url_db("redis://h:1/3") == 3 and url_db("redis://h:1") == 0
    assert with_db("redis://:pw@h:1/0?x=1", 3) == "redis://:pw@h:1/3?x=1"
    assert is_upstash_host("rediss://default:x@eu1-abc.upstash.io:6379")
    assert not is_upstash_host("rediss://upstash.io.evil.example:6379")
    assert key_prefix(b"bull:followup:1") == "bull:followup" and key_prefix(b"lead:1") == "lead"
    assert delayed_due_ms(1_700_000_000_000 * 4096 + 17) == 1_700_000_000_000
