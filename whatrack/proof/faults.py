"""The fault matrix: each scenario is one row (data), run while the load is flowing, with its own ledger verdict.

A scenario names a fault and when to inject it (a share of the publishing done); :func:`run_matrix` brings up the
offline stack once, and for each scenario starts the endpoint (``--workers K`` processes), publishes a fresh batch of
generated webhooks, injects the fault, waits for everything to settle, replays the DLQ, and reconciles (the loss
ledger). A new scenario is a few lines: a :class:`Scenario` with an ``inject`` coroutine, or a ``front`` setting.

Faults: the endpoint SIGKILLed and restarted; PostgreSQL or Centrifugo unreachable for N seconds (fault proxy
outage); the QStash broker SIGKILLed and restarted; connection resets and added latency on the database link; every
delivery made twice; 5 % of deliveries answered 503 (an HTTP front on the public port, no product change); the
follow-up worker SIGKILLed with jobs active (:mod:`whatrack.proof.worker_faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from whatrack.devstack.fault_proxy import FaultControl
from whatrack.errors import StackError, WhatrackError
from whatrack.proof.config import LoadConfig
from whatrack.proof.config import MatrixConfig as MatrixConfig  # re-exported
from whatrack.proof.cost import CommandStats, Projection, command_total, delta, project
from whatrack.proof.load import EndpointProcess, LoadResult, Progress, run_load
from whatrack.settings import Settings

log = logging.getLogger("whatrack.proof.faults")


@dataclass
class FaultContext:
    """What an injector may touch. ``notes`` collects what it did (shown in the matrix table)."""

    env: dict[str, str]
    stack_dir: Path
    endpoint: EndpointProcess
    progress: Progress
    outage_s: float
    notes: list[str] = field(default_factory=list)
    respawned: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def proxy(self, part: str) -> FaultControl:
        """The fault proxy in front of ``part`` (``postgres``, ``centrifugo``, ``upstash_redis``)."""
        url = self.env.get(f"WHATRACK_FAULT_{part.upper()}_URL")
        if not url:
            raise StackError(f"the stack has no fault proxy for {part}: is it an offline stack (whatrack stack up)?")
        return FaultControl(url)


Injector = Callable[[FaultContext], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Front:
    """An HTTP front on the public port (see :mod:`whatrack.proof.front`)."""

    fail_ratio: float = 0.0
    duplicate: bool = False


@dataclass(frozen=True)
class Scenario:
    """One row of the matrix."""

    name: str
    description: str
    inject: Injector | None = None
    at: float = 0.3  # inject once this share of the messages is published
    front: Front | None = None
    followups: bool = False  # the follow-up worker scenario (whatrack.proof.worker_faults)


# -- injectors ----------------------------------------------------------------------------------------------------

async def kill_endpoint(ctx: FaultContext) -> None:
    """SIGKILL every endpoint process, stay down one second, start again."""
    await asyncio.to_thread(ctx.endpoint.kill)
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    await asyncio.to_thread(ctx.endpoint.start)
    ctx.notes.append(f"endpoint SIGKILLed at {ctx.progress.fraction:.0%}, back in {time.monotonic() - t0 + 1:.1f} s")


def outage(part: str) -> Injector:
    async def inject(ctx: FaultContext) -> None:
        await asyncio.to_thread(ctx.proxy(part).outage, ctx.outage_s)
        await asyncio.sleep(ctx.outage_s)
        ctx.notes.append(f"{part} unreachable {ctx.outage_s:g} s from {ctx.progress.fraction:.0%}")
    return inject


async def db_resets(ctx: FaultContext) -> None:
    """Reset every database connection now and each new one for a while, then heal."""
    secs = max(1.0, ctx.outage_s / 2)
    await asyncio.to_thread(ctx.proxy("postgres").reset, secs)
    await asyncio.sleep(secs)
    ctx.notes.append(f"database connections reset for {secs:g} s")


async def db_latency(ctx: FaultContext) -> None:
    """50 ms added each way on the database link for the outage duration (a slow network to the database)."""
    await asyncio.to_thread(ctx.proxy("postgres").latency, 50.0, ctx.outage_s)
    await asyncio.sleep(ctx.outage_s)
    ctx.notes.append(f"+50 ms database latency for {ctx.outage_s:g} s")


async def kill_broker(ctx: FaultContext) -> None:
    """SIGKILL the QStash broker's process group and start it again with the same command and environment."""
    state = json.loads((ctx.stack_dir / "state.json").read_text())
    part = state["parts"].get("qstash") or {}
    pid = part.get("pid")
    if not pid:
        raise StackError("the stack has no QStash broker process to kill")
    proc = psutil.Process(pid)
    cmd, env, cwd = proc.cmdline(), proc.environ(), proc.cwd()
    os.killpg(pid, signal.SIGKILL)
    from whatrack.devstack import stack as stack_mod

    handle = getattr(stack_mod, "_CHILDREN", {}).pop(pid, None)  # the stack's Popen of it, when started here
    if handle is not None:
        handle.wait(10)
    with contextlib.suppress(psutil.Error):
        proc.wait(10)
    await asyncio.sleep(1.0)
    with open(part.get("log") or os.devnull, "ab") as out:
        new = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    ctx.respawned.append(new)
    port = urlsplit(ctx.env["QSTASH_URL"]).port or 0
    from whatrack.devstack.servers import wait_for_port

    await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 30.0)
    part.update(pid=new.pid, created=psutil.Process(new.pid).create_time())  # so `stack down` stops the new one
    (ctx.stack_dir / "state.json").write_text(json.dumps(state, indent=2))
    ctx.notes.append(f"broker SIGKILLed at {ctx.progress.fraction:.0%} and restarted (pid {new.pid})")


