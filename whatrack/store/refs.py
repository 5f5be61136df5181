"""What the store hands back: references to stored rows (:class:`InstanceRef`, :class:`LeadRef`) and a stored message.

Plain frozen dataclasses, so the transaction steps (:mod:`whatrack.store.steps`) and the callers can name them without
importing :class:`~whatrack.store.api.Store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
    realtime: dict[str, Any]  # the PRD payload plus conversationId, externalId, type, direction
