"""the message write's lookups on one unique key each; partial edit_of and track_id indexes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

``ix_message_instance_id_edit_of`` and ``ix_message_instance_id_track_id`` indexed every message although only edits
have an ``edit_of`` and only the follow-up worker's sends a ``track_id``. Both lead with ``instance_id``, like the
unique key ``(instance_id, external_id)``: on a table without statistics yet (a new database, or a plan cached before
the first ANALYZE) the planner took the track_id index for ``instance_id = $1 AND external_id = $2`` and read every
message of the instance, for each webhook (measured: 0.17 ms per lookup at 3,600 rows, growing with the table; 0.01 ms
on the unique key). Partial (``... IS NOT NULL``) they are small, cost nothing on a plain message's insert, and can
serve only the lookups they are for (``edit_of = $x`` and ``track_id = $x`` imply ``IS NOT NULL``).

``whatrack_save_message`` (0003) found a message by ``(organization, provider id) OR (instance, external id)`` and a
lead by ``JID OR phone``. PL/pgSQL keeps a statement's generic plan for the connection's life; made while the table
is small, the plan for an OR is a sequential scan (cheaper than a BitmapOr then), kept as the table grows: every
webhook read the whole message table (0.17 ms at 3,600 rows). Here each lookup is an equality on one unique key,
which an index serves at any size; the order is kept (provider id first, JID first).

And the write no longer sends ``NOTIFY whatrack_outbox``: a transaction that notified takes a database-wide lock at
commit (PostgreSQL delivers notifications in commit order), so every webhook's commit waited for the one before it
(measured with fsync on, 16 connections: 1,950 writes/s with the NOTIFY, 3,200 without; the devstack runs with
fsync off, where the difference does not show: ``bench/notify.py``). The endpoint process that committed the row
wakes its own publisher in memory (``store.write.Writer.on_saved``); the follow-up worker's low-rate writes still
NOTIFY, and a dead process's rows come back by the publishers' sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The whole function again, as 0003 wrote it but for the split lookups (a migration keeps its own copy).
SAVE_MESSAGE = r"""CREATE OR REPLACE FUNCTION whatrack_save_message(
    p_org bigint, p_inst bigint, p_jid text, p_phone text, p_lead_name text, p_is_group boolean,
    p_new_message boolean, p_provider_id text, p_external_id text, p_direction text, p_sender_type text,
    p_type text, p_raw_type text, p_content text, p_participant_phone text, p_media_mime text,
    p_media_size bigint, p_media_duration integer, p_media_file_name text, p_media_sha256 text, p_media_url text,
    p_media_voice boolean, p_latitude double precision, p_longitude double precision, p_location_name text,
    p_location_address text, p_edit_of text, p_reaction_to text, p_reply_to text, p_sent_by_api boolean,
    p_track_id text, p_status text, p_sent_at timestamptz, p_delivered_at timestamptz)
RETURNS TABLE (id bigint, conversation_id bigint, lead_id bigint, ticket_id bigint, organization_id bigint,
               external_id text, provider_id text, published_at timestamptz, content text, sender_type text,
               sent_at timestamptz, type text, direction text, job_id text, created boolean)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    m message%ROWTYPE;
    v_created boolean := false;
    v_lead bigint;
    v_lead_name text;
    v_conv bigint;
    v_ticket bigint;
    v_edit_content text;
    v_edited_at timestamptz;
