"""Test helpers for the store tests: MessageEvent builders (mirroring the UAZAPI fixtures) and direct row reads."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, text

from whatrack.events import Location, Media, MessageEvent, ReceiptEvent, Source
from whatrack.store.api import Store
from whatrack.store.models import ALL_TABLES

OWNER = "5511999990000"
LEAD = "5511988887777"
LEAD_JID = f"{LEAD}@s.whatsapp.net"
TOKEN = "uazapi-test-token-0f9e8d7c6b5a"
T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
SOURCE = Source("inst-a", OWNER, TOKEN)


def message(external_id: str = "AC9D4D6F0000000000000000000E47F7", **over: Any) -> MessageEvent:
    """An inbound text from the lead (as ``messages_inbound_text.json`` normalizes); override any field."""
    ev = MessageEvent(
        source=SOURCE, external_id=external_id, provider_id=f"{OWNER}:{external_id}", direction="inbound",
        type="text", raw_type="Conversation", chat_jid=LEAD_JID, lead_jid=LEAD_JID, lead_phone=LEAD,
        lead_name="Maria Teste", is_group=False, group_name=None, participant_phone=None, text="Olá, tudo bem?",
        sent_at=T0,
    )
    return replace(ev, **over)


def outbound(external_id: str = "3EB0AAAA000000000001", **over: Any) -> MessageEvent:
    """An outbound (fromMe) text: the lead is still the chat."""
    fields: dict[str, Any] = {"direction": "outbound", "lead_name": None, "text": "Oi Maria!",
                              "sent_at": T0 + timedelta(minutes=1)}
    return message(external_id, **(fields | over))


def kinds() -> dict[str, MessageEvent]:
    """One event of each kind the fixtures cover."""
    return {
        "text": message(),
        "outbound": outbound(),
        "image": message("IMG1", type="image", raw_type="ImageMessage", text="a legenda",
                         media=Media(mime_type="image/jpeg", size_bytes=162894, sha256="ab" * 32, width=1080,
                                     height=1920)),
        "audio": message("PTT1", type="audio", raw_type="AudioMessage", text="",
                         media=Media(mime_type="audio/ogg; codecs=opus", size_bytes=12000, duration_seconds=7,
                                     voice=True)),
        "document": message("DOC1", type="document", raw_type="DocumentMessage", text=None,
                            media=Media(mime_type="application/pdf", size_bytes=5606601,
                                        file_name="Comprovante_Pagamento_Março.pdf",
                                        url="https://files.example.com/doc.pdf")),
        "location": message("LOC1", type="location", raw_type="LocationMessage", text=None,
                            location=Location(-23.5613, -46.6565, "Av. Paulista", "Av. Paulista, 1578")),
        "sticker": message("STK1", type="sticker", raw_type="StickerMessage", text=None,
                           media=Media(mime_type="image/webp")),
        "group": message("GRP1", chat_jid="120363000000000001@g.us", lead_jid="120363000000000001@g.us",
                         lead_phone=None, lead_name="Cliente", is_group=True, group_name="Grupo Teste",
                         participant_phone="5531966665555"),
    }


def receipt(status: str, *ids: str, at: datetime | None = None) -> ReceiptEvent:
    return ReceiptEvent(source=SOURCE, external_ids=ids, status=status, at=at)


async def one_row(store: Store, table: str, **where: Any) -> dict[str, Any]:
    """The single row of ``table`` matching ``where`` (column == value)."""
    rows = await all_rows(store, table, **where)
    assert len(rows) == 1, rows
    return rows[0]


async def all_rows(store: Store, table: str, **where: Any) -> list[dict[str, Any]]:
    from whatrack.store.models import Base

    t = Base.metadata.tables[table]
    q = select(t).where(*(t.c[k] == v for k, v in where.items())).order_by(t.c.id)
    async with store.engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(q)]


async def dump_text(store: Store) -> str:
    """Every value of every table (alembic_version included) as text: what a database dump would show."""
    parts: list[str] = []
    async with store.engine.connect() as conn:
        for table in (*ALL_TABLES, "alembic_version"):
            for r in await conn.execute(text(f"SELECT * FROM {table}")):  # noqa: S608 (fixed table names)
                parts.append(repr(tuple(r)))
    return "\n".join(parts)
