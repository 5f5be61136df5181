"""The small UAZAPI send client the follow-up worker uses: ``POST {base}/send/text`` with the instance token.

Request and response follow the uazapiGO v2 OpenAPI spec (``/send/text``: body ``number``, ``text`` and the optional
``track_source``/``track_id``; header ``token``; a 200 answers with the stored ``Message``: ``messageid``, ``id`` =
``owner:messageid``, ...). Failures raise :class:`~whatrack.errors.SendError` whose ``retryable`` says whether sending
again may help (5xx, 408, 429, timeouts, connection errors) or not (other 4xx, a malformed success). The token goes in
one request header and nowhere else: not in a repr, an error, or a log line.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx

from whatrack.errors import ConfigError, SendError
from whatrack.settings import MASK, Secret, mask_url

log = logging.getLogger("whatrack.uazapi.client")

SEND_TEXT_PATH = "/send/text"
#: Statuses worth retrying besides 5xx: request timeout and rate limiting (the spec documents 429 on /send/*).
_RETRYABLE_4XX = frozenset({408, 425, 429})
# How much of an error body to quote: enough for UAZAPI's one-line {"error": ...}, never a whole HTML page.
_MAX_DETAIL = 200
# E.164 allows at most 15 digits; fewer than 7 cannot be a routable WhatsApp number.
_MIN_DIGITS, _MAX_DIGITS = 7, 15


@dataclass(frozen=True)
class SendResult:
    """What UAZAPI answered to a send.

    Attributes:
        message_id: the bare WhatsApp messageid (what the ``fromMe`` webhook echo and receipts carry).
        provider_id: ``"<owner>:<messageid>"`` (UAZAPI's ``id``) when the answer makes it known, else None.
        raw: the decoded response body (any ``token`` key removed).
    """

    message_id: str
    provider_id: str | None
    raw: dict[str, Any] = field(repr=False)


class UazapiClient:
    """Sends through one UAZAPI instance. Build once, reuse, ``await aclose()`` (or ``async with``) at shutdown.

    Args:
        base_url: the UAZAPI server, e.g. ``https://example.uazapi.com`` (``UAZAPI_BASE_URL``).
        token: the instance token (a secret).
        timeout: seconds for connect, read and write.
        transport: an httpx transport (tests pass ``httpx.MockTransport``); TLS certificates are verified by default.

    Raises:
        ConfigError: the base URL is not http(s) or the token is empty.
    """

    def __init__(self, base_url: str, token: str, *, timeout: float = 15.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        parts = urlsplit(base_url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("UAZAPI_BASE_URL", f"{mask_url(base_url)!r} is not an http(s) URL",
                              "https://example.uazapi.com")
        if not isinstance(token, str) or not token.strip():
            raise ConfigError("UAZAPI instance token", "is empty: pass the token of the instance that sends")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._token = Secret(token.strip())
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport,
                                       headers={"Accept": "application/json"}, follow_redirects=False)

    def __repr__(self) -> str:
        return f"UazapiClient(base_url={mask_url(self.base_url)!r}, token='{MASK}')"

    async def __aenter__(self) -> UazapiClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def send_text(self, number: str, text: str, *, track_source: str | None = None,
                        track_id: str | None = None) -> SendResult:
        """Send a text message.

        Args:
            number: the chat: a phone number (``+55 11 98888-7777`` is reduced to digits) or a JID
                (``...@s.whatsapp.net``, ``...@lid``, ``...@g.us``).
            text: the message, sent verbatim.
            track_source: free-form origin echoed back in the webhook (e.g. ``"whatrack-followup"``).
            track_id: free-form id echoed back in the webhook: use it to reconcile a send whose answer was lost.

        Raises:
            SendError: ``retryable`` True for 5xx, 408, 429, timeouts and connection errors; False for a bad number
                or text (no request is made), other 4xx, or a 2xx without a messageid.
        """
        payload: dict[str, Any] = {"number": _chat_number(number), "text": _message_text(text)}
        if track_source:
            payload["track_source"] = track_source
        if track_id:
            payload["track_id"] = track_id
        started = time.perf_counter()
        try:
            resp = await self._http.post(SEND_TEXT_PATH, json=payload, headers={"token": self._token.reveal()})
        except httpx.TimeoutException as e:
            raise SendError(f"UAZAPI {SEND_TEXT_PATH} timed out after {self.timeout:g} s ({type(e).__name__}); it "
                            "may or may not have been sent: retry with the same track_id", retryable=True) from e
        except httpx.HTTPError as e:
            raise SendError(f"UAZAPI {SEND_TEXT_PATH} unreachable at {mask_url(self.base_url)} ({type(e).__name__}: "
                            f"{self._redact(str(e))}): retry later", retryable=True) from e
        elapsed_ms = (time.perf_counter() - started) * 1e3
        if not resp.is_success:
            raise self._error(resp)
        result = self._result(resp)
        log.info("sent text to ...%s in %.0f ms: messageid %s", payload["number"][-4:], elapsed_ms, result.message_id)
        return result

    def _result(self, resp: httpx.Response) -> SendResult:
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SendError(f"UAZAPI {SEND_TEXT_PATH} answered {resp.status_code} with a body that is not JSON: the "
                            "message may have been sent; check it before sending again",
                            status=resp.status_code, retryable=False) from e
        if not isinstance(body, dict):
            body = {}
        body.pop("token", None)
        message_id = _bare(body.get("messageid"))
        raw_id = body.get("id")
        full_id = raw_id.strip() if isinstance(raw_id, str) else ""
        if message_id is None and ":" in full_id:
            message_id = _bare(full_id)
        if message_id is None:
            raise SendError(f"UAZAPI {SEND_TEXT_PATH} answered {resp.status_code} without a messageid: the message "
                            "may have been sent; check it before sending again", status=resp.status_code,
                            retryable=False)
        if ":" in full_id and full_id.rpartition(":")[2] == message_id:
            provider_id: str | None = full_id
        else:
            owner = body.get("owner")
            digits = "".join(ch for ch in owner if ch.isascii() and ch.isdigit()) if isinstance(owner, str) else ""
            provider_id = f"{digits}:{message_id}" if digits else None
        return SendResult(message_id=message_id, provider_id=provider_id, raw=body)

    def _error(self, resp: httpx.Response) -> SendError:
        status = resp.status_code
        retryable = status >= 500 or status in _RETRYABLE_4XX
        detail = ""
        try:
            body = resp.json()
            if isinstance(body, dict):
                err = body.get("error") or body.get("message") or body.get("response")
                detail = err if isinstance(err, str) else ""
        except (json.JSONDecodeError, UnicodeDecodeError):
            detail = resp.text if "html" not in resp.headers.get("content-type", "") else ""
        detail = self._redact(" ".join(detail.split()))[:_MAX_DETAIL]
        if status == 401 or status == 403:
            hint = "check the instance token"
        elif status == 429:
            hint = "rate limited: retry later"
        elif retryable:
            hint = "UAZAPI failed: retry later"
        elif status == 404:
            hint = f"check UAZAPI_BASE_URL ({mask_url(self.base_url)}) and that the instance exists"
        else:
            hint = "check the number and the text"
        said = f" ({detail})" if detail else ""
        return SendError(f"UAZAPI {SEND_TEXT_PATH} answered {status}{said}: {hint}", status=status,
                         retryable=retryable)

    def _redact(self, text: str) -> str:
        token = self._token.reveal()
        return text.replace(token, MASK) if token else text


def _chat_number(number: str) -> str:
    """A JID as given, or a phone number reduced to its digits; anything else raises a non-retryable SendError."""
    if not isinstance(number, str) or not number.strip():
        raise SendError("send_text: the number is empty: pass a phone number or a JID", retryable=False)
    n = number.strip()
    if "@" in n:
        user, _, server = n.partition("@")
        if user and server and " " not in n:
            return n
    else:
        digits = "".join(ch for ch in n if ch.isascii() and ch.isdigit())
        if set(n) <= set("0123456789+-() .") and _MIN_DIGITS <= len(digits) <= _MAX_DIGITS:
            return digits
    raise SendError(f"send_text: {n[:40]!r} is not a phone number ({_MIN_DIGITS}-{_MAX_DIGITS} digits, e.g. "
                    "5511988887777) or a JID (e.g. 120363000000000001@g.us)", retryable=False)


def _message_text(text: str) -> str:
    if not isinstance(text, str) or not text:
        raise SendError("send_text: the text is empty: UAZAPI refuses an empty message", retryable=False)
    return text


def _bare(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().rpartition(":")[2] or None
