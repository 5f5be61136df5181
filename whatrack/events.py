"""The typed events a UAZAPI webhook normalizes to: the contract between the normalizer, the store and the handler.

Frozen dataclasses, no I/O. ``uazapi.normalize`` produces them; ``store`` persists them; ``handler`` routes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from whatrack.times import iso

Direction = Literal["inbound", "outbound"]

#: Message types after normalization (``MessageEvent.type``).
MESSAGE_TYPES = (
    "text", "image", "video", "audio", "document", "sticker", "location", "contact", "reaction", "poll",
    "poll_vote", "list_response", "button_response", "unknown",
)

#: Delivery statuses, in the order they may only advance (a receipt never moves a message backwards).
STATUS_ORDER = ("pending", "sent", "delivered", "read", "played")


@dataclass(frozen=True)
class Media:
    """Metadata of a media message. ``url`` is only set when it is directly usable (never the encrypted .enc)."""

    mime_type: str | None = None
    size_bytes: int | None = None
    duration_seconds: int | None = None
    file_name: str | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    voice: bool = False
    url: str | None = None


@dataclass(frozen=True)
class Location:
    latitude: float | None
    longitude: float | None
    name: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class Source:
    """Who sent the webhook: the instance name and (secret) token as they appear in the payload."""

    instance_name: str | None
    owner: str | None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class MessageEvent:
    """One WhatsApp message (new, or an edit / reaction linked to its target)."""

    source: Source
    external_id: str  # the bare WhatsApp messageid (what receipts, reactions and edits refer to)
    provider_id: str  # "<owner>:<messageid>", UAZAPI's message.id: unique per instance
    direction: Direction
    type: str  # one of MESSAGE_TYPES
    raw_type: str | None  # UAZAPI's messageType, e.g. "ExtendedTextMessage"
    chat_jid: str  # the conversation's JID (the counterpart, or the group)
    lead_jid: str  # the lead's JID: the chat, never the sender of an outbound message
    lead_phone: str | None  # digits only; None for a group
    lead_name: str | None
    is_group: bool
    group_name: str | None
    participant_phone: str | None  # in a group: who wrote it (digits), inbound only
    text: str | None
    sent_at: datetime  # UTC
    edit_of: str | None = None  # external_id of the message this edits
    reaction_to: str | None = None  # external_id of the message reacted to
    reply_to: str | None = None  # external_id of the quoted message
    media: Media | None = None
    location: Location | None = None
    sent_by_api: bool = False
    track_id: str | None = None

    @property
    def sender_type(self) -> Literal["LEAD", "USER"]:
        """The PRD's senderType: the lead wrote it, or we (the instance owner) did."""
        return "USER" if self.direction == "outbound" else "LEAD"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["event"] = "message"
        d["instance_name"] = self.source.instance_name
        d["sent_at"] = iso(self.sent_at, "auto")
        return d


@dataclass(frozen=True)
class ReceiptEvent:
    """A ``messages_update``: a status (or deletion) applied to every id in the batch."""

    source: Source
    external_ids: tuple[str, ...]
    status: str  # one of STATUS_ORDER, or "deleted", or "failed"
    at: datetime | None
    chat_jid: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"event": "receipt", "instance_name": self.source.instance_name,
                "external_ids": list(self.external_ids), "status": self.status,
                "at": iso(self.at, "auto") if self.at else None, "chat_jid": self.chat_jid}


@dataclass(frozen=True)
class InstanceEvent:
    """A ``connection`` event: the instance's state changed."""

    source: Source
    status: str  # "connected", "connecting", "disconnected", ...
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"event": "instance", "instance_name": self.source.instance_name, "owner": self.source.owner,
                "status": self.status, "reason": self.reason}


@dataclass(frozen=True)
class Ignored:
    """A webhook that is valid but carries nothing to store (unknown event type, broadcast, newsletter, ...)."""

    source: Source
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"event": "ignored", "instance_name": self.source.instance_name, "reason": self.reason}


Event = MessageEvent | ReceiptEvent | InstanceEvent | Ignored
