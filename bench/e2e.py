"""End to end, offline: messages/s and latency from QStash publish to database commit and to realtime, against a
ceiling measured in the same run.

Both legs run through the same path: the official ``qstash`` client publishes generated UAZAPI webhooks to the
devstack broker, which signs and delivers them to a uvicorn server with K worker processes on the same port:

- **full**: the real endpoint (``whatrack.webhook``): verify → normalize → store (lead, conversation, ticket, message,
  idempotent) → publish to Centrifugo → 200; the loss ledger checks every message;
- **ceiling**: the same uvicorn server answering the same signed deliveries with one bare INSERT of the body
  (no verification, no normalization, no realtime).

Prints sustained messages/s (first publish to last commit), p50/p95/p99/max of publish → commit (and → realtime
for the full leg), and the ratio full/ceiling, with the core count. Goal: >= 1,000 msg/s sustained with p99
publish → commit < 250 ms, nothing lost.

    python bench/e2e.py [-n 3000] [--workers 2] [--concurrency 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whatrack.settings import WEBHOOK_PATH  # noqa: E402

# -- the ceiling app (a uvicorn factory: `uvicorn e2e:bare_app --factory --app-dir bench`) ------------------------

def bare_app() -> Any:
    """One INSERT per delivery, nothing else. The database URL comes from BENCH_DB_URL (bench-only)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    engine = create_async_engine(os.environ["BENCH_DB_URL"], pool_size=10, max_overflow=10)

    async def insert(request: Request) -> JSONResponse:
        body = await request.body()
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO bench_bare (qstash_id, body) VALUES (:q, :b)"),
                               {"q": request.headers.get("upstash-message-id"), "b": body.decode()})
        return JSONResponse({"status": "stored"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route(WEBHOOK_PATH, insert, methods=["POST"]),
                             Route("/healthz", health, methods=["GET"])])


def start_bare(env: dict[str, str], port: int, workers: int, db_url: str) -> subprocess.Popen[bytes]:
    import httpx

    child = dict(os.environ) | {"BENCH_DB_URL": db_url}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "e2e:bare_app", "--factory", "--app-dir",
                             str(ROOT / "bench"), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                             "--log-level", "warning", "--no-access-log"], env=child, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the ceiling server did not start")


# -- the legs -----------------------------------------------------------------------------------------------------

async def ceiling_leg(env: dict[str, str], n: int, concurrency: int, seed: int) -> dict[str, Any]:
    import psycopg

    from whatrack.proof.generate import generate
    from whatrack.proof.load import close_publisher, publish_all
    from whatrack.proof.plots import latency_stats
    from whatrack.qstash import Publisher
    from whatrack.settings import Settings

    libpq = "postgresql://" + env["DATABASE_URL"].split("://", 1)[1]
    publisher = Publisher.from_settings(Settings.from_env(env, env_files=()))
    try:
        webhooks = generate(n, seed=seed)
        t0 = time.time()
        sent = await publish_all(publisher, webhooks, concurrency=concurrency, bar=False)
        at = {s.qstash_id: s.at for s in sent if s.qstash_id}
        deadline = time.monotonic() + 300
        rows: list[tuple[str, float]] = []
        while time.monotonic() < deadline:
            async with await psycopg.AsyncConnection.connect(libpq) as conn:
                cur = await conn.execute("SELECT qstash_id, extract(epoch from created_at) FROM bench_bare "
                                         "WHERE qstash_id = ANY(%s)", (list(at),))
                rows = [(q, float(t)) for q, t in await cur.fetchall()]
            if len(rows) >= len(at):
                break
            await asyncio.sleep(0.25)
    finally:
        await close_publisher(publisher)
    last = max((t for _, t in rows), default=t0)
    lat = latency_stats((t - at[q]) * 1e3 for q, t in rows if q in at)
    return {"messages": len(rows), "per_s": len(rows) / max(last - t0, 1e-9), "commit": lat,
            "accepted_per_s": len(sent) / max(max(s.at for s in sent) - t0, 1e-9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("-n", type=int, default=3000, help="messages per leg")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (both legs)")
    ap.add_argument("--concurrency", type=int, default=48, help="publishes in flight")
    ap.add_argument("--through-proxies", action="store_true",
                    help="keep the stack's fault proxies in front of PostgreSQL and Centrifugo (default: bypass)")
    a = ap.parse_args()

    import logging

    import psycopg

    from whatrack.devstack.stack import running_stack
    from whatrack.proof.load import EndpointProcess, LoadConfig, run_load
    from whatrack.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, \
            running_stack(Path(tmp) / "stack", parts=["qstash", "postgres", "centrifugo"]) as st:
        env = st.env()
        if not a.through_proxies:  # measure the product, not our Python TCP proxies
            parts = json.loads((Path(tmp) / "stack" / "state.json").read_text())["parts"]
            env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{parts['postgres']['port']}/whatrack"
            env["CENTRIFUGO_API_URL"] = f"http://127.0.0.1:{parts['centrifugo']['port']}/api"
        settings = Settings.from_env(env, env_files=())
        libpq = "postgresql://" + env["DATABASE_URL"].split("://", 1)[1]
        with psycopg.connect(libpq, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_bare (id bigserial PRIMARY KEY, qstash_id text, body text NOT NULL, "
                         "created_at timestamptz NOT NULL DEFAULT clock_timestamp())")

        port = int(env["WHATRACK_APP_PORT"])
        bare = start_bare(env, port, a.workers, "postgresql+psycopg://" + libpq.split("://", 1)[1])
        try:
            asyncio.run(ceiling_leg(env, 200, a.concurrency, seed=900))  # warm-up
            ceiling = asyncio.run(ceiling_leg(env, a.n, a.concurrency, seed=901))
        finally:
            bare.terminate()
            bare.wait(15)

        with EndpointProcess(env, workers=a.workers):
            asyncio.run(run_load(settings, LoadConfig(n=200, seed=902, concurrency=a.concurrency, progress=False)))
            full = asyncio.run(run_load(settings, LoadConfig(n=a.n, seed=903, concurrency=a.concurrency,
                                                             progress=False)))

    cores = os.cpu_count()
    load1 = os.getloadavg()[0]
    print(f"e2e bench: n={a.n} per leg, {a.workers} uvicorn workers, {a.concurrency} publishes in flight, "
          f"{cores} cores (load average {load1:.1f} at the end; client, broker, endpoint, PostgreSQL and Centrifugo "
          "on the same machine)")
    print(f"  ceiling (bare INSERT): {ceiling['per_s']:8.1f} msg/s   publish→commit {ceiling['commit']}")
    print(f"  full endpoint        : {full.stored_per_s:8.1f} msg/s   publish→commit {full.commit}")
    print(f"                                          publish→realtime {full.realtime}")
    print(f"  ledger: {full.ledger.summary()}; QStash retries {full.retries}, DLQ {full.dlq}")
    ratio = full.stored_per_s / ceiling["per_s"] if ceiling["per_s"] else float("nan")
    goal = full.stored_per_s >= 1000 and full.commit.p99 < 250 and full.passed
    print(f"  ratio full/ceiling: {ratio:.2f}   goal (>= 1000 msg/s, p99 commit < 250 ms, nothing lost): "
          f"{'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
