"""An HTTP front for the fault matrix: sits on the endpoint's public port and forwards every delivery to the
endpoint, except that it can answer 503 to a random share of them, or deliver each one twice (concurrently).

It needs no product change: the endpoint keeps verifying signatures against ``WEBHOOK_PUBLIC_URL`` (the front's URL,
which is where QStash delivers), and runs on an internal port behind it. Only what the operator runs is involved (its
own public port and endpoint), so the ``endpoint_5xx`` scenario runs in cloud mode too, in front of the real QStash.
The matrix's ``duplicate_delivery`` scenario publishes every webhook twice instead (two QStash messages: the same in
both modes); the front's ``duplicate`` mode stays for delivering one request twice at the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

log = logging.getLogger("whatrack.proof.front")

#: Hop-by-hop headers and the ones httpx recomputes: never forwarded.
_DROP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}


@dataclass
class FrontStats:
    """What the front did: forwarded requests, injected 503s, second deliveries."""

    requests: int = 0
    failed_on_purpose: int = 0
    duplicates: int = 0
    upstream_errors: int = 0


class Front:
    """The ASGI app (``app``) forwarding to ``target`` (``http://127.0.0.1:<internal port>``).

    Args:
        fail_ratio: share of requests answered 503 without reaching the endpoint (0.05 = 5 %).
        duplicate: deliver every request twice, concurrently; the first answer is returned.
        seed: for the random choice, so a run is repeatable.
    """

    def __init__(self, target: str, *, fail_ratio: float = 0.0, duplicate: bool = False, seed: int = 0) -> None:
        if not 0.0 <= fail_ratio <= 1.0:
            raise ValueError(f"fail_ratio must be within 0..1, got {fail_ratio}")
        self.target = target.rstrip("/")
        self.fail_ratio = fail_ratio
        self.duplicate = duplicate
        self.stats = FrontStats()
        self._rng = random.Random(seed)
        self._client: httpx.AsyncClient | None = None
        self.app = Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST"])],
                             lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.aclose()

    async def _send(self, request: Request, body: bytes) -> httpx.Response:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=60.0, limits=httpx.Limits(max_connections=256))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        url = self.target + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return await self._client.request(request.method, url, content=body, headers=headers)

    async def _forward(self, request: Request) -> Response:
        self.stats.requests += 1
        body = await request.body()
        if self.fail_ratio and self._rng.random() < self.fail_ratio:
            self.stats.failed_on_purpose += 1
            return Response(b'{"error":"injected_503"}', status_code=503, media_type="application/json")
        try:
            if self.duplicate:
                self.stats.duplicates += 1
                first, _ = await asyncio.gather(self._send(request, body), self._send(request, body),
                                                return_exceptions=True)
                if isinstance(first, BaseException):
                    raise first
                res = first
            else:
                res = await self._send(request, body)
        except httpx.HTTPError as e:  # the endpoint is down: what QStash would see, a gateway error
            self.stats.upstream_errors += 1
            log.info("front: upstream error %s", type(e).__name__)
            return Response(b'{"error":"upstream_unreachable"}', status_code=502, media_type="application/json")
        return Response(res.content, status_code=res.status_code,
                        headers={k: v for k, v in res.headers.items() if k.lower() not in _DROP})

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
