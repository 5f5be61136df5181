"""The follow-up queue and worker on a real Redis, with small real collaborators (tests/followups_support.py)."""
# ruff: noqa: F811  (pytest fixtures imported from followups_fixtures are redefined as parameters)

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from bullmq import Job, Queue
from followups_fixtures import (  # noqa: F401  (fixtures)
    INST,
    LEAD,
    ORG,
    PHONE,
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
from followups_support import RealtimeForTests, StoreForTests, UazapiStandIn, stall_jobs

from whatrack import cli
from whatrack.devstack import servers
from whatrack.errors import PayloadError
from whatrack.followups.cli import parse_duration
from whatrack.followups.jobs import (
    BACKOFF,
    DEFAULT_JOB_OPTIONS,
    JOB_NAME,
    FollowupJob,
    schedule_followup,
    sent_key,
    to_iso,
)
from whatrack.followups.process import WorkerContext, may_have_been_sent, process_followup
from whatrack.followups.worker import FollowupWorker

TESTS = Path(__file__).resolve().parent
WIRE = {"organizationId": ORG, "instanceId": INST, "leadId": LEAD, "text": "Oi! 😀 ainda tem interesse?",
        "scheduledAt": "2026-11-26T01:00:00.000Z"}


# -- pure: the payload and the helpers --------------------------------------------------------------------------------


def test_payload_round_trips_and_uses_camel_case() -> None:
    job = FollowupJob(ORG, INST, LEAD, "olá", datetime(2026, 11, 26, 1, 2, 3, 456789, tzinfo=UTC),
                      run_at=datetime(2026, 11, 26, 4, 0, tzinfo=UTC))
    wire = job.to_wire()
    assert wire == {"organizationId": 1, "instanceId": 2, "leadId": 3, "text": "olá",
                    "scheduledAt": "2026-11-26T01:02:03.456Z", "runAt": "2026-11-26T04:00:00.000Z", "v": 1}
    assert FollowupJob.from_wire(wire) == job


def test_payload_accepts_what_node_writes() -> None:
    job = FollowupJob.from_wire({**WIRE, "leadId": "3", "campaignId": "ignored"})
    assert (job.organization_id, job.instance_id, job.lead_id) == (1, 2, 3)
    assert job.scheduled_at == datetime(2026, 11, 26, 1, 0, tzinfo=UTC)
    default = datetime(2026, 1, 1, tzinfo=UTC)
    assert FollowupJob.from_wire({k: v for k, v in WIRE.items() if k != "scheduledAt"},
                                 default_scheduled_at=default).scheduled_at == default


@pytest.mark.parametrize(("data", "names"), [
    ({k: v for k, v in WIRE.items() if k != "leadId"}, "leadId is missing"),
    ({**WIRE, "leadId": "abc"}, "leadId must be a positive integer"),
    ({**WIRE, "organizationId": True}, "organizationId must be a positive integer"),
    ({**WIRE, "text": "  "}, "text must be a non-empty string"),
    ({**WIRE, "text": "x" * 70_000}, "WhatsApp allows"),
    ({**WIRE, "scheduledAt": "2026-11-26T01:00:00"}, "scheduledAt has no time zone"),
    ({**WIRE, "runAt": "tomorrow"}, "runAt is not an ISO 8601"),
    ({**WIRE, "v": 2}, "payload version 2"),
    (["not", "an", "object"], "must be a JSON object"),
])
def test_malformed_payload_names_the_field(data: object, names: str) -> None:
    with pytest.raises(PayloadError, match=names):
        FollowupJob.from_wire(data)


def test_to_iso_matches_javascript() -> None:
    assert to_iso(datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=timezone_minus_3())) == "2026-01-02T06:04:05.006Z"


def timezone_minus_3() -> Any:
    from datetime import timezone
    return timezone(timedelta(hours=-3))


