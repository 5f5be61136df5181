"""The UAZAPI send client through ``httpx.MockTransport``: the request on the wire, the result, every error class, and
the token kept out of every error, repr and log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from whatrack.errors import ConfigError, SendError
from whatrack.uazapi.client import SendResult, UazapiClient

BASE = "https://example.uazapi.com"
TOKEN = "5e3c7e7a-1111-4222-8333-a0b1c2d3e4f5"
MID = "3EB0B430B6F8F1D0E0B1A2"
OWNER = "5511999990000"

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **kw: Any) -> UazapiClient:
    return UazapiClient(BASE, TOKEN, transport=httpx.MockTransport(handler), **kw)


def ok_response(request: httpx.Request) -> httpx.Response:
    """The spec's 200: the stored Message plus ``response`` (uazapiGO v2 /send/text)."""
    sent = json.loads(request.content)
    return httpx.Response(200, json={
        "id": f"{OWNER}:{MID}", "messageid": MID, "chatid": f"{sent['number']}@s.whatsapp.net", "fromMe": True,
        "messageType": "ExtendedTextMessage", "text": sent["text"], "status": "Pending", "owner": OWNER,
        "track_source": sent.get("track_source", ""), "track_id": sent.get("track_id", ""),
        "messageTimestamp": 1767261600000, "response": {"status": "success", "message": "Message sent successfully"},
    })


async def test_send_text_posts_the_documented_request_and_returns_the_ids() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok_response(request)

    async with client(handler) as c:
        result = await c.send_text("+55 (11) 98888-7777", "Olá, Maria! 👋", track_source="whatrack", track_id="fu-1")
    assert isinstance(result, SendResult)
    assert (result.message_id, result.provider_id) == (MID, f"{OWNER}:{MID}")
    assert result.raw["response"]["status"] == "success"
    [req] = seen
    assert (req.method, str(req.url)) == ("POST", f"{BASE}/send/text")
    assert req.headers["token"] == TOKEN
    assert req.headers["content-type"] == "application/json"
    assert json.loads(req.content) == {"number": "5511988887777", "text": "Olá, Maria! 👋", "track_source": "whatrack",
                                       "track_id": "fu-1"}


async def test_optional_tracking_fields_are_left_out_and_a_jid_is_sent_as_is() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"messageid": MID})

    async with client(handler) as c:
        result = await c.send_text("120363000000000001@g.us", "  spaces kept  ")
    assert bodies == [{"number": "120363000000000001@g.us", "text": "  spaces kept  "}]
    assert (result.message_id, result.provider_id) == (MID, None)


@pytest.mark.parametrize(("answer", "message_id", "provider_id"), [
    ({"id": f"{OWNER}:{MID}"}, MID, f"{OWNER}:{MID}"),                  # only the full id
    ({"messageid": MID, "owner": OWNER}, MID, f"{OWNER}:{MID}"),         # the full id built from the owner
    ({"messageid": f"{OWNER}:{MID}", "id": "r1a2b3c4"}, MID, None),      # an internal id is not a provider id
    ({"messageid": MID, "token": TOKEN}, MID, None),
])
async def test_the_ids_are_read_from_any_documented_shape(answer: dict[str, Any], message_id: str,
                                                          provider_id: str | None) -> None:
    async with client(lambda request: httpx.Response(200, json=answer)) as c:
        result = await c.send_text("5511988887777", "oi")
    assert (result.message_id, result.provider_id) == (message_id, provider_id)
    assert "token" not in result.raw


@pytest.mark.parametrize(("status", "retryable"), [
    (500, True), (502, True), (503, True), (429, True), (408, True),
    (400, False), (401, False), (403, False), (404, False), (422, False), (301, False),
])
async def test_http_errors_say_whether_to_retry(status: int, retryable: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": f"failed for token {TOKEN}"})

    async with client(handler) as c:
        with pytest.raises(SendError) as info:
            await c.send_text("5511988887777", "oi")
    err = info.value
    assert (err.status, err.retryable) == (status, retryable)
    assert str(status) in str(err) and "failed for token" in str(err)
    assert TOKEN not in str(err)


async def test_an_html_error_page_is_not_quoted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html><body>Bad Gateway</body></html>", headers={"content-type": "text/html"})

    async with client(handler) as c:
        with pytest.raises(SendError) as info:
            await c.send_text("5511988887777", "oi")
    assert info.value.retryable and "<html>" not in str(info.value)


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.ConnectError, httpx.ReadError,
                                 httpx.RemoteProtocolError])
