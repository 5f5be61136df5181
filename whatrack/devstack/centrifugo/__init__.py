"""A Centrifugo stand-in: the server HTTP API (``cent``), the WebSocket client protocol (``centrifuge-python``), history
in Redis, and namespaces from a Centrifugo configuration file in Centrifugo's own format.

Modules: :mod:`.config` (the configuration file), :mod:`.hub` (channels, history, subscribers), :mod:`.api` (server
API), :mod:`.client` (client protocol), :mod:`.app` (the ASGI app). Run it with ``python -m
whatrack.devstack.centrifugo`` (see :mod:`.__main__`).
"""

from __future__ import annotations

from whatrack.devstack.centrifugo.api import VERSION, ServerApi
from whatrack.devstack.centrifugo.app import WS_PATH, create_app
from whatrack.devstack.centrifugo.config import (
    LEDGER_NAMESPACE,
    Config,
    Namespace,
    load_config,
    parse_config,
    shipped_config_path,
)
from whatrack.devstack.centrifugo.hub import IDEMPOTENCY_TTL_S, PREFIX, ApiError, Hub

#: The old name of the server API class.
Centrifugo = ServerApi

__all__ = ["IDEMPOTENCY_TTL_S", "LEDGER_NAMESPACE", "PREFIX", "VERSION", "WS_PATH", "ApiError", "Centrifugo", "Config",
           "Hub", "Namespace", "ServerApi", "create_app", "load_config", "parse_config", "shipped_config_path"]
