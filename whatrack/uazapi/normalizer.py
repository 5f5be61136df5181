"""The UAZAPI webhook normalizer: raw body in, one typed event out (pure, no I/O); ``whatrack normalize`` is in
:mod:`whatrack.uazapi.cli`.

``parse_body`` decodes and unwraps (n8n wrappers, the legacy ``{event, instance, data}`` form); ``normalize`` maps the
flat ``EventType`` envelope to the dataclasses of :mod:`whatrack.events`. Field meanings, and why each rule is what it
is, are in ``protocols/uazapi.md`` (section numbers cited below). Every key is optional and every value may have the
wrong type: on any JSON input the only exception raised is :class:`~whatrack.errors.PayloadError`.

The send client lives in :mod:`whatrack.uazapi.client`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from whatrack.errors import PayloadError
from whatrack.events import (
    Event,
    Ignored,
    InstanceEvent,
    Location,
    Media,
    MessageEvent,
    ReceiptEvent,
    Source,
)
from whatrack.uazapi.evolution import normalize_evolution
from whatrack.uazapi.fields import (
    EMPTY,
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

__all__ = ["normalize", "parse_body", "unwrap"]

log = logging.getLogger("whatrack.uazapi.normalizer")

#: UAZAPI ``messageType`` (PascalCase, §5) → our type. Unknown values become "unknown" and keep their text.
MESSAGE_TYPE_MAP: Mapping[str, str] = {
    "Conversation": "text",
    "ExtendedTextMessage": "text",
    "ImageMessage": "image",
    "VideoMessage": "video",
    "PtvMessage": "video",
    "AudioMessage": "audio",
    "DocumentMessage": "document",
    "DocumentWithCaptionMessage": "document",
    "StickerMessage": "sticker",
    "LocationMessage": "location",
    "LiveLocationMessage": "location",
    "ContactMessage": "contact",
    "ContactsArrayMessage": "contact",
    "ReactionMessage": "reaction",
    "PollCreationMessage": "poll",
    "PollCreationMessageV2": "poll",
    "PollCreationMessageV3": "poll",
    "PollUpdateMessage": "poll_vote",
    "ListResponseMessage": "list_response",
    "ButtonsResponseMessage": "button_response",
    "TemplateButtonReplyMessage": "button_response",
}

#: Used only when ``messageType`` is absent: UAZAPI's ``mediaType`` (§2.2) → our type.
MEDIA_TYPE_MAP: Mapping[str, str] = {
    "image": "image", "video": "video", "gif": "video", "ptv": "video", "ptt": "audio", "audio": "audio",
    "myaudio": "audio", "document": "document", "location": "location", "vcard": "contact",
    "list_response": "list_response", "sticker": "sticker", "user_created_sticker": "sticker",
    "1p_sticker": "sticker",
}

_MEDIA_TYPES = frozenset({"image", "video", "audio", "document", "sticker"})
# Types whose chosen option is in ``message.vote`` rather than ``message.text`` (§2.2, §10).
_VOTE_TYPES = frozenset({"poll_vote", "list_response", "button_response"})

#: ``messages_update`` states (``state``, ``event.Type``, ``message.status``; §9) → our status names.
RECEIPT_STATUS_MAP: Mapping[str, str] = {
    "pending": "pending", "queued": "pending",
    "sent": "sent", "serverack": "sent", "server_ack": "sent",
    "delivered": "delivered", "delivery": "delivered", "delivery_ack": "delivered", "received": "delivered",
    "read": "read", "readreceipt": "read", "read_self": "read", "read-self": "read",
    "played": "played", "played_self": "played", "played-self": "played",
    "deleted": "deleted", "revoked": "deleted", "revoke": "deleted",
    "failed": "failed", "error": "failed", "server-error": "failed", "canceled": "failed", "cancelled": "failed",
}

# The legacy form's event names (spec's WebhookEvent, §1/§13) → the wire EventType.
_LEGACY_EVENTS: Mapping[str, str] = {
    "message": "messages", "messages": "messages", "status": "messages_update",
    "messages_update": "messages_update", "connection": "connection", "group": "groups", "groups": "groups",
}

# How many wrappers (n8n array, n8n body, legacy) unwrap() peels at most: real bodies have two at most.
_MAX_WRAPPERS = 4
# Hosts whose URLs are encrypted WhatsApp CDN blobs (§7): never a usable Media.url.
_CDN_HOST = re.compile(r"^https?://[^/?#]*whatsapp\.net(?:[:/?#]|$)", re.IGNORECASE)
# Enough of an unknown EventType to say what it was, without echoing a huge value into logs.
_MAX_ECHO = 60


# -- decoding and unwrapping ------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


#: msgspec's JSON decoder: 5.4 us for a 3 KB message body where ``json.loads`` takes 13.3 (``parse_body`` was 11 % of
#: the endpoint's py-spy samples at saturation). It is stricter than the standard library, never looser: whatever it
#: refuses (a UTF-8 BOM, a lone surrogate escape, ``1e400``, NaN, an integer of more than 4,300 digits) goes to
#: ``json.loads``, which decides as before; what it accepts it reads to the same values, big integers included
#: (orjson reads those as floats). ``tests/test_uazapi.py`` checks the two agree on generated documents, numbers and
#: bytes.
_FAST_JSON = msgspec.json.Decoder()


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a raw webhook body (UTF-8 JSON) and unwrap it to the flat UAZAPI envelope.

    Raises:
        PayloadError: ``not_json`` when the body is not UTF-8, not JSON, or not (after unwrapping) one JSON object.
    """
    try:
        obj = _FAST_JSON.decode(raw)
    except (msgspec.MsgspecError, RecursionError):  # the standard library decides, and words the error
        obj = _loads(raw)
    return unwrap(obj)


