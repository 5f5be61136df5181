"""One webhook delivery: verify → parse → normalize → resolve instance → persist, and the status that results.

The status contract is what keeps messages from being lost (QStash retries anything that is not 2xx):

- 2xx right after the database commit; the realtime publication is not on the request path: the committed row is
  the outbox, published by ``webhook.publisher`` (a Centrifugo outage costs no QStash retry);
- 401 for a missing or bad signature;
- 489 + ``Upstash-NonRetryable-Error: true`` for what can never succeed (not JSON, no message id, unknown instance),
  so QStash moves it to the DLQ at once, where nothing is lost and no retry storm starts; also when PostgreSQL
  refuses our login (a wrong ``DATABASE_URL`` is configuration: no retry fixes it, the DLQ keeps the message for a
  replay after the fix, and ``/readyz`` says so);
- 503 for transient failure (database unreachable or slow, processing timeout), so QStash retries.

Responses never echo internals: a short code and a fixed message.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from whatrack import uazapi
from whatrack.errors import PayloadError, SignatureError, StoreAuthError, StoreError
from whatrack.events import Ignored, InstanceEvent, MessageEvent, ReceiptEvent
from whatrack.qstash import NON_RETRYABLE_HEADER, NON_RETRYABLE_STATUS, Verifier
from whatrack.webhook.deadlines import Deadlines

if TYPE_CHECKING:
    from whatrack.realtime import Realtime
    from whatrack.store.api import InstanceRef, Store

log = logging.getLogger("whatrack.webhook.handler")

#: Seconds one delivery may take before it is abandoned with 503 (its transaction rolled back) so QStash retries.
#: Well under QStash's own per-attempt timeout, above a slow-but-healthy database round trip.
PROCESSING_TIMEOUT_S = 20.0
#: How long a resolved instance is trusted without asking the database again: instances change rarely, and the
#: lookup would otherwise be one query per webhook.
INSTANCE_CACHE_TTL_S = 60.0


@dataclass(frozen=True)
class Outcome:
    """What the endpoint answers, and how the delivery is counted in metrics and logs."""

    status: int
    outcome: str  # stored | duplicate | receipt | instance | ignored | rejected_signature | non_retryable | transient
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _non_retryable(code: str) -> Outcome:
    return Outcome(NON_RETRYABLE_STATUS, "non_retryable", {"error": code, "retry": False},
                   {NON_RETRYABLE_HEADER: "true"})


def _transient(code: str) -> Outcome:
    # No Retry-After: QStash's default backoff (12 s, 2.5 min, 30 min, ...) rides out a long outage; a short
    # Retry-After would spend the retries within seconds and send messages to the DLQ.
    return Outcome(503, "transient", {"error": code, "retry": True})


class WebhookHandler:
    """Processes one delivery at a time (many concurrently). Built once per process with its collaborators.

    Args:
        verifier: checks ``Upstash-Signature``; ``None`` only for the bare-insert benchmark baseline.
        store: the database (its asyncpg ``writer`` on PostgreSQL).
        realtime: the Centrifugo client the app's outbox publisher uses (not called on the request path).
        timeout_s: see :data:`PROCESSING_TIMEOUT_S`.
        on_outcome: called with each outcome and its duration (metrics).
    """

    def __init__(self, verifier: Verifier | None, store: Store, realtime: Realtime, *,
                 timeout_s: float = PROCESSING_TIMEOUT_S,
                 on_outcome: Callable[[Outcome, float], None] | None = None) -> None:
        self.verifier = verifier
        self.store = store
        self.realtime = realtime
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome
        self._instances: dict[tuple[str | None, str], tuple[float, InstanceRef]] = {}
        self._deadlines = Deadlines()

    async def handle(self, body: bytes, signatures: Sequence[str], *, message_id: str | None = None,
                     retried: str | None = None, url_suffix: str = "") -> Outcome:
        """Process one delivery and return the response to give. Never raises."""
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        self._deadlines.start(task, self.timeout_s)  # asyncio.timeout, without a timer per delivery
        try:
            outcome = await self._handle(body, signatures, url_suffix)
        except (asyncio.CancelledError, TimeoutError) as e:
            if isinstance(e, asyncio.CancelledError) and not self._deadlines.expired(task):
                raise  # not the deadline: shutdown, or the client went away
            log.warning("[webhook] processing timed out after %.0f s (qstash id %s): 503, QStash will retry",
                        self.timeout_s, message_id)
            outcome = _transient("timeout")
        except Exception:
            # A bug, not the sender's fault: 500 so QStash retries (and, if it keeps failing, the DLQ keeps it).
            log.exception("[webhook] unexpected failure (qstash id %s)", message_id)
            outcome = Outcome(500, "transient", {"error": "internal", "retry": True})
        finally:
            self._deadlines.finish(task)
        elapsed = time.perf_counter() - started
        log.info("[webhook] %s %d in %.1f ms (qstash id %s, retried %s)", outcome.outcome, outcome.status,
                 elapsed * 1e3, message_id, retried)
        if self.on_outcome:
            self.on_outcome(outcome, elapsed)
        return outcome

    async def _handle(self, body: bytes, signatures: Sequence[str], url_suffix: str) -> Outcome:
        if self.verifier is not None:
            try:
                self.verifier.verify(body, signatures, url_suffix=url_suffix)
            except SignatureError as e:
                log.warning("[qstash] signature rejected: %s", e)
                return Outcome(401, "rejected_signature", {"error": "invalid_signature", "reason": e.reason})
            log.debug("[qstash] Webhook received and verified")
        try:
            event = uazapi.normalize(uazapi.parse_body(body))
        except PayloadError as e:
            log.warning("[webhook] non-retryable payload: %s", e.reason)
            return _non_retryable(e.reason)
        try:
            return await self._dispatch(event)
        except PayloadError as e:  # the store refused what can never be stored (an over-long id, a NUL in an id)
            log.warning("[webhook] non-retryable payload: %s", e.reason)
            return _non_retryable(e.reason)
        except StoreAuthError as e:
            # Configuration, not an outage: retries cannot fix it, so none is spent; QStash keeps the message in its
            # DLQ (489 + Upstash-NonRetryable-Error) until it is replayed after DATABASE_URL is fixed.
            log.error("[webhook] %s; the message goes to QStash's DLQ: replay it from there after the fix", e)
            return _non_retryable("database_auth_failed")
        except StoreError as e:
            log.warning("[webhook] database unavailable, QStash will retry: %s", e)
            return _transient("database_unavailable")

    async def _dispatch(self, event: MessageEvent | ReceiptEvent | InstanceEvent | Ignored) -> Outcome:
        inst = await self._instance(event.source.instance_name, event.source.token)
        if inst is None:
            log.warning("[webhook] unknown instance %r: non-retryable", event.source.instance_name)
            return _non_retryable("unknown_instance")
        if isinstance(event, MessageEvent):
            stored = await self.store.save_message(inst, event)  # committed: the outbox publishes it
            outcome = "stored" if stored.created else "duplicate"
            log.info("[webhook] message %s %s (conversation %d)", stored.external_id, outcome,
                     stored.conversation_id)
            return Outcome(200, outcome, {"status": outcome, "messageId": stored.message_id})
        if isinstance(event, ReceiptEvent):
            changed = await self.store.apply_receipt(inst, event)
            return Outcome(200, "receipt", {"status": "receipt", "updated": changed})
        if isinstance(event, InstanceEvent):
            await self.store.update_instance_status(inst, event)
            return Outcome(200, "instance", {"status": "instance", "state": event.status})
        log.info("[webhook] ignored: %s", event.reason)
        return Outcome(200, "ignored", {"status": "ignored", "reason": event.reason})

    async def _instance(self, name: str | None, token: str | None) -> InstanceRef | None:
        if not token:
            return None
        key = (name, hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest())
        hit = self._instances.get(key)
        now = time.monotonic()
        if hit and now - hit[0] < INSTANCE_CACHE_TTL_S:
            return hit[1]
        inst = await self.store.find_instance(name, token)
        if inst is not None:
            self._instances[key] = (now, inst)
        return inst

