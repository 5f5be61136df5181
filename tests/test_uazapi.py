"""The UAZAPI normalizer against the shared fixtures (protocols §17 oracles), our own edge-case fixtures, fuzzing, and
the ``whatrack normalize`` command run as a real subprocess."""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import whatrack.uazapi.normalizer as uazapi
from whatrack.errors import PayloadError
from whatrack.events import STATUS_ORDER, Ignored, InstanceEvent, MessageEvent, ReceiptEvent
from whatrack.uazapi import cli as uazapi_cli

OWN = Path(__file__).resolve().parent / "fixtures" / "uazapi"
OWNER = "5511999990000"
MARIA = "5511988887777"
TOKEN = "0f0e0d0c-aaaa-4bbb-8ccc-000000000001"


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def norm_file(path: Path) -> Any:
    return uazapi.normalize(uazapi.parse_body(path.read_bytes()))


def utc(h: int, m: int, s: int = 0) -> datetime:
    return datetime(2026, 1, 1, h, m, s, tzinfo=UTC)


# -- the shared fixtures: protocols §17 -------------------------------------------------------------------------------

SHARED_ORACLES: dict[str, dict[str, Any]] = {
    "messages_inbound_text.json": dict(
        event="message", external_id="AC9D4D6FA3A84EEFAB04A47457DE47F7",
        provider_id=f"{OWNER}:AC9D4D6FA3A84EEFAB04A47457DE47F7", direction="inbound", type="text",
        raw_type="ExtendedTextMessage", lead_phone=MARIA, lead_jid=f"{MARIA}@s.whatsapp.net", lead_name="Maria Teste",
        is_group=False, text="Olá! Vi o anúncio no Instagram, qual o preço do plano anual?",
        sent_at="2026-01-01T10:00:00Z", edit_of=None, reaction_to=None, reply_to=None, media=None),
    "messages_outbound_text_fromme.json": dict(
        event="message", external_id="AC50672C2A7D402531939B558A7D2C5B", direction="outbound", type="text",
        raw_type="Conversation", lead_phone=MARIA, lead_jid=f"{MARIA}@s.whatsapp.net", lead_name="Maria Teste",
        text="Oi Maria! O plano anual sai por R$ 1.199,00.", sent_by_api=False, sent_at="2026-01-01T10:01:00Z"),
    "messages_inbound_image_caption.json": dict(
        event="message", external_id="ACF0665F81211BA7E5DDF8D446CF743D", type="image", direction="inbound",
        text="Esse é o modelo que eu quero, tem na cor azul?", sent_at="2026-01-01T10:03:00Z",
        media=dict(mime_type="image/jpeg", size_bytes=162894, duration_seconds=None, file_name=None,
                   sha256="Fo36CiW48GFKUmKJqVqFY1yMCrc+PMJgGiVSFEGmQ6E=", width=900, height=1600, voice=False,
                   url=None)),
    "messages_inbound_audio_ptt.json": dict(
        event="message", external_id="ACE317321244533A0A0B14CD29F4D0B7", type="audio", text="",
        sent_at="2026-01-01T10:04:00Z",
        media=dict(mime_type="audio/ogg; codecs=opus", size_bytes=4920, duration_seconds=7, file_name=None,
                   sha256="Cj7jkjwh1yjUVGLwN0Y2qpsT9HXuYuyv9w86G6KYCYE=", width=None, height=None, voice=True,
                   url=None)),
    "messages_inbound_document.json": dict(
        event="message", external_id="AC43CC23FA52B87B4CC1D02B5B114154", type="document", text="",
        sent_at="2026-01-01T10:05:00Z",
        media=dict(mime_type="application/pdf", size_bytes=5606601, duration_seconds=None,
                   file_name="Comprovante_Pagamento_Março.pdf", sha256="mI4dcRLLKLXlCBuqsIXeHaNbGjxRZkAnE48oHjbCsMM=",
                   width=None, height=None, voice=False, url=None)),
    "messages_inbound_location.json": dict(
        event="message", external_id="ACE6EAEA18E885E1078829B56DF34896", type="location", media=None,
        location=dict(latitude=-23.5613, longitude=-46.6565, name="Loja Exemplo - Paulista",
                      address="Avenida Paulista, 1000, São Paulo, 01310-100, SP, BR"),
        sent_at="2026-01-01T10:06:00Z"),
    "messages_inbound_sticker.json": dict(
        event="message", external_id="AC57C4B13A4C7335E72F1669E0506E99", type="sticker", raw_type="StickerMessage",
        media=dict(mime_type="image/webp", size_bytes=278228, duration_seconds=None, file_name=None,
                   sha256="AJu+bXZ5gnbEQz04loh/jHRGSjnVNxb24fbC/nd3lEo=", width=64, height=64, voice=False, url=None),
        sent_at="2026-01-01T10:09:00Z"),
    "messages_group_inbound_text.json": dict(
        event="message", external_id="ACA5070080F26F7BC7525B3254029092", direction="inbound", is_group=True,
        chat_jid="120363000000000001@g.us", lead_jid="120363000000000001@g.us", lead_phone=None,
        group_name="Grupo Teste Vendas", participant_phone="5531966665555",
        text="Pessoal, alguém tem o catálogo novo?", sent_at="2026-01-01T10:10:00Z"),
    "messages_update_delivered.json": dict(
        event="receipt", external_ids=["AC50672C2A7D402531939B558A7D2C5B"], status="delivered",
        at="2026-01-01T10:13:00Z", chat_jid=f"{MARIA}@s.whatsapp.net", instance_name="whatrack-demo-01"),
    "connection_connected.json": dict(event="instance", status="connected", owner=OWNER,
                                      instance_name="whatrack-demo-01", reason=None),
    "evolution_messages_upsert_text.json": dict(
        event="message", external_id="3EB08ABFBD3B60DEA5D323", direction="inbound", type="text",
        lead_phone=MARIA, lead_name="Maria Teste", is_group=False, sent_at="2026-01-01T10:00:00Z",
        text="Olá! Vi o anúncio no Instagram, qual o preço do plano anual?"),
}


