"""the realtime outbox as a table of its own; publishing a message updates its row in place; job_id unique if set

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05

Until now the message row was the outbox: ``ix_message_unpublished`` (a partial index on ``published_at IS NULL``)
found the unpublished rows, and the publisher's mark set ``published_at``. A column in an index's predicate counts as
indexed, so no mark could be a HOT update: each wrote a new version of the whole row (about 264 bytes) and a new entry
in each of the table's six other indexes. Measured (``whatrack_save_message`` in batches of 64, then marks in batches
of 64, on one connection; PostgreSQL's CPU per message, runs alternated): 92-98 us to write, 20-30 us to mark, and
0 of 12,640 marks were HOT.

Now ``message_outbox`` holds one narrow row per unpublished message (its id and the publisher's lease), written by
the same statement that writes the message; the mark deletes it and sets ``published_at`` in place. With no index on
``published_at`` and half of each new heap page left free (``fillfactor = 50``: room for each row's update in its
own page), every mark was HOT: 99-112 us to write (the outbox row and its foreign key included), 7-8 us to mark. In
``bench/webhook.py``'s last run (c=256, after 64,000 writes in the same database) PostgreSQL's CPU per message went
from 0.165-0.173 ms to 0.137-0.142 (three sweeps each, alternated). The heap is not bigger than before once its rows
are published: a non-HOT update left two versions of each row too, and six more index entries, until a vacuum.

``uq_message_job_id`` becomes a partial unique index (``job_id IS NOT NULL``): only the follow-up worker's sends
have a job id, and the full index took a NULL entry, at its right end, for every webhook message. The same rows are
unique, ``ON CONFLICT DO NOTHING`` still covers it, and a lookup by job id can use it. Measured in
``bench/webhook.py -c 256`` (three runs each, alternated): PostgreSQL 0.119-0.123 ms/msg with the full index,
0.114-0.121 with the partial one, within the runs' spread.

``message.publish_claimed_until`` is no longer written (the lease is ``message_outbox.claimed_until``); it stays for
processes of the previous version during a rolling upgrade. Their writes go through the function, which fills the
outbox; a mark of theirs sets ``published_at`` without deleting the outbox row, which the next claim then deletes
(``store.write.CLAIM``). Their claims (a lease on the message row, which the new publishers do not see) can let a
row be published by an old and a new publisher, both with the message's idempotency key, which Centrifugo keeps to
one publication. The 34-parameter overload (0004's, for processes older than 0006) becomes a call of the
35-parameter one with no claim, so that its rows reach the outbox too. Without ``ix_message_unpublished``, an old
process's claim and outbox-depth queries read the whole message table: replace those processes soon after the
upgrade.
"""

from __future__ import annotations

import runpy
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_HERE = Path(__file__).parent
_HAS_JOB = sa.text("job_id IS NOT NULL")

_CLAIM = "CASE WHEN p_claim_s > 0 THEN clock_timestamp() + make_interval(secs => p_claim_s) END"
_INSERTED = ("        ON CONFLICT DO NOTHING RETURNING x.* INTO m;\n"
             "        IF FOUND THEN\n"
             "            v_created := true;\n")
_OUTBOX_ROW = ("            -- the realtime outbox: claimed for the writing process's publisher if p_claim_s > 0\n"  # noqa: S608
               "            INSERT INTO message_outbox (message_id, claimed_until) VALUES (m.id, " + _CLAIM + ");\n")
_CHANGES = (
    ("            edited_at, created_at, publish_claimed_until)\n",
     "            edited_at, created_at)\n"),
    (f"            p_delivered_at, v_edited_at, now(),\n            {_CLAIM})\n",
     "            p_delivered_at, v_edited_at, now())\n"),
    (_INSERTED, _INSERTED + _OUTBOX_ROW),
)

_ARGS_34 = ("bigint, bigint, text, text, text, boolean, boolean, text, text, text, text, text, text, text, text, "
            "text, bigint, integer, text, text, text, boolean, double precision, double precision, text, text, "
            "text, text, text, boolean, text, text, timestamptz, timestamptz")


def _previous_35() -> str:
    """0006's 35-parameter ``whatrack_save_message`` (it claims in ``message.publish_claimed_until``)."""
    return str(runpy.run_path(str(_HERE / "0006_message_write_claims_for_its_publisher.py"))["save_message_function"]())


def _previous_34() -> str:
    """0004's 34-parameter ``whatrack_save_message``."""
    return str(runpy.run_path(str(_HERE / "0004_partial_edit_and_track_indexes.py"))["SAVE_MESSAGE"])


def save_message_function() -> str:
    """0006's ``whatrack_save_message`` writing the new message's outbox row instead of a claim on the message."""
    text = _previous_35()
    for old, new in _CHANGES:
        if text.count(old) != 1:
            raise RuntimeError(f"migration 0007: 0006's function text changed; cannot find {old.strip()!r} once")
        text = text.replace(old, new)
    return text


def save_message_34() -> str:
    """0004's overload, kept for processes older than 0006: the 35-parameter function with no claim."""
    head = _previous_34().split("LANGUAGE plpgsql", 1)[0]
    return (f"{head}LANGUAGE sql AS $fn$\n"
            f"SELECT * FROM whatrack_save_message({', '.join(f'${i}' for i in range(1, 35))}, 0::double precision)\n"
            "$fn$\n")


def upgrade() -> None:
    op.create_table(
        "message_outbox",
        sa.Column("message_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"], name=op.f("fk_message_outbox_message_id_message"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_message_outbox")),
    )
    op.execute("INSERT INTO message_outbox (message_id, claimed_until) "
               "SELECT id, publish_claimed_until FROM message WHERE published_at IS NULL")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(save_message_function())
        op.execute(save_message_34())
        op.execute("ALTER TABLE message SET (fillfactor = 50)")
    op.drop_index("ix_message_unpublished", table_name="message")
    with op.batch_alter_table("message") as batch:
        batch.drop_constraint("uq_message_job_id", type_="unique")
    op.create_index("uq_message_job_id", "message", ["job_id"], unique=True, postgresql_where=_HAS_JOB,
                    sqlite_where=_HAS_JOB)


def downgrade() -> None:
    op.drop_index("uq_message_job_id", table_name="message")
    with op.batch_alter_table("message") as batch:
        batch.create_unique_constraint("uq_message_job_id", ["job_id"])
    where = sa.text("published_at IS NULL")
    op.create_index("ix_message_unpublished", "message", ["id"], unique=False, postgresql_where=where,
                    sqlite_where=where)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE message SET (fillfactor = 90)")
        op.execute(_previous_34())
        op.execute(_previous_35())
        op.execute("UPDATE message m SET publish_claimed_until = o.claimed_until FROM message_outbox o "
                   "WHERE o.message_id = m.id AND m.published_at IS NULL")
    op.drop_table("message_outbox")