#: The matrix. Sizes and durations come from :class:`MatrixConfig`.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("baseline", "no fault: the reference row"),
    Scenario("endpoint_sigkill", "endpoint processes SIGKILLed mid-load, restarted 1 s later", kill_endpoint),
    Scenario("postgres_outage", "PostgreSQL unreachable for the outage duration", outage("postgres")),
    Scenario("centrifugo_outage", "Centrifugo unreachable for the outage duration", outage("centrifugo")),
    Scenario("broker_sigkill", "QStash broker SIGKILLed mid-load and restarted", kill_broker),
    Scenario("db_resets", "database connections reset (RST), new ones too, for half the outage", db_resets),
    Scenario("db_latency", "+50 ms each way on the database link", db_latency),
    Scenario("duplicate_delivery", "every delivery made twice, concurrently", front=Front(duplicate=True)),
    Scenario("endpoint_5xx", "5 % of deliveries answered 503 before the endpoint", front=Front(fail_ratio=0.05)),
    Scenario("worker_sigkill", "follow-up worker SIGKILLed with jobs active, restarted", followups=True),
)


# -- running ------------------------------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    """One row of the matrix."""

    scenario: Scenario
    load: LoadResult | None
    seconds: float
    notes: list[str]
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ledger_passed(self) -> bool:
        """Database and realtime: nothing lost, duplicated or unexpected."""
        if self.error is not None or self.load is None:
            return False
        return self.load.ledger.lost == 0 and self.load.ledger.duplicated == 0 and self.load.ledger.unexpected == 0

    @property
    def passed(self) -> bool:
        """The ledger passed and no follow-up reached WhatsApp twice."""
        return self.ledger_passed and not self.extra.get("double_sends")

    def row(self) -> dict[str, Any]:
        base: dict[str, Any] = {"scenario": self.scenario.name, "passed": self.passed,
                                "ledger_passed": self.ledger_passed}
        if self.load is not None:
            c = self.load.ledger.counts()
            base |= {"messages": c["total"], "ok": c["ok"], "lost": c["lost"], "duplicated": c["duplicated"],
                     "unexpected": c["unexpected"], "recovered": c["recovered"], "unknown": c["unknown"],
                     "undelivered": c["undelivered"], "retries": self.load.retries, "dlq": self.load.dlq,
                     "stored_per_s": round(self.load.stored_per_s, 1), "commit_p99_ms": round(self.load.commit.p99)}
        base |= {"seconds": round(self.seconds, 1), "notes": "; ".join(self.notes), "error": self.error or ""}
        base |= self.extra
        return base


