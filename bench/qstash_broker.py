"""Publish → delivery messages per second through the offline QStash broker, against a bare baseline in the same run.

Three processes on this machine: a Redis, a receiver (uvicorn, counts POSTs, answers 200), and the broker
(``python -m whatrack.devstack.qstash.broker``, as ``whatrack stack up`` runs it). Two measurements, same N, same
concurrency:

- **bare**: ``bench/httpload.py`` (a lean raw-socket client, its own process) POSTs N bodies straight to the receiver:
  what delivering costs with no broker at all, the honest ceiling;
- **broker**: this process publishes N messages to the receiver's URL with the official ``AsyncQStash`` client
  (``--batch K`` uses ``batch`` requests of K messages instead), and the clock stops when the receiver has counted N
  deliveries (each one persisted, signed, delivered and recorded by the broker).

Prints both rates, the ratio broker/bare and the CPU per message of each process (steadier than rates on a shared
machine). Usage: ``python bench/qstash_broker.py [-n 5000] [-c 64] [--batch 0]``. The open-loop sweep through the
broker with the real endpoint is ``bench/e2e.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whatrack.devstack import servers  # noqa: E402
from whatrack.devstack.qstash.broker import DEV_TOKEN  # noqa: E402


def serve_receiver(port: int) -> None:
    """The receiver process: POST anywhere counts and answers 200; GET /count tells the count."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    count = 0

    async def hit(request: Request) -> PlainTextResponse:
        nonlocal count
        await request.body()
        count += 1
        return PlainTextResponse("ok")

    async def get_count(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(count))

    app = Starlette(routes=[Route("/count", get_count), Route("/{p:path}", hit, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_http(url: str, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within 60 s")


async def count(client: httpx.AsyncClient, base: str) -> int:
    return int((await client.get(base + "/count")).text)


def bare(port: int, n: int, conc: int, tmp: Path) -> tuple[float, float]:
    """``bench/httpload.py`` closed loop, ``conc`` connections: (messages/s, client CPU ms per message)."""
    import json
    import pickle

    from httpload import build_request  # bench/ is on sys.path when this file runs as a script

    reqs, out = Path(tmp) / "requests.pickle", Path(tmp) / "result.json"
    reqs.write_bytes(pickle.dumps([build_request("127.0.0.1", port, "/bare", b'{"i": %d}' % i, {})
                                   for i in range(n)]))
    subprocess.run([sys.executable, str(ROOT / "bench" / "httpload.py"), str(reqs), str(out), "127.0.0.1", str(port),
                    str(conc), "0"], check=True)
    r = json.loads(out.read_text())
    if r["statuses"].get("200", 0) != n:
        raise SystemExit(f"bare run: not every POST got a 200: {r['statuses']}, {r['errors']} errors")
    return n / r["elapsed"], r["cpu_s"] * 1e3 / n


async def through_broker(broker: str, base: str, n: int, conc: int, batch: int) -> tuple[float, float]:
    from qstash import AsyncQStash

    qs = AsyncQStash(DEV_TOKEN, base_url=broker)
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=60) as c:
        start_count = await count(c, base)

        async def one(i: int) -> None:
            async with sem:
                await qs.message.publish_json(url=f"{base}/hook", body={"i": i})

        async def many(first: int) -> None:
            async with sem:
                await qs.message.batch_json([{"url": f"{base}/hook", "body": {"i": i}}
                                             for i in range(first, min(n, first + batch))])

        t0 = time.perf_counter()
        if batch:
            await asyncio.gather(*(many(i) for i in range(0, n, batch)))
        else:
            await asyncio.gather(*(one(i) for i in range(n)))
        published = time.perf_counter() - t0
        while await count(c, base) - start_count < n:
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    await qs.http._client.aclose()
    return n / published, n / elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=5000, help="messages per measurement")
    p.add_argument("-c", type=int, default=64, help="concurrent requests from this process")
    p.add_argument("--batch", type=int, default=0, help="publish with batch requests of this many messages")
    p.add_argument("--serve-receiver", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_receiver:
        serve_receiver(args.serve_receiver)
        return 0
    with tempfile.TemporaryDirectory() as tmp, servers.RedisServer(Path(tmp) / "redis") as redis_server:
        rport, bport = servers.free_port(), servers.free_port()
        receiver = spawn([__file__, "--serve-receiver", str(rport)])
        env = {**os.environ, "QSTASH_TOKEN": DEV_TOKEN}
        broker = spawn(["-m", "whatrack.devstack.qstash.broker", "--port", str(bport), "--redis-url",
                        redis_server.url], env=env)
        try:
            base, burl = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{bport}"
            wait_http(base + "/count")
            wait_http(burl + "/v2/keys", {"Authorization": f"Bearer {DEV_TOKEN}"})
            bare(rport, min(500, args.n), args.c, Path(tmp))  # warm-up: connections, imports, caches
            rcpu = psutil.Process(receiver.pid)
            r0 = rcpu.cpu_times()
            bare_rate, client_ms = bare(rport, args.n, args.c, Path(tmp))
            r1 = rcpu.cpu_times()
            bcpu = psutil.Process(broker.pid)
            b0 = bcpu.cpu_times()
            pub_rate, e2e_rate = asyncio.run(through_broker(burl, base, args.n, args.c, args.batch))
            b1 = bcpu.cpu_times()
        finally:
            for proc in (broker, receiver):
                proc.terminate()
                proc.wait(30)
    mode = f"batch of {args.batch}" if args.batch else "one publish per message"
    print(f"N={args.n} concurrency={args.c} ({mode}), cores={os.cpu_count()}")
    print(f"bare  httpload → receiver:              {bare_rate:8.0f} msg/s")
    print(f"broker publish accepted (persisted):    {pub_rate:8.0f} msg/s")
    print(f"broker publish → delivered (end to end): {e2e_rate:8.0f} msg/s")
    print(f"ratio end-to-end / bare:                {e2e_rate / bare_rate:8.2f}")
    # CPU per message is steadier than rates on a shared machine: it does not depend on what else runs.
    broker_ms = ((b1.user + b1.system) - (b0.user + b0.system)) * 1000 / args.n
    receiver_ms = ((r1.user + r1.system) - (r0.user + r0.system)) * 1000 / args.n
    print(f"CPU per message: broker {broker_ms:.2f} ms (accept + persist + sign + deliver + record); for scale, "
          f"bare client {client_ms:.2f} ms per POST, receiver {receiver_ms:.2f} ms per request")
    return 0


if __name__ == "__main__":
    from whatrack.cli import run_script

    run_script(main)  # SIGTERM (timeout, CI) stops the servers it started, as Ctrl-C does
