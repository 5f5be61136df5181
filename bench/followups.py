"""Follow-up worker speed: Python (whatrack's worker) against Node's ``bullmq`` on the same Redis, in the same run.

Prints, for a local redis-server and through the devstack fault proxy adding 5 ms each way (an Upstash-like link):

- jobs/s of no-op jobs at concurrency 1, 10 and 50 for: Node ``bullmq``; whatrack's worker (pooled client, the trap
  fixes); and bullmq-py's own single-connection shape (with the socket-timeout fix only), with the ratio Python/Node
  (goal: ≥ 1.0 at 5 ms and concurrency 50);
- Redis commands per job (INFO commandstats deltas; "client" = what a client sends: EVALSHA, BZPOPMIN, ...; "all"
  also counts the commands BullMQ's Lua scripts run, which Upstash may or may not bill);
- delayed-job lateness (run time − due time) over 1,000 delayed jobs due 5 or 20 ms apart: p50 / p99 / max (goal:
  p99 ≤ 100 ms);
- Redis commands per idle minute for both workers with the same settings, side by side on two servers.

Usage: ``python bench/followups.py [--quick]`` (about 4 minutes; --quick: fewer jobs, 10 s idle window). Every figure
is measured in this run; on a loaded machine they drop together, so read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whatrack.devstack import servers  # noqa: E402
from whatrack.devstack.fault_proxy import FaultControl  # noqa: E402
from whatrack.followups.jobs import (  # noqa: E402
    DRAIN_DELAY_S,
    JOB_NAME,
    LOCK_DURATION_MS,
    STALLED_INTERVAL_MS,
    open_queue,
    schedule_followup,
)
from whatrack.followups.worker import FollowupWorker  # noqa: E402

NODE_BENCH = ROOT / "tests" / "node" / "bullmq_bench.mjs"
# Commands a client sends itself (never run inside BullMQ's Lua scripts).
CLIENT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "bzpopmin", "info", "ping", "hello", "select",
                   "script", "client")
ONE_WAY_MS = 5.0
TIMEOUT_S = 180.0  # per measurement: a stuck run fails the bench instead of hanging it


def command_calls(r: redis.Redis) -> tuple[int, int]:
    """(client-level calls, all calls) since the last CONFIG RESETSTAT, not counting the bench's own INFO/CONFIG."""
    stats: dict[str, Any] = r.info("commandstats")
    client = total = 0
    for name, v in stats.items():
        cmd = name.removeprefix("cmdstat_")
        if cmd in ("info", "config|resetstat", "flushall", "config"):
            continue  # ours
        total += int(v["calls"])
        if cmd.split("|")[0] in CLIENT_COMMANDS:
            client += int(v["calls"])
    return client, total


async def add_jobs(url: str, n: int) -> None:
    q = open_queue(url)
    try:
        for i in range(0, n, 1000):
            await q.addBulk([{"name": JOB_NAME, "data": {"i": j}, "opts": {"removeOnComplete": True}}
                             for j in range(i, min(n, i + 1000))])
    finally:
        await q.close()


