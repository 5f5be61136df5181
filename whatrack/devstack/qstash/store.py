"""The offline QStash broker's durable state in Redis: every key under one prefix, every acceptance atomic.

Layout (``P`` = the prefix, default ``qstash:``), chosen so that a broker killed at any instant loses nothing:

    P:msg:<id>            hash  rec (JSON record), body (raw bytes)
    P:live                set   ids of messages not yet finished (delivered, failed or canceled)
    P:due                 zset  id → unix ms when the next attempt is due (scheduled, waiting to run)
    P:lease               zset  id → unix ms when an in-flight attempt's lease runs out; moved back to P:due on
                                restart (at-least-once: an attempt cut by a crash is made again)
    P:events              stream  one JSON event per state change, trimmed to ~EVENTS_MAXLEN
    P:dlq                 zset  dlqId → ms;  P:dlq:<dlqId>  hash rec (record + response), body
    P:dedup:<key>         string  the original publish response, for DEDUP_TTL_S
    P:keys                hash  current, next (signing keys; what is stored wins over the command line)
    P:queues              set   queue names;  P:queue:<name> hash (parallelism, paused, createdAt, updatedAt)
    P:queue:<name>:items  list  FIFO of waiting ids;  P:queue:<name>:active  set  ids taken from the list, not done
    P:schedules           hash  id → JSON;  P:schedule_due  zset  id → ms of the next trigger
    P:topics              hash  URL-group name → JSON
    P:fc                  hash  flow-control key → JSON config;  P:fc:<key>:wait  zset  id → ms (the waitlist)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis

from whatrack.devstack.qstash.model import Record

log = logging.getLogger("whatrack.devstack.qstash.store")

#: QStash's deduplication window is 10 minutes (docs, features/deduplication).
DEDUP_TTL_S = 600
#: How long a finished message stays readable through GET /v2/messages/<id>: the py SDK's tests read a message right
#: after publishing it to an endpoint that answers at once (protocols/qstash.md §4.1). A minute bounds the memory of a
#: load test (1,000 msg/s × 60 s × ~0.5 kB ≈ 30 MB).
FINISHED_GRACE_S = 60
#: Events kept (approximate trim), ~3 per message: a few minutes of a 1,000 msg/s load test in ~60 MB of Redis.
EVENTS_MAXLEN = 200_000

# Dedup check and acceptance in one atomic step: nothing is written unless the dedup key was new, and the dedup key is
# never written without the message (a crash between the two would otherwise lose a message or deliver it twice).
# ARGV: dedup key ("" for none), response, ttl, the layout, the blob: the commands' arguments concatenated in the blob,
# their byte lengths in the layout ("3,4,5;2,4" = two commands of 3 and 2 arguments). Two arguments rather than one
# per word: redis-py encodes and packs every argument on its own, which cost more than the script.
_ACCEPT = """
if ARGV[1] ~= '' then
  local ok = redis.call('SET', ARGV[1], ARGV[2], 'NX', 'EX', ARGV[3])
  if not ok then return redis.call('GET', ARGV[1]) end
