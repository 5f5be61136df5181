"""End to end through the offline QStash broker, open loop: the capacity at p99 publish -> commit <= 250 ms with
nothing lost, against the broker's own capacity delivering to a bare 200 endpoint, measured in the same run.

The devstack (``running_stack``: the QStash broker with its Redis, PostgreSQL, the Centrifugo stand-in; their fault
proxies bypassed) and two legs, each a sweep of fixed offered rates (``--rates``, rising; a leg stops at its first
failing step, after ``--again`` more tries). A leg's capacity counts the steps that passed at their first try; a
step that passed only when repeated is printed beside it, as borderline:

- **bare**: the broker delivers to a bare ASGI app under uvicorn that answers 200 and notes when each message id
  arrived (the broker's own ceiling: publish -> delivery);
- **full**: the real endpoint (``uvicorn whatrack.webhook.app:app_from_env --factory --workers K``, what
  ``whatrack serve`` runs): verify -> normalize -> one write -> 200; realtime from the outbox after the commit.

The publisher is the official ``qstash`` client (``message.batch``, one batch per ``--tick-ms``) in its own process;
message *i* of a step is due at ``start + i / rate`` and its latency counts from the tick that was due, so a lagging
publisher does not hide queueing (no coordinated omission). A step first runs ``--warmup`` seconds at its rate (the jump
from the previous rate: new pooled connections, queues settling), whose messages count for loss and duplicates but not
for latency. Per step: publish -> commit (the row's ``created_at``, the write's transaction time) p50/p99, commit ->
published (``published_at``, set by the outbox publisher) p50/p99, lost (accepted, no row after ``--settle`` s),
duplicated (rows beyond one per message id), QStash retries (RETRY events: attempts the endpoint did not answer 2xx in
time) and the CPU ms per message of each process. CPUs: what production runs (the endpoint or the bare app, and
PostgreSQL) on CPU 0; the stand-ins for hosted services (the broker and its Redis, Centrifugo) and the publisher on CPU
1, so that neither the load client nor a stand-in takes the endpoint's core (``--no-pin``: let the OS place them).
``--py-spy DIR`` profiles the broker and an endpoint worker during the sweeps (``.venv/bin/pip install py-spy`` first; a
bench tool, not a dependency).

    python bench/e2e.py [--rates 50,100,200,300,400,500,600,800,1000,1200,1600] [--seconds 10] [--warmup 2]
                        [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_P99_MS = 250.0
SERVER_CPU, OTHER_CPU = 0, 1


# -- the bare app (run as `python bench/e2e.py --serve-bare PORT`) -------------------------------------------------

def serve_bare(port: int) -> None:
    """Answer every POST with 200 and note its Upstash-Message-Id and arrival time; GET /times returns them."""
    import uvicorn

    seen: dict[str, float] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["method"] == "GET":
            body = json.dumps(seen).encode()
            seen.clear()
        else:
            mid = dict(scope["headers"]).get(b"upstash-message-id", b"").decode()
            seen[mid] = time.time()
            body = b"ok"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# -- the publisher (run as `python bench/e2e.py --publish JOB.pickle`) ---------------------------------------------

async def publish_step(job: dict[str, Any]) -> dict[str, Any]:
    """Publish ``job["bodies"]`` at ``job["rate"]``/s in batches, one per tick; per message (due time, id or None)."""
    from qstash import AsyncQStash

    qs = AsyncQStash(job["token"], base_url=job["qstash_url"])
    bodies: list[bytes] = job["bodies"]
    rate, tick = job["rate"], job["tick_ms"] / 1000
    out: list[tuple[float, str | None]] = [(0.0, None)] * len(bodies)
    tasks: list[asyncio.Task[None]] = []

    async def batch(lo: int, hi: int, due: float) -> None:
        try:
            res = await qs.message.batch([{"url": job["url"], "body": b.decode(), "content_type": "application/json",
                                           "retries": 3} for b in bodies[lo:hi]])
            for i, r in zip(range(lo, hi), res, strict=True):
                out[i] = (due, getattr(r, "message_id", None))
        except Exception as e:  # counted as not accepted
            print(f"publish batch failed: {type(e).__name__}: {e}", file=sys.stderr)
            for i in range(lo, hi):
                out[i] = (due, None)

    cpu0, t0 = time.process_time(), time.time() + 0.05
    k, sent = 0, 0
    while sent < len(bodies):
        due = t0 + k * tick
        hi = min(len(bodies), int((k + 1) * tick * rate))
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if hi > sent:
            tasks.append(asyncio.create_task(batch(sent, hi, due)))
            sent = hi
        k += 1
    await asyncio.gather(*tasks)
    last = time.time()
    await qs.http._client.aclose()
    return {"sent": out, "t0": t0, "publish_s": last - t0, "cpu_s": time.process_time() - cpu0}


def run_publisher(job: dict[str, Any], tmp: Path, pin: bool) -> dict[str, Any]:
    path, result = tmp / "job.pickle", tmp / "result.pickle"
    path.write_bytes(pickle.dumps(job))
    cmd = [sys.executable, __file__, "--publish", str(path), str(result)]
    subprocess.run(cmd, check=True, preexec_fn=(lambda: os.sched_setaffinity(0, {OTHER_CPU})) if pin else None)
    out: dict[str, Any] = pickle.loads(result.read_bytes())  # noqa: S301 - written by our own child
    return out


# -- processes and CPUs --------------------------------------------------------------------------------------------

def tree(pid: int) -> list[Any]:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def pin_tree(pid: int, cpu: int) -> None:
    for p in tree(pid):
        with contextlib.suppress(Exception):
            p.cpu_affinity([cpu])


def cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        for p in tree(pid):
            with contextlib.suppress(Exception):
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
    return total


@contextlib.contextmanager
def bare_server(port: int, pin: bool) -> Iterator[int]:
    from whatrack.devstack import servers

    proc = subprocess.Popen([sys.executable, __file__, "--serve-bare", str(port)], start_new_session=True)
    try:
        servers.wait_for_port("127.0.0.1", port, timeout=30)
        if pin:
            pin_tree(proc.pid, SERVER_CPU)
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(15)


# -- one step: publish at a rate, wait, measure --------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


async def arrivals_bare(url: str) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient() as c:
        times: dict[str, float] = (await c.get(url + "/times")).json()
    return times


async def arrivals_full(libpq: str, ids: list[str]) -> dict[str, tuple[float, float | None, int]]:
    """provider_id -> (created_at, published_at or None, rows) as unix seconds."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(libpq) as conn:
        cur = await conn.execute(
            "SELECT provider_id, extract(epoch FROM min(created_at))::float8, "
            "extract(epoch FROM max(published_at))::float8, count(*) FROM message "
            "WHERE provider_id = ANY(%s) GROUP BY provider_id", (ids,))
        return {p: (c, pub, n) for p, c, pub, n in await cur.fetchall()}


