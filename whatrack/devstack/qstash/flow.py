"""Flow control for the offline QStash broker: per-key parallelism and rate limits with a waitlist.

Limits come from the newest message carrying the key unless pinned; pause, pins and limits persist in ``P:fc``; the
counters (in flight, sent this period) live in memory because a restart returns every in-flight message to the due
set anyway (qstash_store.Store.recover).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from whatrack.devstack.qstash.model import Record
from whatrack.devstack.qstash.store import Store


@dataclass
class KeyState:
    """One flow-control key: its limits (0 = unlimited), flags and live counters."""

    key: str
    parallelism_max: int = 0
    rate_max: int = 0
    rate_period: int = 1
    paused: bool = False
    pinned_parallelism: bool = False
    pinned_rate: bool = False
    in_flight: int = 0
    rate_count: int = 0
    period_start: float = 0.0

    def config(self) -> Record:
        return {"parallelismMax": self.parallelism_max, "rateMax": self.rate_max, "ratePeriod": self.rate_period,
                "isPaused": self.paused, "isPinnedParallelism": self.pinned_parallelism,
                "isPinnedRate": self.pinned_rate}

    def roll(self, now: float) -> None:
        """Start a new rate period when the current one is over."""
        if now - self.period_start >= self.rate_period:
            self.period_start = now
            self.rate_count = 0

    def blocked(self, now: float) -> bool:
        self.roll(now)
        if self.paused:
            return True
        if self.parallelism_max and self.in_flight >= self.parallelism_max:
            return True
        return bool(self.rate_max and self.rate_count >= self.rate_max)

    def period_end(self) -> float:
        return self.period_start + self.rate_period


class FlowControl:
    """All flow-control keys of a broker."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys: dict[str, KeyState] = {}
        self.waiting: set[str] = set()  # keys whose waitlist may be non-empty

    async def load(self) -> None:
        for key, cfg in (await self.store.hall_json(self.store.k("fc"))).items():
            self.keys[key] = KeyState(key, cfg.get("parallelismMax", 0), cfg.get("rateMax", 0),
                                      cfg.get("ratePeriod", 1), cfg.get("isPaused", False),
                                      cfg.get("isPinnedParallelism", False), cfg.get("isPinnedRate", False))

    async def save(self, ks: KeyState) -> None:
        await self.store.hset_json(self.store.k("fc"), ks.key, ks.config())

    def get(self, key: str) -> KeyState:
        ks = self.keys.get(key)
        if ks is None:
            ks = self.keys[key] = KeyState(key, period_start=time.time())
        return ks

    async def observe(self, rec: Record) -> None:
        """A message with a key was accepted: adopt its limits unless they are pinned."""
        ks = self.get(rec["flowControlKey"])
        before = ks.config()
        if not ks.pinned_parallelism:
            ks.parallelism_max = rec.get("parallelism") or 0
        if not ks.pinned_rate:
            ks.rate_max = rec.get("rate") or 0
            ks.rate_period = rec.get("period") or 1
        if ks.config() != before:
            await self.save(ks)

    def start(self, key: str) -> None:
        ks = self.get(key)
        ks.in_flight += 1
        ks.rate_count += 1

    def finish(self, key: str) -> None:
        ks = self.get(key)
        ks.in_flight = max(0, ks.in_flight - 1)

    def wait_key(self, key: str) -> str:
        return self.store.k("fc", key, "wait")

    async def park(self, key: str, mid: str, due: int) -> None:
        """Move a claimed message from the lease set to its key's waitlist."""
        async with self.store.r.pipeline(transaction=True) as pipe:
            pipe.zadd(self.wait_key(key), {mid: due})
            pipe.zrem(self.store.k("lease"), mid)
            await pipe.execute()
        self.waiting.add(key)

    async def release(self, now: float) -> float | None:
        """Move waiting messages back to due as far as the limits allow; returns when a rate period ends, if due."""
        wake: float | None = None
        for key in list(self.waiting):
            ks = self.get(key)
            wkey = self.wait_key(ks.key)
            ks.roll(now)
            if ks.paused:
                continue
            room = 1_000_000
            if ks.parallelism_max:
                room = min(room, ks.parallelism_max - ks.in_flight)
            if ks.rate_max:
                room = min(room, ks.rate_max - ks.rate_count)
                if ks.rate_count >= ks.rate_max and await self.store.r.zcard(wkey):
                    wake = ks.period_end() if wake is None else min(wake, ks.period_end())
            if room <= 0:
                continue
            waiting = await self.store.r.zrange(wkey, 0, room - 1, withscores=True)
            if not waiting:
                self.waiting.discard(key)
                continue
            async with self.store.r.pipeline(transaction=True) as pipe:
                for mid, score in waiting:
                    pipe.zrem(wkey, mid)
                    pipe.zadd(self.store.k("due"), {mid: score})
                await pipe.execute()
        return wake

    async def info(self, key: str) -> Record:
        ks = self.get(key)
        ks.roll(time.time())
        return {"flowControlKey": key, "waitListSize": int(await self.store.r.zcard(self.wait_key(key))),
                "parallelismMax": ks.parallelism_max, "parallelismCount": ks.in_flight, "rateMax": ks.rate_max,
                "rateCount": ks.rate_count, "ratePeriod": ks.rate_period, "ratePeriodStart": int(ks.period_start),
                "isPaused": ks.paused, "isPinnedParallelism": ks.pinned_parallelism, "isPinnedRate": ks.pinned_rate}
