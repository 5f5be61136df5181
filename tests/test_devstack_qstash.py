"""The offline QStash broker judged by the official SDKs: Python ``qstash`` (sync and async), its ``Receiver`` and
Node's ``@upstash/qstash`` Receiver, against real deliveries to a real HTTP receiver, with state in a real Redis."""

from __future__ import annotations

# ruff: noqa: F811  (the kit's fixtures are imported by name, and test arguments use the same names)
import asyncio
import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from devstack_qstash_kit import (  # noqa: F401  (fixtures: broker, client, receiver)
    Hit,
    Receiver,
    api,
    broker,
    client,
    events,
    receiver,
    states,
    verify,
    wait_until,
)
from qstash import AsyncQStash, QStash
from qstash.errors import QStashError, SignatureError
from qstash.log import LogState

from whatrack.devstack.qstash.broker import DEV_CURRENT_KEY, DEV_NEXT_KEY, DEV_TOKEN, BrokerThread

NODE_SCRIPT = Path(__file__).parent / "node" / "qstash_receiver.mjs"


def test_publish_delivers_the_exact_signed_request(client: QStash, receiver: Receiver) -> None:
    url = receiver.url("/hook?x=1&y=a%20b")
    res = client.message.publish_json(url=url, body={"hello": "world"}, headers={"test-header": "v1"}, method="PUT",
                                      label="lbl")
    raw = client.message.publish(url=receiver.url("/raw"), body=b"\x00\xffbinary")
    hit = wait_until(lambda: receiver.for_path("/hook"), what="the JSON delivery")[0]
    assert hit.method == "PUT" and hit.url == url
    assert hit.body == b'{"hello": "world"}'
    assert hit.headers["content-type"] == "application/json" and hit.headers["test-header"] == "v1"
    assert hit.headers["user-agent"] == "Upstash-QStash" and hit.headers["upstash-retried"] == "0"
    assert hit.headers["upstash-message-id"] == res.message_id
    assert hit.headers["upstash-caller-ip"] == "127.0.0.1"
    verify(hit, url)
    with pytest.raises(SignatureError):
        verify(hit, receiver.url("/other"))
    bin_hit = wait_until(lambda: receiver.for_path("/raw"), what="the raw delivery")[0]
    assert bin_hit.body == b"\x00\xffbinary" and "content-type" not in bin_hit.headers
    wait_until(lambda: states(client, res.message_id)[-1:] == ["DELIVERED"], what="DELIVERED")
    assert states(client, res.message_id) == ["CREATED", "ACTIVE", "DELIVERED"]
    assert len(events(client, message_id=res.message_id, state=LogState.DELIVERED)) == 1
    msg = client.message.get(res.message_id)
    assert msg.url == url and msg.method == "PUT" and msg.label == "lbl" and msg.max_retries == 3
    assert msg.headers is not None and msg.headers["Test-Header"] == ["v1"]
    assert msg.body == '{"hello": "world"}' and msg.created_at <= msg.not_before
    assert client.message.get(raw.message_id).body_base64 == base64.b64encode(b"\x00\xffbinary").decode()


@pytest.mark.node
def test_node_receiver_verifies_a_real_delivery(client: QStash, receiver: Receiver) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the JS Receiver cannot be run")
    if not (Path(__file__).parent.parent / "node_modules" / "@upstash" / "qstash").is_dir():
        pytest.skip("npm @upstash/qstash is missing: run `npm ci` (make setup)")
    url = receiver.url("/js?q=1")
    client.message.publish_json(url=url, body={"text": "olá"})
    hit = wait_until(lambda: receiver.for_path("/js"), what="the delivery")[0]

    def node(url: str, body: str) -> subprocess.CompletedProcess[str]:
        doc = {"signature": hit.headers["upstash-signature"], "body": body, "url": url,
               "currentSigningKey": DEV_CURRENT_KEY, "nextSigningKey": DEV_NEXT_KEY}
        return subprocess.run(["node", str(NODE_SCRIPT)], input=json.dumps(doc), capture_output=True, text=True,
                              timeout=60, check=False)

    good = node(url, hit.body.decode())
    assert good.returncode == 0, good.stdout + good.stderr
    bad = node(url, hit.body.decode() + " ")
    assert bad.returncode == 1 and "body hash does not match" in bad.stdout


async def test_async_client(broker: BrokerThread, receiver: Receiver) -> None:
    client = AsyncQStash(DEV_TOKEN, base_url=broker.url)
    try:
        await _async_round_trip(client, receiver)
    finally:
        await client.http._client.aclose()


