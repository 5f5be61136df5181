"""The fault matrix: each scenario (:mod:`whatrack.proof.scenarios`) is one row, run while the load is flowing, with
its own ledger verdict.

:func:`run_matrix` brings up the offline stack once (or, in cloud mode, uses the configured services), and for each
scenario starts the endpoint (``--workers K`` processes) on ``WEBHOOK_PUBLIC_URL``'s port, publishes a fresh batch of
generated webhooks, injects the fault, waits for everything to settle, replays the DLQ, and reconciles (the loss
ledger).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from whatrack.errors import ConfigError, StackError, WhatrackError
from whatrack.proof.config import LoadConfig
from whatrack.proof.config import MatrixConfig as MatrixConfig  # re-exported
from whatrack.proof.cost import CommandStats, Projection, command_total, delta, project
from whatrack.proof.load import EndpointProcess, LoadResult, Progress, run_load
from whatrack.proof.scenarios import SCENARIOS, FaultContext, Scenario, offline_only_refusal
from whatrack.settings import Settings

log = logging.getLogger("whatrack.proof.faults")


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