def test_parse_duration() -> None:
    assert parse_duration("10m") == timedelta(minutes=10)
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("2d") == timedelta(days=2)
    for bad in ("", "10x", "m10", "1h 30q"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


# -- scheduling -------------------------------------------------------------------------------------------------------


async def test_schedule_delays_until_run_at_and_is_idempotent_with_a_job_id(queue: Queue, redis_url: str) -> None:
    run_at = datetime.now(UTC) + timedelta(minutes=10)
    jid = await schedule_followup(queue, organization_id=ORG, instance_id=INST, lead_id=LEAD, text="first",
                                  run_at=run_at, job_id="lead-3-day-1")
    again = await schedule_followup(queue, organization_id=ORG, instance_id=INST, lead_id=LEAD, text="second",
                                    run_at=run_at + timedelta(hours=1), job_id="lead-3-day-1")
    assert jid == again == "lead-3-day-1"
    assert await queue.getJobState(jid) == "delayed"
    assert await queue.getJobCounts("delayed", "wait") == {"delayed": 1, "wait": 0}
    job = await Job.fromId(queue, jid)
    assert job is not None and job.name == JOB_NAME
    assert job.data["text"] == "first" and job.data["runAt"] == to_iso(run_at)
    due_ms = job.timestamp + job.delay
    assert due_ms >= int(run_at.timestamp() * 1000)  # never early
    assert due_ms - run_at.timestamp() * 1000 < 1000  # ... and not a second late (the add itself is fast)
    assert job.opts["attempts"] == 3 and job.opts["backoff"] == BACKOFF
    assert job.opts["removeOnComplete"] == DEFAULT_JOB_OPTIONS["removeOnComplete"]


@pytest.mark.parametrize(("kw", "message"), [
    ({"run_at": datetime(2030, 1, 1)}, "run_at has no time zone"),
    ({"job_id": "123"}, "not all digits"),
    ({"job_id": "a:b"}, "must be 1-200 letters"),
    ({"text": ""}, "text must be a non-empty string"),
])
async def test_schedule_refuses_bad_input_and_writes_nothing(queue: Queue, redis_url: str, kw: dict[str, Any],
                                                             message: str) -> None:
    args: dict[str, Any] = {"organization_id": ORG, "instance_id": INST, "lead_id": LEAD, "text": "hi",
                            "run_at": datetime.now(UTC), **kw}
    with pytest.raises(PayloadError, match=message):
        await schedule_followup(queue, **args)
    with redis.Redis.from_url(redis_url) as r:
        assert r.keys("bull:*") == []


def test_cli_schedule(redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("UPSTASH_REDIS_URL", redis_url)
    rc = cli.main(["followup", "schedule", "--organization-id", "1", "--instance-id", "2", "--lead-id", "3",
                   "--text", "manual", "--in", "10m", "--job-id", "manual-1"])
    assert rc == 0 and capsys.readouterr().out.strip() == "manual-1"
    with redis.Redis.from_url(redis_url, decode_responses=True) as r:
        assert r.zscore("bull:followup:delayed", "manual-1") is not None


def test_cli_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["followup", "schedule", "--organization-id", "1", "--instance-id", "2", "--lead-id", "3",
                   "--text", "x", "--in", "10m"])
    assert rc == 2 and "UPSTASH_REDIS_URL: is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["followup", "schedule", "--organization-id", "1", "--instance-id", "2", "--lead-id", "3",
                  "--text", "x", "--in", "soon"])
    assert e.value.code == 2 and "use e.g. 10m" in capsys.readouterr().err


# -- the worker, in process -------------------------------------------------------------------------------------------


async def test_sends_stores_and_publishes_once(queue: Queue, redis_url: str, ctx: WorkerContext,
                                               uazapi: UazapiStandIn) -> None:
    store, rt = ctx.store, ctx.realtime
    assert isinstance(store, StoreForTests) and isinstance(rt, RealtimeForTests)
    async with running(redis_url, handler(ctx), ctx) as fw:
        jid = await add(queue, "j1")
        assert await finished(queue, jid) == {jid: "completed"}
    assert fw.errors == []
    assert uazapi.sends_by_job() == {jid: 1}
    assert uazapi.sends[0]["number"] == PHONE and uazapi.sends[0]["text"] == "text of j1"
    assert uazapi.sends[0]["track_source"] == "whatrack-followup"
    out = await store.outbound()
    assert list(out) == [jid] and out[jid]["external_id"] == uazapi.sends[0]["messageid"]
    assert out[jid]["published"] is True and await rt.published() == [f"m-{jid}"]
    job = await Job.fromId(queue, jid)
    assert job is not None and job.returnvalue["status"] == "sent"
    assert job.returnvalue["messageId"] == uazapi.sends[0]["messageid"]


