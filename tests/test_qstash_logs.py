"""QStash's logs reconciled one to one against a run: the pure fold and reconciliation on plain records, then real
deliveries through the devstack broker (state in a real Redis) to a real HTTP receiver, read back with the official
SDK's ``log.list`` and ``dlq.list`` exactly as the Upstash console shows them."""

from __future__ import annotations

# ruff: noqa: F811  (the kit's fixtures are imported by name, and test arguments use the same names)
import json
import time
from collections.abc import AsyncIterator

import pytest
from devstack_qstash_kit import Hit, Receiver, broker  # noqa: F401  (fixture: broker)
from qstash.dlq import DlqMessage

from whatrack.devstack.qstash.broker import DEV_TOKEN, BrokerThread
from whatrack.proof.ledger import Entry, Ledger, Replay, Sent
from whatrack.proof.load import LoadConfig, LoadResult
from whatrack.proof.plots import latency_stats
from whatrack.proof.qstash_logs import (
    DlqEntry,
    LogEvent,
    LogReconciliation,
    dlq_entry,
    dlq_reason,
    fold,
    read_run_logs,
    reconcile,
    reconcile_load,
    run_message_ids,
)
from whatrack.qstash import Publisher
from whatrack.settings import Settings


def ev(mid: str, t: int, state: str, **kw: object) -> LogEvent:
    return LogEvent(message_id=mid, time=t, state=state, url="http://127.0.0.1:9/hook", **kw)  # type: ignore[arg-type]


def sent(pid: str, qid: str | None, at: float = 1000.0) -> Sent:
    return Sent(pid, at, "accepted" if qid else "unknown", qid)


# -- pure: folding ------------------------------------------------------------------------------------------------

def test_fold_takes_the_last_event_by_time_whatever_the_listing_order() -> None:
    listed = [ev("m1", 30, "DELIVERED", response_status=200), ev("m1", 10, "CREATED"), ev("m1", 20, "ACTIVE"),
              ev("m2", 5, "CREATED")]
    got = fold(listed)
    assert got["m1"].state == "DELIVERED" and got["m1"].states == ("CREATED", "ACTIVE", "DELIVERED")
    assert got["m1"].attempts == 1 and got["m1"].retries == 0 and got["m1"].settled
    assert got["m1"].first_time == 10 and got["m1"].time == 30 and got["m1"].response_status == 200
    assert got["m2"].state == "CREATED" and not got["m2"].settled


def test_fold_breaks_same_millisecond_ties_by_the_lifecycle() -> None:
    # the broker writes ERROR and FAILED (or ERROR and RETRY) in one step with one time; newest first in the listing
    failed = fold([ev("m", 9, "ERROR", error="status 489"), ev("m", 9, "FAILED", error="status 489"),
                   ev("m", 9, "ACTIVE"), ev("m", 1, "CREATED")])["m"]
    assert failed.state == "FAILED" and failed.states == ("CREATED", "ACTIVE", "ERROR", "FAILED")
    assert failed.error == "status 489"
    retry = fold([ev("m", 7, "RETRY"), ev("m", 7, "ERROR", error="status 500", response_status=500),
                  ev("m", 7, "ACTIVE"), ev("m", 1, "CREATED")])["m"]
    assert retry.state == "RETRY" and retry.retries == 1 and retry.response_status == 500


def test_fold_counts_attempts_and_retries_of_a_message_that_failed_then_delivered() -> None:
    listed = [ev("m", 50, "DELIVERED"), ev("m", 40, "ACTIVE"), ev("m", 30, "RETRY"),
              ev("m", 30, "ERROR", error="status 500"), ev("m", 20, "ACTIVE"), ev("m", 10, "CREATED")]
    m = fold(listed)["m"]
    assert m.state == "DELIVERED" and m.attempts == 2 and m.retries == 1 and m.error == "status 500"


# -- pure: DLQ reasons --------------------------------------------------------------------------------------------

