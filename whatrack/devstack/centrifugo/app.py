"""The Centrifugo stand-in as one ASGI app: the server API, the WebSocket client endpoint and a health check."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from whatrack.devstack.centrifugo.api import ServerApi
from whatrack.devstack.centrifugo.client import Session
from whatrack.devstack.centrifugo.config import Config, Namespace
from whatrack.devstack.centrifugo.hub import Hub, compact

#: Centrifugo's WebSocket path.
WS_PATH = "/connection/websocket"


def create_app(redis_url: str, api_key: str, namespaces: dict[str, Namespace] | None = None, *,
               config: Config | None = None, hmac_secret: str = "") -> Starlette:
    """The stand-in; ``app.state.centrifugo`` is its :class:`ServerApi` (``.hub`` holds channels and subscribers).

    ``config`` is a parsed Centrifugo configuration; ``namespaces`` (tests) replaces its namespaces, channels without
    a namespace keeping Centrifugo's defaults (no history) unless ``""`` is given.
    """
    cfg = config or Config()
    if namespaces is not None:
        cfg = dataclasses.replace(cfg, namespaces={"": Namespace(), **namespaces})
    hub = Hub(redis_url, cfg)
    api = ServerApi(hub, api_key)

    async def websocket(ws: WebSocket) -> None:
        await Session(ws, hub, hmac_secret).run()

    async def health(request: Request) -> Response:
        try:
            await hub.redis.ping()
        except (RedisError, OSError):
            return Response(compact({"ok": False}), status_code=503, media_type="application/json")
        return Response(compact({"ok": True}), media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await hub.aclose()

    all_methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(routes=[Route("/api", api.endpoint, methods=all_methods),
                            Route("/api/{method}", api.endpoint, methods=all_methods),
                            WebSocketRoute(WS_PATH, websocket),
                            Route("/_dev/health", health, methods=["GET"])], lifespan=lifespan)
    app.state.centrifugo = api
    return app