def test_every_shared_fixture_has_an_oracle(fixtures_dir: Path) -> None:
    names = {p.name for p in fixtures_dir.glob("*.json")}
    assert names == set(SHARED_ORACLES) | {"messages_malformed_missing_messageid.json"}


@pytest.mark.parametrize("name", sorted(SHARED_ORACLES))
def test_shared_fixture_normalizes_to_its_oracle(fixtures_dir: Path, name: str) -> None:
    got = norm_file(fixtures_dir / name).to_json()
    expected = SHARED_ORACLES[name]
    assert {k: got.get(k) for k in expected} == expected


def test_shared_messages_carry_the_source_and_keep_the_token_out_of_sight(fixtures_dir: Path) -> None:
    ev = norm_file(fixtures_dir / "messages_inbound_text.json")
    assert isinstance(ev, MessageEvent)
    assert (ev.source.instance_name, ev.source.owner, ev.source.token) == ("whatrack-demo-01", OWNER, TOKEN)
    assert TOKEN not in repr(ev)
    assert TOKEN not in json.dumps(ev.to_json(), default=str)
    assert ev.sent_at.tzinfo is not None and ev.sent_at.utcoffset() == UTC.utcoffset(None)
    assert ev.sender_type == "LEAD"


def test_outbound_lead_is_the_chat_not_the_owner(fixtures_dir: Path) -> None:
    ev = norm_file(fixtures_dir / "messages_outbound_text_fromme.json")
    assert isinstance(ev, MessageEvent)
    assert ev.lead_phone == MARIA != OWNER
    assert ev.lead_name == "Maria Teste"  # chat.name; message.senderName is the owner's "Loja Exemplo"
    assert ev.sender_type == "USER"
    assert ev.participant_phone is None


def test_media_never_stores_the_encrypted_cdn_url(fixtures_dir: Path) -> None:
    for name in ("messages_inbound_image_caption.json", "messages_inbound_audio_ptt.json",
                 "messages_inbound_document.json", "messages_inbound_sticker.json"):
        ev = norm_file(fixtures_dir / name)
        assert isinstance(ev, MessageEvent) and ev.media is not None
        assert ev.media.url is None
        assert ".enc" not in json.dumps(ev.to_json(), default=str)


def test_missing_message_id_is_a_payload_error(fixtures_dir: Path) -> None:
    with pytest.raises(PayloadError) as info:
        norm_file(fixtures_dir / "messages_malformed_missing_messageid.json")
    assert info.value.reason == "no_message_id"
    assert "messageid" in info.value.detail and TOKEN not in str(info.value)


def test_message_id_falls_back_to_the_provider_id(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    del body["message"]["messageid"]
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.external_id, ev.provider_id) == ("AC9D4D6FA3A84EEFAB04A47457DE47F7",
                                                f"{OWNER}:AC9D4D6FA3A84EEFAB04A47457DE47F7")