end
local blob, pos = ARGV[5], 1
for spec in string.gmatch(ARGV[4], '[^;]+') do
  local args = {}
  for n in string.gmatch(spec, '%d+') do
    local len = tonumber(n)
    args[#args + 1] = string.sub(blob, pos, pos + len - 1)
    pos = pos + len
  end
  redis.call(unpack(args))
end
return false
"""


def _packed(commands: list[list[Any]]) -> tuple[str, bytes]:
    """``(layout, blob)`` of ``commands`` for _ACCEPT. Numbers are written as redis-py writes them (``repr``)."""
    parts: list[bytes] = []
    layout: list[str] = []
    for cmd in commands:
        lens: list[str] = []
        for arg in cmd:
            if isinstance(arg, (bytes, bytearray, memoryview)):
                raw = bytes(arg)
            elif isinstance(arg, str):
                raw = arg.encode()
            elif isinstance(arg, (int, float)) and not isinstance(arg, bool):
                raw = repr(arg).encode()
            else:  # as redis-py: say so rather than store "None" or "True"
                raise TypeError(f"{type(arg).__name__} in the Redis command {cmd[0]}: only bytes, str and numbers")
            parts.append(raw)
            lens.append(str(len(raw)))
        layout.append(",".join(lens))
    return ";".join(layout), b"".join(parts)


# Claim up to ARGV[2] due messages: move them from P:due to P:lease and return, in one round trip, the score of the
# next message due (or ''), of the next schedule trigger (or ''), then (id, rec, body) triples.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {'', ''}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local v = redis.call('HMGET', ARGV[4] .. id, 'rec', 'body')
  if v[1] then
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    table.insert(out, id); table.insert(out, v[1]); table.insert(out, v[2] or '')
  end
end
local nd = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if nd[2] then out[1] = nd[2] end
local ns = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if ns[2] then out[2] = ns[2] end
return out
"""

# Move queue heads to P:due while the queue is not paused and has fewer than `parallelism` active messages.
_PUMP = """
local meta = redis.call('HMGET', KEYS[1], 'parallelism', 'paused')
if meta[2] == '1' then return 0 end
local par = tonumber(meta[1] or '1')
local moved = 0
while redis.call('SCARD', KEYS[3]) < par do
  local id = redis.call('LPOP', KEYS[2])
  if not id then break end
  local rec = redis.call('HGET', ARGV[2] .. id, 'rec')
  if rec then
    local nb = cjson.decode(rec)['notBefore'] or 0
    local due = math.max(nb, tonumber(ARGV[1]))
    redis.call('SADD', KEYS[3], id)
    redis.call('ZADD', KEYS[4], due, id)
    moved = moved + 1
  end
end
return moved
"""


class GroupCommit:
    """Group commit: writes submitted while one transaction is in flight go together in the next one.

    Each caller's commands stay atomic (the whole group is one MULTI/EXEC) and the caller gets its own results. Under
    load this turns one Redis round trip per delivery outcome or publish into one per group; idle, it adds nothing.
    """

    def __init__(self, client: Any) -> None:
        self.r = client
        self._pending: list[tuple[list[list[Any]], asyncio.Future[list[Any]]]] = []
        self._task: asyncio.Task[None] | None = None
        self.groups = 0
        self.writes = 0

    async def run(self, commands: list[list[Any]]) -> list[Any]:
        """Execute ``commands`` atomically; returns their results (errors as exception objects).

        Raises:
            redis.RedisError: the transaction as a whole failed (connection lost): nothing of it was applied.
        """
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((commands, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            try:
                async with self.r.pipeline(transaction=True) as pipe:
                    for commands, _ in group:
                        for cmd in commands:
                            pipe.execute_command(*cmd)
                    results = await pipe.execute(raise_on_error=False)
            except Exception as e:  # the whole group failed: every caller sees it and nothing was applied
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.groups += 1
            self.writes += len(group)
            i = 0
            for commands, fut in group:
                if not fut.done():
                    fut.set_result(results[i:i + len(commands)])
                i += len(commands)


@dataclass
class Claimed:
    """What one claim returned: leased messages, and the next due times (unix ms) of messages and schedules."""

    items: list[tuple[str, Record, bytes]]
    next_due: int | None
    next_schedule: int | None


class Store:
    """Typed access to the broker's Redis keys. One instance per broker; ``client`` returns bytes."""

    def __init__(self, client: aredis.Redis, prefix: str = "qstash:") -> None:
        # redis-py's asyncio stubs declare the sync return types (str | bytes unions, non-awaitables): typed as Any
        # here, with the decoding done at each call site, rather than a cast at every one.
        self.r: Any = client
        self.p = prefix
        self.group = GroupCommit(client)
        self._accept = client.register_script(_ACCEPT)
        self._claim = client.register_script(_CLAIM)
        self._pump = client.register_script(_PUMP)

    # key names -------------------------------------------------------------------------------------------------
    def k(self, *parts: str) -> str:
        return self.p + ":".join(parts)

    # messages --------------------------------------------------------------------------------------------------
    def message_commands(self, rec: Record, body: bytes) -> list[list[Any]]:
        """The writes that accept one message: stored, live, and either due or waiting in its queue."""
        mid = rec["messageId"]
        cmds: list[list[Any]] = [["HSET", self.k("msg", mid), "rec", json.dumps(rec), "body", body],
                                 ["SADD", self.k("live"), mid]]
        queue = rec.get("queueName")
        if queue:  # enqueue creates a missing queue (parallelism 1, running)
            qkey = self.k("queue", queue)
            cmds += [["SADD", self.k("queues"), queue], ["HSETNX", qkey, "parallelism", 1],
                     ["HSETNX", qkey, "paused", "0"], ["HSETNX", qkey, "createdAt", rec["createdAt"]],
                     ["HSETNX", qkey, "updatedAt", rec["createdAt"]],
                     ["RPUSH", self.k("queue", queue, "items"), mid]]
        else:
            cmds.append(["ZADD", self.k("due"), rec["notBefore"], mid])
        return cmds

    def event_command(self, ev: Record) -> list[Any]:
        return ["XADD", self.k("events"), "MAXLEN", "~", EVENTS_MAXLEN, "*", "e", json.dumps(ev)]

    async def accept(self, commands: list[list[Any]], dedup: str | None, response: Any) -> Any | None:
        """Run ``commands`` atomically unless ``dedup`` was seen in the window; then return the earlier response."""
        layout, blob = _packed(commands)
        # EVAL (not EVALSHA) so that the group commit never meets NOSCRIPT after a Redis restart.
        (found,) = await self.group.run([["EVAL", _ACCEPT, 0, self.k("dedup", dedup) if dedup else "",
                                          json.dumps(response), DEDUP_TTL_S, layout, blob]])
        if isinstance(found, Exception):
            raise found
        return json.loads(found) if found else None

    async def apply(self, commands: list[list[Any]]) -> None:
        """Run ``commands`` atomically as one script: one command in the group commit, not one per write (redis-py
        packs and parses every command of a MULTI/EXEC on its own: most of the broker's Redis CPU per message).

        Raises:
            redis.RedisError: nothing (connection lost) or, for a failing command, only the commands before it applied.
        """
        (res,) = await self.group.run([["EVAL", _ACCEPT, 0, "", "", 0, *_packed(commands)]])
        if isinstance(res, Exception):
            raise res

    async def claim(self, now: int, count: int, lease_until: int) -> Claimed:
        """Lease up to ``count`` due messages; also say when the next message and the next schedule are due."""
        flat = await self._claim(keys=[self.k("due"), self.k("lease"), self.k("schedule_due")],
                                 args=[now, count, lease_until, self.k("msg", "")])
        items = [(flat[i].decode(), json.loads(flat[i + 1]), bytes(flat[i + 2])) for i in range(2, len(flat), 3)]
        return Claimed(items, int(float(flat[0])) if flat[0] else None, int(float(flat[1])) if flat[1] else None)

    async def get_message(self, mid: str) -> tuple[Record, bytes] | None:
        rec, body = await self.r.hmget(self.k("msg", mid), ["rec", "body"])
        return (json.loads(rec), bytes(body or b"")) if rec else None

    async def recover(self) -> int:
        """After a restart: every leased (in-flight at the crash) and wait-listed message becomes due now."""
        moved = 0
        leased = await self.r.zrange(self.k("lease"), 0, -1, withscores=True)
        fc_waits = [k async for k in self.r.scan_iter(match=self.k("fc", "*", "wait"))]
        now = int(time.time() * 1000)
        async with self.r.pipeline(transaction=True) as pipe:
            for mid, _lease_end in leased:  # due now: the attempt they were in was cut short
                pipe.zadd(self.k("due"), {mid: now}, nx=True)
                moved += 1
            pipe.delete(self.k("lease"))
            for wkey in fc_waits:
                for mid, score in await self.r.zrange(wkey, 0, -1, withscores=True):
                    pipe.zadd(self.k("due"), {mid: score}, nx=True)
                    moved += 1
                pipe.delete(wkey)
            await pipe.execute()
        return moved

    async def expired_leases(self, now: int) -> list[str]:
        return [m.decode() for m in await self.r.zrangebyscore(self.k("lease"), "-inf", now)]

    async def pump_queue(self, name: str, now: int) -> int:
        return int(await self._pump(keys=[self.k("queue", name), self.k("queue", name, "items"),
                                          self.k("queue", name, "active"), self.k("due")],
                                    args=[now, self.k("msg", "")]))

    # events ----------------------------------------------------------------------------------------------------
    async def events_page(self, cursor: str | None, chunk: int) -> list[tuple[str, Record]]:
        """Events newest first, strictly older than ``cursor`` (a stream id)."""
        top = f"({cursor}" if cursor else "+"
        rows = await self.r.xrevrange(self.k("events"), max=top, min="-", count=chunk)
        return [(rid.decode(), json.loads(fields[b"e"])) for rid, fields in rows]

    # small JSON hashes -----------------------------------------------------------------------------------------
    async def hget_json(self, key: str, field: str) -> Record | None:
        raw = await self.r.hget(key, field)
        return json.loads(raw) if raw else None

    async def hall_json(self, key: str) -> dict[str, Record]:
        return {k.decode(): json.loads(v) for k, v in (await self.r.hgetall(key)).items()}

    async def hset_json(self, key: str, field: str, value: Record) -> None:
        await self.r.hset(key, field, json.dumps(value))
