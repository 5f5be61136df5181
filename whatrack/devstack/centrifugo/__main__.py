"""Run the Centrifugo stand-in on loopback.

    CENTRIFUGO_API_KEY=... CENTRIFUGO_TOKEN_HMAC_SECRET_KEY=... \\
        python -m whatrack.devstack.centrifugo --port 8000 --redis-url redis://127.0.0.1:6380/0 [--config FILE]

Secrets come from the environment only (never argv, never the configuration file): ``CENTRIFUGO_API_KEY`` for the
server API, ``CENTRIFUGO_TOKEN_HMAC_SECRET_KEY`` for connection and subscription tokens (without it every token is
refused). ``--config`` defaults to the shipped ``whatrack/centrifugo.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from whatrack.devstack.centrifugo.app import create_app
from whatrack.devstack.centrifugo.config import load_config, shipped_config_path
from whatrack.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    """Serve on 127.0.0.1 until stopped."""
    import uvicorn

    from whatrack.settings import Settings

    p = argparse.ArgumentParser(prog="python -m whatrack.devstack.centrifugo",
                                description="A Centrifugo stand-in (server API and WebSocket clients).")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True, help="where history lives (plain Redis)")
    p.add_argument("--config", default=None,
                   help=f"a Centrifugo JSON configuration file (default: {shipped_config_path()})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = Settings.from_env(env_files=())
        s.require("CENTRIFUGO_API_KEY")
        config = load_config(args.config)
    except ConfigError as e:
        sys.exit(f"centrifugo stand-in: {e}")
    assert s.centrifugo_api_key
    secret = s.centrifugo_token_hmac_secret_key.reveal() if s.centrifugo_token_hmac_secret_key else ""
    if not secret:
        logging.getLogger(__name__).warning("CENTRIFUGO_TOKEN_HMAC_SECRET_KEY is not set: every token is refused")
    app = create_app(args.redis_url, s.centrifugo_api_key.reveal(), config=config, hmac_secret=secret)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
