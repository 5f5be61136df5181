"""The ASGI app (Starlette on uvicorn): the QStash webhook route, health and metrics (``whatrack serve`` runs it).

``POST /api/v1/webhooks/qstash/whatsapp[/anything]`` takes QStash deliveries (UAZAPI may append ``/{event}/{type}``);
``GET /healthz`` answers while the process is up (liveness); ``GET /readyz`` answers 200 only while the database
answers too (readiness: 503 otherwise; what ``whatrack serve`` checks before it listens is in ``webhook.startup``).
Collaborators (store, realtime, verifier) are built once in the lifespan from :class:`~whatrack.settings.Settings` and
closed on shutdown. The lifespan also runs this process's realtime outbox publisher (``webhook.publisher``). The
endpoint runs on PostgreSQL only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from whatrack import gctune
from whatrack.errors import ConfigError
from whatrack.metrics import CONTENT_TYPE, Metrics
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.webhook.handler import Outcome, WebhookHandler
from whatrack.webhook.publisher import Publisher
from whatrack.webhook.startup import database_problem

log = logging.getLogger("whatrack.webhook.app")

#: Largest body accepted. UAZAPI message webhooks are a few KiB (media is referenced, not inlined); 1 MiB leaves
#: room for long texts and big chat records while refusing memory-exhausting bodies.
MAX_BODY_BYTES = 1024 * 1024


_JSON_HEADERS = [(b"content-type", b"application/json")]
#: The answer's JSON (compact, UTF-8): 0.07 us where ``json.dumps`` with its options took 1.8 (it builds an encoder
#: per call). Outcome bodies hold strings, integers and booleans only.
_encode = msgspec.json.Encoder().encode


class _Webhook:
    """The webhook route as a plain ASGI app: headers read from the scope, the body from ``receive``, the answer sent
    with ``send``.

    Starlette's ``Request``/``JSONResponse`` cost about 8 % of the endpoint's CPU at saturation (the request's URL
    parsed again, a header map built, the response rendered through its classes), profiled; the route needs none of
    it. What the route answers is the same: the handler's outcome as JSON, 413 for a body over the limit.
    """

    def __init__(self, state: dict[str, Any], limit: int) -> None:
        self.state = state
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        signatures: list[str] = []
        message_id = retried = None
        declared = 0
        for k, v in scope["headers"]:
            if k == b"upstash-signature":
                signatures.append(v.decode("latin-1"))
            elif k == b"content-length":
                declared = int(v) if v.isdigit() else 0
            elif k == b"upstash-message-id":
                message_id = v.decode("latin-1")
            elif k == b"upstash-retried":
                retried = v.decode("latin-1")
        try:
            body = None if declared > self.limit else await _read_body(receive, self.limit)
        except ClientDisconnect:  # gone before its body was complete: nothing was processed, nobody to answer
            log.info("[webhook] the client went away before its body was complete (qstash id %s)", message_id)
            return
        if body is None:
            await _send(send, 413, {"error": "body_too_large", "limit": self.limit}, {})
            return
        h: WebhookHandler = self.state["handler"]
        outcome = await h.handle(body, signatures, message_id=message_id, retried=retried,
                                 url_suffix=scope["path"][len(WEBHOOK_PATH):])
        await _send(send, outcome.status, outcome.body, outcome.headers)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or ``None`` when it grows over ``limit``.

    Raises:
        ClientDisconnect: the client went away before the body was complete (nothing was processed).
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    content = _encode(body)
    raw = [*_JSON_HEADERS, (b"content-length", str(len(content)).encode()),
           *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def create_app(settings: Settings | None = None, *, handler: WebhookHandler | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, metrics: Metrics | None = None,
               publisher_options: dict[str, Any] | None = None, serving: bool = False) -> Starlette:
    """Build the app. Without ``handler``, one is built at start-up from ``settings`` (default: the environment).

    ``publisher_options``: keyword arguments of :class:`~whatrack.webhook.publisher.Publisher` (tests shorten the
    lease, the sweep and the backoff). ``serving``: the app is this process's only work (``whatrack serve``):
    start-up ends with :func:`whatrack.gctune.tune_for_serving`, which an embedding process (a test) should not get.

    Raises:
        ConfigError: at start-up, when a needed setting is missing or malformed.
    """
    state: dict[str, Any] = {"handler": handler}
    metrics = metrics or Metrics()

    def observe(outcome: Outcome, seconds: float) -> None:
        metrics.observe_webhook(outcome.outcome, seconds)  # realtime failures: counted by the outbox publisher

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = state["handler"] is None
        if owned:
            state["handler"] = build_handler(settings or Settings.from_env())
        h: WebhookHandler = state["handler"]
        h.on_outcome = observe
        publisher = None
        if h.store.writer is not None:
            publisher = Publisher(h.store.writer, h.realtime, metrics=metrics, **(publisher_options or {}))
            publisher.start()
        else:
            log.warning("no realtime publisher: the store is not PostgreSQL")
        app.state.publisher = publisher  # tests and the benchmark read its counters
        if serving:
            gctune.tune_for_serving()
        try:
            yield
        finally:
            if publisher is not None:
                await publisher.stop()
            if owned:
                await h.realtime.aclose()
                await h.store.aclose()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        h: WebhookHandler | None = state["handler"]
        problem = await database_problem(h.store.engine) if h is not None else "starting"
        if problem:
            return JSONResponse({"status": "unavailable", "database": problem}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    webhook = _Webhook(state, max_body_bytes)
    routes = [
        Route(WEBHOOK_PATH, webhook, methods=["POST"]),
        Route(WEBHOOK_PATH + "/{rest:path}", webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    return _App(webhook, routes=routes, lifespan=lifespan)


class _App(Starlette):
    """Starlette, with the webhook's POSTs handed straight to :class:`_Webhook` (the routes above say the same).

    Starlette's middleware stack (error and exception middleware, the router's matching, their ``send`` wrappers)
    cost about 4 % of the endpoint's CPU per delivery, profiled; the webhook route answers every outcome itself, and
    an exception it lets out still becomes a 500 (uvicorn's). Everything else (health, metrics, the lifespan, a GET
    or an unknown path) goes through Starlette as before.
    """

    def __init__(self, webhook: _Webhook, **kw: Any) -> None:
        super().__init__(**kw)
        self._webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and scope["method"] == "POST" and path.startswith(WEBHOOK_PATH)
                and (len(path) == len(WEBHOOK_PATH) or path[len(WEBHOOK_PATH)] == "/")):
            scope["app"] = self
            await self._webhook(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def build_handler(settings: Settings) -> WebhookHandler:
    """The handler with its collaborators built from settings (store, realtime, verifier).

    Raises:
        ConfigError: a needed setting is missing.
    """
    from whatrack.qstash import Verifier
    from whatrack.realtime import Realtime
    from whatrack.store.api import Store

    settings.require("DATABASE_URL")
    assert settings.database_url
    if not settings.database_url.startswith("postgresql"):
        raise ConfigError("DATABASE_URL", "the webhook endpoint runs on PostgreSQL only (its write is one PL/pgSQL "
                                          "call and its realtime outbox needs LISTEN/NOTIFY); SQLite stays for "
                                          "the CLI", "postgresql://user:password@host:5432/whatrack")
    return WebhookHandler(Verifier.from_settings(settings), Store.from_url(settings.database_url),
                          Realtime.from_settings(settings))


def app_from_env() -> Starlette:
    """uvicorn factory (``--factory whatrack.webhook.app:app_from_env``): settings from the environment and ``.env``."""
    return create_app(Settings.from_env(), serving=True)
