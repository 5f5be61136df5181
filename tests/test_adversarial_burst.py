"""A burst of 10,000 forged deliveries over real HTTP with valid, signed deliveries interleaved: every forged one is a
401 and stores nothing, every valid one is stored exactly once. No timing threshold: the rates are printed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from adversarial_support import ROTATED_OUT, Endpoint, fresh_endpoint, integrity_violations

from whatrack.devstack import servers
from whatrack.metrics import parse

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

N_FORGED = 10_000
VALID_EVERY = 100  # one valid delivery per 100 forged: 100 valid ones spread over the whole burst
CONCURRENCY = 16


class RawClient:
    """One keep-alive HTTP/1.1 connection driven by hand: an attacker's client costs next to nothing per request, so
    the burst measures the endpoint, not httpx."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
        self.reader, self.writer, self.path = reader, writer, path

    @classmethod
    async def open(cls, url: str) -> RawClient:
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, "/" + path)

    async def post(self, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.writer.write(f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ep(pg_admin_url: str, redis_server: servers.RedisServer, fixtures_dir: Path) -> AsyncIterator[Endpoint]:
    async with fresh_endpoint(pg_admin_url, redis_server.url, fixtures_dir) as e:
        yield e


async def test_forged_burst_keeps_valid_deliveries_flowing(ep: Endpoint) -> None:
    base = ep.fixture("messages_inbound_text.json")

    def body(i: int) -> bytes:
        d = copy.deepcopy(base)
        mid = f"BURST{i:08d}"
        d["message"].update(messageid=mid, id=f"{d['owner']}:{mid}")
        return json.dumps(d).encode()

    forged_body = body(-1)
    # What an attacker without the keys can send: a rotated-out key, a replayed (expired) token, garbage, nothing.
    forged_headers = [
        [("Upstash-Signature", ep.sign(forged_body, ROTATED_OUT))],
        [("Upstash-Signature", ep.sign(forged_body, now=int(time.time()) - 600))],
        [("Upstash-Signature", "eyJhbGciOiJIUzI1NiJ9.e30.AAAA")],
        [],
    ]
    plan: list[tuple[str, int]] = []
    for i in range(N_FORGED):
        if i % VALID_EVERY == VALID_EVERY // 2:
            plan.append(("valid", i))
        plan.append(("forged", i))
    todo = iter(plan)
    statuses: Counter[str] = Counter()
    valid_ids: list[str] = []
    valid_latency: list[float] = []

    async def worker() -> None:
        c = await RawClient.open(ep.url)
        try:
            for kind, i in todo:
                if kind == "forged":
                    status, _ = await c.post(forged_body, forged_headers[i % len(forged_headers)])
                    statuses[f"forged {status}"] += 1
                else:
                    b = body(i)
                    t = time.perf_counter()
                    status, answer = await c.post(b, [("Upstash-Signature", ep.sign(b))])
                    valid_latency.append(time.perf_counter() - t)
                    statuses[f"valid {status} {json.loads(answer).get('status')}"] += 1
                    valid_ids.append(f"BURST{i:08d}")
        finally:
            await c.close()

    # baseline in the same run: valid deliveries alone, one at a time
    base_lat = []
    c0 = await RawClient.open(ep.url)
    for i in range(20):
        b = body(N_FORGED + i)
        t = time.perf_counter()
        assert (await c0.post(b, [("Upstash-Signature", ep.sign(b))]))[0] == 200
        base_lat.append(time.perf_counter() - t)
    await c0.close()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    async with httpx.AsyncClient(timeout=60) as c:
        metrics = parse(await ep.metrics_text(c))

    n_valid = len(plan) - N_FORGED
    assert statuses == {"forged 401": N_FORGED, "valid 200 stored": n_valid}, statuses
    assert metrics['whatrack_webhooks_total{outcome="rejected_signature"}'] == N_FORGED
    rows = await ep.store.message_rows()
    stored = Counter(r["external_id"] for r in rows)
    assert all(stored[i] == 1 for i in valid_ids) and len(valid_ids) == n_valid
    assert sum(stored.values()) == n_valid + 20  # + the baseline deliveries: nothing from the forged ones
    assert await integrity_violations(ep.store) == {}
    print(f"\nburst: {N_FORGED} forged + {n_valid} valid in {elapsed:.1f} s = {len(plan) / elapsed:.0f} req/s "
          f"({CONCURRENCY} keep-alive connections, raw client in the server's process); valid latency median "
          f"{statistics.median(valid_latency) * 1e3:.0f} ms during the burst vs {statistics.median(base_lat) * 1e3:.0f}"
          f" ms alone (ratio {statistics.median(valid_latency) / statistics.median(base_lat):.1f}x)")

