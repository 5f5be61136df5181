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