async def run_scenario(scn: Scenario, env: dict[str, str], stack_dir: Path, cfg: MatrixConfig, index: int,
                       respawned: list[subprocess.Popen[bytes]] | None = None) -> ScenarioResult:
    """Run one scenario against a running stack (``env``); never raises for the scenario's own failure.

    ``respawned`` collects processes an injector restarted (the broker): the stack's state file points at them, so
    ``stack down`` stops them; the caller reaps the handles after that.
    """
    before = await _redis_snapshot(env)
    res = await _run_scenario(scn, env, stack_dir, cfg, index, respawned)
    after = await _redis_snapshot(env)
    if before is not None and after is not None:
        res.extra["redis_cmds"] = delta(before, after).calls
    return res


async def _redis_snapshot(env: dict[str, str]) -> CommandStats | None:
    url = env.get("UPSTASH_REDIS_URL")
    if not url:
        return None
    try:
        return await command_total(url, ca_bundle=env.get("WHATRACK_REDIS_CA_BUNDLE"))
    except Exception as e:  # the measurement is an extra: a failed snapshot must not fail the scenario
        log.warning("[faults] INFO commandstats failed: %s", type(e).__name__)
        return None


async def _run_scenario(scn: Scenario, env: dict[str, str], stack_dir: Path, cfg: MatrixConfig, index: int,
                        respawned: list[subprocess.Popen[bytes]] | None) -> ScenarioResult:
    t0 = time.monotonic()
    notes: list[str] = []
    if scn.followups:
        from whatrack.proof.worker_faults import run_worker_scenario

        try:
            load, extra = await run_worker_scenario(env, stack_dir, cfg, seed=cfg.seed * 1000 + index, notes=notes)
            extra["seconds_jobs"] = round(load.drain_s, 1)
            return ScenarioResult(scn, load, time.monotonic() - t0, notes, extra=extra)
        except WhatrackError as e:
            return ScenarioResult(scn, None, time.monotonic() - t0, notes, error=str(e))
    settings = Settings.from_env(env, env_files=())
    public_port = urlsplit(env["WEBHOOK_PUBLIC_URL"]).port
    from whatrack.devstack.servers import free_port

    endpoint_port = free_port() if scn.front else public_port
    endpoint = EndpointProcess(env, port=endpoint_port, workers=cfg.workers)
    config = LoadConfig(n=cfg.n, seed=cfg.seed * 1000 + index, rate=cfg.rate, concurrency=cfg.concurrency,
                        settle_timeout=cfg.settle_timeout, progress=cfg.progress,
                        organization=f"faults {cfg.seed} {scn.name}")
    respawned = respawned if respawned is not None else []

    async def during(progress: Progress) -> None:
        if scn.inject is None:
            return
        await progress.reached(scn.at)
        ctx = FaultContext(env, stack_dir, endpoint, progress, cfg.outage_s, notes, respawned)
        await scn.inject(ctx)

    try:
        await asyncio.to_thread(endpoint.start)
        async with contextlib.AsyncExitStack() as stack:
            if scn.front is not None:
                from whatrack.devstack.serving import serving
                from whatrack.proof.front import Front as FrontApp

                front = FrontApp(endpoint.url, fail_ratio=scn.front.fail_ratio, duplicate=scn.front.duplicate,
                                 seed=config.seed)
                await stack.enter_async_context(serving(front.app, port=public_port or 0))
                notes.append(f"front: {front.stats}")
            load = await run_load(settings, config, during=during if scn.inject else None)
            if scn.front is not None:
                notes[-1] = (f"front: {front.stats.requests} requests, {front.stats.failed_on_purpose} answered 503, "
                             f"{front.stats.duplicates} delivered twice")
        return ScenarioResult(scn, load, time.monotonic() - t0, notes)
    except WhatrackError as e:
        log.exception("[faults] scenario %s failed to run", scn.name)
        return ScenarioResult(scn, None, time.monotonic() - t0, notes, error=f"{type(e).__name__}: {e}")
    finally:
        await asyncio.to_thread(endpoint.close)
        for name in ("postgres", "centrifugo"):
            with contextlib.suppress(StackError):
                FaultContext(env, stack_dir, endpoint, Progress(0), 0).proxy(name).heal()


