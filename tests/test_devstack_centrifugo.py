"""The Centrifugo stand-in, judged by the official clients: ``cent`` for the server API (B.7), ``centrifuge-python``
for the WebSocket client protocol (subscribers get every publication exactly once, recovery after a reconnect), with
history kept in Redis and namespaces read from a Centrifugo configuration file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    ChannelsRequest,
    DisconnectRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
    UnsubscribeRequest,
)
from cent.exceptions import CentApiResponseError, CentTransportError, CentUnauthorizedError
from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    ConnectingContext,
    DisconnectedContext,
    PublicationContext,
    SubscribedContext,
    Subscription,
    SubscriptionEventHandler,
    UnsubscribedContext,
)
from devstack_support import spawn

from whatrack.devstack import servers
from whatrack.devstack.centrifugo import load_config, parse_config, shipped_config_path
from whatrack.devstack.fault_proxy import FaultControl
from whatrack.devstack.stack import running_stack
from whatrack.errors import ConfigError
from whatrack.realtime import connection_token, subscription_token
from whatrack.settings import Settings

KEY = "api-key-for-tests-0123456789"
SECRET = "hmac-secret-for-tests-9876543210"
#: A Centrifugo v6 configuration: channels without namespace (history, presence), ``nohist`` (none), ``small``
#: (history size 3), ``conversation`` as shipped (history, forced recovery, subscription tokens required).
CONFIG = {
    "client": {"token": {"hmac_secret_key": ""}, "recovery_max_publication_limit": 300},
    "channel": {
        "without_namespace": {"history_size": 1000, "history_ttl": "300s", "presence": True},
        "namespaces": [{"name": "nohist"}, {"name": "small", "history_size": 3, "history_ttl": "300s"},
                       {"name": "conversation", "history_size": 1000, "history_ttl": "300s", "presence": True,
                        "force_recovery": True}],
    },
    "http_api": {"key": ""},
}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory, redis_server: servers.RedisServer) -> Iterator[int]:
    """The stand-in's port, started as the stack starts it, with :data:`CONFIG` as its configuration file."""
    d = tmp_path_factory.mktemp("centrifugo")
    (d / "config.json").write_text(json.dumps(CONFIG))
    port = servers.free_port()
    args = ["--port", str(port), "--redis-url", redis_server.url, "--config", str(d / "config.json")]
    with spawn("whatrack.devstack.centrifugo", args, {"CENTRIFUGO_API_KEY": KEY,
                                                      "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": SECRET}, port, d):
        yield port


@pytest.fixture(scope="module")
def centrifugo(stand_in: int) -> str:
    return f"http://127.0.0.1:{stand_in}/api"


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
    for _ in range(2):  # with an idempotency key: the first and its duplicate answer the same empty result
        keyed = await cent.publish(PublishRequest(channel="nohist:c", data={"x": 2}, idempotency_key="nh-1"))
        assert (keyed.offset, keyed.epoch) == (0, "")
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


async def test_a_batch_longer_than_the_history_keeps_its_last_entries_and_the_channel_position(
        centrifugo: str, cent: AsyncClient) -> None:
    """A batch is stored by one publish script call: five publications to a channel keeping 3 leave offsets 3-5 in
    history, under one epoch; the next publication (another call) continues at offset 6 in the same epoch; a second
    channel in the same batch has offsets of its own; a key of the batch sent again answers its first result."""
    cmds = [{"publish": {"channel": "small:b", "data": {"i": i}, "idempotency_key": f"sb{i}"}} for i in range(1, 6)]
    cmds.insert(2, {"publish": {"channel": "small:other", "data": {"i": 0}}})
    async with httpx.AsyncClient() as h:
        r = await h.post(f"{centrifugo}/batch", json={"commands": cmds}, headers={"X-API-Key": KEY})
    replies = [x["publish"] for x in r.json()["replies"]]
    assert [x["offset"] for x in replies] == [1, 2, 1, 3, 4, 5]
    assert len({x["epoch"] for i, x in enumerate(replies) if i != 2}) == 1
    h = await cent.history(HistoryRequest(channel="small:b", limit=-1))
    assert [(p.offset, p.data["i"]) for p in h.publications] == [(3, 3), (4, 4), (5, 5)]
    assert (h.offset, h.epoch) == (5, replies[0]["epoch"])
    nxt = await cent.publish(PublishRequest(channel="small:b", data={"i": 6}))
    assert (nxt.offset, nxt.epoch) == (6, replies[0]["epoch"])
    again = await cent.publish(PublishRequest(channel="small:b", data={"i": 2}, idempotency_key="sb2"))
    assert (again.offset, again.epoch) == (2, replies[0]["epoch"])  # the key's first result, nothing appended
    assert [p.data["i"] for p in (await cent.history(HistoryRequest(channel="small:b", limit=-1))).publications] == \
        [4, 5, 6]


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


