"""The idempotent writes of whatrack: webhook messages, receipts, instance status, follow-up messages.

One :class:`Store` per process, built with :meth:`Store.from_url`. Every public call is one database transaction
(``store_engine.Database.transaction``; on PostgreSQL the webhook's writes are one asyncpg statement each,
``store.write.Writer``): it either commits whole or leaves nothing, and any database failure comes out
as :class:`~whatrack.errors.StoreError` so that the caller answers 5xx and QStash delivers again. Idempotency lives in
unique constraints (``(organization, provider_id)``, ``(instance, external_id)``, ``job_id``) written with
``INSERT ... ON CONFLICT DO NOTHING``: a redelivery, a retry or a race finds the row that is already there.
"""

from __future__ import annotations

import hmac
import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from whatrack.errors import ConfigError, PayloadError, StoreError
from whatrack.events import InstanceEvent, MessageEvent, ReceiptEvent
from whatrack.store import rows as rows
from whatrack.store import steps as steps
from whatrack.store import upgrade as store_upgrade
from whatrack.store.engine import Database
from whatrack.store.models import (
    TABLES,
    Conversation,
    Instance,
    Lead,
    Message,
    Organization,
    Ticket,
    UTCDateTime,
    utcnow,
)
from whatrack.store.refs import InstanceRef as InstanceRef  # re-exported: callers import the refs from here
from whatrack.store.refs import LeadRef as LeadRef
from whatrack.store.refs import StoredMessage as StoredMessage
from whatrack.store.write import OUTBOX_CHANNEL, Writer

log = logging.getLogger("whatrack.store.api")


def _stored(row: dict[str, Any], *, created: bool) -> StoredMessage:
    return StoredMessage(
        message_id=row["id"], conversation_id=row["conversation_id"], lead_id=row["lead_id"],
        ticket_id=row["ticket_id"], organization_id=row["organization_id"], external_id=row["external_id"],
        provider_id=row["provider_id"], created=created, published=row["published_at"] is not None,
        channel=rows.channel(row["conversation_id"]), row=row,
    )


