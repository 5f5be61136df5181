"""Fallback normalizer for Evolution API v2 ``messages.upsert`` webhooks (protocols/uazapi.md §15, fixture §17).

Not UAZAPI: a webhook from an Evolution server pointed at our endpoint by mistake still maps to the same
:class:`~whatrack.events.MessageEvent` rather than being dropped. Pure, no I/O; other Evolution events are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from whatrack.errors import PayloadError
from whatrack.events import Event, Ignored, Location, Media, MessageEvent, Source
from whatrack.uazapi.fields import (
    MAX_ID_CHARS,
    as_bool,
    as_dict,
    as_float,
    as_int,
    as_str,
    as_text,
    bare_id,
    bare_jid,
    phone_digits,
    pn_jid,
    skip_reason,
    timestamp,
)

#: Evolution ``messageType`` (the key under ``data.message``, camelCase) → our type.
EVOLUTION_TYPES: Mapping[str, str] = {
    "conversation": "text", "extendedTextMessage": "text", "imageMessage": "image", "videoMessage": "video",
    "audioMessage": "audio", "documentMessage": "document", "documentWithCaptionMessage": "document",
    "stickerMessage": "sticker", "locationMessage": "location", "liveLocationMessage": "location",
    "contactMessage": "contact", "contactsArrayMessage": "contact", "reactionMessage": "reaction",
    "pollCreationMessage": "poll", "pollCreationMessageV3": "poll", "pollUpdateMessage": "poll_vote",
    "listResponseMessage": "list_response", "buttonsResponseMessage": "button_response",
}
_MEDIA = frozenset({"image", "video", "audio", "document", "sticker"})


def normalize_evolution(env: Mapping[str, Any], *, received_at: datetime | None = None) -> Event:
    """``{event: "messages.upsert", instance, data: {key, message, ...}, sender, apikey}`` → a message event.

    Raises:
        PayloadError: ``no_message_id`` without ``data.key.id``; ``no_chat_id`` without ``data.key.remoteJid``.
    """
    name = str(env.get("event")).strip().lower()
    data = as_dict(env.get("data"))
    owner = phone_digits(pn_jid(env.get("sender")))  # Evolution's envelope `sender` is the instance's own JID
    source = Source(instance_name=as_str(env.get("instance")), owner=owner, token=as_str(env.get("apikey")))
    if name != "messages.upsert":
        return Ignored(source, f"unsupported_event_type: Evolution {name[:60]!r}")
    key = as_dict(data.get("key"))
    external_id = bare_id(key.get("id"))
    if not external_id or len(external_id) > MAX_ID_CHARS:
        raise PayloadError("no_message_id", "an Evolution messages.upsert without a usable data.key.id can never be "
                           "stored (this delivery goes to the DLQ)")
    remote = as_str(key.get("remoteJid"))
    if remote is None or "@" not in remote:
        raise PayloadError("no_chat_id", f"Evolution message {external_id} has no data.key.remoteJid (this delivery "
                           "goes to the DLQ)")
    chat_jid = bare_jid(remote)
    skip = skip_reason(chat_jid)
    if skip:
        return Ignored(source, skip)
    from_me = as_bool(key.get("fromMe"))
    server = chat_jid.rpartition("@")[2].lower()
    is_group = server == "g.us"
    if is_group:
        lead_jid, lead_phone, lead_name = chat_jid, None, None
        participant = None if from_me else phone_digits(pn_jid(key.get("participantAlt")) or pn_jid(
            key.get("participant")))
    else:
        lead_jid = (pn_jid(key.get("remoteJidAlt")) or chat_jid) if server == "lid" else chat_jid
        lead_phone = phone_digits(pn_jid(lead_jid))
        if owner and lead_phone == owner:
            return Ignored(source, "self_chat: a note to the instance's own number")
        lead_name = None if from_me else as_str(data.get("pushName"))
        participant = None

    msg = as_dict(data.get("message"))
    raw_type = as_str(data.get("messageType")) or next((k for k in msg if k in EVOLUTION_TYPES), None)
    msg_type = EVOLUTION_TYPES.get(raw_type or "", "unknown")
    body = as_dict(msg.get(raw_type)) if raw_type else as_dict(None)
    text = as_text(msg.get("conversation")) or as_text(body.get("text")) or as_text(body.get("caption"))
    sent_at = timestamp(data.get("messageTimestamp")) or received_at or datetime.now(UTC)
    return MessageEvent(
        source=source, external_id=external_id, provider_id=f"{owner}:{external_id}" if owner else external_id,
        direction="outbound" if from_me else "inbound", type=msg_type, raw_type=raw_type, chat_jid=chat_jid,
        lead_jid=lead_jid, lead_phone=lead_phone, lead_name=lead_name, is_group=is_group, group_name=None,
        participant_phone=participant, text=text or "", sent_at=sent_at,
        reaction_to=bare_id(as_dict(body.get("key")).get("id")) if msg_type == "reaction" else None,
        reply_to=bare_id(as_dict(body.get("contextInfo")).get("stanzaId")),
        media=Media(
            mime_type=as_str(body.get("mimetype")), size_bytes=as_int(body.get("fileLength")),
            duration_seconds=as_int(body.get("seconds")), file_name=as_text(body.get("fileName")),
            sha256=as_str(body.get("fileSha256")), width=as_int(body.get("width")),
            height=as_int(body.get("height")), voice=as_bool(body.get("ptt")),
        ) if msg_type in _MEDIA else None,
        location=Location(
            latitude=as_float(body.get("degreesLatitude")), longitude=as_float(body.get("degreesLongitude")),
            name=as_text(body.get("name")), address=as_text(body.get("address")),
        ) if msg_type == "location" else None,
    )
