"""Replay UAZAPI webhook bodies through QStash to the endpoint, and report what each one became.

The path is the production one: publish (official ``qstash`` client) → broker → signed delivery → endpoint → store →
realtime. ``whatrack replay`` (:mod:`whatrack.proof.cli`) runs it against the configured settings (the devstack
offline); with ``--serve`` it also runs the endpoint in-process on the port of ``WEBHOOK_PUBLIC_URL``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from whatrack.demo import DEMO_ORGANIZATION
from whatrack.errors import ConfigError, PayloadError
from whatrack.settings import WEBHOOK_PATH, Settings

log = logging.getLogger("whatrack.proof.replay")


#: Seconds the endpoint preflight waits for any HTTP answer at ``WEBHOOK_PUBLIC_URL``.
PREFLIGHT_TIMEOUT_S = 5.0


async def require_endpoint(url: str | None, *, timeout: float = PREFLIGHT_TIMEOUT_S) -> int:
    """Check that something answers HTTP at ``url`` (``WEBHOOK_PUBLIC_URL``) before anything is published: a
    publish to a silent endpoint only spends QStash's retries and ends, minutes later, in the DLQ.

    Any HTTP answer counts (the route answers 405 to a GET; a tunnel may answer 404 or 502): only "no connection"
    and "no answer" fail. Returns the status code.

    Raises:
        ConfigError: naming ``WEBHOOK_PUBLIC_URL`` and the two ways to start the endpoint.
    """
    import httpx

    if not url:
        raise ConfigError("WEBHOOK_PUBLIC_URL", "is not set; it is where QStash delivers the webhooks",
                          f"http://127.0.0.1:8000{WEBHOOK_PATH}")
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as c:
            return (await c.get(url)).status_code
    except httpx.HTTPError as e:
        what = "no answer" if isinstance(e, httpx.TimeoutException) else "no connection"
        raise ConfigError("WEBHOOK_PUBLIC_URL", f"nothing answers at WEBHOOK_PUBLIC_URL={url} ({what}): start it "
                          "with `whatrack serve` or pass `--serve`") from None


def bundled_fixtures() -> list[Path]:
    """The UAZAPI fixtures shipped with the package (webhook bodies shaped like real captures)."""
    root = resources.files("whatrack") / "fixtures" / "uazapi"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".json"))


@dataclass
class ReplayRow:
    """One replayed body: what QStash did with it and what the database holds for it."""

    file: str
    event: str  # what the normalizer makes of it: message | receipt | instance | ignored | error
    qstash_id: str
    qstash_state: str  # DELIVERED | FAILED (DLQ) | ... | (none)
    stored: bool
    published: bool
    expected: str  # "stored", "acknowledged" or "dlq"

    @property
    def ok(self) -> bool:
        if self.expected == "stored":
            return self.qstash_state == "DELIVERED" and self.stored and self.published
        if self.expected == "dlq":
            return self.qstash_state == "FAILED" and not self.stored
        return self.qstash_state == "DELIVERED"


def _expectation(body: bytes) -> tuple[str, str, str | None]:
    """(event kind, expected result, provider id) from the normalizer: pure, no I/O."""
    import whatrack.uazapi.normalizer as uazapi
    from whatrack.events import MessageEvent

    try:
        ev = uazapi.normalize(uazapi.parse_body(body))
    except PayloadError:
        return "error", "dlq", None
    kind = ev.to_json()["event"]
    if _instance_key(body) is None:
        return kind, "dlq", None  # no instance we registered (e.g. an Evolution body): unknown_instance, DLQ
    if isinstance(ev, MessageEvent):
        return kind, "stored", ev.provider_id
    return kind, "acknowledged", None


async def register_fixture_instances(store: Any, bodies: Sequence[bytes]) -> int:
    """Register (idempotently) every instance named in ``bodies`` under the demo organization."""
    seen: set[tuple[str, str, str | None]] = set()
    for body in bodies:
        key = _instance_key(body)
        if key is not None and key not in seen:
            seen.add(key)
            await store.register_instance(DEMO_ORGANIZATION, key[0], key[1], owner=key[2])
    return len(seen)


def _instance_key(body: bytes) -> tuple[str, str, str | None] | None:
    """(instanceName, token, owner) of a flat UAZAPI envelope, or None."""
    try:
        d = json.loads(body)
    except ValueError:
        return None
    if isinstance(d, dict) and isinstance(d.get("instanceName"), str) and isinstance(d.get("token"), str):
        owner = d.get("owner")
        return d["instanceName"], d["token"], owner if isinstance(owner, str) and owner else None
    return None


async def replay(settings: Settings, paths: Sequence[Path] | None = None, *, timeout: float = 60.0,
                 unique: bool = False) -> list[ReplayRow]:
    """Publish each body through QStash, wait until QStash settles each, and read back the database.

    Args:
        unique: give every message a fresh id (so a replay stores new rows instead of deduplicating).

    Raises:
        ConfigError: a needed setting is missing.
        PublishError: QStash refused a publish.
    """
    from whatrack.qstash import Publisher
    from whatrack.store.api import Store

    settings.require("DATABASE_URL", "QSTASH_TOKEN", "WEBHOOK_PUBLIC_URL")
    assert settings.database_url
    await require_endpoint(settings.webhook_public_url)
    files = list(paths or bundled_fixtures())
    bodies = [f.read_bytes() for f in files]
    if unique:
        bodies = [_fresh_ids(b) for b in bodies]
    store = Store.from_url(settings.database_url)
    publisher = Publisher.from_settings(settings)
    try:
        await store.upgrade()
        await register_fixture_instances(store, bodies)
        started = time.perf_counter()
        ids = [await publisher.publish_webhook(b, retries=1) for b in bodies]
        states = await publisher.wait_settled(ids, timeout=timeout)
        pids = {pid for b in bodies if (pid := _expectation(b)[2])}
        rows_by_pid = await _published_rows(store, pids, timeout=PUBLISH_WAIT_S)
        out: list[ReplayRow] = []
        for f, body, qid in zip(files, bodies, ids, strict=True):
            kind, expected, pid = _expectation(body)
            row = rows_by_pid.get(pid) if pid else None
            out.append(ReplayRow(file=f.name, event=kind, qstash_id=qid, qstash_state=states.get(qid, "(none)"),
                                 stored=row is not None, published=bool(row and row.get("published_at")),
                                 expected=expected))
        log.info("replayed %d bodies in %.2f s", len(out), time.perf_counter() - started)
        return out
    finally:
        await publisher.aclose()
        await store.aclose()


#: Seconds a stored row may take to be published after QStash saw its delivery answered (the outbox publisher
#: publishes after the commit; a sweep every 2 s catches what no wake-up reached).
PUBLISH_WAIT_S = 10.0


async def _published_rows(store: Any, pids: set[str], *, timeout: float) -> dict[str, dict[str, Any]]:
    """The rows of ``pids`` by provider id, once every stored one is published (or ``timeout`` passes)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["provider_id"]: r for r in await store.message_rows() if r["provider_id"] in pids}
        if all(r.get("published_at") for r in rows.values()) or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


