"""The offline QStash broker when deliveries fail: retries and their delays, 489, the DLQ, callbacks, cancelling."""

from __future__ import annotations

# ruff: noqa: F811  (the kit's fixtures are imported by name, and test arguments use the same names)
import base64
import json
import math

from devstack_qstash_kit import (  # noqa: F401  (fixtures: broker, client, receiver)
    TIME_SCALE,
    Hit,
    Receiver,
    always,
    api,
    broker,
    client,
    events,
    receiver,
    states,
    verify,
    wait_until,
)
from qstash import QStash
from qstash.log import LogState

from whatrack.devstack.qstash.broker import DEV_TOKEN, Broker, BrokerThread


def fail_first(n_failures: int, status: int = 500) -> object:
    def behave(hit: Hit, n: int) -> tuple[int, dict[str, str], bytes]:
        return (status, {}, b"not yet") if int(hit.headers.get("upstash-retried", 0)) < n_failures else (200, {}, b"ok")
    return behave


def test_retries_use_the_scaled_default_backoff_then_deliver(client: QStash) -> None:
    with Receiver(fail_first(2)) as rcv:  # type: ignore[arg-type]
        res = client.message.publish(url=rcv.url("/r"), body="x")
        wait_until(lambda: "DELIVERED" in states(client, res.message_id), what="delivery after 2 failures")
        assert [h.headers["upstash-retried"] for h in rcv.for_path("/r")] == ["0", "1", "2"]
    seq = states(client, res.message_id)
    assert seq == ["CREATED", "ACTIVE", "ERROR", "RETRY", "ACTIVE", "ERROR", "RETRY", "ACTIVE", "DELIVERED"]
    retry = [e for e in reversed(events(client, message_id=res.message_id, state=LogState.RETRY))]
    waits = [e.next_delivery_time - e.time for e in retry]  # type: ignore[attr-defined]
    # min(86400, e^(2.5 n)) s for n = 1, 2, scaled: 12 ms then 148 ms (the broker's own schedule, not a timing).
    assert waits == [int(math.exp(2.5) * 1000 * TIME_SCALE), int(math.exp(5.0) * 1000 * TIME_SCALE)]


def test_retry_delay_expression_and_retry_after_set_the_next_attempt(client: QStash) -> None:
    def behave(hit: Hit, n: int) -> tuple[int, dict[str, str], bytes]:
        if hit.path == "/after" and hit.headers["upstash-retried"] == "0":
            return 429, {"Retry-After": "30"}, b"slow down"
        return (503, {}, b"no") if hit.headers["upstash-retried"] == "0" else (200, {}, b"ok")

    with Receiver(behave) as rcv:
        expr = client.message.publish(url=rcv.url("/expr"), body="e", retry_delay="7000 * (retried + 1)")
        after = client.message.publish(url=rcv.url("/after"), body="a")
        for mid in (expr.message_id, after.message_id):
            wait_until(lambda m=mid: "DELIVERED" in states(client, m), what="delivery after one failure")  # type: ignore[misc]
    (r1,) = events(client, message_id=expr.message_id, state=LogState.RETRY)
    assert r1.next_delivery_time - r1.time == int(7000 * TIME_SCALE)  # type: ignore[attr-defined]
    assert r1.retry_delay_expression == "7000 * (retried + 1)"  # type: ignore[attr-defined]
    (r2,) = events(client, message_id=after.message_id, state=LogState.RETRY)
    assert r2.next_delivery_time - r2.time == int(30_000 * TIME_SCALE)  # type: ignore[attr-defined]


def test_489_non_retryable_goes_to_the_dlq_at_once_with_a_failure_callback(client: QStash) -> None:
    def behave(hit: Hit, n: int) -> tuple[int, dict[str, str], bytes]:
        if hit.path == "/never":
            return 489, {"Upstash-NonRetryable-Error": "true"}, b"payload can never succeed"
        return 200, {}, b"ok"

    with Receiver(behave) as rcv:
        res = client.message.publish(url=rcv.url("/never"), body="bad", retries=3,
                                     failure_callback=rcv.url("/failed"))
        cb = wait_until(lambda: rcv.for_path("/failed"), what="the failure callback")[0]
        assert len(rcv.for_path("/never")) == 1
    verify(cb, rcv.url("/failed"))
    doc = json.loads(cb.body)
    assert doc["status"] == 489 and doc["sourceMessageId"] == res.message_id
    assert base64.b64decode(doc["sourceBody"]) == b"bad"
    assert base64.b64decode(doc["body"]) == b"payload can never succeed"
    dlq = client.dlq.list(filter={"message_id": res.message_id}).messages
    assert len(dlq) == 1 and dlq[0].response_status == 489 and dlq[0].dlq_id == doc["dlqId"]
    assert dlq[0].response_body == "payload can never succeed"
    assert states(client, res.message_id)[-2:] == ["ERROR", "FAILED"]


