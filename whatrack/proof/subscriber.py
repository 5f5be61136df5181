"""Realtime proven at a subscriber: a Centrifugo client (the official ``centrifuge-python`` SDK, over WebSocket, with
a connection token as whatrack's browsers get one) follows every conversation of a run and receives its messages;
:meth:`RunSubscriber.reconcile` then checks that each stored message reached it exactly once.

Which channels: a conversation's channel (``conversation:<id>``) exists only once its first message is stored, so
the subscriber cannot know it before the run. It watches the run's organization in the database and subscribes to
each conversation as it appears, with a subscription token, and recovers the channel **from its beginning**: the
SDK's ``get_state`` hook returns the stream position ``(offset 0, epoch)`` (the epoch read through the server API, as
a backend does for its browsers), so Centrifugo replays what was published before the subscribe in the subscribe
reply (recovery, ``force_recovery`` on the ``conversation`` namespace) and pushes the rest live. Each delivery is
kept with its offset and receive time; deliveries up to the offset the subscribe reply reported count as
``recovered``, later ones as ``live``. Latency is commit (the row's ``created_at``) to receive, for every delivery and
for the live ones alone (recovered ones include the discovery delay).

A stored message never received is ``missing``; one received twice (two publications, or one pushed twice) is
``duplicated``; a publication naming no stored message of the run is ``unexpected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cent import AsyncClient, HistoryRequest
from centrifuge import (
    Client,
    PublicationContext,
    StreamPosition,
    SubscribedContext,
    Subscription,
    SubscriptionEventHandler,
)
from sqlalchemy import select

from whatrack.proof.plots import Percentiles, latency_stats
from whatrack.realtime import connection_token, subscription_token
from whatrack.settings import Settings
from whatrack.store.api import Store
from whatrack.store.models import Organization

log = logging.getLogger("whatrack.proof.subscriber")

#: The user the subscriber connects as (the ``sub`` of its tokens).
USER = "whatrack-proof-subscriber"


@dataclass(frozen=True)
class Delivery:
    """One publication as the subscriber received it."""

    channel: str
    offset: int
    message_id: int | None  # the payload's ``id`` (the message row's id)
    at: float  # unix seconds when the client handed it over
    external_id: str | None = None  # the payload's ``externalId`` (WhatsApp's message id)


@dataclass
class SubscriberReport:
    """Stored messages against what the subscriber received (notebook friendly: :meth:`frame`)."""

    expected: int  # stored messages of the run
    stored: list[int] = field(repr=False)  # their ids
    channels: int  # conversation channels subscribed
    deliveries: list[Delivery] = field(repr=False)
    missing: list[int]  # message ids stored, never received
    duplicated: list[int]  # message ids received more than once
    unexpected: int  # deliveries naming no stored message of the run
    recovered: int  # deliveries in a subscribe reply (recovery from offset 0)
    live: int  # deliveries pushed after the subscribe
    latency: Percentiles  # commit -> received, every delivery
    live_latency: Percentiles  # commit -> received, live deliveries only

    @property
    def passed(self) -> bool:
        return self.expected > 0 and not self.missing and not self.duplicated and not self.unexpected

    def summary(self) -> dict[str, Any]:
        return {"expected": self.expected, "received": len({d.message_id for d in self.deliveries}),
                "deliveries": len(self.deliveries), "channels": self.channels, "missing": len(self.missing),
                "duplicated": len(self.duplicated), "unexpected": self.unexpected, "recovered": self.recovered,
                "live": self.live, "latency": self.latency.as_dict(), "live_latency": self.live_latency.as_dict(),
                "missing_ids": self.missing[:20], "duplicated_ids": self.duplicated[:20], "passed": self.passed}

    def verdict(self) -> str:
        return (f"{self.expected} stored, {len(self.deliveries)} received over WebSocket on {self.channels} "
                f"channels ({self.recovered} by recovery, {self.live} live): {len(self.missing)} missing, "
                f"{len(self.duplicated)} duplicated, {self.unexpected} unexpected; commit -> subscriber "
                f"{self.latency} (live only: {self.live_latency})")

    def frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame([d.__dict__ for d in self.deliveries])


class _Channel(SubscriptionEventHandler):  # type: ignore[misc]  # centrifuge-python ships no types
    """Collects one subscription's publications and the offset its subscribe reply reported."""

    def __init__(self, owner: RunSubscriber, channel: str) -> None:
        self.owner, self.channel = owner, channel
        self.subscribed_at_offset: int | None = None

    async def on_publication(self, ctx: PublicationContext) -> None:
        data = ctx.pub.data if isinstance(ctx.pub.data, dict) else {}
        mid, ext = data.get("id"), data.get("externalId")
        self.owner.deliveries.append(Delivery(self.channel, int(ctx.pub.offset or 0),
                                              int(mid) if isinstance(mid, int) else None, time.time(),
                                              str(ext) if ext is not None else None))
        self.owner.changed.set()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        if self.subscribed_at_offset is None and ctx.stream_position is not None:
            self.subscribed_at_offset = ctx.stream_position.offset


