"""The database schema: SQLAlchemy 2 models of organization, instance, lead, conversation, ticket and message.

PostgreSQL first, SQLite supported. Every timestamp is timezone-aware UTC on both (:class:`UTCDateTime`); ids are
BIGINT on PostgreSQL and SQLite's INTEGER rowid. Constraint names come from one naming convention so that the Alembic
migrations (``whatrack/store/alembic``) and these models compare equal on both databases.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator

#: Message statuses: the delivery order of ``events.STATUS_ORDER`` plus the two terminal ones.
MESSAGE_STATUSES = ("pending", "sent", "delivered", "read", "played", "failed", "deleted")
SENDER_TYPES = ("LEAD", "USER", "AI", "SYSTEM")
DIRECTIONS = ("inbound", "outbound")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: BIGINT ids on PostgreSQL; on SQLite only ``INTEGER PRIMARY KEY`` is the auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware (UTC), on PostgreSQL and on SQLite.

    Naive values are taken to be UTC already (SQLite hands them back naive; whatrack never makes naive times).
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        # SQLite compares timestamps as text: store one fixed naive-UTC format so that ordering is chronological.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Organization(Base):
    __tablename__ = "organization"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Instance(Base):
    """A UAZAPI instance (one WhatsApp number). Its token is kept only as a SHA-256 hex digest."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id"), index=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32), default="unknown")
    status_reason: Mapped[str | None] = mapped_column(Text)
    status_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Lead(Base):
    """A WhatsApp contact or group of an organization. ``phone`` is digits only, NULL for a group."""

    __tablename__ = "lead"
    __table_args__ = (
        UniqueConstraint("organization_id", "phone"),
        UniqueConstraint("organization_id", "remote_jid"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id"))
    remote_jid: Mapped[str] = mapped_column(String(128))
    phone: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(200))
    is_group: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversation"
    __table_args__ = (UniqueConstraint("lead_id", "instance_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id"), index=True)
    lead_id: Mapped[int] = mapped_column(ForeignKey("lead.id"))
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id"), index=True)
    status: Mapped[str] = mapped_column(String(32), default="open")
    unread_count: Mapped[int] = mapped_column(Integer, default=0)
    last_message_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ticket(Base):
    """A service ticket of a conversation; at most one is open per conversation (a partial unique index)."""

    __tablename__ = "ticket"
    __table_args__ = (
        Index("uq_ticket_open_conversation", "conversation_id", unique=True,
              postgresql_where=text("status = 'open'"), sqlite_where=text("status = 'open'")),
        CheckConstraint(_in("status", ("open", "closed")), name="status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organization.id"), index=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversation.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="open")
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]


