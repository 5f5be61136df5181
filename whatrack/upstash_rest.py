"""The Upstash Redis REST client (official ``upstash-redis``), built from settings, telemetry off.

Cloud mode reaches Upstash over HTTPS; offline mode reaches the devstack's stand-in on loopback. The client cannot
tell the two apart, and neither can the code that uses it.
"""

from __future__ import annotations

import logging

import upstash_redis
import upstash_redis.asyncio

from whatrack.errors import ConfigError
from whatrack.settings import Settings

log = logging.getLogger("whatrack.upstash_rest")

#: One retry after 1 s: a REST call is one HTTP request, and the SDK's default 3 s pause stalls a webhook too long.
REST_RETRIES = 1
REST_RETRY_INTERVAL_S = 1.0


def _credentials(settings: Settings) -> tuple[str, str]:
    settings.require("UPSTASH_REDIS_REST_URL", "UPSTASH_REDIS_REST_TOKEN")
    url, token = settings.upstash_redis_rest_url, settings.upstash_redis_rest_token
    if not url or not token:  # require() guarantees both; this narrows the types
        raise ConfigError("UPSTASH_REDIS_REST_URL", "is not set")
    return url.rstrip("/"), token.reveal()


def from_settings(settings: Settings) -> upstash_redis.asyncio.Redis:
    """An asyncio ``upstash_redis`` client for the REST URL and token in ``settings``.

    Raises:
        ConfigError: ``UPSTASH_REDIS_REST_URL`` or ``UPSTASH_REDIS_REST_TOKEN`` is missing.
    """
    url, token = _credentials(settings)
    log.info("upstash REST client for %s", url)
    return upstash_redis.asyncio.Redis(url, token, rest_retries=REST_RETRIES,
                                       rest_retry_interval=REST_RETRY_INTERVAL_S, allow_telemetry=False)


def from_settings_sync(settings: Settings) -> upstash_redis.Redis:
    """A blocking ``upstash_redis`` client (notebooks, probes).

    Raises:
        ConfigError: ``UPSTASH_REDIS_REST_URL`` or ``UPSTASH_REDIS_REST_TOKEN`` is missing.
    """
    url, token = _credentials(settings)
    log.info("upstash REST client (sync) for %s", url)
    return upstash_redis.Redis(url, token, rest_retries=REST_RETRIES, rest_retry_interval=REST_RETRY_INTERVAL_S,
                               allow_telemetry=False)
