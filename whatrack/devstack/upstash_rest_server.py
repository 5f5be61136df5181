"""The Upstash Redis REST API over a real Redis: the offline stand-in the official ``upstash-redis`` client talks to.

Conformance follows protocols/upstash-rest-centrifugo.md A.10: ``POST /`` with a JSON command array, ``/pipeline``,
``/multi-exec``, path-style ``GET``/``POST /<cmd>/<args>``, Bearer or ``?_token=`` auth, ``Upstash-Encoding: base64``
(every string base64 except the status ``"OK"``), an ``Upstash-Sync-Token`` on every response, and JSON errors with
the documented status codes. Commands go to Redis through redis-py (asyncio) with its reply post-processing turned
off, so the raw RESP2 reply is what gets encoded.

    UPSTASH_REDIS_REST_TOKEN=... UPSTASH_REDIS_URL=rediss://... WHATRACK_REDIS_CA_BUNDLE=ca.pem \\
        python -m whatrack.devstack.upstash_rest_server --port 8079
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import itertools
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import unquote

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from whatrack.redis_tcp import connection_kwargs

log = logging.getLogger("whatrack.devstack.upstash_rest_server")

AUTH_ERROR = "WRONGPASS invalid or missing auth token"

#: Commands that would hold or change the connection: Upstash REST refuses them (A.1, A.10 item 13).
_BLOCKING = frozenset({"BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP", "WAIT",
                       "WAITAOF"})
_UNSUPPORTED = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE",
                          "MONITOR", "SYNC", "PSYNC", "WATCH", "UNWATCH", "DISCARD", "SELECT", "MULTI", "EXEC", "QUIT",
                          "RESET", "AUTH", "HELLO", "CLIENT", "READONLY", "READWRITE", "SHUTDOWN", "REPLICAOF",
                          "SLAVEOF", "DEBUG"})


class CommandError(Exception):
    """A request that cannot be turned into a Redis command; its text is the ``error`` sent back."""


def to_args(command: object) -> list[bytes]:
    """A JSON command array → Redis arguments. Numbers become their literal text, booleans ``true``/``false``.

    Raises:
        CommandError: not a non-empty array of scalars, or a refused command.
    """
    if not isinstance(command, list) or not command:
        raise CommandError("ERR the request body must be a non-empty JSON array: [\"SET\", \"key\", \"value\"]")
    out: list[bytes] = []
    for item in command:
        if isinstance(item, bool):
            out.append(b"true" if item else b"false")
        elif isinstance(item, int | float):
            out.append(repr(item).encode() if isinstance(item, float) else str(item).encode())
        elif isinstance(item, str):
            out.append(item.encode("utf-8", "surrogatepass"))
        else:
            raise CommandError(f"ERR unsupported argument type {type(item).__name__}: arguments must be strings, "
                               "numbers or booleans")
    check_supported(out)
    return out


def check_supported(args: list[bytes]) -> None:
    """Refuse what Upstash REST refuses: blocking commands, connection state, blocking XREAD/XREADGROUP.

    Raises:
        CommandError: naming the command.
    """
    name = args[0].decode("utf-8", "replace").upper()
    if name in _BLOCKING:
        raise CommandError(f"ERR blocking command '{name}' is not supported by the REST API")
    if name in _UNSUPPORTED:
        raise CommandError(f"ERR command '{name}' is not supported by the REST API")
    if name in ("XREAD", "XREADGROUP") and any(a.upper() == b"BLOCK" for a in args[1:]):
        raise CommandError(f"ERR blocking command '{name}' (BLOCK) is not supported by the REST API")


def encode_result(value: Any, b64: bool) -> Any:
    """A raw RESP2 reply → JSON: strings (base64 in ``b64`` mode, except the status ``OK``), ints, null, arrays."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        if b64:
            return "OK" if value == b"OK" else base64.b64encode(value).decode("ascii")
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return encode_result(value.encode(), b64)
    if isinstance(value, list | tuple):
        return [encode_result(v, b64) for v in value]
    if isinstance(value, float):  # never from RESP2; keep the wire free of JSON floats (A.10 item 8)
        return encode_result(repr(value).encode(), b64)
    if isinstance(value, Exception):
        return encode_result(error_text(value).encode(), b64)
    if isinstance(value, dict):
        return [encode_result(x, b64) for kv in value.items() for x in kv]
    return encode_result(str(value).encode(), b64)


def error_text(e: BaseException) -> str:
    """The full Redis error text, prefix included (redis-py strips ``ERR``/``NOSCRIPT``/... and keeps it aside)."""
    msg = str(e)
    code = getattr(e, "status_code", None)
    if code and not msg.startswith(str(code)):
        return f"{code} {msg}"
    if isinstance(e, ResponseError) and not (msg.split(" ", 1)[0].isupper() and msg[:1].isalpha()):
        return f"ERR {msg}"
    return msg


