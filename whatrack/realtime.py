"""Realtime publication through Centrifugo's server API, with the official ``cent`` async client.

Each stored message is published to its conversation's channel (the PRD's ``publishNewMessage(conversationId,
{id, content, senderType, sentAt})``). The publication carries an ``idempotency_key`` derived from the message, so a
retried webhook (stored, then realtime failed, then redelivered) or two concurrent redeliveries publish once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from cent import (
    AsyncClient,
    CentError,
    HistoryRequest,
    PublishRequest,
)

from whatrack.errors import ConfigError, PublishError
from whatrack.settings import Settings

log = logging.getLogger("whatrack.realtime")

#: Seconds per call: a realtime server slower than this fails the webhook (5xx) so QStash retries later, rather
#: than holding the delivery until QStash's own timeout.
TIMEOUT_S = 5.0


class Publishable(Protocol):
    """What :meth:`Realtime.publish_message` needs of a stored message (``store.StoredMessage`` has it)."""

    @property
    def channel(self) -> str: ...
    @property
    def provider_id(self) -> str: ...
    @property
    def realtime(self) -> dict[str, Any]: ...


class Realtime:
    """Publishes stored messages to Centrifugo. Build once per process; close with :meth:`aclose`."""

    def __init__(self, api_url: str, api_key: str, *, timeout: float = TIMEOUT_S) -> None:
        self._client = AsyncClient(api_url, api_key, timeout=timeout)
        self.api_url = api_url

    @classmethod
    def from_settings(cls, settings: Settings) -> Realtime:
        settings.require("CENTRIFUGO_API_URL", "CENTRIFUGO_API_KEY")
        assert settings.centrifugo_api_url and settings.centrifugo_api_key
        if not settings.centrifugo_api_url.rstrip("/").endswith("/api"):
            raise ConfigError("CENTRIFUGO_API_URL", "must be the server API base URL, ending in /api",
                              "https://centrifugo.example.com/api")
        return cls(settings.centrifugo_api_url, settings.centrifugo_api_key.reveal())

    async def publish_message(self, stored: Publishable) -> None:
        """Publish one stored message to its conversation channel.

        Raises:
            PublishError: Centrifugo unreachable, timed out, or refused (a retry may succeed).
        """
        started = time.perf_counter()
        req = PublishRequest(channel=stored.channel, data=stored.realtime,
                             idempotency_key=f"msg:{stored.provider_id}"[:256])
        try:
            await self._client.publish(req)
        except CentError as e:
            raise PublishError(f"Centrifugo publish to {stored.channel} failed: {type(e).__name__}: "
                               f"{str(e)[:200]}") from e
        except (OSError, TimeoutError) as e:
            raise PublishError(f"Centrifugo unreachable: {type(e).__name__}") from e
        log.debug("[realtime] published to %s in %.1f ms", stored.channel, (time.perf_counter() - started) * 1e3)

    async def history(self, channel: str, limit: int = 100) -> list[dict[str, Any]]:
        """The channel's recent publications (data dicts), oldest first, for checks and the loss ledger.

        Raises:
            PublishError: Centrifugo unreachable or refused.
        """
        try:
            res = await self._client.history(HistoryRequest(channel=channel, limit=limit))
        except (CentError, OSError, TimeoutError) as e:
            raise PublishError(f"Centrifugo history of {channel} failed: {type(e).__name__}") from e
        return [dict(p.data) for p in res.publications]

    async def aclose(self) -> None:
        await self._client.close()
