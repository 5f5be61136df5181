"""Read a Centrifugo configuration file (the JSON an operator gives the real server) into what the stand-in needs.

Supported formats:

- **v6** (current): ``{"client": {"token": {"hmac_secret_key"}, "allowed_origins", "ping_interval",
  "pong_timeout", "allow_anonymous_connect_without_token", "recovery_max_publication_limit"},
  "channel": {"without_namespace": {...}, "namespaces": [{"name", ...}]}, "http_api": {"key"}}``;
- **v4/v5** (flat): ``token_hmac_secret_key``, ``allowed_origins``, ``ping_interval``, ``pong_timeout``,
  ``allow_anonymous_connect_without_token``, ``client_recovery_max_publication_limit``, channel options at the top
  level for channels without a namespace, and ``namespaces``, ``api_key``.

Channel options read (both formats): ``history_size``, ``history_ttl`` (a Go duration string such as ``"300s"`` or
``"168h"``), ``presence``, ``force_recovery``, ``allow_recovery``, ``allow_subscribe_for_client``,
``allow_subscribe_for_anonymous``, ``allow_publish_for_client``, ``allow_publish_for_subscriber``,
``allow_history_for_client``, ``allow_history_for_subscriber``, ``allow_presence_for_client``,
``allow_presence_for_subscriber``. Other keys are accepted and ignored, as a config for the real server may hold
more than the stand-in serves. Secrets in the file (HMAC key, API key) are ignored with a warning: the stand-in
takes them from the environment only.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from whatrack.errors import ConfigError

log = logging.getLogger(__name__)

#: The Centrifugo configuration shipped with whatrack (package data): what an operator gives the real server.
SHIPPED_CONFIG = "centrifugo.json"

_NAME = re.compile(r"^[-a-zA-Z0-9_.]{2,}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_BOOL_OPTIONS = ("presence", "force_recovery", "allow_recovery", "allow_subscribe_for_client",
                 "allow_subscribe_for_anonymous", "allow_publish_for_client", "allow_publish_for_subscriber",
                 "allow_history_for_client", "allow_history_for_subscriber", "allow_presence_for_client",
                 "allow_presence_for_subscriber")


@dataclass(frozen=True)
class Namespace:
    """A channel namespace's options, named as in Centrifugo's configuration."""

    history_size: int = 0
    history_ttl_s: float = 0
    presence: bool = False
    force_recovery: bool = False
    allow_recovery: bool = False
    allow_subscribe_for_client: bool = False
    allow_subscribe_for_anonymous: bool = False
    allow_publish_for_client: bool = False
    allow_publish_for_subscriber: bool = False
    allow_history_for_client: bool = False
    allow_history_for_subscriber: bool = False
    allow_presence_for_client: bool = False
    allow_presence_for_subscriber: bool = False

    @property
    def history(self) -> bool:
        return self.history_size > 0 and self.history_ttl_s > 0


#: History on, bounded large enough for a loss ledger (one load test's messages), as tests configure it.
LEDGER_NAMESPACE = Namespace(history_size=200_000, history_ttl_s=7 * 24 * 3600, presence=True, force_recovery=True)


@dataclass(frozen=True)
class Config:
    """What the stand-in serves: namespaces (``""`` is channels without a namespace) and client options."""

    namespaces: dict[str, Namespace] = field(default_factory=lambda: {"": Namespace()})
    allowed_origins: tuple[str, ...] = ()
    ping_interval_s: float = 25.0
    pong_timeout_s: float = 8.0
    allow_anonymous_connect_without_token: bool = False
    recovery_max_publication_limit: int = 300
    source: str = ""

    def namespace(self, channel: str) -> Namespace | None:
        """The options of ``channel``'s namespace (the part before the first ``:``), or None when unknown."""
        name = channel.split(":", 1)[0] if ":" in channel else ""
        return self.namespaces.get(name)


def shipped_config_path() -> Path:
    """The path of the shipped ``whatrack/centrifugo.json``."""
    return Path(str(resources.files("whatrack").joinpath(SHIPPED_CONFIG)))


def parse_duration(value: Any, where: str) -> float:
    """A Go duration string (``"300s"``, ``"1h30m"``, ``"0"``) in seconds.

    Raises:
        ConfigError: not a duration string.
    """
    if isinstance(value, str):
        s = value.strip()
        if s == "0":
            return 0.0
        parts = _DURATION_PART.findall(s)
        if parts and "".join(n + u for n, u in parts) == s:
            return sum(float(n) * _UNIT_S[u] for n, u in parts)
    raise ConfigError(where, f"must be a duration string, got {value!r}", '"300s"')


