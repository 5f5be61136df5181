"""message: no foreign keys to organization and instance (held through conversation); room for in-page updates

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

A foreign key check locks the row it points at (``FOR KEY SHARE``). Every message pointed at the same organization row
and the same instance row, so every concurrent webhook write locked those two rows; two or more lockers of a row make
PostgreSQL build a MultiXact for it, each new locker a new one. Measured: PostgreSQL's CPU per message in
``bench/webhook.py`` (32 concurrent deliveries, one instance, one A/B pair; runs spread by about 0.03 ms) 0.317 ms with
the two keys, 0.259 ms without; on one connection (no lock contention) 0.210 -> 0.183 ms per write. The other three
keys (lead, conversation, ticket) point at per-conversation rows and cost 0.017 ms more together, so they stay.

Nothing is left unchecked: a message's organization and instance are its conversation's (the write finds the
conversation by lead and instance, and ``conversation`` keeps its own foreign keys to both), and
``message.conversation_id`` keeps its foreign key, so neither row can be deleted while a message depends on it.

``fillfactor = 90`` leaves a tenth of each new heap page free, so that the outbox claim (``publish_claimed_until``,
in no index) updates a fresh row in its page (a HOT update: no new entry in the message table's seven indexes)
instead of writing a new version of it elsewhere. Measured on one connection: claim + mark 0.068 -> 0.052-0.057 ms
of PostgreSQL CPU per message. It applies to pages written from now on.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = (("fk_message_organization_id_organization", "organization_id", "organization"),
         ("fk_message_instance_id_instance", "instance_id", "instance"))


def upgrade() -> None:
    with op.batch_alter_table("message") as batch:
        for name, _, _ in _KEYS:
            batch.drop_constraint(name, type_="foreignkey")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE message SET (fillfactor = 90)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE message RESET (fillfactor)")
    with op.batch_alter_table("message") as batch:
        for name, column, table in _KEYS:
            batch.create_foreign_key(name, table, [column], ["id"])
