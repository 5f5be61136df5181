"""The offline QStash broker's management API through the official SDK: batch, queues, schedules, URL groups,
signing keys (with rotation judged by the Receiver), flow control; and that no secret reaches a log line."""

from __future__ import annotations

# ruff: noqa: F811  (the kit's fixtures are imported by name, and test arguments use the same names)
import json
import logging
import time

import pytest
import redis
from devstack_qstash_kit import (  # noqa: F401  (fixtures: broker, client, receiver)
    TIME_SCALE,
    Receiver,
    api,
    broker,
    client,
    receiver,
    verify,
    wait_until,
)
from qstash import QStash
from qstash.errors import QStashError, SignatureError

from whatrack.devstack.qstash.broker import DEV_CURRENT_KEY, DEV_NEXT_KEY, DEV_TOKEN, Broker, BrokerThread


def test_batch_mixes_urls_url_groups_and_queues(client: QStash, receiver: Receiver) -> None:
    client.url_group.upsert_endpoints(url_group="grp", endpoints=[{"url": receiver.url("/g1")},
                                                                  {"url": receiver.url("/g2"), "name": "two"}])
    out = client.message.batch_json([
        {"url": receiver.url("/b1"), "body": {"n": 1}},
        {"url_group": "grp", "body": {"n": 2}},
        {"queue": "bq", "url": receiver.url("/b3"), "body": {"n": 3}, "headers": {"k": "v"}},
    ])
    assert len(out) == 3 and isinstance(out[1], list) and {r.url for r in out[1]} == {receiver.url("/g1"),
                                                                                     receiver.url("/g2")}
    wait_until(lambda: all(receiver.for_path(p) for p in ("/b1", "/g1", "/g2", "/b3")), what="4 deliveries")
    (g2,) = receiver.for_path("/g2")
    assert g2.headers["upstash-topic-name"] == "grp" and json.loads(g2.body) == {"n": 2}
    verify(g2, receiver.url("/g2"))
    assert receiver.for_path("/b3")[0].headers["k"] == "v"
    assert client.queue.get("bq").name == "bq"  # enqueue created the queue


def test_url_groups(broker: BrokerThread, client: QStash, receiver: Receiver) -> None:
    client.url_group.delete("missing")  # 2xx for a group that does not exist (the py tests rely on it)
    client.url_group.upsert_endpoints(url_group="g",
                                      endpoints=[{"url": receiver.url("/1")}, {"url": receiver.url("/2")}])
    g = client.url_group.get("g")
    assert g.name == "g" and [e.url for e in g.endpoints] == [receiver.url("/1"), receiver.url("/2")]
    assert [x.name for x in client.url_group.list()] == ["g"]
    res = client.message.publish(url_group="g", body="fan")
    assert isinstance(res, list) and len(res) == 2
    wait_until(lambda: receiver.for_path("/1") and receiver.for_path("/2"), what="both endpoints")
    client.url_group.remove_endpoints(url_group="g", endpoints=[{"url": receiver.url("/1")}])
    assert [e.url for e in client.url_group.get("g").endpoints] == [receiver.url("/2")]
    client.url_group.remove_endpoints(url_group="g", endpoints=[{"url": receiver.url("/2")}])
    with pytest.raises(QStashError, match="404"):
        client.url_group.get("g")  # removing the last endpoint deleted the group
    assert api(broker, "POST", "/v2/topics/g/endpoints", json={"endpoints": [{"url": "ftp://x"}]}).status_code == 400


