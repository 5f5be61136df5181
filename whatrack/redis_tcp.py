"""redis-py connections for BullMQ and the migration: TLS verified, retried on connection loss, closed cleanly.

The PRD's Node code set ``rejectUnauthorized: false``; that is not ported. ``rediss://`` always verifies the server
certificate and host name, against the system trust store or the CA bundle from settings.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from whatrack.errors import ConfigError
from whatrack.settings import mask_url

log = logging.getLogger("whatrack.redis_tcp")

#: Above BullMQ's longest blocking wait (BZPOPMIN with a 5 s block, plus margin). redis-py 8's default of 5 s cut
#: those waits short: delayed jobs ran 5-11 s late (protocols/bullmq.md).
SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
#: Retries on a dropped connection, with exponential backoff capped at 2 s: a managed Redis restarts or fails over
#: in a few seconds.
RETRIES = 5


def connection_kwargs(url: str, *, ca_bundle: str | None = None, socket_timeout: float | None = SOCKET_TIMEOUT_S,
                      asyncio: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url(url, **kw)``: timeouts, retries and, for ``rediss://``, verified TLS.

    Raises:
        ConfigError: the URL is not a Redis URL.
    """
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("UPSTASH_REDIS_URL", f"not a Redis URL: {mask_url(url)}", "rediss://default:<pw>@host:6379")
    retry_errors: list[type[Exception]] = (
        [aredis.ConnectionError, aredis.TimeoutError] if asyncio else [redis.ConnectionError, redis.TimeoutError])
    kw: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": 15,
        # redis-py 8 warns when a synchronous Retry reaches an asyncio pool: each client gets its own kind.
        "retry": (AsyncRetry if asyncio else Retry)(ExponentialBackoff(cap=2.0, base=0.05), RETRIES),
        "retry_on_error": retry_errors,
    }
    if scheme == "rediss":
        kw["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        kw["ssl_check_hostname"] = True
        if ca_bundle:
            kw["ssl_ca_certs"] = ca_bundle
    return kw


def connect(url: str, *, ca_bundle: str | None = None, decode_responses: bool = False,
            socket_timeout: float | None = SOCKET_TIMEOUT_S, max_connections: int | None = None) -> aredis.Redis:
    """An asyncio client for ``url``. Close it with ``await client.aclose()``."""
    kw = connection_kwargs(url, ca_bundle=ca_bundle, socket_timeout=socket_timeout, asyncio=True)
    if max_connections:
        kw["max_connections"] = max_connections
    return aredis.Redis.from_url(url, decode_responses=decode_responses, **kw)


def connect_sync(url: str, *, ca_bundle: str | None = None, decode_responses: bool = False,
                 socket_timeout: float | None = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A blocking client for ``url`` (migration, probes, notebooks). Close it with ``client.close()``."""
    kw = connection_kwargs(url, ca_bundle=ca_bundle, socket_timeout=socket_timeout, asyncio=False)
    return redis.Redis.from_url(url, decode_responses=decode_responses, **kw)


class RedisPool:
    """One asyncio client per URL, shared by everything in the process; :meth:`aclose` closes them all."""

    def __init__(self, *, ca_bundle: str | None = None) -> None:
        self.ca_bundle = ca_bundle
        self._clients: dict[str, aredis.Redis] = {}

    def get(self, url: str) -> aredis.Redis:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = connect(url, ca_bundle=self.ca_bundle)
            log.info("redis client for %s", mask_url(url))
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