def test_dlq_reason_names_a_non_retryable_answer_a_transport_error_and_exhausted_retries() -> None:
    reason, nr = dlq_reason(489, {"Upstash-Nonretryable-Error": ["true"]}, "bad payload")
    assert nr and "non-retryable" in reason and "489" in reason and "bad payload" in reason
    reason, nr = dlq_reason(489, {}, None)  # 489 without the header is an ordinary failure
    assert not nr and "retries exhausted" in reason
    reason, nr = dlq_reason(0, {}, "", error="ConnectError", max_retries=3)
    assert not nr and "no HTTP answer" in reason and "ConnectError" in reason
    reason, _ = dlq_reason(500, None, "x" * 1000, max_retries=3)
    assert "3 retries" in reason and "HTTP 500" in reason and len(reason) < 300


def test_dlq_entry_reads_the_provider_id_from_the_body() -> None:
    body = json.dumps({"message": {"id": "own:abc"}})
    msg = DlqMessage(message_id="m", url="u", url_group=None, endpoint=None, queue=None, body=body, body_base64=None,
                     method="POST", headers=None, callback_headers=None, failure_callback_headers=None, max_retries=3,
                     not_before=0, created_at=0, callback=None, failure_callback=None, schedule_id=None,
                     caller_ip=None, flow_control=None, label=None, dlq_id="1-0", response_status=500,
                     response_headers=None, response_body="boom", response_body_base64=None,
                     retry_delay_expression=None)
    d = dlq_entry(msg, error="status 500")
    assert d.provider_id == "own:abc" and d.dlq_id == "1-0" and d.response_status == 500 and "boom" in d.reason


# -- pure: reconciling --------------------------------------------------------------------------------------------

def _delivered(mid: str, t: int = 10) -> list[LogEvent]:
    return [ev(mid, t + 2, "DELIVERED"), ev(mid, t + 1, "ACTIVE"), ev(mid, t, "CREATED")]


def test_reconcile_finds_every_sent_message_with_its_final_state() -> None:
    events = _delivered("q1") + _delivered("q2") + [ev("q3", 9, "FAILED"), ev("q3", 9, "ERROR"), ev("q3", 8, "ACTIVE"),
                                                    ev("q3", 7, "CREATED")]
    dlq = [DlqEntry("d1", "q3", "p:3", 489, "non-retryable: ...", True)]
    rec = reconcile([sent("p:1", "q1"), sent("p:2", "q2"), sent("p:3", "q3")], fold(events), dlq)
    assert rec.passed and rec.found == 3 and rec.missing == 0 and rec.settled
    assert rec.states() == {"DELIVERED": 2, "FAILED": 1}
    row = {r.message_id: r for r in rec.rows}["q3"]
    assert row.in_dlq and row.dlq_reason == "non-retryable: ..." and row.state == "FAILED"
    assert [d.message_id for d in rec.dlq] == ["q3"]
    assert rec.summary().startswith("PASS: found 3, missing 0")


def test_a_sent_message_absent_from_the_logs_is_missing_and_fails_the_verdict() -> None:
    rec = reconcile([sent("p:1", "q1"), sent("p:2", "q-never-logged")], fold(_delivered("q1")))
    assert not rec.passed and rec.missing == 1
    missing = rec.by_verdict("missing")[0]
    assert missing.message_id == "q-never-logged" and missing.provider_id == "p:2" and missing.state is None
    assert rec.summary().startswith("FAIL")


def test_log_entries_the_run_did_not_send_are_unexpected_or_earlier() -> None:
    events = _delivered("q1") + _delivered("stranger") + [ev("old", 12, "DELIVERED"), ev("old", 11, "ACTIVE")]
    rec = reconcile([sent("p:1", "q1")], fold(events))
    verdicts = {r.message_id: r.verdict for r in rec.rows}
    assert verdicts == {"q1": "found", "stranger": "unexpected", "old": "earlier"}
    assert not rec.passed  # created in the window, sent by nobody we know
    # ... unless a publish of the run had an unknown outcome: that one may be the stranger
    rec = reconcile([sent("p:1", "q1"), sent("p:9", None)], fold(events))
    assert rec.passed and rec.unknown == 1 and rec.unexpected == 1