class Store:
    """whatrack's database. See the module docstring; every method raises StoreError on a database failure."""

    def __init__(self, db: Database, writer: Writer | None = None) -> None:
        self._db = db
        self._writer = writer

    @classmethod
    def from_url(cls, url: str, *, pool_size: int = 10, statement_timeout_ms: int | None = None) -> Store:
        """A store on ``url`` (``postgresql://...`` or ``sqlite:///path``; the async drivers are chosen here).

        Raises:
            ConfigError: the URL is not a PostgreSQL or SQLite URL.
        """
        db = Database(url, pool_size=pool_size, statement_timeout_ms=statement_timeout_ms)
        writer = (Writer(url, safe_url=db.safe_url, pool_size=pool_size, statement_timeout_ms=statement_timeout_ms)
                  if db.dialect == "postgresql" else None)
        return cls(db, writer)

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self._db.dialect

    @property
    def writer(self) -> Writer | None:
        """The asyncpg hot path (PostgreSQL only; None on SQLite): the webhook's writes and the realtime outbox."""
        return self._writer

    @property
    def engine(self) -> AsyncEngine:
        """The underlying engine, for read-only inspection (tests, evidence); write through the methods."""
        return self._db.engine

    @property
    def url(self) -> str:
        """The database URL with its password masked (safe to log and show)."""
        return self._db.safe_url

    def __repr__(self) -> str:
        return f"Store({self._db.safe_url!r})"

    async def aclose(self) -> None:
        if self._writer is not None:
            await self._writer.aclose()
        await self._db.dispose()

    async def upgrade(self) -> None:
        """Run the Alembic migrations to head (safe to call from several processes at once)."""
        await self._db.transaction("upgrade", store_upgrade.upgrade)

    async def revision(self) -> str | None:
        """The database's Alembic revision (None before the first upgrade)."""
        return await self._db.transaction("revision", store_upgrade.revision)

    # -- instances ----------------------------------------------------------------------------------------------

    async def register_instance(self, organization: str, instance_name: str, token: str,
                                owner: str | None = None) -> InstanceRef:
        """Create or update an instance (and its organization); only the token's SHA-256 is stored.

        Raises:
            ConfigError: empty values, the name belongs to another organization, or the token to another instance.
        """
        for what, value in (("organization", organization), ("instance_name", instance_name), ("token", token)):
            if not value or not value.strip():
                raise ConfigError(what, "must not be empty")
        rows.check_length("organization", organization)
        rows.check_length("instance_name", instance_name)
        rows.check_length("owner", owner)
        digest = rows.token_hash(token)

        async def tx(conn: AsyncConnection) -> InstanceRef:
            await conn.execute(steps.insert_ignore(conn, Organization, {"name": organization, "created_at": utcnow()}))
            org_id = (await conn.execute(select(Organization.id).where(Organization.name == organization))).scalar_one()
            other = (await conn.execute(select(Instance.name).where(Instance.token_hash == digest))).scalar()
            if other is not None and other != instance_name:
                raise ConfigError("token", f"this token already belongs to instance {other!r}; each UAZAPI "
                                           "instance has its own token")
            now = utcnow()
            await conn.execute(steps.insert_ignore(conn, Instance, {
                "organization_id": org_id, "name": instance_name, "token_hash": digest, "owner": owner,
                "status": "unknown", "created_at": now, "updated_at": now}))
            found = (await conn.execute(select(Instance.id, Instance.organization_id)
                                        .where(Instance.name == instance_name))).one()
            if found.organization_id != org_id:
                raise ConfigError("organization", f"instance {instance_name!r} already belongs to another "
                                                  "organization; pick another instance name")
            values: dict[str, Any] = {"token_hash": digest, "updated_at": now}
            if owner:
                values["owner"] = owner
            await conn.execute(update(Instance).where(Instance.id == found.id).values(**values))
            return InstanceRef(id=found.id, organization_id=org_id, name=instance_name)

        ref = await self._db.transaction("register_instance", tx)
        log.info("instance %s registered (organization %s, id %d)", instance_name, organization, ref.id)
        return ref

    async def find_instance(self, instance_name: str | None, token: str | None) -> InstanceRef | None:
        """The instance whose token is ``token`` (and whose name is ``instance_name`` when given), else None."""
        if not token:
            return None
        if rows._UNSTORABLE.search(token) or (instance_name and rows._UNSTORABLE.search(instance_name)):
            return None  # no stored instance can hold a NUL or a lone surrogate: unknown, not a database error
        digest = rows.token_hash(token)
        if self._writer is not None:
            found = await self._writer.find_instance(instance_name, digest)
            if found is None or not hmac.compare_digest(found["token_hash"], digest):
                return None
            return InstanceRef(id=found["id"], organization_id=found["organization_id"], name=found["name"])
        q = select(Instance.id, Instance.organization_id, Instance.name, Instance.token_hash)
        q = q.where(Instance.name == instance_name) if instance_name else q.where(Instance.token_hash == digest)

        async def tx(conn: AsyncConnection) -> InstanceRef | None:
            r = (await conn.execute(q)).first()
            if r is None or not hmac.compare_digest(r.token_hash, digest):
                return None
            return InstanceRef(id=r.id, organization_id=r.organization_id, name=r.name)

        return await self._db.transaction("find_instance", tx)

    async def get_instance(self, instance_id: int) -> InstanceRef | None:
        """The instance with this id (the follow-up worker's jobs carry ids), else None."""
        q = select(Instance.id, Instance.organization_id, Instance.name).where(Instance.id == instance_id)

        async def tx(conn: AsyncConnection) -> InstanceRef | None:
            r = (await conn.execute(q)).first()
            return InstanceRef(id=r.id, organization_id=r.organization_id, name=r.name) if r else None

        return await self._db.transaction("get_instance", tx)

    async def list_instances(self) -> list[dict[str, Any]]:
        """Every instance with its organization, owner and status (never a token or its hash)."""
        q = (select(Instance.id, Organization.name.label("organization"), Instance.name, Instance.owner,
                    Instance.status, Instance.status_at)
             .join(Organization, Organization.id == Instance.organization_id).order_by(Instance.id))

        async def tx(conn: AsyncConnection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in await conn.execute(q)]

        return await self._db.transaction("list_instances", tx)

    async def update_instance_status(self, inst: InstanceRef, ev: InstanceEvent) -> None:
        """Record a ``connection`` event: status, reason, when, and the owner number once it is known."""
        rows.check_length("status", ev.status)
        rows.check_id("status", ev.status)
        now = utcnow()
        values: dict[str, Any] = {"status": ev.status, "status_reason": rows.clean_text(ev.reason),
                                  "status_at": now, "updated_at": now}
        if ev.source.owner:
            rows.check_length("owner", ev.source.owner)
            values["owner"] = ev.source.owner
        if self._writer is not None:
            await self._writer.update_instance_status(inst.id, ev.status, values["status_reason"], now,
                                                      values.get("owner"))
            return

        async def tx(conn: AsyncConnection) -> None:
            await conn.execute(update(Instance).where(Instance.id == inst.id).values(**values))

        await self._db.transaction("update_instance_status", tx)

    # -- messages -----------------------------------------------------------------------------------------------

    async def save_message(self, inst: InstanceRef, ev: MessageEvent) -> StoredMessage:
        """Store a webhook message with its lead, conversation and open ticket, exactly once.

        Raises:
            PayloadError: the event can never be stored (see ``store_rows.check_message_event``).
            StoreError: the database failed; nothing was written.
        """
        rows.check_message_event(ev)
        t0 = time.perf_counter()
        if self._writer is not None:
            values = rows.message_values(ev) | {"delivered_at": utcnow() if ev.direction == "inbound" else None}
            row = await self._writer.save_message(
                inst.organization_id, inst.id, (ev.lead_jid, ev.lead_phone, rows.lead_name(ev), ev.is_group),
                not rows.is_edit_or_reaction(ev), values)
            return _stored(row, created=row["created"])

        async def tx(conn: AsyncConnection) -> StoredMessage:
            existing = await steps.find_message(conn, inst, ev.provider_id, ev.external_id)
            if existing is not None:
                return _stored(existing, created=False)
            org, name = inst.organization_id, rows.lead_name(ev)
            ctx = await steps.message_context(conn, org, inst.id, ev.lead_jid, ev.lead_phone, ev.external_id)
            if ctx.lead_id is None:
                lead_id = await steps.upsert_lead(conn, org, ev.lead_jid, ev.lead_phone, name, ev.is_group)
            else:
                lead_id = ctx.lead_id
                if name and not ctx.lead_name:
                    await conn.execute(update(Lead).where(Lead.id == lead_id).values(name=name))
            conv_id = ctx.conversation_id or await steps.upsert_conversation(conn, org, lead_id, inst.id)
            ticket_id = ctx.ticket_id or await steps.open_ticket(conn, org, conv_id)
            values = rows.message_values(ev) | {
                "organization_id": org, "instance_id": inst.id, "lead_id": lead_id, "conversation_id": conv_id,
                "ticket_id": ticket_id, "created_at": utcnow(),
                "delivered_at": utcnow() if ev.direction == "inbound" else None}
            if ctx.edited_at is not None and not rows.is_edit_or_reaction(ev):
                # its edit came first: store the message as edited
                values |= {"content": ctx.edit_content, "edited_at": ctx.edited_at}
            row = await steps.insert_message(conn, values)
            if row is None:  # a concurrent delivery of the same message won
                return _stored(await steps.must_find(conn, inst, ev.provider_id, ev.external_id), created=False)
            if ev.edit_of:
                await steps.apply_edit(conn, inst.id, ev.edit_of, rows.clean_text(ev.text), ev.sent_at)
            if not rows.is_edit_or_reaction(ev):
                await steps.touch_conversation(conn, conv_id, ev.sent_at, inbound=ev.direction == "inbound")
            return _stored(row, created=True)

        stored = await self._db.transaction("save_message", tx)
        log.debug("message %s %s in %.1f ms", ev.external_id, "stored" if stored.created else "already stored",
                  (time.perf_counter() - t0) * 1000)
        return stored

    async def save_outbound(self, inst: InstanceRef, *, lead_id: int, text: str, job_id: str, external_id: str,
                            provider_id: str | None, sent_at: datetime) -> StoredMessage:
        """Store a message the follow-up worker sent, exactly once per job and per WhatsApp message.

        When the echoed ``fromMe`` webhook stored the same message first, that row is returned (``created=False``)
        and linked to the job.

        Raises:
            PayloadError: bad arguments, or ``lead_id`` is not a lead of the instance's organization.
            StoreError: the database failed; nothing was written.
        """
        if not job_id or not external_id:
            raise PayloadError("no_message_id", "save_outbound needs a job_id and the sent message's external_id")
        rows.check_aware("sent_at", sent_at)
        for f, v in (("job_id", job_id), ("external_id", external_id), ("provider_id", provider_id)):
            rows.check_length(f, v)
            rows.check_id(f, v)

        async def tx(conn: AsyncConnection) -> StoredMessage:
            pid = provider_id or await steps.default_provider_id(conn, inst, external_id)
            existing = await steps.find_message(conn, inst, pid, external_id, job_id=job_id)
            if existing is not None:
                if existing["job_id"] is None:
                    await conn.execute(update(Message).where(Message.id == existing["id"]).values(job_id=job_id))
                return _stored(existing, created=False)
            lead = (await conn.execute(select(Lead.id).where(Lead.id == lead_id,
                                                             Lead.organization_id == inst.organization_id))).scalar()
            if lead is None:
                raise PayloadError("unknown_lead", f"lead {lead_id} is not a lead of organization "
                                                   f"{inst.organization_id}; the job can never be stored")
            conv_id = await steps.upsert_conversation(conn, inst.organization_id, lead_id, inst.id)
            ticket_id = await steps.open_ticket(conn, inst.organization_id, conv_id)
            row = await steps.insert_message(conn, {
                "organization_id": inst.organization_id, "instance_id": inst.id, "lead_id": lead_id,
                "conversation_id": conv_id, "ticket_id": ticket_id, "provider_id": pid, "external_id": external_id,
                "direction": "outbound", "sender_type": "USER", "type": "text", "raw_type": None,
                "content": rows.clean_text(text),
                "sent_by_api": True, "status": "sent", "sent_at": sent_at, "job_id": job_id, "track_id": job_id,
                "created_at": utcnow()})
            if row is None:
                found = await steps.find_message(conn, inst, pid, external_id, job_id=job_id)
                if found is None:  # not expected: the conflicting row committed before ON CONFLICT gave way
                    raise StoreError(f"message {external_id} conflicted with a row not visible yet; retry")
                return _stored(found, created=False)
            await steps.touch_conversation(conn, conv_id, sent_at, inbound=False)
            if conn.dialect.name == "postgresql":  # the endpoints' outbox publishers: a row of another process's
                await conn.execute(select(func.pg_notify(OUTBOX_CHANNEL, "")))
            return _stored(row, created=True)

        return await self._db.transaction("save_outbound", tx)

    async def find_outbound_by_track(self, inst: InstanceRef, track_id: str) -> StoredMessage | None:
        """The outbound message of ``inst`` sent with ``track_id`` (UAZAPI's echo of an API send), if stored.

        The follow-up worker asks this before sending again a job whose earlier attempt was cut short.

        Raises:
            StoreError: the database failed.
        """
        q = (select(*steps.STORED_COLUMNS)
             .where(Message.instance_id == inst.id, Message.track_id == track_id, Message.direction == "outbound")
             .order_by(Message.id).limit(1))

        async def tx(conn: AsyncConnection) -> StoredMessage | None:
            r = (await conn.execute(q)).first()
            return _stored(dict(r._mapping), created=False) if r else None

        return await self._db.transaction("find_outbound_by_track", tx)

    async def mark_published(self, message_id: int) -> None:
        """Record that the message was published to Centrifugo (the first time only)."""
        async def tx(conn: AsyncConnection) -> None:
            await steps.mark_published(conn, message_id)

        await self._db.transaction("mark_published", tx)

    async def apply_receipt(self, inst: InstanceRef, ev: ReceiptEvent) -> int:
        """Apply a ``messages_update`` to the instance's messages; return how many rows changed.

        Statuses only advance (``events.STATUS_ORDER``); ``deleted`` sets ``deleted_at``; ``failed`` only applies to
        messages not yet delivered.

        Raises:
            PayloadError: an unknown status.
        """
        sources = rows.receipt_sources(ev.status)
        ids = [i for i in dict.fromkeys(ev.external_ids) if i]
        if not ids:
            return 0
        at_value = ev.at or utcnow()
        rows.check_aware("at", at_value)
        at = literal(at_value, UTCDateTime())
        values: dict[str, Any] = {"status": ev.status}
        set_delivered, set_read = rows.receipt_timestamps(ev.status)
        if set_delivered:
            values["delivered_at"] = func.coalesce(Message.delivered_at, at)
        if set_read:
            values["read_at"] = func.coalesce(Message.read_at, at)
        if ev.status == "deleted":
            values["deleted_at"] = func.coalesce(Message.deleted_at, at)
        if self._writer is not None:
            return await self._writer.apply_receipt(inst.id, ids, ev.status, at_value, (set_delivered, set_read),
                                                    sources)

        async def tx(conn: AsyncConnection) -> int:
            changed = 0
            for i in range(0, len(ids), 500):  # bounded IN lists
                r = await conn.execute(update(Message).where(
                    Message.instance_id == inst.id, Message.external_id.in_(ids[i:i + 500]),
                    Message.status.in_(sources)).values(**values))
                changed += r.rowcount
            return changed

        return await self._db.transaction("apply_receipt", tx)

    # -- reads --------------------------------------------------------------------------------------------------

    async def find_lead(self, organization_id: int, lead_id: int) -> LeadRef | None:
        async def tx(conn: AsyncConnection) -> LeadRef | None:
            r = (await conn.execute(select(Lead.id, Lead.phone, Lead.remote_jid, Lead.organization_id).where(
                Lead.id == lead_id, Lead.organization_id == organization_id))).first()
            return LeadRef(r.id, r.phone, r.remote_jid, r.organization_id) if r else None

        return await self._db.transaction("find_lead", tx)

    async def list_leads(self, organization_id: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Leads with the ids a follow-up needs: one row per lead and instance it talked through (``instance_id``
        None for a lead with no conversation yet), newest leads first, at most ``limit`` rows."""
        q = (select(Lead.organization_id, Organization.name.label("organization"),
                    Conversation.instance_id, Instance.name.label("instance"), Lead.id.label("lead_id"), Lead.phone,
                    Lead.name, Lead.is_group)
             .join(Organization, Organization.id == Lead.organization_id)
             .outerjoin(Conversation, Conversation.lead_id == Lead.id)
             .outerjoin(Instance, Instance.id == Conversation.instance_id)
             .order_by(Lead.id.desc(), Conversation.instance_id).limit(limit))
        if organization_id is not None:
            q = q.where(Lead.organization_id == organization_id)

        async def tx(conn: AsyncConnection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in await conn.execute(q)]

        return await self._db.transaction("list_leads", tx)

    async def lead_replied_since(self, lead_id: int, since: datetime) -> bool:
        """Whether the lead sent any message after ``since`` (the follow-up worker's cancel check)."""
        rows.check_aware("since", since)
        q = select(literal(1)).where(Message.lead_id == lead_id, Message.direction == "inbound",
                                     Message.sent_at > since).limit(1)

        async def tx(conn: AsyncConnection) -> bool:
            return (await conn.execute(q)).first() is not None

        return await self._db.transaction("lead_replied_since", tx)

    async def counts(self) -> dict[str, int]:
        """Rows per table, in dependency order."""
        async def tx(conn: AsyncConnection) -> dict[str, int]:
            out: dict[str, int] = {}
            for model in (Organization, Instance, Lead, Conversation, Ticket, Message):
                out[model.__tablename__] = (await conn.execute(select(func.count()).select_from(model))).scalar_one()
            return out

        result = await self._db.transaction("counts", tx)
        assert tuple(result) == TABLES
        return result

    async def message_rows(self, organization_id: int | None = None) -> list[dict[str, Any]]:
        """One dict per message for the loss ledger, oldest first."""
        q = select(Message.provider_id, Message.external_id, Message.id.label("message_id"),
                   Message.conversation_id, Message.created_at, Message.published_at, Message.sent_at,
                   Message.direction).order_by(Message.id)
        if organization_id is not None:
            q = q.where(Message.organization_id == organization_id)

        async def tx(conn: AsyncConnection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in await conn.execute(q)]

        return await self._db.transaction("message_rows", tx)