def test_queues_fifo_parallelism_and_pause(client: QStash) -> None:
    with Receiver(hold=0.02) as rcv:
        client.queue.upsert("q1", parallelism=1, paused=True)
        ids = [client.message.enqueue(queue="q1", url=rcv.url("/q"), body=str(i)).message_id for i in range(5)]
        q = client.queue.get("q1")
        assert q.paused and q.parallelism == 1 and q.lag == 5
        assert rcv.hits == []  # a paused queue holds its messages (they are not even due)
        client.queue.resume("q1")
        wait_until(lambda: len(rcv.for_path("/q")) == 5, what="5 queued deliveries")
        assert [h.headers["upstash-message-id"] for h in rcv.for_path("/q")] == ids  # FIFO
        assert rcv.max_active == 1  # parallelism 1: one in flight at a time
        wait_until(lambda: client.queue.get("q1").lag == 0, what="lag 0")
        client.queue.upsert("q1", parallelism=3)
        assert client.queue.get("q1").parallelism == 3 and not client.queue.get("q1").paused
        client.queue.pause("q1")
        assert client.queue.get("q1").paused
    assert [x.name for x in client.queue.list()] == ["q1"]
    client.queue.delete("q1")
    assert client.queue.list() == []


def test_schedules_crud_and_a_trigger(client: QStash, receiver: Receiver, redis_url: str) -> None:
    sid = client.schedule.create_json(destination=receiver.url("/cron"), cron="CRON_TZ=America/Sao_Paulo */5 * * * *",
                                      body={"tick": True}, retries=2, retry_delay="1000", label="sched",
                                      headers={"x-s": "1"})
    s = client.schedule.get(sid)
    assert s.cron.endswith("*/5 * * * *") and s.retries == 2 and s.retry_delay_expression == "1000"
    assert s.label == "sched" and not s.paused and s.headers == {"X-S": ["1"]}
    assert s.next_schedule_time is not None and s.next_schedule_time % 300_000 == 0
    assert client.schedule.create(destination=receiver.url("/cron"), cron="1 1 1 1 1", schedule_id=sid) == sid
    assert client.schedule.get(sid).cron == "1 1 1 1 1"  # same id: updated, not duplicated
    client.schedule.pause(sid)
    assert client.schedule.get(sid).paused
    client.schedule.resume(sid)
    assert not client.schedule.get(sid).paused
    with pytest.raises(QStashError, match="Upstash-Cron"):
        client.schedule.create(destination=receiver.url("/cron"), cron="every minute")
    # Cron resolution is a minute; make the trigger due now instead of waiting for it.
    with redis.Redis.from_url(redis_url) as r:
        r.zadd("qstash:schedule_due", {sid: 0})
    client.schedule.resume(sid)  # any API call; the dispatcher also wakes within a second by itself
    hit = wait_until(lambda: receiver.for_path("/cron"), what="the scheduled delivery")[0]
    assert hit.headers["upstash-schedule-id"] == sid
    verify(hit, receiver.url("/cron"))
    assert len(client.schedule.list()) == 1
    client.schedule.delete(sid)
    assert client.schedule.list() == []
    with pytest.raises(QStashError, match="404"):
        client.schedule.get(sid)


def test_key_rotation_keeps_old_receivers_working_until_the_second_rotation(redis_url: str) -> None:
    with Receiver() as rcv, BrokerThread(Broker(redis_url, time_scale=TIME_SCALE)) as bt:
        client = QStash(DEV_TOKEN, base_url=bt.url, retry=False)
        keys = client.signing_key.get()
        assert (keys.current, keys.next) == (DEV_CURRENT_KEY, DEV_NEXT_KEY)
        old = (keys.current, keys.next)
        rotated = client.signing_key.rotate()
        assert rotated.current == DEV_NEXT_KEY and rotated.next not in old and len(rotated.next) == 32
        client.message.publish(url=rcv.url("/after1"), body="one")
        hit = wait_until(lambda: rcv.for_path("/after1"), what="delivery")[0]
        verify(hit, rcv.url("/after1"), keys=old)  # the old pair still verifies: its next is the new current
        verify(hit, rcv.url("/after1"), keys=(rotated.current, rotated.next))
        second = client.signing_key.rotate()
        client.message.publish(url=rcv.url("/after2"), body="two")
        hit2 = wait_until(lambda: rcv.for_path("/after2"), what="delivery")[0]
        with pytest.raises(SignatureError):
            verify(hit2, rcv.url("/after2"), keys=old)
        verify(hit2, rcv.url("/after2"), keys=(second.current, second.next))
        client.http._client.close()
    # A restart with the command-line (dev) keys keeps the rotated keys stored in Redis.
    with BrokerThread(Broker(redis_url)) as bt2:
        c2 = QStash(DEV_TOKEN, base_url=bt2.url, retry=False)
        again = c2.signing_key.get()
        assert (again.current, again.next) == (second.current, second.next)
        c2.http._client.close()


