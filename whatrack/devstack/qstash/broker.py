"""The offline QStash broker: a Starlette app that speaks QStash v2 to the official SDKs, state durable in Redis.

Run it as ``python -m whatrack.devstack.qstash.broker --port PORT --redis-url URL`` (secrets preferably from the
environment: ``QSTASH_TOKEN``, ``QSTASH_CURRENT_SIGNING_KEY``, ``QSTASH_NEXT_SIGNING_KEY``), or in-process with
:class:`Broker` (its ``app``, ``start``/``stop``) and :class:`BrokerThread` for tests. Defaults are the official dev
server's user 1 (protocols/qstash.md §3.9), so JS dev mode accepts it. The parts:

    qstash_sign       the delivery JWT            qstash_durations  pure header parsers, backoff
    qstash_model      records and JSON views      qstash_store      Redis layout, atomic acceptance
    qstash_publish    publish, fan-out, cron      qstash_delivery   the dispatcher and delivery pool
    qstash_flow       flow-control keys           qstash_api / qstash_dlq / qstash_admin   the routes
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import uvicorn
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from whatrack.demo import QSTASH_DEV_TOKEN
from whatrack.devstack.qstash import admin as adm
from whatrack.devstack.qstash import dlq as dlq
from whatrack.devstack.qstash import routes as api
from whatrack.devstack.qstash.delivery import DEFAULT_CONCURRENCY, Dispatcher
from whatrack.devstack.qstash.durations import HeaderError
from whatrack.devstack.qstash.flow import FlowControl
from whatrack.devstack.qstash.publish import ApiError
from whatrack.devstack.qstash.store import Store
from whatrack.devstack.servers import free_port, wait_for_port
from whatrack.errors import StackError
from whatrack.redis_tcp import connect
from whatrack.settings import Secret, mask_url

log = logging.getLogger("whatrack.devstack.qstash.broker")

#: The official QStash dev server's user 1 (docs qstash/howto/local-development.mdx): public test values.
DEV_TOKEN = QSTASH_DEV_TOKEN  # the one copy lives in whatrack.demo
DEV_CURRENT_KEY = "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r"
DEV_NEXT_KEY = "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs"
_KEY_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_signing_key() -> str:
    """A key shaped like QStash's: ``sig_`` + 28 base58 characters (32 bytes: PyJWT's minimum for HS256)."""
    return "sig_" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(28))


class _Auth:
    """ASGI middleware: ``Authorization: Bearer <token>`` (or ``?qstash_token=``), else 401 with a JSON error."""

    def __init__(self, app: ASGIApp, token: Secret) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.query_params.get("qstash_token", "")
            if not given or not hmac.compare_digest(given.encode(), self.token.reveal().encode()):
                resp = JSONResponse({"error": "Unauthorized: send Authorization: Bearer <QSTASH_TOKEN>"}, 401)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> Response:
    status = exc.status if isinstance(exc, ApiError) else 400
    return JSONResponse({"error": str(exc)}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _crash(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
    return JSONResponse({"error": "internal broker error; see the broker log"}, status_code=500)


def routes() -> list[Route]:
    """Every QStash v2 route; order matters where a path could also match a later catch-all."""
    fc = "/v2/flowControl"
    return [
        Route("/v2/publish/{destination:path}", api.publish_route, methods=["POST"]),
        Route("/v2/enqueue/{rest:path}", api.enqueue_route, methods=["POST"]),
        Route("/v2/batch", api.batch_route, methods=["POST"]),
        Route("/v2/messages/{mid}", api.get_message, methods=["GET"]),
        Route("/v2/messages/{mid}", api.cancel_route, methods=["DELETE"]),
        Route("/v2/messages", api.cancel_many_route, methods=["DELETE"]),
        Route("/v2/events", api.events_route, methods=["GET"]),
        Route("/v2/logs", api.events_route, methods=["GET"]),
        Route("/v2/dlq", dlq.list_route, methods=["GET"]),
        Route("/v2/dlq", dlq.delete_many_route, methods=["DELETE"]),
        Route("/v2/dlq/retry", dlq.retry_many_route, methods=["POST"]),
        Route("/v2/dlq/retry/{dlq_id}", dlq.retry_route, methods=["POST"]),
        Route("/v2/dlq/{dlq_id}", dlq.get_route, methods=["GET"]),
        Route("/v2/dlq/{dlq_id}", dlq.delete_route, methods=["DELETE"]),
        Route("/v2/queues", adm.queue_upsert, methods=["POST"]),
        Route("/v2/queues", adm.queue_list, methods=["GET"]),
        Route("/v2/queues/{name}", adm.queue_get, methods=["GET"]),
        Route("/v2/queues/{name}", adm.queue_delete, methods=["DELETE"]),
        Route("/v2/queues/{name}/pause", adm.queue_pause, methods=["POST"]),
        Route("/v2/queues/{name}/resume", adm.queue_pause, methods=["POST"]),
        Route("/v2/schedules/{sid}/pause", adm.schedule_pause, methods=["PATCH", "POST"]),
        Route("/v2/schedules/{sid}/resume", adm.schedule_pause, methods=["PATCH", "POST"]),
        Route("/v2/schedules", adm.schedule_list, methods=["GET"]),
        Route("/v2/schedules/{sid}", adm.schedule_get, methods=["GET"]),
        Route("/v2/schedules/{sid}", adm.schedule_delete, methods=["DELETE"]),
        Route("/v2/schedules/{destination:path}", adm.schedule_create, methods=["POST"]),
        Route("/v2/topics", adm.topic_list, methods=["GET"]),
        Route("/v2/topics/{name}", adm.topic_get, methods=["GET"]),
        Route("/v2/topics/{name}", adm.topic_delete, methods=["DELETE"]),
        Route("/v2/topics/{name}/endpoints", adm.topic_add, methods=["POST"]),
        Route("/v2/topics/{name}/endpoints", adm.topic_remove, methods=["DELETE"]),
        Route("/v2/keys", adm.keys_get, methods=["GET"]),
        Route("/v2/keys/rotate", adm.keys_rotate, methods=["POST"]),
        Route("/v2/globalParallelism", adm.global_parallelism, methods=["GET"]),
        Route(fc, adm.flow_list, methods=["GET"]),
        Route(fc + "/{key}", adm.flow_get, methods=["GET"]),
        Route(fc + "/{key}/{action}", adm.flow_action, methods=["POST"]),
    ]


class Broker:
    """One broker: the ASGI ``app``, and ``start``/``stop`` for its delivery loop (run by the app's lifespan).

    Secrets are held as :class:`~whatrack.settings.Secret` and never logged; keys already stored in Redis (from an
    earlier rotation) win over the ones given here.
    """

    store: Store
    flow: FlowControl
    dispatcher: Dispatcher

    def __init__(self, redis_url: str, *, token: str = DEV_TOKEN, current_key: str = DEV_CURRENT_KEY,
                 next_key: str = DEV_NEXT_KEY, time_scale: float = 1.0, prefix: str = "qstash:",
                 redis_ca: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 emulate_httpstatus: bool = False) -> None:
        if time_scale <= 0:
            raise StackError(f"time_scale must be > 0 (1.0 = real QStash delays), got {time_scale}")
        self.redis_url = redis_url
        self.redis_ca = redis_ca
        self.prefix = prefix
        self.time_scale = time_scale
        self.concurrency = concurrency
        self.emulate_httpstatus = emulate_httpstatus
        self._token = Secret(token)
        self._keys = (Secret(current_key), Secret(next_key))
        self._started = False
        self.app = Starlette(routes=routes(), lifespan=self._lifespan,
                             exception_handlers={ApiError: _api_error, HeaderError: _api_error,
                                                 HTTPException: _http_error, Exception: _crash})
        self.app.state.broker = self
        self.app.add_middleware(_Auth, token=self._token)

    def __repr__(self) -> str:
        return f"Broker({mask_url(self.redis_url)!r}, prefix={self.prefix!r}, time_scale={self.time_scale})"

    @property
    def keys(self) -> tuple[str, str]:
        """The (current, next) signing keys."""
        return self._keys[0].reveal(), self._keys[1].reveal()

    async def start(self) -> None:
        """Connect to Redis, load (or store) the signing keys, recover unfinished work and start delivering."""
        self.redis = connect(self.redis_url, ca_bundle=self.redis_ca, max_connections=self.concurrency + 32)
        self.store = Store(self.redis, self.prefix)
        kkey = self.store.k("keys")
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(kkey, "current", self._keys[0].reveal())
                pipe.hsetnx(kkey, "next", self._keys[1].reveal())
                pipe.hmget(kkey, ["current", "next"])
                *_, (cur, nxt) = await pipe.execute()
        except RedisError as e:
            await self.redis.aclose()
            raise StackError(f"the QStash broker cannot use Redis at {mask_url(self.redis_url)}: {e}; check "
                             "--redis-url, and --redis-ca for a rediss:// server with a private CA") from e
        self._keys = (Secret(cur.decode()), Secret(nxt.decode()))
        self.flow = FlowControl(self.store)
        self.dispatcher = Dispatcher(self.store, self.flow, lambda: self._keys[0].reveal(),
                                     time_scale=self.time_scale, concurrency=self.concurrency,
                                     emulate_httpstatus=self.emulate_httpstatus)
        await self.dispatcher.start()
        self._started = True
        log.info("qstash broker started on %s (prefix %s, time scale %g)", mask_url(self.redis_url), self.prefix,
                 self.time_scale)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.dispatcher.stop()
        await self.redis.aclose()
        log.info("qstash broker stopped (%d delivered)", self.dispatcher.delivered)

    async def rotate_keys(self) -> tuple[str, str]:
        """current := next, a fresh next; stored first, so a restart keeps the rotation."""
        current, nxt = self._keys[1].reveal(), new_signing_key()
        await self.redis.hset(self.store.k("keys"), mapping={"current": current, "next": nxt})
        self._keys = (Secret(current), Secret(nxt))
        log.info("signing keys rotated")
        return current, nxt

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()


class BrokerThread:
    """Run a :class:`Broker` under uvicorn in a background thread (for tests); a context manager.

    Attributes:
        url: ``http://host:port``, the ``base_url`` for ``QStash(token, base_url=url)``.
    """

    def __init__(self, broker: Broker, host: str = "127.0.0.1", port: int = 0) -> None:
        self.broker = broker
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(broker.app, host=host, port=self.port, log_level="warning", lifespan="on",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name=f"qstash-broker-{self.port}", daemon=True)

    def start(self) -> BrokerThread:
        """Start and wait until the broker accepts connections.

        Raises:
            StackError: it did not come up.
        """
        self._thread.start()
        wait_for_port(self.host, self.port, timeout=15)
        for _ in range(500):
            if self.server.started:
                return self
            self._thread.join(0.01)
        raise StackError(f"the QStash broker on port {self.port} did not finish starting")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m whatrack.devstack.qstash.broker", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--redis-url", required=True, help="where the broker keeps its state (redis:// or rediss://)")
    p.add_argument("--token", help="API token (prefer env QSTASH_TOKEN: arguments show in ps)")
    p.add_argument("--current-key", help="signing key (prefer env QSTASH_CURRENT_SIGNING_KEY)")
    p.add_argument("--next-key", help="next signing key (prefer env QSTASH_NEXT_SIGNING_KEY)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies retry delays (0.001 in tests)")
    p.add_argument("--prefix", default="qstash:", help="Redis key prefix of all broker state")
    p.add_argument("--redis-ca", help="CA bundle for a rediss:// URL")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="delivery attempts in flight")
    p.add_argument("--emulate-httpstatus", action="store_true",
                   help="answer deliveries to mock.httpstatus.io locally (to run the qstash-py test suite offline)")
    return p


async def _preflight(broker: Broker) -> None:
    """Reach Redis once with the broker's own settings (TLS and CA included)."""
    client = connect(broker.redis_url, ca_bundle=broker.redis_ca)
    try:
        await client.ping()
    except RedisError as e:
        raise StackError(f"the QStash broker cannot use Redis at {mask_url(broker.redis_url)}: {e}; check "
                         "--redis-url, and --redis-ca for a rediss:// server with a private CA") from e
    finally:
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for a usage or configuration error)."""
    from whatrack import logs
    from whatrack.errors import WhatrackError
    from whatrack.settings import Settings

    args = _parser().parse_args(argv)
    try:
        env = Settings.from_env(env_files=())
        token = env.qstash_token.reveal() if env.qstash_token else (args.token or DEV_TOKEN)
        current = (env.qstash_current_signing_key.reveal() if env.qstash_current_signing_key
                   else args.current_key or DEV_CURRENT_KEY)
        nxt = env.qstash_next_signing_key.reveal() if env.qstash_next_signing_key else args.next_key or DEV_NEXT_KEY
        logs.configure("INFO", secrets=[token, current, nxt])
        broker = Broker(args.redis_url, token=token, current_key=current, next_key=nxt, time_scale=args.time_scale,
                        prefix=args.prefix, redis_ca=args.redis_ca, concurrency=args.concurrency,
                        emulate_httpstatus=args.emulate_httpstatus)
    except WhatrackError as e:
        print(f"qstash broker: {e}", file=sys.stderr)
        return 2
    try:  # fail here with one line, not in uvicorn's lifespan with a traceback
        asyncio.run(_preflight(broker))
    except WhatrackError as e:
        print(f"qstash broker: {e}", file=sys.stderr)
        return 1
    config: dict[str, Any] = {"host": args.host, "port": args.port, "log_level": "warning", "access_log": False,
                              "lifespan": "on"}
    uvicorn.run(broker.app, **config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
