"""The fault matrix: the scenario table as data, the HTTP front that injects 503s and duplicate deliveries, and the
whole matrix run small on the offline stack (every scenario must end with nothing lost and nothing duplicated)."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from whatrack.proof.faults import SCENARIOS, MatrixConfig, Scenario, ScenarioResult, table
from whatrack.proof.front import Front
from whatrack.proof.ledger import Observations, Sent, StoredRow, classify
from whatrack.proof.load import LoadConfig, LoadResult
from whatrack.proof.plots import latency_stats


def test_the_matrix_covers_every_required_fault() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert set(names) >= {"baseline", "endpoint_sigkill", "postgres_outage", "centrifugo_outage", "broker_sigkill",
                          "db_resets", "db_latency", "duplicate_delivery", "endpoint_5xx", "worker_sigkill"}
    for s in SCENARIOS:
        assert s.description
        assert s.name == "baseline" or (s.inject is not None) + (s.front is not None) + s.followups == 1
        assert 0.0 <= s.at < 1.0
    assert next(s for s in SCENARIOS if s.name == "endpoint_5xx").front.fail_ratio == 0.05  # type: ignore[union-attr]
    assert MatrixConfig().n <= 200 and MatrixConfig().outage_s <= 5  # CI small by default


def _result(lost: int = 0, dup: int = 0) -> LoadResult:
    sent = [Sent(f"o:{i}", 1.0, "accepted", f"m{i}") for i in range(5)]
    rows = [StoredRow(f"o:{i}", str(i), 1, 1.1) for i in range(5 - lost)] + [StoredRow("o:0", "0", 1, 1.2)] * dup
    ledger = classify(sent, Observations(rows=tuple(rows)))
    return LoadResult(LoadConfig(n=5), 5, 5, 1.0, 1.0, 5.0, 5.0, latency_stats([1.0]), latency_stats([]), 0, 0, [],
                      ledger)


def test_scenario_result_verdict_and_row() -> None:
    scn = Scenario("x", "a test row")
    # no publications in these hand-made records: every stored message counts as lost on realtime
    r = ScenarioResult(scn, _result(), 1.0, ["did a thing"])
    assert not r.passed and r.row()["lost"] == 5
    assert not ScenarioResult(scn, None, 1.0, [], error="boom").passed
    (row,) = table([ScenarioResult(scn, _result(dup=1), 2.5, ["n"], extra={"double_sends": 0})])
    assert row["scenario"] == "x" and row["duplicated"] == 1 and row["passed"] is False and row["notes"] == "n"


@pytest.fixture
async def target() -> AsyncIterator[tuple[str, collections.Counter[str]]]:
    from whatrack.devstack.serving import serving

    seen: collections.Counter[str] = collections.Counter()

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        seen[body.decode()] += 1
        return JSONResponse({"got": body.decode(), "sig": request.headers.get("upstash-signature")})

    app = Starlette(routes=[Route("/{p:path}", echo, methods=["POST"])])
    async with serving(app) as url:
        yield url, seen


async def test_front_answers_503_to_the_asked_share(target: tuple[str, collections.Counter[str]]) -> None:
    from whatrack.devstack.serving import serving

    url, seen = target
    front = Front(url, fail_ratio=0.05, seed=3)
    async with serving(front.app) as furl, httpx.AsyncClient() as c:
        statuses = [(await c.post(f"{furl}/hook?x=1", content=f"m{i}".encode(),
                                  headers={"Upstash-Signature": "sig"})).status_code for i in range(400)]
    assert statuses.count(503) == front.stats.failed_on_purpose
    assert 5 <= front.stats.failed_on_purpose <= 40  # ~5 % of 400
    assert statuses.count(200) == 400 - front.stats.failed_on_purpose == sum(seen.values())
    assert set(seen.values()) == {1}


async def test_front_delivers_twice_and_reports_a_dead_endpoint(target: tuple[str, collections.Counter[str]]) -> None:
    from whatrack.devstack.servers import free_port
    from whatrack.devstack.serving import serving

    url, seen = target
    front = Front(url, duplicate=True)
    async with serving(front.app) as furl, httpx.AsyncClient() as c:
        r = await c.post(f"{furl}/hook", content=b"once", headers={"Upstash-Signature": "s1"})
        assert r.status_code == 200 and r.json() == {"got": "once", "sig": "s1"}
    assert seen["once"] == 2 and front.stats.duplicates == 1
    dead = Front(f"http://127.0.0.1:{free_port()}")
    async with serving(dead.app) as furl, httpx.AsyncClient() as c:
        assert (await c.post(f"{furl}/hook", content=b"x")).status_code == 502
    assert dead.stats.upstream_errors == 1
    with pytest.raises(ValueError):
        Front(url, fail_ratio=1.5)


@pytest.mark.slow
def test_the_fault_matrix_small_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    from whatrack.proof.faults import run_matrix

    # Small and fast (the full matrix: `whatrack faults`, MatrixConfig's sizes). time_scale 0.05: QStash's retry
    # delays (12 s, 148 s, 30 min ...) become 0.6 s, 7.4 s, 90 s, so a delivery that failed twice (e.g. into the
    # endpoint's restart) is retried after seconds, not half a minute; the third retry still waits longer than any
    # injected fault lasts.
    cfg = MatrixConfig(n=40, outage_s=1.5, followup_jobs=12, time_scale=0.05, seed=7, settle_timeout=90.0,
                       idle_s=3.0)
    run = run_matrix(SCENARIOS, cfg, stack_dir=tmp_path / "stack")
    rows = {r["scenario"]: r for r in run.rows()}
    assert set(rows) == {s.name for s in SCENARIOS}
    for name, row in rows.items():
        assert row["ledger_passed"], row
        assert row["lost"] == 0 and row["duplicated"] == 0 and row["unexpected"] == 0, row
        if name != "baseline":
            assert row["notes"], f"{name}: the fault left no trace of having been injected"
    assert "delivered twice" in rows["duplicate_delivery"]["notes"]
    worker = rows["worker_sigkill"]
    assert worker["jobs_completed"] == 12 and worker["jobs_sent"] == 12
    assert worker["redis_cmds"] > 12  # BullMQ: several commands per job
    assert run.idle_cmds > 0  # the worker polls even when idle
    projection = run.projection(webhooks_per_day=10_000, followups_per_day=500)
    assert projection is not None and projection.qstash_msgs_per_webhook >= 1.0
    assert projection.redis_cmds_per_s_idle > 0
    # A worker killed after UAZAPI accepted a send but before the :sent record finds the send's echo before sending
    # the rescued job again (whatrack.followups.worker): the lead gets each follow-up once.
    assert worker["double_sends"] == 0, worker
    assert all(row["passed"] for row in rows.values())
