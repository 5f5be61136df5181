"""The fault matrix: each scenario is one row (data), run while the load is flowing, with its own ledger verdict.

A scenario names a fault and when to inject it (a share of the publishing done); :func:`run_matrix` brings up the
offline stack once (or, in cloud mode, uses the configured services), and for each scenario starts the endpoint
(``--workers K`` processes) on ``WEBHOOK_PUBLIC_URL``'s port, publishes a fresh batch of generated webhooks, injects
the fault, waits for everything to settle, replays the DLQ, and reconciles (the loss ledger). A new scenario is a few
lines: a :class:`Scenario` with an ``inject`` coroutine, a ``front`` setting, or ``copies``.

Faults: the endpoint SIGKILLed and restarted; PostgreSQL or Centrifugo unreachable for N seconds (fault proxy
outage); the QStash broker SIGKILLed and restarted; connection resets and added latency on the database link; every
webhook published twice (two QStash messages, one body: each delivered twice); 5 % of deliveries answered 503 (an
HTTP front on the public port, no product change); the follow-up worker SIGKILLed with jobs active
(:mod:`whatrack.proof.worker_faults`).

Cloud mode: a scenario is ``cloud_safe`` when it touches only what the operator runs here (its own endpoint process,
a front on its own public port, its own publishes), so it runs against the real QStash too; the others break a
service (PostgreSQL, Centrifugo, the broker, the follow-up queue) through the devstack's fault proxies and processes,
and are offline only: :func:`plan` lists them in cloud mode instead of running them, and :func:`select` refuses them.
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
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from whatrack.devstack.fault_proxy import FaultControl
from whatrack.errors import ConfigError, StackError, WhatrackError
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
    stack_dir: Path | None  # the offline stack's directory (None in cloud mode)
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
    copies: int = 1  # QStash messages per webhook (2: every webhook published twice, so delivered twice)
    cloud_safe: bool = False  # touches only what the operator runs here: may run against the real QStash


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
        began = ctx.progress.fraction  # the share published when it began (after the outage, it is 100 % or so)
        await asyncio.to_thread(ctx.proxy(part).outage, ctx.outage_s)
        await asyncio.sleep(ctx.outage_s)
        ctx.notes.append(f"{part} unreachable {ctx.outage_s:g} s from {began:.0%} of the publishing")
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
    if ctx.stack_dir is None:
        raise StackError("broker_sigkill needs the offline stack's directory (WHATRACK_STACK_DIR)")
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
    Scenario("baseline", "no fault: the reference row", cloud_safe=True),
    Scenario("endpoint_sigkill", "endpoint processes SIGKILLed mid-load, restarted 1 s later", kill_endpoint,
             cloud_safe=True),
    Scenario("postgres_outage", "PostgreSQL unreachable for the outage duration", outage("postgres")),
    Scenario("centrifugo_outage", "Centrifugo unreachable for the outage duration", outage("centrifugo")),
    Scenario("broker_sigkill", "QStash broker SIGKILLed mid-load and restarted", kill_broker),
    Scenario("db_resets", "database connections reset (RST), new ones too, for half the outage", db_resets),
    Scenario("db_latency", "+50 ms each way on the database link", db_latency),
    Scenario("duplicate_delivery", "every webhook published twice to QStash (two messages, one body): each "
             "delivered twice", copies=2, cloud_safe=True),
    Scenario("endpoint_5xx", "5 % of deliveries answered 503 before the endpoint", front=Front(fail_ratio=0.05),
             cloud_safe=True),
    Scenario("worker_sigkill", "follow-up worker SIGKILLed with jobs active, restarted", followups=True),
)


_BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}

#: Phase 30's ``faults`` default (its parameters cell). Offline it runs these; in cloud mode, where postgres_outage
#: cannot run, this default means :data:`CLOUD_DEFAULT`.
OFFLINE_DEFAULT = "endpoint_sigkill,postgres_outage"
#: What phase 30's default runs in cloud mode: every cloud-safe fault (the plain load before them is the baseline).
CLOUD_DEFAULT: tuple[str, ...] = ("endpoint_sigkill", "endpoint_5xx", "duplicate_delivery")


def cloud_safe() -> list[Scenario]:
    """The scenarios that may run against the real services (cloud mode), in the matrix's order."""
    return [s for s in SCENARIOS if s.cloud_safe]


