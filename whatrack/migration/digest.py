"""Server-side digests for verify: one Lua script per batch returns (type, pttl, length, digest) for every key, so
verify moves 4 small values per key instead of every value.

Ordered types (string, list, zset, stream) hash their canonical encoding; unordered ones (set, hash) add up
per-element SHA-1s (a 128-bit multiset sum), because iteration order differs between servers and Lua's string
comparison follows the server's locale. Keys longer than ``limit`` get no digest here (the script would block the
server too long): the caller digests those in chunks on the client.
"""

from __future__ import annotations

from typing import Any

import redis

_SCRIPT = r"""
local limit = tonumber(ARGV[1])
local function enc(s) return #s .. ':' .. s end
local function ordered(items)
  local parts = {}
  for i, x in ipairs(items) do parts[i] = enc(x) end
  return redis.sha1hex(table.concat(parts))
end
local function msum(acc, s)
  local h = redis.sha1hex(s)
  for j = 0, 3 do
    acc[j + 1] = (acc[j + 1] + tonumber(string.sub(h, j * 8 + 1, j * 8 + 8), 16)) % 4294967296
  end
end
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
  return nil
end
local out = {}
for _, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  local pttl = redis.call('PTTL', k)
  local n, d = 0, ''
  if t == 'string' then
    n = redis.call('STRLEN', k)
    d = redis.sha1hex(redis.call('GET', k))
  elseif t == 'list' then
    n = redis.call('LLEN', k)
    if n <= limit then d = ordered(redis.call('LRANGE', k, 0, -1)) end
  elseif t == 'zset' then
    n = redis.call('ZCARD', k)
    if n <= limit then
      local r = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
      for i = 2, #r, 2 do r[i] = string.format('%.17g', tonumber(r[i])) end
      d = ordered(r)
    end
  elseif t == 'set' or t == 'hash' then
    n = redis.call(t == 'set' and 'SCARD' or 'HLEN', k)
    if n <= limit then
      local acc = {0, 0, 0, 0}
      if t == 'set' then
        for _, m in ipairs(redis.call('SMEMBERS', k)) do msum(acc, enc(m)) end
      else
        local r = redis.call('HGETALL', k)
        for i = 1, #r, 2 do msum(acc, enc(r[i]) .. enc(r[i + 1])) end
      end
      d = string.format('%08x%08x%08x%08x', acc[1], acc[2], acc[3], acc[4])
    end
  elseif t == 'stream' then
    n = redis.call('XLEN', k)
    if n <= limit then
      local parts = {}
      for _, e in ipairs(redis.call('XRANGE', k, '-', '+')) do
        parts[#parts + 1] = enc(e[1])
        for _, x in ipairs(e[2]) do parts[#parts + 1] = enc(x) end
      end
      parts[#parts + 1] = enc(field(redis.call('XINFO', 'STREAM', k), 'last-generated-id'))
      for _, g in ipairs(redis.call('XINFO', 'GROUPS', k)) do
        parts[#parts + 1] = enc(field(g, 'name')) .. enc(field(g, 'last-delivered-id')) ..
          enc(tostring(field(g, 'pending')))
      end
      d = redis.sha1hex(table.concat(parts))
    end
  end
  out[#out + 1] = t .. ' ' .. pttl .. ' ' .. n .. ' ' .. d
end
-- one bulk string per batch: parsing 4 nested replies per key costs the Python client more than the digests
return table.concat(out, '\n')
"""


class Digester:
    """The digest script registered on one client (EVALSHA after the first call)."""

    def __init__(self, client: redis.Redis, limit: int) -> None:
        self.limit = limit
        self._script = client.register_script(_SCRIPT)

    def __call__(self, keys: list[bytes]) -> list[tuple[str, int, int, str | None]]:
        """(type, pttl ms, length, digest or None when the key is longer than ``limit``) for every key."""
        if not keys:
            return []
        reply: Any = self._script(keys=keys, args=[self.limit])
        out = []
        for line in _text(reply).split("\n"):
            t, pttl, n, d = line.split(" ")
            out.append((t, int(pttl), int(n), d or None))
        return out


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


_EXISTS = r"""
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('EXISTS', k) end
return table.concat(out)
"""


class Exists:
    """Which of a batch of keys exist, as one string of 0/1 from one script call."""

    def __init__(self, client: redis.Redis) -> None:
        self._script = client.register_script(_EXISTS)

    def __call__(self, keys: list[bytes]) -> list[bool]:
        if not keys:
            return []
        reply: Any = self._script(keys=keys)
        return [c == "1" for c in _text(reply)]
