"""The fault proxy: latency, resets and outages as ordered, then recovery; TLS carried and terminated."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aredis
from devstack_support import spawn, tls_redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from whatrack.devstack import servers, tls
from whatrack.devstack.fault_proxy import FaultControl, FaultProxy, server_ssl_context


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def _ping(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PING\r\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return line


async def _healed(proxy: FaultProxy) -> None:
    while proxy.status()["fault"] != "none":
        await asyncio.sleep(0.02)


async def test_latency_is_added_each_way_then_heals(redis_url: str) -> None:
    async with FaultProxy("127.0.0.1", _port(redis_url)) as proxy:
        assert await _ping(proxy.port) == b"+PONG\r\n"
        await proxy.latency(150, seconds=5)
        t0 = time.monotonic()
        assert await _ping(proxy.port) == b"+PONG\r\n"
        assert time.monotonic() - t0 >= 0.29  # 150 ms out + 150 ms back: a lower bound, never flaky
        assert proxy.status()["fault"] == "latency"
        await proxy.heal()
        assert proxy.status()["fault"] == "none"
        assert await _ping(proxy.port) == b"+PONG\r\n"


async def test_latency_keeps_order_and_bytes(redis_url: str) -> None:
    async with FaultProxy("127.0.0.1", _port(redis_url)) as proxy:
        await proxy.latency(20)
        client = aredis.Redis(port=proxy.port)
        payload = bytes(range(256)) * 4096  # 1 MiB, binary
        await client.set("big", payload)
        pipe = client.pipeline(transaction=False)
        for i in range(200):
            pipe.rpush("order", i)
        await pipe.execute()
        assert await client.get("big") == payload
        assert [int(x) for x in await client.lrange("order", 0, -1)] == list(range(200))
        await client.aclose()


async def test_reset_cuts_open_connections_and_refuses_during_the_window(redis_url: str) -> None:
    async with FaultProxy("127.0.0.1", _port(redis_url)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"PING\r\n")
        assert await reader.readline() == b"+PONG\r\n"
        await proxy.reset(seconds=0.5)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            writer.write(b"PING\r\n")
            await writer.drain()
            await reader.readexactly(7)
        writer.close()
        r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)  # accepted, then reset at once
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError, ConnectionError)):
            w2.write(b"PING\r\n")
            await w2.drain()
            await r2.readexactly(7)
        w2.close()
        await _healed(proxy)
        assert await _ping(proxy.port) == b"+PONG\r\n"
        assert proxy.status()["reset"] >= 1


async def test_outage_refuses_then_recovers_by_itself(redis_url: str) -> None:
    async with FaultProxy("127.0.0.1", _port(redis_url)) as proxy:
        client = aredis.Redis(port=proxy.port, retry=AsyncRetry(NoBackoff(), 0), socket_connect_timeout=2)
        assert await client.ping()
        await proxy.outage(seconds=1)
        with pytest.raises(redis.ConnectionError):
            await client.ping()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", proxy.port)
        await _healed(proxy)
        assert await client.ping()  # the same client reconnects once the link is back
        await client.aclose()


def test_tls_passes_through_with_verification(tmp_path: Path) -> None:
    with tls_redis(tmp_path) as (r, ca):
        other_ca = tls.make_ca_and_server_cert(tmp_path / "other").ca

        async def run() -> None:
            async with FaultProxy("127.0.0.1", r.port) as proxy:
                url = f"rediss://default:{r.password}@localhost:{proxy.port}/0"
                ok = aredis.Redis.from_url(url, ssl_ca_certs=str(ca), ssl_cert_reqs="required")
                assert await ok.ping()
                await ok.aclose()
                wrong = aredis.Redis.from_url(url, ssl_ca_certs=str(other_ca), ssl_cert_reqs="required",
                                              retry=AsyncRetry(NoBackoff(), 0))
                with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                    await wrong.ping()
                await wrong.aclose()

        asyncio.run(run())


def test_tls_termination_in_front_of_a_plain_redis(tmp_path: Path, redis_url: str) -> None:
    files = tls.make_ca_and_server_cert(tmp_path / "tls")
    other_ca = tls.make_ca_and_server_cert(tmp_path / "other").ca

    async def run() -> None:
        sctx = server_ssl_context(str(files.cert), str(files.key))
        async with FaultProxy("127.0.0.1", _port(redis_url), server_ssl=sctx) as proxy:
            url = f"rediss://localhost:{proxy.port}/0"
            ok = aredis.Redis.from_url(url, ssl_ca_certs=str(files.ca), ssl_cert_reqs="required")
            assert await ok.set("k", b"\xff\x00v") and await ok.get("k") == b"\xff\x00v"
            await ok.aclose()
            wrong = aredis.Redis.from_url(url, ssl_ca_certs=str(other_ca), ssl_cert_reqs="required",
                                          retry=AsyncRetry(NoBackoff(), 0))
            with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
                await wrong.ping()
            await wrong.aclose()

    asyncio.run(run())
    assert ssl.HAS_SNI


@pytest.fixture
def proxy_process(tmp_path: Path, redis_url: str) -> Iterator[tuple[int, FaultControl]]:
    port, control = servers.free_port(), servers.free_port()
    args = ["--listen-port", str(port), "--target", f"127.0.0.1:{_port(redis_url)}", "--control-port", str(control)]
    with spawn("whatrack.devstack.fault_proxy", args, {}, control, tmp_path):
        servers.wait_for_port("127.0.0.1", port)
        yield port, FaultControl(f"http://127.0.0.1:{control}")


def test_http_control_endpoint(proxy_process: tuple[int, FaultControl]) -> None:
    port, control = proxy_process
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2)
    assert client.ping()
    assert control.outage()["fault"] == "outage"
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert control.heal()["fault"] == "none"
    assert client.ping()
    status = control.latency(5, seconds=30)
    assert (status["fault"], status["latency_ms"]) == ("latency", 5.0) and 0 < status["remaining_s"] <= 30
    assert client.ping()
    assert control.heal()["fault"] == "none"
    from whatrack.errors import StackError

    with pytest.raises(StackError, match="bad parameter"):
        control.latency(-1)
    client.close()


def test_a_tls_front_without_control_endpoint_stops_cleanly_on_sigterm(tmp_path: Path, redis_url: str) -> None:
    """``--tls-cert/--tls-key`` and no ``--control-port``: the TLS front servers.RedisServer starts."""
    import sys

    from whatrack.devstack import process

    files = tls.make_ca_and_server_cert(tmp_path / "tls")
    port = servers.free_port()
    front = process.Child.spawn([sys.executable, "-m", "whatrack.devstack.fault_proxy", "--listen-port", str(port),
                                 "--target", f"127.0.0.1:{_port(redis_url)}", "--tls-cert", str(files.cert),
                                 "--tls-key", str(files.key)], name="front", log=tmp_path / "front.log")
    try:
        front.wait_for_port(port, timeout=30)
        with redis.Redis.from_url(f"rediss://localhost:{port}/0", ssl_ca_certs=str(files.ca)) as c:
            assert c.ping()
    finally:
        assert front.stop() is True
    assert front.proc is not None and front.proc.returncode == 0  # SIGTERM handled: closed, not killed