async def test_lead_who_replied_is_skipped(queue: Queue, redis_url: str, ctx: WorkerContext,
                                           uazapi: UazapiStandIn) -> None:
    assert isinstance(ctx.store, StoreForTests)
    scheduled = datetime.now(UTC) - timedelta(minutes=5)
    await ctx.store.add_reply(LEAD, scheduled + timedelta(minutes=1))
    other_lead = LEAD + 1
    await ctx.store.add_lead(ORG, other_lead, "5511977776666")
    await ctx.store.add_reply(other_lead, scheduled - timedelta(minutes=1))  # replied before: still sent
    async with running(redis_url, handler(ctx), ctx):
        a = await add(queue, "replied", FollowupJob(ORG, INST, LEAD, "a", scheduled).to_wire())
        b = await add(queue, "not-replied", FollowupJob(ORG, INST, other_lead, "b", scheduled).to_wire())
        assert await finished(queue, a, b) == {a: "completed", b: "completed"}
    assert uazapi.sends_by_job() == {b: 1}
    job = await Job.fromId(queue, a)
    assert job is not None and job.returnvalue == {"status": "skipped", "reason": "lead replied"}
    assert list(await ctx.store.outbound()) == [b]


async def test_retryable_send_errors_retry_then_send_once(queue: Queue, redis_url: str, ctx: WorkerContext,
                                                          uazapi: UazapiStandIn) -> None:
    uazapi.fail_next(503, 502)
    async with running(redis_url, handler(ctx), ctx):
        # The PRD's 3 attempts (queue default); a 50 ms backoff instead of 5 s keeps the test short.
        jid = await add(queue, "flaky", backoff={"type": "fixed", "delay": 50})
        assert await finished(queue, jid) == {jid: "completed"}
    job = await Job.fromId(queue, jid)
    assert job is not None and job.attemptsMade == 3
    assert len(uazapi.attempts) == 3 and uazapi.sends_by_job() == {jid: 1}
    assert isinstance(ctx.store, StoreForTests)
    assert list(await ctx.store.outbound()) == [jid]


async def test_a_failure_after_the_send_never_sends_again(queue: Queue, redis_url: str, ctx: WorkerContext,
                                                          uazapi: UazapiStandIn) -> None:
    store, rt = ctx.store, ctx.realtime
    assert isinstance(store, StoreForTests) and isinstance(rt, RealtimeForTests)
    await store.r.set("t:store:fail_saves", 1)    # the database fails once after the send
    await store.r.set("t:realtime:fail", 1)       # then Centrifugo fails once after the store
    async with running(redis_url, handler(ctx), ctx):
        jid = await add(queue, "crashy", backoff={"type": "fixed", "delay": 50})
        assert await finished(queue, jid) == {jid: "completed"}
    job = await Job.fromId(queue, jid)
    # the store's failure is retried; Centrifugo's is not the job's: sent and stored, the row waits in the outbox
    assert job is not None and job.attemptsMade == 2 and job.returnvalue["sentEarlier"] is True
    assert uazapi.sends_by_job() == {jid: 1} and len(uazapi.attempts) == 1
    assert list(await store.outbound()) == [jid] and await rt.published() == []
    assert (await store.outbound())[jid]["published"] is False  # the endpoint's outbox publisher takes it from here
    assert await store.save_calls() == {jid: 2}
    assert await store.r.ttl(sent_key(jid)) > 0  # the record expires, it does not pile up


