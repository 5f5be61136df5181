"""whatrack.upstash_rest: the official client from settings, telemetry off, clear errors when unconfigured."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from devstack_support import rest_server, tls_redis

from whatrack.errors import ConfigError
from whatrack.settings import Settings
from whatrack.upstash_rest import from_settings, from_settings_sync

TOKEN = "rest-token-for-client-tests-0123"


class _Echo(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.headers.append(dict(self.headers.items()))  # type: ignore[attr-defined]
        out = json.dumps({"result": "UE9ORw=="}).encode()  # "PONG", base64 as the client asks
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[str, list[dict[str, str]]]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    srv.headers = []  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", srv.headers  # type: ignore[attr-defined]
    srv.shutdown()
    srv.server_close()


def test_missing_settings_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="UPSTASH_REDIS_REST_URL"):
        from_settings(Settings.from_env({}, env_files=()))
    with pytest.raises(ConfigError, match="UPSTASH_REDIS_REST_TOKEN"):
        from_settings_sync(Settings.from_env({"UPSTASH_REDIS_REST_URL": "http://127.0.0.1:1"}, env_files=()))


def test_telemetry_is_off_on_the_wire(capture: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = capture
    s = Settings.from_env({"UPSTASH_REDIS_REST_URL": url + "/", "UPSTASH_REDIS_REST_TOKEN": TOKEN}, env_files=())
    client = from_settings_sync(s)
    assert client.ping() == "PONG"
    client.close()
    assert seen[0]["Authorization"] == f"Bearer {TOKEN}"
    assert not [h for h in seen[0] if h.lower().startswith("upstash-telemetry")]
    assert TOKEN not in repr(client.__dict__.get("_url"))


async def test_async_client_round_trip(tmp_path: Path) -> None:
    with tls_redis(tmp_path) as (r, ca), rest_server(r.url, ca, tmp_path, TOKEN) as url:
        s = Settings.from_env({"UPSTASH_REDIS_REST_URL": url, "UPSTASH_REDIS_REST_TOKEN": TOKEN}, env_files=())
        client = from_settings(s)
        assert await client.set("k", "välue") is True
        assert await client.get("k") == "välue"
        pipe = client.pipeline()
        pipe.incr("n")
        pipe.incr("n")
        assert await pipe.exec() == [1, 2]
        await client.close()
