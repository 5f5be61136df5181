"""``whatrack alerts check`` against a running service: quiet when all is well, firing for each of the five rules when
its condition is provoked on a real devstack (Redis cut by its fault proxy, forged signatures, a slow database behind
its fault proxy, a poison message in the broker's DLQ, follow-ups arriving with no worker).

The check runs as the real CLI in a subprocess (window 1 s) while the endpoint is served in this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from whatrack.alerts import rules as alerts
from whatrack.devstack import servers
from whatrack.devstack.fault_proxy import FaultControl
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.serving import serving
from whatrack.devstack.stack import running_stack
from whatrack.settings import Settings, url_password
from whatrack.store.api import Store
from whatrack.webhook.app import build_handler, create_app
from whatrack.webhook.handler import WebhookHandler

pytestmark = pytest.mark.slow

FIXTURE = "messages_inbound_text.json"


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
              fixtures_dir: Path) -> Iterator[dict[str, str]]:
    """One devstack for the module, on a fresh database (behind the stack's PostgreSQL fault proxy)."""
    name = f"whatrack_alerts_{uuid.uuid4().hex[:10]}"
    db = servers.create_database(pg_admin_url, name)
    try:
        with running_stack(tmp_path_factory.mktemp("stack"), time_scale=0.01, database_url=db) as stack:
            env = stack.env()
            d = json.loads((fixtures_dir / FIXTURE).read_text())

            async def prepare() -> None:
                store = Store.from_url(_settings(env).database_url or "")
                await store.upgrade()
                await store.register_instance("Acme", d["instanceName"], d["token"], owner=d["owner"])
                await store.aclose()

            asyncio.run(prepare())
            yield env
    finally:
        servers.drop_database(pg_admin_url, name)


def _settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env, env_files=())


@dataclass
class Service:
    env: dict[str, str]
    settings: Settings
    handler: WebhookHandler
    fixture: dict[str, Any]
    notifications: list[dict[str, Any]]
    notify_url: str

    def body(self) -> bytes:
        d = json.loads(json.dumps(self.fixture))
        d["message"]["messageid"] = uuid.uuid4().hex.upper()
        d["message"]["id"] = f"{d['owner']}:{d['message']['messageid']}"
        return json.dumps(d).encode()

    async def post(self, client: httpx.AsyncClient, body: bytes, signature: str | None = None) -> int:
        url = self.settings.webhook_public_url or ""
        sig = signature if signature is not None else sign(body, url, self.settings.signing_keys()[0])
        r = await client.post(url, content=body, headers={"Upstash-Signature": sig})
        return r.status_code

    async def check(self, *extra: str) -> tuple[int, str]:
        """``whatrack alerts check --window 1s`` in a subprocess against this service; (exit code, stdout+stderr)."""
        env = {k: v for k, v in os.environ.items() if k not in self.env}
        env.update(self.env)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "whatrack.cli", "alerts", "check", "--window", "1s", "--notify-url",
            self.notify_url, *extra, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()


def _states(output: str) -> dict[str, str]:
    rules = {r.name for r in alerts.default_rules()}
    return {line.split()[0]: line.split()[1] for line in output.splitlines() if line.split()[:1] and
            line.split()[0] in rules}


@pytest.fixture
async def service(stack_env: dict[str, str], fixtures_dir: Path) -> AsyncIterator[Service]:
    notifications: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        notifications.append(json.loads(await request.body()))
        return Response(status_code=204)

    settings = _settings(stack_env)
    handler = build_handler(settings)
    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    fixture = json.loads((fixtures_dir / FIXTURE).read_text())
    try:
        async with serving(receiver) as hook_base, \
                serving(create_app(settings, handler=handler), port=int(stack_env["WHATRACK_APP_PORT"])):
            yield Service(stack_env, settings, handler, fixture, notifications, f"{hook_base}/hook")
    finally:
        for fault in ("POSTGRES", "UPSTASH_REDIS"):
            FaultControl(stack_env[f"WHATRACK_FAULT_{fault}_URL"]).heal()
        await handler.realtime.aclose()
        await handler.store.aclose()


@contextlib.asynccontextmanager
async def meanwhile(action: Callable[[], Awaitable[Any]], workers: int = 1) -> AsyncIterator[list[Any]]:
    """Run ``action`` over and over in the background for the duration of the block; yield what it returned."""
    results: list[Any] = []
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            results.append(await action())
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(loop()) for _ in range(workers)]
    try:
        yield results
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def _fired(service: Service, rule: str) -> list[dict[str, Any]]:
    return [a for n in service.notifications for a in n["firing"] if a["rule"] == rule]


async def test_quiet_when_nothing_is_wrong(service: Service) -> None:
    async with httpx.AsyncClient(timeout=30) as c, meanwhile(lambda: service.post(c, service.body())) as codes:
        code, out = await service.check()
    assert code == 0, out
    assert _states(out) == {r.name: "ok" for r in alerts.default_rules()}, out
    assert service.notifications == []
    assert codes and set(codes) == {200}


async def test_fires_when_redis_is_unreachable_and_says_so_without_the_password(service: Service) -> None:
    FaultControl(service.env["WHATRACK_FAULT_UPSTASH_REDIS_URL"]).outage()
    code, out = await service.check()
    assert code == 1, out
    states = _states(out)
    assert states["redis_connection"] == "firing", out
    assert states["queue_backlog"] == "unknown", out  # the queue lives on that Redis: unreadable, not a crash
    [alert] = _fired(service, "redis_connection")
    assert alert["severity"] == "critical" and "PING failed" in alert["detail"]
    secrets = [s for s in (url_password(service.env["UPSTASH_REDIS_URL"]), service.env["QSTASH_TOKEN"]) if s]
    assert secrets and not any(s in out or s in json.dumps(service.notifications) for s in secrets)


