"""The ASGI app (Starlette on uvicorn): the QStash webhook route, health, and ``whatrack serve``.

``POST /api/v1/webhooks/qstash/whatsapp[/anything]`` takes QStash deliveries (UAZAPI may append ``/{event}/{type}``);
``GET /healthz`` answers while the process is up. Collaborators (store, realtime, verifier) are built once in the
lifespan from :class:`~whatrack.settings.Settings` and closed on shutdown.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from whatrack.metrics import CONTENT_TYPE, Metrics
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.webhook.handler import Outcome, WebhookHandler

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
               max_body_bytes: int = MAX_BODY_BYTES, metrics: Metrics | None = None) -> Starlette:
    """Build the app. Without ``handler``, one is built at start-up from ``settings`` (default: the environment).

    Raises:
        ConfigError: at start-up, when a needed setting is missing or malformed.
    """
    state: dict[str, Any] = {"handler": handler}
    metrics = metrics or Metrics()

    def observe(outcome: Outcome, seconds: float) -> None:
        metrics.observe_webhook(outcome.outcome, seconds,
                                realtime_failed=outcome.body.get("error") == "realtime_unavailable")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = state["handler"] is None
        if owned:
            state["handler"] = build_handler(settings or Settings.from_env())
        state["handler"].on_outcome = observe
        try:
            yield
        finally:
            if owned:
                h: WebhookHandler = state["handler"]
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

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    routes = [
        Route(WEBHOOK_PATH, webhook, methods=["POST"]),
        Route(WEBHOOK_PATH + "/{rest:path}", webhook, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
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
    return WebhookHandler(Verifier.from_settings(settings), Store.from_url(settings.database_url),
                          Realtime.from_settings(settings))


def app_from_env() -> Starlette:
    """uvicorn factory (``--factory whatrack.webhook.app:app_from_env``): settings from the environment and ``.env``."""
    return create_app(Settings.from_env())


def _serve(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    import uvicorn

    settings = Settings.from_env()
    # Fail fast, naming the variable, before uvicorn starts (the clients themselves are built in the lifespan,
    # inside the event loop: cent's aiohttp client cannot be made outside one).
    settings.require("DATABASE_URL", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY", "WEBHOOK_PUBLIC_URL",
                     "CENTRIFUGO_API_URL", "CENTRIFUGO_API_KEY")
    port = args.port
    if port is None:  # offline, the stack reserved a loopback port for us in WEBHOOK_PUBLIC_URL
        public = urlsplit(settings.webhook_public_url or "")
        port = public.port if public.hostname in ("127.0.0.1", "localhost") and public.port else 8000
    log.info("serving %s on %s:%d with %d worker(s)", WEBHOOK_PATH, args.host, port, args.workers)
    uvicorn.run("whatrack.webhook.app:app_from_env", factory=True, host=args.host, port=port, workers=args.workers,
                log_level="warning", access_log=False, timeout_graceful_shutdown=30)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the webhook endpoint (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None,
                   help="default: the port of a loopback WEBHOOK_PUBLIC_URL (offline), else 8000")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=_serve)


@contextlib.asynccontextmanager
async def serving(app: Starlette, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn inside the current event loop; yield its base URL (``http://host:port``).

    Used by the replay, the notebooks and the tests, so that deliveries go over real HTTP.
    """
    import asyncio

    import uvicorn

    from whatrack.devstack.servers import free_port

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises the start-up error (a ConfigError, a port in use)
                raise RuntimeError("uvicorn stopped during start-up")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
