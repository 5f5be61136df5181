"""Channels of the Centrifugo stand-in: history streams in Redis, and the WebSocket subscribers publications go to.

Each channel's stream is a Redis list (one entry per publication, trimmed to ``history_size``) plus a hash holding
the channel's epoch and last offset, written by one Lua script call per publish (or per run of publish commands in
a batch), so a restart loses nothing and concurrent publishers cannot interleave. A per-channel lock orders a
publication's write and its push to subscribers against a subscribe's read of the stream position: a subscriber gets
every publication after the position its subscribe reply names, exactly once and in offset order.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import redis.asyncio as aredis

from whatrack.devstack.centrifugo.config import Config, Namespace

#: Centrifugo's default ``idempotent_result_ttl`` is 5 minutes.
IDEMPOTENCY_TTL_S = 300
#: Redis key prefix for everything this stand-in stores.
PREFIX = "centrifugo:"

BAD_REQUEST = (107, "bad request")
UNKNOWN_CHANNEL = (102, "unknown channel")
PERMISSION_DENIED = (103, "permission denied")
NOT_FOUND = (104, "not found")
METHOD_NOT_FOUND = (104, "method not found")
ALREADY_SUBSCRIBED = (105, "already subscribed")
NOT_AVAILABLE = (108, "not available")
TOKEN_EXPIRED = (109, "token expired")
UNRECOVERABLE = (112, "unrecoverable position")


class ApiError(Exception):
    """A Centrifugo error reply (server API or client protocol): code and message exactly as Centrifugo's."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


# Atomically, for each publication in order: honour an idempotency key, advance the channel offset, append, trim,
# expire. One round trip for all of them, so two publishers racing on the same key cannot both append.
# ARGV: time stamp (ms), epoch candidate, idempotency TTL (ms), then the publications as one JSON array (cjson, in
# C), each [channel, data, tags, history size, skip history ('1'), idempotency key ('' for none), history TTL (ms)].
# One argument for the lot, not nine per publication: redis-py encoded each argument in Python, nearly half of this
# stand-in's CPU for a 1,000-publication batch. The keys are named here, from the channel (this stand-in's Redis is
# a standalone server of its own: no cluster slot to declare them for).
# Returns {duplicate (0/1), offset, epoch} per publication, flattened: offset 0 and epoch '' when nothing was stored
# (history off or skipped), as Centrifugo's empty result; an idempotency key keeps 'offset:epoch' (or '').
_PUBLISH_LUA = """
local out = {}
local pubs = cjson.decode(ARGV[4])
for i = 1, #pubs do
  local p = pubs[i]
  local channel, data, tags, size, skip, idem, ttl = p[1], p[2], p[3], p[4], p[5], p[6], p[7]
  local meta, stream = '""" + PREFIX + """meta:' .. channel, '""" + PREFIX + """stream:' .. channel
  local key = '""" + PREFIX + """idem:' .. channel .. ':' .. idem
  local prev = false
  if idem ~= '' then prev = redis.call('GET', key) end
  if prev then
    local off, epoch = '0', ''
    if prev ~= '' then off, epoch = string.match(prev, '^(%d+):(.*)$') end
    out[#out + 1] = 1
    out[#out + 1] = off
    out[#out + 1] = epoch
  else
    local off, epoch = 0, ''
    if skip ~= '1' then
      epoch = redis.call('HGET', meta, 'epoch')
      if not epoch then
        epoch = ARGV[2]
        redis.call('HSET', meta, 'epoch', epoch)
      end
      off = redis.call('HINCRBY', meta, 'offset', 1)
      redis.call('RPUSH', stream, off .. '\\n' .. ARGV[1] .. '\\n' .. tags .. '\\n' .. data)
      redis.call('LTRIM', stream, -tonumber(size), -1)
      redis.call('PEXPIRE', stream, tonumber(ttl))
    end
    if idem ~= '' then
      local kept = ''
      if epoch ~= '' then kept = off .. ':' .. epoch end
      redis.call('SET', key, kept, 'PX', tonumber(ARGV[3]))
    end
    out[#out + 1] = 0
    out[#out + 1] = tostring(off)
    out[#out + 1] = epoch
  end
end
return out
"""


#: Compact JSON (no spaces, non-ASCII as is) for publication data, history entries and replies. msgspec's encoder
#: writes the same text as ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False)`` but for a number's exponent
#: (``1e16``, not ``1e+16``: the same JSON value), at a fraction of the cost; encoding was a fifth of this stand-in's
#: CPU (py-spy, ``bench/webhook.py -c 256``), and the stand-in shares a CPU with PostgreSQL there (its CPU per
#: publication: 0.028 -> 0.021-0.024 ms with the request decoded by msgspec too, ``api.read_body``). A value msgspec
#: refuses (a lone surrogate) is written by the standard library, as before.
_FAST_COMPACT = msgspec.json.Encoder()
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def compact(obj: Any) -> str:
    try:
        return _FAST_COMPACT.encode(obj).decode()
    except (TypeError, ValueError, msgspec.MsgspecError):
        return _COMPACT(obj)