def test_replays_and_deduplicated_publishes_are_held_one_to_one() -> None:
    ids = run_message_ids([sent("p:1", "q1"), sent("p:1b", "q1"), sent("p:2", "q2")],
                          [Replay("p:2", "d1", "q2r")])
    assert ids == {"q1": ("sent", "p:1,p:1b"), "q2": ("sent", "p:2"), "q2r": ("replay", "p:2")}
    events = [*_delivered("q1"), ev("q2", 9, "FAILED"), ev("q2", 1, "CREATED"), *_delivered("q2r", 20)]
    ledger = Ledger((Entry("p:2", "recovered", "", 1, True, 1, 1, False, True),))
    rec = reconcile([sent("p:1", "q1"), sent("p:1b", "q1"), sent("p:2", "q2")], fold(events),
                    replays=[Replay("p:2", "d1", "q2r")], ledger=ledger)
    rows = {r.message_id: r for r in rec.rows}
    assert rec.passed and len(rec.rows) == 3
    assert rows["q2"].state == "FAILED" and "not in the DLQ" in rows["q2"].detail
    assert rows["q2r"].kind == "replay" and rows["q2r"].state == "DELIVERED"
    assert rows["q2r"].ledger_verdict == "recovered"
    frame = rec.frame()
    assert list(frame["verdict"]) == ["found"] * 3 and "dlq_reason" in frame.columns


def test_an_unsettled_message_is_found_but_not_settled() -> None:
    rec = reconcile([sent("p:1", "q1")], fold([ev("q1", 3, "RETRY"), ev("q1", 3, "ERROR"), ev("q1", 1, "CREATED")]))
    assert rec.passed and not rec.settled and "not settled" in rec.rows[0].detail


# -- against the devstack broker ----------------------------------------------------------------------------------

def behaviour(hit: Hit, n: int) -> tuple[int, dict[str, str], bytes]:
    """Answer by the body's ``kind``: ``ok`` 200; ``bad`` 489 non-retryable; ``flaky`` 500 once, then 200."""
    kind = json.loads(hit.body)["kind"]
    if kind == "bad":
        return 489, {"Upstash-NonRetryable-Error": "true"}, b"payload can never succeed"
    if kind == "flaky" and hit.headers.get("upstash-retried") == "0":
        return 500, {}, b"try again"
    return 200, {}, b"ok"


@pytest.fixture
async def run(broker: BrokerThread) -> AsyncIterator[tuple[Publisher, Receiver, list[Sent]]]:
    """Six messages published through the broker to one receiver URL: 4 ok, 1 non-retryable, 1 flaky; settled."""
    with Receiver(behaviour) as rcv:
        pub = Publisher(DEV_TOKEN, base_url=broker.url, destination=rcv.url("/hook"))
        try:
            records: list[Sent] = []
            for i, kind in enumerate(["ok", "ok", "bad", "ok", "flaky", "ok"]):
                body = {"kind": kind, "message": {"id": f"own:{i}"}}
                at = time.time()
                records.append(Sent(f"own:{i}", at, "accepted", await pub.publish_webhook(body)))
            states = await pub.wait_settled([s.qstash_id for s in records if s.qstash_id], timeout=60)
            assert sorted(states.values()) == ["DELIVERED"] * 5 + ["FAILED"], states
            yield pub, rcv, records
        finally:
            await pub.aclose()


