"""Store: idempotent, race-free, atomic writes on real PostgreSQL and SQLite (every store test runs on both)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from store_helpers import (
    LEAD,
    LEAD_JID,
    OWNER,
    T0,
    TOKEN,
    all_rows,
    dump_text,
    kinds,
    message,
    one_row,
    outbound,
    receipt,
)

from whatrack.devstack import servers
from whatrack.errors import ConfigError, PayloadError, StoreError
from whatrack.events import InstanceEvent, Media, Source
from whatrack.store.api import InstanceRef, Store
from whatrack.store.models import TABLES


async def _migrate(url: str) -> None:
    s = Store.from_url(url)
    await s.upgrade()
    await s.aclose()


@pytest.fixture(scope="session")
def pg_store_url(pg_admin_url: str) -> Iterator[str]:
    """One migrated PostgreSQL database of this module's own, emptied before each test (creating and migrating a
    database per test would cost about a second each)."""
    name = f"whatrack_store_{uuid.uuid4().hex[:12]}"
    url = servers.create_database(pg_admin_url, name)
    try:
        # Requested from inside the async ``store`` fixture, where a loop is running: migrate on a thread of its own.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(lambda: asyncio.run(_migrate(url))).result()
        yield url
    finally:
        servers.drop_database(pg_admin_url, name)


@pytest.fixture(params=["postgresql", pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated, empty store on PostgreSQL, then on SQLite (a fresh file)."""
    if request.param == "postgresql":
        s = Store.from_url(request.getfixturevalue("pg_store_url"))
        async with s.engine.begin() as conn:
            for table in reversed(TABLES):  # DELETE beats TRUNCATE on tables this small
                await conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 (fixed table names)
    else:
        s = Store.from_url(f"sqlite:///{tmp_path}/store.db")
        await s.upgrade()
    yield s
    await s.aclose()


@pytest.fixture
async def inst(store: Store) -> InstanceRef:
    return await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)


# -- saving each kind of message ------------------------------------------------------------------------------------


async def test_inbound_text_creates_every_row(store: Store, inst: InstanceRef) -> None:
    ev = message()
    saved = await store.save_message(inst, ev)

    assert saved.created and not saved.published
    assert await store.counts() == {"organization": 1, "instance": 1, "lead": 1, "conversation": 1, "ticket": 1,
                                    "message": 1}
    lead = await one_row(store, "lead")
    assert (lead["phone"], lead["remote_jid"], lead["name"], lead["is_group"]) == (LEAD, LEAD_JID,
                                                                                    "Maria Teste", False)
    conv = await one_row(store, "conversation")
    assert (conv["lead_id"], conv["instance_id"], conv["unread_count"]) == (lead["id"], inst.id, 1)
    assert conv["last_message_at"] == T0 and conv["last_message_at"].tzinfo is not None
    ticket = await one_row(store, "ticket")
    assert (ticket["conversation_id"], ticket["status"]) == (conv["id"], "open")
    m = await one_row(store, "message")
    assert m["provider_id"] == f"{OWNER}:{ev.external_id}" and m["external_id"] == ev.external_id
    assert (m["direction"], m["sender_type"], m["type"], m["raw_type"]) == ("inbound", "LEAD", "text", "Conversation")
    assert (m["content"], m["status"], m["sent_at"]) == ("Olá, tudo bem?", "delivered", T0)
    assert m["sent_at"].utcoffset() == timedelta(0)
    assert (m["lead_id"], m["conversation_id"], m["ticket_id"], m["instance_id"]) == (lead["id"], conv["id"],
                                                                                      ticket["id"], inst.id)
    assert (saved.message_id, saved.conversation_id, saved.lead_id, saved.ticket_id) == (m["id"], conv["id"],
                                                                                         lead["id"], ticket["id"])
    assert saved.channel == f"conversation:{conv['id']}"
    assert saved.realtime == {"id": m["id"], "content": "Olá, tudo bem?", "senderType": "LEAD",
                              "sentAt": "2026-01-01T10:00:00Z", "conversationId": conv["id"],
                              "externalId": ev.external_id, "type": "text", "direction": "inbound"}


async def test_outbound_is_user_and_the_lead_is_the_chat(store: Store, inst: InstanceRef) -> None:
    await store.save_message(inst, message())
    saved = await store.save_message(inst, outbound())

    assert saved.realtime["senderType"] == "USER" and saved.realtime["direction"] == "outbound"
    assert (await store.counts())["lead"] == 1  # the owner never becomes a lead
    m = await one_row(store, "message", id=saved.message_id)
    assert (m["sender_type"], m["status"], m["lead_id"]) == ("USER", "sent", saved.lead_id)
    conv = await one_row(store, "conversation")
    assert conv["unread_count"] == 1  # only the inbound one
    assert conv["last_message_at"] == T0 + timedelta(minutes=1)