async def test_fires_on_forged_signatures(service: Service) -> None:
    forged = sign(b"{}", service.settings.webhook_public_url or "", "sig_NotTheKeyAtAll0000000000000000")
    async with httpx.AsyncClient(timeout=30) as c, \
            meanwhile(lambda: service.post(c, service.body(), forged)) as codes:
        code, out = await service.check()
    assert code == 1, out
    assert _states(out)["signature_failures"] == "firing", out
    assert _fired(service, "signature_failures")
    assert codes and set(codes) == {401}


async def test_fires_when_the_database_is_slower_than_the_processing_timeout(service: Service) -> None:
    service.handler.timeout_s = 0.5
    FaultControl(service.env["WHATRACK_FAULT_POSTGRES_URL"]).latency(1500)
    async with httpx.AsyncClient(timeout=30) as c, \
            meanwhile(lambda: service.post(c, service.body()), workers=4) as codes:
        code, out = await service.check("--slow-seconds", "0.25")
    assert code == 1, out
    assert _states(out)["processing_timeout"] == "firing", out
    assert codes and set(codes) == {503}  # timed out and rolled back: QStash retries, nothing lost
    assert _fired(service, "processing_timeout")


async def test_fires_when_a_poison_message_is_in_the_dlq(service: Service) -> None:
    from whatrack.proof.load import close_publisher
    from whatrack.qstash import Publisher

    pub = Publisher.from_settings(service.settings)
    poison = '{"EventType": "messages", "message": {"text": "no id"}}'
    msg_id = await pub.publish_webhook(poison, retries=0)
    try:
        for _ in range(300):  # the broker delivers, gets 489 + NonRetryable, dead-letters it
            if (await pub.client.dlq.list()).messages:
                break
            await asyncio.sleep(0.1)
        code, out = await service.check()
        assert code == 1, out
        assert _states(out)["dlq_not_empty"] == "firing", out
        [alert] = _fired(service, "dlq_not_empty")
        assert alert["value"] == 1
    finally:
        dlq = (await pub.client.dlq.list()).messages
        assert [m.message_id for m in dlq] == [msg_id]
        await pub.client.dlq.delete_many([m.dlq_id for m in dlq])
        await close_publisher(pub)


async def test_fires_when_followups_pile_up_with_no_worker(service: Service) -> None:
    from whatrack.followups.jobs import open_queue, schedule_followup

    queue = open_queue(service.settings.upstash_redis_url or "", ca_bundle=service.settings.redis_ca_bundle)
    try:
        async def add() -> str:
            return await schedule_followup(queue, organization_id=1, instance_id=1, lead_id=1, text="oi",
                                           run_at=datetime.now(UTC))

        async with meanwhile(add) as added:
            code, out = await service.check()
        assert code == 1, out
        assert _states(out)["queue_backlog"] == "firing", out
        assert len(added) >= 2 and _fired(service, "queue_backlog")
    finally:
        await queue.obliterate(force=True)
        await queue.close()


# -- pure parts and unreachable sources -------------------------------------------------------------------------------


def _snap(t: float, metrics: dict[str, float] | None = None, **kw: Any) -> alerts.Snapshot:
    return alerts.Snapshot(t, metrics, None if metrics is not None else "down", **kw)


def test_counter_reset_counts_from_zero_and_thresholds_are_strict() -> None:
    key = 'whatrack_webhooks_total{outcome="rejected_signature"}'
    rule = {r.name: r for r in alerts.default_rules()}["signature_failures"]
    [res] = alerts.evaluate([rule], _snap(0, {key: 100.0}), _snap(60, {key: 5.0}))  # restarted: 5 since
    assert (res.state, res.value) == ("ok", 5.0)  # 5 per minute is the threshold, not above it
    [res] = alerts.evaluate([rule], _snap(0, {key: 100.0}), _snap(60, {key: 106.0}))
    assert (res.state, res.value) == ("firing", 6.0)


def test_a_rule_that_raises_is_unknown_not_a_crash() -> None:
    def broken(a: alerts.Snapshot, b: alerts.Snapshot, t: float) -> alerts.Verdict:
        raise KeyError("boom")

    rule = alerts.Rule("broken", "test", broken, 0, 1, "warning")
    [res] = alerts.evaluate([rule], _snap(0), _snap(1))
    assert res.state == "unknown" and "KeyError" in res.detail


async def test_unreachable_sources_are_unknown_with_the_reason() -> None:
    dead = f"127.0.0.1:{servers.free_port()}"
    settings = Settings.from_env({
        "UPSTASH_REDIS_URL": f"redis://default:pw-secret-123@{dead}/0", "QSTASH_URL": f"http://{dead}",
        "QSTASH_TOKEN": "qstash-token-secret-456"}, env_files=())
    results = {r.rule: r for r in await alerts.check(settings, metrics_url=f"http://{dead}/metrics", window_s=0.05)}
    assert results["redis_connection"].state == "firing"  # PING refused is the alert itself
    for name in ("signature_failures", "processing_timeout", "dlq_not_empty", "queue_backlog"):
        assert results[name].state == "unknown", results[name]
        assert results[name].detail
    text = alerts.render_table(list(results.values()))
    assert "pw-secret-123" not in text and "qstash-token-secret-456" not in text
    assert "ConnectError" in results["signature_failures"].detail


def test_window_parsing() -> None:
    assert [alerts.parse_window(t) for t in ("30s", "1m", "500ms", "2")] == [30, 60, 0.5, 2]
    with pytest.raises(ValueError, match="not a duration"):
        alerts.parse_window("soon")
    with pytest.raises(ValueError, match="not a window"):
        alerts.parse_window("0s")
