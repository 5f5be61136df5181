"""index message (instance_id, track_id)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The follow-up worker looks up UAZAPI's ``fromMe`` echo of a send by its ``track_id`` (the job id) before it sends a
job again whose previous attempt was cut short: ``Store.find_outbound_by_track``.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_message_instance_id_track_id", "message", ["instance_id", "track_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_message_instance_id_track_id", table_name="message")
