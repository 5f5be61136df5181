"""The UAZAPI stand-in: sends recorded, failures injected, and each send echoed as a fromMe webhook via QStash."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from devstack_support import spawn

from whatrack.demo import DEMO_NAME, DEMO_OWNER, DEMO_TOKEN
from whatrack.devstack import servers
from whatrack.devstack.uazapi_server import outbound_echo, parse_instances

QSTASH_TOKEN = "qstash-test-token-0123456789"
WEBHOOK = "http://127.0.0.1:9/api/v1/webhooks/qstash/whatsapp"


class _Capture(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers.items()),  # type: ignore[attr-defined]
                                     "body": body})
        out = json.dumps({"messageId": f"msg_{len(self.server.requests)}"}).encode()  # type: ignore[attr-defined]
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def qstash_stub() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A tiny HTTP receiver standing in for QSTASH_URL: records each request, answers like QStash's publish."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    srv.requests = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.requests  # type: ignore[attr-defined]
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def uazapi(tmp_path_factory: pytest.TempPathFactory, qstash_stub: tuple[str, list[dict[str, Any]]]) -> Iterator[str]:
    port = servers.free_port()
    env = {"WHATRACK_UAZAPI_INSTANCES": f"{DEMO_NAME}:{DEMO_TOKEN}:{DEMO_OWNER}", "QSTASH_URL": qstash_stub[0],
           "QSTASH_TOKEN": QSTASH_TOKEN, "WEBHOOK_PUBLIC_URL": WEBHOOK}
    with spawn("whatrack.devstack.uazapi_server", ["--port", str(port)], env, port,
               tmp_path_factory.mktemp("uazapi")):
        yield f"http://127.0.0.1:{port}"


def _send(base: str, token: str = DEMO_TOKEN, **body: Any) -> httpx.Response:
    return httpx.post(f"{base}/send/text", json=body, headers={"token": token})


def _wait_echo(base: str, seq: int) -> dict[str, Any]:
    for _ in range(500):
        rec: dict[str, Any] = next(r for r in httpx.get(f"{base}/_dev/sends").json()["sends"] if r["seq"] == seq)
        if rec.get("echo") != "pending":
            return rec
        time.sleep(0.01)
    raise AssertionError("echo still pending")


def test_send_is_recorded_and_echoed_through_qstash(uazapi: str,
                                                     qstash_stub: tuple[str, list[dict[str, Any]]]) -> None:
    r = _send(uazapi, number="+55 11 98888-7777", text="Olá! Seguimos? 👋", track_source="followup", track_id="j1")
    assert r.status_code == 200
    sent = r.json()
    assert sent["id"] == f"{DEMO_OWNER}:{sent['messageid']}" and len(sent["messageid"]) == 22
    assert sent["chatid"] == "5511988887777@s.whatsapp.net" and sent["fromMe"] is True
    assert sent["wasSentByApi"] is True and sent["text"] == "Olá! Seguimos? 👋"
    sends = httpx.get(f"{uazapi}/_dev/sends").json()["sends"]
    rec = _wait_echo(uazapi, sends[-1]["seq"])
    assert rec["echo"] == "published" and rec["messageid"] == sent["messageid"] and rec["number"] == "5511988887777"
    req = next(q for q in qstash_stub[1] if json.loads(q["body"])["message"]["messageid"] == sent["messageid"])
    assert req["path"] == f"/v2/publish/{WEBHOOK}"
    assert req["headers"]["Authorization"] == f"Bearer {QSTASH_TOKEN}"
    assert req["headers"]["Content-Type"] == "application/json"
    hook = json.loads(req["body"])
    assert (hook["EventType"], hook["token"], hook["owner"], hook["instanceName"]) == (
        "messages", DEMO_TOKEN, DEMO_OWNER, DEMO_NAME)
    m = hook["message"]
    assert (m["fromMe"], m["wasSentByApi"], m["id"], m["chatid"]) == (
        True, True, sent["id"], "5511988887777@s.whatsapp.net")
    assert (m["text"], m["track_source"], m["track_id"]) == ("Olá! Seguimos? 👋", "followup", "j1")
    assert hook["chat"]["wa_chatid"] == m["chatid"]


def test_echo_has_the_fixture_shape(fixtures_dir: Path) -> None:
    fixture = json.loads((fixtures_dir / "messages_outbound_text_fromme.json").read_text())
    assert fixture["token"] == DEMO_TOKEN and fixture["owner"] == DEMO_OWNER  # the demo instance replays fixtures
    inst = parse_instances(f"{DEMO_NAME}:{DEMO_TOKEN}:{DEMO_OWNER}")[0]
    echo = outbound_echo(inst, chatid="5511988887777@s.whatsapp.net", text="x", messageid="3EB0AAAA", timestamp_ms=1,
                         base_url="http://h")
    assert set(echo) == set(fixture)
    assert set(echo["message"]) == set(fixture["message"])
    assert set(echo["chat"]) == set(fixture["chat"])
    assert "********" in repr(inst) and DEMO_TOKEN not in repr(inst)


def test_injected_failures_then_recovery(uazapi: str) -> None:
    assert httpx.post(f"{uazapi}/_dev/fail?count=2&status=503").json() == {"fail_count": 2, "status": 503}
    assert _send(uazapi, number="5511988887777", text="a").status_code == 503
    assert _send(uazapi, number="5511988887777", text="b").status_code == 503
    ok = _send(uazapi, number="5511988887777", text="c")
    assert ok.status_code == 200
    last3 = httpx.get(f"{uazapi}/_dev/sends").json()["sends"][-3:]
    assert [(s["text"], s["ok"], s["status"]) for s in last3] == [("a", False, 503), ("b", False, 503),
                                                                   ("c", True, 200)]
    assert httpx.post(f"{uazapi}/_dev/fail?count=x").status_code == 400


def test_bad_requests_are_refused_with_a_reason(uazapi: str) -> None:
    before = len(httpx.get(f"{uazapi}/_dev/sends").json()["sends"])
    r = _send(uazapi, token="wrong", number="5511988887777", text="x")
    assert r.status_code == 401 and "token" in r.json()["error"]
    r = _send(uazapi, number="abc", text="x")
    assert r.status_code == 400 and "number" in r.json()["error"]
    r = _send(uazapi, number="123@example.com", text="x")
    assert r.status_code == 400 and "JID" in r.json()["error"]
    r = _send(uazapi, number="5511988887777", text="")
    assert r.status_code == 400 and "text" in r.json()["error"]
    r = httpx.post(f"{uazapi}/send/text", content=b"{", headers={"token": DEMO_TOKEN})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert len(httpx.get(f"{uazapi}/_dev/sends").json()["sends"]) == before  # nothing recorded
    assert httpx.delete(f"{uazapi}/_dev/sends").json() == {"sends": []}


def test_jids_are_sent_as_given(uazapi: str) -> None:
    for jid in ("100000000000001@lid", "120363000000000001@g.us"):
        r = _send(uazapi, number=jid, text="x")
        assert r.status_code == 200 and r.json()["chatid"] == jid
    assert r.json()["isGroup"] is True


def test_parse_instances_errors_do_not_show_the_token() -> None:
    with pytest.raises(ValueError, match="NAME:TOKEN:OWNER") as e:
        parse_instances("demo:secret-token-value")
    assert "secret-token-value" not in str(e.value)
