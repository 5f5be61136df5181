"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26

The six tables of the first port from Prisma: organization, instance, lead, conversation, ticket, message.
Timestamps are ``timestamptz`` on PostgreSQL (UTC, naive-UTC text on SQLite through ``models.UTCDateTime``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT ids; on SQLite only INTEGER PRIMARY KEY is the auto-incrementing rowid.
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "organization",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organization")),
        sa.UniqueConstraint("name", name=op.f("uq_organization_name")),
    )
    op.create_table(
        "instance",
        sa.Column("id", ID, nullable=False),
        sa.Column("organization_id", ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("status_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organization.id"], name=op.f("fk_instance_organization_id_organization")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance")),
        sa.UniqueConstraint("name", name=op.f("uq_instance_name")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_instance_token_hash")),
    )
    op.create_index(op.f("ix_instance_organization_id"), "instance", ["organization_id"], unique=False)

    op.create_table(
        "lead",
        sa.Column("id", ID, nullable=False),
        sa.Column("organization_id", ID, nullable=False),
        sa.Column("remote_jid", sa.String(length=128), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("is_group", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organization.id"], name=op.f("fk_lead_organization_id_organization")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lead")),
        sa.UniqueConstraint("organization_id", "phone", name=op.f("uq_lead_organization_id_phone")),
        sa.UniqueConstraint("organization_id", "remote_jid", name=op.f("uq_lead_organization_id_remote_jid")),
    )
    op.create_table(
        "conversation",
        sa.Column("id", ID, nullable=False),
        sa.Column("organization_id", ID, nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("instance_id", ID, nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("unread_count", sa.Integer(), nullable=False),
        sa.Column("last_message_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instance.id"], name=op.f("fk_conversation_instance_id_instance")),
        sa.ForeignKeyConstraint(["lead_id"], ["lead.id"], name=op.f("fk_conversation_lead_id_lead")),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organization.id"], name=op.f("fk_conversation_organization_id_organization")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversation")),
        sa.UniqueConstraint("lead_id", "instance_id", name=op.f("uq_conversation_lead_id_instance_id")),
    )
    op.create_index(op.f("ix_conversation_instance_id"), "conversation", ["instance_id"], unique=False)
    op.create_index(op.f("ix_conversation_organization_id"), "conversation", ["organization_id"], unique=False)

    op.create_table(
        "ticket",
        sa.Column("id", ID, nullable=False),
        sa.Column("organization_id", ID, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('open', 'closed')", name=op.f("ck_ticket_status")),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversation.id"], name=op.f("fk_ticket_conversation_id_conversation")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organization.id"], name=op.f("fk_ticket_organization_id_organization")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ticket")),
    )
    op.create_index(op.f("ix_ticket_conversation_id"), "ticket", ["conversation_id"], unique=False)
    op.create_index(op.f("ix_ticket_organization_id"), "ticket", ["organization_id"], unique=False)
    op.create_index(
        "uq_ticket_open_conversation",
        "ticket",
        ["conversation_id"],
        unique=True,
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )

    op.create_table(
        "message",
        sa.Column("id", ID, nullable=False),
        sa.Column("organization_id", ID, nullable=False),
        sa.Column("instance_id", ID, nullable=False),
        sa.Column("lead_id", ID, nullable=False),
        sa.Column("conversation_id", ID, nullable=False),
        sa.Column("ticket_id", ID, nullable=False),
        sa.Column("provider_id", sa.String(length=200), nullable=False),
        sa.Column("external_id", sa.String(length=128), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("sender_type", sa.String(length=8), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("raw_type", sa.String(length=64), nullable=True),
        sa.Column("content", sa.Text(), nullable=True),
        sa.Column("participant_phone", sa.String(length=32), nullable=True),
        sa.Column("media_mime", sa.String(length=200), nullable=True),
        sa.Column("media_size", sa.BigInteger(), nullable=True),
        sa.Column("media_duration", sa.Integer(), nullable=True),
        sa.Column("media_file_name", sa.Text(), nullable=True),
        sa.Column("media_sha256", sa.String(length=128), nullable=True),
        sa.Column("media_url", sa.Text(), nullable=True),
        sa.Column("media_voice", sa.Boolean(), nullable=False),
        sa.Column("latitude", sa.Float(), nullable=True),
        sa.Column("longitude", sa.Float(), nullable=True),
        sa.Column("location_name", sa.Text(), nullable=True),
        sa.Column("location_address", sa.Text(), nullable=True),
        sa.Column("edit_of", sa.String(length=128), nullable=True),
        sa.Column("reaction_to", sa.String(length=128), nullable=True),
        sa.Column("reply_to", sa.String(length=128), nullable=True),
        sa.Column("sent_by_api", sa.Boolean(), nullable=False),
        sa.Column("track_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("edited_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("job_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("direction IN ('inbound', 'outbound')", name=op.f("ck_message_direction")),
        sa.CheckConstraint("sender_type IN ('LEAD', 'USER', 'AI', 'SYSTEM')", name=op.f("ck_message_sender_type")),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'delivered', 'read', 'played', 'failed', 'deleted')",
            name=op.f("ck_message_status"),
        ),
        sa.ForeignKeyConstraint(
            ["conversation_id"], ["conversation.id"], name=op.f("fk_message_conversation_id_conversation")
        ),
        sa.ForeignKeyConstraint(["instance_id"], ["instance.id"], name=op.f("fk_message_instance_id_instance")),
        sa.ForeignKeyConstraint(["lead_id"], ["lead.id"], name=op.f("fk_message_lead_id_lead")),
        sa.ForeignKeyConstraint(
            ["organization_id"], ["organization.id"], name=op.f("fk_message_organization_id_organization")
        ),
        sa.ForeignKeyConstraint(["ticket_id"], ["ticket.id"], name=op.f("fk_message_ticket_id_ticket")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message")),
        sa.UniqueConstraint("instance_id", "external_id", name=op.f("uq_message_instance_id_external_id")),
        sa.UniqueConstraint("job_id", name=op.f("uq_message_job_id")),
        sa.UniqueConstraint("organization_id", "provider_id", name=op.f("uq_message_organization_id_provider_id")),
    )
    op.create_index("ix_message_conversation_id_sent_at", "message", ["conversation_id", "sent_at"], unique=False)
    op.create_index("ix_message_instance_id_edit_of", "message", ["instance_id", "edit_of"], unique=False)
    op.create_index(
        "ix_message_lead_id_direction_sent_at", "message", ["lead_id", "direction", "sent_at"], unique=False
    )
    op.create_index(op.f("ix_message_ticket_id"), "message", ["ticket_id"], unique=False)


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints too.
    for table in ("message", "ticket", "conversation", "lead", "instance", "organization"):
        op.drop_table(table)