class Message(Base):
    """One WhatsApp message, inbound or outbound, or an edit / reaction pointing at its target's external id.

    On PostgreSQL new heap pages are filled to half (migration 0007): publishing a row (``published_at``, in no index)
    and its receipts then update it in its own page (a HOT update, no new index entries).
    """

    __tablename__ = "message"
    __table_args__ = (
        UniqueConstraint("organization_id", "provider_id"),
        # One WhatsApp message id per instance: what receipts, edits and reactions look up, and what keeps the
        # follow-up worker's row and the echoed fromMe webhook from ever becoming two rows.
        UniqueConstraint("instance_id", "external_id"),
        Index("ix_message_conversation_id_sent_at", "conversation_id", "sent_at"),
        Index("ix_message_lead_id_direction_sent_at", "lead_id", "direction", "sent_at"),
        # Partial (migration 0004): only edits and the worker's sends have these, and a full index leading with
        # instance_id could be taken for the unique key's lookups on a table without statistics.
        Index("ix_message_instance_id_edit_of", "instance_id", "edit_of", postgresql_where=text("edit_of IS NOT NULL"),
              sqlite_where=text("edit_of IS NOT NULL")),
        # The follow-up worker's echo lookup (Store.find_outbound_by_track): did a send of this job reach UAZAPI?
        Index("ix_message_instance_id_track_id", "instance_id", "track_id",
              postgresql_where=text("track_id IS NOT NULL"), sqlite_where=text("track_id IS NOT NULL")),
        # One row per follow-up job (migration 0007: partial, only the worker's sends have a job id).
        Index("uq_message_job_id", "job_id", unique=True, postgresql_where=text("job_id IS NOT NULL"),
              sqlite_where=text("job_id IS NOT NULL")),
        CheckConstraint(_in("direction", DIRECTIONS), name="direction"),
        CheckConstraint(_in("sender_type", SENDER_TYPES), name="sender_type"),
        CheckConstraint(_in("status", MESSAGE_STATUSES), name="status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # No foreign keys here (migration 0005): every message would lock the same organization and instance rows on
    # insert. They are the conversation's, whose own keys (and conversation_id's here) keep them referenced.
    organization_id: Mapped[int] = mapped_column(BigId)
    instance_id: Mapped[int] = mapped_column(BigId)
    lead_id: Mapped[int] = mapped_column(ForeignKey("lead.id"))
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversation.id"))
    ticket_id: Mapped[int] = mapped_column(ForeignKey("ticket.id"), index=True)
    provider_id: Mapped[str] = mapped_column(String(200))
    external_id: Mapped[str] = mapped_column(String(128))
    direction: Mapped[str] = mapped_column(String(8))
    sender_type: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(32))
    raw_type: Mapped[str | None] = mapped_column(String(64))
    content: Mapped[str | None] = mapped_column(Text)
    participant_phone: Mapped[str | None] = mapped_column(String(32))
    media_mime: Mapped[str | None] = mapped_column(String(200))
    media_size: Mapped[int | None] = mapped_column(BigInteger)
    media_duration: Mapped[int | None] = mapped_column(Integer)
    media_file_name: Mapped[str | None] = mapped_column(Text)
    media_sha256: Mapped[str | None] = mapped_column(String(128))
    media_url: Mapped[str | None] = mapped_column(Text)
    media_voice: Mapped[bool] = mapped_column(Boolean, default=False)
    latitude: Mapped[float | None] = mapped_column(Float)
    longitude: Mapped[float | None] = mapped_column(Float)
    location_name: Mapped[str | None] = mapped_column(Text)
    location_address: Mapped[str | None] = mapped_column(Text)
    edit_of: Mapped[str | None] = mapped_column(String(128))
    reaction_to: Mapped[str | None] = mapped_column(String(128))
    reply_to: Mapped[str | None] = mapped_column(String(128))
    sent_by_api: Mapped[bool] = mapped_column(Boolean, default=False)
    track_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    sent_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    read_at: Mapped[datetime | None]
    edited_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    published_at: Mapped[datetime | None]  # set by the outbox publisher (MessageOutbox), once
    # The outbox lease before migration 0007 (now MessageOutbox.claimed_until); no longer written, kept for processes
    # of the previous version during a rolling upgrade.
    publish_claimed_until: Mapped[datetime | None]
    job_id: Mapped[str | None] = mapped_column(String(200))  # unique when set: uq_message_job_id
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MessageOutbox(Base):
    """The realtime outbox (migration 0007): one row per message not yet published to Centrifugo.

    Written by the statement that writes the message, deleted by the publisher's mark (``store.write.MARK``), which
    sets ``message.published_at`` in the same statement. ``claimed_until`` is a publisher's lease on it.
    """

    __tablename__ = "message_outbox"

    message_id: Mapped[int] = mapped_column(BigId, ForeignKey("message.id", ondelete="CASCADE"), primary_key=True,
                                            autoincrement=False)
    claimed_until: Mapped[datetime | None]


#: The CRM's tables in dependency order (``Store.counts`` reports them in this order).
TABLES = ("organization", "instance", "lead", "conversation", "ticket", "message")
#: Every table the migrations create (the outbox is the service's, not the CRM's).
ALL_TABLES = (*TABLES, "message_outbox")
