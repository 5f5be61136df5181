"""The Centrifugo server HTTP API (v5/v6) as the official ``cent`` client sees it.

Conformance follows protocols/upstash-rest-centrifugo.md B.7: ``POST /api/<method>`` for publish, broadcast, history,
history_remove, presence, presence_stats, info, channels, subscribe, unsubscribe, disconnect, refresh, batch (and the
legacy ``POST /api``); ``X-API-Key`` / ``Authorization: apikey`` / ``?api_key=`` auth (401, empty body); API errors as
HTTP 200 ``{"error":{"code","message"}}``; a channel in a namespace the configuration does not define gets 102
``unknown channel``; per-channel offsets and epoch; ``idempotency_key`` honoured (the same key on the same channel
within :data:`~whatrack.devstack.centrifugo.hub.IDEMPOTENCY_TTL_S` returns the first result and appends nothing).
Presence, channels and info count the WebSocket subscribers of this process.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from whatrack.devstack.centrifugo.hub import (
    BAD_REQUEST,
    NOT_AVAILABLE,
    NOT_FOUND,
    ApiError,
    Hub,
    Publication,
    compact,
)

log = logging.getLogger(__name__)

VERSION = "6.0.0-whatrack-standin"


def publication_data(params: dict[str, Any]) -> str:
    """The publication's data as compact JSON text (``b64data`` wins over ``data``).

    Raises:
        ApiError: 107 for missing or empty data, or bad base64.
    """
    b64 = params.get("b64data")
    if b64:
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(*BAD_REQUEST) from e
        try:  # binary data is kept as a JSON string of its base64 (centrifugo echoes it as b64data)
            return compact(json.loads(raw))
        except ValueError:
            return compact(b64)
    if "data" not in params or params["data"] is None or params["data"] == "":
        raise ApiError(*BAD_REQUEST)
    return compact(params["data"])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_body(raw: bytes) -> Any:
    """A request body as Centrifugo's JSON decoder takes it: NaN and Infinity are not JSON (400).

    Raises:
        ValueError, UnicodeDecodeError: not JSON.
    """
    try:
        return msgspec.json.decode(raw)  # strict and fast; what it refuses the standard library decides
    except (msgspec.MsgspecError, RecursionError):
        return json.loads(raw, parse_constant=_no_constant)


def _channel(params: dict[str, Any]) -> str:
    ch = params.get("channel")
    if not isinstance(ch, str) or not ch:
        raise ApiError(*BAD_REQUEST)
    return ch


class ServerApi:
    """The API's methods over a :class:`Hub`; :meth:`endpoint` is the Starlette endpoint."""

    def __init__(self, hub: Hub, api_key: str) -> None:
        self.hub = hub
        self.api_key = api_key
        self.started = time.time()
        self.uid = str(uuid.uuid4())
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "publish": self.publish, "broadcast": self.broadcast, "history": self.history,
            "history_remove": self.history_remove, "presence": self.presence, "presence_stats": self.presence_stats,
            "info": self.info, "channels": self.channels, "subscribe": self.subscribe,
            "unsubscribe": self.unsubscribe, "disconnect": self.disconnect, "refresh": self.no_op,
        }

    # -- methods --------------------------------------------------------------------------------------------------

    def _publication(self, params: dict[str, Any], channel: str | None = None,
                     data: str | None = None) -> Publication:
        """A publish command's parameters, checked (Centrifugo's error for the first thing wrong)."""
        channel = _channel(params) if channel is None else channel
        data = publication_data(params) if data is None else data
        ns = self.hub.namespace(channel)
        tags = params.get("tags") or {}
        if not isinstance(tags, dict):
            raise ApiError(*BAD_REQUEST)
        return Publication(channel, ns, data, tags, bool(params.get("skip_history")),
                           str(params.get("idempotency_key") or ""))

    async def _publish_one(self, channel: str, params: dict[str, Any], data: str) -> dict[str, Any]:
        return (await self.hub.publish_many([self._publication(params, channel, data)]))[0]

    async def publish(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _channel(params)
        return await self._publish_one(channel, params, publication_data(params))

    async def broadcast(self, params: dict[str, Any]) -> dict[str, Any]:
        channels = params.get("channels")
        if not isinstance(channels, list) or not channels:
            raise ApiError(*BAD_REQUEST)
        data = publication_data(params)
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
        channel = _channel(params)
        ns = self.hub.namespace(channel)
        since = params.get("since")
        pos = (int(since.get("offset") or 0), str(since.get("epoch", ""))) if isinstance(since, dict) else None
        return await self.hub.history(channel, ns, limit=int(params.get("limit") or 0), since=pos,
                                      reverse=bool(params.get("reverse")))

    async def history_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _channel(params)
        if not self.hub.namespace(channel).history:
            raise ApiError(*NOT_AVAILABLE)
        await self.hub.remove_history(channel)
        return {}

    async def presence(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _channel(params)
        if not self.hub.namespace(channel).presence:
            raise ApiError(*NOT_AVAILABLE)
        return {"presence": self.hub.presence(channel)}

    async def presence_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = _channel(params)
        if not self.hub.namespace(channel).presence:
            raise ApiError(*NOT_AVAILABLE)
        p = self.hub.presence(channel)
        return {"num_clients": len(p), "num_users": len({c["user"] for c in p.values()})}

    async def info(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"nodes": [{"uid": self.uid, "name": "whatrack-devstack", "version": VERSION, **self.hub.stats(),
                           "uptime": int(time.time() - self.started)}]}

    async def channels(self, params: dict[str, Any]) -> dict[str, Any]:
        pattern = str(params.get("pattern") or "*")
        return {"channels": {ch: {"num_clients": len(subs)} for ch, subs in self.hub.subs.items()
                             if fnmatch.fnmatchcase(ch, pattern)}}

    async def subscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        self.hub.namespace(_channel(params))
        return {}  # server-side subscriptions are not implemented: checked, then a no-op

    def _connections(self, params: dict[str, Any]) -> list[Any]:
        """The connections of ``user`` (only ``client``'s when given; none in ``whitelist``)."""
        user, client = params.get("user"), params.get("client")
        keep = set(params.get("whitelist") or [])
        return [s for s in list(self.hub.sessions.values()) if s.user == user and s.client_id not in keep
                and (not client or s.client_id == client)]

    async def unsubscribe(self, params: dict[str, Any]) -> dict[str, Any]:
        ch = params.get("channel")
        if isinstance(ch, str) and ch:
            self.hub.namespace(ch)
            for s in self._connections(params):
                s.server_unsubscribe(ch)
        return {}

    async def disconnect(self, params: dict[str, Any]) -> dict[str, Any]:
        d = params.get("disconnect")
        code, reason = (3503, "force disconnect")  # centrifuge's DisconnectForceNoReconnect
        if isinstance(d, dict) and isinstance(d.get("code"), int) and d["code"] > 0:
            code, reason = d["code"], str(d.get("reason") or "")
        for s in self._connections(params):
            s.close(code, reason)
        return {}

    async def no_op(self, params: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def batch(self, params: dict[str, Any]) -> dict[str, Any]:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise ApiError(*BAD_REQUEST)
        replies: list[dict[str, Any]] = []
        pending: list[tuple[int, Publication]] = []  # a run of publish commands: stored in one Redis round trip

        async def flush() -> None:
            for (i, _), result in zip(pending, await self.hub.publish_many([pub for _, pub in pending]), strict=True):
                replies[i] = {"publish": result}
            pending.clear()

        for cmd in commands:
            if not isinstance(cmd, dict) or len(cmd) != 1:
                replies.append({"error": {"code": BAD_REQUEST[0], "message": BAD_REQUEST[1]}})
                continue
            (method, p), = cmd.items()
            params = p if isinstance(p, dict) else {}
            fn = self.methods.get(method)
            try:
                if fn is None:
                    raise ApiError(*NOT_FOUND)
                if method == "publish":
                    pending.append((len(replies), self._publication(params)))
                    replies.append({})
                    continue
                await flush()  # what came before this command happens before it
                replies.append({method: await fn(params)})
            except ApiError as e:
                replies.append({"error": {"code": e.code, "message": e.message}})
        await flush()
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
            body = read_body(await request.body() or b"null")
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
        return Response(compact(out), media_type="application/json")