def _fresh_ids(body: bytes) -> bytes:
    import uuid

    try:
        d = json.loads(body)
    except ValueError:
        return body
    msg = d.get("message") if isinstance(d, dict) else None
    if isinstance(msg, dict) and msg.get("messageid"):
        new = uuid.uuid4().hex.upper()
        owner = d.get("owner") or ""
        msg["messageid"] = new
        msg["id"] = f"{owner}:{new}"
    return json.dumps(d, ensure_ascii=False).encode()


@contextlib.asynccontextmanager
async def endpoint_for(settings: Settings) -> AsyncIterator[str]:
    """Serve the endpoint in-process on the host/port of ``WEBHOOK_PUBLIC_URL`` (which must be loopback)."""
    from whatrack.devstack.serving import serving
    from whatrack.webhook.app import create_app

    settings.require("WEBHOOK_PUBLIC_URL")
    assert settings.webhook_public_url
    parts = urlsplit(settings.webhook_public_url)
    if parts.hostname not in ("127.0.0.1", "localhost") or not parts.port:
        raise ConfigError("WEBHOOK_PUBLIC_URL", "--serve needs a loopback URL with a port",
                          "http://127.0.0.1:8000/api/v1/webhooks/qstash/whatsapp")
    async with serving(create_app(settings), host=parts.hostname, port=parts.port) as url:
        yield url