async def test_each_kind_is_stored_with_its_fields(store: Store, inst: InstanceRef) -> None:
    for ev in kinds().values():
        assert (await store.save_message(inst, ev)).created
    by_ext = {r["external_id"]: r for r in await all_rows(store, "message")}

    img = by_ext["IMG1"]
    assert (img["type"], img["content"], img["media_mime"], img["media_size"]) == ("image", "a legenda",
                                                                                   "image/jpeg", 162894)
    assert img["media_sha256"] == "ab" * 32 and img["media_url"] is None
    ptt = by_ext["PTT1"]
    assert (ptt["type"], ptt["media_voice"], ptt["media_duration"], ptt["content"]) == ("audio", True, 7, "")
    doc = by_ext["DOC1"]
    assert (doc["media_file_name"], doc["media_size"]) == ("Comprovante_Pagamento_Março.pdf", 5606601)
    assert doc["media_url"] == "https://files.example.com/doc.pdf"
    loc = by_ext["LOC1"]
    assert (loc["latitude"], loc["longitude"], loc["location_name"], loc["location_address"]) == (
        -23.5613, -46.6565, "Av. Paulista", "Av. Paulista, 1578")
    assert by_ext["STK1"]["media_mime"] == "image/webp"
    grp = by_ext["GRP1"]
    assert grp["participant_phone"] == "5531966665555"
    group_lead = await one_row(store, "lead", id=grp["lead_id"])
    assert (group_lead["phone"], group_lead["is_group"], group_lead["name"]) == (None, True, "Grupo Teste")
    counts = await store.counts()
    assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (2, 2, 2, 8)


async def test_long_content_is_not_truncated(store: Store, inst: InstanceRef) -> None:
    body = "ç" * 70_000 + "fim"
    saved = await store.save_message(inst, message(text=body))
    assert (await one_row(store, "message", id=saved.message_id))["content"] == body


# -- idempotency and races ------------------------------------------------------------------------------------------


async def test_redelivery_returns_the_existing_row(store: Store, inst: InstanceRef) -> None:
    first = await store.save_message(inst, message())
    again = await store.save_message(inst, message(text="a changed body"))  # a resend need not be identical
    assert first.created and not again.created and not again.published
    assert again.message_id == first.message_id and again.realtime == first.realtime
    await store.mark_published(first.message_id)
    third = await store.save_message(inst, message())
    assert third.published and not third.created
    assert (await store.counts())["message"] == 1
    assert (await one_row(store, "conversation"))["unread_count"] == 1


async def test_twenty_concurrent_deliveries_make_one_row(store: Store, inst: InstanceRef) -> None:
    results = await asyncio.gather(*(store.save_message(inst, message()) for _ in range(20)))
    assert sum(r.created for r in results) == 1
    assert len({r.message_id for r in results}) == 1
    counts = await store.counts()
    assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (1, 1, 1, 1)
    assert (await one_row(store, "conversation"))["unread_count"] == 1


async def test_messages_of_a_new_lead_at_once_make_one_lead(store: Store, inst: InstanceRef) -> None:
    events = [message(f"NEWLEAD{i:02d}", sent_at=T0 + timedelta(seconds=i)) for i in range(10)]
    results = await asyncio.gather(*(store.save_message(inst, ev) for ev in events))
    assert all(r.created for r in results)
    assert len({r.lead_id for r in results}) == 1 and len({r.ticket_id for r in results}) == 1
    counts = await store.counts()
    assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (1, 1, 1, 10)
    conv = await one_row(store, "conversation")
    assert conv["unread_count"] == 10 and conv["last_message_at"] == T0 + timedelta(seconds=9)


async def test_two_pools_racing_on_a_new_lead_make_one_of_each(pg_store_url: str) -> None:
    """Two Stores on PostgreSQL (two asyncpg pools, like two endpoint processes): the same message 20x and ten
    messages of a new lead, all at once, make one lead, conversation, open ticket, and one row per message."""
    a, b = Store.from_url(pg_store_url), Store.from_url(pg_store_url)
    try:
        async with a.engine.begin() as conn:
            for table in reversed(TABLES):
                await conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 (fixed table names)
        inst = await a.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        new = [message(f"RACE{i:02d}", sent_at=T0 + timedelta(seconds=i)) for i in range(10)]
        results = await asyncio.gather(*(s.save_message(inst, message("RACE00")) for s in (a, b) * 10),
                                       *(s.save_message(inst, ev) for s, ev in zip((b, a) * 5, new, strict=True)))
        assert sum(r.created for r in results) == 10
        assert len({r.lead_id for r in results}) == 1 and len({r.ticket_id for r in results}) == 1
        counts = await a.counts()
        assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (1, 1, 1, 10)
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.sqlite
async def test_two_processes_on_one_sqlite_file_make_one_row(tmp_path: Path) -> None:
    """Two Stores (no shared lock, like two processes) on one file: BEGIN IMMEDIATE and the busy timeout queue them."""
    url = f"sqlite:///{tmp_path}/shared.db"
    a, b = Store.from_url(url), Store.from_url(url)
    try:
        await a.upgrade()
        inst = await a.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        results = await asyncio.gather(*(s.save_message(inst, message()) for s in (a, b) * 10),
                                       *(s.save_message(inst, message(f"N{i}")) for i, s in enumerate((b, a) * 3)))
        assert sum(r.created for r in results[:20]) == 1 and len({r.message_id for r in results[:20]}) == 1
        counts = await b.counts()
        assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (1, 1, 1, 7)
    finally:
        await a.aclose()
        await b.aclose()