def test_an_id_without_owner_prefix_is_still_an_id(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    body["message"].pop("messageid")
    body["message"]["id"] = "r0a1b2c3"
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.external_id, ev.provider_id) == ("r0a1b2c3", f"{OWNER}:r0a1b2c3")


def test_an_absurdly_long_message_id_is_a_payload_error(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    body["message"]["messageid"] = "A" * 129
    with pytest.raises(PayloadError) as info:
        uazapi.normalize(body)
    assert info.value.reason == "bad_message_id" and len(str(info.value)) < 300


@pytest.mark.parametrize("junk", ["@s.whatsapp.net", "5511988887777@", "   ", 5511988887777, {"jid": "x"}])
def test_a_junk_chat_id_falls_through_to_the_next_source(fixtures_dir: Path, junk: Any) -> None:
    body = load(fixtures_dir / "messages_outbound_text_fromme.json")
    body["message"]["chatid"] = junk
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.chat_jid, ev.lead_phone) == (f"{MARIA}@s.whatsapp.net", MARIA)  # from chat.wa_chatid


# -- our own fixtures: the cases the shared set has no file for -------------------------------------------------------

OWN_ORACLES: dict[str, dict[str, Any]] = {
    "messages_inbound_video.json": dict(
        type="video", raw_type="VideoMessage", text="Olha o vídeo do produto 📦", sent_at="2026-01-01T10:15:00Z",
        media=dict(mime_type="video/mp4", size_bytes=1048576, duration_seconds=12, file_name=None,
                   sha256="dmlkZW8tc2hhMjU2LWZha2UtMDAwMDAwMDAwMDAwMDA=", width=720, height=1280, voice=False,
                   url=None)),
    "messages_inbound_extended_reply.json": dict(
        type="text", text="Pode ser no plano anual então!", reply_to="AC50672C2A7D402531939B558A7D2C5B",
        edit_of=None, reaction_to=None),
    "messages_inbound_contact.json": dict(
        type="contact", raw_type="ContactMessage", media=None,
        text="João Indicação\nPhone (Celular): +55 21 97777-6666", lead_phone=MARIA),
    "messages_inbound_reaction.json": dict(
        type="reaction", text="❤️", reaction_to="AC50672C2A7D402531939B558A7D2C5B", reply_to=None,
        direction="inbound", lead_phone=MARIA),
    "messages_outbound_poll.json": dict(
        type="poll", raw_type="PollCreationMessageV3", direction="outbound", text="Qual horário prefere para a visita?",
        external_id="3EB0F011C4EA7E000000E5", lead_phone=MARIA),
    "messages_inbound_poll_vote.json": dict(
        type="poll_vote", raw_type="PollUpdateMessage", text="Manhã", reply_to="3EB0F011C4EA7E000000E5"),
    "messages_inbound_list_response.json": dict(
        type="list_response", text="Plano anual", reply_to="3EB0115E4E1100000000A1", media=None),
    "messages_inbound_edited.json": dict(
        type="text", external_id="AC77ED17000000000000000000000A07", edit_of="AC9D4D6FA3A84EEFAB04A47457DE47F7",
        text="Olá! Vi o anúncio no Instagram, qual o preço do plano mensal?", sent_at="2026-01-01T10:22:00Z"),
    "messages_outbound_lid_chat.json": dict(
        direction="outbound", chat_jid="100000000000002@lid", lead_jid="5521977776666@s.whatsapp.net",
        lead_phone="5521977776666", lead_name="João Indicação", sent_by_api=True, track_id="followup-42",
        is_group=False),
    "messages_inbound_lid_only.json": dict(
        direction="inbound", chat_jid="100000000000002@lid", lead_jid="5521977776666@s.whatsapp.net",
        lead_phone="5521977776666", lead_name="João", text="Oi, é o João."),
    "messages_group_outbound.json": dict(
        direction="outbound", is_group=True, lead_phone=None, lead_jid="120363000000000001@g.us",
        participant_phone=None, group_name="Grupo Teste Vendas", text="Segue o catálogo novo, pessoal!"),
    "messages_group_device_suffix.json": dict(
        direction="inbound", is_group=True, participant_phone="5531966665555", lead_phone=None,
        text="Mandei do computador"),
    "messages_self_chat.json": dict(event="ignored"),
    "messages_status_broadcast.json": dict(event="ignored"),
    "messages_newsletter.json": dict(event="ignored"),
    "n8n_array_wrapper.json": dict(external_id="AC9D4D6FA3A84EEFAB04A47457DE47F7", direction="inbound",
                                   lead_phone=MARIA, instance_name="whatrack-demo-01"),
    "n8n_body_wrapper.json": dict(external_id="AC50672C2A7D402531939B558A7D2C5B", direction="outbound",
                                  lead_phone=MARIA),
    "legacy_event_instance_data.json": dict(
        event="message", external_id="AC1E6AC7000000000000000000000F12", direction="inbound", text="Bom dia",
        lead_phone=MARIA, instance_name="whatrack-demo-01", sent_at="2026-01-01T10:30:00Z"),
    "unknown_event_call.json": dict(event="ignored", reason="unsupported_event_type: 'call'"),
    "messages_update_read_string_bools.json": dict(
        event="receipt", status="read", at="2026-01-01T10:15:00Z",
        external_ids=["AC50672C2A7D402531939B558A7D2C5B", "3EB01100C4A7000000000B", "3EB0F011C4EA7E000000E5"]),
    "messages_update_played.json": dict(event="receipt", status="played", external_ids=["3EB0A0D10FFF0000000000"],
                                        at="2026-01-01T10:16:00Z"),
    "messages_update_deleted.json": dict(event="receipt", status="deleted",
                                         external_ids=["AC9D4D6FA3A84EEFAB04A47457DE47F7"], at="2026-01-01T10:17:00Z"),
    "messages_string_timestamp.json": dict(event="message", direction="inbound", sent_at="2026-01-01T10:31:00Z",
                                           sent_by_api=False, is_group=False, lead_phone=MARIA),
    "connection_disconnected.json": dict(event="instance", status="disconnected",
                                         reason="401: logged out from another device"),
}
IGNORED_REASONS = {
    "messages_self_chat.json": "self_chat",
    "messages_status_broadcast.json": "status_broadcast",
    "messages_newsletter.json": "newsletter",
    "unknown_event_call.json": "unsupported_event_type",
}