class RunSubscriber:
    """Follows the conversations of one organization (a run's) over Centrifugo's WebSocket; use as ``async with``.

    Raises (on enter):
        ConfigError: ``CENTRIFUGO_WS_URL``, ``CENTRIFUGO_TOKEN_HMAC_SECRET_KEY``, the API settings or
            ``DATABASE_URL`` are missing.
    """

    def __init__(self, settings: Settings, organization: str, *, user: str = USER, poll_s: float = 0.05) -> None:
        settings.require("CENTRIFUGO_WS_URL", "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY", "CENTRIFUGO_API_URL",
                         "CENTRIFUGO_API_KEY", "DATABASE_URL")
        assert settings.centrifugo_ws_url and settings.database_url and settings.centrifugo_api_url
        assert settings.centrifugo_api_key
        self.settings, self.organization, self.user, self.poll_s = settings, organization, user, poll_s
        self.client = Client(settings.centrifugo_ws_url, token=connection_token(settings, user), proxy=None,
                             min_reconnect_delay=0.05, max_reconnect_delay=1.0)
        self.api = AsyncClient(settings.centrifugo_api_url, settings.centrifugo_api_key.reveal())
        self.store = Store.from_url(settings.database_url, pool_size=2)
        self.deliveries: list[Delivery] = []
        self.changed = asyncio.Event()
        self.channels: dict[str, tuple[Subscription, _Channel]] = {}
        self.organization_id: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RunSubscriber:
        await self.client.connect()
        await self.client.ready(timeout=30)
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.client.disconnect()
        # the transport closes in background tasks disconnect() does not await
        await asyncio.gather(*list(getattr(self.client, "_background_tasks", ())), return_exceptions=True)
        await self.api.close()
        await self.store.aclose()

    async def _state(self, channel: str) -> StreamPosition:
        """The SDK's ``get_state``: this subscriber has seen nothing of ``channel``, so recover from offset 0 of the
        stream's current epoch (read through the server API, as a backend does for its browsers)."""
        res = await self.api.history(HistoryRequest(channel=channel, limit=0))
        return StreamPosition(offset=0, epoch=res.epoch or "")

    async def subscribe(self, channel: str) -> None:
        """Subscribe to ``channel`` (with a subscription token) and recover it from its beginning."""
        if channel in self.channels:
            return
        handler = _Channel(self, channel)
        sub = self.client.new_subscription(channel, events=handler,
                                           token=subscription_token(self.settings, self.user, channel),
                                           get_state=self._state)
        self.channels[channel] = (sub, handler)
        await sub.subscribe()

    async def _organization_id(self) -> int | None:
        async with self.store.engine.connect() as conn:
            row = (await conn.execute(select(Organization.id).where(Organization.name == self.organization))).first()
        return int(row[0]) if row else None

    async def _follow(self) -> None:
        """Subscribe to every conversation of the organization as it appears (until cancelled)."""
        while True:
            try:
                if self.organization_id is None:
                    self.organization_id = await self._organization_id()
                if self.organization_id is not None:
                    await self._catch_up()
            except Exception as e:  # the database may be in a fault window: keep following
                log.info("[subscriber] following %s: %s: %s", self.organization, type(e).__name__, e)
            await asyncio.sleep(self.poll_s)

    async def _catch_up(self) -> list[dict[str, Any]]:
        rows = await self.store.message_rows(organization_id=self.organization_id)
        for conv in sorted({int(r["conversation_id"]) for r in rows}):
            await self.subscribe(f"conversation:{conv}")
        return rows

    async def reconcile(self, *, timeout: float = 60.0, quiet_s: float = 2.0) -> SubscriberReport:
        """Wait until every stored message of the run was received (or ``timeout``), then a further ``quiet_s``
        for any duplicate still on its way, and compare.

        Returns:
            The report; ``report.passed`` when each stored message was received exactly once.
        """
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while True:
            self.organization_id = self.organization_id or await self._organization_id()
            rows = await self._catch_up() if self.organization_id is not None else []
            got = {d.message_id for d in self.deliveries}
            if rows and all(int(r["message_id"]) in got for r in rows):
                break
            if time.monotonic() > deadline:
                log.warning("[subscriber] %d stored messages not received after %.0f s",
                            sum(1 for r in rows if int(r["message_id"]) not in got), timeout)
                break
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):  # not wait_for, which can swallow a cancellation (3.11)
                    await self.changed.wait()
        await asyncio.sleep(quiet_s)
        return build_report(rows, list(self.deliveries),
                            {ch: h.subscribed_at_offset for ch, (_, h) in self.channels.items()})


def _unix(v: Any) -> float | None:
    if v is None:
        return None
    return float(v.timestamp()) if hasattr(v, "timestamp") else float(v)


def build_report(rows: list[dict[str, Any]], deliveries: list[Delivery],
                 subscribed_at: dict[str, int | None]) -> SubscriberReport:
    """Stored ``rows`` (``message_rows``) against ``deliveries``. Pure."""
    committed = {int(r["message_id"]): _unix(r["created_at"]) for r in rows}
    counts = Counter(d.message_id for d in deliveries)

    def recovered(d: Delivery) -> bool:
        top = subscribed_at.get(d.channel)
        return top is None or d.offset <= top

    def lat(d: Delivery) -> float | None:
        c = committed.get(d.message_id) if d.message_id is not None else None
        return (d.at - c) * 1e3 if c is not None else None

    mine = [d for d in deliveries if d.message_id in committed]
    live = [d for d in mine if not recovered(d)]
    return SubscriberReport(
        expected=len(committed), stored=sorted(committed), channels=len(subscribed_at), deliveries=deliveries,
        missing=sorted(m for m in committed if counts[m] == 0),
        duplicated=sorted(m for m in committed if counts[m] > 1),
        unexpected=len(deliveries) - len(mine), recovered=len(mine) - len(live), live=len(live),
        latency=latency_stats(lat(d) for d in mine), live_latency=latency_stats(lat(d) for d in live))
