"""Pure helpers of the store: validating events, turning them into row values, realtime payloads, status rules.

No I/O here: everything is a function of its arguments, tested without a database.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

from whatrack.errors import PayloadError
from whatrack.events import MESSAGE_TYPES, STATUS_ORDER, MessageEvent
from whatrack.store.refs import realtime_payload as realtime_payload  # defined with the stored message it publishes

#: Column widths (``models``), checked before writing so that PostgreSQL and SQLite refuse the same input and a
#: too-long value is a clear, non-retryable error instead of a database error that QStash would retry forever.
LIMITS = {
    "provider_id": 200, "external_id": 128, "lead_jid": 128, "lead_phone": 32, "raw_type": 64,
    "participant_phone": 32, "edit_of": 128, "reaction_to": 128, "reply_to": 128, "track_id": 200,
    "job_id": 200, "instance_name": 200, "organization": 200, "owner": 32, "status": 32,
    "media_mime": 200, "media_sha256": 128,
}
NAME_LIMIT = 200  # lead names are cosmetic: cut, never refused

#: Receipts that may move a message to each status: the lower ones, and "failed" only for a proof of delivery.
_DELIVERED_RANK = STATUS_ORDER.index("delivered")


def token_hash(token: str) -> str:
    """SHA-256 hex of an instance token: the only form of a token that is ever stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_length(field: str, value: str | None) -> None:
    """Raise PayloadError when ``value`` is longer than the column ``field`` holds."""
    limit = LIMITS[field]
    if value is not None and len(value) > limit:
        raise PayloadError("field_too_long", f"{field} has {len(value)} characters, the limit is {limit}; "
                                             "check the normalizer or the sender")


def check_aware(field: str, t: datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise PayloadError("naive_datetime", f"{field} has no time zone; pass an aware datetime (UTC)")


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str | None) -> str | None:
    """``value`` with what PostgreSQL cannot store (NUL, lone surrogates) replaced by U+FFFD; else unchanged.

    A message is never refused for its text: it is stored with the replacement character instead.
    """
    if value is None or not _UNSTORABLE.search(value):
        return value
    return _UNSTORABLE.sub("\ufffd", value)


def check_id(field: str, value: str | None) -> None:
    """Ids must be storable as they are (a replaced character would break matching)."""
    if value is not None and _UNSTORABLE.search(value):
        raise PayloadError("bad_id", f"{field} contains a NUL or an unpaired surrogate; fix the sender")


def check_message_event(ev: MessageEvent) -> None:
    """Validate a MessageEvent before anything is written.

    Raises:
        PayloadError: naming the field at fault (empty id, unknown type or direction, naive time, too long).
    """
    if not ev.provider_id or not ev.external_id:
        raise PayloadError("no_message_id", "the event has no provider_id/external_id; it cannot be stored "
                                            "idempotently")
    if not ev.lead_jid:
        raise PayloadError("no_chat", f"message {ev.external_id} has no lead_jid (chat); cannot pick the lead")
    if ev.direction not in ("inbound", "outbound"):
        raise PayloadError("bad_direction", f"direction {ev.direction!r} is not 'inbound' or 'outbound'")
    if ev.type not in MESSAGE_TYPES:
        raise PayloadError("bad_type", f"type {ev.type!r} is not one of {', '.join(MESSAGE_TYPES)}")
    check_aware("sent_at", ev.sent_at)
    for f in ("provider_id", "external_id", "lead_jid", "lead_phone", "raw_type", "participant_phone", "edit_of",
              "reaction_to", "reply_to", "track_id"):
        check_length(f, getattr(ev, f))
        check_id(f, getattr(ev, f))
    if ev.media:
        check_length("media_mime", ev.media.mime_type)
        check_length("media_sha256", ev.media.sha256)


def is_edit_or_reaction(ev: MessageEvent) -> bool:
    """Edits and reactions are stored and linked, but are not new messages of the conversation."""
    return bool(ev.edit_of) or bool(ev.reaction_to) or ev.type == "reaction"


def message_values(ev: MessageEvent) -> dict[str, Any]:
    """The ``message`` columns an event fills (ids of organization, instance, lead, ... are added by the store)."""
    m, loc = ev.media, ev.location
    return {
        "provider_id": ev.provider_id,
        "external_id": ev.external_id,
        "direction": ev.direction,
        "sender_type": ev.sender_type,  # outbound (fromMe) is USER: the lead is the chat, never the sender
        "type": ev.type,
        "raw_type": clean_text(ev.raw_type),
        "content": clean_text(ev.text),
        "participant_phone": ev.participant_phone,
        "media_mime": clean_text(m.mime_type if m else None),
        "media_size": m.size_bytes if m else None,
        "media_duration": m.duration_seconds if m else None,
        "media_file_name": clean_text(m.file_name if m else None),
        "media_sha256": clean_text(m.sha256 if m else None),
        "media_url": clean_text(m.url if m else None),
        "media_voice": bool(m and m.voice),
        "latitude": loc.latitude if loc else None,
        "longitude": loc.longitude if loc else None,
        "location_name": clean_text(loc.name if loc else None),
        "location_address": clean_text(loc.address if loc else None),
        "edit_of": ev.edit_of,
        "reaction_to": ev.reaction_to,
        "reply_to": ev.reply_to,
        "sent_by_api": ev.sent_by_api,
        "track_id": ev.track_id,
        # An inbound message has reached us, so it is delivered; an outbound echo is sent until a receipt says more.
        "status": "delivered" if ev.direction == "inbound" else "sent",
        "sent_at": ev.sent_at,
    }


def lead_name(ev: MessageEvent) -> str | None:
    name = ev.group_name if ev.is_group and ev.group_name else ev.lead_name
    return clean_text(name[:NAME_LIMIT]) if name else None


def channel(conversation_id: int) -> str:
    return f"conversation:{conversation_id}"


def receipt_sources(status: str) -> tuple[str, ...]:
    """The statuses a receipt of ``status`` may move a message from (statuses only advance).

    Raises:
        PayloadError: ``status`` is not a delivery status, ``failed`` or ``deleted``.
    """
    if status == "deleted":
        return tuple(s for s in (*STATUS_ORDER, "failed"))
    if status == "failed":
        return ("pending", "sent")
    if status not in STATUS_ORDER:
        raise PayloadError("bad_status", f"receipt status {status!r} is not one of "
                                         f"{', '.join((*STATUS_ORDER, 'failed', 'deleted'))}")
    rank = STATUS_ORDER.index(status)
    lower = STATUS_ORDER[:rank]
    # A delivery (or read) receipt proves the message did reach the lead, so it also overrides "failed".
    return (*lower, "failed") if rank >= _DELIVERED_RANK else lower


def receipt_timestamps(status: str) -> tuple[bool, bool]:
    """Whether a receipt of ``status`` sets (delivered_at, read_at) when they are still empty."""
    if status not in STATUS_ORDER:
        return False, False
    rank = STATUS_ORDER.index(status)
    return rank >= _DELIVERED_RANK, rank >= STATUS_ORDER.index("read")