async def test_timeouts_and_connection_errors_are_retryable(exc: type[httpx.TransportError]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc(f"boom with {TOKEN}", request=request)

    async with client(handler, timeout=2.5) as c:
        with pytest.raises(SendError) as info:
            await c.send_text("5511988887777", "oi")
    err = info.value
    assert err.retryable and err.status is None
    assert isinstance(err.__cause__, exc)
    assert TOKEN not in str(err)


@pytest.mark.parametrize("answer", [
    httpx.Response(200, json={"response": {"status": "success"}}),   # no messageid: was it sent?
    httpx.Response(200, json=["not", "an", "object"]),
    httpx.Response(200, content=b"<html>ok</html>"),
])
async def test_a_success_without_a_message_id_is_not_retried_blindly(answer: httpx.Response) -> None:
    async with client(lambda request: answer) as c:
        with pytest.raises(SendError) as info:
            await c.send_text("5511988887777", "oi")
    assert (info.value.status, info.value.retryable) == (200, False)
    assert "may have been sent" in str(info.value)


@pytest.mark.parametrize(("number", "text"), [
    ("", "oi"), ("   ", "oi"), ("abc", "oi"), ("123", "oi"), ("5511988887777 ext 2", "oi"), ("1" * 16, "oi"),
    ("@g.us", "oi"), ("5511988887777", ""),
])
async def test_bad_input_fails_before_any_request(number: str, text: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return ok_response(request)

    async with client(handler) as c:
        with pytest.raises(SendError) as info:
            await c.send_text(number, text)
    assert info.value.retryable is False and info.value.status is None
    assert calls == []


@pytest.mark.parametrize(("base_url", "token"), [("", TOKEN), ("example.uazapi.com", TOKEN), ("ftp://x", TOKEN),
                                                 (BASE, ""), (BASE, "  ")])
def test_bad_configuration_is_a_config_error(base_url: str, token: str) -> None:
    with pytest.raises(ConfigError):
        UazapiClient(base_url, token)


async def test_the_token_never_shows_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    responses = iter([httpx.Response(200, json={"messageid": MID}), httpx.Response(500, json={"error": TOKEN})])
    async with client(lambda request: next(responses)) as c:
        assert TOKEN not in repr(c) and "example.uazapi.com" in repr(c)
        await c.send_text("5511988887777", "oi")
        with pytest.raises(SendError):
            await c.send_text("5511988887777", "oi")
    assert any(MID in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


async def test_against_the_devstack_stand_in_the_echo_normalizes_to_the_same_ids() -> None:
    """The client and the offline UAZAPI agree on the wire; the echo it would post normalizes to the ids we got."""
    server = pytest.importorskip("whatrack.devstack.uazapi_server")
    import whatrack.uazapi.normalizer as uazapi
    from whatrack.events import MessageEvent

    inst = server.Instance("whatrack-demo-01", TOKEN, OWNER)
    app = server.create_app([inst])
    async with UazapiClient(BASE, TOKEN, transport=httpx.ASGITransport(app=app)) as c:
        result = await c.send_text("5511988887777", "Olá de novo", track_source="whatrack", track_id="fu-9")
    async with UazapiClient(BASE, "wrong-token", transport=httpx.ASGITransport(app=app)) as bad:
        with pytest.raises(SendError) as info:
            await bad.send_text("5511988887777", "x")
    assert (info.value.status, info.value.retryable) == (401, False)
    [sent] = app.state.uazapi.sends
    assert (sent["number"], sent["text"], sent["track_id"], sent["messageid"]) == (
        "5511988887777", "Olá de novo", "fu-9", result.message_id)
    echo = server.outbound_echo(inst, chatid="5511988887777@s.whatsapp.net", text="Olá de novo",
                                messageid=result.message_id,
                                timestamp_ms=1767261600000, base_url=BASE, track_source="whatrack", track_id="fu-9")
    ev = uazapi.normalize(echo)
    assert isinstance(ev, MessageEvent)
    assert (ev.external_id, ev.provider_id) == (result.message_id, result.provider_id)
    assert (ev.direction, ev.lead_phone, ev.sent_by_api, ev.track_id) == ("outbound", "5511988887777", True, "fu-9")