async def test_same_phone_under_a_lid_is_the_same_lead(store: Store, inst: InstanceRef) -> None:
    a = await store.save_message(inst, message("P1"))
    b = await store.save_message(inst, message("P2", lead_jid="100000000000001@lid", chat_jid="100000000000001@lid"))
    assert a.lead_id == b.lead_id and (await store.counts())["lead"] == 1


# -- receipts, deletes, edits, reactions ----------------------------------------------------------------------------


async def test_receipts_only_advance(store: Store, inst: InstanceRef) -> None:
    out = await store.save_message(inst, outbound("OUT1"))
    t1, t2 = T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)

    assert await store.apply_receipt(inst, receipt("read", "OUT1", at=t2)) == 1
    row = await one_row(store, "message", id=out.message_id)
    assert (row["status"], row["read_at"], row["delivered_at"]) == ("read", t2, t2)  # read implies delivered
    assert await store.apply_receipt(inst, receipt("delivered", "OUT1", at=t1)) == 0  # late: no downgrade
    assert await store.apply_receipt(inst, receipt("sent", "OUT1")) == 0
    assert (await one_row(store, "message", id=out.message_id))["status"] == "read"
    assert await store.apply_receipt(inst, receipt("played", "OUT1")) == 1
    assert await store.apply_receipt(inst, receipt("failed", "OUT1")) == 0  # delivered messages never "fail"
    assert (await one_row(store, "message", id=out.message_id))["status"] == "played"


async def test_receipt_batch_within_the_instance_only(store: Store, inst: InstanceRef) -> None:
    other = await store.register_instance("acme", "inst-b", "another-token-123", owner="5511999991111")
    await store.save_message(inst, outbound("B1"))
    await store.save_message(inst, outbound("B2"))
    on_other = await store.save_message(other, outbound("B1", provider_id="5511999991111:B1"))
    assert await store.apply_receipt(inst, receipt("delivered", "B1", "B2", "UNKNOWN", "B1")) == 2
    assert (await one_row(store, "message", id=on_other.message_id))["status"] == "sent"
    assert await store.apply_receipt(inst, receipt("delivered")) == 0


async def test_failed_then_delete(store: Store, inst: InstanceRef) -> None:
    out = await store.save_message(inst, outbound("F1"))
    assert await store.apply_receipt(inst, receipt("failed", "F1")) == 1
    assert await store.apply_receipt(inst, receipt("deleted", "F1", at=T0)) == 1
    row = await one_row(store, "message", id=out.message_id)
    assert (row["status"], row["deleted_at"]) == ("deleted", T0)
    assert await store.apply_receipt(inst, receipt("read", "F1")) == 0  # a deleted message stays deleted
    assert await store.apply_receipt(inst, receipt("deleted", "F1")) == 0
    with pytest.raises(PayloadError, match="bad_status"):
        await store.apply_receipt(inst, receipt("seen", "F1"))


async def test_edit_updates_its_target(store: Store, inst: InstanceRef) -> None:
    target = await store.save_message(inst, message("ORIG"))
    t_edit = T0 + timedelta(minutes=5)
    edit = await store.save_message(inst, message("EDIT1", edit_of="ORIG", text="corrigido", sent_at=t_edit))
    assert edit.created and edit.message_id != target.message_id
    row = await one_row(store, "message", id=target.message_id)
    assert (row["content"], row["edited_at"]) == ("corrigido", t_edit)
    assert (await one_row(store, "message", id=edit.message_id))["edit_of"] == "ORIG"
    # an older edit delivered late does not overwrite the newer one
    await store.save_message(inst, message("EDIT0", edit_of="ORIG", text="velho", sent_at=T0 + timedelta(minutes=1)))
    assert (await one_row(store, "message", id=target.message_id))["content"] == "corrigido"
    conv = await one_row(store, "conversation")
    assert conv["unread_count"] == 1 and conv["last_message_at"] == T0  # edits are not new messages


