"""``whatrack dlq``: what QStash gave up on (489: what no retry can fix) is listed, and published again once the cause
is fixed, stored exactly once. The operator's path after, say, an unknown instance or a refused database login."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from whatrack.devstack import servers
from whatrack.proof.ledger import dlq_items
from whatrack.proof.load import EndpointProcess
from whatrack.qstash import Publisher
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.store.api import Store


def _dlq(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "whatrack.cli", "dlq", *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_dead_letters_are_listed_then_replayed_once_the_cause_is_fixed(devstack_env: dict[str, str],
                                                                       fixtures_dir: Path, tmp_path: Path) -> None:
    port = servers.free_port()
    base = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    # A destination of this test's own (the endpoint serves any path below WEBHOOK_PATH): the DLQ listed is its own.
    dest = f"{base}/dlq-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:10]
    body = json.loads((fixtures_dir / "messages_inbound_text.json").read_text())
    body |= {"instanceName": f"dlq-{tag}", "token": f"tok-{tag}"}  # an instance nobody registered yet: 489
    body["message"] |= {"messageid": f"DLQ{tag.upper()}", "id": f"{body['owner']}:DLQ{tag.upper()}"}
    provider_id = body["message"]["id"]
    endpoint_env = {**devstack_env, "WEBHOOK_PUBLIC_URL": base}
    settings = Settings.from_env(endpoint_env, env_files=())

    async def publish_and_wait_for_the_dlq() -> None:
        publisher = Publisher.from_settings(settings, destination=dest)
        try:
            await publisher.publish_webhook(json.dumps(body))
            for _ in range(150):
                if [d for d in await dlq_items(publisher) if d.provider_id == provider_id]:
                    return
                await asyncio.sleep(0.1)
            raise AssertionError("the unknown instance's message never reached the DLQ")
        finally:
            await publisher.aclose()

    async def stored() -> list[dict[str, object]]:
        store = Store.from_url(settings.database_url or "")
        try:
            for _ in range(150):
                rows = [r for r in await store.message_rows() if r["provider_id"] == provider_id]
                if rows:
                    return rows
                await asyncio.sleep(0.1)
            return []
        finally:
            await store.aclose()

    async def register() -> None:
        store = Store.from_url(settings.database_url or "")
        try:
            await store.register_instance(f"dlq {tag}", body["instanceName"], body["token"], owner=body["owner"])
        finally:
            await store.aclose()

    with EndpointProcess(endpoint_env, port=port):
        asyncio.run(publish_and_wait_for_the_dlq())
        listed = _dlq([], {"WEBHOOK_PUBLIC_URL": dest}, tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert f"1 DLQ entry for {dest}" in listed.stdout and provider_id in listed.stdout
        assert "whatrack dlq --replay" in listed.stdout

        asyncio.run(register())  # the fix
        replayed = _dlq(["--replay"], {"WEBHOOK_PUBLIC_URL": dest}, tmp_path)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert "replayed 1; 0 left in the DLQ" in replayed.stdout
        assert len(asyncio.run(stored())) == 1
        again = _dlq([], {"WEBHOOK_PUBLIC_URL": dest}, tmp_path)
        assert f"0 DLQ entries for {dest}" in again.stdout
