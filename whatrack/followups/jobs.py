"""The ``followup`` BullMQ queue: the job payload (wire format shared with Node) and scheduling.

The names and options live in :mod:`whatrack.followups.constants`; the worker that runs the jobs in
:mod:`whatrack.followups.worker`; the commands in :mod:`whatrack.followups.cli` (``python -m whatrack.followups.cli``
starts the worker).

Wire format (BullMQ job ``follow-up`` in queue ``followup``; camelCase, written by Node producers too)::

    {
      "organizationId": 1,                        # int, required (whatrack's database ids; a digit string
      "instanceId":     2,                        #   is accepted too): the UAZAPI instance that sends
      "leadId":         3,                        # int, required
      "text":           "Oi! Ainda tem interesse?",  # str, required, 1..65536 characters
      "scheduledAt":    "2026-11-26T01:00:00.000Z",  # ISO 8601 with zone, optional: when the follow-up was
                                                  #   scheduled; a reply after it cancels the send. Default: the
                                                  #   BullMQ job's own `timestamp` (the moment it was added).
      "runAt":          "2026-11-26T01:10:00.000Z",  # ISO 8601 with zone, optional: the due time (informational;
                                                  #   BullMQ's `delay` decides when the job runs)
      "v":              1                         # int, optional: payload version
    }

Unknown keys are ignored (a newer producer may add some); a malformed payload fails the job at once
(``UnrecoverableError``), never retried.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aredis
from bullmq import Queue

from whatrack import redis_tcp
from whatrack.errors import PayloadError, QueueError
from whatrack.followups.constants import (
    ATTEMPTS,
    BACKOFF,
    DEFAULT_CONCURRENCY,
    DEFAULT_JOB_OPTIONS,
    DRAIN_DELAY_S,
    JOB_FIELDS,
    JOB_KEY_SUFFIXES,
    JOB_NAME,
    KEY_PREFIX,
    LOCK_DURATION_MS,
    MAX_STALLED_COUNT,
    MAX_TEXT_CHARS,
    PAYLOAD_VERSION,
    QUEUE_KEYS,
    QUEUE_NAME,
    REMOVE_ON_COMPLETE,
    REMOVE_ON_FAIL,
    SENT_KEY_SUFFIX,
    SENT_RECORD_TTL_S,
    STALLED_INTERVAL_MS,
    sent_key,
)
from whatrack.times import iso

log = logging.getLogger("whatrack.followups.jobs")

# The BullMQ vocabulary (names, options, timings) lives in whatrack.followups.constants, re-exported here (``__all__``)
# for callers that import it from the queue module.

#: Above the longest BZPOPMIN (10 s): redis-py 8's default of 5 s cut the waits short (protocols/bullmq.md §1.3a).
SOCKET_TIMEOUT_S = redis_tcp.SOCKET_TIMEOUT_S
#: Seconds a command waits for a free pooled connection before it fails.
POOL_WAIT_S = 20.0

# BullMQ refuses integer custom ids (they clash with the auto-id counter); ':' separates key parts.
_JOB_ID_RE = re.compile(r"^(?!\d+$)[A-Za-z0-9_.@-]{1,200}$")


# -- the payload ---------------------------------------------------------------------------------------------------


def to_iso(dt: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``: what JavaScript's ``Date.toISOString()`` writes."""
    return iso(dt)