async def test_a_batch_of_publications_keeps_order_errors_and_idempotency(centrifugo: str, cent: AsyncClient) -> None:
    """The stand-in stores a run of publish commands as one Redis pipeline: each reply still stands in its command's
    place, a bad command gets its own error, offsets follow the commands' order per channel, a key repeated in the
    batch publishes once, and a command after the run sees what the run published."""
    cmds = [{"publish": {"channel": "orda", "data": {"i": 1}, "idempotency_key": "k1"}},
            {"publish": {"channel": "ordb", "data": {"i": 2}}},
            {"publish": {"channel": "", "data": {"i": 0}}},
            {"publish": {"channel": "orda", "data": {"i": 3}}},
            {"publish": {"channel": "orda", "data": {"i": 99}, "idempotency_key": "k1"}},
            {"history": {"channel": "orda", "limit": -1}},
            {"publish": {"channel": "orda", "data": {"i": 4}}}]
    async with httpx.AsyncClient() as h:
        r = await h.post(f"{centrifugo}/batch", json={"commands": cmds}, headers={"X-API-Key": KEY})
    replies = r.json()["replies"]
    assert [x.get("publish", {}).get("offset") for x in replies] == [1, 1, None, 2, 1, None, 3]
    assert replies[2] == {"error": {"code": 107, "message": "bad request"}}
    assert [p["data"]["i"] for p in replies[5]["history"]["publications"]] == [1, 3]
    assert [p.data["i"] for p in (await cent.history(HistoryRequest(channel="orda", limit=-1))).publications] == \
        [1, 3, 4]


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
        r = await h.post(f"{centrifugo}/publish?api_key={KEY}", content=b'{"channel": "c", "data": {"x": NaN}}')
        assert (r.status_code, r.text) == (400, "Bad Request")  # not JSON for Go's decoder either
        r = await h.post(f"{centrifugo}/publish?api_key={KEY}", content=b'\xef\xbb\xbf{"channel": "c", "data": 1}')
        assert r.json()["result"]["offset"] >= 1  # what msgspec refuses json.loads still takes (a BOM), as before
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
    from cent import Client as CentClient

    for round_ in range(2):  # no --config: the shipped whatrack/centrifugo.json
        port = servers.free_port()
        with spawn("whatrack.devstack.centrifugo", ["--port", str(port), "--redis-url", redis_url],
                   {"CENTRIFUGO_API_KEY": KEY}, port, tmp_path):
            c = CentClient(f"http://127.0.0.1:{port}/api", KEY)
            c.publish(PublishRequest(channel="conversation:durable", data={"round": round_}))
            h = c.history(HistoryRequest(channel="conversation:durable", limit=-1))
            c.close()
    assert [p.data for p in h.publications] == [{"round": 0}, {"round": 1}]


# -- the WebSocket client protocol, judged by centrifuge-python ------------------------------------------------------


def _settings() -> Settings:
    return Settings.from_env({"CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": SECRET}, env_files=())


class Collector(ClientEventHandler):
    """Client events, awaitable: the disconnect code, and connection state changes."""

    def __init__(self) -> None:
        self.disconnected: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.lost = asyncio.Event()  # the connection went away and the client is reconnecting

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        if ctx.code != 0:  # 0: connect() called
            self.lost.set()

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(ctx.code)


class Received(SubscriptionEventHandler):
    """One subscription's publications (data, offset), its subscribe contexts and the code it was refused with."""

    def __init__(self) -> None:
        self.pubs: list[tuple[Any, int]] = []
        self.subscribed: list[SubscribedContext] = []
        self.refused: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Condition()

    async def on_publication(self, ctx: PublicationContext) -> None:
        async with self._changed:
            self.pubs.append((ctx.pub.data, ctx.pub.offset))
            self._changed.notify_all()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        async with self._changed:
            self.subscribed.append(ctx)
            self._changed.notify_all()

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        if not self.refused.done():
            self.refused.set_result(ctx.code)

    async def wait(self, pubs: int = 0, subscribed: int = 0) -> None:
        """Until this many publications and subscribes arrived (a hang guard, not a timing assertion)."""
        async with asyncio.timeout(60), self._changed:
            await self._changed.wait_for(lambda: len(self.pubs) >= pubs and len(self.subscribed) >= subscribed)