def _loads(raw: bytes) -> Any:
    """``raw`` as ``json.loads`` reads it (after a UTF-8 decode that drops a BOM); the errors as PayloadError."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PayloadError("not_json", f"body is not UTF-8 (byte {e.start}): send UTF-8 encoded JSON") from e
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as e:
        raise PayloadError("not_json", "body is nested too deeply to decode") from e
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers too long to convert
        raise PayloadError("not_json", f"body is not valid JSON ({_clip(str(e))}): send one JSON object") from e
    return obj


def unwrap(obj: Any) -> dict[str, Any]:
    """Peel the wrappers around a UAZAPI envelope: ``[{...}]``, n8n's ``{"body": {...}, "webhookUrl": ...}``, and the
    legacy ``{event, instance, data}`` form (§13). A flat envelope comes back as the same object (no copy).

    Raises:
        PayloadError: ``not_json`` when what is left is not a single JSON object.
    """
    for _ in range(_MAX_WRAPPERS):
        if isinstance(obj, list):
            if len(obj) != 1:
                raise PayloadError("not_json", f"body is a JSON array of {len(obj)} items: send one webhook object "
                                   "(or an n8n-style array holding exactly one)")
            obj = obj[0]
            continue
        if not isinstance(obj, dict):
            raise PayloadError("not_json", f"body is a JSON {_json_type(obj)}, not an object: send the webhook "
                               "object UAZAPI posts")
        if "EventType" in obj:
            return obj
        inner = obj.get("body")
        if isinstance(inner, (dict, list)):
            obj = inner
            continue
        if isinstance(obj.get("event"), str) and "data" in obj:
            return _from_legacy(obj)
        return obj
    raise PayloadError("not_json", f"body is wrapped more than {_MAX_WRAPPERS} levels deep")


def _from_legacy(obj: dict[str, Any]) -> dict[str, Any]:
    """``{event, instance, data, owner?, token?}`` → the flat envelope (shallow: the values are not copied)."""
    name = obj["event"].strip()
    if "." in name:  # Evolution API ("messages.upsert"): a different provider, normalized on its own.
        return obj
    event_type = _LEGACY_EVENTS.get(name.lower(), name)
    env = {k: v for k, v in obj.items() if k not in ("event", "data", "instance")}
    env["EventType"] = event_type
    instance, data = obj.get("instance"), obj.get("data")
    if isinstance(instance, str):
        env.setdefault("instanceName", instance)
    if isinstance(data, dict):
        if "EventType" in data or "message" in data or "chat" in data:
            env.update((k, v) for k, v in data.items() if k != "EventType")
        elif event_type == "messages":
            env["message"] = data
        elif event_type == "connection":
            env["instance"] = data
        else:
            env["event"] = data
    return env


# -- normalization ----------------------------------------------------------------------------------------------------


def normalize(body: Mapping[str, Any], *, received_at: datetime | None = None) -> Event:
    """Turn one webhook envelope into its event. Pure: the same input always gives the same output.

    Args:
        body: the decoded webhook (``parse_body``'s result; wrappers are peeled again if present).
        received_at: when the webhook arrived: the ``sent_at`` of a message that carries no usable timestamp
            (defaults to now).

    Raises:
        PayloadError: ``no_message_id`` for a ``messages`` event without ``messageid``/``id``; ``no_chat_id`` for
            one that names no chat at all; ``not_json`` when ``body`` is not an object.
    """
    env = body if isinstance(body, dict) and "EventType" in body else unwrap(body)
    event_type = env.get("EventType")
    if event_type is None and isinstance(env.get("event"), str) and "." in env["event"]:
        return normalize_evolution(env, received_at=received_at)
    source = _source(env)
    kind = event_type.strip().lower() if isinstance(event_type, str) else None
    if kind == "messages":
        return _message(env, source, received_at)
    if kind == "messages_update":
        return _receipt(env, source)
    if kind == "connection":
        return _instance(env, source)
    if kind == "newsletter_messages":
        return Ignored(source, "newsletter: channel posts are not conversations")
    if event_type is None:
        return Ignored(source, "missing_event_type: the body has no EventType")
    shown = _clip(repr(event_type)) if isinstance(event_type, (str, int, float)) else f"a JSON {_json_type(event_type)}"
    return Ignored(source, f"unsupported_event_type: {shown}")


def _source(env: Mapping[str, Any]) -> Source:
    inst = env.get("instance")
    name = as_str(env.get("instanceName")) or (as_str(inst.get("name")) if isinstance(inst, dict) else None)
    msg = as_dict(env.get("message"))
    owner = phone_digits(as_str(env.get("owner")) or as_str(msg.get("owner")))
    return Source(instance_name=name, owner=owner, token=as_str(env.get("token")))


def _message(env: Mapping[str, Any], source: Source, received_at: datetime | None) -> MessageEvent | Ignored:
    m, chat = as_dict(env.get("message")), as_dict(env.get("chat"))
    full_id = as_str(m.get("id"))
    external_id = bare_id(m.get("messageid")) or bare_id(full_id)
    if not external_id:
        raise PayloadError("no_message_id", "a 'messages' webhook without message.messageid or message.id can never "
                           "be stored: UAZAPI must send the message id (this delivery goes to the DLQ)")
    if len(external_id) > MAX_ID_CHARS:
        raise PayloadError("bad_message_id", f"message id {_clip(external_id)!r} is {len(external_id)} characters "
                           f"long; WhatsApp ids are at most {MAX_ID_CHARS} (this delivery goes to the DLQ)")
    owner = source.owner or phone_digits(as_str(chat.get("owner")))
    if full_id and full_id.endswith(":" + external_id):
        provider_id = full_id
    else:
        provider_id = f"{owner}:{external_id}" if owner else external_id

    from_me = as_bool(m.get("fromMe"))
    chat_jid = _chat_jid(m, chat, from_me)
    if chat_jid is None:
        raise PayloadError("no_chat_id", f"message {external_id} names no chat (message.chatid, chat.wa_chatid): "
                           "it cannot be attached to a conversation (this delivery goes to the DLQ)")
    skip = skip_reason(chat_jid)
    if skip:
        return Ignored(source, skip)
    server = chat_jid.rpartition("@")[2].lower()
    is_group = server == "g.us" or (server not in ("s.whatsapp.net", "c.us", "lid")
                                    and (as_bool(m.get("isGroup")) or as_bool(chat.get("wa_isGroup"))))

    if is_group:
        lead_jid, lead_phone = chat_jid, None
        group_name = _group_name(m, chat)
        lead_name = group_name
        participant = None if from_me else (phone_digits(pn_jid(m.get("sender_pn")))
                                            or phone_digits(pn_jid(m.get("sender"))))
    else:
        lead_jid = _lead_jid(chat_jid, server, m, chat, from_me)
        if owner and _is_self_chat(chat_jid, lead_jid, server, m, owner, from_me):
            return Ignored(source, "self_chat: a note to the instance's own number")
        lead_phone = phone_digits(pn_jid(lead_jid)) or phone_digits(as_str(chat.get("phone")))
        group_name, participant = None, None
        lead_name = (as_str(chat.get("wa_contactName")) or as_str(chat.get("name")) or as_str(chat.get("wa_name"))
                     or (None if from_me else as_str(m.get("senderName"))))

    raw_type = as_str(m.get("messageType"))
    msg_type = _message_type(raw_type, m)
    content = m.get("content")
    cdict = content if isinstance(content, dict) else EMPTY
    sent_at = timestamp(m.get("messageTimestamp"))
    if sent_at is None:
        sent_at = received_at or datetime.now(UTC)
        log.warning("message %s has no usable messageTimestamp: using the receive time", external_id)
    return MessageEvent(
        source=source, external_id=external_id, provider_id=provider_id,
        direction="outbound" if from_me else "inbound", type=msg_type, raw_type=raw_type,
        chat_jid=chat_jid, lead_jid=lead_jid, lead_phone=lead_phone, lead_name=lead_name,
        is_group=is_group, group_name=group_name, participant_phone=participant,
        text=_text(m, content, cdict, msg_type), sent_at=sent_at,
        edit_of=bare_id(m.get("edited")),
        reaction_to=bare_id(m.get("reaction")) or (bare_id(as_dict(cdict.get("key")).get("ID"))
                                                    if msg_type == "reaction" else None),
        reply_to=bare_id(m.get("quoted")) or bare_id(as_dict(cdict.get("contextInfo")).get("stanzaID")),
        media=_media(m, cdict) if msg_type in _MEDIA_TYPES else None,
        location=_location(cdict) if msg_type == "location" else None,
        sent_by_api=as_bool(m.get("wasSentByApi")), track_id=as_str(m.get("track_id")),
    )


def _chat_jid(m: Mapping[str, Any], chat: Mapping[str, Any], from_me: bool) -> str | None:
    """The conversation: the chat's JID, never the sender of an outbound message (§3)."""
    candidates = [m.get("chatid"), chat.get("wa_chatid"), m.get("chatlid"), chat.get("wa_chatlid")]
    if not from_me and not as_bool(m.get("isGroup")):
        candidates += [m.get("sender_pn"), m.get("sender")]  # inbound direct: the sender is the chat
    for value in candidates:
        s = as_str(value)
        if s is None:
            continue
        if "@" in s:
            jid = bare_jid(s)
            user, _, server = jid.partition("@")
            if user and server:
                return jid
        elif s.lstrip("+").replace(" ", "").replace("-", "").isdigit() and s.isascii():
            return f"{phone_digits(s)}@s.whatsapp.net"  # a bare phone number instead of a JID
    return None


def _lead_jid(chat_jid: str, server: str, m: Mapping[str, Any], chat: Mapping[str, Any], from_me: bool) -> str:
    """A direct chat's lead JID; a LID chat resolves to the phone JID when the payload knows it (§13, §14)."""
    if server != "lid":
        return chat_jid
    pn = pn_jid(chat.get("wa_chatid"))
    if pn is None:
        fast = as_str(chat.get("wa_fastid"))  # "<owner>:<counterpart digits>"
        tail = fast.rpartition(":")[2] if fast and ":" in fast else None
        # In a LID-only chat the fastid may carry the LID's digits: those are not a phone number.
        lids = (chat_jid.partition("@")[0], bare_jid(as_str(chat.get("wa_chatlid")) or "").partition("@")[0])
        if tail and tail.isdigit() and tail.isascii() and tail not in lids:
            pn = f"{tail}@s.whatsapp.net"
    if pn is None and not from_me:
        pn = pn_jid(m.get("sender_pn"))
    return pn or chat_jid


def _is_self_chat(chat_jid: str, lead_jid: str, server: str, m: Mapping[str, Any], owner: str, from_me: bool) -> bool:
    if phone_digits(pn_jid(lead_jid)) == owner:
        return True
    # A LID chat with the owner's own LID: only an outbound message tells us the owner's LID (sender_lid).
    return server == "lid" and from_me and chat_jid == bare_jid(as_str(m.get("sender_lid")) or "")


def _group_name(m: Mapping[str, Any], chat: Mapping[str, Any]) -> str | None:
    name = as_str(m.get("groupName"))
    if name == "Unknown":  # UAZAPI's placeholder for "not a group" (§2.2)
        name = None
    return name or as_str(chat.get("name")) or as_str(chat.get("wa_name"))


def _message_type(raw_type: str | None, m: Mapping[str, Any]) -> str:
    if raw_type is not None:
        return MESSAGE_TYPE_MAP.get(raw_type, "unknown")
    media_type = as_str(m.get("mediaType"))
    if media_type is not None:
        return MEDIA_TYPE_MAP.get(media_type.lower(), "unknown")
    simple = as_str(m.get("type"))
    return simple.lower() if simple and simple.lower() in ("text", "reaction") else "unknown"


def _text(m: Mapping[str, Any], content: Any, cdict: Mapping[str, Any], msg_type: str) -> str:
    """§6: message.text, then a string content, then content.text, then content.caption; kept verbatim."""
    text = as_text(m.get("text"))
    if text is None and msg_type in _VOTE_TYPES:
        text = as_text(m.get("vote"))
    if text is None and isinstance(content, str) and content:
        text = content
    if text is None:
        text = as_text(cdict.get("text")) or as_text(cdict.get("caption"))
    if text is None and msg_type == "contact":
        text = as_text(cdict.get("displayName"))
    return text or ""


def _media(m: Mapping[str, Any], c: Mapping[str, Any]) -> Media:
    """§7: metadata only. The encrypted ``content.URL`` is never a usable URL; ``fileURL`` is, once downloaded."""
    media_type = (as_str(m.get("mediaType")) or "").lower()
    url = as_str(m.get("fileURL"))
    if url is not None and (not url.lower().startswith(("https://", "http://")) or _CDN_HOST.match(url)
                            or url.partition("?")[0].lower().endswith(".enc")):
        url = None
    return Media(
        mime_type=as_str(c.get("mimetype")),
        size_bytes=as_int(c.get("fileLength")),
        duration_seconds=as_int(c.get("seconds")),
        file_name=as_text(c.get("fileName")),
        sha256=as_str(c.get("fileSHA256")),
        width=as_int(c.get("width")),
        height=as_int(c.get("height")),
        voice=as_bool(c.get("PTT")) or media_type == "ptt",
        url=url,
    )


def _location(c: Mapping[str, Any]) -> Location:
    lat, lng = as_float(c.get("degreesLatitude")), as_float(c.get("degreesLongitude"))
    return Location(
        latitude=lat if lat is not None and -90.0 <= lat <= 90.0 else None,
        longitude=lng if lng is not None and -180.0 <= lng <= 180.0 else None,
        name=as_text(c.get("name")),
        address=as_text(c.get("address")),
    )


def _receipt(env: Mapping[str, Any], source: Source) -> ReceiptEvent | Ignored:
    """§9: one status applied to every id of the batch; a delete when any status field says so."""
    ev, msg = as_dict(env.get("event")), as_dict(env.get("message"))
    candidates = [as_str(env.get("state")), as_str(ev.get("Type")), as_str(msg.get("status"))]
    statuses = [RECEIPT_STATUS_MAP.get(c.lower()) for c in candidates if c]
    if "deleted" in statuses:
        status: str | None = "deleted"
    else:
        status = next((s for s in statuses if s), None)
    if status is None:
        named = next((c for c in candidates if c), None)
        if named and named.lower() == "filedownloaded":
            return Ignored(source, "file_downloaded: a media download notice, not a status change")
        what = _clip(repr(named)) if named else "none"
        return Ignored(source, f"unsupported_receipt_status: {what}")
    ids: list[str] = []
    raw_ids = ev.get("MessageIDs")
    for raw in (raw_ids if isinstance(raw_ids, list) else [raw_ids, ev.get("MessageID"), ev.get("ID")]):
        mid = bare_id(raw)
        if mid and mid not in ids:
            ids.append(mid)
    if not ids:
        mid = bare_id(msg.get("messageid")) or bare_id(msg.get("id"))
        if mid:
            ids.append(mid)
    if not ids:
        return Ignored(source, f"receipt_without_ids: a {status!r} update that names no message")
    chat = as_str(ev.get("Chat")) or as_str(msg.get("chatid"))
    at = timestamp(ev.get("Timestamp"))
    if at is None:
        at = timestamp(msg.get("messageTimestamp"))
    return ReceiptEvent(source=source, external_ids=tuple(ids), status=status, at=at,
                        chat_jid=bare_jid(chat) if chat else None)


def _instance(env: Mapping[str, Any], source: Source) -> InstanceEvent:
    inst = as_dict(env.get("instance"))
    status = as_str(inst.get("status")) or as_str(env.get("status")) or "unknown"
    reason = as_text(inst.get("lastDisconnectReason")) or as_str(env.get("type"))
    return InstanceEvent(source=source, status=status.lower(), reason=reason)


def _json_type(obj: Any) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, (int, float)):
        return "number"
    return "string" if isinstance(obj, str) else type(obj).__name__


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."
