"""What every route handler of the offline QStash broker shares: the broker behind a request, and request parsing.

Handlers (:mod:`.routes`, :mod:`.admin`, :mod:`.dlq`) see the broker through :class:`BrokerState`, the part of
:class:`~whatrack.devstack.qstash.broker.Broker` they use, so that no handler module imports the broker module that
mounts them.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from starlette.requests import Request

from whatrack.devstack.qstash.delivery import Dispatcher
from whatrack.devstack.qstash.flow import FlowControl
from whatrack.devstack.qstash.publish import ApiError
from whatrack.devstack.qstash.store import Store

#: Page size limits of /v2/events and /v2/dlq (OpenAPI: default 100; the py docstring allows up to 1000 for logs).
DEFAULT_PAGE = 100
MAX_PAGE = 1000


class BrokerState(Protocol):
    """The running broker as a handler sees it (``request.app.state.broker``)."""

    store: Store
    flow: FlowControl
    dispatcher: Dispatcher

    @property
    def keys(self) -> tuple[str, str]: ...

    async def rotate_keys(self) -> tuple[str, str]: ...


def broker_of(request: Request) -> BrokerState:
    b: BrokerState = request.app.state.broker
    return b


def raw_destination(request: Request, prefix: str) -> str:
    """The destination after ``prefix`` in the raw path, with the raw query string (``//`` kept as sent)."""
    raw = request.scope.get("raw_path") or request.scope["path"].encode()
    path = raw.decode("latin-1").split("?", 1)[0]
    dest = path[len(prefix):]
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{dest}?{query}" if query else dest


def lower_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items()}


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"request body is not JSON: {e}") from e


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None
