"""Centrifugo's client protocol (v2, JSON) over WebSocket at ``/connection/websocket``, as centrifuge-python speaks it.

A frame holds newline-separated commands ``{"id":N,"<method>":{...}}``; replies are ``{"id":N,"<method>":{...}}`` or
``{"id":N,"error":{"code","message"}}``; pushes are ``{"push":{"channel","pub":{...}}}``; ``{}`` is the server's ping
and the client's pong. Served: ``connect`` (HMAC-signed JWT, HS256/384/512, claims ``sub`` and ``exp``; expired:
error 109; bad: close 3500 ``invalid token``; none: close 3501 ``bad request`` unless anonymous connects are allowed),
``refresh``, ``subscribe`` (a subscription token with ``sub`` and ``channel`` claims, or the namespace's
``allow_subscribe_for_client``; unknown namespace: error 102; recovery with ``recover``/``offset``/``epoch`` when the
namespace has history and ``force_recovery`` (or ``allow_recovery`` and a ``recoverable`` subscription), at most
``recovery_max_publication_limit`` publications, flag 2 turning a failed recovery into error 112), ``sub_refresh``,
``unsubscribe``, ``publish``/``history``/``presence``/``presence_stats`` under the namespace's ``allow_*`` options,
``rpc`` (error 104: no RPC proxy), ``send`` (ignored); the server API's ``unsubscribe`` and ``disconnect`` act on
these connections. The server pings every ``ping_interval`` and closes with 3012
``no pong`` when the pong does not come within ``pong_timeout``; an expired connection is closed with 3005; a client
whose outgoing queue passes 1 MiB is closed with 3008 ``slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
from starlette.websockets import WebSocket

from whatrack.devstack.centrifugo.api import VERSION, publication_data
from whatrack.devstack.centrifugo.config import Namespace
from whatrack.devstack.centrifugo.hub import (
    ALREADY_SUBSCRIBED,
    BAD_REQUEST,
    METHOD_NOT_FOUND,
    NOT_AVAILABLE,
    PERMISSION_DENIED,
    TOKEN_EXPIRED,
    UNKNOWN_CHANNEL,
    UNRECOVERABLE,
    ApiError,
    Hub,
    compact,
)

log = logging.getLogger(__name__)

INVALID_TOKEN = (3500, "invalid token")
DISCONNECT_BAD_REQUEST = (3501, "bad request")
EXPIRED = (3005, "connection expired")
SLOW = (3008, "slow")
NO_PONG = (3012, "no pong")
#: Centrifugo's default client queue limit.
MAX_QUEUE_BYTES = 1 << 20
#: Grace after a connection's ``exp`` before it is closed (centrifuge's ``ExpiredConnectionCloseDelay``).
EXPIRED_CLOSE_DELAY_S = 25.0
#: Subscribe flag asking for error 112 instead of ``recovered: false``.
FLAG_REJECT_UNRECOVERED = 2


class Disconnect(Exception):
    """Close the connection with a Centrifugo disconnect code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


def verify_token(token: str, secret: str) -> dict[str, Any]:
    """The claims of an HMAC-signed connection or subscription token.

    Raises:
        ApiError: 109 when it expired.
        Disconnect: 3500 when it is not a token signed with ``secret`` (or no secret is configured).
    """
    if not secret:
        raise Disconnect(*INVALID_TOKEN)
    try:
        claims: dict[str, Any] = jwt.decode(token, secret, algorithms=["HS256", "HS384", "HS512"],
                                            options={"verify_aud": False})
    except jwt.ExpiredSignatureError:
        raise ApiError(*TOKEN_EXPIRED) from None
    except jwt.InvalidTokenError:
        raise Disconnect(*INVALID_TOKEN) from None
    if not isinstance(claims.get("sub", ""), str):
        raise Disconnect(*INVALID_TOKEN)
    return claims


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Centrifugo's ``allowed_origins`` check: no Origin header (not a browser) passes; patterns may hold ``*``."""
    if not origin:
        return True
    return any(fnmatch.fnmatchcase(origin.lower(), a.lower()) for a in allowed)


