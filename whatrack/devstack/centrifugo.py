"""The Centrifugo server HTTP API (v5/v6) as the official ``cent`` client sees it, with history kept in Redis.

Conformance follows protocols/upstash-rest-centrifugo.md B.7: ``POST /api/<method>`` for publish, broadcast, history,
history_remove, presence, presence_stats, info, channels, subscribe, unsubscribe, disconnect, refresh, batch (and the
legacy ``POST /api``); ``X-API-Key`` / ``Authorization: apikey`` / ``?api_key=`` auth (401, empty body); API errors as
HTTP 200 ``{"error":{"code","message"}}``; per-channel offsets and epoch; and ``idempotency_key`` honoured: the same
key on the same channel within :data:`IDEMPOTENCY_TTL_S` returns the first result and appends nothing.

History lives in Redis (one list per channel, trimmed to ``history_size``), written by one Lua script per
publication, so a restart of this process loses nothing and concurrent publishers cannot interleave.

    CENTRIFUGO_API_KEY=... python -m whatrack.devstack.centrifugo --port 8000 --redis-url redis://127.0.0.1:6380/0
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger("whatrack.devstack.centrifugo")

VERSION = "6.0.0-whatrack-standin"
#: Centrifugo's default ``idempotent_result_ttl`` is 5 minutes.
IDEMPOTENCY_TTL_S = 300
#: Redis key prefix for everything this stand-in stores.
PREFIX = "centrifugo:"


@dataclass(frozen=True)
class Namespace:
    """A channel namespace's options (Centrifugo's ``history_size``, ``history_ttl``, ``presence``)."""

    history_size: int = 0
    history_ttl_s: int = 0
    presence: bool = False

    @property
    def history(self) -> bool:
        return self.history_size > 0 and self.history_ttl_s > 0


#: The stack's default: history on everywhere, bounded large enough for a loss ledger (one load test's messages).
LEDGER_NAMESPACE = Namespace(history_size=200_000, history_ttl_s=7 * 24 * 3600, presence=True)


class ApiError(Exception):
    """A Centrifugo API error (code and message exactly as B.3 lists them)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


BAD_REQUEST = (107, "bad request")
UNKNOWN_CHANNEL = (102, "unknown channel")
NOT_AVAILABLE = (108, "not available")
UNRECOVERABLE = (112, "unrecoverable position")
NOT_FOUND = (104, "not found")

