"""Run an ASGI app under uvicorn inside the current event loop: the endpoint, the stand-ins and test receivers.

Used by the replay, the load and fault tooling, the notebooks and the tests, so that deliveries go over real HTTP on
a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from whatrack.devstack.servers import free_port


@contextlib.asynccontextmanager
async def serving(app: Starlette, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop; yield its base URL (``http://host:port``).

    Raises:
        WhatrackError, OSError: what the app's start-up raised (a missing setting, a port in use).
    """
    import uvicorn

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
