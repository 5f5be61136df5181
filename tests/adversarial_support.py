"""Shared pieces of the adversarial tests: the real endpoint (PostgreSQL, Centrifugo stand-in) in-process and over
HTTP, signing, and the integrity check run after every batch (no partial rows, no orphans).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from whatrack.devstack import centrifugo, servers
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.serving import serving
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.store.api import Store
from whatrack.webhook.app import build_handler, create_app
from whatrack.webhook.handler import WebhookHandler

#: Key-shaped, but the planted values are unique strings the secrets test greps for.
CURRENT = "sig_advCurrentKey7Qm2Zp9Lw4Xc8Vb1Nk"
NEXT = "sig_advNextKey3Hs6Jd0Fg5Tr2Ye7Uw9Io"
ROTATED_OUT = "sig_advRotatedOutKey1Aa2Bb3Cc4Dd5E"
CENT_KEY = "adv-centrifugo-key-Pl0k9Ij8Uh7Yg6"
NAMESPACES = {"conversation": centrifugo.LEDGER_NAMESPACE}

INTEGRITY_SQL = {
    # Every message hangs off an existing lead, conversation and ticket of the same conversation.
    "message_without_parents": """
        SELECT count(*) FROM message m
        LEFT JOIN lead l ON l.id = m.lead_id
        LEFT JOIN conversation c ON c.id = m.conversation_id AND c.lead_id = m.lead_id
        LEFT JOIN ticket t ON t.id = m.ticket_id AND t.conversation_id = m.conversation_id
        WHERE l.id IS NULL OR c.id IS NULL OR t.id IS NULL""",
    # A lead exists only because a message (or a conversation) made it: none left behind by a failed write.
    "orphan_leads": """
        SELECT count(*) FROM lead l WHERE NOT EXISTS (SELECT 1 FROM conversation c WHERE c.lead_id = l.id)""",
    "conversation_without_message": """
        SELECT count(*) FROM conversation c
        WHERE NOT EXISTS (SELECT 1 FROM message m WHERE m.conversation_id = c.id)""",
    "ticket_without_message": """
        SELECT count(*) FROM ticket t WHERE NOT EXISTS (SELECT 1 FROM message m WHERE m.ticket_id = t.id)""",
}


async def integrity_violations(store: Store) -> dict[str, int]:
    """Each check's count of offending rows (all zero when nothing was written half-way)."""
    out: dict[str, int] = {}
    async with store.engine.connect() as conn:
        for name, sql in INTEGRITY_SQL.items():
            out[name] = int((await conn.execute(text(sql))).scalar_one())
    return {k: v for k, v in out.items() if v}


@dataclass
class Endpoint:
    """The real webhook endpoint: ``handler`` for in-process deliveries, ``url`` over HTTP (same store)."""

    url: str
    base: str
    handler: WebhookHandler
    store: Store
    settings: Settings
    fixtures: Path
    token: str
    seen_responses: list[str] = field(default_factory=list)

    def fixture(self, name: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.fixtures / name).read_text())
        return loaded

    def sign(self, body: bytes, key: str = CURRENT, url: str | None = None, **kw: Any) -> str:
        return sign(body, url or self.url, key, **kw)

    async def post(self, client: httpx.AsyncClient, body: bytes, headers: list[tuple[str, str]] | None = None,
                   *, signed: bool = True) -> httpx.Response:
        h: list[tuple[str, str]] = [("Content-Type", "application/json")]
        if signed:
            h.append(("Upstash-Signature", self.sign(body)))
        h.extend(headers or [])
        r = await client.post(self.url, content=body, headers=h)
        self.seen_responses.append(f"{r.status_code} {r.headers!r} {r.text}")
        return r

    async def metrics_text(self, client: httpx.AsyncClient) -> str:
        return (await client.get(f"{self.base}/metrics")).text


@contextlib.asynccontextmanager
async def running_endpoint(db_url: str, redis_url: str, fixtures: Path, *,
                           extra_env: dict[str, str] | None = None) -> AsyncIterator[Endpoint]:
    """Migrated store with the fixtures' instance registered, the Centrifugo stand-in, the app over HTTP."""
    store = Store.from_url(db_url)
    await store.upgrade()
    d = json.loads((fixtures / "messages_inbound_text.json").read_text())
    await store.register_instance("Acme", d["instanceName"], d["token"], owner=d["owner"])
    try:
        async with serving(centrifugo.create_app(redis_url, CENT_KEY, NAMESPACES)) as cent_base:
            port = servers.free_port()
            base = f"http://127.0.0.1:{port}"
            settings = Settings.from_env({
                "DATABASE_URL": db_url, "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
                "WEBHOOK_PUBLIC_URL": base + WEBHOOK_PATH, "CENTRIFUGO_API_URL": f"{cent_base}/api",
                "CENTRIFUGO_API_KEY": CENT_KEY, **(extra_env or {}),
            }, env_files=())
            handler = build_handler(settings)
            try:
                async with serving(create_app(settings, handler=handler), port=port):
                    yield Endpoint(base + WEBHOOK_PATH, base, handler, store, settings, fixtures, d["token"])
            finally:
                await handler.realtime.aclose()
                await handler.store.aclose()
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def fresh_endpoint(pg_admin_url: str, redis_url: str, fixtures: Path, *,
                         fast_commit: bool = True) -> AsyncIterator[Endpoint]:
    """:func:`running_endpoint` on a database of its own, dropped afterwards (for module-scoped fixtures)."""
    import uuid

    name = f"whatrack_adv_{uuid.uuid4().hex[:12]}"
    libpq = servers.create_database(pg_admin_url, name)
    if fast_commit:
        import psycopg

        # Throwaway test data: commits need not wait for the disk (the dominant cost per stored message here,
        # ~60 ms → ~15 ms). Durability is not under test; atomicity and constraints are unchanged.
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    try:
        async with running_endpoint(pg_url(libpq), redis_url, fixtures) as ep:
            yield ep
    finally:
        servers.drop_database(pg_admin_url, name)


def pg_url(libpq: str) -> str:
    url = Settings.from_env({"DATABASE_URL": libpq}, env_files=()).database_url
    assert url
    return url
