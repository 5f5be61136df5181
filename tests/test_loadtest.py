"""The load generator (pure), the cost projection, and a real load run end to end on the offline stack, including
the proof that the ledger catches loss: a deliberately broken handler that acknowledges before committing."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from typing import Any

import pytest

from whatrack.events import MessageEvent
from whatrack.proof.cost import CommandStats, command_total, delta, parse_commandstats, project
from whatrack.proof.generate import TEMPLATE_WEIGHTS, LoadInstance, generate, instances_of, make_instances
from whatrack.uazapi.normalizer import normalize, parse_body

# -- the generator ------------------------------------------------------------------------------------------------


def test_generation_is_repeatable_and_ids_unique() -> None:
    a = generate(300, seed=7, instances=3, leads=10)
    b = generate(300, seed=7, instances=3, leads=10)
    assert [w.body for w in a] == [w.body for w in b]
    assert len({w.provider_id for w in a}) == 300
    assert len({w.external_id for w in a}) == 300
    c = generate(300, seed=8, instances=3, leads=10)
    assert not {w.provider_id for w in a} & {w.provider_id for w in c}
    # the first bodies do not depend on how many are asked for
    assert [w.body for w in generate(10, seed=7, instances=3, leads=10)] == [w.body for w in a[:10]]


def test_every_body_normalizes_to_the_message_it_claims() -> None:
    ws = generate(400, seed=3, instances=4, leads=6)
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    leads: set[tuple[str, str]] = set()
    for w in ws:
        ev = normalize(parse_body(w.body))
        assert isinstance(ev, MessageEvent), (w.template, ev)
        assert ev.provider_id == w.provider_id and ev.external_id == w.external_id
        assert ev.direction == w.direction and ev.source.instance_name == w.instance
        seen[(w.template, ev.type)] += 1
        leads.add((w.instance, ev.lead_jid))
    assert {t for t, _ in seen} == set(TEMPLATE_WEIGHTS)  # every fixture kind is in the mix
    assert {"text", "image", "audio", "document", "location", "sticker"} <= {k for _, k in seen}
    assert {w.direction for w in ws} == {"inbound", "outbound"}
    assert len({w.instance for w in ws}) == 4
    assert len(leads) > 4 * 3  # several leads per instance


def test_instances_and_their_tokens() -> None:
    insts = make_instances(3, seed=5)
    assert len({i.token for i in insts}) == 3 and len({i.owner for i in insts}) == 3
    assert insts[0].token not in repr(insts[0])
    ws = generate(5, seed=5, instances=3, leads=2)
    assert {i.name for i in instances_of(ws, 5, 3)} == {w.instance for w in ws}
    demo = LoadInstance("demo", "tok-1234", "5511999990000")
    (one,) = {normalize(parse_body(w.body)).source.token for w in generate(20, seed=1, only=[demo])}
    assert one == "tok-1234"


@pytest.mark.parametrize("kw", [{"n": -1}, {"n": 1, "instances": 0}, {"n": 1, "leads": 0}])
def test_generation_rejects_bad_sizes(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="need n >= 0"):
        generate(**kw)  # type: ignore[arg-type]


# -- cost projection ----------------------------------------------------------------------------------------------


def test_commandstats_parsing_and_delta() -> None:
    info = {"cmdstat_get": {"calls": 10, "usec": 5}, "cmdstat_evalsha": {"calls": 4}, "cmdstat_info": {"calls": 99},
            "errorstat_ERR": {"count": 1}}
    s = parse_commandstats(info)
    assert s == CommandStats(14, 4, {"get": 10, "evalsha": 4})
    later = parse_commandstats({"cmdstat_get": {"calls": 15}, "cmdstat_evalsha": {"calls": 4},
                                "cmdstat_set": {"calls": 2}})
    d = delta(s, later)
    assert d.calls == 7 and d.lua_calls == 0 and d.by_command == {"get": 5, "set": 2}


def test_projection_arithmetic_and_table() -> None:
    p = project(webhooks_per_day=10_000, followups_per_day=1_000, followup_cmds=700, followups=100, followup_s=10.0,
                idle_cmds=60, idle_s=120.0, qstash_deliveries=1_050, webhooks=1_000)
    assert p.redis_cmds_per_s_load == 70.0 and p.redis_cmds_per_s_idle == 0.5 and p.redis_cmds_per_followup == 7.0
    assert p.redis_cmds_per_day == pytest.approx(0.5 * 86_400 + 7 * 1_000)
    assert p.redis_cmds_per_s_avg == pytest.approx(p.redis_cmds_per_day / 86_400)
    assert p.redis_usd_per_month == pytest.approx(p.redis_cmds_per_day * 30 / 100_000 * 0.20)
    assert p.qstash_msgs_per_day == pytest.approx(10_500)
    rows = p.table()
    assert {r["item"] for r in rows} >= {"Redis commands/month", "QStash deliveries per webhook"}
    assert any("not in protocols/qstash.md" in r["plan figure"] for r in rows)
    assert any("free tier 500,000/month: over" in r["plan figure"] for r in rows)  # ~1.5 M/month
    limited = p.table(qstash_daily_limit=10_000, qstash_price_per_100k=1.0)
    assert any("over" in r["plan figure"] for r in limited if r["item"].startswith("QStash messages/day"))
    assert any(r["item"] == "QStash cost/month" for r in limited)
    with pytest.raises(ValueError):
        project(webhooks_per_day=1, followups_per_day=1, followup_cmds=1, followups=0, followup_s=1, idle_cmds=0,
                idle_s=1, qstash_deliveries=0, webhooks=1)


async def test_command_total_counts_real_commands(redis_url: str) -> None:
    import redis.asyncio as aredis

    before = await command_total(redis_url)
    async with aredis.Redis.from_url(redis_url) as r:
        for i in range(25):
            await r.set(f"k{i}", i)
        await r.eval("return 1", 0)
    d = delta(before, await command_total(redis_url))
    assert d.by_command.get("set") == 25
    assert d.lua_calls == 1
    assert d.calls >= 26


def test_cli_has_the_loadtest_command() -> None:
    from whatrack.cli import build_parser

    args = build_parser().parse_args(["loadtest", "-n", "10", "--seed", "3", "--rate", "50"])
    assert args.messages == 10 and args.seed == 3 and args.rate == 50.0 and callable(args.func)


# -- end to end on the offline stack ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from whatrack.devstack.stack import running_stack

    with running_stack(tmp_path_factory.mktemp("loadstack"), time_scale=0.2) as st:
        yield st.env()


@pytest.mark.slow
async def test_load_run_through_qstash_endpoint_database_and_realtime(stack_env: dict[str, str]) -> None:
    from whatrack.proof.load import EndpointProcess, LoadConfig, run_load
    from whatrack.proof.plots import plot_latency, plot_throughput
    from whatrack.settings import Settings

    settings = Settings.from_env(stack_env, env_files=())
    with EndpointProcess(stack_env, workers=2):
        result = await run_load(settings, LoadConfig(n=60, seed=11, progress=False))
    assert result.passed, result.ledger.summary()
    assert result.ledger.ok == 60 and result.accepted == 60
    assert result.commit.n == 60 and result.realtime.n == 60
    assert 0 < result.commit.p50 <= result.commit.p99 <= result.commit.max
    assert result.realtime.p50 >= result.commit.p50  # published after the commit
    assert result.accepted_per_s > 0 and result.stored_per_s > 0
    summary = result.summary()
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["passed"] is True
    df = result.ledger.frame()
    assert len(df) == 60 and (df["commit_ms"] > 0).all()
    plot_throughput(df)
    plot_latency(df)


class _AckFirst:
    """Deliberately broken: answers 200 for a message before it is committed; the commit runs in the background
    and its failure is swallowed. Built around the real handler (it reuses verify → normalize → dispatch)."""

    @staticmethod
    def wrap(handler: Any) -> Any:
        from whatrack.webhook.handler import Outcome

        original = handler._dispatch
        pending: set[asyncio.Task[Any]] = set()

        async def dispatch(event: Any) -> Any:
            if not isinstance(event, MessageEvent):
                return await original(event)
            task = asyncio.create_task(original(event))
            pending.add(task)
            task.add_done_callback(lambda t: (pending.discard(t), t.cancelled() or t.exception()))
            return Outcome(200, "stored", {"status": "stored"})

        handler._dispatch = dispatch
        handler.pending = pending
        return handler


@pytest.mark.slow
async def test_the_ledger_catches_loss_from_a_handler_that_acks_before_committing(stack_env: dict[str, str]) -> None:
    from urllib.parse import urlsplit

    from whatrack.devstack.fault_proxy import FaultControl
    from whatrack.devstack.serving import serving
    from whatrack.proof.load import LoadConfig, Progress, run_load
    from whatrack.settings import Settings
    from whatrack.webhook.app import build_handler, create_app

    settings = Settings.from_env(stack_env, env_files=())
    handler = _AckFirst.wrap(build_handler(settings))
    proxy = FaultControl(stack_env["WHATRACK_FAULT_POSTGRES_URL"])

    async def outage(progress: Progress) -> None:
        await progress.reached(0.3)
        await asyncio.to_thread(proxy.outage, 2.0)
        await asyncio.sleep(2.0)

    port = urlsplit(stack_env["WEBHOOK_PUBLIC_URL"]).port
    try:
        async with serving(create_app(settings, handler=handler), port=port or 0):
            result = await run_load(settings, LoadConfig(n=80, seed=12, progress=False, rate=40.0,
                                                         settle_timeout=20.0), during=outage)
    finally:
        await asyncio.to_thread(proxy.heal)
        await handler.realtime.aclose()
        await handler.store.aclose()
    assert result.ledger.lost > 0, result.ledger.summary()
    assert not result.passed
    lost = result.ledger.by_verdict("lost")
    assert all(not e.in_dlq for e in lost)  # acknowledged: QStash believes they were delivered
    assert result.ledger.ok + result.ledger.lost == 80



async def test_a_publish_without_an_answer_is_unknown_never_accepted() -> None:
    from qstash import AsyncQStash

    from whatrack.devstack.servers import free_port
    from whatrack.proof.ledger import Observations, classify
    from whatrack.proof.load import close_publisher, publish_all
    from whatrack.qstash import Publisher

    dead = f"http://127.0.0.1:{free_port()}"
    publisher = Publisher("token", base_url=dead, destination="http://127.0.0.1:9/hook")
    publisher._client = AsyncQStash("token", base_url=dead, retry=False)  # no SDK transport retries: fail fast
    try:
        sent = await publish_all(publisher, generate(5, seed=2), bar=False)
    finally:
        await close_publisher(publisher)
    assert [s.outcome for s in sent] == ["unknown"] * 5 and all(s.qstash_id is None for s in sent)
    ledger = classify(sent, Observations())
    assert ledger.unknown == 5 and ledger.lost == 0 and ledger.ok == 0


@pytest.mark.slow
async def test_dlq_replay_recovers_without_duplicates(stack_env: dict[str, str]) -> None:
    """Webhooks for an instance not registered yet go straight to the DLQ (489, non-retryable); once the instance is
    registered, the replay stores each exactly once, and replaying the same bodies again changes nothing."""
    from whatrack.proof.ledger import classify, collect, dlq_items, replay_dlq, wait_until
    from whatrack.proof.load import EndpointProcess, close_publisher, publish_all, settle
    from whatrack.qstash import Publisher
    from whatrack.realtime import Realtime
    from whatrack.settings import Settings
    from whatrack.store.api import Store

    settings = Settings.from_env(stack_env, env_files=())
    assert settings.database_url
    webhooks = generate(6, seed=31, instances=1, leads=3)
    (inst,) = instances_of(webhooks, 31, 1)
    store, realtime, publisher = Store.from_url(settings.database_url), Realtime.from_settings(settings), \
        Publisher.from_settings(settings)
    try:
        await store.upgrade()
        with EndpointProcess(stack_env, workers=1):
            sent = await publish_all(publisher, webhooks, bar=False)
            pids = {w.provider_id for w in webhooks}

            async def all_in_dlq() -> bool:
                return {d.provider_id for d in await dlq_items(publisher)} >= pids

            assert await wait_until(all_in_dlq, timeout=60), "the 489s did not reach the DLQ"
            org = (await store.register_instance("dlq replay test", inst.name, inst.token,
                                                 owner=inst.owner)).organization_id
            before = await collect(store, realtime, publisher, sent, organization_id=org)
            ledger = classify(sent, before)
            assert ledger.lost == 6 and all(e.in_dlq for e in ledger.entries)
            mine = [d for d in await dlq_items(publisher) if d.provider_id in pids]
            replays = await replay_dlq(publisher, mine)
            assert len(replays) == 6
            assert await settle(store, publisher, sent, org, timeout=60) is True
            # the same bodies once more, as a second (mistaken) replay would send them
            again = [s.qstash_id for s in await publish_all(publisher, webhooks, bar=False) if s.qstash_id]

            async def delivered() -> bool:
                return set((await publisher.states(again)).values()) == {"DELIVERED"}

            assert await wait_until(delivered, timeout=60)
            after = await collect(store, realtime, publisher, sent, organization_id=org)
    finally:
        await close_publisher(publisher)
        await realtime.aclose()
        await store.aclose()
    ledger = classify(sent, after, replays)
    assert ledger.recovered == 6 and ledger.duplicated == 0 and ledger.lost == 0, ledger.summary()
    assert not [d for d in after.dlq if d.provider_id in {w.provider_id for w in webhooks}]  # deleted from the DLQ
    assert len(after.rows) == 6 and len(after.publications) == 6


@pytest.mark.parametrize(("rows", "pubs", "in_dlq", "expected"), [
    (0, 0, False, "undelivered"),  # QStash still retrying: not lost
    (1, 0, False, "undelivered"),  # stored, QStash retrying after a late failure: the retry publishes it
    (1, 1, False, "ok"),  # arrived while QStash logged a retry: observed once, ok
    (0, 0, True, "lost"),  # in the DLQ: QStash gave up, whatever an older event said
    (2, 0, False, "duplicated"),
])
def test_a_message_qstash_still_holds_is_undelivered_never_lost(rows: int, pubs: int, in_dlq: bool,
                                                                 expected: str) -> None:
    from whatrack.proof.ledger import DlqItem, Observations, Publication, Sent, StoredRow, classify

    pid = "5511999990000:ID0001"
    obs = Observations(rows=tuple(StoredRow(pid, "ID0001", 1, 100.5, None) for _ in range(rows)),
                       publications=tuple(Publication("conversation:1", "ID0001", 1) for _ in range(pubs)),
                       dlq=(DlqItem("d", "m", pid, 503),) if in_dlq else (), pending=frozenset({pid}))
    ledger = classify([Sent(pid, 100.0, "accepted", "m")], obs)
    assert [e.verdict for e in ledger.entries] == [expected]
    assert ledger.passed is (expected == "ok")
    without = classify([Sent(pid, 100.0, "accepted", "m")], Observations(rows=obs.rows, publications=obs.publications,
                                                                         dlq=obs.dlq))
    assert without.undelivered == 0  # the same records, QStash done with the message: never "undelivered"


def test_the_settle_wait_follows_qstash_backoff() -> None:
    from whatrack.proof.ledger import retry_schedule
    from whatrack.proof.load import SETTLE_MARGIN_S, settle_timeout_for

    assert [round(s) for s in retry_schedule(3)] == [12, 148, 1808]  # min(86400, e^(2.5 n)), protocols/qstash.md
    assert retry_schedule(10)[-1] == 86400.0  # capped at a day
    assert settle_timeout_for(3) == pytest.approx(sum(retry_schedule(3)) + SETTLE_MARGIN_S)
    assert settle_timeout_for(0) == SETTLE_MARGIN_S
