"""The fault matrix: the scenario table as data, which scenarios may run in cloud mode (the plan, the refusals), the
HTTP front that injects 503s and duplicate deliveries, and the whole matrix run small on the offline stack (every
scenario must end with nothing lost and nothing duplicated)."""

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

from whatrack.cli import main
from whatrack.errors import ConfigError
from whatrack.proof import faults, scenarios
from whatrack.proof.faults import MatrixConfig, ScenarioResult, table
from whatrack.proof.front import Front
from whatrack.proof.ledger import Observations, Sent, StoredRow, classify
from whatrack.proof.load import LoadConfig, LoadResult
from whatrack.proof.plots import latency_stats
from whatrack.proof.scenarios import SCENARIOS, Scenario


def test_the_matrix_covers_every_required_fault() -> None:
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert set(names) >= {"baseline", "endpoint_sigkill", "postgres_outage", "centrifugo_outage", "broker_sigkill",
                          "db_resets", "db_latency", "duplicate_delivery", "endpoint_5xx", "worker_sigkill"}
    for s in SCENARIOS:
        assert s.description
        kinds = (s.inject is not None) + (s.front is not None) + s.followups + (s.copies > 1)
        assert s.name == "baseline" or kinds == 1
        assert 0.0 <= s.at < 1.0
    assert next(s for s in SCENARIOS if s.name == "endpoint_5xx").front.fail_ratio == 0.05  # type: ignore[union-attr]
    assert MatrixConfig().n <= 200 and MatrixConfig().outage_s <= 5  # CI small by default


CLOUD_SAFE = {"baseline", "endpoint_sigkill", "endpoint_5xx", "duplicate_delivery"}


def test_only_what_the_operator_runs_is_cloud_safe() -> None:
    assert {s.name for s in scenarios.cloud_safe()} == CLOUD_SAFE
    assert {s.name for s in scenarios.offline_only()} == {s.name for s in SCENARIOS} - CLOUD_SAFE
    # a cloud-safe scenario injects through the endpoint it runs, a front on its port, or its own publishes
    assert all(s.inject in (None, scenarios.kill_endpoint) and not s.followups for s in scenarios.cloud_safe())
    assert next(s for s in SCENARIOS if s.name == "duplicate_delivery").copies == 2


def test_the_plan_offline_runs_what_is_named() -> None:
    plan = scenarios.plan(scenarios.OFFLINE_DEFAULT, mode="offline")
    assert [s.name for s in plan.run] == ["endpoint_sigkill", "postgres_outage"] and plan.offline_only == ()
    assert scenarios.plan("", mode="offline").run == ()
    with pytest.raises(ConfigError, match=r"unknown fault scenario.*'nope'.*known: baseline"):
        scenarios.plan("baseline,nope", mode="offline")


def test_the_plan_in_cloud_runs_the_cloud_safe_ones_and_lists_every_other() -> None:
    default = scenarios.plan(scenarios.OFFLINE_DEFAULT, mode="cloud")
    assert [s.name for s in default.run] == list(scenarios.CLOUD_DEFAULT)
    assert {s.name for s in default.offline_only} == {s.name for s in SCENARIOS} - CLOUD_SAFE
    assert "postgres_outage" in default.note and "offline only" in default.note
    assert [s.name for s in scenarios.plan(" duplicate_delivery , baseline", mode="cloud").run] == [
        "duplicate_delivery", "baseline"]
    assert scenarios.plan("", mode="cloud").run == ()


@pytest.mark.parametrize("asked", ["postgres_outage", "endpoint_sigkill,db_latency", "worker_sigkill"])
def test_an_offline_only_scenario_is_refused_in_cloud_naming_the_cloud_safe_ones(asked: str) -> None:
    with pytest.raises(ConfigError) as e:
        scenarios.plan(asked, mode="cloud")
    offline_one = asked.split(",")[-1]
    assert e.value.variable == "faults"
    assert f"{offline_one} is offline only" in str(e.value)
    assert "cloud-safe scenarios run: baseline, endpoint_sigkill, duplicate_delivery, endpoint_5xx" in str(e.value)


async def test_run_scenario_refuses_an_offline_only_scenario_in_cloud_mode() -> None:
    env = {"WHATRACK_MODE": "cloud", "WEBHOOK_PUBLIC_URL": "http://127.0.0.1:9/api/v1/webhooks/qstash/whatsapp"}
    scn = next(s for s in SCENARIOS if s.name == "db_resets")
    res = await faults.run_scenario(scn, env, None, MatrixConfig(n=5), 0)
    assert not res.passed and res.load is None and "db_resets is offline only" in (res.error or "")
    with pytest.raises(ConfigError, match="broker_sigkill is offline only"):
        faults.run_matrix([next(s for s in SCENARIOS if s.name == "broker_sigkill")], env=env)
    with pytest.raises(ConfigError, match="WHATRACK_MODE"):
        faults.run_matrix([], env={"WHATRACK_MODE": "offline"})


def test_whatrack_faults_in_cloud_refuses_an_offline_only_scenario(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WHATRACK_MODE", "cloud")
    assert main(["faults", "--only", "endpoint_sigkill,centrifugo_outage"]) == 2
    err = capsys.readouterr().err
    assert "--only: fault scenario centrifugo_outage is offline only" in err
    assert "cloud-safe scenarios run: baseline, endpoint_sigkill, duplicate_delivery, endpoint_5xx" in err
    assert not Path("runs/.faults-stack").exists()  # no offline stack was brought up


def test_the_notebooks_faults_default_is_the_offline_default() -> None:
    from whatrack.runs.params import declared

    nb = Path(__file__).resolve().parent.parent / "notebooks" / "30_validation.ipynb"
    assert declared(nb)["faults"].default.strip("\"'") == scenarios.OFFLINE_DEFAULT


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
    twice = "every webhook published 2 times: 80 QStash messages for 40 webhooks, 80 of them delivered"
    assert twice in rows["duplicate_delivery"]["notes"]
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