async def _async_round_trip(client: AsyncQStash, receiver: Receiver) -> None:
    res = await client.message.publish(url=receiver.url("/async"), body="hi", content_type="text/plain")
    keys = await client.signing_key.get()
    assert (keys.current, keys.next) == (DEV_CURRENT_KEY, DEV_NEXT_KEY)
    assert (await client.message.get(res.message_id)).body == "hi"
    hit = wait_until(lambda: receiver.for_path("/async"), what="the delivery")[0]
    verify(hit, receiver.url("/async"))
    for _ in range(500):  # the DELIVERED event is written right after the endpoint answers
        got = await client.log.list(filter={"message_id": res.message_id, "state": LogState.DELIVERED})
        if got.logs:
            break
        await asyncio.sleep(0.02)
    assert [e.message_id for e in got.logs] == [res.message_id]


def test_wrong_token_is_refused_without_echoing_it(broker: BrokerThread) -> None:
    wrong = QStash("not-the-token", base_url=broker.url, retry=False)
    with pytest.raises(QStashError, match="401") as e:
        wrong.signing_key.get()
    wrong.http._client.close()
    assert "not-the-token" not in str(e.value)
    assert api(broker, "GET", "/v2/keys?qstash_token=x", headers={}).status_code == 401


def test_bad_input_is_a_400_that_names_the_problem_and_writes_nothing(
        broker: BrokerThread, client: QStash, receiver: Receiver, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url)
    before = r.dbsize()
    for kw, word in [({"url": "ftp://example.com/x"}, "scheme"), ({"url_group": "nope"}, "not found"),
                     ({"url": receiver.url(), "retry_delay": "__import__('os')"}, "Upstash-Retry-Delay"),
                     ({"url": receiver.url(), "delay": "soon"}, "Upstash-Delay")]:
        with pytest.raises(QStashError, match=word):
            client.message.publish(body="x", **kw)  # type: ignore[arg-type]
    bad_batch = [{"destination": receiver.url(), "body": "ok"},
                 {"destination": receiver.url(), "headers": {"Upstash-Retries": "lots"}, "body": "bad"}]
    resp = api(broker, "POST", "/v2/batch", json=bad_batch)
    assert resp.status_code == 400 and "batch item 1" in resp.json()["error"] and "Upstash-Retries" in resp.text
    resp = api(broker, "POST", "/v2/batch", json=[bad_batch[0], {"destination": "no-such-group", "body": "x"}])
    assert resp.status_code == 404 and "batch item 1" in resp.json()["error"]
    assert r.dbsize() == before  # not even the good first item of the batch
    assert receiver.hits == []
    r.close()


def test_deduplication_by_id_and_by_content(broker: BrokerThread, client: QStash, receiver: Receiver) -> None:
    first = client.message.publish(url=receiver.url("/d"), body="a", deduplication_id="dedup-1")
    again = client.message.publish(url=receiver.url("/d"), body="b", deduplication_id="dedup-1")
    assert again.deduplicated and again.message_id == first.message_id and not first.deduplicated
    c1 = client.message.publish(url=receiver.url("/c"), body="same", content_based_deduplication=True)
    c2 = client.message.publish(url=receiver.url("/c"), body="same", content_based_deduplication=True)
    c3 = client.message.publish(url=receiver.url("/c"), body="different", content_based_deduplication=True)
    assert c2.deduplicated and c2.message_id == c1.message_id and not c3.deduplicated
    status = api(broker, "POST", "/v2/publish/" + receiver.url("/c"), content="same",
                 headers={"Authorization": f"Bearer {DEV_TOKEN}", "Upstash-Content-Based-Deduplication": "true"})
    assert status.status_code == 202 and status.json() == {"messageId": c1.message_id, "deduplicated": True}
    wait_until(lambda: len(receiver.for_path("/c")) == 2 and receiver.for_path("/d"), what="deliveries")
    assert [h.body for h in receiver.for_path("/d")] == [b"a"]



def test_redacted_fields_are_delivered_but_not_shown_in_events(client: QStash, receiver: Receiver) -> None:
    res = client.message.publish(url=receiver.url("/red"), body="private", headers={"Authorization": "Bearer s3cret",
                                                                                   "X-Plain": "1"},
                                 redact={"body": True, "header": ["Authorization"]})
    hit = wait_until(lambda: receiver.for_path("/red"), what="the delivery")[0]
    assert hit.body == b"private" and hit.headers["authorization"] == "Bearer s3cret"
    (created,) = events(client, message_id=res.message_id, state=LogState.CREATED)
    assert created.body_base64 is None and created.headers == {"X-Plain": ["1"]}