def test_every_own_fixture_has_an_oracle() -> None:
    assert {p.name for p in OWN.glob("*.json")} == set(OWN_ORACLES)


@pytest.mark.parametrize("name", sorted(OWN_ORACLES))
def test_own_fixture_normalizes_to_its_oracle(name: str) -> None:
    got = norm_file(OWN / name).to_json()
    expected = OWN_ORACLES[name]
    assert {k: got.get(k) for k in expected} == expected
    if name in IGNORED_REASONS:
        assert got["reason"].split(":")[0] == IGNORED_REASONS[name]
    if got["event"] == "receipt":
        assert got["status"] in (*STATUS_ORDER, "deleted", "failed")


def test_outbound_lid_chat_never_resolves_to_the_owner() -> None:
    body = load(OWN / "messages_outbound_lid_chat.json")
    assert body["message"]["sender_pn"] == f"{OWNER}@s.whatsapp.net"  # the trap: the sender is the owner
    del body["chat"]  # no chat record: nothing can resolve the LID, and the sender must not be used
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert ev.lead_jid == "100000000000002@lid"
    assert ev.lead_phone is None
    assert ev.lead_name is None  # message.senderName is the owner's


def test_a_fastid_holding_the_lid_digits_is_not_a_phone() -> None:
    body = load(OWN / "messages_outbound_lid_chat.json")
    body["chat"]["wa_fastid"] = f"{OWNER}:100000000000002"
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.lead_jid, ev.lead_phone) == ("100000000000002@lid", None)


def test_lid_chat_falls_back_to_the_formatted_chat_phone() -> None:
    body = load(OWN / "messages_outbound_lid_chat.json")
    body["chat"]["wa_fastid"] = ""
    body["chat"]["phone"] = "+55 21 97777-6666"
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.lead_jid, ev.lead_phone) == ("100000000000002@lid", "5521977776666")


