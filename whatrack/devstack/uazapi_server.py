"""The UAZAPI (uazapiGO v2) send API the follow-up worker uses, recording every send and echoing it as a webhook.

``POST /send/text`` (header ``token``, body ``{"number", "text", ...}``) answers with the sent message (``id`` =
``owner:messageid``, ``messageid``, ``chatid``, ``fromMe``, ``wasSentByApi``, ...), then, as the real service's
webhook does, posts the outbound message as a ``fromMe`` ``messages`` webhook through QStash
(``POST {QSTASH_URL}/v2/publish/{WEBHOOK_PUBLIC_URL}``, official ``qstash`` client), retrying as UAZAPI does.

Development endpoints (outside UAZAPI's API): ``GET /_dev/sends`` (every attempt, in order; ``DELETE`` clears),
``POST /_dev/fail?count=N&status=503`` (the next N sends fail with that status), ``GET /_dev/health``.

Instances (name, token, owner) come from ``--instance NAME:TOKEN:OWNER`` or, to keep tokens out of ``ps``, from
the ``WHATRACK_UAZAPI_INSTANCES`` environment variable (``NAME:TOKEN:OWNER`` entries separated by commas).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("whatrack.devstack.uazapi_server")

#: UAZAPI reports 3 attempts per webhook delivery (protocols/uazapi.md §12); the backoff is undocumented.
ECHO_ATTEMPTS = 3
ECHO_BACKOFF_S = 0.5
BASE_URL_DEFAULT = "https://example.uazapi.com"
#: A phone in E.164 digits (7 to 15), or a JID: phone / LID / group ids are digits (and a dash in old groups).
_NUMBER = re.compile(r"^\d{7,15}$")
_JID = re.compile(r"^[\d-]{5,40}@(s\.whatsapp\.net|lid|g\.us)$")


@dataclass(frozen=True)
class Instance:
    """A connected WhatsApp number: its name, API token and owner phone (digits)."""

    name: str
    token: str
    owner: str

    def __repr__(self) -> str:
        return f"Instance(name={self.name!r}, token='********', owner={self.owner!r})"


def parse_instances(spec: str) -> list[Instance]:
    """``NAME:TOKEN:OWNER[,NAME:TOKEN:OWNER...]`` → instances.

    Raises:
        ValueError: a malformed entry (the message shows the expected form, never the token).
    """
    out: list[Instance] = []
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if len(parts) != 3 or not all(parts) or not parts[2].isdigit():
            raise ValueError(f"instance entry #{len(out) + 1} is malformed: use NAME:TOKEN:OWNER (owner in digits)")
        out.append(Instance(*parts))
    return out


def new_message_id() -> str:
    """A WhatsApp id as web/API clients make them: ``3EB0`` + 18 upper-case hex characters (22 in all)."""
    return "3EB0" + secrets.token_hex(9).upper()


def chat_jid(number: str) -> str | None:
    """The chat a send goes to: a JID as given, or a phone (any formatting) as ``<digits>@s.whatsapp.net``;
    None when it is neither."""
    if "@" in number:
        return number if _JID.match(number) else None
    digits = re.sub(r"\D", "", number)
    return f"{digits}@s.whatsapp.net" if _NUMBER.match(digits) else None


def outbound_echo(instance: Instance, *, chatid: str, text: str, messageid: str, timestamp_ms: int,
                  base_url: str, track_source: str = "", track_id: str = "") -> dict[str, Any]:
    """The ``messages`` webhook UAZAPI sends for a message sent through its API: shaped like the
    ``messages_outbound_text_fromme.json`` fixture, with ``wasSentByApi: true``. Pure."""
    number = chatid.split("@", 1)[0]
    group = chatid.endswith("@g.us")
    owner_jid = f"{instance.owner}@s.whatsapp.net"
    chat = {
        "chatbot_agentResetMemoryAt": 0, "chatbot_disableUntil": 0, "chatbot_lastTriggerAt": 0,
        "chatbot_lastTrigger_id": "", "id": "r" + secrets.token_hex(7), "image": "", "imagePreview": "",
        "lead_assignedAttendant_id": "", "lead_email": "",
        **{f"lead_field{i:02d}": "" for i in range(1, 21)},
        "lead_fullName": "", "lead_isTicketOpen": False, "lead_kanbanOrder": 0, "lead_name": "", "lead_notes": "",
        "lead_personalid": "", "lead_status": "", "lead_tags": [], "name": "", "owner": instance.owner,
        "phone": "" if group else number, "wa_archived": False, "wa_chatid": chatid, "wa_chatlid": "",
        "wa_contactName": "",
        "wa_ephemeralExpiration": 0, "wa_fastid": f"{instance.owner}:{number}", "wa_isBlocked": False,
        "wa_isGroup": group, "wa_isGroup_admin": False, "wa_isGroup_announce": False, "wa_isGroup_community": False,
        "wa_isGroup_member": False, "wa_isPinned": False, "wa_label": [], "wa_lastMessageSender": owner_jid,
        "wa_lastMessageTextVote": text, "wa_lastMessageType": "Conversation", "wa_lastMsgTimestamp": timestamp_ms,
        "wa_muteEndTime": 0, "wa_name": "", "wa_unreadCount": 0,
    }
    message = {
        "buttonOrListid": "", "chatid": chatid, "chatlid": "", "content": text, "convertOptions": "", "edited": "",
        "fromMe": True, "groupName": "" if group else "Unknown", "id": f"{instance.owner}:{messageid}",
        "isGroup": group,
        "mediaType": "", "messageTimestamp": timestamp_ms, "messageType": "Conversation", "messageid": messageid,
        "owner": instance.owner, "quoted": "", "reaction": "", "sender": owner_jid, "senderName": instance.name,
        "sender_lid": "", "sender_pn": owner_jid, "source": "api", "status": "Sent", "text": text,
        "track_id": track_id, "track_source": track_source, "type": "text", "vote": "", "wasSentByApi": True,
    }
    return {"BaseUrl": base_url, "EventType": "messages", "chat": chat, "chatSource": "updated",
            "instanceName": instance.name, "message": message, "owner": instance.owner, "token": instance.token}


class Uazapi:
    """The send API's state: instances, recorded sends, pending failures, and the QStash publisher."""

    def __init__(self, instances: list[Instance], *, qstash_url: str | None = None, qstash_token: str | None = None,
                 webhook_url: str | None = None, base_url: str = BASE_URL_DEFAULT) -> None:
        self.instances = {i.token: i for i in instances}
        self.base_url = base_url
        self.webhook_url = webhook_url
        self.sends: list[dict[str, Any]] = []
        self._seq = itertools.count(1)
        self.fail_count = 0
        self.fail_status = 503
        self._tasks: set[asyncio.Task[None]] = set()
        self.qstash: Any = None
        if qstash_url and qstash_token and webhook_url:
            from qstash import AsyncQStash

            self.qstash = AsyncQStash(qstash_token, base_url=qstash_url, retry=False)

    def _instance(self, request: Request) -> Instance | None:
        given = request.headers.get("token", "")
        for token, inst in self.instances.items():
            if given and hmac.compare_digest(given.encode(), token.encode()):
                return inst
        return None

    async def send_text(self, request: Request) -> Response:
        inst = self._instance(request)
        if inst is None:
            return JSONResponse({"error": "Invalid token: send the instance token in the 'token' header"}, 401)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "the body is not JSON: send {\"number\": \"5511...\", \"text\": \"...\"}"},
                                400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object with number and text"}, 400)
        chatid = chat_jid(str(body.get("number", "")).strip())
        text = body.get("text")
        if chatid is None:
            return JSONResponse({"error": "number is missing or not a phone number or JID: use digits with the "
                                          "country code, e.g. 5511988887777, or a JID such as ...@s.whatsapp.net"},
                                400)
        number = chatid.split("@", 1)[0]
        if not isinstance(text, str) or not text:
            return JSONResponse({"error": "text is missing or empty"}, 400)
        record: dict[str, Any] = {"seq": next(self._seq), "instance": inst.name, "number": number, "text": text,
                                  "track_source": str(body.get("track_source", "")),
                                  "track_id": str(body.get("track_id", "")), "at_ms": int(time.time() * 1000)}
        if self.fail_count > 0:
            self.fail_count -= 1
            record.update(ok=False, status=self.fail_status)
            self.sends.append(record)
            log.info("send #%d failed on purpose with %d", record["seq"], self.fail_status)
            return JSONResponse({"error": f"injected failure ({self.fail_status})"}, self.fail_status)
        messageid = new_message_id()
        ts = record["at_ms"]
        echo = outbound_echo(inst, chatid=chatid, text=text, messageid=messageid, timestamp_ms=ts,
                             base_url=self.base_url, track_source=record["track_source"],
                             track_id=record["track_id"])
        record.update(ok=True, status=200, messageid=messageid, id=echo["message"]["id"],
                      echo="pending" if self.qstash else "disabled")
        self.sends.append(record)
        if self.qstash:
            task = asyncio.create_task(self._echo(record, echo))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        log.info("send #%d to %s recorded as %s", record["seq"], number, messageid)
        response = dict(echo["message"])
        return JSONResponse(response)

    async def _echo(self, record: dict[str, Any], payload: dict[str, Any]) -> None:
        for attempt in range(1, ECHO_ATTEMPTS + 1):
            try:
                res = await self.qstash.message.publish_json(url=self.webhook_url, body=payload)
                record.update(echo="published", qstash_message_id=res.message_id, echo_attempts=attempt)
                return
            except Exception as e:  # any failure: retry as UAZAPI does, then record it
                record.update(echo="failed", echo_error=type(e).__name__, echo_attempts=attempt)
                log.warning("echo of send #%d failed (attempt %d): %s", record["seq"], attempt, type(e).__name__)
                await asyncio.sleep(ECHO_BACKOFF_S * attempt)

    async def dev_sends(self, request: Request) -> Response:
        if request.method == "DELETE":  # a test starting from a clean record
            self.sends.clear()
        return JSONResponse({"sends": self.sends})

    async def dev_fail(self, request: Request) -> Response:
        try:
            count = int(request.query_params.get("count", "1"))
            status = int(request.query_params.get("status", "503"))
        except ValueError:
            return JSONResponse({"error": "count and status must be integers: /_dev/fail?count=2&status=503"}, 400)
        if count < 0 or not 400 <= status <= 599:
            return JSONResponse({"error": "count must be >= 0 and status a 4xx or 5xx code"}, 400)
        self.fail_count, self.fail_status = count, status
        return JSONResponse({"fail_count": count, "status": status})

    async def dev_health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "instances": len(self.instances)})

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.qstash is not None:
            with contextlib.suppress(Exception):
                await self.qstash.http._client.aclose()


