"""The fault scenarios: the matrix's rows as data, their injectors, and which of them a run may use.

A scenario names a fault and when to inject it (a share of the publishing done); :mod:`whatrack.proof.faults` runs
them. A new scenario is a few lines: a :class:`Scenario` with an ``inject`` coroutine, a ``front`` setting, or
``copies``.

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
import os
import signal
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from whatrack.devstack import process
from whatrack.devstack.fault_proxy import FaultControl
from whatrack.errors import ConfigError, StackError
from whatrack.proof.load import EndpointProcess, Progress


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
    part.update(pid=new.pid, created=process.created(new.pid))  # so `stack down` stops the new one
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