def _client(port: int, user: str, events: ClientEventHandler | None = None, token: str | None = None) -> Client:
    tok = connection_token(_settings(), user) if token is None else token
    return Client(f"ws://127.0.0.1:{port}/connection/websocket", events=events, token=tok, proxy=None,
                  min_reconnect_delay=0.05, max_reconnect_delay=0.5)


async def _finish(client: Client) -> None:
    """Disconnect, and let the client's transport close: it closes in a background task (not awaited by
    ``disconnect()``), which would otherwise be left pending when the test's event loop ends."""
    await client.disconnect()
    await asyncio.gather(*list(client._background_tasks), return_exceptions=True)


def _subscribe(client: Client, user: str, channel: str) -> tuple[Subscription, Received]:
    events = Received()
    sub = client.new_subscription(channel, events=events, token=subscription_token(_settings(), user, channel))
    return sub, events


async def test_subscribers_receive_every_publication_exactly_once(stand_in: int, cent: AsyncClient) -> None:
    channels = [f"conversation:{n}" for n in (11, 12, 13)]
    clients, subs = [], {}
    for user in ("agent-1", "agent-2"):
        c = _client(stand_in, user)
        clients.append(c)
        await c.connect()
        await c.ready()
        for ch in channels:
            sub, got = _subscribe(c, user, ch)
            await sub.subscribe()
            await sub.ready()
            subs[user, ch] = got
    try:
        sent = [(channels[i % 3], {"id": f"m{i}", "text": f"olá {i} 👋"}) for i in range(90)]
        results = await asyncio.gather(*(cent.publish(PublishRequest(channel=ch, data=d)) for ch, d in sent))
        for (user, ch), got in subs.items():
            expected = sorted((r.offset, d) for (c, d), r in zip(sent, results, strict=True) if c == ch)
            await got.wait(pubs=len(expected))
            # every message stored, in offset order, none twice (the fixed-size wait above would hang on a loss)
            assert [(off, data) for data, off in got.pubs] == expected, (user, ch)
        presence = await cent.presence(PresenceRequest(channel=channels[0]))
        assert sorted(p.user for p in presence.presence.values()) == ["agent-1", "agent-2"]
    finally:
        for c in clients:
            await _finish(c)
    assert [p.data["id"] for p in (await cent.history(HistoryRequest(channel=channels[0], limit=-1))).publications] \
        == [d["id"] for ch, d in sent if ch == channels[0]]


async def test_recovery_after_reconnect_delivers_what_was_missed(stand_in: int, cent: AsyncClient) -> None:
    ch = "conversation:77"
    c = _client(stand_in, "agent-1")
    sub, got = _subscribe(c, "agent-1", ch)
    await c.connect()
    await sub.subscribe()
    await cent.publish(PublishRequest(channel=ch, data={"n": 0}))
    await got.wait(pubs=1, subscribed=1)
    assert got.subscribed[0].recoverable and not got.subscribed[0].was_recovering
    await c.disconnect()
    for n in range(1, 6):  # published while the client is away
        await cent.publish(PublishRequest(channel=ch, data={"n": n}))
    try:
        await c.connect()
        await got.wait(pubs=6, subscribed=2)
        await cent.publish(PublishRequest(channel=ch, data={"n": 6}))
        await got.wait(pubs=7)
    finally:
        await _finish(c)
    assert got.subscribed[1].was_recovering and got.subscribed[1].recovered
    assert got.pubs == [({"n": n}, n + 1) for n in range(7)]


async def test_recovery_after_the_stream_was_lost_says_so(stand_in: int, cent: AsyncClient, redis_url: str) -> None:
    """A reconnect after the channel's stream was lost (new epoch) gets recovered=false: the app must reload."""
    import redis.asyncio as aredis

    ch = "conversation:78"
    c = _client(stand_in, "agent-1")
    sub, got = _subscribe(c, "agent-1", ch)
    await c.connect()
    await sub.subscribe()
    await got.wait(subscribed=1)
    await c.disconnect()
    r = aredis.Redis.from_url(redis_url)
    await r.delete(f"centrifugo:meta:{ch}", f"centrifugo:stream:{ch}")
    await r.aclose()
    await cent.publish(PublishRequest(channel=ch, data={"n": 1}))
    try:
        await c.connect()
        await got.wait(subscribed=2)
    finally:
        await _finish(c)
    assert got.subscribed[1].was_recovering and not got.subscribed[1].recovered


