"""What the store hands back: references to stored rows (:class:`InstanceRef`, :class:`LeadRef`) and a stored message.

Plain frozen dataclasses, so the transaction steps (:mod:`whatrack.store.steps`) and the callers can name them without
importing :class:`~whatrack.store.api.Store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from whatrack.times import iso


@dataclass(frozen=True)
class InstanceRef:
    id: int
    organization_id: int
    name: str


@dataclass(frozen=True)
class LeadRef:
    id: int
    phone: str | None
    remote_jid: str
    organization_id: int


@dataclass(frozen=True)
class StoredMessage:
    message_id: int
    conversation_id: int
    lead_id: int
    ticket_id: int
    organization_id: int
    external_id: str
    provider_id: str
    created: bool  # False when the row already existed (a redelivery / retry)
    published: bool  # True when published_at was already set
    channel: str  # Centrifugo channel of the conversation: f"conversation:{conversation_id}"
    #: The stored columns ``realtime`` is built from (not compared, not shown).
    row: dict[str, Any] = field(repr=False, compare=False)

    @cached_property
    def realtime(self) -> dict[str, Any]:
        """The PRD payload plus conversationId, externalId, type, direction (:func:`realtime_payload`).

        Built when asked for: the webhook's outbox publisher builds its own from the rows it publishes, and building
        it for every stored message cost 2 % of the endpoint's CPU (py-spy, ``bench/webhook.py -c 256``)."""
        return realtime_payload(self.row)


def realtime_payload(row: dict[str, Any]) -> dict[str, Any]:
    """The PRD's Centrifugo payload of a message row (``id``, ``content``, ``senderType``, ``sentAt``) plus the
    fields a client needs to place it (``conversationId``, ``externalId``, ``type``, ``direction``)."""
    return {
        "id": row["id"],
        "content": row["content"],
        "senderType": row["sender_type"],
        "sentAt": iso(row["sent_at"], "auto"),
        "conversationId": row["conversation_id"],
        "externalId": row["external_id"],
        "type": row["type"],
        "direction": row["direction"],
    }