async def test_every_delivery_of_a_run_is_in_the_logs_with_its_final_state(
        run: tuple[Publisher, Receiver, list[Sent]]) -> None:
    pub, _, records = run
    rec = await read_run_logs(pub, records)
    assert rec.passed and rec.settled and rec.found == 6 and rec.missing == rec.unexpected == 0
    rows = {r.provider_id: r for r in rec.rows}
    assert rows["own:2"].state == "FAILED" and rows["own:2"].in_dlq and rows["own:2"].retries == 0
    assert rows["own:4"].state == "DELIVERED" and rows["own:4"].retries == 1 and rows["own:4"].attempts == 2
    assert "RETRY" in rows["own:4"].detail
    assert all(rows[f"own:{i}"].state == "DELIVERED" and rows[f"own:{i}"].attempts == 1 for i in (0, 1, 3, 5))
    assert rec.states() == {"DELIVERED": 5, "FAILED": 1}
    [dlq] = rec.dlq
    assert dlq.message_id == records[2].qstash_id and dlq.provider_id == "own:2" and dlq.non_retryable
    assert dlq.response_status == 489 and "payload can never succeed" in dlq.reason
    assert rec.window is not None and rec.events >= 6 * 3
    # paging through the cursor two entries at a time reads the same logs
    small = await read_run_logs(pub, records, page=2)
    assert small.rows == rec.rows and small.events == rec.events


async def test_a_message_the_broker_never_logged_is_reported_missing(
        run: tuple[Publisher, Receiver, list[Sent]]) -> None:
    pub, _, records = run
    ghost = Sent("own:ghost", time.time(), "accepted", "msg_the_broker_never_saw")
    rec = await read_run_logs(pub, [*records, ghost])
    assert not rec.passed and rec.missing == 1 and rec.found == 6
    assert rec.by_verdict("missing")[0].provider_id == "own:ghost"


async def test_messages_of_the_window_the_run_did_not_send_are_unexpected(
        run: tuple[Publisher, Receiver, list[Sent]]) -> None:
    pub, rcv, records = run
    stranger = await pub.publish_webhook({"kind": "ok", "message": {"id": "own:stranger"}})
    elsewhere = Publisher(DEV_TOKEN, base_url=pub.base_url, destination=rcv.url("/other"))
    try:
        other = await elsewhere.publish_webhook({"kind": "ok", "message": {"id": "own:other"}})
        await pub.wait_settled([stranger, other], timeout=60)
    finally:
        await elsewhere.aclose()
    rec = await read_run_logs(pub, records)
    assert not rec.passed and [r.message_id for r in rec.by_verdict("unexpected")] == [stranger]
    assert other not in {r.message_id for r in rec.rows}  # another URL is not this run's
    # the run's window ends before the stranger was published: it is out of the reconciliation
    before = int(min(s.at for s in records) * 1000) - 2000
    rec = await read_run_logs(pub, records, since_ms=before, until_ms=int(records[-1].at * 1000) + 1)
    assert rec.unexpected == 0 and rec.found == 6 and rec.passed


async def test_reconcile_load_reads_a_load_result_with_the_settings_client(
        run: tuple[Publisher, Receiver, list[Sent]]) -> None:
    pub, _, records = run
    settings = Settings.from_env({"QSTASH_URL": pub.base_url, "QSTASH_TOKEN": DEV_TOKEN,
                                  "WEBHOOK_PUBLIC_URL": pub.destination}, env_files=())
    result = LoadResult(config=LoadConfig(n=len(records)), published=6, accepted=6, publish_s=1.0, drain_s=1.0,
                        accepted_per_s=6.0, stored_per_s=6.0, commit=latency_stats([]), realtime=latency_stats([]),
                        retries=1, dlq=1, replays=[], ledger=Ledger(()), sent=records)
    rec = await reconcile_load(settings, result)
    assert rec.passed and rec.found == 6 and [d.provider_id for d in rec.dlq] == ["own:2"]


def test_a_reconciliation_is_plain_data() -> None:
    rec = LogReconciliation(rows=())
    assert rec.passed and rec.settled and rec.states() == {} and list(rec.dlq_frame().columns)[:2] == ["dlq_id",
                                                                                                      "message_id"]