def offline_only() -> list[Scenario]:
    """The scenarios that run on the offline stack only, in the matrix's order."""
    return [s for s in SCENARIOS if not s.cloud_safe]


def parse_names(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]`` (the ``faults`` parameter, ``--only``)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def offline_only_refusal(names: Iterable[str]) -> str | None:
    """Why ``names`` cannot run in cloud mode (one sentence naming the offline-only ones and the cloud-safe ones),
    or None when every known one of them is cloud-safe."""
    bad = [n for n in names if n in _BY_NAME and not _BY_NAME[n].cloud_safe]
    if not bad:
        return None
    verb = "is" if len(bad) == 1 else "are"
    return (f"fault scenario {', '.join(bad)} {verb} offline only: such a scenario breaks a service (PostgreSQL, "
            "Centrifugo, the broker, the follow-up queue) through the devstack's fault proxies and processes, which a "
            f"cloud run does not own; in cloud mode only the cloud-safe scenarios run: "
            f"{', '.join(s.name for s in cloud_safe())}. "
            f"Run {', '.join(bad)} offline (`whatrack run 30` or `whatrack faults` without WHATRACK_MODE=cloud)")


def select(names: Sequence[str], *, mode: str, what: str = "faults") -> list[Scenario]:
    """The scenarios named, in the order given.

    Raises:
        ConfigError: (``variable`` is ``what``) a name is unknown, or names an offline-only scenario in cloud mode.
    """
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ConfigError(what, f"unknown fault scenario(s) {unknown}; known: {', '.join(_BY_NAME)}")
    refusal = offline_only_refusal(names) if mode == "cloud" else None
    if refusal:
        raise ConfigError(what, refusal)
    return [_BY_NAME[n] for n in names]


@dataclass(frozen=True)
class FaultPlan:
    """What phase 30 runs (``run``) and, in cloud mode, what it lists as offline only (``offline_only``)."""

    run: tuple[Scenario, ...]
    offline_only: tuple[Scenario, ...]
    note: str


def plan(faults: str, *, mode: str) -> FaultPlan:
    """Phase 30's fault plan from its ``faults`` parameter: offline, the scenarios named; in cloud mode the cloud-safe
    ones named (the default, :data:`OFFLINE_DEFAULT`, means :data:`CLOUD_DEFAULT` there), and every offline-only
    scenario listed, never silently skipped.

    Raises:
        ConfigError: an unknown name, or an offline-only one named in cloud mode (:func:`offline_only_refusal`).
    """
    names = parse_names(faults)
    if mode != "cloud":
        chosen = select(names, mode=mode)
        return FaultPlan(tuple(chosen), (), f"offline: {', '.join(names) or 'no fault scenario'} on the devstack")
    default = names == parse_names(OFFLINE_DEFAULT)
    chosen = select(list(CLOUD_DEFAULT) if default else names, mode=mode)
    listed = tuple(offline_only())
    note = (f"cloud mode: {', '.join(s.name for s in chosen) or 'no fault scenario'} against the configured services"
            + (" (the default's cloud-safe scenarios)" if default else "")
            + f"; offline only, not run here: {', '.join(s.name for s in listed)}")
    return FaultPlan(tuple(chosen), listed, note)


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


async def run_scenario(scn: Scenario, env: dict[str, str], stack_dir: Path | None, cfg: MatrixConfig, index: int,
                       respawned: list[subprocess.Popen[bytes]] | None = None) -> ScenarioResult:
    """Run one scenario against a running stack (``env``), or in cloud mode against the configured services (a
    cloud-safe scenario only; ``stack_dir`` may then be None); never raises for the scenario's own failure.

    ``respawned`` collects processes an injector restarted (the broker): the stack's state file points at them, so
    ``stack down`` stops them; the caller reaps the handles after that.
    """
    cloud = Settings.from_env(env, env_files=()).mode == "cloud"
    if cloud and not scn.cloud_safe:
        return ScenarioResult(scn, None, 0.0, [], error=f"ConfigError: {offline_only_refusal([scn.name])}")
    # The Redis command count is the cost projection's, offline; in the cloud other traffic shares the database.
    before = None if cloud else await _redis_snapshot(env)
    res = await _run_scenario(scn, env, stack_dir, cfg, index, respawned)
    after = None if cloud else await _redis_snapshot(env)
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