def create_app(instances: list[Instance], **kw: Any) -> Starlette:
    """The stand-in as an ASGI app; ``app.state.uazapi`` is the :class:`Uazapi`."""
    u = Uazapi(instances, **kw)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await u.aclose()

    app = Starlette(routes=[Route("/send/text", u.send_text, methods=["POST"]),
                            Route("/_dev/sends", u.dev_sends, methods=["GET", "DELETE"]),
                            Route("/_dev/fail", u.dev_fail, methods=["POST"]),
                            Route("/_dev/health", u.dev_health, methods=["GET"])], lifespan=lifespan)
    app.state.uazapi = u
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve on loopback. QStash token and URLs come from the environment (``Settings``), never argv."""
    import os

    import uvicorn

    from whatrack.settings import Settings

    p = argparse.ArgumentParser(prog="python -m whatrack.devstack.uazapi_server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--instance", action="append", default=[], help="NAME:TOKEN:OWNER (prefer the environment)")
    p.add_argument("--base-url", default=None, help="the BaseUrl put in echoed webhooks")
    args = p.parse_args(argv)
    instances = parse_instances(",".join(args.instance)) + parse_instances(
        os.environ.get("WHATRACK_UAZAPI_INSTANCES", ""))  # the CLI edge: instance tokens stay out of argv
    if not instances:
        p.error("no instance: pass --instance NAME:TOKEN:OWNER or set WHATRACK_UAZAPI_INSTANCES")
    s = Settings.from_env(env_files=())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(instances, qstash_url=s.qstash_url if s.qstash_token else None,
                     qstash_token=s.qstash_token.reveal() if s.qstash_token else None,
                     webhook_url=s.webhook_public_url,
                     base_url=args.base_url or f"http://127.0.0.1:{args.port}")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