async def test_unrecoverable_failures_do_not_retry(queue: Queue, redis_url: str, ctx: WorkerContext,
                                                   uazapi: UazapiStandIn) -> None:
    uazapi.fail_next(400)
    async with running(redis_url, handler(ctx), ctx):
        refused = await add(queue, "refused")
        malformed = await add(queue, "malformed", {"organizationId": ORG, "instanceId": INST, "text": "no lead"})
        unknown = await add(queue, "unknown-lead", FollowupJob(ORG, INST, 999, "x", datetime.now(UTC)).to_wire())
        other_org = await add(queue, "other-org", FollowupJob(7, INST, LEAD, "x", datetime.now(UTC)).to_wire())
        states = await finished(queue, refused, malformed, unknown, other_org)
    assert set(states.values()) == {"failed"}
    reasons = {}
    for jid in states:
        job = await Job.fromId(queue, jid)
        assert job is not None and job.attemptsMade == 1, jid  # of 3 allowed: not retried
        reasons[jid] = job.failedReason
    assert "UAZAPI refused follow-up refused (status 400)" in reasons[refused]
    assert "leadId is missing" in reasons[malformed]
    assert "lead 999 not found in organization 1" in reasons[unknown]
    assert f"instance {INST} not found in organization 7" in reasons[other_org]
    assert len(uazapi.attempts) == 1 and uazapi.sends == []
    assert isinstance(ctx.store, StoreForTests) and await ctx.store.outbound() == {}


async def test_lock_renewal_racing_a_completion_is_not_an_error(redis_url: str) -> None:
    async def noop(job: Job) -> None:
        return None

    fw = FollowupWorker(redis_url, noop)
    fw.worker.lockManager.track_job("running-1", "tok", 0)
    fw.worker.lockManager.track_job("finishing-1", "tok", 0)
    fw.worker.emit("error", Exception("could not renew lock for job finishing-1"))  # its completion reply is late
    fw.worker.emit("error", Exception("could not renew lock for job running-1"))  # still running: it lost its lock
    fw.worker.emit("error", ConnectionError("redis went away"))
    fw.worker.lockManager.untrack_job("finishing-1")  # ... then lands
    await asyncio.wait(set(fw._judging))
    assert [str(e) for e in fw.errors] == ["redis went away", "could not renew lock for job running-1"]
    await fw.close()


async def test_secrets_stay_out_of_worker_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    password = "s3cret-redis-pass"
    with servers.RedisServer(tmp_path / "r", password=password) as server:
        caplog.set_level("DEBUG", logger="whatrack")

        async def noop(job: Job) -> None:
            return None

        async with running(server.url, noop):
            pass
    assert "follow-up worker on redis://default:********@" in caplog.text
    assert password not in caplog.text


@pytest.mark.slow
async def test_1000_delayed_followups_run_once_and_never_early(queue: Queue, redis_url: str,
                                                               ctx: WorkerContext, uazapi: UazapiStandIn) -> None:
    ran: dict[str, list[tuple[float, float]]] = {}

    async def timed(job: Job) -> Any:
        ran.setdefault(str(job.id), []).append((time.time(), datetime.fromisoformat(job.data["runAt"]).timestamp()))
        return await process_followup(ctx, job)

    async with running(redis_url, timed, ctx, concurrency=50) as fw:
        start = datetime.now(UTC) + timedelta(seconds=1)
        ids = await asyncio.gather(*(
            schedule_followup(queue, organization_id=ORG, instance_id=INST, lead_id=LEAD, text=f"n{i}",
                              run_at=start + timedelta(milliseconds=3 * i), job_id=f"d{i}") for i in range(1000)))

        async def all_done() -> bool:
            return (await queue.getJobCounts("completed"))["completed"] >= 1000

        await wait_until(all_done, "1000 delayed jobs", timeout=120)
    assert fw.errors == []
    assert sorted(ran) == sorted(ids) and all(len(v) == 1 for v in ran.values())
    early = [(jid, due - t) for jid, [(t, due)] in ran.items() if t < due]
    assert early == []
    assert len(uazapi.sends) == 1000 and set(uazapi.sends_by_job().values()) == {1}


# -- the worker as a process: SIGKILL and SIGTERM ---------------------------------------------------------------------


