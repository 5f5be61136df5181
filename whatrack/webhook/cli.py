"""``whatrack serve``: the webhook endpoint under uvicorn (the app: :func:`whatrack.webhook.app.app_from_env`)."""

from __future__ import annotations

import argparse
import logging

from whatrack.settings import WEBHOOK_PATH, Settings

log = logging.getLogger("whatrack.webhook.cli")


def _serve(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    import uvicorn

    from whatrack.webhook.startup import check_startup

    settings = Settings.from_env()
    # Fail fast with one line, naming the variable, before uvicorn starts: settings, signing keys' shape, database
    # login and schema revision (the clients themselves are built in the lifespan, inside the event loop: cent's
    # aiohttp client cannot be made outside one). A wrong password is a configuration error, not a 503 per delivery.
    check_startup(settings)
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