async def test_edit_before_its_target_is_applied_when_the_target_arrives(store: Store, inst: InstanceRef) -> None:
    t_edit = T0 + timedelta(minutes=5)
    await store.save_message(inst, message("EDIT1", edit_of="LATE", text="corrigido", sent_at=t_edit))
    target = await store.save_message(inst, message("LATE", text="original"))
    row = await one_row(store, "message", id=target.message_id)
    assert (row["content"], row["edited_at"]) == ("corrigido", t_edit)


async def test_reaction_is_linked_to_its_target(store: Store, inst: InstanceRef) -> None:
    target = await store.save_message(inst, outbound("R0"))
    r = await store.save_message(inst, message("R1", type="reaction", raw_type="ReactionMessage", text="👍",
                                               reaction_to="R0"))
    row = await one_row(store, "message", id=r.message_id)
    assert (row["type"], row["reaction_to"], row["content"]) == ("reaction", "R0", "👍")
    assert (await one_row(store, "message", id=target.message_id))["content"] == "Oi Maria!"
    assert (await one_row(store, "conversation"))["unread_count"] == 0


# -- the follow-up worker's writes ----------------------------------------------------------------------------------


async def test_save_outbound_is_idempotent_on_job_id(store: Store, inst: InstanceRef) -> None:
    lead_id = (await store.save_message(inst, message())).lead_id
    kw = {"lead_id": lead_id, "text": "Ainda tem interesse?", "job_id": "job-1", "external_id": "3EBFOLLOW1",
          "provider_id": None, "sent_at": T0 + timedelta(hours=1)}
    first = await store.save_outbound(inst, **kw)  # type: ignore[arg-type]
    again = await store.save_outbound(inst, **kw)  # type: ignore[arg-type]
    assert first.created and not again.created and again.message_id == first.message_id
    row = await one_row(store, "message", id=first.message_id)
    assert (row["job_id"], row["sender_type"], row["direction"], row["provider_id"]) == (
        "job-1", "USER", "outbound", f"{OWNER}:3EBFOLLOW1")
    # the echoed fromMe webhook of the same WhatsApp message finds the worker's row
    echo = await store.save_message(inst, outbound("3EBFOLLOW1", text="Ainda tem interesse?", sent_by_api=True))
    assert not echo.created and echo.message_id == first.message_id
    assert (await store.counts())["message"] == 2


async def test_echo_first_then_save_outbound_is_one_row(store: Store, inst: InstanceRef) -> None:
    lead_id = (await store.save_message(inst, message())).lead_id
    echo = await store.save_message(inst, outbound("3EBECHO", sent_by_api=True))
    stored = await store.save_outbound(inst, lead_id=lead_id, text="Oi Maria!", job_id="job-2",
                                       external_id="3EBECHO", provider_id=f"{OWNER}:3EBECHO",
                                       sent_at=T0 + timedelta(minutes=1))
    assert not stored.created and stored.message_id == echo.message_id
    assert (await one_row(store, "message", id=echo.message_id))["job_id"] == "job-2"
    assert (await store.counts())["message"] == 2


async def test_save_outbound_refuses_a_lead_of_another_organization(store: Store, inst: InstanceRef) -> None:
    other = await store.register_instance("globex", "inst-g", "globex-token-456")
    foreign_lead = (await store.save_message(other, message("G1", provider_id="g:G1"))).lead_id
    with pytest.raises(PayloadError, match="unknown_lead"):
        await store.save_outbound(inst, lead_id=foreign_lead, text="x", job_id="job-3", external_id="X1",
                                  provider_id=None, sent_at=T0)
    assert (await store.counts())["message"] == 1


async def test_find_lead_and_replied_since(store: Store, inst: InstanceRef) -> None:
    saved = await store.save_message(inst, message(sent_at=T0))
    await store.save_message(inst, outbound(sent_at=T0 + timedelta(hours=2)))
    lead = await store.find_lead(inst.organization_id, saved.lead_id)
    assert lead is not None and (lead.phone, lead.remote_jid) == (LEAD, LEAD_JID)
    assert await store.find_lead(inst.organization_id + 99, saved.lead_id) is None
    assert await store.lead_replied_since(saved.lead_id, T0 - timedelta(seconds=1))
    assert not await store.lead_replied_since(saved.lead_id, T0)  # strictly after; outbound does not count