def worker_process(redis_url: str, uazapi_url: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m whatrack.followups.jobs`` with the test context; its output goes to worker.log (in tmp_path)."""
    env = {**os.environ, "UPSTASH_REDIS_URL": redis_url, "UAZAPI_BASE_URL": uazapi_url,
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    with open("worker.log", "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "whatrack.followups.cli", "--context",
                                 "followups_support:build_context_for_tests", *args],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
async def test_killed_worker_jobs_are_rescued_and_sent_once(queue: Queue, redis_url: str, ctx: WorkerContext,
                                                            uazapi: UazapiStandIn) -> None:
    store = ctx.store
    assert isinstance(store, StoreForTests)
    await store.r.set("t:store:save_delay", 600)  # the doomed worker sends, records, then hangs in the database
    proc = worker_process(redis_url, uazapi.url, "--concurrency", "5")
    try:
        ids = [await add(queue, f"k{i}") for i in range(5)]

        async def all_sent() -> bool:
            return all(await asyncio.gather(*(store.r.exists(sent_key(i)) for i in ids)))

        await wait_until(all_sent, "the subprocess worker to send all 5")
        assert await queue.getJobCounts("active") == {"active": 5}
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    await store.r.delete("t:store:save_delay")
    async with running(redis_url, handler(ctx), ctx):
        states = await finished(queue, *ids)
        rescued_after = time.monotonic() - killed_at
    assert set(states.values()) == {"completed"}
    assert uazapi.sends_by_job() == {i: 1 for i in ids}
    assert sorted(await store.outbound()) == sorted(ids)
    for i in ids:
        job = await Job.fromId(queue, i)
        assert job is not None and job.stalledCounter == 1 and job.returnvalue["sentEarlier"] is True
    print(f"rescued {len(ids)} jobs {rescued_after:.1f} s after SIGKILL")


@pytest.mark.slow
async def test_sigterm_finishes_the_running_job(queue: Queue, redis_url: str, ctx: WorkerContext,
                                                uazapi: UazapiStandIn) -> None:
    uazapi.hold(1.0)
    proc = worker_process(redis_url, uazapi.url)
    try:
        jid = await add(queue, "t1")

        async def sending() -> bool:
            return len(uazapi.attempts) == 1

        await wait_until(sending, "the send to start")
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = Path("worker.log").read_text(errors="replace")
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: finishing running jobs" in out
    assert await queue.getJobState(jid) == "completed"
    assert uazapi.sends_by_job() == {jid: 1}


# -- the real parts: PostgreSQL store, the UAZAPI client and stand-in, Centrifugo (devstack) ---------------------------


def _serve(module: str, port: int, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(f"{module.rsplit('.', 1)[-1]}.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    servers.wait_for_port("127.0.0.1", port, timeout=60)
    return proc


async def test_real_store_uazapi_and_centrifugo_end_to_end(queue: Queue, redis_url: str,
                                                           make_migrated_database: Callable[[], str]) -> None:
    import httpx
    from store_helpers import OWNER, T0, TOKEN, message

    from whatrack.realtime import Realtime
    from whatrack.store.api import Store
    from whatrack.uazapi.client import UazapiClient

    store = Store.from_url(make_migrated_database())
    await store.upgrade()
    inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
    lead_id = (await store.save_message(inst, message(sent_at=T0))).lead_id  # replied long before: still sent
    ua_port, cent_port = servers.free_port(), servers.free_port()
    ua = _serve("whatrack.devstack.uazapi_server", ua_port,
                env={"WHATRACK_UAZAPI_INSTANCES": f"inst-a:{TOKEN}:{OWNER}"})
    cent = _serve("whatrack.devstack.centrifugo", cent_port, "--redis-url", redis_url,
                  env={"CENTRIFUGO_API_KEY": "cent-key"})
    client = UazapiClient(f"http://127.0.0.1:{ua_port}", TOKEN)
    rt = Realtime(f"http://127.0.0.1:{cent_port}/api", "cent-key")
    ctx = WorkerContext(store=store, uazapi=client, realtime=rt, closers=[store.aclose, client.aclose, rt.aclose])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ua_port}") as dev:
            await dev.post("/_dev/fail", params={"count": 1, "status": 503})  # the first send fails: retried
            async with running(redis_url, handler(ctx), ctx):
                job = await queue.add(JOB_NAME, FollowupJob(inst.organization_id, inst.id, lead_id, "Ainda tem "
                                                            "interesse? 🙂", datetime.now(UTC)).to_wire(),
                                      {"jobId": "e2e-1", "backoff": {"type": "fixed", "delay": 50}})
                assert await finished(queue, "e2e-1") == {"e2e-1": "completed"}
                # the same job run again (a duplicate delivery of the work): nothing new is sent or stored
                again = await process_followup(ctx, job)
            sends = (await dev.get("/_dev/sends")).json()["sends"]
        assert [(s["ok"], s["track_id"]) for s in sends] == [(False, "e2e-1"), (True, "e2e-1")]
        assert sends[1]["number"] == "5511988887777" and sends[1]["text"] == "Ainda tem interesse? 🙂"
        done = await Job.fromId(queue, "e2e-1")
        assert done is not None and done.attemptsMade == 2 and done.returnvalue["storedNow"] is True
        assert again["sentEarlier"] is True and again["storedNow"] is False
        rows = [r for r in await store.message_rows() if r["direction"] == "outbound"]
        assert len(rows) == 1 and rows[0]["external_id"] == sends[1]["messageid"] and rows[0]["published_at"]
        history = await rt.history(f"conversation:{rows[0]['conversation_id']}")
        assert [(h["content"], h["externalId"]) for h in history if h.get("direction") == "outbound"] == [
            ("Ainda tem interesse? 🙂", sends[1]["messageid"])]
    finally:
        await ctx.aclose()
        for p in (ua, cent):
            p.terminate()
            p.wait(10)


# -- a worker killed between UAZAPI's answer and the :sent record: the echo proves the send ----------------------------


async def test_rescued_jobs_are_checked_against_the_echo_only_when_an_attempt_was_cut(
        queue: Queue, redis_url: str, ctx: WorkerContext, uazapi: UazapiStandIn) -> None:
    store = ctx.store
    assert isinstance(store, StoreForTests)
    ctx.echo_wait_s, ctx.echo_poll_s = 0.5, 0.05
    await add(queue, "echoed")
    await add(queue, "unsent")
    assert await stall_jobs(redis_url, 2) == ["echoed", "unsent"]  # both attempts cut, one after its send
    fresh = await add(queue, "fresh")
    await store.add_echo("echoed", "3EB0ECHOED0000000001")  # the killed attempt's send, echoed and stored
    for jid in ("echoed", "unsent"):
        job = await Job.fromId(queue, jid)
        assert job is not None and (job.attemptsStarted, job.attemptsMade, job.stalledCounter) == (1, 0, 1)
    async with running(redis_url, handler(ctx), ctx) as fw:
        assert await finished(queue, fresh, "echoed", "unsent") == {fresh: "completed", "echoed": "completed",
                                                                      "unsent": "completed"}
    assert fw.errors == []
    assert uazapi.sends_by_job() == {fresh: 1, "unsent": 1}  # the echoed job is not sent again
    echoed = await Job.fromId(queue, "echoed")
    assert echoed is not None and echoed.returnvalue["sentEarlier"] is True and echoed.returnvalue["fromEcho"] is True
    assert echoed.returnvalue["messageId"] == "3EB0ECHOED0000000001"
    unsent = await Job.fromId(queue, "unsent")
    assert unsent is not None and unsent.returnvalue["sentEarlier"] is False and unsent.returnvalue["fromEcho"] is False
    out = await store.outbound()
    assert sorted(out) == sorted([fresh, "echoed", "unsent"])
    assert out["echoed"]["external_id"] == "3EB0ECHOED0000000001"
    assert await store.r.get(sent_key("echoed")) is not None  # the record is rebuilt from the echo
    lookups = await store.echo_lookups()
    assert fresh not in lookups  # a first, clean attempt never waits for an echo
    assert lookups["echoed"] == 1 and lookups["unsent"] >= 2  # polled for the echo, then sent


def test_may_have_been_sent_reads_bullmqs_counters() -> None:
    def job(ats: int, atm: int, stc: int = 0) -> Any:
        j = Job.__new__(Job)
        j.attemptsStarted, j.attemptsMade, j.stalledCounter = ats, atm, stc
        return j

    assert not may_have_been_sent(job(1, 0))  # first attempt
    assert not may_have_been_sent(job(2, 1))  # a retry after a failure that finished (recorded in atm)
    assert may_have_been_sent(job(2, 0))  # the first attempt started and never finished
    assert may_have_been_sent(job(3, 1))
    assert may_have_been_sent(job(0, 0, stc=1))  # a job without ats (older producers) that stalled


async def test_real_store_finds_the_cut_attempts_echo_and_sends_the_unsent_job_once(
        queue: Queue, redis_url: str, make_migrated_database: Callable[[], str]) -> None:
    import json

    import httpx
    from store_helpers import OWNER, T0, TOKEN, message

    from whatrack.devstack.uazapi_server import Instance, outbound_echo
    from whatrack.followups.process import TRACK_SOURCE
    from whatrack.store.api import Store
    from whatrack.uazapi.client import UazapiClient
    from whatrack.uazapi.normalizer import normalize, parse_body

    store = Store.from_url(make_migrated_database())
    await store.upgrade()
    inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
    lead_id = (await store.save_message(inst, message(sent_at=T0))).lead_id
    ua_port = servers.free_port()
    ua = _serve("whatrack.devstack.uazapi_server", ua_port,
                env={"WHATRACK_UAZAPI_INSTANCES": f"inst-a:{TOKEN}:{OWNER}"})
    client = UazapiClient(f"http://127.0.0.1:{ua_port}", TOKEN)
    rt = RealtimeForTests(redis_url)
    ctx = WorkerContext(store=store, uazapi=client, realtime=rt, closers=[store.aclose, client.aclose, rt.aclose],
                        echo_wait_s=1.0, echo_poll_s=0.05)
    try:
        for jid in ("cut-after-send", "cut-before-send"):
            await queue.add(JOB_NAME, FollowupJob(inst.organization_id, inst.id, lead_id, f"oi de {jid}",
                                                  datetime.now(UTC)).to_wire(), {"jobId": jid})
        assert await stall_jobs(redis_url, 2) == ["cut-after-send", "cut-before-send"]
        # The killed attempt of the first job: UAZAPI accepted its send, and the echo came back through the endpoint
        # path (the stand-in's own webhook, the real normalizer, the real store); no :sent record was written.
        first = await client.send_text("5511988887777", "oi de cut-after-send", track_source=TRACK_SOURCE,
                                       track_id="cut-after-send")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ua_port}") as dev:
            (rec,) = (await dev.get("/_dev/sends")).json()["sends"]
            echo = outbound_echo(Instance("inst-a", TOKEN, OWNER), chatid=f"{rec['number']}@s.whatsapp.net",
                                 text=rec["text"], messageid=rec["messageid"], timestamp_ms=rec["at_ms"],
                                 base_url=f"http://127.0.0.1:{ua_port}", track_source=rec["track_source"],
                                 track_id=rec["track_id"])
            echoed = await store.save_message(inst, normalize(parse_body(json.dumps(echo).encode())))  # type: ignore[arg-type]
            found = await store.find_outbound_by_track(inst, "cut-after-send")
            assert found is not None and (found.message_id, found.created) == (echoed.message_id, False)
            assert await store.find_outbound_by_track(inst, "cut-before-send") is None
            async with running(redis_url, handler(ctx), ctx) as fw:
                assert await finished(queue, "cut-after-send", "cut-before-send") == {
                    "cut-after-send": "completed", "cut-before-send": "completed"}
            sends = (await dev.get("/_dev/sends")).json()["sends"]
        assert fw.errors == []
        assert sorted(s["track_id"] for s in sends if s["ok"]) == ["cut-after-send", "cut-before-send"]
        done = await Job.fromId(queue, "cut-after-send")
        assert done is not None and done.returnvalue["sentEarlier"] is True
        assert done.returnvalue["messageId"] == first.message_id and done.returnvalue["storedNow"] is False
        rows = [r for r in await store.message_rows() if r["direction"] == "outbound"]
        assert sorted(r["external_id"] for r in rows) == sorted(s["messageid"] for s in sends)
        assert all(r["published_at"] for r in rows) and len(await rt.published()) == 2
        linked = await store.find_outbound_by_track(inst, "cut-after-send")
        assert linked is not None and linked.message_id == echoed.message_id
    finally:
        await ctx.aclose()
        ua.terminate()
        ua.wait(10)