async def _run_scenario(scn: Scenario, env: dict[str, str], stack_dir: Path | None, cfg: MatrixConfig,
                        index: int, respawned: list[subprocess.Popen[bytes]] | None) -> ScenarioResult:
    t0 = time.monotonic()
    notes: list[str] = []
    if scn.followups:
        if stack_dir is None:
            return ScenarioResult(scn, None, 0.0, notes, error="StackError: worker_sigkill needs the offline stack")
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

    if not public_port:
        return ScenarioResult(scn, None, 0.0, notes, error=(
            "ConfigError: WEBHOOK_PUBLIC_URL has no port: the scenario runs its own endpoint (or its front) on that "
            "port of this machine, to kill it; point the public URL (or the tunnel behind it) at a local port"))
    endpoint_port = free_port() if scn.front else public_port
    endpoint = EndpointProcess(env, port=endpoint_port, workers=cfg.workers)
    config = LoadConfig(n=cfg.n, seed=cfg.seed * 1000 + index, rate=cfg.rate, concurrency=cfg.concurrency,
                        settle_timeout=cfg.settle_timeout, progress=cfg.progress,
                        organization=f"faults {cfg.seed} {scn.name}", copies=scn.copies)
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
                notes[-1] = (f"front: {front.stats.requests} requests, {front.stats.failed_on_purpose} answered 503"
                             + (f", {front.stats.duplicates} delivered twice" if scn.front.duplicate else ""))
            if scn.copies > 1:
                messages = len({s.qstash_id for s in load.sent if s.qstash_id})
                notes.append(f"every webhook published {scn.copies} times: {messages} QStash messages for "
                             f"{load.ledger.total} webhooks, {load.delivered} of them delivered (QStash's final "
                             "states, read before the ledger)")
        return ScenarioResult(scn, load, time.monotonic() - t0, notes)
    except WhatrackError as e:
        log.exception("[faults] scenario %s failed to run", scn.name)
        return ScenarioResult(scn, None, time.monotonic() - t0, notes, error=f"{type(e).__name__}: {e}")
    finally:
        await asyncio.to_thread(endpoint.close)
        if not scn.cloud_safe:  # only an offline-only scenario touches the fault proxies
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


def _run_all(scenarios: Sequence[Scenario], env: dict[str, str], stack_dir: Path | None, cfg: MatrixConfig,
             respawned: list[subprocess.Popen[bytes]]) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    for i, scn in enumerate(scenarios):
        log.info("[faults] scenario %s (%d/%d)", scn.name, i + 1, len(scenarios))
        res = asyncio.run(run_scenario(scn, env, stack_dir, cfg, i, respawned))
        log.info("[faults] %s: %s in %.0f s %s", scn.name, "PASS" if res.passed else "FAIL", res.seconds,
                 res.error or "")
        results.append(res)
    return results


def run_matrix(scenarios: Sequence[Scenario] = SCENARIOS, cfg: MatrixConfig = MatrixConfig(), *,  # noqa: B008 (frozen)
               stack_dir: Path = Path("runs/.faults-stack"), database_url: str | None = None,
               env: Mapping[str, str] | None = None) -> MatrixRun:
    """Bring a stack up in ``stack_dir`` (time-scaled broker), run every scenario in order, measure the idle Redis
    command rate, bring the stack down.

    With ``env`` in cloud mode (``WHATRACK_MODE=cloud``, the real services' settings) no stack starts: the
    scenarios, cloud-safe ones only, run against those services, and there is no idle window (it would run a
    follow-up worker on the production queue).

    Raises:
        StackError: the stack could not start.
        ConfigError: ``env`` is not in cloud mode, or an offline-only scenario was given with it.
    """
    if env is not None:
        given = dict(env)
        if Settings.from_env(given, env_files=()).mode != "cloud":
            raise ConfigError("WHATRACK_MODE", "the fault matrix runs against given services in cloud mode only "
                              "(offline it brings its own stack)", "cloud")
        refusal = offline_only_refusal(s.name for s in scenarios)
        if refusal:
            raise ConfigError("scenarios", refusal)
        return MatrixRun(_run_all(scenarios, given, None, cfg, []))
    from whatrack.devstack.stack import running_stack

    respawned: list[subprocess.Popen[bytes]] = []
    try:
        with running_stack(stack_dir, time_scale=cfg.time_scale, database_url=database_url) as st:
            stack_env = st.env()
            results = _run_all(scenarios, stack_env, Path(stack_dir).resolve(), cfg, respawned)
            idle = asyncio.run(measure_idle(stack_env, cfg.idle_s)) if cfg.idle_s else 0
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
