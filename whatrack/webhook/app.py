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

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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


async def _read_body(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _respond(outcome: Outcome) -> Response:
    return JSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)


def create_app(settings: Settings | None = None, *, handler: WebhookHandler | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, metrics: Metrics | None = None,
               publisher_options: dict[str, Any] | None = None) -> Starlette:
    """Build the app. Without ``handler``, one is built at start-up from ``settings`` (default: the environment).

    ``publisher_options``: keyword arguments of :class:`~whatrack.webhook.publisher.Publisher` (tests shorten the
    lease, the sweep and the backoff).

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
        try:
            yield
        finally:
            if publisher is not None:
                await publisher.stop()
            if owned:
                await h.realtime.aclose()
                await h.store.aclose()

    async def webhook(request: Request) -> Response:
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return JSONResponse({"error": "body_too_large", "limit": max_body_bytes}, status_code=413)
        h: WebhookHandler = state["handler"]
        outcome = await h.handle(
            body, request.headers.getlist("upstash-signature"),
            message_id=request.headers.get("upstash-message-id"), retried=request.headers.get("upstash-retried"),
            url_suffix=request.url.path[len(WEBHOOK_PATH):])
        return _respond(outcome)

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

    routes = [
        Route(WEBHOOK_PATH, webhook, methods=["POST"]),
        Route(WEBHOOK_PATH + "/{rest:path}", webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


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
    return create_app(Settings.from_env())
