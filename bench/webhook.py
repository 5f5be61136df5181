"""Messages per second through the webhook endpoint over HTTP, against a bare-insert baseline in the same run.

Two uvicorn servers (one worker each, the same machine, the same PostgreSQL) take the same number of signed,
unique UAZAPI message deliveries at the same concurrency:

- **full**: the real endpoint: verify the QStash signature (official Receiver) → normalize → resolve the instance →
  store lead/conversation/ticket/message idempotently → publish to Centrifugo (the devstack stand-in) → 200;
- **bare**: the same framework answering each request with one plain INSERT of the raw body (no verification, no
  normalization, no realtime).

Prints both rates and the ratio full/bare (the goal is ≥ 0.5). Usage: ``python bench/webhook.py [-n 3000] [-c 64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whatrack.devstack import servers  # noqa: E402
from whatrack.devstack.qstash.sign import sign  # noqa: E402
from whatrack.settings import WEBHOOK_PATH  # noqa: E402

KEY_CURRENT = "sig_benchCurrentKey00000000000000"
KEY_NEXT = "sig_benchNextKey000000000000000000"
CENT_KEY = "bench-centrifugo-key"
FIXTURE = ROOT / "whatrack" / "fixtures" / "uazapi" / "messages_inbound_text.json"


def bodies(n: int, leads: int = 200) -> list[bytes]:
    base = json.loads(FIXTURE.read_text())
    out = []
    for i in range(n):
        d = json.loads(json.dumps(base))
        mid = uuid.uuid4().hex.upper()
        phone = f"55119{(i % leads):08d}"
        d["message"]["messageid"] = mid
        d["message"]["id"] = f"{d['owner']}:{mid}"
        d["message"]["chatid"] = f"{phone}@s.whatsapp.net"
        d["message"]["text"] = f"bench message {i}"
        d["chat"]["phone"] = phone
        d["chat"]["wa_chatid"] = f"{phone}@s.whatsapp.net"
        out.append(json.dumps(d).encode())
    return out


# -- servers (run as subprocesses: `python bench/webhook.py --serve full|bare ...`) --------------------------------

def serve(kind: str, port: int, db_url: str, cent_url: str) -> None:
    import uvicorn

    from whatrack.settings import Settings

    if kind == "full":
        from whatrack.webhook.app import create_app

        env = {
            "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": KEY_CURRENT, "QSTASH_NEXT_SIGNING_KEY": KEY_NEXT,
            "WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
            "CENTRIFUGO_API_URL": cent_url, "CENTRIFUGO_API_KEY": CENT_KEY,
        }
        app = create_app(Settings.from_env(env, env_files=()))
    else:
        from sqlalchemy import text
        from sqlalchemy.ext.asyncio import create_async_engine
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        engine = create_async_engine(Settings.from_env({"DATABASE_URL": db_url}, env_files=()).database_url or "",
                                     pool_size=10)

        async def bare(request: Request) -> JSONResponse:
            body = await request.body()
            async with engine.begin() as conn:
                await conn.execute(text("INSERT INTO bench_bare (id, body) VALUES (:id, :body)"),
                                   {"id": uuid.uuid4().hex, "body": body.decode()})
            return JSONResponse({"status": "stored"})

        app = Starlette(routes=[Route(WEBHOOK_PATH, bare, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- load ---------------------------------------------------------------------------------------------------------

async def load(url: str, reqs: list[tuple[bytes, str]], concurrency: int) -> tuple[float, list[float], int]:
    """POST every request with ``concurrency`` in flight; (requests/s, latencies, non-200 count).

    The client is aiohttp: httpx's connection pool degrades badly with many connections (measured here: 86 req/s
    at 64 connections against a trivial endpoint, where aiohttp does 2,700), which would make the client the
    bottleneck of both measurements.
    """
    import aiohttp

    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker() -> None:
            nonlocal errors
            while True:
                try:
                    body, sig = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                async with client.post(url, data=body, headers={"Upstash-Signature": sig,
                                                                 "Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(reqs) / elapsed, latencies, errors


def start_server(kind: str, db_url: str, cent_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port), "--db", db_url,
                             "--cent", cent_url], cwd=ROOT)
    servers.wait_for_port("127.0.0.1", port, timeout=30)
    return proc, port


@contextlib.contextmanager
def centrifugo_process(tmp: Path) -> Iterator[str]:
    """The devstack's Centrifugo stand-in as its own process (history in a Redis of its own)."""
    with servers.RedisServer(tmp / "cent-redis") as redis_server:
        port = servers.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "whatrack.devstack.centrifugo", "--port", str(port),
                                 "--redis-url", redis_server.url], env={**os.environ, "CENTRIFUGO_API_KEY": CENT_KEY})
        try:
            servers.wait_for_port("127.0.0.1", port, timeout=30)
            yield f"http://127.0.0.1:{port}/api"
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("-c", "--concurrency", type=int, default=64)
    ap.add_argument("--serve")
    ap.add_argument("--port", type=int)
    ap.add_argument("--db")
    ap.add_argument("--cent")
    a = ap.parse_args()
    if a.serve:
        serve(a.serve, a.port, a.db, a.cent)
        return

    import tempfile

    import psycopg

    from whatrack.store.api import Store

    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    tmp = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    pg = None
    if not servers.postgres_answers(admin):
        pg = servers.EmbeddedPostgres(tmp / "pg").start()
        admin = pg.url
    dbname = f"bench_webhook_{uuid.uuid4().hex[:8]}"
    db_url = servers.create_database(admin, dbname)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_bare (id text PRIMARY KEY, body text NOT NULL)")
        base = json.loads(FIXTURE.read_text())

        async def prepare() -> None:
            store = Store.from_url("postgresql+psycopg://" + db_url.split("://", 1)[1])
            await store.upgrade()
            await store.register_instance("bench", base["instanceName"], base["token"], owner=base["owner"])
            await store.aclose()

        asyncio.run(prepare())
        with centrifugo_process(tmp) as cent_url:
            results = {}
            for kind in ("bare", "full"):
                proc, port = start_server(kind, db_url, cent_url)
                procs.append(proc)
                url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
                warm = [(b, sign(b, url, KEY_CURRENT)) for b in bodies(200)]
                asyncio.run(load(url, warm, a.concurrency))
                reqs = [(b, sign(b, url, KEY_CURRENT)) for b in bodies(a.n)]
                rate, lat, errors = asyncio.run(load(url, reqs, a.concurrency))
                lat.sort()
                results[kind] = rate
                print(f"{kind:>4}: {rate:8.0f} msg/s  p50 {statistics.median(lat) * 1e3:6.1f} ms  "
                      f"p99 {lat[int(len(lat) * 0.99)] * 1e3:6.1f} ms  errors {errors}  (n={a.n}, c={a.concurrency})")
                proc.terminate()
                proc.wait(10)
        print(f"ratio full/bare: {results['full'] / results['bare']:.2f}  (goal >= 0.5; {os.cpu_count()} cores, "
              "client, server and PostgreSQL on the same machine)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        servers.drop_database(admin, dbname)
        if pg:
            pg.stop()


if __name__ == "__main__":
    main()
