"""The follow-up worker tells operators what happens: a paused queue (log + gauge), job outcomes, Redis errors, jobs
per state, at its own ``/metrics``; and on the devstack a follow-up for the fixtures' instance is sent."""
# ruff: noqa: F811  (pytest fixtures imported from followups_fixtures are redefined as parameters)

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from bullmq import Queue
from followups_fixtures import (  # noqa: F401  (fixtures)
    INST,
    LEAD,
    ORG,
    add,
    ctx,
    finished,
    handler,
    queue,
    running,
    uazapi,
    uazapi_server,
    wait_until,
)
from followups_support import StoreForTests, UazapiStandIn

from whatrack import metrics as prom
from whatrack.devstack import servers
from whatrack.devstack.stack import Stack
from whatrack.followups.jobs import FollowupJob, pooled_client
from whatrack.followups.monitor import QueueMonitor, is_connection_error
from whatrack.followups.process import WorkerContext
from whatrack.metrics import Metrics

TESTS = Path(__file__).resolve().parent
PAUSED = 'whatrack_queue_paused{queue="followup"}'


def samples(m: Metrics) -> dict[str, float]:
    return prom.parse(m.render().decode())


def outcomes(m: Metrics) -> dict[str, float]:
    s = samples(m)
    return {o: s[f'whatrack_followup_jobs_total{{outcome="{o}"}}'] for o in prom.FOLLOWUP_OUTCOMES}


async def test_a_paused_queue_is_said_once_with_the_fix_and_shown_in_a_gauge(
        queue: Queue, redis_url: str, ctx: WorkerContext, uazapi: UazapiStandIn,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="whatrack.followups")
    jid = await add(queue, "while-paused")
    await queue.pause()
    m = Metrics()

    def paused_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "PAUSED" in r.getMessage()]

    async with running(redis_url, handler(ctx), ctx, metrics=m) as fw:
        [warning] = paused_warnings()  # said at start, not after the first interval
        assert "whatrack followup resume" in warning and "whatrack migrate resume" in warning
        assert "1 job(s) waiting" in warning
        assert samples(m)[PAUSED] == 1
        assert (await fw.monitor.sample()) is not None
        assert len(paused_warnings()) == 1  # once per change of state, not per look
        assert uazapi.attempts == []  # nothing runs while paused
        await queue.resume()
        look = await fw.monitor.sample()
        assert look is not None and look.paused is False
        assert await finished(queue, jid) == {jid: "completed"}
    assert samples(m)[PAUSED] == 0
    assert any(r.levelname == "INFO" and "was resumed" in r.getMessage() for r in caplog.records)
    assert uazapi.sends_by_job() == {jid: 1}


async def test_each_job_outcome_is_counted(queue: Queue, redis_url: str, ctx: WorkerContext,
                                           uazapi: UazapiStandIn) -> None:
    store = ctx.store
    assert isinstance(store, StoreForTests)
    scheduled = datetime.now(UTC) - timedelta(minutes=5)
    replied = LEAD + 1
    await store.add_lead(ORG, replied, "5511977776666")
    await store.add_reply(replied, scheduled + timedelta(minutes=1))
    uazapi.fail_next(503, job_id="flaky")
    m = Metrics()
    assert set(outcomes(m).values()) == {0.0}  # every series exists from the first scrape
    async with running(redis_url, handler(ctx), ctx, metrics=m):
        ids = [await add(queue, "plain"),
               await add(queue, "flaky", backoff={"type": "fixed", "delay": 50}),
               await add(queue, "replied", FollowupJob(ORG, INST, replied, "x", scheduled).to_wire()),
               await add(queue, "unknown-lead", FollowupJob(ORG, INST, 999, "x", datetime.now(UTC)).to_wire())]
        states = await finished(queue, *ids)
    assert states == {"plain": "completed", "flaky": "completed", "replied": "completed", "unknown-lead": "failed"}
    assert outcomes(m) == {"sent": 2, "skipped": 1, "failed": 1, "retried": 1}


async def test_the_monitor_samples_jobs_per_state(queue: Queue, redis_url: str) -> None:
    for i in range(3):
        await add(queue, f"later-{i}", delay=60_000)
    await add(queue, "now")
    client = pooled_client(redis_url, max_connections=2)
    m = Metrics()
    try:
        look = await QueueMonitor(client, m, url=redis_url).sample()
    finally:
        await client.aclose()
    assert look is not None and look.paused is False
    assert (look.counts["delayed"], look.counts["wait"], look.counts["active"]) == (3, 1, 0)
    s = samples(m)
    assert s['whatrack_queue_jobs{queue="followup",state="delayed"}'] == 3
    assert s['whatrack_queue_jobs{queue="followup",state="wait"}'] == 1 and s[PAUSED] == 0


async def test_an_unreachable_redis_is_counted_per_look_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{servers.free_port()}/0"  # nothing listens there
    client = pooled_client(url, max_connections=2)
    m = Metrics()
    monitor = QueueMonitor(client, m, url=url)
    try:
        assert await monitor.sample() is None and await monitor.sample() is None
    finally:
        await client.aclose()
    assert samples(m)["whatrack_redis_connection_errors_total"] == 2
    said = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


def test_connection_errors_are_told_apart_from_command_errors() -> None:
    import redis.exceptions as rexc

    assert is_connection_error(rexc.ConnectionError("refused"))
    assert is_connection_error(rexc.TimeoutError("slow"))
    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError as e:
            raise RuntimeError("moveToActive failed") from e
    except RuntimeError as wrapped:
        assert is_connection_error(wrapped)
    assert not is_connection_error(rexc.ResponseError("NOSCRIPT"))


