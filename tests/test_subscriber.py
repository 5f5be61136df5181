"""Realtime proven at a subscriber: a ``centrifuge-python`` client over WebSocket (connection and subscription tokens,
as whatrack's browsers) receives every message a load run stored, exactly once; and the reconcile catches a message
stored without a publication (missing) and one published twice (duplicated)."""

from __future__ import annotations

import uuid

import pytest

from whatrack.devstack.stack import Stack
from whatrack.proof.generate import generate, make_instances
from whatrack.proof.subscriber import Delivery, RunSubscriber, build_report
from whatrack.realtime import Realtime
from whatrack.settings import Settings
from whatrack.store.api import Store
from whatrack.uazapi.normalizer import normalize, parse_body


def _settings(devstack: Stack) -> Settings:
    return Settings.from_env(devstack.env(), env_files=())


@pytest.mark.slow
async def test_the_subscriber_receives_every_message_a_load_run_stored(devstack: Stack) -> None:
    from whatrack.proof.load import EndpointProcess, LoadConfig, run_load

    settings = _settings(devstack)
    org = f"subscriber test {uuid.uuid4().hex[:8]}"
    seed = int(uuid.uuid4().int % 900_000) + 1000
    with EndpointProcess(devstack.env(), workers=1):
        async with RunSubscriber(settings, org) as sub:  # connected before anything is published
            result = await run_load(settings, LoadConfig(n=40, seed=seed, organization=org, leads=4,
                                                         progress=False))
            report = await sub.reconcile(timeout=60)
    assert result.passed and result.ledger.ok == 40, result.ledger.summary()
    sent = {w.external_id for w in generate(40, seed=seed, leads=4)}
    assert report.expected == 40 and not report.missing and not report.duplicated and report.unexpected == 0
    assert {d.external_id for d in report.deliveries} == sent  # each message the run stored, received
    assert sorted(d.message_id for d in report.deliveries) == report.stored  # ... once
    assert report.passed, report.verdict()
    assert report.recovered + report.live == 40 and report.latency.n == 40
    assert report.channels == len({d.channel for d in report.deliveries})
    assert report.latency.p50 > 0  # received after the commit


async def test_a_stored_message_never_published_is_missing_and_a_double_publication_duplicated(
        devstack: Stack) -> None:
    settings = _settings(devstack)
    assert settings.database_url
    org = f"subscriber gaps {uuid.uuid4().hex[:8]}"
    seed = int(uuid.uuid4().int % 900_000) + 1000
    inst = make_instances(1, seed)[0]
    events = [normalize(parse_body(w.body)) for w in generate(4, seed=seed, leads=1, only=[inst])]
    store = Store.from_url(settings.database_url)
    realtime = Realtime.from_settings(settings)
    try:
        ref = await store.register_instance(org, inst.name, inst.token, owner=inst.owner)
        async with RunSubscriber(settings, org) as sub:
            saved = [await store.save_message(ref, ev) for ev in events]  # type: ignore[arg-type]
            for s in saved[:3]:  # the fourth is stored and never published: the subscriber must miss it
                await realtime.publish_message(s)
            again = saved[0]  # published a second time under another idempotency key: a duplicate
            await realtime.publish_batch([(again.channel, again.realtime, f"again:{again.provider_id}")])
            report = await sub.reconcile(timeout=10, quiet_s=1)
    finally:
        await realtime.aclose()
        await store.aclose()
    ids = [s.message_id for s in saved]
    assert report.expected == 4
    assert report.missing == [ids[3]]
    assert report.duplicated == [ids[0]]
    assert not report.passed
    assert "1 missing, 1 duplicated" in report.verdict()


def test_build_report_classifies_recovered_and_live() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [{"message_id": 1, "created_at": t}, {"message_id": 2, "created_at": t}]
    got = [Delivery("conversation:1", 1, 1, t.timestamp() + 0.5), Delivery("conversation:1", 2, 2, t.timestamp() + 0.1),
           Delivery("conversation:9", 1, 77, t.timestamp())]
    rep = build_report(rows, got, {"conversation:1": 1, "conversation:9": 0})
    assert (rep.recovered, rep.live, rep.unexpected) == (1, 1, 1)
    assert rep.live_latency.n == 1 and rep.live_latency.p50 == pytest.approx(100, abs=1)
    assert not rep.passed  # a publication of no stored message is not a pass
    assert build_report(rows, got[:2], {"conversation:1": 1}).passed
    assert not build_report([], [], {}).passed  # nothing stored proves nothing