async def test_message_rows_for_the_ledger(store: Store, inst: InstanceRef) -> None:
    a = await store.save_message(inst, message("L1"))
    await store.save_message(inst, outbound("L2"))
    await store.mark_published(a.message_id)
    got = await store.message_rows(inst.organization_id)
    assert [r["external_id"] for r in got] == ["L1", "L2"]
    assert set(got[0]) == {"provider_id", "external_id", "message_id", "conversation_id", "created_at",
                           "published_at", "sent_at", "direction"}
    assert got[0]["published_at"] is not None and got[1]["published_at"] is None
    assert got[0]["created_at"].tzinfo is not None
    assert await store.message_rows(inst.organization_id + 1) == []


# -- instances ------------------------------------------------------------------------------------------------------


async def test_register_instance_is_an_upsert_and_stores_only_the_hash(store: Store, inst: InstanceRef) -> None:
    assert await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER) == inst
    assert await store.find_instance("inst-a", TOKEN) == inst
    assert await store.find_instance(None, TOKEN) == inst
    assert await store.find_instance("inst-b", TOKEN) is None
    assert await store.find_instance("inst-a", TOKEN + "x") is None
    assert await store.find_instance("inst-a", None) is None
    assert await store.get_instance(inst.id) == inst and await store.get_instance(inst.id + 1) is None
    await store.save_message(inst, message())
    assert TOKEN not in await dump_text(store)
    if store.dialect == "sqlite":
        raw = b"".join(p.read_bytes() for p in Path(str(store.engine.url.database)).parent.glob("store.db*"))
        assert TOKEN.encode() not in raw
    rotated = await store.register_instance("acme", "inst-a", "rotated-token-789")
    assert rotated == inst and await store.find_instance("inst-a", TOKEN) is None
    assert await store.find_instance("inst-a", "rotated-token-789") == inst
    listed = await store.list_instances()
    assert [(i["name"], i["organization"], i["owner"]) for i in listed] == [("inst-a", "acme", OWNER)]


async def test_list_leads_gives_the_ids_a_followup_needs(store: Store, inst: InstanceRef) -> None:
    assert await store.list_leads() == []
    saved = await store.save_message(inst, message())
    other = await store.register_instance("globex", "inst-g", "globex-token-456")
    await store.save_message(other, message(external_id="AC9D4D6F0000000000000000000E47F8"))
    leads = await store.list_leads()
    assert [(r["organization_id"], r["instance_id"], r["instance"], r["lead_id"], r["phone"]) for r in leads
            if r["organization"] == "acme"] == [(inst.organization_id, inst.id, "inst-a", saved.lead_id, LEAD)]
    assert len(leads) == 2 and await store.list_leads(limit=1) == leads[:1]  # newest lead first
    assert {r["organization"] for r in await store.list_leads(other.organization_id)} == {"globex"}
    assert TOKEN not in repr(leads)


async def test_register_instance_conflicts_are_config_errors(store: Store, inst: InstanceRef) -> None:
    with pytest.raises(ConfigError, match="another organization"):
        await store.register_instance("globex", "inst-a", TOKEN)
    with pytest.raises(ConfigError, match="already belongs to instance"):
        await store.register_instance("acme", "inst-z", TOKEN)
    with pytest.raises(ConfigError):
        await store.register_instance("acme", "inst-z", "   ")
    assert (await store.counts())["instance"] == 1


async def test_update_instance_status(store: Store, inst: InstanceRef) -> None:
    await store.update_instance_status(inst, InstanceEvent(Source("inst-a", "5511000000000"), "disconnected",
                                                           "401: logged out from another device"))
    row = await one_row(store, "instance")
    assert (row["status"], row["status_reason"], row["owner"]) == ("disconnected", "401: logged out from another "
                                                                   "device", "5511000000000")
    assert row["status_at"].tzinfo is not None


# -- bad input and failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "reason"), [
    ({"sent_at": T0.replace(tzinfo=None)}, "naive_datetime"),
    ({"type": "hologram"}, "bad_type"),
    ({"direction": "sideways"}, "bad_direction"),
    ({"provider_id": ""}, "no_message_id"),
    ({"external_id": "X" * 129}, "field_too_long"),
    ({"media": Media(mime_type="m" * 300)}, "field_too_long"),
])
async def test_bad_events_are_refused_before_any_write(store: Store, inst: InstanceRef, bad: dict[str, object],
                                                       reason: str) -> None:
    with pytest.raises(PayloadError, match=reason):
        await store.save_message(inst, replace(message(), **bad))  # type: ignore[arg-type]
    assert (await store.counts())["lead"] == 0


async def test_text_postgres_cannot_hold_is_stored_replaced_not_refused(store: Store, inst: InstanceRef) -> None:
    saved = await store.save_message(inst, message(text="a\x00b\ud800c", lead_name="Ma\x00ria"))
    assert (await one_row(store, "message", id=saved.message_id))["content"] == "a\ufffdb\ufffdc"
    assert (await one_row(store, "lead"))["name"] == "Ma\ufffdria"
    with pytest.raises(PayloadError, match="bad_id"):
        await store.save_message(inst, message("BAD\x00ID"))
    assert (await store.counts())["message"] == 1