def _ms_utc(dt: datetime) -> datetime:
    u = dt.astimezone(UTC)
    return u.replace(microsecond=u.microsecond // 1000 * 1000)


def _parse_iso(field: str, value: object) -> datetime:
    if not isinstance(value, str):
        raise PayloadError("bad_field", f"{field} must be an ISO 8601 string such as "
                                        f"'2026-11-26T01:00:00.000Z', got {type(value).__name__}")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise PayloadError("bad_field", f"{field} is not an ISO 8601 date-time: {value[:40]!r} "
                                        "(example: '2026-11-26T01:00:00.000Z')") from None
    if dt.tzinfo is None:
        raise PayloadError("bad_field", f"{field} has no time zone: {value[:40]!r}; add 'Z' or an offset")
    return _ms_utc(dt)


def _req_id(data: dict[str, Any], key: str) -> int:
    v = data.get(key)
    if v is None:
        raise PayloadError("missing_field", f"{key} is missing; a follow-up job needs organizationId, instanceId, "
                                            "leadId and text")
    if isinstance(v, str) and v.isascii() and v.isdigit():
        v = int(v)  # a producer that keeps ids as strings
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**63:
        raise PayloadError("bad_field", f"{key} must be a positive integer id (whatrack's database ids), got "
                                        f"{str(v)[:40]!r} ({type(v).__name__})")
    return v


@dataclass(frozen=True)
class FollowupJob:
    """One follow-up: what to send, to whom, through which instance, and since when a reply cancels it."""

    organization_id: int
    instance_id: int
    lead_id: int
    text: str
    scheduled_at: datetime
    run_at: datetime | None = None

    def __post_init__(self) -> None:
        # The wire keeps UTC milliseconds (JavaScript's Date): hold the same, so a round trip is exact.
        for name in ("scheduled_at", "run_at"):
            v = getattr(self, name)
            if isinstance(v, datetime):
                if v.tzinfo is None:
                    raise PayloadError("bad_field", f"{name} has no time zone; pass an aware datetime (tzinfo=UTC)")
                object.__setattr__(self, name, _ms_utc(v))
        # Validate on construction too, so a producer can never write what a worker would refuse.
        FollowupJob.from_wire(self.to_wire())

    def to_wire(self) -> dict[str, Any]:
        """The job data as BullMQ stores it (camelCase, JSON-safe)."""
        out: dict[str, Any] = {
            "organizationId": self.organization_id, "instanceId": self.instance_id, "leadId": self.lead_id,
            "text": self.text, "scheduledAt": to_iso(self.scheduled_at), "v": PAYLOAD_VERSION,
        }
        if self.run_at is not None:
            out["runAt"] = to_iso(self.run_at)
        return out

    @classmethod
    def from_wire(cls, data: object, *, default_scheduled_at: datetime | None = None) -> FollowupJob:
        """Validate job data written by any producer (Python or Node).

        Raises:
            PayloadError: the data can never make a follow-up; the message names the field and the fix.
        """
        if not isinstance(data, dict):
            raise PayloadError("not_an_object", f"job data must be a JSON object, got {type(data).__name__}")
        v = data.get("v", PAYLOAD_VERSION)
        if v != PAYLOAD_VERSION:
            raise PayloadError("bad_version", f"payload version {v!r} is not supported (this worker reads "
                                              f"v={PAYLOAD_VERSION}); upgrade the worker")
        org, inst, lead = _req_id(data, "organizationId"), _req_id(data, "instanceId"), _req_id(data, "leadId")
        text = data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise PayloadError("bad_field", "text must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise PayloadError("bad_field", f"text has {len(text)} characters; WhatsApp allows {MAX_TEXT_CHARS}")
        if data.get("scheduledAt") is not None:
            scheduled = _parse_iso("scheduledAt", data["scheduledAt"])
        elif default_scheduled_at is not None:
            scheduled = default_scheduled_at
        else:
            raise PayloadError("missing_field", "scheduledAt is missing (ISO 8601, when the follow-up was made)")
        run_at = _parse_iso("runAt", data["runAt"]) if data.get("runAt") is not None else None
        obj = object.__new__(cls)  # skip __post_init__: already validated
        for k, val in (("organization_id", org), ("instance_id", inst), ("lead_id", lead), ("text", text),
                       ("scheduled_at", scheduled), ("run_at", run_at)):
            object.__setattr__(obj, k, val)
        return obj


# -- the queue ------------------------------------------------------------------------------------------------------


def pooled_client(url: str, *, ca_bundle: str | None = None, max_connections: int = 50) -> aredis.Redis:
    """A TLS-verified client (``redis_tcp``'s timeouts and retries) over a *blocking* pool: past ``max_connections``
    a command waits for a free connection instead of failing with redis-py's "Too many connections" (its default
    pool raises at 100).

    Raises:
        ConfigError: ``url`` is not a Redis URL.
    """
    kw = redis_tcp.connection_kwargs(url, ca_bundle=ca_bundle)
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=POOL_WAIT_S,
                                                  decode_responses=True, **kw)
    return aredis.Redis.from_pool(pool)


def open_queue(url: str, *, ca_bundle: str | None = None) -> Queue:
    """The ``followup`` queue with the PRD defaults, over a TLS-verified client. Close it with ``await q.close()``.

    Raises:
        ConfigError: ``url`` is not a Redis URL.
    """
    client = pooled_client(url, ca_bundle=ca_bundle)
    return Queue(QUEUE_NAME, {"connection": client, "prefix": KEY_PREFIX, "defaultJobOptions": DEFAULT_JOB_OPTIONS})


async def schedule_followup(queue: Queue, *, organization_id: int, instance_id: int, lead_id: int, text: str,
                            run_at: datetime, job_id: str | None = None) -> str:
    """Add a follow-up that runs at ``run_at``; return its job id.

    With a ``job_id``, scheduling again is a no-op (BullMQ keeps the first job under that id, whatever its state).

    Raises:
        PayloadError: a field is malformed (``run_at`` without a time zone, an empty text, a bad id).
        QueueError: Redis refused or failed the add.
    """
    if run_at.tzinfo is None:
        raise PayloadError("bad_field", "run_at has no time zone; pass an aware datetime (e.g. tzinfo=UTC)")
    if job_id is not None and not _JOB_ID_RE.match(job_id):
        raise PayloadError("bad_field", f"job_id {job_id[:40]!r} must be 1-200 letters, digits or _.@- and not "
                                        "all digits (BullMQ keeps integer ids for its counter)")
    now = datetime.now(UTC)
    job = FollowupJob(organization_id, instance_id, lead_id, text, scheduled_at=now, run_at=run_at)
    # Round up: BullMQ adds the delay to its own timestamp, taken after `now`, so the job is never due early.
    delay_ms = max(0, math.ceil((run_at - now).total_seconds() * 1000))
    opts: dict[str, Any] = {"delay": delay_ms}
    if job_id is not None:
        opts["jobId"] = job_id
    try:
        added = await queue.add(JOB_NAME, job.to_wire(), opts)
    except Exception as e:
        raise QueueError(f"could not add the follow-up for lead {lead_id}: {type(e).__name__}: {e}") from e
    log.info("follow-up %s for lead %s due in %d ms", added.id, lead_id, delay_ms)
    return str(added.id)


__all__ = [
    "ATTEMPTS", "BACKOFF", "DEFAULT_CONCURRENCY", "DEFAULT_JOB_OPTIONS", "DRAIN_DELAY_S", "JOB_FIELDS",
    "JOB_KEY_SUFFIXES", "JOB_NAME", "KEY_PREFIX", "LOCK_DURATION_MS", "MAX_STALLED_COUNT", "MAX_TEXT_CHARS",
    "PAYLOAD_VERSION", "QUEUE_KEYS", "QUEUE_NAME", "REMOVE_ON_COMPLETE", "REMOVE_ON_FAIL", "SENT_KEY_SUFFIX",
    "SENT_RECORD_TTL_S", "STALLED_INTERVAL_MS", "FollowupJob", "open_queue", "pooled_client", "schedule_followup",
    "sent_key", "to_iso",
]