async def retries_since(ctx: dict[str, Any], since_ms: int) -> int:
    """Delivery attempts beyond the first (QStash RETRY events) to this leg's URL since ``since_ms``."""
    from whatrack.proof.load import close_publisher, retry_count
    from whatrack.qstash import Publisher

    publisher = Publisher(ctx["token"], base_url=ctx["qstash_url"], destination=ctx["url"])
    try:
        return await retry_count(publisher, since_ms)
    finally:
        await close_publisher(publisher)


def step(leg: str, rate: float, a: argparse.Namespace, ctx: dict[str, Any]) -> dict[str, Any]:
    """One step at ``rate``: ``--warmup`` seconds of it first (stored, checked for loss and duplicates, but not in
    the latencies: the jump from the previous rate, new pooled connections, a queue settling), then ``--seconds``."""
    warm = int(rate * a.warmup)
    n = warm + max(20, int(rate * a.seconds))
    keys, bodies = ctx["make"](n)
    measured = set(keys[warm:])
    job = {"token": ctx["token"], "qstash_url": ctx["qstash_url"], "url": ctx["url"], "bodies": bodies,
           "rate": rate, "tick_ms": a.tick_ms}
    c0 = {name: cpu_s(pids) for name, pids in ctx["procs"].items()}
    since_ms = int(time.time() * 1000)
    pub = run_publisher(job, ctx["tmp"], not a.no_pin)
    accepted = {keys[i]: (due, mid) for i, (due, mid) in enumerate(pub["sent"]) if mid}
    deadline, all_in = time.monotonic() + a.settle, 0.0
    got: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if leg == "bare":
            got.update(asyncio.run(arrivals_bare(ctx["bare_url"])))
            done = sum(1 for _, mid in accepted.values() if mid in got)
        else:
            got = asyncio.run(arrivals_full(ctx["libpq"], list(accepted)))
            done = sum(1 for k in accepted if k in got)
            published = sum(1 for k in accepted if k in got and got[k][1] is not None)
            all_in = all_in or (time.monotonic() if done >= len(accepted) else 0.0)
            if all_in and published < done and time.monotonic() - all_in < 5:  # the outbox's last batch
                done = 0
        if done >= len(accepted):
            break
        time.sleep(0.25)
    cpu = {name: (cpu_s(pids) - c0[name]) * 1e3 / n for name, pids in ctx["procs"].items()}
    cpu["publisher"] = pub["cpu_s"] * 1e3 / n
    commit, realtime, dup = [], [], 0
    arrived = 0
    for k, (due, mid) in accepted.items():
        if leg == "bare":
            if mid in got:
                arrived += 1
                if k in measured:
                    commit.append((got[mid] - due) * 1e3)
        elif k in got:
            created, published, rows = got[k]
            arrived += 1
            dup += rows - 1
            if k in measured:
                commit.append((created - due) * 1e3)
                if published is not None:
                    realtime.append((published - created) * 1e3)
    lost = len(accepted) - arrived
    retries = asyncio.run(retries_since(ctx, since_ms))
    p99 = pct(commit, 0.99)
    return {"leg": leg, "rate": rate, "n": n, "accepted": len(accepted), "offered_per_s": n / max(pub["publish_s"],
            1e-9), "p50": pct(commit, 0.5), "p99": p99, "max": max(commit, default=float("nan")),
            "rt_p50": pct(realtime, 0.5), "rt_p99": pct(realtime, 0.99), "rt_n": len(realtime),
            "lost": lost + (n - len(accepted)), "dup": dup, "retries": retries, "cpu": cpu,
            "ok": lost == 0 and len(accepted) == n and p99 <= GOAL_P99_MS}


