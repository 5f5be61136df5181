"""The steps of the store's transactions: upserts of lead, conversation and ticket, message lookups, edits.

Each takes the open ``AsyncConnection`` of the caller's transaction (``Store`` runs them inside
``Database.transaction``); none commits. Inserts are ``INSERT ... ON CONFLICT DO NOTHING`` followed by a read, so a
concurrent transaction that inserted the same row first is found, not duplicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    delete,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from whatrack.store.models import Conversation, Instance, Lead, Message, MessageOutbox, Ticket, UTCDateTime, utcnow

if TYPE_CHECKING:
    from whatrack.store.refs import InstanceRef

#: The columns a StoredMessage is built from.
STORED_COLUMNS = (Message.id, Message.conversation_id, Message.lead_id, Message.ticket_id, Message.organization_id,
                  Message.external_id, Message.provider_id, Message.published_at, Message.content,
                  Message.sender_type, Message.sent_at, Message.type, Message.direction, Message.job_id)


def insert_ignore(conn: AsyncConnection, model: type[Any], values: dict[str, Any]) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` (any unique constraint) in this database's dialect."""
    ins = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    return ins(model).values(**values).on_conflict_do_nothing()


# The statements of the hot path (every webhook) are built once, with bind parameters: building and cache-keying
# a SQLAlchemy statement per call cost about a third of the store's CPU per message.
_INSERT_MESSAGE = {
    "postgresql": pg_insert(Message).on_conflict_do_nothing().returning(*STORED_COLUMNS),
    "sqlite": sqlite_insert(Message).on_conflict_do_nothing().returning(*STORED_COLUMNS),
}


async def insert_message(conn: AsyncConnection, values: dict[str, Any]) -> dict[str, Any] | None:
    """Insert a message and its realtime outbox row; its STORED_COLUMNS, or None when a row with one of its unique keys
    exists already (nothing is written then)."""
    r = (await conn.execute(_INSERT_MESSAGE[conn.dialect.name], values)).first()
    if r is None:
        return None
    await conn.execute(insert(MessageOutbox).values(message_id=r.id))
    return dict(r._mapping)


async def mark_published(conn: AsyncConnection, message_id: int) -> None:
    """Take the message out of the realtime outbox and set its ``published_at`` (the first time only)."""
    await conn.execute(delete(MessageOutbox).where(MessageOutbox.message_id == message_id))
    await conn.execute(update(Message).where(Message.id == message_id, Message.published_at.is_(None))
                       .values(published_at=utcnow()))


@dataclass(frozen=True)
class Context:
    """What a new message of a chat needs to know, read in one round trip (ids are None when not there yet)."""

    lead_id: int | None
    lead_name: str | None
    conversation_id: int | None
    ticket_id: int | None
    edit_content: str | None  # the latest edit of this message that arrived before it
    edited_at: datetime | None


def _lead_match(jid: Any, phone: Any) -> ColumnElement[bool]:
    # The exact chat; else the same phone under another JID (a LID) is the same person.
    return or_(Lead.remote_jid == jid, Lead.phone == phone) if phone is not None else Lead.remote_jid == jid


def _context_query(with_phone: bool) -> Select[*tuple[Any, ...]]:
    org: BindParameter[Any] = bindparam("org")
    inst: BindParameter[Any] = bindparam("inst")
    jid: BindParameter[Any] = bindparam("jid")
    ext: BindParameter[Any] = bindparam("ext")
    edit = (select(Message.content, Message.sent_at)
            .where(Message.instance_id == inst, Message.edit_of == ext)
            .order_by(Message.sent_at.desc()).limit(1))
    one = select(literal(1).label("one")).subquery()  # a one-row base, so the edit is read even without a lead
    return (select(Lead.id, Lead.name, Conversation.id, Ticket.id,
                   edit.with_only_columns(Message.content).scalar_subquery(),
                   edit.with_only_columns(Message.sent_at).scalar_subquery())
            .select_from(one)
            .outerjoin(Lead, and_(Lead.organization_id == org,
                                  _lead_match(jid, bindparam("phone") if with_phone else None)))
            .outerjoin(Conversation, and_(Conversation.lead_id == Lead.id, Conversation.instance_id == inst))
            .outerjoin(Ticket, and_(Ticket.conversation_id == Conversation.id, Ticket.status == "open"))
            .order_by(case((Lead.remote_jid == jid, 0), else_=1)).limit(1))


_CONTEXT = {True: _context_query(True), False: _context_query(False)}


async def message_context(conn: AsyncConnection, org: int, instance_id: int, jid: str, phone: str | None,
                          external_id: str) -> Context:
    """The chat's lead, its conversation on this instance, the open ticket, and an edit that came first."""
    params: dict[str, Any] = {"org": org, "inst": instance_id, "jid": jid, "ext": external_id}
    if phone:
        params["phone"] = phone
    r = (await conn.execute(_CONTEXT[bool(phone)], params)).one()
    return Context(*r)