def test_endpoint_down_for_good_ends_in_the_dlq_after_the_retries(broker: BrokerThread, client: QStash) -> None:
    with Receiver(always(503, body=b"down")) as rcv:
        ids = [client.message.publish(url=rcv.url(f"/down{i}"), body=f"m{i}", retries=2,
                                      retry_delay="10", label="outage").message_id for i in range(3)]
        wait_until(lambda: len(client.dlq.list().messages) == 3, what="3 DLQ entries")
        assert all(len(rcv.for_path(f"/down{i}")) == 3 for i in range(3))  # 1 attempt + 2 retries each
    one = client.dlq.list(filter={"message_id": ids[0]}, count=1).messages
    assert [m.message_id for m in one] == [ids[0]]
    got = client.dlq.get(one[0].dlq_id)
    assert got.response_status == 503 and got.response_body == "down" and got.body == "m0"
    assert got.retry_delay_expression == "10" and got.label == "outage" and got.max_retries == 2
    page = client.dlq.list(count=2)
    assert len(page.messages) == 2 and page.cursor
    rest = client.dlq.list(count=2, cursor=page.cursor).messages
    assert {m.message_id for m in page.messages + rest} == set(ids)
    client.dlq.delete(one[0].dlq_id)
    assert api(broker, "GET", f"/v2/dlq/{one[0].dlq_id}").status_code == 404
    others = [m.dlq_id for m in client.dlq.list().messages]
    assert client.dlq.delete_many([others[0]]) == 1
    resp = api(broker, "DELETE", f"/v2/dlq?dlqIds={others[1]}&dlqIds=missing")  # the JS SDK's query form
    assert resp.json() == {"deleted": 1}
    assert client.dlq.list().messages == []


def test_dlq_retry_republishes_and_removes_the_entry(broker: BrokerThread, client: QStash) -> None:
    state = {"up": False}
    with Receiver(lambda hit, n: (200, {}, b"ok") if state["up"] else (500, {}, b"down")) as rcv:
        res = client.message.publish(url=rcv.url("/later"), body="keep me", retries=0)
        wait_until(lambda: client.dlq.list().messages, what="the DLQ entry")
        (entry,) = client.dlq.list().messages
        state["up"] = True
        resp = api(broker, "POST", f"/v2/dlq/retry/{entry.dlq_id}")
        assert resp.status_code == 201 and resp.json()["messageId"] != res.message_id
        wait_until(lambda: any(h.body == b"keep me" and h.headers["upstash-message-id"] == resp.json()["messageId"]
                               for h in rcv.for_path("/later")), what="the retried delivery")
    assert client.dlq.list().messages == []
    assert api(broker, "POST", "/v2/dlq/retry/nope").status_code == 404


def test_callbacks_after_every_attempt_are_signed_messages(client: QStash) -> None:
    first_fails = fail_first(1)

    def behave(hit: Hit, n: int) -> tuple[int, dict[str, str], bytes]:
        return first_fails(hit, n) if hit.path == "/src" else (200, {}, b"ok")  # type: ignore[operator]

    with Receiver(behave) as rcv:
        res = client.message.publish(url=rcv.url("/src"), body="payload", callback=rcv.url("/cb"),
                                     callback_headers={"x-cb": "1"})
        cbs = wait_until(lambda: len(rcv.for_path("/cb")) == 2 and rcv.for_path("/cb"), what="two callbacks")
    docs = sorted((json.loads(h.body) for h in cbs), key=lambda d: d["retried"])
    assert [d["status"] for d in docs] == [500, 200]
    assert all(d["sourceMessageId"] == res.message_id and base64.b64decode(d["sourceBody"]) == b"payload"
               for d in docs)
    for h in cbs:
        verify(h, rcv.url("/cb"))
        assert h.headers["x-cb"] == "1" and h.headers["content-type"] == "application/json"


def test_delay_not_before_and_cancel(broker: BrokerThread, client: QStash, receiver: Receiver) -> None:
    a = client.message.publish(url=receiver.url("/a"), body="a", delay="1h")
    b = client.message.publish(url=receiver.url("/b"), body="b", not_before=2_000_000_000, delay=5)
    c = client.message.publish(url=receiver.url("/c"), body="c", delay=3600)
    d = client.message.publish(url=receiver.url("/d"), body="d", delay=3600)
    ma, mb = client.message.get(a.message_id), client.message.get(b.message_id)
    assert ma.not_before - ma.created_at == 3_600_000
    assert mb.not_before == 2_000_000_000_000  # Not-Before wins over Delay, reported in ms
    client.message.cancel(a.message_id)
    assert states(client, a.message_id) == ["CREATED", "CANCEL_REQUESTED", "CANCELED"]
    assert api(broker, "DELETE", f"/v2/messages/{a.message_id}").status_code == 404  # already finished
    assert client.message.cancel_many([b.message_id, "msg_missing"]) == 1
    assert api(broker, "DELETE", f"/v2/messages?messageIds={c.message_id}").json() == {"cancelled": 1}
    assert client.message.cancel_all() == 1  # only d is left
    assert states(client, d.message_id)[-1] == "CANCELED"
    assert receiver.hits == []


def test_mock_httpstatus_emulation_for_the_sdk_suite(redis_url: str) -> None:
    """Optional (checklist 26): deliveries to mock.httpstatus.io are answered locally, as its real server would."""
    with BrokerThread(Broker(redis_url, time_scale=TIME_SCALE, emulate_httpstatus=True)) as bt:
        c = QStash(DEV_TOKEN, base_url=bt.url, retry=False)
        try:
            ok = c.message.publish(url="https://mock.httpstatus.io/200", body="x")
            bad = c.message.publish(url="https://mock.httpstatus.io/404", body="y", retries=0)
            wait_until(lambda: c.dlq.list(filter={"message_id": bad.message_id}).messages, what="the 404 in the DLQ")
            (entry,) = c.dlq.list(filter={"message_id": bad.message_id}).messages
            assert entry.response_status == 404 and entry.response_body == "404 Not Found"
            wait_until(lambda: "DELIVERED" in states(c, ok.message_id), what="the 200")
        finally:
            c.http._client.close()