def test_a_message_without_any_chat_is_a_payload_error(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_outbound_text_fromme.json")
    del body["chat"], body["message"]["chatid"], body["message"]["chatlid"]
    with pytest.raises(PayloadError) as info:
        uazapi.normalize(body)
    assert info.value.reason == "no_chat_id"


def test_inbound_message_without_chat_id_uses_the_sender(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    del body["chat"], body["message"]["chatid"], body["message"]["chatlid"]
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent) and ev.lead_phone == MARIA


def test_device_suffix_is_stripped_from_a_direct_chat(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    body["message"]["chatid"] = f"{MARIA}:12@s.whatsapp.net"
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.chat_jid, ev.lead_phone) == (f"{MARIA}@s.whatsapp.net", MARIA)


def test_the_edit_is_linked_not_duplicated() -> None:
    ev = norm_file(OWN / "messages_inbound_edited.json")
    assert isinstance(ev, MessageEvent)
    assert ev.external_id != ev.edit_of == "AC9D4D6FA3A84EEFAB04A47457DE47F7"


def test_unknown_message_type_is_kept_with_its_text(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    body["message"]["messageType"] = "EventMessage"
    body["message"]["content"] = {"name": "Lançamento"}
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent)
    assert (ev.type, ev.raw_type) == ("unknown", "EventMessage")
    assert ev.text == body["message"]["text"]


def test_texts_are_kept_verbatim(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    for text in ("a\u0000b", "'; DROP TABLE messages; --", "👩‍👩‍👧‍👦 ação \t\n ", "x" * 70_000, "\ud800 lone"):
        body["message"]["text"] = text
        ev = uazapi.normalize(body)
        assert isinstance(ev, MessageEvent) and ev.text == text


def test_a_downloaded_file_url_is_kept_but_never_a_whatsapp_cdn_url(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_image_caption.json")
    body["message"]["fileURL"] = "https://files.example.com/abc.jpg"
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent) and ev.media and ev.media.url == "https://files.example.com/abc.jpg"
    for bad in (body["message"]["content"]["URL"], "https://media.example.com/x.enc?x=1", "ftp://example.com/a",
                "https://MMG.WhatsApp.net/v/x"):
        body["message"]["fileURL"] = bad
        ev = uazapi.normalize(body)
        assert isinstance(ev, MessageEvent) and ev.media and ev.media.url is None


@pytest.mark.parametrize(("value", "expected"), [
    (1767261600000, utc(10, 0)),            # ms (UAZAPI messageTimestamp)
    (1767261600, utc(10, 0)),               # s (messages_update Timestamp)
    ("1767261600000", utc(10, 0)),          # ms as a string
    (" 1767261600 ", utc(10, 0)),           # s as a string
    (1767261600000000, utc(10, 0)),         # µs
    (1767261600.5, utc(10, 0, 0).replace(microsecond=500000)),
    ("2026-01-01T10:00:00Z", utc(10, 0)),   # ISO (groups events)
    ("2026-01-01 07:00:00-03:00", utc(10, 0)),
])
def test_timestamps_in_any_unit_become_aware_utc(fixtures_dir: Path, value: Any, expected: datetime) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    body["message"]["messageTimestamp"] = value
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent) and ev.sent_at == expected and ev.sent_at.tzinfo is not None


@pytest.mark.parametrize("value", [0, -5, None, "", "soon", True, 1e300, "9" * 39, [1767261600], {"t": 1}])
def test_an_unusable_timestamp_falls_back_to_the_receive_time(fixtures_dir: Path, value: Any) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    body["message"]["messageTimestamp"] = value
    received = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    ev = uazapi.normalize(body, received_at=received)
    assert isinstance(ev, MessageEvent) and ev.sent_at == received


@pytest.mark.parametrize(("flag", "direction"), [
    (True, "outbound"), ("True", "outbound"), ("true", "outbound"), (1, "outbound"), ("1", "outbound"),
    (False, "inbound"), ("False", "inbound"), ("false", "inbound"), (0, "inbound"), (None, "inbound"),
    ("no", "inbound"),
])
def test_from_me_accepts_string_booleans(fixtures_dir: Path, flag: Any, direction: str) -> None:
    body = load(fixtures_dir / "messages_outbound_text_fromme.json")
    body["message"]["fromMe"] = flag
    ev = uazapi.normalize(body)
    assert isinstance(ev, MessageEvent) and ev.direction == direction
    assert ev.lead_phone == MARIA  # the lead never depends on the direction in a direct chat


# -- receipts ----------------------------------------------------------------------------------------------------------

def _update(fixtures_dir: Path, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = load(fixtures_dir / "messages_update_delivered.json")
    for k, v in changes.items():
        if k.startswith("event_"):
            body["event"][k[6:]] = v
        else:
            body[k] = v
    return body


@pytest.mark.parametrize(("state", "status"), [
    ("Sent", "sent"), ("Delivered", "delivered"), ("Read", "read"), ("Played", "played"), ("READ", "read"),
    ("Pending", "pending"), ("Failed", "failed"), ("Deleted", "deleted"), ("Revoked", "deleted"),
])
def test_receipt_states_map_to_status_names(fixtures_dir: Path, state: str, status: str) -> None:
    ev = uazapi.normalize(_update(fixtures_dir, state=state, event_Type=state))
    assert isinstance(ev, ReceiptEvent) and ev.status == status


def test_any_delete_marker_wins_over_the_state(fixtures_dir: Path) -> None:
    ev = uazapi.normalize(_update(fixtures_dir, state="Read", event_Type="Revoked"))
    assert isinstance(ev, ReceiptEvent) and ev.status == "deleted"


def test_the_message_object_receipt_variant(fixtures_dir: Path) -> None:
    body = _update(fixtures_dir, state="", event_Type="", event_MessageIDs=[])
    body["message"] = {"messageid": "AC50672C2A7D402531939B558A7D2C5B", "status": "Deleted"}
    ev = uazapi.normalize(body)
    assert isinstance(ev, ReceiptEvent)
    assert (ev.status, ev.external_ids) == ("deleted", ("AC50672C2A7D402531939B558A7D2C5B",))


def test_receipt_ids_are_bare_and_unique(fixtures_dir: Path) -> None:
    ids = ["A1", f"{OWNER}:A1", "B2", "", None, 7, " C3 "]
    ev = uazapi.normalize(_update(fixtures_dir, event_MessageIDs=ids))
    assert isinstance(ev, ReceiptEvent) and ev.external_ids == ("A1", "B2", "C3")


@pytest.mark.parametrize(("changes", "reason"), [
    ({"state": "FileDownloaded", "event_Type": "FileDownloaded"}, "file_downloaded"),
    ({"state": "Retry", "event_Type": "Retry"}, "unsupported_receipt_status"),
    ({"state": None, "event_Type": None}, "unsupported_receipt_status"),
    ({"event_MessageIDs": []}, "receipt_without_ids"),
    ({"event": "not an object"}, "unsupported_receipt_status"),
])
def test_receipts_that_carry_no_status_change_are_ignored(fixtures_dir: Path, changes: dict[str, Any],
                                                          reason: str) -> None:
    body = _update(fixtures_dir, **{k: v for k, v in changes.items() if k != "event"})
    if "event" in changes:
        body["event"], body["state"] = changes["event"], None
    ev = uazapi.normalize(body)
    assert isinstance(ev, Ignored) and ev.reason.split(":")[0] == reason


# -- envelopes ---------------------------------------------------------------------------------------------------------

def test_connecting_instance_without_owner(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "connection_connected.json")
    body.update(owner="", instance={"name": "whatrack-demo-01", "status": "connecting", "qrcode": "data:image/png;x"})
    ev = uazapi.normalize(body)
    assert isinstance(ev, InstanceEvent)
    assert (ev.status, ev.source.owner) == ("connecting", None)
    assert "qrcode" not in json.dumps(ev.to_json())


@pytest.mark.parametrize(("body", "reason"), [
    ({}, "missing_event_type"),
    ({"EventType": "groups", "event": {"Join": []}, "type": "Group"}, "unsupported_event_type"),
    ({"EventType": 42}, "unsupported_event_type"),
    ({"EventType": [[[["deep"]]]]}, "unsupported_event_type"),
    ({"EventType": "newsletter_messages"}, "newsletter"),
    ({"EventType": "presence", "token": TOKEN}, "unsupported_event_type"),
    ({"event": "messages.update", "instance": "x", "data": {}}, "unsupported_event_type"),
])
def test_events_we_do_not_store_are_ignored_with_a_reason(body: dict[str, Any], reason: str) -> None:
    ev = uazapi.normalize(body)
    assert isinstance(ev, Ignored) and ev.reason.split(":")[0] == reason
    assert TOKEN not in ev.reason


def test_an_absurd_event_type_is_clipped_in_the_reason() -> None:
    ev = uazapi.normalize({"EventType": "x" * 10_000})
    assert isinstance(ev, Ignored) and len(ev.reason) < 120


def test_a_flat_envelope_is_not_copied(fixtures_dir: Path) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    assert uazapi.unwrap(body) is body


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[]", "array of 0 items"),
    (b"[{}, {}]", "array of 2 items"),
    (b'"a string"', "JSON string"),
    (b"null", "JSON null"),
    (b"42", "JSON number"),
    (b'{"EventType": "messages", "x": NaN}', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'[{"body": [{"body": [{"body": [{"body": {}}]}]}]}]', "wrapped"),
])
def test_parse_body_rejects_what_is_not_one_json_object(raw: bytes, fragment: str) -> None:
    with pytest.raises(PayloadError) as info:
        uazapi.parse_body(raw)
    assert info.value.reason == "not_json"
    assert fragment in info.value.detail