def message_query(inst: InstanceRef, provider_id: str, external_id: str,
                  job_id: str | None = None) -> Select[*tuple[Any, ...]]:
    cond = or_(and_(Message.organization_id == inst.organization_id, Message.provider_id == provider_id),
               and_(Message.instance_id == inst.id, Message.external_id == external_id))
    if job_id is not None:
        cond = or_(cond, Message.job_id == job_id)
    # The job's row first, then the exact provider id: a retry finds what it wrote itself.
    return select(*STORED_COLUMNS).where(cond).order_by(
        case((Message.job_id == job_id, 0), else_=1) if job_id else literal(0),
        case((Message.provider_id == provider_id, 0), else_=1)).limit(1)


_FIND_MESSAGE = (
    select(*STORED_COLUMNS)
    .where(or_(and_(Message.organization_id == bindparam("org"), Message.provider_id == bindparam("pid")),
               and_(Message.instance_id == bindparam("inst"), Message.external_id == bindparam("ext"))))
    .order_by(case((Message.provider_id == bindparam("pid"), 0), else_=1)).limit(1))


async def find_message(conn: AsyncConnection, inst: InstanceRef, provider_id: str, external_id: str,
                       job_id: str | None = None) -> dict[str, Any] | None:
    """The message with this provider id, or this external id in the instance (or, given, this job id)."""
    if job_id is None:
        q: Any = _FIND_MESSAGE
        params = {"org": inst.organization_id, "pid": provider_id, "inst": inst.id, "ext": external_id}
        r = (await conn.execute(q, params)).first()
    else:
        r = (await conn.execute(message_query(inst, provider_id, external_id, job_id))).first()
    return dict(r._mapping) if r else None


async def must_find(conn: AsyncConnection, inst: InstanceRef, provider_id: str,
                    external_id: str) -> dict[str, Any]:
    return dict((await conn.execute(message_query(inst, provider_id, external_id))).one()._mapping)


async def default_provider_id(conn: AsyncConnection, inst: InstanceRef, external_id: str) -> str:
    """UAZAPI's ``owner:messageid`` when the owner is known (what the fromMe echo will carry)."""
    owner = (await conn.execute(select(Instance.owner).where(Instance.id == inst.id))).scalar()
    return f"{owner}:{external_id}" if owner else external_id


async def upsert_lead(conn: AsyncConnection, org: int, jid: str, phone: str | None, name: str | None,
                      is_group: bool) -> int:
    q = (select(Lead.id, Lead.name).where(Lead.organization_id == org, _lead_match(jid, phone))
         .order_by(case((Lead.remote_jid == jid, 0), else_=1)).limit(1))
    r = (await conn.execute(q)).first()
    if r is None:
        await conn.execute(insert_ignore(conn, Lead, {
            "organization_id": org, "remote_jid": jid, "phone": phone, "name": name, "is_group": is_group,
            "created_at": utcnow()}))
        r = (await conn.execute(q)).one()
    elif name and not r.name:
        await conn.execute(update(Lead).where(Lead.id == r.id).values(name=name))
    return int(r.id)


async def upsert_conversation(conn: AsyncConnection, org: int, lead_id: int, instance_id: int) -> int:
    q = select(Conversation.id).where(Conversation.lead_id == lead_id, Conversation.instance_id == instance_id)
    found = (await conn.execute(q)).scalar()
    if found is None:
        await conn.execute(insert_ignore(conn, Conversation, {
            "organization_id": org, "lead_id": lead_id, "instance_id": instance_id, "status": "open",
            "unread_count": 0, "created_at": utcnow()}))
        found = (await conn.execute(q)).scalar_one()
    return int(found)


async def open_ticket(conn: AsyncConnection, org: int, conversation_id: int) -> int:
    """The original resolveTicket: the conversation's open ticket, or a new one."""
    q = select(Ticket.id).where(Ticket.conversation_id == conversation_id, Ticket.status == "open")
    found = (await conn.execute(q)).scalar()
    if found is None:
        await conn.execute(insert_ignore(conn, Ticket, {
            "organization_id": org, "conversation_id": conversation_id, "status": "open", "opened_at": utcnow()}))
        found = (await conn.execute(q)).scalar_one()
    return int(found)


async def apply_edit(conn: AsyncConnection, instance_id: int, target: str, text: str | None,
                     at: datetime) -> None:
    # Only a newer edit wins: edits can arrive out of order.
    await conn.execute(update(Message).where(
        Message.instance_id == instance_id, Message.external_id == target,
        or_(Message.edited_at.is_(None), Message.edited_at < at)).values(content=text, edited_at=at))


def _touch(inbound: bool) -> Any:
    at = bindparam("at", type_=UTCDateTime())
    values: dict[str, Any] = {"last_message_at": case(
        (or_(Conversation.last_message_at.is_(None), Conversation.last_message_at < at), at),
        else_=Conversation.last_message_at)}
    if inbound:
        values["unread_count"] = Conversation.unread_count + 1
    return update(Conversation).where(Conversation.id == bindparam("cid")).values(**values)


_TOUCH = {True: _touch(True), False: _touch(False)}


async def touch_conversation(conn: AsyncConnection, conversation_id: int, at: datetime, *,
                             inbound: bool) -> None:
    """A new message: last_message_at moves forward (never back), and an inbound one counts as unread."""
    await conn.execute(_TOUCH[inbound], {"cid": conversation_id, "at": at})