# Atomically: honour an idempotency key, advance the channel offset, append, trim, expire. One round trip, so two
# publishers racing on the same key cannot both append.
_PUBLISH_LUA = """
local idem = ARGV[7] == '1'
if idem then
  local prev = redis.call('GET', KEYS[3])
  if prev then return {1, prev} end
end
local res = '{}'
if ARGV[6] ~= '1' then
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  if not epoch then
    epoch = ARGV[5]
    redis.call('HSET', KEYS[1], 'epoch', epoch)
  end
  local off = redis.call('HINCRBY', KEYS[1], 'offset', 1)
  redis.call('RPUSH', KEYS[2], off .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[8]))
  res = '{"offset":' .. off .. ',"epoch":"' .. epoch .. '"}'
end
if idem then redis.call('SET', KEYS[3], res, 'PX', tonumber(ARGV[9])) end
return {0, res}
"""


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class Centrifugo:
    """The API's logic over one Redis; the ASGI app is :func:`create_app`."""

    def __init__(self, redis_url: str, api_key: str, namespaces: dict[str, Namespace] | None = None) -> None:
        self.api_key = api_key
        self.namespaces = namespaces if namespaces is not None else {"": LEDGER_NAMESPACE}
        self.redis = aredis.Redis.from_url(redis_url, protocol=2, decode_responses=True)
        self._publish = self.redis.register_script(_PUBLISH_LUA)
        self.started = time.time()
        self.uid = str(uuid.uuid4())
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "publish": self.publish, "broadcast": self.broadcast, "history": self.history,
            "history_remove": self.history_remove, "presence": self.presence, "presence_stats": self.presence_stats,
            "info": self.info, "channels": self.channels, "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe, "disconnect": self.no_op, "refresh": self.no_op,
        }

    # -- helpers --------------------------------------------------------------------------------------------------

    def namespace(self, channel: str) -> Namespace:
        name = channel.split(":", 1)[0] if ":" in channel else ""
        ns = self.namespaces.get(name) or self.namespaces.get("*")
        if ns is None:
            raise ApiError(*UNKNOWN_CHANNEL)
        return ns

    @staticmethod
    def _channel(params: dict[str, Any]) -> str:
        ch = params.get("channel")
        if not isinstance(ch, str) or not ch:
            raise ApiError(*BAD_REQUEST)
        return ch

    @staticmethod
    def _data(params: dict[str, Any]) -> str:
        b64 = params.get("b64data")
        if b64:
            try:
                raw = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ApiError(*BAD_REQUEST) from e
            try:  # binary data is kept as a JSON string of its base64 (centrifugo echoes it as b64data)
                return _compact(json.loads(raw))
            except ValueError:
                return _compact(b64)
        if "data" not in params or params["data"] is None or params["data"] == "":
            raise ApiError(*BAD_REQUEST)
        return _compact(params["data"])

    # -- methods --------------------------------------------------------------------------------------------------

    async def _publish_one(self, channel: str, params: dict[str, Any], data: str) -> dict[str, Any]:
        ns = self.namespace(channel)
        skip = bool(params.get("skip_history")) or not ns.history
        key = params.get("idempotency_key") or ""
        tags = params.get("tags") or {}
        if not isinstance(tags, dict):
            raise ApiError(*BAD_REQUEST)
        keys = [f"{PREFIX}meta:{channel}", f"{PREFIX}stream:{channel}", f"{PREFIX}idem:{channel}:{key}"]
        argv = [data, _compact(tags), str(int(time.time() * 1000)), str(max(ns.history_size, 1)),
                secrets.token_urlsafe(3)[:4], "1" if skip else "0", "1" if key else "0",
                str(max(ns.history_ttl_s, 1) * 1000), str(IDEMPOTENCY_TTL_S * 1000)]
        dup, res = await self._publish(keys=keys, args=argv)
        if int(dup):
            log.info("publish to %s deduplicated by idempotency key", channel)
        out: dict[str, Any] = json.loads(res)
        return out

    async def publish(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        return await self._publish_one(channel, params, self._data(params))

    async def broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        channels = params.get("channels")
        if not isinstance(channels, list) or not channels:
            raise ApiError(*BAD_REQUEST)
        data = self._data(params)
        responses: list[dict[str, Any]] = []
        for ch in channels:
            try:
                if not isinstance(ch, str) or not ch:
                    raise ApiError(*BAD_REQUEST)
                responses.append({"result": await self._publish_one(ch, params, data)})
            except ApiError as e:
                responses.append({"error": {"code": e.code, "message": e.message}})
        return {"responses": responses}

    async def history(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        ns = self.namespace(channel)
        if not ns.history:
            raise ApiError(*NOT_AVAILABLE)
        meta = await self.redis.hgetall(f"{PREFIX}meta:{channel}")
        if not meta:  # a fresh stream: centrifugo creates its epoch on first touch
            await self.redis.hsetnx(f"{PREFIX}meta:{channel}", "epoch", secrets.token_urlsafe(3)[:4])
            meta = await self.redis.hgetall(f"{PREFIX}meta:{channel}")
        epoch, top = meta["epoch"], int(meta.get("offset", 0))
        limit = int(params.get("limit") or 0)
        since = params.get("since")
        if limit == 0 and not isinstance(since, dict):
            return {"publications": [], "epoch": epoch, "offset": top}
        start, stop = 0, -1
        if limit > 0 and not isinstance(since, dict):  # read only what is asked: streams can be long
            start, stop = (-limit, -1) if params.get("reverse") else (0, limit - 1)
        raw: list[str] = await self.redis.lrange(f"{PREFIX}stream:{channel}", start, stop)  # type: ignore[assignment]
        oldest_ms = (time.time() - ns.history_ttl_s) * 1000
        pubs: list[dict[str, Any]] = []
        for item in raw:
            off, ts, tags, data = item.split("\n", 3)
            if float(ts) < oldest_ms:
                continue
            pub: dict[str, Any] = {"data": json.loads(data), "offset": int(off)}
            t = json.loads(tags)
            if t:
                pub["tags"] = t
            pubs.append(pub)
        if isinstance(since, dict):
            if since.get("epoch", "") != epoch:
                raise ApiError(*UNRECOVERABLE)
            since_off = int(since.get("offset") or 0)
            first = pubs[0]["offset"] if pubs else top + 1
            if since_off < first - 1:  # history was trimmed past the asked position
                raise ApiError(*UNRECOVERABLE)
            pubs = [p for p in pubs if p["offset"] > since_off]
        if params.get("reverse"):
            pubs.reverse()
        if limit == 0:
            pubs = []
        elif limit > 0:
            pubs = pubs[:limit]
        return {"publications": pubs, "epoch": epoch, "offset": top}

    async def history_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        if not self.namespace(channel).history:
            raise ApiError(*NOT_AVAILABLE)
        await self.redis.delete(f"{PREFIX}stream:{channel}")
        return {}

    async def presence(self, params: dict[str, Any]) -> dict[str, Any]:
        if not self.namespace(self._channel(params)).presence:
            raise ApiError(*NOT_AVAILABLE)
        return {"presence": {}}

    async def presence_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        if not self.namespace(self._channel(params)).presence:
            raise ApiError(*NOT_AVAILABLE)
        return {"num_clients": 0, "num_users": 0}

    async def info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"nodes": [{"uid": self.uid, "name": "whatrack-devstack", "version": VERSION, "num_clients": 0,
                           "num_users": 0, "num_channels": 0, "num_subs": 0,
                           "uptime": int(time.time() - self.started)}]}

    async def channels(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"channels": {}}  # channels are those with subscribers; there are no WebSocket clients here

    async def subscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        self.namespace(self._channel(params))
        return {}

    async def unsubscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = params.get("channel")
        if isinstance(ch, str) and ch:
            self.namespace(ch)
        return {}

    async def no_op(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def batch(self, params: dict[str, Any]) -> dict[str, Any]:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise ApiError(*BAD_REQUEST)
        replies: list[dict[str, Any]] = []
        for cmd in commands:
            if not isinstance(cmd, dict) or len(cmd) != 1:
                replies.append({"error": {"code": BAD_REQUEST[0], "message": BAD_REQUEST[1]}})
                continue
            (method, p), = cmd.items()
            fn = self.methods.get(method)
            try:
                if fn is None:
                    raise ApiError(*NOT_FOUND)
                replies.append({method: await fn(p if isinstance(p, dict) else {})})
            except ApiError as e:
                replies.append({"error": {"code": e.code, "message": e.message}})
        return {"replies": replies}

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run one API method; the envelope is ``{"result":…}`` or ``{"error":…}`` (batch: no wrapper)."""
        try:
            if method == "batch":
                return await self.batch(params)
            fn = self.methods.get(method)
            if fn is None:
                raise ApiError(*NOT_FOUND)
            return {"result": await fn(params)}
        except ApiError as e:
            return {"error": {"code": e.code, "message": e.message}}

    # -- HTTP -----------------------------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        given = request.headers.get("x-api-key")
        if given is None:
            auth = request.headers.get("authorization", "")
            scheme, _, value = auth.partition(" ")
            given = value.strip() if scheme.lower() == "apikey" else request.query_params.get("api_key", "")
        return bool(given) and bool(self.api_key) and hmac.compare_digest(given.encode(), self.api_key.encode())

    async def endpoint(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(b"", status_code=405)
        if not self.authorized(request):
            return Response(b"", status_code=401)
        try:
            body = json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError):
            return Response(b"Bad Request", status_code=400, media_type="text/plain")
        method = request.path_params.get("method")
        if method is None:  # legacy POST /api {"method", "params"}
            if not isinstance(body, dict):
                return Response(b"Bad Request", status_code=400, media_type="text/plain")
            method, body = str(body.get("method", "")), body.get("params") or {}
        if method != "batch" and method not in self.methods:
            return Response(b"404 page not found\n", status_code=404, media_type="text/plain")
        out = await self.call(method, body if isinstance(body, dict) else {})
        return Response(_compact(out), media_type="application/json")

    async def health(self, request: Request) -> Response:
        await self.redis.ping()
        return Response(_compact({"ok": True}), media_type="application/json")

    async def aclose(self) -> None:
        await self.redis.aclose()


def create_app(redis_url: str, api_key: str, namespaces: dict[str, Namespace] | None = None) -> Starlette:
    """The stand-in as an ASGI app; ``app.state.centrifugo`` is the :class:`Centrifugo`."""
    c = Centrifugo(redis_url, api_key, namespaces)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await c.aclose()

    all_methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(routes=[Route("/api", c.endpoint, methods=all_methods),
                            Route("/api/{method}", c.endpoint, methods=all_methods),
                            Route("/_dev/health", c.health, methods=["GET"])], lifespan=lifespan)
    app.state.centrifugo = c
    return app


def parse_namespace(spec: str) -> tuple[str, Namespace]:
    """``NAME:SIZE:TTL[:presence]`` (``NAME`` may be empty for the default namespace, ``*`` for any other)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"namespace {spec!r}: use NAME:HISTORY_SIZE:HISTORY_TTL_S[:presence]")
    return parts[0], Namespace(int(parts[1]), int(parts[2]), len(parts) == 4 and parts[3] == "presence")


def main(argv: list[str] | None = None) -> None:
    """Serve on loopback; the API key comes from ``CENTRIFUGO_API_KEY`` in the environment (never argv)."""
    import uvicorn

    from whatrack.settings import Settings

    p = argparse.ArgumentParser(prog="python -m whatrack.devstack.centrifugo", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True, help="where history lives (plain Redis)")
    p.add_argument("--namespace", action="append", default=[], type=parse_namespace,
                   help="NAME:HISTORY_SIZE:HISTORY_TTL_S[:presence]; repeatable; default: history on everywhere")
    args = p.parse_args(argv)
    s = Settings.from_env(env_files=())
    s.require("CENTRIFUGO_API_KEY")
    assert s.centrifugo_api_key
    namespaces = dict(args.namespace) or {"": LEDGER_NAMESPACE, "*": LEDGER_NAMESPACE}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.redis_url, s.centrifugo_api_key.reveal(), namespaces)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