class RestServer:
    """The ASGI app plus its Redis client. Build with :func:`create_app`."""

    def __init__(self, redis_url: str, token: str, *, ca_bundle: str | None = None) -> None:
        self.token = token
        kw = connection_kwargs(redis_url, ca_bundle=ca_bundle, socket_timeout=30.0)
        # RESP2, as Upstash REST speaks it: redis-py 8 would negotiate RESP3 (maps, doubles) otherwise.
        self.redis = aredis.Redis.from_url(redis_url, protocol=2, max_connections=64, **kw)
        self.redis.response_callbacks.clear()  # raw RESP2 replies: no bool/dict/float post-processing
        self._sync_prefix = secrets.token_hex(4)
        self._sync = itertools.count(1)

    def _respond(self, body: Any, status: int = 200) -> Response:
        token = f"{self._sync_prefix}-{next(self._sync)}"
        return Response(json.dumps(body, separators=(",", ":"), ensure_ascii=False), status_code=status,
                        media_type="application/json", headers={"Upstash-Sync-Token": token})

    def _authorized(self, request: Request) -> bool:
        given = ""
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif "_token" in request.query_params:
            given = request.query_params["_token"]
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def dispatch(self, request: Request) -> Response:
        if request.method not in ("GET", "POST", "PUT", "HEAD"):
            return self._respond({"error": f"ERR method {request.method} not allowed"}, 405)
        if not self._authorized(request):
            return self._respond({"error": AUTH_ERROR}, 401)
        b64 = request.headers.get("upstash-encoding", "").lower() == "base64"
        if request.headers.get("upstash-response-format", "").lower() == "resp2":
            return self._respond({"error": "ERR Upstash-Response-Format resp2 is not supported by this stand-in"},
                                 400)
        path = request.scope.get("raw_path", request.url.path.encode()).split(b"?", 1)[0].decode("latin-1")
        try:
            if path in ("", "/"):
                if request.method in ("GET", "HEAD"):
                    return self._respond({"result": "Welcome to the whatrack Upstash REST stand-in"})
                return await self._single(to_args(await self._json(request)), b64)
            if path == "/pipeline" and request.method != "GET":
                return await self._batch(await self._json(request), b64, transaction=False)
            if path == "/multi-exec" and request.method != "GET":
                return await self._batch(await self._json(request), b64, transaction=True)
            return await self._single(await self._path_args(request, path), b64)
        except CommandError as e:
            return self._respond({"error": str(e)}, 400)
        except (RedisConnectionError, RedisTimeoutError) as e:
            log.warning("redis unreachable: %s", type(e).__name__)
            return self._respond({"error": "ERR the database is unreachable; try again"}, 502)

    @staticmethod
    async def _json(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise CommandError(f"ERR the request body is not valid JSON: {e}") from e

    @staticmethod
    async def _path_args(request: Request, path: str) -> list[bytes]:
        args = [unquote(seg).encode("utf-8", "surrogatepass") for seg in path.strip("/").split("/")]
        if request.method in ("POST", "PUT"):
            body = await request.body()
            if body:
                args.append(body)
        for k, v in request.query_params.multi_items():
            if k != "_token":
                args += [k.encode(), v.encode()]
        check_supported(args)
        return args

    async def _single(self, args: list[bytes], b64: bool) -> Response:
        try:
            result = await self.redis.execute_command(*args)  # type: ignore[no-untyped-call]
        except ResponseError as e:
            return self._respond({"error": error_text(e)}, 400)
        return self._respond({"result": encode_result(result, b64)})

    async def _batch(self, body: Any, b64: bool, *, transaction: bool) -> Response:
        if not isinstance(body, list) or not body:
            raise CommandError("ERR the request body must be a non-empty JSON array of command arrays")
        commands = [to_args(c) for c in body]
        pipe = self.redis.pipeline(transaction=transaction)
        for args in commands:
            pipe.execute_command(*args)
        try:
            results = await pipe.execute(raise_on_error=False)
        except ResponseError as e:  # a queueing error: Redis discarded the transaction (EXECABORT)
            detail = error_text(e).removeprefix("ERR ")
            return self._respond({"error": f"EXECABORT Transaction discarded because of previous errors: {detail}"},
                                 400)
        finally:
            await pipe.reset()  # type: ignore[no-untyped-call]
        out = [{"error": error_text(r)} if isinstance(r, RedisError) else {"result": encode_result(r, b64)}
               for r in results]
        return self._respond(out)

    async def aclose(self) -> None:
        await self.redis.aclose()


def _lifespan(server: RestServer) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await server.aclose()

    return lifespan


def create_app(redis_url: str, token: str, *, ca_bundle: str | None = None) -> Starlette:
    """The REST stand-in as an ASGI app; ``app.state.server`` holds the :class:`RestServer`."""
    server = RestServer(redis_url, token, ca_bundle=ca_bundle)
    methods = ["GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS"]
    app = Starlette(routes=[Route("/", server.dispatch, methods=methods),
                            Route("/{rest:path}", server.dispatch, methods=methods)],
                    lifespan=_lifespan(server))
    app.state.server = server
    return app


def main(argv: list[str] | None = None) -> None:
    """Serve on loopback. The token and the Redis URL (it may hold a password) come from the environment only."""
    import uvicorn

    from whatrack.errors import ConfigError
    from whatrack.settings import Settings

    p = argparse.ArgumentParser(prog="python -m whatrack.devstack.upstash_rest_server",
                                description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    s = Settings.from_env(env_files=())
    s.require("UPSTASH_REDIS_URL", "UPSTASH_REDIS_REST_TOKEN")
    assert s.upstash_redis_url and s.upstash_redis_rest_token
    if len(s.upstash_redis_rest_token.reveal()) < 16:
        raise ConfigError("UPSTASH_REDIS_REST_TOKEN", "is too short for a token (16 characters at least)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(s.upstash_redis_url, s.upstash_redis_rest_token.reveal(), ca_bundle=s.redis_ca_bundle)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