async def test_error_publish_unknown_namespace(cent: AsyncClient) -> None:
    """pycent's ``test_error_publish``: a channel in a namespace the configuration lacks is refused with 102."""
    with pytest.raises(CentApiResponseError, match="unknown channel") as e:
        await cent.publish(PublishRequest(channel="undefined:channel", data={"data": "data"}))
    assert e.value.code == 102


async def test_subscribe_refusals(stand_in: int) -> None:
    events = Collector()
    c = _client(stand_in, "agent-1", events)
    await c.connect()
    try:
        unknown, got_unknown = _subscribe(c, "agent-1", "undefined:channel")
        await unknown.subscribe()
        assert await got_unknown.refused == 102  # unknown channel
        no_token = Received()
        await c.new_subscription("conversation:5", events=no_token).subscribe()
        assert await no_token.refused == 103  # permission denied: conversations need a subscription token
        assert c.state == ClientState.CONNECTED
        other = Received()  # a subscription token minted for another user closes the connection: invalid token
        await c.new_subscription("conversation:6", events=other,
                                 token=subscription_token(_settings(), "agent-2", "conversation:6")).subscribe()
        assert await events.disconnected == 3500
    finally:
        await _finish(c)


@pytest.mark.parametrize(("token", "code"), [
    (jwt.encode({"sub": "agent-1"}, "not-the-secret-but-just-as-long-0123456789", algorithm="HS256"), 3500),
    ("", 3501),  # no token and anonymous connections not allowed: bad request
])
async def test_bad_connection_token_is_refused(stand_in: int, token: str, code: int) -> None:
    events = Collector()
    c = _client(stand_in, "agent-1", events, token=token)
    await c.connect()
    try:
        assert await events.disconnected == code
        assert c.state == ClientState.DISCONNECTED
    finally:
        await _finish(c)


async def test_expired_connection_token_gets_109(stand_in: int) -> None:
    import websockets

    old = connection_token(_settings(), "agent-1", ttl_s=60, now=1_000_000)
    async with websockets.connect(f"ws://127.0.0.1:{stand_in}/connection/websocket", proxy=None) as ws:
        await ws.send(json.dumps({"id": 1, "connect": {"token": old}}))
        assert json.loads(await ws.recv()) == {"id": 1, "error": {"code": 109, "message": "token expired"}}