BEGIN
    SELECT * INTO m FROM message x WHERE x.organization_id = p_org AND x.provider_id = p_provider_id;
    IF NOT FOUND THEN
        SELECT * INTO m FROM message x WHERE x.instance_id = p_inst AND x.external_id = p_external_id;
    END IF;
    IF NOT FOUND THEN
        -- the lead: this chat, else the same phone under another JID (a LID) is the same person
        SELECT l.id, l.name INTO v_lead, v_lead_name FROM lead l
         WHERE l.organization_id = p_org AND l.remote_jid = p_jid;
        IF v_lead IS NULL AND p_phone IS NOT NULL THEN
            SELECT l.id, l.name INTO v_lead, v_lead_name FROM lead l
             WHERE l.organization_id = p_org AND l.phone = p_phone;
        END IF;
        IF v_lead IS NULL THEN
            INSERT INTO lead AS l (organization_id, remote_jid, phone, name, is_group, created_at)
            VALUES (p_org, p_jid, p_phone, p_lead_name, p_is_group, now())
            ON CONFLICT DO NOTHING RETURNING l.id, l.name INTO v_lead, v_lead_name;
            IF v_lead IS NULL THEN  -- a concurrent delivery created it: by JID, else by phone (the conflict)
                SELECT l.id, l.name INTO v_lead, v_lead_name FROM lead l
                 WHERE l.organization_id = p_org AND l.remote_jid = p_jid;
                IF v_lead IS NULL THEN
                    SELECT l.id, l.name INTO STRICT v_lead, v_lead_name FROM lead l
                     WHERE l.organization_id = p_org AND l.phone = p_phone;
                END IF;
            END IF;
        END IF;
        IF p_lead_name IS NOT NULL AND v_lead_name IS NULL THEN
            UPDATE lead l SET name = p_lead_name WHERE l.id = v_lead;
        END IF;

        SELECT c.id INTO v_conv FROM conversation c WHERE c.lead_id = v_lead AND c.instance_id = p_inst;
        IF v_conv IS NULL THEN
            INSERT INTO conversation AS c (organization_id, lead_id, instance_id, status, unread_count, created_at)
            VALUES (p_org, v_lead, p_inst, 'open', 0, now()) ON CONFLICT DO NOTHING RETURNING c.id INTO v_conv;
            IF v_conv IS NULL THEN
                SELECT c.id INTO STRICT v_conv FROM conversation c
                 WHERE c.lead_id = v_lead AND c.instance_id = p_inst;
            END IF;
        END IF;

        SELECT t.id INTO v_ticket FROM ticket t WHERE t.conversation_id = v_conv AND t.status = 'open';
        IF v_ticket IS NULL THEN
            INSERT INTO ticket AS t (organization_id, conversation_id, status, opened_at)
            VALUES (p_org, v_conv, 'open', now()) ON CONFLICT DO NOTHING RETURNING t.id INTO v_ticket;
            IF v_ticket IS NULL THEN
                SELECT t.id INTO STRICT v_ticket FROM ticket t
                 WHERE t.conversation_id = v_conv AND t.status = 'open';
            END IF;
        END IF;

        IF p_new_message THEN  -- its edit came first: store the message as edited
            SELECT e.content, e.sent_at INTO v_edit_content, v_edited_at FROM message e
             WHERE e.instance_id = p_inst AND e.edit_of = p_external_id ORDER BY e.sent_at DESC LIMIT 1;
        END IF;

        INSERT INTO message AS x (
            organization_id, instance_id, lead_id, conversation_id, ticket_id, provider_id, external_id, direction,
            sender_type, type, raw_type, content, participant_phone, media_mime, media_size, media_duration,
            media_file_name, media_sha256, media_url, media_voice, latitude, longitude, location_name,
            location_address, edit_of, reaction_to, reply_to, sent_by_api, track_id, status, sent_at, delivered_at,
            edited_at, created_at)
        VALUES (
            p_org, p_inst, v_lead, v_conv, v_ticket, p_provider_id, p_external_id, p_direction,
            p_sender_type, p_type, p_raw_type, CASE WHEN v_edited_at IS NULL THEN p_content ELSE v_edit_content END,
            p_participant_phone, p_media_mime, p_media_size, p_media_duration,
            p_media_file_name, p_media_sha256, p_media_url, p_media_voice, p_latitude, p_longitude, p_location_name,
            p_location_address, p_edit_of, p_reaction_to, p_reply_to, p_sent_by_api, p_track_id, p_status, p_sent_at,
            p_delivered_at, v_edited_at, now())
        ON CONFLICT DO NOTHING RETURNING x.* INTO m;
        IF FOUND THEN
            v_created := true;
            IF p_edit_of IS NOT NULL THEN  -- only a newer edit wins: edits can arrive out of order
                UPDATE message x SET content = p_content, edited_at = p_sent_at
                 WHERE x.instance_id = p_inst AND x.external_id = p_edit_of
                   AND (x.edited_at IS NULL OR x.edited_at < p_sent_at);
            END IF;
            IF p_new_message THEN  -- last_message_at only moves forward; an inbound message counts as unread
                UPDATE conversation c SET last_message_at = GREATEST(c.last_message_at, p_sent_at),
                       unread_count = c.unread_count + CASE WHEN p_direction = 'inbound' THEN 1 ELSE 0 END
                 WHERE c.id = v_conv;
            END IF;
        ELSE  -- a concurrent delivery of the same message won
            SELECT * INTO m FROM message x WHERE x.organization_id = p_org AND x.provider_id = p_provider_id;
            IF NOT FOUND THEN
                SELECT * INTO STRICT m FROM message x WHERE x.instance_id = p_inst AND x.external_id = p_external_id;
            END IF;
        END IF;
    END IF;
    id := m.id; conversation_id := m.conversation_id; lead_id := m.lead_id; ticket_id := m.ticket_id;
    organization_id := m.organization_id; external_id := m.external_id; provider_id := m.provider_id;
    published_at := m.published_at; content := m.content; sender_type := m.sender_type; sent_at := m.sent_at;
    type := m.type; direction := m.direction; job_id := m.job_id; created := v_created;
    RETURN NEXT;
END
$fn$
"""

_INDEXES = (("ix_message_instance_id_edit_of", "edit_of"), ("ix_message_instance_id_track_id", "track_id"))


def _previous_function() -> str:
    """0003's text of the function (for the downgrade)."""
    import runpy
    from pathlib import Path

    return str(runpy.run_path(str(Path(__file__).with_name("0003_message_write_function_and_outbox.py")))
               ["SAVE_MESSAGE"])


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(SAVE_MESSAGE)
    for name, column in _INDEXES:
        where = sa.text(f"{column} IS NOT NULL")
        op.drop_index(name, table_name="message")
        op.create_index(name, "message", ["instance_id", column], unique=False, postgresql_where=where,
                        sqlite_where=where)


def downgrade() -> None:
    for name, column in _INDEXES:
        op.drop_index(name, table_name="message")
        op.create_index(name, "message", ["instance_id", column], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_previous_function())
