"""The Centrifugo stand-in, judged by the official ``cent`` client (B.7), with history kept in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
)
from cent.exceptions import CentApiResponseError, CentTransportError, CentUnauthorizedError
from devstack_support import spawn

from whatrack.devstack import servers

KEY = "api-key-for-tests-0123456789"


@pytest.fixture(scope="module")
def centrifugo(tmp_path_factory: pytest.TempPathFactory, redis_server: servers.RedisServer) -> Iterator[str]:
    """The stand-in with strict namespaces: default (history, presence), ``nohist`` (none), ``small`` (size 3)."""
    d = tmp_path_factory.mktemp("centrifugo")
    port = servers.free_port()
    args = ["--port", str(port), "--redis-url", redis_server.url, "--namespace", ":1000:300:presence",
            "--namespace", "nohist:0:0", "--namespace", "small:3:300"]
    with spawn("whatrack.devstack.centrifugo", args, {"CENTRIFUGO_API_KEY": KEY}, port, d):
        yield f"http://127.0.0.1:{port}/api"


@pytest.fixture
async def cent(centrifugo: str, redis_url: str) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(centrifugo, KEY)
    yield client
    await client.close()


async def test_publish_and_history(cent: AsyncClient) -> None:
    r1 = await cent.publish(PublishRequest(channel="chat", data={"n": 1, "text": "olá 👋"}, tags={"k": "v"}))
    r2 = await cent.publish(PublishRequest(channel="chat", data={"n": 2}))
    assert (r1.offset, r2.offset) == (1, 2) and r1.epoch == r2.epoch and r1.epoch
    other = await cent.publish(PublishRequest(channel="other", data={"n": 1}))
    assert other.offset == 1  # offsets are per channel
    h = await cent.history(HistoryRequest(channel="chat", limit=-1))
    assert [p.data for p in h.publications] == [{"n": 1, "text": "olá 👋"}, {"n": 2}]
    assert [p.offset for p in h.publications] == [1, 2] and h.publications[0].tags == {"k": "v"}
    assert (h.offset, h.epoch) == (2, r1.epoch)
    assert (await cent.history(HistoryRequest(channel="chat"))).publications == []  # no limit: position only
    rev = await cent.history(HistoryRequest(channel="chat", limit=1, reverse=True))
    assert [p.offset for p in rev.publications] == [2]
    since = await cent.history(HistoryRequest(channel="chat", limit=-1, since=StreamPosition(offset=1, epoch=r1.epoch)))
    assert [p.offset for p in since.publications] == [2]
    with pytest.raises(CentApiResponseError) as e:
        await cent.history(HistoryRequest(channel="chat", limit=-1, since=StreamPosition(offset=1, epoch="zzzz")))
    assert e.value.code == 112
    assert await cent.history_remove(HistoryRemoveRequest(channel="chat")) is not None
    after = await cent.history(HistoryRequest(channel="chat", limit=-1))
    assert after.publications == [] and after.offset == 2


async def test_idempotency_key_dedups(cent: AsyncClient) -> None:
    first = await cent.publish(PublishRequest(channel="ledger", data={"m": "a"}, idempotency_key="msg-1"))
    again = await cent.publish(PublishRequest(channel="ledger", data={"m": "a"}, idempotency_key="msg-1"))
    assert (again.offset, again.epoch) == (first.offset, first.epoch)
    other_channel = await cent.publish(PublishRequest(channel="ledger2", data={"m": "a"}, idempotency_key="msg-1"))
    assert other_channel.offset == 1  # the key is per channel
    # concurrent duplicates: still exactly one publication (the Lua script is atomic)
    results = await asyncio.gather(*(cent.publish(PublishRequest(channel="ledger", data={"m": "b"},
                                                                 idempotency_key="msg-2")) for _ in range(10)))
    assert len({r.offset for r in results}) == 1
    b1 = await cent.broadcast(BroadcastRequest(channels=["ledger", "ledger3"], data={"m": "c"},
                                               idempotency_key="msg-3"))
    b2 = await cent.broadcast(BroadcastRequest(channels=["ledger", "ledger3"], data={"m": "c"},
                                               idempotency_key="msg-3"))
    assert [r.result.offset for r in b1.responses if r.result] == [r.result.offset for r in b2.responses if r.result]
    h = await cent.history(HistoryRequest(channel="ledger", limit=-1))
    assert [p.data for p in h.publications] == [{"m": "a"}, {"m": "b"}, {"m": "c"}]


async def test_broadcast_and_errors(cent: AsyncClient) -> None:
    res = await cent.broadcast(BroadcastRequest(channels=["b1", "nope:x", "b2"], data={"x": 1}))
    assert res.responses[0].result is not None and res.responses[0].result.offset == 1
    assert res.responses[1].error is not None and res.responses[1].error.code == 102
    assert res.responses[2].result is not None
    with pytest.raises(CentApiResponseError) as e:
        await cent.publish(PublishRequest(channel="nope:x", data={"x": 1}))
    assert (e.value.code, e.value.message) == (102, "unknown channel")
    with pytest.raises(CentApiResponseError) as e:
        await cent.publish(PublishRequest(channel="", data={"x": 1}))
    assert e.value.code == 107
    with pytest.raises(CentApiResponseError) as e:
        await cent.history(HistoryRequest(channel="nohist:c", limit=10))
    assert e.value.code == 108
    no_history = await cent.publish(PublishRequest(channel="nohist:c", data={"x": 1}))
    assert (no_history.offset, no_history.epoch) == (0, "")  # the server sent {"result":{}}: cent's defaults
    with pytest.raises(CentApiResponseError) as e:
        await cent.broadcast(BroadcastRequest(channels=[], data={"x": 1}))
    assert e.value.code == 107


async def test_history_is_bounded_and_trim_is_detected(cent: AsyncClient) -> None:
    for i in range(5):
        last = await cent.publish(PublishRequest(channel="small:c", data={"i": i}))
    h = await cent.history(HistoryRequest(channel="small:c", limit=-1))
    assert [p.data["i"] for p in h.publications] == [2, 3, 4]
    with pytest.raises(CentApiResponseError) as e:  # asking from offset 1: offsets 2 and 3 were trimmed away
        await cent.history(HistoryRequest(channel="small:c", limit=-1, since=StreamPosition(offset=1,
                                                                                           epoch=last.epoch)))
    assert e.value.code == 112


async def test_info_presence_channels_batch(cent: AsyncClient) -> None:
    info = await cent.info(InfoRequest())
    assert info.nodes[0].uid and info.nodes[0].name
    assert (await cent.presence(PresenceRequest(channel="c"))).presence == {}
    assert (await cent.presence_stats(PresenceStatsRequest(channel="c"))).num_clients == 0
    assert (await cent.channels(ChannelsRequest())).channels == {}
    batch = await cent.batch(BatchRequest(requests=[PublishRequest(channel="bt", data={"a": 1}),
                                                    HistoryRequest(channel="bt", limit=-1)]))
    assert batch.replies[0].offset == 1
    assert [p.data for p in batch.replies[1].publications] == [{"a": 1}]


async def test_auth_and_transport(centrifugo: str, redis_url: str) -> None:
    bad = AsyncClient(centrifugo, "wrong-key")
    with pytest.raises(CentUnauthorizedError):
        await bad.publish(PublishRequest(channel="c", data={"x": 1}))
    await bad.close()
    async with httpx.AsyncClient() as h:
        r = await h.post(f"{centrifugo}/publish", json={"channel": "c", "data": 1})
        assert (r.status_code, r.content) == (401, b"")
        r = await h.post(f"{centrifugo}/publish", json={"channel": "auth", "data": 1},
                         headers={"Authorization": f"ApiKey {KEY}"})
        assert r.json() == {"result": {"offset": 1, "epoch": r.json()["result"]["epoch"]}}
        r = await h.post(f"{centrifugo}/publish?api_key={KEY}", content=b"{not json")
        assert (r.status_code, r.text) == (400, "Bad Request")
        r = await h.get(f"{centrifugo}/publish", headers={"X-API-Key": KEY})
        assert (r.status_code, r.content) == (405, b"")
        r = await h.post(centrifugo, json={"method": "publish", "params": {"channel": "legacy", "data": {"a": 1}}},
                         headers={"X-API-Key": KEY})
        assert r.json()["result"]["offset"] == 1
    nope = AsyncClient(centrifugo.replace("/api", "/nope"), KEY)
    with pytest.raises(CentTransportError) as e:
        await nope.publish(PublishRequest(channel="c", data={"x": 1}))
    assert e.value.status_code == 404
    await nope.close()


def test_history_survives_a_restart(tmp_path: Path, redis_url: str) -> None:
    from cent import Client

    for round_ in range(2):
        port = servers.free_port()
        with spawn("whatrack.devstack.centrifugo", ["--port", str(port), "--redis-url", redis_url],
                   {"CENTRIFUGO_API_KEY": KEY}, port, tmp_path):
            c = Client(f"http://127.0.0.1:{port}/api", KEY)
            c.publish(PublishRequest(channel="durable", data={"round": round_}))
            h = c.history(HistoryRequest(channel="durable", limit=-1))
            c.close()
    assert [p.data for p in h.publications] == [{"round": 0}, {"round": 1}]