async def test_ping_pong_and_no_pong(tmp_path: Path, redis_url: str) -> None:
    """The server pings with ``{}``; a client that answers stays, one that does not is closed with 3012."""
    import websockets

    cfg = {**CONFIG, "client": {**CONFIG["client"], "ping_interval": "200ms", "pong_timeout": "200ms"}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    port = servers.free_port()
    args = ["--port", str(port), "--redis-url", redis_url, "--config", str(tmp_path / "c.json")]
    with spawn("whatrack.devstack.centrifugo", args, {"CENTRIFUGO_API_KEY": KEY,
                                                      "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": SECRET}, port, tmp_path):
        url = f"ws://127.0.0.1:{port}/connection/websocket"
        async with websockets.connect(url, proxy=None) as ws:
            await ws.send(json.dumps({"id": 1, "connect": {"token": connection_token(_settings(), "u")}}))
            reply = json.loads(await ws.recv())
            assert reply["connect"]["pong"] is True and reply["connect"]["ping"] >= 1
            for _ in range(3):
                assert await ws.recv() == "{}"
                await ws.send("{}")
            assert await ws.recv() == "{}"  # not answered this time
            with pytest.raises(websockets.ConnectionClosed) as e:
                await ws.recv()
            assert (e.value.rcvd.code, e.value.rcvd.reason) == (3012, "no pong")  # type: ignore[union-attr]


def test_configuration_file() -> None:
    shipped = load_config()
    assert set(shipped.namespaces) == {"", "conversation"}
    conv = shipped.namespaces["conversation"]
    assert conv.history and conv.force_recovery and not conv.allow_subscribe_for_client
    assert json.loads(shipped_config_path().read_text())["client"]["token"]["hmac_secret_key"] == ""  # no secret
    v4 = parse_config({"token_hmac_secret_key": "", "history_size": 10, "history_ttl": "1m",
                       "namespaces": [{"name": "chat", "presence": True}]})
    assert v4.namespaces[""].history_ttl_s == 60 and v4.namespaces["chat"].presence
    assert v4.namespace("chat:1") is v4.namespaces["chat"] and v4.namespace("other:1") is None
    with pytest.raises(ConfigError, match="history_ttl"):
        parse_config({"channel": {"namespaces": [{"name": "c1", "history_ttl": 300}]}})
    with pytest.raises(ConfigError, match="defined twice"):
        parse_config({"channel": {"namespaces": [{"name": "c1"}, {"name": "c1"}]}})


def test_token_settings_are_secret() -> None:
    s = Settings.from_env({"CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": SECRET,
                           "CENTRIFUGO_WS_URL": "ws://127.0.0.1:8000/connection/websocket"}, env_files=())
    assert SECRET not in repr(s) and s.masked()["CENTRIFUGO_TOKEN_HMAC_SECRET_KEY"] == "********"
    assert SECRET in s.secret_values()
    with pytest.raises(ConfigError, match="CENTRIFUGO_WS_URL"):
        Settings.from_env({"CENTRIFUGO_WS_URL": "ws://centrifugo.example.com/connection/websocket"}, env_files=())
    with pytest.raises(ConfigError, match="CENTRIFUGO_TOKEN_HMAC_SECRET_KEY"):
        connection_token(Settings.from_env({}, env_files=()), "agent-1")
    claims = jwt.decode(subscription_token(s, "agent-1", "conversation:1"), SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["channel"]) == ("agent-1", "conversation:1") and claims["exp"] > claims["iat"]


async def test_server_api_unsubscribe_and_disconnect_reach_connections(stand_in: int, cent: AsyncClient) -> None:
    events = Collector()
    c = _client(stand_in, "agent-9", events)
    sub, got = _subscribe(c, "agent-9", "conversation:90")
    await c.connect()
    await sub.subscribe()
    await got.wait(subscribed=1)
    try:
        assert (await cent.info(InfoRequest())).nodes[0].num_clients >= 1
        chans = (await cent.channels(ChannelsRequest(pattern="conversation:*"))).channels
        assert chans["conversation:90"].num_clients == 1
        await cent.unsubscribe(UnsubscribeRequest(user="agent-9", channel="conversation:90"))
        assert await got.refused == 2000  # server unsubscribe
        await cent.disconnect(DisconnectRequest(user="agent-9"))
        assert await events.disconnected == 3503  # force disconnect: no reconnect
    finally:
        await _finish(c)


async def test_stack_env_connects_a_client_that_survives_a_link_outage(tmp_path: Path) -> None:
    """``whatrack stack env`` holds what a browser-like client needs; through the fault proxy, a cut link loses
    nothing: what was published meanwhile arrives on reconnect, once."""
    with running_stack(tmp_path / "stack", parts=["centrifugo"]) as stack:
        env = stack.env()
        s = Settings.from_env(env, env_files=())
        assert s.centrifugo_ws_url and s.centrifugo_api_url and s.centrifugo_api_key
        direct = next(p.port for p in stack.status() if p.name == "centrifugo")
        api = AsyncClient(s.centrifugo_api_url, s.centrifugo_api_key.reveal())
        api_direct = AsyncClient(f"http://127.0.0.1:{direct}/api", s.centrifugo_api_key.reveal())
        events, got = Collector(), Received()
        c = Client(s.centrifugo_ws_url, events=events, token=connection_token(s, "agent-1"), proxy=None,
                   min_reconnect_delay=0.05, max_reconnect_delay=0.5)
        sub = c.new_subscription("conversation:1", events=got,
                                 token=subscription_token(s, "agent-1", "conversation:1"))
        control = FaultControl(env["WHATRACK_FAULT_CENTRIFUGO_URL"])
        try:
            await c.connect()
            await sub.subscribe()
            await got.wait(subscribed=1)
            for n in range(3):
                await api.publish(PublishRequest(channel="conversation:1", data={"n": n}))
            await got.wait(pubs=3)
            control.outage()
            try:
                await events.lost.wait()
                for n in range(3, 8):  # while the client is cut off
                    await api_direct.publish(PublishRequest(channel="conversation:1", data={"n": n}))
            finally:
                control.heal()
            await got.wait(pubs=8, subscribed=2)
            await api.publish(PublishRequest(channel="conversation:1", data={"n": 8}))
            await got.wait(pubs=9)
            with pytest.raises(CentApiResponseError) as e:
                await api.publish(PublishRequest(channel="org:1", data={"n": 1}))
            assert e.value.code == 102  # the shipped configuration defines only the conversation namespace
        finally:
            await _finish(c)
            await api.close()
            await api_direct.close()
    assert got.pubs == [({"n": n}, n + 1) for n in range(9)]
    assert got.subscribed[1].was_recovering and got.subscribed[1].recovered
