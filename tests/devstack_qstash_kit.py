"""Test helpers for the offline QStash broker: a recording HTTP receiver under uvicorn, and polling.

The receiver is a real Starlette app on a real port: the broker delivers to it over TCP like to any endpoint. Each
request is recorded with its exact body, URL and headers; ``behaviour`` decides the answer per request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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

    def __init__(self, behaviour: Behaviour | None = None, hold: float = 0.0) -> None:
        self.behaviour = behaviour or always()
        self.hold = hold  # seconds each request is held open (to observe concurrency)
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
        if self.hold:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            await asyncio.sleep(self.hold)
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
