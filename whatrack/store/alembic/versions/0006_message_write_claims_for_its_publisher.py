"""the message write can claim its new row for the outbox publisher of the process that wrote it

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

``whatrack_save_message`` gains a last parameter, ``p_claim_s``: above zero, a new message is inserted already
claimed for that many seconds (``publish_claimed_until``, the outbox lease) by the process that wrote it, whose
publisher then publishes the row from memory (``store.write.Writer.publish_from_memory``) instead of claiming it
again with an ``UPDATE ... FOR UPDATE SKIP LOCKED``: one row version, one statement and one round trip fewer per
batch. A process that dies first loses nothing: its lease runs out and any publisher's sweep takes the row, as for a
claim. Zero (the follow-up worker, a process without a publisher) leaves the row unclaimed, as before.

A new overload (PostgreSQL picks it by the number of arguments): a process still running the 34-parameter call during
a rolling upgrade keeps working. The function text is 0004's with the claim added; it is derived from 0004's file,
which a migration never changes, and each change is checked to apply exactly once.
"""

from __future__ import annotations

import runpy
from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHANGES = (
    ("p_status text, p_sent_at timestamptz, p_delivered_at timestamptz)",
     "p_status text, p_sent_at timestamptz, p_delivered_at timestamptz, p_claim_s double precision)"),
    ("            edited_at, created_at)\n",
     "            edited_at, created_at, publish_claimed_until)\n"),
    ("            p_delivered_at, v_edited_at, now())\n",
     "            p_delivered_at, v_edited_at, now(),\n"
     "            CASE WHEN p_claim_s > 0 THEN clock_timestamp() + make_interval(secs => p_claim_s) END)\n"),
)

_SIGNATURE = ("bigint, bigint, text, text, text, boolean, boolean, text, text, text, text, text, text, text, text, "
              "text, bigint, integer, text, text, text, boolean, double precision, double precision, text, text, "
              "text, text, text, boolean, text, text, timestamptz, timestamptz, double precision")


def save_message_function() -> str:
    """0004's ``whatrack_save_message`` with ``p_claim_s``."""
    text = str(runpy.run_path(str(Path(__file__).with_name("0004_partial_edit_and_track_indexes.py")))["SAVE_MESSAGE"])
    for old, new in _CHANGES:
        if text.count(old) != 1:
            raise RuntimeError(f"migration 0006: 0004's function text changed; cannot find {old.strip()!r} once")
        text = text.replace(old, new)
    return text


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(save_message_function())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS whatrack_save_message({_SIGNATURE})")