async def test_a_failure_inside_the_transaction_leaves_no_rows(store: Store, inst: InstanceRef) -> None:
    # A trigger makes the message INSERT fail after the lead, conversation and ticket were written.
    async with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            await conn.execute(text("CREATE OR REPLACE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
                                    "$$ BEGIN RAISE EXCEPTION 'boom'; END $$"))
            await conn.execute(text("CREATE TRIGGER boom BEFORE INSERT ON message FOR EACH ROW "
                                    "EXECUTE FUNCTION boom()"))
        else:
            await conn.execute(text("CREATE TRIGGER boom BEFORE INSERT ON message "
                                    "BEGIN SELECT RAISE(ABORT, 'boom'); END"))
    with pytest.raises(StoreError, match="save_message failed") as info:
        await store.save_message(inst, message())
    assert not isinstance(info.value, type(info.value.__cause__))  # ours, wrapping the driver's
    assert await store.counts() == {"organization": 1, "instance": 1, "lead": 0, "conversation": 0, "ticket": 0,
                                    "message": 0}
    async with store.engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER boom ON message" if store.dialect == "postgresql"
                                else "DROP TRIGGER boom"))
    assert (await store.save_message(inst, message())).created


@pytest.mark.parametrize("dialect", ["postgresql", pytest.param("sqlite", marks=pytest.mark.sqlite)])
async def test_unreachable_database_is_a_store_error(dialect: str, tmp_path: Path) -> None:
    if dialect == "sqlite":
        (tmp_path / "store.db").write_bytes(b"this is not a database, just a file in its place " * 100)
        urls = [f"sqlite:///{tmp_path}/store.db", f"sqlite:///{tmp_path}/no/such/dir/store.db"]
    else:
        urls = [f"postgresql://whatrack:pw-never-shown@127.0.0.1:{servers.free_port()}/whatrack"]
    for url in urls:
        store = Store.from_url(url)
        assert "pw-never-shown" not in repr(store)
        try:
            with pytest.raises(StoreError) as info:
                await store.save_message(InstanceRef(1, 1, "inst-a"), message())
            assert "pw-never-shown" not in str(info.value)
            with pytest.raises(StoreError):
                await store.counts()
        finally:
            await store.aclose()


async def test_statement_timeout_is_a_store_error_and_rolls_back(pg_store_url: str) -> None:
    """PostgreSQL only (SQLite has no statement timeout): a save stuck behind a lock times out, whole."""
    import psycopg

    store = Store.from_url(pg_store_url, statement_timeout_ms=300)
    locker = await psycopg.AsyncConnection.connect(pg_store_url)
    try:
        async with store.engine.begin() as conn:
            for table in reversed(TABLES):
                await conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 (fixed table names)
        inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        await locker.execute("LOCK TABLE message IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreError, match="QueryCanceled"):
            await store.save_message(inst, message())
        await locker.rollback()
        counts = await store.counts()
        assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (0, 0, 0, 0)
        assert (await store.save_message(inst, message())).created
    finally:
        await locker.close()
        await store.aclose()


@pytest.mark.slow
async def test_postgres_stopped_mid_transaction_then_back() -> None:
    """Our own PostgreSQL: stop it while a save waits inside its transaction; nothing partial survives."""
    import psycopg

    # Not under tmp_path: as root the server runs as another user, who cannot enter pytest's 0700 directories.
    workdir = Path(tempfile.mkdtemp(prefix="whatrack-store-pg-"))
    pg = servers.EmbeddedPostgres(workdir)  # it opens workdir (only) to the server user
    await asyncio.to_thread(pg.start)
    locker: psycopg.AsyncConnection[Any] | None = None
    try:
        url = servers.create_database(pg.url, "whatrack")
        store = Store.from_url(url)
        await store.upgrade()
        inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        await store.save_message(inst, message("BEFORE"))
        new_lead = message("STUCK", lead_jid="5521977776666@s.whatsapp.net", chat_jid="5521977776666@s.whatsapp.net",
                           lead_phone="5521977776666", lead_name="Novo")
        # EXCLUSIVE lets the save read the message table but not insert into it: it blocks after writing its new
        # lead, conversation and ticket, inside its transaction.
        locker = await psycopg.AsyncConnection.connect(url)
        await locker.execute("LOCK TABLE message IN EXCLUSIVE MODE")
        task = asyncio.create_task(store.save_message(inst, new_lead))
        while not (await (await locker.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'whatrack' "
                "AND wait_event_type = 'Lock'")).fetchone() or (0,))[0]:
            assert not task.done(), task
            await asyncio.sleep(0.02)
        await asyncio.to_thread(pg.stop)
        # Fast shutdown ends the locker's session and the save's together; which one PostgreSQL ends first is its
        # own race: the save fails (StoreError) or, rarely, gets the lock and commits whole. Never in between.
        try:
            await task
            committed = True
        except StoreError:
            committed = False
        with pytest.raises(StoreError):
            await store.save_message(inst, new_lead)
        with pytest.raises(StoreError):
            await store.counts()
        await locker.close()

        await asyncio.to_thread(pg.start)
        n = 2 if committed else 1
        assert await store.counts() == {"organization": 1, "instance": 1, "lead": n, "conversation": n,
                                        "ticket": n, "message": n}
        saved = await store.save_message(inst, new_lead)  # the redelivery after the outage
        assert saved.created is not committed
        counts = await store.counts()
        assert (counts["lead"], counts["conversation"], counts["ticket"], counts["message"]) == (2, 2, 2, 2)
        await store.aclose()
    finally:
        if locker is not None and not locker.closed:
            with contextlib.suppress(psycopg.Error):
                await locker.close()
        await asyncio.to_thread(pg.remove)  # its data directory too (as root it lives outside workdir)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_timestamps_in_other_zones_are_stored_as_utc(store: Store, inst: InstanceRef) -> None:
    from datetime import timezone

    brt = T0.astimezone(timezone(timedelta(hours=-3)))
    saved = await store.save_message(inst, message(sent_at=brt))
    row = await one_row(store, "message", id=saved.message_id)
    assert row["sent_at"] == T0 and row["sent_at"].tzinfo == UTC
    assert saved.realtime["sentAt"] == "2026-01-01T10:00:00Z"