def _bool(opts: dict[str, Any], key: str, where: str) -> bool:
    v = opts.get(key, False)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}", f"must be true or false, got {v!r}", "true")
    return v


def _int(opts: dict[str, Any], key: str, where: str, default: int = 0) -> int:
    v = opts.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{where}.{key}", f"must be a non-negative integer, got {v!r}", "1000")
    return v


def _namespace(opts: Any, where: str) -> Namespace:
    if not isinstance(opts, dict):
        raise ConfigError(where, "must be an object of channel options", '{"history_size": 100}')
    ttl = parse_duration(opts["history_ttl"], f"{where}.history_ttl") if "history_ttl" in opts else 0.0
    return Namespace(history_size=_int(opts, "history_size", where), history_ttl_s=ttl,
                     **{k: _bool(opts, k, where) for k in _BOOL_OPTIONS})


def _namespaces(root: dict[str, Any], default: Any, items: Any, where: str) -> dict[str, Namespace]:
    out = {"": _namespace(default, f"{where} (channels without namespace)")}
    if items is None:
        return out
    if not isinstance(items, list):
        raise ConfigError(f"{where}.namespaces", "must be a list of namespace objects",
                          '[{"name": "conversation", "history_size": 100, "history_ttl": "300s"}]')
    for i, ns in enumerate(items):
        here = f"{where}.namespaces[{i}]"
        name = ns.get("name") if isinstance(ns, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{here}.name", f"must match {_NAME.pattern}, got {name!r}", "conversation")
        if name in out:
            raise ConfigError(f"{here}.name", f"namespace {name!r} is defined twice", "conversation")
        out[name] = _namespace(ns, here)
    return out


def parse_config(raw: dict[str, Any], source: str = "") -> Config:
    """Build a :class:`Config` from a parsed Centrifugo configuration (v6 nested, or v4/v5 flat).

    Raises:
        ConfigError: a known key has the wrong shape; the message names the key.
    """
    where = source or "centrifugo config"
    v6 = isinstance(raw.get("client"), dict) or isinstance(raw.get("channel"), dict)
    if v6:
        client = raw.get("client") or {}
        channel = raw.get("channel") or {}
        secret = (client.get("token") or {}).get("hmac_secret_key") if isinstance(client.get("token"), dict) else None
        api_key = (raw.get("http_api") or {}).get("key") if isinstance(raw.get("http_api"), dict) else None
        namespaces = _namespaces(raw, channel.get("without_namespace") or {}, channel.get("namespaces"),
                                 f"{where}: channel")
        limit_key, limits = "recovery_max_publication_limit", client
    else:
        client = raw
        secret, api_key = raw.get("token_hmac_secret_key"), raw.get("api_key")
        namespaces = _namespaces(raw, raw, raw.get("namespaces"), where)
        limit_key, limits = "client_recovery_max_publication_limit", raw
    for name, value in (("HMAC secret key", secret), ("HTTP API key", api_key)):
        if value:
            log.warning("%s: the %s in the file is ignored; the stand-in reads secrets from the environment",
                        where, name)
    origins = client.get("allowed_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"{where}: allowed_origins", "must be a list of origins", '["https://crm.example.com"]')
    return Config(
        namespaces=namespaces,
        allowed_origins=tuple(origins),
        ping_interval_s=parse_duration(client.get("ping_interval", "25s"), f"{where}: ping_interval"),
        pong_timeout_s=parse_duration(client.get("pong_timeout", "8s"), f"{where}: pong_timeout"),
        allow_anonymous_connect_without_token=_bool(client, "allow_anonymous_connect_without_token", where),
        recovery_max_publication_limit=_int(limits, limit_key, where, 300),
        source=source,
    )


def load_config(path: str | Path | None = None) -> Config:
    """Read a Centrifugo JSON configuration file (default: the shipped one).

    Raises:
        ConfigError: the file is missing, not JSON, or a known key has the wrong shape.
    """
    p = Path(path) if path is not None else shipped_config_path()
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("--config", f"no Centrifugo configuration file at {p}", str(shipped_config_path())) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("--config", f"{p} is not a JSON Centrifugo configuration: {e}",
                          str(shipped_config_path())) from None
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{p} must hold a JSON object", str(shipped_config_path()))
    return parse_config(raw, p.name)