@dataclass
class MatrixRun:
    """The matrix's rows and the idle Redis measurement (for the cost projection)."""

    results: list[ScenarioResult]
    idle_cmds: int = 0
    idle_s: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def rows(self) -> list[dict[str, Any]]:
        return table(self.results)

    def projection(self, *, webhooks_per_day: float, followups_per_day: float) -> Projection | None:
        """Project a day from this run (None when the follow-up row or the idle window is missing).

        QStash deliveries per webhook come from the message rows (publishes + RETRY events); Redis commands from the
        follow-up row (per job) and the idle window.
        """
        loads = [r for r in self.results if r.load is not None and not r.scenario.followups]
        worker = next((r for r in self.results if r.scenario.followups and r.load is not None), None)
        if not loads or worker is None or worker.load is None or not self.idle_s:
            return None
        webhooks = sum(r.load.published for r in loads if r.load)
        deliveries = webhooks + sum(r.load.retries for r in loads if r.load)
        jobs = int(worker.extra.get("jobs_completed", 0)) or 1
        return project(webhooks_per_day=webhooks_per_day, followups_per_day=followups_per_day,
                       followup_cmds=int(worker.extra.get("redis_cmds", 0)), followups=jobs,
                       followup_s=max(float(worker.extra.get("seconds_jobs") or worker.seconds), 1e-3),
                       idle_cmds=self.idle_cmds, idle_s=self.idle_s, qstash_deliveries=deliveries,
                       webhooks=webhooks)


async def measure_idle(env: dict[str, str], seconds: float) -> int:
    """Redis commands on the Upstash Redis while only the follow-up worker runs (it polls) for ``seconds``."""
    from whatrack.demo import DEMO_NAME, DEMO_TOKEN
    from whatrack.proof.worker_faults import WorkerProcess

    worker = WorkerProcess(env | {"UAZAPI_INSTANCE_TOKENS": env.get("UAZAPI_INSTANCE_TOKENS")
                                  or f"{DEMO_NAME}:{DEMO_TOKEN}"})
    worker.start()
    try:
        await asyncio.sleep(3.0)  # start-up commands (script loads, INFO) are not idle polling
        before = await _redis_snapshot(env)
        await asyncio.sleep(seconds)
        after = await _redis_snapshot(env)
    finally:
        await asyncio.to_thread(worker.close)
    return delta(before, after).calls if before and after else 0


def run_matrix(scenarios: Sequence[Scenario] = SCENARIOS, cfg: MatrixConfig = MatrixConfig(), *,  # noqa: B008 (frozen)
               stack_dir: Path = Path("runs/.faults-stack"), database_url: str | None = None) -> MatrixRun:
    """Bring a stack up in ``stack_dir`` (time-scaled broker), run every scenario in order, measure the idle Redis
    command rate, bring the stack down.

    Raises:
        StackError: the stack could not start.
    """
    from whatrack.devstack.stack import running_stack

    results: list[ScenarioResult] = []
    respawned: list[subprocess.Popen[bytes]] = []
    try:
        with running_stack(stack_dir, time_scale=cfg.time_scale, database_url=database_url) as st:
            env = st.env()
            for i, scn in enumerate(scenarios):
                log.info("[faults] scenario %s (%d/%d)", scn.name, i + 1, len(scenarios))
                res = asyncio.run(run_scenario(scn, env, Path(stack_dir).resolve(), cfg, i, respawned))
                log.info("[faults] %s: %s in %.0f s %s", scn.name, "PASS" if res.passed else "FAIL", res.seconds,
                         res.error or "")
                results.append(res)
            idle = asyncio.run(measure_idle(env, cfg.idle_s)) if cfg.idle_s else 0
    finally:
        for p in respawned:  # stopped by `stack down` (the state file points at them): reap, or stop if it did not
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
    return MatrixRun(results, idle, cfg.idle_s)


def table(results: Sequence[ScenarioResult]) -> list[dict[str, Any]]:
    """The matrix as rows (``pandas.DataFrame(table(results))`` in a notebook)."""
    return [r.row() for r in results]