async def test_a_number_postgres_cannot_hold_is_a_payload_error(store: Store, inst: InstanceRef) -> None:
    """PostgreSQL's one-statement write (asyncpg): an out-of-range value can never be stored, so it is not retryable."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite stores arbitrary integers differently; the endpoint runs on PostgreSQL only")
    with pytest.raises(PayloadError, match="unstorable_value"):
        await store.save_message(inst, message("HUGE", type="image", media=Media(size_bytes=2**70)))
    assert (await store.counts())["message"] == 0


# -- the write's plans ----------------------------------------------------------------------------------------------

_SCANS = "SELECT relname, seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname IN ('message', 'lead')"


async def _scans(url: str) -> dict[str, tuple[int, int]]:
    import asyncpg

    from whatrack.store.write import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return {r["relname"]: (r["seq_scan"], r["idx_scan"] or 0) for r in await conn.fetch(_SCANS)}
    finally:
        await conn.close()


async def test_the_write_finds_rows_by_index_on_a_database_without_statistics(make_migrated_database: Any) -> None:
    """PL/pgSQL keeps each statement's generic plan for the connection's life. On a new database (no ANALYZE yet) the
    plan for ``provider OR external id`` (and ``JID OR phone``) was a sequential scan, kept as the table grew: every
    webhook read the whole message table. Each lookup is now an equality on one unique key (migration 0004)."""
    url = make_migrated_database()
    first = Store.from_url(url)
    inst = await first.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
    for i in range(5):
        await first.save_message(inst, message(f"WARM{i:04d}", lead_phone=f"55119{i:08d}",
                                               lead_jid=f"55119{i:08d}@s.whatsapp.net"))
    await first.aclose()  # its backends exit: their table counters reach the statistics
    before = await _scans(url)

    store = Store.from_url(url)  # new connections: plans made now, on a table without statistics
    for i in range(40):
        phone = f"55119{i % 8:08d}"
        assert (await store.save_message(inst, message(f"MSG{i:05d}", lead_phone=phone,
                                                       lead_jid=f"{phone}@s.whatsapp.net"))).created
    await store.aclose()
    for _ in range(50):  # the exiting backends' counters land within moments
        after = await _scans(url)
        if after["message"][1] - before["message"][1] >= 40:
            break
        await asyncio.sleep(0.05)
    assert after["message"][1] - before["message"][1] >= 40, (before, after)  # the writes were counted
    assert {t: after[t][0] - before[t][0] for t in ("message", "lead")} == {"message": 0, "lead": 0}


async def test_a_write_does_not_lock_the_instance_and_organization_rows(make_migrated_database: Any) -> None:
    """Migration 0005: the message has no foreign keys to its organization and instance, whose single rows every
    concurrent write would otherwise lock (``FOR KEY SHARE``, a MultiXact per new locker). A transaction holding
    both rows ``FOR UPDATE`` does not hold a write back; deleting either is still refused while messages depend on
    it (through their conversation), and its messages stay whole."""
    import asyncpg

    from whatrack.store.write import asyncpg_dsn

    url = make_migrated_database()
    store = Store.from_url(url)
    inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
    await store.save_message(inst, message("FIRST"))
    holder = await asyncpg.connect(asyncpg_dsn(url))
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM instance WHERE id = $1 FOR UPDATE", inst.id)
        await holder.execute("SELECT 1 FROM organization WHERE id = $1 FOR UPDATE", inst.organization_id)
        stored = await asyncio.wait_for(store.save_message(inst, message("SECOND")), 10)
        assert stored.created
        await tx.rollback()
        for table, row_id in (("instance", inst.id), ("organization", inst.organization_id)):
            with pytest.raises(asyncpg.ForeignKeyViolationError, match="is still referenced"):
                await holder.execute(f"DELETE FROM {table} WHERE id = $1", row_id)  # noqa: S608 (two fixed names)
        assert await holder.fetchval("SELECT count(*) FROM message WHERE instance_id = $1 AND organization_id = $2",
                                     inst.id, inst.organization_id) == 2
    finally:
        await holder.close()
        await store.aclose()


async def test_writes_that_arrive_together_commit_together_each_with_its_own_outcome(
        make_migrated_database: Any) -> None:
    """Deliveries that arrive while a write is in flight go in the next write together (one round trip, one
    commit). Each caller still gets its own outcome: a twin delivery of a message in the same write is a duplicate,
    a value PostgreSQL cannot hold fails only its own delivery, and the others are stored."""
    url = make_migrated_database()
    store = Store.from_url(url)

    def chat(i: int) -> dict[str, str]:
        return {"lead_phone": f"55119{i % 3:08d}", "lead_jid": f"55119{i % 3:08d}@s.whatsapp.net"}

    async def query(sql: str) -> Any:
        async with store.engine.connect() as conn:
            return (await conn.execute(text(sql))).one()

    try:
        assert store.writer is not None
        store.writer.flights = 1  # one write in flight: everything that arrives meanwhile waits for the next
        inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        await store.save_message(inst, message("WARM"))  # the pool's connection is open

        events = [message(f"TOGETHER{i:02d}", **chat(i)) for i in range(12)]
        events.insert(5, events[2])  # the same delivery twice, in the same write
        got = await asyncio.gather(*(store.save_message(inst, ev) for ev in events))
        assert sorted(g.external_id for g in got if g.created) == [f"TOGETHER{i:02d}" for i in range(12)]
        assert [g.external_id for g in got if not g.created] == ["TOGETHER02"]
        assert len({g.message_id for g in got}) == 12
        # rows of one transaction share its id (xmin): one or two transactions (the first delivery may go alone)
        count, transactions = await query("SELECT count(*), count(DISTINCT xmin::text) FROM message "
                                          "WHERE external_id LIKE 'TOGETHER%'")
        assert count == 12 and transactions <= 2
        assert (await query("SELECT count(*) FROM lead"))[0] == 1 + 3  # WARM's lead and three others, once each

        events = [message(f"AFTER{i:02d}", **chat(i)) for i in range(6)]
        events.insert(3, message("HUGE", type="image", media=Media(size_bytes=2**70)))
        got = await asyncio.gather(*(store.save_message(inst, ev) for ev in events), return_exceptions=True)
        assert isinstance(got[3], PayloadError) and got[3].reason == "unstorable_value"
        assert all(not isinstance(g, BaseException) and g.created for i, g in enumerate(got) if i != 3)
        after = await query("SELECT count(*) FROM message WHERE external_id LIKE 'AFTER%' OR external_id = 'HUGE'")
        assert after[0] == 6
    finally:
        await store.aclose()


async def test_a_write_on_a_pooled_connection_whose_session_was_ended_is_tried_again(
        make_migrated_database: Any) -> None:
    """A server session ended while its pooled connection sat idle (``pg_terminate_backend``, a failover) is found
    when the next write takes the connection: asyncpg raises ``ConnectionDoesNotExistError``, or, when the session's
    end is read first, ``InternalClientError`` ("another operation is in progress"), which was answered 500. Either
    way the write is tried again on a new connection and stored."""
    import asyncpg

    from whatrack.store.write import asyncpg_dsn

    url = make_migrated_database()
    store = Store.from_url(url)
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        inst = await store.register_instance("acme", "inst-a", TOKEN, owner=OWNER)
        await store.save_message(inst, message("OPEN"))  # the pool's connection is open
        for i in range(20):
            ended = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                         "WHERE application_name = 'whatrack' AND pid <> pg_backend_pid()")
            assert ended >= 1
            await asyncio.sleep(0.002 * (i % 5))  # the session's end reaches the client at different moments
            stored = await store.save_message(inst, message(f"AFTER{i:02d}"))
            assert stored.created
    finally:
        await admin.close()
        await store.aclose()