# -- the worker as a process: its own /metrics, `whatrack followup resume` ---------------------------------------------


def _whatrack(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whatrack.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


async def _scrape(url: str, key: str, want: float) -> dict[str, float]:
    """Scrape ``url`` until sample ``key`` equals ``want`` (a hang guard, not a speed check)."""
    got: dict[str, float] = {}

    async def ok() -> bool:
        nonlocal got
        async with httpx.AsyncClient() as c:
            try:
                r = await c.get(url)
            except httpx.TransportError:
                return False
        got = prom.parse(r.text)
        return got.get(key) == want

    await wait_until(ok, f"{key} == {want} at {url}")
    return got


@pytest.mark.slow
async def test_the_worker_serves_its_metrics_and_resume_lets_it_run(
        queue: Queue, redis_url: str, ctx: WorkerContext, uazapi: UazapiStandIn, tmp_path: Path) -> None:
    jid = await add(queue, "after-migration")
    await queue.pause()  # as a migration leaves the target's queue
    port = servers.free_port()
    env = {**os.environ, "UPSTASH_REDIS_URL": redis_url, "UAZAPI_BASE_URL": uazapi.url,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "whatrack.followups.cli", "--context",
                                 "followups_support:build_context_for_tests", "--metrics-port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        seen = await _scrape(url, PAUSED, 1)
        assert seen['whatrack_queue_jobs{queue="followup",state="wait"}'] + \
            seen['whatrack_queue_jobs{queue="followup",state="paused"}'] == 1
        text = log_path.read_text()
        assert "is PAUSED" in text and "whatrack followup resume" in text
        res = _whatrack("followup", "resume", env=env)
        assert res.returncode == 0 and "resumed" in res.stdout, res.stderr
        assert await finished(queue, jid) == {jid: "completed"}
        await _scrape(url, 'whatrack_followup_jobs_total{outcome="sent"}', 1)
        again = _whatrack("followup", "resume", env=env)
        assert again.returncode == 0 and "was not paused" in again.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    assert uazapi.sends_by_job() == {jid: 1}


def test_a_taken_metrics_port_is_a_clear_error(redis_url: str) -> None:
    with _TakenPort() as port:
        env = {**os.environ, "UPSTASH_REDIS_URL": redis_url, "UAZAPI_BASE_URL": "http://127.0.0.1:9",
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run([sys.executable, "-m", "whatrack.followups.cli", "--context",
                              "followups_support:build_context_for_tests", "--metrics-port", str(port)],
                             env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2 and "--metrics-port: cannot serve metrics on 127.0.0.1" in res.stderr


class _TakenPort:
    """A loopback port something listens on, for the ``with`` block."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# -- the devstack: the fixtures' instance can send a follow-up ---------------------------------------------------------


@pytest.mark.slow
def test_a_followup_for_the_fixture_instance_is_sent_on_the_devstack(devstack: Stack, fixtures_dir: Path,
                                                                     tmp_path: Path) -> None:
    from whatrack.demo import DEMO_INSTANCES, DEMO_NAME, DEMO_TOKEN
    from whatrack.proof.replay import register_fixture_instances
    from whatrack.store.api import Store
    from whatrack.uazapi import normalizer

    env = {**os.environ, **devstack.env()}
    body = (fixtures_dir / "messages_inbound_text.json").read_bytes()
    fixture = json.loads(body)
    assert (fixture["instanceName"], fixture["token"]) == (DEMO_NAME, DEMO_TOKEN)
    names = {name for name, _, _ in DEMO_INSTANCES}
    assert names <= {entry.split(":", 1)[0] for entry in env["UAZAPI_INSTANCE_TOKENS"].split(",")}

    async def prepare() -> tuple[int, int, int]:
        store = Store.from_url(env["DATABASE_URL"])
        try:
            await register_fixture_instances(store, [body])  # what `whatrack replay` registers
            inst = await store.find_instance(fixture["instanceName"], fixture["token"])
            assert inst is not None
            stored = await store.save_message(inst, normalizer.normalize(normalizer.parse_body(body)))
            return inst.organization_id, inst.id, stored.lead_id
        finally:
            await store.aclose()

    org, inst_id, lead = asyncio.run(prepare())
    listing = _whatrack("leads", "--organization-id", str(org), env=env)
    assert listing.returncode == 0, listing.stderr
    rows = [m.groups() for m in re.finditer(rf"^ *(\d+) .+? +(\d+) {DEMO_NAME} +(\d+) ", listing.stdout, re.M)]
    assert (str(org), str(inst_id), str(lead)) in rows  # the ids `followup schedule` takes
    assert DEMO_TOKEN not in listing.stdout
    job_id = f"devstack-{os.getpid()}"
    sched = _whatrack("followup", "schedule", "--organization-id", str(org), "--instance-id", str(inst_id),
                      "--lead-id", str(lead), "--text", "Ainda tem interesse?", "--in", "0s", "--job-id", job_id,
                      env=env)
    assert sched.returncode == 0 and sched.stdout.strip() == job_id, sched.stderr
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "whatrack.followups.cli"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        async def sent() -> bool:
            async with httpx.AsyncClient(base_url=env["UAZAPI_BASE_URL"]) as c:
                sends = (await c.get("/_dev/sends")).json()["sends"]
            return any(s["track_id"] == job_id and s["ok"] for s in sends)

        asyncio.run(wait_until(sent, f"the stand-in UAZAPI to get follow-up {job_id}"))
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0, log_path.read_text()
    assert f"follow-up {job_id} sent to lead {lead}" in log_path.read_text()