class Subscriber(Protocol):
    """A client connection as the hub sees it (``client.Session``)."""

    client_id: str
    user: str

    def push(self, message: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def server_unsubscribe(self, channel: str) -> None: ...


@dataclass(frozen=True)
class Entry:
    """One stored publication: ``data`` and ``tags`` are compact JSON text."""

    offset: int
    ts_ms: float
    tags: str
    data: str

    @classmethod
    def parse(cls, raw: str) -> Entry:
        off, ts, tags, data = raw.split("\n", 3)
        return cls(int(off), float(ts), tags, data)

    def as_json(self, info: str = "") -> str:
        """The client protocol's ``Publication`` as JSON text (``data`` spliced in verbatim)."""
        out = '{"data":' + self.data
        if self.offset:
            out += f',"offset":{self.offset}'
        if self.tags not in ("", "{}"):
            out += ',"tags":' + self.tags
        if info:
            out += ',"info":' + info
        return out + "}"

    def as_dict(self) -> dict[str, Any]:
        """The server API's ``Publication``."""
        pub: dict[str, Any] = {"data": json.loads(self.data), "offset": self.offset}
        tags = json.loads(self.tags)
        if tags:
            pub["tags"] = tags
        return pub


@dataclass(frozen=True)
class Publication:
    """One publication to store and push (the server API's publish parameters, checked)."""

    channel: str
    ns: Namespace
    data: str
    tags: dict[str, str]
    skip_history: bool
    idempotency_key: str
    info: dict[str, Any] | None = None

    @property
    def tags_json(self) -> str:
        return compact(self.tags) if self.tags else "{}"

    def script_row(self) -> list[str]:
        """This publication as the publish script takes it: [channel, data, tags, history size, skip history,
        idempotency key, history TTL (ms)]."""
        skip = self.skip_history or not self.ns.history
        return [self.channel, self.data, self.tags_json, str(max(self.ns.history_size, 1)), "1" if skip else "0",
                self.idempotency_key, str(int(max(self.ns.history_ttl_s, 1) * 1000))]


class Hub:
    """History streams in one Redis, and this process's subscribers."""

    def __init__(self, redis_url: str, config: Config) -> None:
        self.config = config
        self.redis = aredis.Redis.from_url(redis_url, protocol=2, decode_responses=True)
        self._publish = self.redis.register_script(_PUBLISH_LUA)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.subs: dict[str, dict[str, Subscriber]] = {}  # channel -> client id -> subscriber
        self.sessions: dict[str, Subscriber] = {}  # client id -> connection

    def namespace(self, channel: str) -> Namespace:
        """The options of ``channel``'s namespace.

        Raises:
            ApiError: 107 for an empty channel, 102 for an unknown namespace.
        """
        if not channel:
            raise ApiError(*BAD_REQUEST)
        ns = self.config.namespace(channel)
        if ns is None:
            raise ApiError(*UNKNOWN_CHANNEL)
        return ns

    def lock(self, channel: str) -> asyncio.Lock:
        lk = self._locks.get(channel)
        if lk is None:
            lk = self._locks[channel] = asyncio.Lock()
        return lk

    # -- writing ------------------------------------------------------------------------------------------------

    async def publish(self, channel: str, ns: Namespace, data: str, *, tags: dict[str, str], skip_history: bool,
                      idempotency_key: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store (unless history is off or skipped) and push to subscribers; the server API's publish result."""
        pub = Publication(channel, ns, data, tags, skip_history, idempotency_key, info)
        return (await self.publish_many([pub]))[0]

    async def publish_many(self, pubs: list[Publication]) -> list[dict[str, Any]]:
        """:meth:`publish` each, in order, in one call of the publish script (one round trip for a batch's run of
        publish commands; the time stamp and a fresh epoch candidate are taken now, for all of them)."""
        channels = sorted({p.channel for p in pubs})  # one order for every caller: no two batches deadlock
        locks: list[asyncio.Lock] = []
        try:
            for ch in channels:
                lk = self.lock(ch)
                await lk.acquire()
                locks.append(lk)
            flat = await self._publish(args=[str(int(time.time() * 1000)), secrets.token_urlsafe(3)[:4],
                                             str(IDEMPOTENCY_TTL_S * 1000), compact([p.script_row() for p in pubs])])
            results: list[dict[str, Any]] = []
            for p, dup, off, epoch in zip(pubs, flat[0::3], flat[1::3], flat[2::3], strict=True):
                result: dict[str, Any] = {"offset": int(off), "epoch": epoch} if epoch else {}
                if dup == 0 and p.channel in self.subs:
                    entry = Entry(int(off), 0.0, p.tags_json, p.data)
                    self._dispatch(p.channel, entry, compact(p.info) if p.info else "")
                results.append(result)
        finally:
            for lk in locks:
                lk.release()
        return results

    def _dispatch(self, channel: str, entry: Entry, info: str) -> None:
        subs = self.subs.get(channel)
        if not subs:
            return
        msg = '{"push":{"channel":' + compact(channel) + ',"pub":' + entry.as_json(info) + "}}"
        for s in list(subs.values()):
            s.push(msg)

    async def remove_history(self, channel: str) -> None:
        await self.redis.delete(f"{PREFIX}stream:{channel}")

    # -- reading ------------------------------------------------------------------------------------------------

    async def position(self, channel: str) -> tuple[int, str]:
        """The channel's top offset and epoch (a fresh stream gets its epoch now, as Centrifugo's does)."""
        key = f"{PREFIX}meta:{channel}"
        meta = await self.redis.hgetall(key)
        if "epoch" not in meta:
            await self.redis.hsetnx(key, "epoch", secrets.token_urlsafe(3)[:4])
            meta = await self.redis.hgetall(key)
        return int(meta.get("offset", 0)), str(meta["epoch"])

    def _fresh(self, raw: list[str], ns: Namespace) -> list[Entry]:
        oldest_ms = (time.time() - ns.history_ttl_s) * 1000
        return [e for e in map(Entry.parse, raw) if e.ts_ms >= oldest_ms]

    async def after(self, channel: str, ns: Namespace, offset: int, top: int, count: int = -1) -> list[Entry] | None:
        """Publications after ``offset`` (at most ``count`` when positive), or None when some were trimmed or expired.

        The stream's offsets are consecutive, so the range is computed from the first entry's offset.
        """
        if offset >= top:
            return []
        key = f"{PREFIX}stream:{channel}"
        first = await self.redis.lindex(key, 0)
        if first is None:
            return None
        start = max(0, offset + 1 - Entry.parse(str(first)).offset)
        raw = await self.redis.lrange(key, start, start + count - 1 if count > 0 else -1)
        items = self._fresh([str(r) for r in raw], ns)
        if not items or items[0].offset != offset + 1:  # trimmed (maybe meanwhile) or expired past the position
            return None
        return items

    async def history(self, channel: str, ns: Namespace, *, limit: int, since: tuple[int, str] | None,
                      reverse: bool) -> dict[str, Any]:
        """The server API's (and client protocol's) history result.

        Raises:
            ApiError: 108 when the namespace keeps no history, 112 when ``since`` cannot be served.
        """
        if not ns.history:
            raise ApiError(*NOT_AVAILABLE)
        top, epoch = await self.position(channel)
        if limit == 0 and since is None:
            return {"publications": [], "epoch": epoch, "offset": top}
        if since is not None:
            if since[1] != epoch:
                raise ApiError(*UNRECOVERABLE)
            got = await self.after(channel, ns, since[0], top, limit if limit > 0 and not reverse else -1)
            if got is None:
                raise ApiError(*UNRECOVERABLE)
            items = got
        else:
            start, stop = 0, -1
            if limit > 0:  # read only what is asked: streams can be long
                start, stop = (-limit, -1) if reverse else (0, limit - 1)
            raw = await self.redis.lrange(f"{PREFIX}stream:{channel}", start, stop)
            items = self._fresh([str(r) for r in raw], ns)
        if reverse:
            items.reverse()
        if limit > 0:
            items = items[:limit]
        return {"publications": [e.as_dict() for e in items] if limit else [], "epoch": epoch, "offset": top}

    # -- subscribers --------------------------------------------------------------------------------------------

    def add(self, channel: str, sub: Subscriber) -> None:
        self.subs.setdefault(channel, {})[sub.client_id] = sub

    def remove(self, channel: str, sub: Subscriber) -> None:
        subs = self.subs.get(channel)
        if subs is not None:
            subs.pop(sub.client_id, None)
            if not subs:
                del self.subs[channel]

    def presence(self, channel: str) -> dict[str, dict[str, str]]:
        return {cid: {"user": s.user, "client": cid} for cid, s in self.subs.get(channel, {}).items()}

    def stats(self) -> dict[str, int]:
        return {"num_clients": len(self.sessions), "num_users": len({s.user for s in self.sessions.values()}),
                "num_channels": len(self.subs), "num_subs": sum(len(s) for s in self.subs.values())}

    async def aclose(self) -> None:
        await self.redis.aclose()