class Session:
    """One WebSocket connection: reads commands, writes replies and pushes through one ordered queue."""

    def __init__(self, ws: WebSocket, hub: Hub, hmac_secret: str) -> None:
        self.ws, self.hub, self.secret = ws, hub, hmac_secret
        self.client_id = str(uuid.uuid4())
        self.user = ""
        self.connected = False
        self.channels: set[str] = set()
        self._out: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()
        self._queued = 0
        self._closing = False
        self._pong_due = False
        self._expires_at: float | None = None
        self._handlers: dict[str, Callable[[int, dict[str, Any]], Awaitable[dict[str, Any] | None]]] = {
            "connect": self._connect, "refresh": self._refresh, "subscribe": self._subscribe,
            "sub_refresh": self._sub_refresh, "unsubscribe": self._unsubscribe, "publish": self._publish,
            "history": self._history, "presence": self._presence, "presence_stats": self._presence_stats,
            "rpc": self._rpc,
        }

    # -- output -------------------------------------------------------------------------------------------------

    def push(self, message: str) -> None:
        """Queue a message (a push, a reply or a ping); a client too slow to read is closed with 3008."""
        if self._closing:
            return
        self._queued += len(message)
        if self._queued > MAX_QUEUE_BYTES:
            log.warning("client %s is too slow: closing it", self.client_id)
            self.close(*SLOW)
            return
        self._out.put_nowait(message)

    def close(self, code: int, reason: str) -> None:
        if not self._closing:
            self._closing = True
            self._out.put_nowait((code, reason))

    def server_unsubscribe(self, channel: str) -> None:
        """Unsubscribe on the server API's order (push code 2000 ``server unsubscribe``)."""
        if channel in self.channels:
            self.channels.discard(channel)
            self.hub.remove(channel, self)
            self.push(compact({"push": {"channel": channel,
                                        "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}}))

    def _reply(self, cmd_id: int, body: dict[str, Any]) -> None:
        self.push(compact({"id": cmd_id, **body}))

    async def _write(self) -> None:
        while True:
            item = await self._out.get()
            batch: list[str] = []
            while isinstance(item, str):
                batch.append(item)
                self._queued -= len(item)
                if self._out.empty():
                    break
                item = self._out.get_nowait()
            if batch:
                await self.ws.send_text("\n".join(batch))
            if not isinstance(item, str):
                await self.ws.close(code=item[0], reason=item[1])
                return

    # -- the connection's life ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        if not origin_allowed(self.ws.headers.get("origin"), self.hub.config.allowed_origins):
            log.info("refused a WebSocket from origin %s (not in allowed_origins)", self.ws.headers.get("origin"))
            await self.ws.close(code=1008)  # before accept: the handshake gets 403, as Centrifugo answers
            return
        if "centrifuge-protobuf" in self.ws.scope.get("subprotocols", []):
            await self.ws.close(code=1008)  # only the JSON protocol is served
            return
        await self.ws.accept()
        reader = asyncio.create_task(self._read())
        writer = asyncio.create_task(self._write())
        timers = asyncio.create_task(self._timers())
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done and self._closing and not writer.done():  # let the close frame go out
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(writer), 5)
        finally:
            for t in (reader, writer, timers):
                t.cancel()
            await asyncio.gather(reader, writer, timers, return_exceptions=True)
            self._leave()

    def _leave(self) -> None:
        for ch in self.channels:
            self.hub.remove(ch, self)
        self.channels.clear()
        self.hub.sessions.pop(self.client_id, None)

    async def _read(self) -> None:
        while not self._closing:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                text = (msg.get("bytes") or b"").decode("utf-8", "replace")
            try:
                for line in text.split("\n"):
                    if line.strip():
                        await self._command(line)
            except Disconnect as d:
                log.info("closing client %s: %s %s", self.client_id, d.code, d.reason)
                self.close(d.code, d.reason)

    async def _timers(self) -> None:
        cfg = self.hub.config
        while not self._closing:
            await asyncio.sleep(cfg.ping_interval_s if cfg.ping_interval_s > 0 else 60.0)
            if self._expires_at is not None and time.time() > self._expires_at + EXPIRED_CLOSE_DELAY_S:
                self.close(*EXPIRED)
                return
            if cfg.ping_interval_s > 0 and self.connected:
                self._pong_due = True
                self.push("{}")
                await asyncio.sleep(cfg.pong_timeout_s)
                if self._pong_due:
                    self.close(*NO_PONG)
                    return

    async def _command(self, line: str) -> None:
        try:
            cmd = json.loads(line)
        except ValueError:
            raise Disconnect(*DISCONNECT_BAD_REQUEST) from None
        if not isinstance(cmd, dict):
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        methods = [k for k in cmd if k != "id"]
        if not methods:  # {}: the pong
            self._pong_due = False
            return
        method, cmd_id = methods[0], cmd.get("id", 0)
        params = cmd[method] if isinstance(cmd[method], dict) else {}
        if method == "send":
            return
        handler = self._handlers.get(method)
        if handler is None or not isinstance(cmd_id, int) or cmd_id <= 0:
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        if (method == "connect") == self.connected:  # connect first, and once
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        try:
            result = await handler(cmd_id, params)
        except ApiError as e:
            self._reply(cmd_id, {"error": {"code": e.code, "message": e.message}})
            return
        except Disconnect:
            raise
        except Exception:  # Redis down and the like: a temporary internal error, as Centrifugo replies
            log.exception("%s from client %s failed", method, self.client_id)
            self._reply(cmd_id, {"error": {"code": 100, "message": "internal server error", "temporary": True}})
            return
        if result is not None:
            self._reply(cmd_id, {method: result})

    # -- commands -----------------------------------------------------------------------------------------------

    def _expiry(self, claims: dict[str, Any]) -> dict[str, Any]:
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)):
            return {}
        return {"expires": True, "ttl": max(0, math.floor(exp - time.time()))}

    async def _connect(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        token = p.get("token") or ""
        claims: dict[str, Any] = {}
        if token:
            claims = verify_token(str(token), self.secret)
        elif not self.hub.config.allow_anonymous_connect_without_token:
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        self.user = str(claims.get("sub", ""))
        exp = claims.get("exp")
        self._expires_at = float(exp) if isinstance(exp, (int, float)) else None
        self.connected = True
        self.hub.sessions[self.client_id] = self
        res: dict[str, Any] = {"client": self.client_id, "version": VERSION}
        if self.hub.config.ping_interval_s > 0:
            res.update(ping=max(1, math.ceil(self.hub.config.ping_interval_s)), pong=True)
        return {**res, **self._expiry(claims)}

    async def _refresh(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        claims = verify_token(str(p.get("token") or ""), self.secret)
        if claims.get("sub", "") != self.user:
            raise Disconnect(*INVALID_TOKEN)
        exp = claims.get("exp")
        self._expires_at = float(exp) if isinstance(exp, (int, float)) else None
        return {"client": self.client_id, "version": VERSION, **self._expiry(claims)}

    def _namespace(self, p: dict[str, Any]) -> tuple[str, Namespace]:
        channel = p.get("channel")
        if not isinstance(channel, str) or not channel:
            raise Disconnect(*DISCONNECT_BAD_REQUEST)
        ns = self.hub.config.namespace(channel)
        if ns is None:
            raise ApiError(*UNKNOWN_CHANNEL)
        return channel, ns

    def _check_sub_token(self, channel: str, token: str) -> dict[str, Any]:
        claims = verify_token(token, self.secret)
        if claims.get("channel") != channel or claims.get("sub", "") != self.user:
            raise Disconnect(*INVALID_TOKEN)
        return claims

    async def _subscribe(self, cmd_id: int, p: dict[str, Any]) -> None:
        channel, ns = self._namespace(p)
        if channel in self.channels:
            raise ApiError(*ALREADY_SUBSCRIBED)
        claims: dict[str, Any] = {}
        if p.get("token"):
            claims = self._check_sub_token(channel, str(p["token"]))
        elif not (ns.allow_subscribe_for_client and (self.user or ns.allow_subscribe_for_anonymous)):
            raise ApiError(*PERMISSION_DENIED)
        if p.get("tf") is not None:  # tags filters are not implemented: refuse rather than deliver unfiltered
            raise ApiError(*BAD_REQUEST)
        res: dict[str, Any] = self._expiry(claims)
        recoverable = ns.history and (ns.force_recovery or (ns.allow_recovery and bool(p.get("recoverable"))))
        async with self.hub.lock(channel):  # no publication to this channel between reading its position and joining
            if recoverable:
                top, epoch = await self.hub.position(channel)
                res.update(recoverable=True, positioned=True, offset=top, epoch=epoch)
                if p.get("recover"):
                    res.update(await self._recover(channel, ns, p, top, epoch))
            if self._closing:
                return
            self.channels.add(channel)
            self.hub.add(channel, self)
            self._reply(cmd_id, {"subscribe": res})

    async def _recover(self, channel: str, ns: Namespace, p: dict[str, Any], top: int, epoch: str) -> dict[str, Any]:
        """The recovery part of a subscribe reply (publications after the client's offset, if still all there)."""
        limit = self.hub.config.recovery_max_publication_limit
        pubs = None
        if p.get("epoch", "") == epoch:
            pubs = await self.hub.after(channel, ns, int(p.get("offset") or 0), top, limit + 1 if limit > 0 else -1)
            if pubs is not None and 0 < limit < len(pubs):
                pubs = None
        if pubs is None:
            if int(p.get("flag") or 0) & FLAG_REJECT_UNRECOVERED:
                raise ApiError(*UNRECOVERABLE)
            return {"was_recovering": True, "recovered": False}
        out: dict[str, Any] = {"was_recovering": True, "recovered": True}
        if pubs:
            out["publications"] = [e.as_dict() for e in pubs]
        return out

    async def _sub_refresh(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        channel, _ = self._namespace(p)
        if channel not in self.channels:
            raise ApiError(*PERMISSION_DENIED)
        return self._expiry(self._check_sub_token(channel, str(p.get("token") or "")))

    async def _unsubscribe(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        channel = p.get("channel")
        if isinstance(channel, str) and channel in self.channels:
            self.channels.discard(channel)
            self.hub.remove(channel, self)
        return {}

    def _allowed(self, channel: str, for_client: bool, for_subscriber: bool) -> None:
        if not (for_client or (for_subscriber and channel in self.channels)):
            raise ApiError(*PERMISSION_DENIED)

    async def _publish(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        channel, ns = self._namespace(p)
        self._allowed(channel, ns.allow_publish_for_client, ns.allow_publish_for_subscriber)
        await self.hub.publish(channel, ns, publication_data(p), tags={}, skip_history=False, idempotency_key="",
                               info={"user": self.user, "client": self.client_id})
        return {}

    async def _history(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        channel, ns = self._namespace(p)
        self._allowed(channel, ns.allow_history_for_client, ns.allow_history_for_subscriber)
        since = p.get("since")
        pos = (int(since.get("offset") or 0), str(since.get("epoch", ""))) if isinstance(since, dict) else None
        return await self.hub.history(channel, ns, limit=int(p.get("limit") or 0), since=pos,
                                      reverse=bool(p.get("reverse")))

    async def _presence(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        channel, ns = self._namespace(p)
        self._allowed(channel, ns.allow_presence_for_client, ns.allow_presence_for_subscriber)
        if not ns.presence:
            raise ApiError(*NOT_AVAILABLE)
        return {"presence": self.hub.presence(channel)}

    async def _presence_stats(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        presence = (await self._presence(cmd_id, p))["presence"]
        return {"num_clients": len(presence), "num_users": len({c["user"] for c in presence.values()})}

    async def _rpc(self, cmd_id: int, p: dict[str, Any]) -> dict[str, Any]:
        raise ApiError(*METHOD_NOT_FOUND)