def test_flow_control_parallelism_and_its_api(client: QStash) -> None:
    with Receiver(hold=0.2) as rcv:
        for i in range(4):
            client.message.publish(url=rcv.url("/fc"), body=str(i), flow_control={"key": "k1", "parallelism": 1})
        client.message.batch([{"url": rcv.url("/free"), "body": str(i)} for i in range(4)])
        wait_until(lambda: len(rcv.for_path("/fc")) == 4 and len(rcv.for_path("/free")) == 4, what="8 deliveries")
        fc_max = rcv.max_active
    assert fc_max >= 2  # the unlimited ones ran side by side (this run can tell 1 from more)
    info = client.flow_control.get("k1")
    assert info.key == "k1" and info.parallelism_max == 1 and info.parallelism_count == 0
    with Receiver(hold=0.2) as rcv2:
        for i in range(4):
            client.message.publish(url=rcv2.url("/fc"), body=str(i), flow_control={"key": "k2", "parallelism": 1})
        wait_until(lambda: len(rcv2.for_path("/fc")) == 4, what="4 flow-controlled deliveries")
        assert rcv2.max_active == 1
    client.flow_control.pause("k1")
    assert client.flow_control.get("k1").is_paused
    client.flow_control.resume("k1")
    client.flow_control.pin("k1", {"parallelism": 5, "rate": 10, "period": 2})
    got = client.flow_control.get("k1")
    assert (got.parallelism_max, got.rate_max, got.rate_period, got.is_pinned_parallelism) == (5, 10, 2, True)
    client.flow_control.unpin("k1", {"parallelism": True, "rate": True})
    assert not client.flow_control.get("k1").is_pinned_rate
    client.flow_control.reset_rate("k1")
    assert client.flow_control.get("k1").rate_count == 0
    gp = client.flow_control.get_global_parallelism()
    assert isinstance(gp.parallelism_max, int) and isinstance(gp.parallelism_count, int)


def test_flow_control_rate_holds_the_excess_in_a_waitlist(client: QStash) -> None:
    with Receiver() as rcv:
        for i in range(3):
            client.message.publish(url=rcv.url("/rate"), body=str(i),
                                   flow_control={"key": "slow", "rate": 1, "period": 60})
        wait_until(lambda: rcv.for_path("/rate") and client.flow_control.get("slow").wait_list_size == 2,
                   what="one delivery and two waiting")
        time.sleep(0.3)  # a bound on how far a wrong broker would get; the assertion is on counts, not speed
        assert len(rcv.for_path("/rate")) == 1
        assert client.flow_control.get("slow").rate_count == 1


def test_no_secret_reaches_the_logs(caplog: pytest.LogCaptureFixture, redis_url: str) -> None:
    token, cur, nxt = "tok_" + "t" * 40, "sig_" + "c" * 28, "sig_" + "n" * 28
    caplog.set_level(logging.DEBUG)
    with Receiver(lambda h, n: (500, {}, b"x")) as rcv, \
            BrokerThread(Broker(redis_url, token=token, current_key=cur, next_key=nxt, time_scale=TIME_SCALE)) as bt:
        c = QStash(token, base_url=bt.url, retry=False)
        c.message.publish(url=rcv.url("/s"), body="b", retries=1)
        wait_until(lambda: c.dlq.list().messages, what="the DLQ entry")
        c.signing_key.rotate()
        c.http._client.close()
        text = caplog.text + repr(bt.broker)
    assert "qstash broker started" in text  # the capture did see the broker's logs
    for secret in (token, cur, nxt):
        assert secret not in text