def show(r: dict[str, Any]) -> None:
    rt = (f"{r['rt_p50']:7.1f} {r['rt_p99']:7.1f}" if r["leg"] == "full" and r["rt_n"] else
          "     n/a     n/a" if r["leg"] == "full" else "       -       -")
    cpu = " ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items())
    print(f"  {r['leg']:>4} {r['rate']:6.0f} {r['offered_per_s']:7.0f} {r['n']:6d} {r['p50']:7.1f} {r['p99']:7.1f} "
          f"{r['max']:7.1f} {rt} {r['lost']:5d} {r['dup']:4d} {r['retries']:5d}  {'ok' if r['ok'] else 'FAIL':4}  "
          f"cpu ms/msg: {cpu}",
          flush=True)


def sweep(leg: str, a: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rate in a.rates:
        r = step(leg, rate, a, ctx)
        show(r)
        tries = 1
        for _ in range(a.again if not r["ok"] else 0):  # a neighbour's burst on a shared machine, or ours?
            time.sleep(2)
            r = step(leg, rate, a, ctx)
            tries += 1
            show(r)
            if r["ok"]:
                break
        out.append(r | {"tries": tries})
        if not r["ok"]:
            break
        time.sleep(1)
    return out


class Capacity(NamedTuple):
    """A leg's capacity: the highest rate that passed at its first try (every lower step passed too), the highest that
    passed at all (``again``: a repeat of a failed step passed), and whether a step failed (else: at least)."""

    steady: float
    again: float
    bounded: bool

    def text(self) -> str:
        out = f"{'' if self.bounded else '>= '}{self.steady:.0f} msg/s"
        return out + (f" (up to {self.again:.0f} with a repeated step: borderline)" if self.again > self.steady else "")


def capacity(results: list[dict[str, Any]]) -> Capacity:
    """A leg's :class:`Capacity` from its steps (in rising order; the sweep stops at the first step that failed)."""
    steady = again = 0.0
    first_try = True
    for r in results:
        if not r["ok"]:
            return Capacity(steady, again, True)
        again = r["rate"]
        first_try = first_try and r.get("tries", 1) == 1
        if first_try:
            steady = r["rate"]
    return Capacity(steady, again, not first_try)  # a step that failed at its first try bounds the steady figure


def ratio_text(full: Capacity, bare: Capacity) -> str:
    """full/bare of the steady capacities, with what an unbounded leg (no step failed) makes of it."""
    if not bare.steady:
        return "n/a (the bare leg passed no step)"
    value = full.steady / bare.steady
    if not full.bounded and not bare.bounded:
        return f"{value:.2f}, unknown: both legs passed every step (raise --rates)"
    if not bare.bounded:
        return f"<= {value:.2f} (the bare leg passed every step)"
    if not full.bounded:
        return f">= {value:.2f} (the full leg passed every step)"
    return f"{value:.2f}"


# -- the run -------------------------------------------------------------------------------------------------------

def prepare_full(env: dict[str, str]) -> Any:
    """Register the load instances once; returns make(n) -> (provider ids, bodies), fresh ids at every call."""
    from whatrack.proof.generate import generate, make_instances
    from whatrack.store.api import Store

    insts = make_instances(3, 7)

    async def register() -> None:
        store = Store.from_url(env["DATABASE_URL"])
        await store.upgrade()
        for i in insts:
            await store.register_instance("bench e2e", i.name, i.token, owner=i.owner)
        await store.aclose()

    asyncio.run(register())
    seeds, seen = iter(range(1000, 10**6)), set()

    def make(n: int) -> tuple[list[str], list[bytes]]:
        hooks = generate(n, seed=next(seeds), only=insts, leads=200)
        keys = [w.provider_id for w in hooks]
        assert not seen.intersection(keys), "generated message ids repeat across steps"
        seen.update(keys)
        return keys, [w.body for w in hooks]

    return make


def stack_procs(state: Path) -> dict[str, list[int]]:
    """The stack's processes by role (from its state file): the broker with its Redis, PostgreSQL, Centrifugo."""
    parts = json.loads(state.read_text())["parts"]
    procs: dict[str, list[int]] = {"broker": [], "redis": [], "postgres": [], "centrifugo": []}
    for name, p in parts.items():
        if p.get("pid") and not name.startswith("proxy"):
            role = "broker" if name == "qstash" else name if name in procs else "redis"  # the broker's Redis
            procs[role].append(p["pid"])
    return procs


@contextlib.contextmanager
def profiling(pid: int, out: Path | None) -> Iterator[None]:
    """``py-spy record`` of one process while the block runs (``--py-spy DIR``), as raw collapsed stacks."""
    if out is None:
        yield
        return
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-o", str(out),
                            "-f", "raw", "-r", "100", "--nonblocking"], stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(2)
        spy.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                    default=[50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 800.0, 1000.0, 1200.0, 1600.0],
                    help="offered rates per step, rising")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per step (measured)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds at a step's rate before its measured seconds "
                    "(its messages are checked for loss and duplicates, not timed)")
    ap.add_argument("--settle", type=float, default=30.0, help="seconds to wait for a step's last messages")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="one publish batch per tick")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes of the endpoint")
    ap.add_argument("--legs", default="bare,full")
    ap.add_argument("--again", type=int, default=1, help="run a failing step up to this many more times before "
                    "calling it failed (every run is printed): one stall of a neighbour on a shared machine is not "
                    "the system's capacity")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--py-spy", type=Path, help="write py-spy profiles (raw collapsed stacks) of the broker and the "
                    "endpoint for each leg into this directory")
    ap.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--publish", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_bare:
        serve_bare(a.serve_bare)
        return
    if a.publish:
        job = pickle.loads(Path(a.publish[0]).read_bytes())  # noqa: S301 - written by our parent
        Path(a.publish[1]).write_bytes(pickle.dumps(asyncio.run(publish_step(job))))
        return

    import logging

    from whatrack.devstack import servers
    from whatrack.devstack.stack import running_stack
    from whatrack.proof.load import EndpointProcess

    logging.basicConfig(level=logging.WARNING)
    pin = not a.no_pin and (os.cpu_count() or 1) >= 2
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp, \
            running_stack(Path(tmp) / "stack", parts=["qstash", "postgres", "centrifugo"]) as st:
        env = st.env()
        parts = json.loads((Path(tmp) / "stack" / "state.json").read_text())["parts"]
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{parts['postgres']['port']}/whatrack"
        env["CENTRIFUGO_API_URL"] = f"http://127.0.0.1:{parts['centrifugo']['port']}/api"
        procs = stack_procs(Path(tmp) / "stack" / "state.json")
        if pin:
            for role, pids in procs.items():
                for pid in pids:
                    pin_tree(pid, SERVER_CPU if role == "postgres" else OTHER_CPU)
        ctx: dict[str, Any] = {"token": env["QSTASH_TOKEN"], "qstash_url": env["QSTASH_URL"], "tmp": Path(tmp),
                               "libpq": env["DATABASE_URL"], "procs": procs}
        print(f"e2e sweep: {a.warmup:.0f} s warm-up + {a.seconds:.0f} s measured per step, batches every "
              f"{a.tick_ms:.0f} ms, {os.cpu_count()} cores, "
              f"{'endpoint and PostgreSQL on CPU 0, the rest on CPU 1' if pin else 'unpinned'}; load average "
              f"{os.getloadavg()[0]:.1f} at the start")
        print("   leg   rate  offered     n  c50 ms  c99 ms  max ms  pub50   pub99  lost  dup retry  step  "
              "(c = publish->delivery (bare) / ->commit (full); pub = commit->published; retry = QStash retries)")
        if "bare" in a.legs:
            port = servers.free_port()
            with bare_server(port, pin) as pid:
                ctx |= {"url": f"http://127.0.0.1:{port}/hook", "bare_url": f"http://127.0.0.1:{port}",
                        "make": lambda n: ([str(i) for i in range(n)], [b'{"i": %d}' % i for i in range(n)])}
                ctx["procs"] = {**procs, "endpoint": [pid]}
                step("bare", 50, argparse.Namespace(**{**vars(a), "seconds": 2}), ctx)  # warm-up
                with profiling(procs["broker"][0], a.py_spy and a.py_spy / "broker-bare.txt"):
                    results["bare"] = sweep("bare", a, ctx)
        if "full" in a.legs:
            ctx["make"] = prepare_full(env)
            with EndpointProcess(env, workers=a.workers) as ep:
                assert ep.proc is not None
                if pin:
                    pin_tree(ep.proc.pid, SERVER_CPU)
                ctx |= {"url": env["WEBHOOK_PUBLIC_URL"], "procs": {**procs, "endpoint": [ep.proc.pid]}}
                step("full", 50, argparse.Namespace(**{**vars(a), "seconds": 2}), ctx)  # warm-up
                worker = tree(ep.proc.pid)[-1].pid
                with profiling(procs["broker"][0], a.py_spy and a.py_spy / "broker-full.txt"), \
                        profiling(worker, a.py_spy and a.py_spy / "endpoint-full.txt"):
                    results["full"] = sweep("full", a, ctx)
    caps = {leg: capacity(r) for leg, r in results.items()}
    for leg, cap in caps.items():
        print(f"  capacity {leg:>4} (p99 <= {GOAL_P99_MS:.0f} ms, nothing lost, at the first try): {cap.text()}")
    if "bare" in caps and "full" in caps:
        goal = caps["full"].steady >= 400
        print(f"  ratio full/bare: {ratio_text(caps['full'], caps['bare'])}   goal (full >= 400 msg/s at p99 <= "
              f"{GOAL_P99_MS:.0f} ms, lost 0): {'met' if goal else 'NOT met'}; load average "
              f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    from whatrack.cli import run_script

    run_script(main)  # SIGTERM (timeout, CI) stops the servers it started, as Ctrl-C does