async def python_run(url: str, n: int, concurrency: int, *, pooled: bool) -> float:
    done = asyncio.Event()
    count = 0

    async def noop(job: Any) -> None:
        return None

    fw = FollowupWorker(url, noop, concurrency=concurrency, pooled=pooled)

    def completed(*_: object) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    fw.worker.on("completed", completed)
    t0 = time.perf_counter()
    await fw.start()
    await asyncio.wait_for(done.wait(), TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    await fw.close(timeout=10)
    return elapsed


def node_args(url: str, mode: str, n: int, concurrency: int) -> list[str]:
    return ["node", str(NODE_BENCH), url, mode, str(n), str(concurrency), str(LOCK_DURATION_MS),
            str(STALLED_INTERVAL_MS), str(DRAIN_DELAY_S)]  # Node takes drainDelay in seconds


def node_run(url: str, n: int, concurrency: int) -> float:
    r = subprocess.run(node_args(url, "run", n, concurrency), capture_output=True, timeout=TIMEOUT_S, check=True)
    return float(json.loads(r.stdout.decode().strip().splitlines()[-1])["elapsed_ms"]) / 1000


async def throughput(direct: str, worker_url: str, n: int, concurrency: int, impl: str) -> dict[str, float]:
    r = redis.Redis.from_url(direct)
    r.flushall()
    await add_jobs(direct, n)
    r.config_resetstat()
    if impl == "node":
        elapsed = node_run(worker_url, n, concurrency)
    else:
        elapsed = await python_run(worker_url, n, concurrency, pooled=impl == "python")
    client, total = command_calls(r)
    r.close()
    return {"jobs_s": n / elapsed, "client_per_job": client / n, "all_per_job": total / n}


async def lateness(direct: str, worker_url: str, n: int = 1000, spacing_ms: float = 5.0) -> list[float]:
    redis.Redis.from_url(direct).flushall()
    late: list[float] = []
    done = asyncio.Event()

    async def record(job: Any) -> None:
        late.append(time.time() * 1000 - datetime.fromisoformat(job.data["runAt"]).timestamp() * 1000)
        if len(late) >= n:
            done.set()

    fw = FollowupWorker(worker_url, record, concurrency=10)
    await fw.start()
    q = open_queue(direct)
    start = datetime.now(UTC) + timedelta(seconds=2)
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            await schedule_followup(q, organization_id=1, instance_id=1, lead_id=1, text="bench",
                                    run_at=start + timedelta(milliseconds=spacing_ms * i), job_id=f"late-{i}")

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.wait_for(done.wait(), TIMEOUT_S)
    await fw.close(timeout=10)
    await q.close()
    return sorted(late)


async def idle(py_server: servers.RedisServer, node_server: servers.RedisServer, seconds: float) -> dict[str, float]:
    async def noop(job: Any) -> None:
        return None

    fw = FollowupWorker(py_server.url, noop)
    await fw.start()
    proc = subprocess.Popen(node_args(node_server.url, "idle", int(seconds) + 5, 10), stdout=subprocess.DEVNULL)
    await asyncio.sleep(2.0)  # past start-up
    clients = [redis.Redis.from_url(s.url) for s in (py_server, node_server)]
    for c in clients:
        c.config_resetstat()
    await asyncio.sleep(seconds)
    (py_client, py_all), (node_client, node_all) = (command_calls(c) for c in clients)
    await fw.close(timeout=10)
    proc.wait(30)
    for c in clients:
        c.close()
    per_min = 60.0 / seconds
    return {"python_client": py_client * per_min, "python_all": py_all * per_min,
            "node_client": node_client * per_min, "node_all": node_all * per_min}


def pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def start_proxy(target_port: int) -> tuple[subprocess.Popen[bytes], str, int]:
    listen, control = servers.free_port(), servers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "whatrack.devstack.fault_proxy", "--listen-port", str(listen),
                             "--target", f"127.0.0.1:{target_port}", "--control-port", str(control)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers.wait_for_port("127.0.0.1", listen, timeout=30)
    servers.wait_for_port("127.0.0.1", control, timeout=30)
    FaultControl(f"http://127.0.0.1:{control}").latency(ONE_WAY_MS)
    return proc, f"redis://127.0.0.1:{listen}/0", control


def measured_rtt_ms(url: str) -> float:
    r = redis.Redis.from_url(url)
    r.ping()
    samples = []
    for _ in range(20):
        t = time.perf_counter()
        r.ping()
        samples.append((time.perf_counter() - t) * 1000)
    r.close()
    return statistics.median(samples)


async def main(quick: bool) -> None:
    if shutil.which("node") is None or not (ROOT / "node_modules" / "bullmq").is_dir():
        sys.exit("bench/followups.py needs node and the npm peers: run `make setup`")
    sizes = {"local": {1: 2000, 10: 5000, 50: 5000}, "5ms": {1: 150, 10: 1000, 50: 3000}}
    single_5ms = 150  # bullmq-py's single connection runs ~1/(2·RTT) jobs/s whatever the concurrency
    if quick:
        sizes = {"local": {1: 500, 10: 1000, 50: 1000}, "5ms": {1: 60, 10: 300, 50: 600}}
        single_5ms = 60
    with tempfile.TemporaryDirectory() as tmp, servers.RedisServer(Path(tmp) / "a") as srv, \
            servers.RedisServer(Path(tmp) / "b") as srv_b:
        proxy, proxied, _ = start_proxy(srv.port)
        try:
            print(f"redis-server {srv.binary}; RTT local {measured_rtt_ms(srv.url):.2f} ms, "
                  f"through the proxy ({ONE_WAY_MS:g} ms each way) {measured_rtt_ms(proxied):.2f} ms")
            print("\n## throughput (no-op jobs)\n")
            print("| link | concurrency | node jobs/s | python jobs/s | python/node | python single-conn jobs/s |"
                  " client cmds/job node / python | all cmds/job node / python |")
            print("|---|---:|---:|---:|---:|---:|---|---|")
            for link, url in (("local", srv.url), ("5ms", proxied)):
                for conc, n in sizes[link].items():
                    nd = await throughput(srv.url, url, n, conc, "node")
                    py = await throughput(srv.url, url, n, conc, "python")
                    single = await throughput(srv.url, url, n if link == "local" else single_5ms, conc, "single")
                    print(f"| {link} | {conc} | {nd['jobs_s']:,.0f} | {py['jobs_s']:,.0f} | "
                          f"{py['jobs_s'] / nd['jobs_s']:.2f} | {single['jobs_s']:,.0f} | "
                          f"{nd['client_per_job']:.2f} / {py['client_per_job']:.2f} | "
                          f"{nd['all_per_job']:.1f} / {py['all_per_job']:.1f} |", flush=True)
            print("\n## delayed jobs: lateness = run time - due time (1,000 jobs, concurrency 10)\n")
            print("| link | due every | p50 ms | p99 ms | max ms | min ms | early |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for link, url in (("local", srv.url), ("5ms", proxied)):
                for spacing in (5.0, 20.0):  # 200 jobs/s (a burst) and 50 jobs/s due
                    late = await lateness(srv.url, url, n=300 if quick else 1000, spacing_ms=spacing)
                    print(f"| {link} | {spacing:g} ms | {pct(late, 0.5):.1f} | {pct(late, 0.99):.1f} | "
                          f"{late[-1]:.1f} | {late[0]:.1f} | {sum(1 for x in late if x < 0)} |", flush=True)
        finally:
            proxy.terminate()
            proxy.wait(10)
        seconds = 10.0 if quick else 30.0
        print(f"\n## idle worker, commands per minute (measured over {seconds:g} s; lockDuration {LOCK_DURATION_MS},"
              f" stalledInterval {STALLED_INTERVAL_MS}, drainDelay {DRAIN_DELAY_S * 1000} ms for both)\n")
        redis.Redis.from_url(srv.url).flushall()
        res = await idle(srv, srv_b, seconds)
        print("| worker | client cmds/min | all cmds/min | client cmds / 30 days |")
        print("|---|---:|---:|---:|")
        for who in ("node", "python"):
            print(f"| {who} | {res[who + '_client']:.1f} | {res[who + '_all']:.1f} | "
                  f"{res[who + '_client'] * 60 * 24 * 30:,.0f} |")


if __name__ == "__main__":
    from whatrack.cli import run_script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs and a 10 s idle window")
    quick = ap.parse_args().quick
    run_script(lambda: asyncio.run(main(quick)))  # SIGTERM (timeout, CI) stops the servers it started, as Ctrl-C does