def test_parse_body_accepts_a_byte_order_mark(fixtures_dir: Path) -> None:
    raw = b"\xef\xbb\xbf" + (fixtures_dir / "connection_connected.json").read_bytes()
    assert uazapi.parse_body(raw)["EventType"] == "connection"


def _stdlib_reads(raw: bytes) -> Any:
    """What the endpoint read before msgspec: ``json.loads`` of the UTF-8 text, a BOM dropped."""
    return json.loads(raw.decode("utf-8-sig"))


def _identical(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0; -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _reads_as_the_standard_library(raw: bytes) -> None:
    """The fast decoder either refuses ``raw`` the way ``parse_body`` expects (the standard library then decides) or
    reads what the standard library reads."""
    try:
        fast = uazapi._FAST_JSON.decode(raw)
    except (msgspec.MsgspecError, RecursionError):  # what parse_body hands to json.loads; anything else fails here
        return
    slow = _stdlib_reads(raw)  # raises (the test fails) when the fast decoder accepted what json.loads refuses
    assert _identical(fast, slow), (raw[:200], fast, slow)


_JSON_LEAF = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**200, max_value=2**200)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text())
_JSON = st.recursive(_JSON_LEAF, lambda inner: st.lists(inner, max_size=5)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=5), max_leaves=30)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(_JSON, st.booleans())
def test_the_fast_json_decoder_reads_documents_as_the_standard_library(value: Any, ascii_only: bool) -> None:
    _reads_as_the_standard_library(json.dumps({"v": value}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"))


@settings(max_examples=600, deadline=None)
@given(st.from_regex(r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?\Z"))
def test_the_fast_json_decoder_reads_numbers_as_the_standard_library(number: str) -> None:
    _reads_as_the_standard_library(b'{"n": ' + number.encode() + b"}")


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=40))
def test_the_fast_json_decoder_is_never_looser_on_bytes(raw: bytes) -> None:
    _reads_as_the_standard_library(raw)
    _reads_as_the_standard_library(b'{"a": "' + raw + b'"}')


@pytest.mark.parametrize("raw", [
    b"\xef\xbb\xbf{\"a\": 1}",                  # a BOM
    b'{"a": "\\ud800"}',                       # a lone surrogate escape
    b'{"a": 1e400}',                            # infinity as the standard library reads it
    b'{"a": 18446744073709551616}',             # over 64 bits: an int, exactly
    b'{"a": -9223372036854775809}',
    b'{"a": 1, "a": 2}',                        # the last duplicate wins
])
def test_what_the_fast_decoder_refuses_or_reads_parse_body_reads_as_json_loads(raw: bytes) -> None:
    assert _identical(uazapi.parse_body(raw), _stdlib_reads(raw))


def test_normalize_rejects_a_non_object() -> None:
    with pytest.raises(PayloadError) as info:
        uazapi.normalize([1, 2])  # type: ignore[arg-type]
    assert info.value.reason == "not_json"


# -- fuzzing: any JSON gives an event or a PayloadError, never another exception ---------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
MESSAGE_KEYS = ["id", "messageid", "chatid", "chatlid", "sender", "sender_pn", "sender_lid", "senderName", "fromMe",
                "isGroup", "groupName", "messageType", "type", "mediaType", "text", "content", "messageTimestamp",
                "quoted", "reaction", "edited", "vote", "owner", "wasSentByApi", "track_id", "fileURL"]
CHAT_KEYS = ["wa_chatid", "wa_chatlid", "wa_fastid", "phone", "name", "wa_name", "wa_contactName", "wa_isGroup"]
EVENT_KEYS = ["MessageIDs", "Type", "Timestamp", "Chat", "IsFromMe", "MessageID", "ID"]
JIDISH = st.sampled_from(["5511988887777@s.whatsapp.net", "100000000000002:3@lid", "120363@g.us", "status@broadcast",
                          "1@newsletter", "5511999990000@s.whatsapp.net", "@", ":@", "x@lid", "5511:2"])
FIELD = JSON | JIDISH
ENVELOPES = st.fixed_dictionaries(
    {"EventType": st.sampled_from(["messages", "messages_update", "connection", "groups", "MESSAGES"]) | JSON},
    optional={
        "message": st.dictionaries(st.sampled_from(MESSAGE_KEYS), FIELD, max_size=10) | JSON,
        "chat": st.dictionaries(st.sampled_from(CHAT_KEYS), FIELD, max_size=6) | JSON,
        "event": st.dictionaries(st.sampled_from(EVENT_KEYS), FIELD, max_size=5) | JSON,
        "state": FIELD, "owner": FIELD, "token": FIELD, "instanceName": FIELD, "instance": JSON, "type": FIELD,
    },
)
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _normalizes_or_rejects(body: Any) -> None:
    try:
        ev = uazapi.normalize(body)
    except PayloadError:
        return
    out = ev.to_json()
    json.dumps(out, default=str)
    if isinstance(ev, MessageEvent):
        assert ev.sent_at.tzinfo is not None
        assert ev.lead_phone is None or ev.lead_phone.isdigit()
        assert ev.external_id and ":" not in ev.external_id
        assert ev.media is None or ev.media.url is None or "whatsapp.net" not in ev.media.url.lower()


@FUZZ
@given(ENVELOPES)
def test_fuzz_envelopes_never_raise_anything_but_payload_error(body: dict[str, Any]) -> None:
    _normalizes_or_rejects(body)


@FUZZ
@given(JSON)
def test_fuzz_any_json_value_never_raises_anything_but_payload_error(value: Any) -> None:
    _normalizes_or_rejects(value)


@FUZZ
@given(st.sampled_from(sorted(OWN.glob("*.json"))), st.sampled_from(MESSAGE_KEYS + CHAT_KEYS), FIELD)
def test_fuzz_one_field_of_a_real_fixture(path: Path, key: str, value: Any) -> None:
    body = load(path)
    target = body.get("body", body) if isinstance(body, dict) else body[0]["body"]
    section = "chat" if key in CHAT_KEYS else "message"
    if isinstance(target.get(section), dict):
        target[section] = copy.copy(target[section])
        target[section][key] = value
    _normalizes_or_rejects(body)


@FUZZ
@given(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzz_parse_body_raises_only_payload_error(raw: bytes) -> None:
    try:
        uazapi.parse_body(raw)
    except PayloadError as e:
        assert e.reason == "not_json"


# -- the command -------------------------------------------------------------------------------------------------------

def _whatrack(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "whatrack"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, encoding="utf-8", timeout=120,
                          check=False)


def test_cli_normalize_prints_one_json_line_per_file(fixtures_dir: Path) -> None:
    files = [fixtures_dir / "messages_inbound_text.json", fixtures_dir / "messages_update_delivered.json"]
    proc = _whatrack("normalize", *map(str, files))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == list(map(str, files))
    assert {k: lines[0][k] for k in ("event", "external_id", "direction", "type", "lead_phone", "is_group", "text",
                                     "sent_at", "edit_of", "reaction_to", "reply_to")} == {
        "event": "message", "external_id": "AC9D4D6FA3A84EEFAB04A47457DE47F7", "direction": "inbound",
        "type": "text", "lead_phone": MARIA, "is_group": False,
        "text": "Olá! Vi o anúncio no Instagram, qual o preço do plano anual?", "sent_at": "2026-01-01T10:00:00Z",
        "edit_of": None, "reaction_to": None, "reply_to": None}
    assert {k: lines[1][k] for k in ("event", "external_ids", "status")} == {
        "event": "receipt", "external_ids": ["AC50672C2A7D402531939B558A7D2C5B"], "status": "delivered"}
    assert TOKEN not in proc.stdout + proc.stderr


def test_cli_normalize_reports_bad_files_and_exits_1(fixtures_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'{"EventType": "messages", ')
    good = fixtures_dir / "connection_connected.json"
    missing = fixtures_dir / "messages_malformed_missing_messageid.json"
    proc = _whatrack("normalize", str(broken), str(good), str(missing))
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(line["file"], line["event"]) for line in lines] == [
        (str(broken), "error"), (str(good), "instance"), (str(missing), "error")]
    assert lines[0]["error"].startswith("not_json: ")
    assert lines[2]["error"].startswith("no_message_id: ")


def test_cli_output_round_trips_unicode_and_lone_surrogates(fixtures_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    body = load(fixtures_dir / "messages_inbound_text.json")
    text = "ação 👋 \u0000 \ud800 fim"
    body["message"]["text"] = text
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(body), encoding="ascii")  # \ud800 travels as a JSON escape, as it may on the wire
    assert uazapi_cli._cmd_normalize(argparse.Namespace(paths=[str(path)])) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["text"] == text
