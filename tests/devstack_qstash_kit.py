"""Test helpers for the offline QStash broker: a recording HTTP receiver under uvicorn, and polling.

The receiver is a real Starlette app on a real port: the broker delivers to it over TCP like to any endpoint. Each
request is recorded with its exact body, URL and headers; ``behaviour`` decides the answer per request.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from qstash import QStash
from qstash import Receiver as SdkReceiver
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from whatrack.devstack.qstash.broker import DEV_CURRENT_KEY, DEV_NEXT_KEY, DEV_TOKEN, Broker, BrokerThread
from whatrack.devstack.servers import free_port, wait_for_port


@dataclass
class Hit:
    """One request the receiver got."""

    method: str
    url: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


Behaviour = Callable[[Hit, int], tuple[int, dict[str, str], bytes]]


def always(status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"ok") -> Behaviour:
    return lambda hit, n: (status, headers or {}, body)


class Receiver:
    """A recording endpoint. ``url(path)`` gives a delivery URL; ``hits`` the requests, in arrival order."""

    def __init__(self, behaviour: Behaviour | None = None, hold: float = 0.0,
                 hold_for: Callable[[Hit], float] | None = None) -> None:
        self.behaviour = behaviour or always()
        self.hold_for = hold_for or (lambda hit: hold)  # seconds a request is held open before its answer
        self.active = 0
        self.max_active = 0
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.port = free_port()
        app = Starlette(routes=[Route("/{p:path}", self._handle, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        hit = Hit(request.method, str(request.url), request.url.path, dict(request.headers), body)
        with self.lock:
            self.hits.append(hit)
            n = sum(1 for h in self.hits if h.path == hit.path and
                    h.headers.get("upstash-message-id") == hit.headers.get("upstash-message-id"))
        status, headers, out = self.behaviour(hit, n)
        hold = self.hold_for(hit)
        if hold:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            await asyncio.sleep(hold)
            self.active -= 1
        return Response(out, status_code=status, headers=headers)

    def for_path(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    def __enter__(self) -> Receiver:
        self.thread.start()
        wait_for_port("127.0.0.1", self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# broker fixtures and SDK helpers, imported by the test_devstack_qstash*.py modules ---------------------------------

TIME_SCALE = 0.001  # retry delays: 12 ms, 148 ms, 1.8 s instead of 12 s, 2.5 min, 30 min


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording endpoint that answers 200."""
    with Receiver() as r:
        yield r


@pytest.fixture
def broker(redis_url: str) -> Iterator[BrokerThread]:
    """A broker on a free port, state in the test's (flushed) Redis, retry delays scaled by TIME_SCALE."""
    with BrokerThread(Broker(redis_url, time_scale=TIME_SCALE)) as bt:
        yield bt


@pytest.fixture
def client(broker: BrokerThread) -> Iterator[QStash]:
    """The official sync client pointed at the broker."""
    c = QStash(DEV_TOKEN, base_url=broker.url, retry=False)
    yield c
    c.http._client.close()  # the SDK has no close(); an unclosed httpx client is a ResourceWarning (an error here)


def api(broker: BrokerThread, method: str, path: str, *, headers: dict[str, str] | None = None,
        **kw: Any) -> httpx.Response:
    """A raw API call, for the routes the py SDK does not call (JS forms, DLQ retry) and exact statuses."""
    sent = {"Authorization": f"Bearer {DEV_TOKEN}"} if headers is None else headers
    return httpx.request(method, broker.url + path, headers=sent, timeout=30, **kw)


def verify(hit: Hit, url: str, keys: tuple[str, str] = (DEV_CURRENT_KEY, DEV_NEXT_KEY)) -> None:
    """The official Receiver's check of one delivery (raises qstash.errors.SignatureError)."""
    SdkReceiver(*keys).verify(signature=hit.headers["upstash-signature"], body=hit.body.decode(), url=url)


def events(client: QStash, **flt: Any) -> list[Any]:
    """Events through the SDK, newest first."""
    return list(client.log.list(filter=flt, count=1000).logs)  # type: ignore[arg-type]


def states(client: QStash, message_id: str) -> list[str]:
    """A message's event states, oldest first."""
    return [e.state.value for e in reversed(events(client, message_id=message_id))]


class BrokerProcess:
    """The broker as its own process (``python -m whatrack.devstack.qstash.broker``), to be killed for real.

    Secrets travel in the environment, as ``whatrack stack up`` passes them; the log goes to ``log_path``.
    """

    def __init__(self, redis_url: str, log_path: Path, *, port: int | None = None, time_scale: float = TIME_SCALE,
                 token: str = DEV_TOKEN, current_key: str = DEV_CURRENT_KEY, next_key: str = DEV_NEXT_KEY,
                 extra: list[str] | None = None) -> None:
        self.redis_url = redis_url
        self.extra = extra or []
        self.log_path = log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.time_scale = time_scale
        self.env = {**os.environ, "QSTASH_TOKEN": token, "QSTASH_CURRENT_SIGNING_KEY": current_key,
                    "QSTASH_NEXT_SIGNING_KEY": next_key}
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        args = [sys.executable, "-m", "whatrack.devstack.qstash.broker", "--host", "127.0.0.1", "--port",
                str(self.port), "--redis-url", self.redis_url, "--time-scale", str(self.time_scale), *self.extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # health: GET /v2/keys with the token answers 200
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited with {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/v2/keys", headers={"Authorization": f"Bearer {self.token}"},
                             timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("broker did not answer GET /v2/keys within 30 s")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, in-flight deliveries are cut."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
