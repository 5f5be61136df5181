"""Messages per second through the webhook endpoint, against the honest ceiling measured in the same run.

Two uvicorn servers (one worker each, on the same PostgreSQL, reached directly) take the same signed, unique UAZAPI
message deliveries:

- **full**: the real endpoint (``whatrack.webhook.create_app``): verify the QStash signature (official Receiver) ->
  normalize -> the store's write -> 200; realtime goes out after the commit (the devstack's Centrifugo stand-in);
- **bare**: the same framework answering each request with one plain asyncpg INSERT of the raw body (no
  verification, no normalization, no ORM): the simplest fast way to do the same job.

Both run as ``whatrack serve`` runs the endpoint: uvicorn, and the garbage collector set for a serving process
(``whatrack.gctune``), so that the two differ by their work only.

The load client is ``bench/httpload.py`` (raw asyncio sockets on uvloop, requests built before the clock starts) in
its own process. CPUs: the server under test is pinned to CPU 0; PostgreSQL, the Centrifugo stand-in and the client
share CPU 1, so the client never takes the server's core (on a machine with more cores each gets its own).

Prints, for each server and each concurrency of the sweep (``-c``, the same for both; default 16, 32, 64, 128 and 256
connections), the closed-loop rate (for the full endpoint the clock runs until its realtime outbox is empty, since a
message is done when it is stored and published), the CPU ms per message of the server, PostgreSQL, the Centrifugo
stand-in and the client, and the server's RSS. A server's saturation rate is the highest of its sweep: the bare server
peaks at few connections (more only queue), the full endpoint at many (its writes and publications batch what
arrives together, as under a QStash burst), and one concurrency for both would measure one of them below its
saturation. Then the latency p50/p99 at a fixed offered rate below saturation (open loop, ``--open-rate``, default
half the full endpoint's saturation rate), and the ratio of the saturation rates full/bare (the goal is >= 0.5).

``--durable`` runs PostgreSQL with fsync on, as production does (both servers then pay for flushing their commits;
the default, fsync off, is how the devstack runs it).

Usage: ``python bench/webhook.py [-n 16000] [-c 16,32,64,128,256] [--open-rate R] [--durable]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

SERVER_CPU = 0
OTHER_CPU = 1


def pin(pid: int, cpu: int) -> None:
    """Pin a process (and the children it forks later) to one CPU, where the machine has it."""
    cpus = os.sched_getaffinity(0) | {SERVER_CPU, OTHER_CPU} if hasattr(os, "sched_getaffinity") else set()
    if cpu in cpus and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(pid, {cpu})


def serve(kind: str, port: int, db_url: str, cent_url: str) -> None:
    import uvicorn

    from whatrack.settings import Settings

    pin(0, SERVER_CPU)
    if kind == "full":
        from whatrack.webhook import create_app

        env = {
            "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": KEY_CURRENT, "QSTASH_NEXT_SIGNING_KEY": KEY_NEXT,
            "WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
            "CENTRIFUGO_API_URL": cent_url, "CENTRIFUGO_API_KEY": CENT_KEY,
        }
        app = create_app(Settings.from_env(env, env_files=()), serving=True)  # as `whatrack serve` runs it
    else:
        import asyncpg
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from whatrack.gctune import tune_for_serving

        pool: dict[str, Any] = {}

        async def no_reset(conn: asyncpg.Connection) -> None:
            """asyncpg's default reset is one more round trip per request (advisory unlock, CLOSE ALL, UNLISTEN, RESET
            ALL); the full endpoint's pool skips it (``store.write._reset``), and a single autocommit INSERT leaves
            nothing to undo. With it, this ceiling was 12 % low (c=16: 8,568 msg/s, 9,751 without)."""

        async def bare(request: Request) -> JSONResponse:
            body = await request.body()
            async with pool["pool"].acquire() as conn:
                await conn.execute("INSERT INTO bench_bare (id, body) VALUES ($1, $2)", uuid.uuid4().hex,
                                   body.decode())
            return JSONResponse({"status": "stored"})

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> Any:
            pool["pool"] = await asyncpg.create_pool(db_url, min_size=10, max_size=10, reset=no_reset)
            tune_for_serving()  # the process setting the full endpoint gets, so the two differ by their work only
            yield
            await pool["pool"].close()

        app = Starlette(routes=[Route(WEBHOOK_PATH, bare, methods=["POST"])], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_server(kind: str, db_url: str, cent_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port), "--db", db_url,
                             "--cent", cent_url], cwd=ROOT)
    servers.wait_for_port("127.0.0.1", port, timeout=30)
    return proc, port


@contextlib.contextmanager
def centrifugo_process(tmp: Path) -> Iterator[str]:
    """The devstack's Centrifugo stand-in as its own process (history in a Redis of its own), off the server's CPU."""
    with servers.RedisServer(tmp / "cent-redis") as redis_server:
        port = servers.free_port()
        proc = subprocess.Popen([sys.executable, "-m", "whatrack.devstack.centrifugo", "--port", str(port),
                                 "--redis-url", redis_server.url], env={**os.environ, "CENTRIFUGO_API_KEY": CENT_KEY})
        try:
            servers.wait_for_port("127.0.0.1", port, timeout=30)
            pin(proc.pid, OTHER_CPU)
            SIDES["centrifugo"] = [proc.pid]
            if redis_server.proc:
                pin(redis_server.proc.pid, OTHER_CPU)
                SIDES["centrifugo"].append(redis_server.proc.pid)
            yield f"http://127.0.0.1:{port}/api"
        finally:
            proc.terminate()
            proc.wait(10)


# -- load ---------------------------------------------------------------------------------------------------------

def drive(url_port: int, requests: list[bytes], connections: int, rate: float, tmp: Path) -> dict[str, Any]:
    """Run ``bench/httpload.py`` in its own process on the other CPU; its results."""
    reqs, out = tmp / "requests.pickle", tmp / "result.json"
    reqs.write_bytes(pickle.dumps(requests))
    subprocess.run([sys.executable, str(ROOT / "bench" / "httpload.py"), str(reqs), str(out), "127.0.0.1",
                    str(url_port), str(connections), str(rate), str(OTHER_CPU)], check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def signed(port: int, n: int) -> list[bytes]:
    from httpload import build_request  # bench/ is on sys.path when this file runs as a script

    url = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    return [build_request("127.0.0.1", port, WEBHOOK_PATH, b, {"Upstash-Signature": sign(b, url, KEY_CURRENT)})
            for b in bodies(n)]


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1e3


#: The processes besides the server whose CPU a run is charged (their pids): PostgreSQL, the Centrifugo stand-in.
SIDES: dict[str, list[int]] = {}


def side_cpu() -> dict[str, float]:
    """CPU seconds used so far by each side's processes (PostgreSQL: the postmaster and its backends)."""
    import psutil

    out: dict[str, float] = {}
    for name, pids in SIDES.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                for q in [p, *p.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += sum(q.cpu_times()[:2])
        out[name] = total
    return out


def measure(kind: str, port: int, proc: subprocess.Popen[bytes], n: int, connections: int, tmp: Path,
            db_url: str | None = None) -> dict[str, Any]:
    """Saturate the server. With ``db_url`` (the full endpoint) the run lasts until its outbox is empty too: the
    job is done when each message is stored and published, and realtime work left for after the clock stops would
    flatter the rate and the CPU per message."""
    import psutil

    drive(port, signed(port, 300), connections, 0, tmp)  # warm: pools, prepared statements, caches
    if db_url:
        drain_outbox(db_url)
    requests = signed(port, n)  # before the clocks start: signing is the bench's work, not the run's
    ps = psutil.Process(proc.pid)
    cpu0, cores0, sides0 = sum(ps.cpu_times()[:2]), psutil.cpu_times(percpu=True), side_cpu()
    r = drive(port, requests, connections, 0, tmp)
    stored_rate = n / r["elapsed"]
    if db_url:
        r["elapsed"] += drain_outbox(db_url, poll_s=0.01)
    cpu = sum(ps.cpu_times()[:2]) - cpu0
    sides = {k: (v - sides0[k]) / n * 1e3 for k, v in side_cpu().items()}
    # Busy share of each CPU over the run: which side (the server's CPU, or the one PostgreSQL shares) saturated.
    busy = [1 - (c1.idle - c0.idle) / max(1e-9, sum(c1) - sum(c0)) for c0, c1 in
            zip(cores0, psutil.cpu_times(percpu=True), strict=True)]
    ok = r["statuses"].get("200", 0)
    out = {"c": connections, "rate": n / r["elapsed"], "cpu_ms": cpu / n * 1e3, "rss_mb": ps.memory_info().rss / 2**20,
           "ok": ok, "other": n - ok, "client_cpu_ms": r["cpu_s"] / n * 1e3, "busy": busy, "sides": sides}
    published = f" (stored {stored_rate:.0f}/s, the rest of the time publishing)" if db_url else ""
    print(f"{kind:>4}: {out['rate']:8.0f} msg/s closed loop{published} (c={connections}, n={n})  server CPU "
          f"{out['cpu_ms']:.2f} ms/msg  RSS {out['rss_mb']:.0f} MB  non-200 {out['other']}  "
          f"(CPU ms/msg: {' '.join(f'{k} {v:.3f}' for k, v in sides.items())} client {out['client_cpu_ms']:.3f}; "
          f"CPUs busy "
          f"{' '.join(f'{i}:{b:.0%}' for i, b in enumerate(busy))})")
    return out


def open_loop(kind: str, port: int, rate: float, seconds: float, tmp: Path) -> None:
    n = max(200, int(rate * seconds))
    r = drive(port, signed(port, n), 256, rate, tmp)
    lat = sorted(r["latencies"])
    ok = r["statuses"].get("200", 0)
    print(f"{kind:>4}: open loop at {rate:.0f} msg/s for {n / rate:.0f} s: p50 {pct(lat, 0.5):.1f} ms  "
          f"p99 {pct(lat, 0.99):.1f} ms  max {lat[-1] * 1e3:.1f} ms  non-200 {n - ok}")


def drain_outbox(db_url: str, timeout: float = 300.0, poll_s: float = 0.2) -> float:
    """Seconds until every stored message is published to Centrifugo (the outbox is empty)."""
    import time

    import psycopg

    t0 = time.monotonic()
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.monotonic() - t0 < timeout:
            row = conn.execute("SELECT count(*) FROM message_outbox").fetchone()
            if row is not None and row[0] == 0:
                break
            time.sleep(poll_s)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=16000, help="deliveries per run (each concurrency of the sweep)")
    ap.add_argument("-c", "--concurrency", default="16,32,64,128,256",
                    help="the connections of the sweep, comma-separated (one value: one run per server)")
    ap.add_argument("--open-rate", type=float, default=0.0, help="offered rate for the latency run (default: half "
                    "the full endpoint's saturation rate)")
    ap.add_argument("--open-seconds", type=float, default=10.0)
    ap.add_argument("--durable", action="store_true", help="PostgreSQL with fsync on, as in production (default: "
                    "off, as the devstack runs it)")
    ap.add_argument("--serve")
    ap.add_argument("--port", type=int)
    ap.add_argument("--db")
    ap.add_argument("--cent")
    a = ap.parse_args()
    try:
        concurrencies = [int(c) for c in str(a.concurrency).split(",") if c.strip()]
    except ValueError:
        ap.error(f"-c takes connection counts, comma-separated (16,32,64), not {a.concurrency!r}")
    if not concurrencies or min(concurrencies) < 1:
        ap.error("-c needs at least one connection count of 1 or more")
    if a.serve:
        serve(a.serve, a.port, a.db, a.cent)
        return

    import psycopg

    from whatrack.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-webhook-"))
    pg = servers.EmbeddedPostgres(tmp / "pg", durable=a.durable).start()
    admin = pg.url
    _pin_postgres(admin)
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
            results: dict[str, dict[str, Any]] = {}
            ports: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
            for kind in ("bare", "full"):
                proc, port = start_server(kind, db_url, cent_url)
                procs.append(proc)
                ports[kind] = (proc, port)
                sweep = [measure(kind, port, proc, a.n, c, tmp, db_url if kind == "full" else None)
                         for c in concurrencies]
                results[kind] = max(sweep, key=lambda r: float(r["rate"]))
            for kind, best in results.items():
                print(f"{kind:>4}: saturation {best['rate']:.0f} msg/s (the best of the sweep, at c={best['c']}): "
                      f"server CPU {best['cpu_ms']:.2f} ms/msg, RSS {best['rss_mb']:.0f} MB")
            rate = a.open_rate or results["full"]["rate"] / 2
            for kind in ("bare", "full"):
                open_loop(kind, ports[kind][1], rate, a.open_seconds, tmp)
            print(f"full: outbox drained in {drain_outbox(db_url):.1f} s after the open-loop run")
        ratio = results["full"]["rate"] / results["bare"]["rate"]
        print(f"ratio full/bare (saturation rates): {ratio:.2f}  (goal >= 0.5; CPU per message full/bare "
              f"{results['full']['cpu_ms'] / results['bare']['cpu_ms']:.1f}x; {os.cpu_count()} cores: server on CPU "
              f"{SERVER_CPU}, PostgreSQL, Centrifugo and the client on CPU {OTHER_CPU})")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        servers.drop_database(admin, dbname)
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def _pin_postgres(url: str) -> None:
    """Pin the postmaster (backends fork from it later and inherit its CPU) off the server's CPU."""
    import psutil

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            pin(c.pid, OTHER_CPU)
            SIDES["postgres"] = [c.pid]


if __name__ == "__main__":
    from whatrack.cli import run_script

    run_script(main)  # SIGTERM (timeout, CI) stops the servers it started, as Ctrl-C does
