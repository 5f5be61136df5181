"""What ``whatrack serve`` checks before it listens, and what ``/readyz`` asks the database.

A broken configuration must stop the endpoint at start-up with one line, never turn every delivery into a 503 that
spends QStash's retries: the signing keys' shape, then the database (reachable, the credentials accepted, the schema
at the revision this code needs). An authentication failure is a configuration error (:class:`ConfigError` naming
``DATABASE_URL``), an unreachable server a :class:`StoreError`; neither message carries the password.
"""

from __future__ import annotations

import asyncio
import logging
import re
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from whatrack.errors import ConfigError, StoreError
from whatrack.settings import Settings

log = logging.getLogger("whatrack.webhook.startup")

#: Seconds the start-up check waits for PostgreSQL to accept a connection.
CONNECT_TIMEOUT_S = 5
#: Seconds ``/readyz`` waits for ``SELECT 1`` before it answers 503.
READY_TIMEOUT_S = 3.0

#: A QStash signing key: ``sig_`` and letters/digits (the console's keys are ``sig_`` + 28 base58 characters).
#: ``qstash.Receiver`` accepts any string as the HMAC secret, so a pasted token or ``notakey`` would start and then
#: reject every delivery; 32 characters in all is also PyJWT's minimum HS256 key length.
SIGNING_KEY = re.compile(r"sig_[A-Za-z0-9]{28,}")
_KEY_EXAMPLE = "sig_<key from the Upstash console, QStash > Signing keys>"

#: SQLSTATEs of a refused login: invalid_password, invalid_authorization_specification (no such role, pg_hba).
_AUTH_SQLSTATES = {"28P01", "28000"}


def check_signing_keys(settings: Settings) -> None:
    """Raise for a missing or malformed QStash signing key.

    Raises:
        ConfigError: naming ``QSTASH_CURRENT_SIGNING_KEY`` or ``QSTASH_NEXT_SIGNING_KEY`` (never the value).
    """
    for name in ("QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY"):
        settings.require(name)
        value = getattr(settings, name.lower()).reveal()
        if not SIGNING_KEY.fullmatch(value):
            shape = "does not start with sig_" if not value.startswith("sig_") else \
                "is not sig_ followed by at least 28 letters and digits"
            raise ConfigError(name, f"{shape}; copy the signing key (not the QStash token) from the console",
                              _KEY_EXAMPLE)


def _libpq(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def check_database(database_url: str) -> str | None:
    """Connect to PostgreSQL once, as the endpoint will, and read the schema revision.

    Returns:
        The database's Alembic revision when it is the one this code needs.

    Raises:
        ConfigError: the credentials were refused, the database does not exist, or the schema is missing or at
            another revision (``whatrack db upgrade`` fixes the last two).
        StoreError: no PostgreSQL answers there.
    """
    import psycopg

    from whatrack.store.upgrade import head_revision

    parts = urlsplit(_libpq(database_url))
    where = f"{parts.hostname}:{parts.port or 5432}/{parts.path.lstrip('/')}"
    example = "postgresql://whatrack:<password>@127.0.0.1:5432/whatrack"
    try:
        conn = psycopg.connect(_libpq(database_url), connect_timeout=CONNECT_TIMEOUT_S, application_name="whatrack")
    except psycopg.Error as e:
        reason = str(e).lower()
        refused = e.sqlstate in _AUTH_SQLSTATES or "authentication failed" in reason or "password" in reason
        if refused or ("role" in reason and "does not exist" in reason):
            raise ConfigError("DATABASE_URL", f"PostgreSQL at {where} refused the login of user "
                              f"{parts.username or '(none)'!r}: fix the user name or password", example) from None
        if "database" in reason and "does not exist" in reason:
            raise ConfigError("DATABASE_URL", f"no database {parts.path.lstrip('/')!r} on {where}: create it or fix "
                              "the name", example) from None
        cause = "connection refused" if "refused" in reason else "timed out" if "timeout" in reason else \
            "could not connect"
        raise StoreError(f"DATABASE_URL: no PostgreSQL answers at {where} ({cause}): start it, or fix the host "
                         "and port") from None
    head = head_revision()
    try:
        with conn:
            try:
                current = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            except psycopg.errors.UndefinedTable:
                current = None
    except psycopg.Error as e:
        raise StoreError(f"DATABASE_URL: reading the schema revision at {where} failed "
                         f"({type(e).__name__})") from None
    revision = str(current[0]) if current else None
    if revision != head:
        found = f"is at schema revision {revision}" if revision else "has no whatrack schema"
        raise ConfigError("DATABASE_URL", f"the database at {where} {found}; this version needs {head}: run "
                          "`whatrack db upgrade`")
    return revision


def check_startup(settings: Settings) -> None:
    """Everything ``whatrack serve`` checks before it listens (a few seconds at most).

    Raises:
        ConfigError: a setting is missing or wrong (the message names it and the fix).
        StoreError: the database does not answer.
    """
    settings.require("DATABASE_URL", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY", "WEBHOOK_PUBLIC_URL",
                     "CENTRIFUGO_API_URL", "CENTRIFUGO_API_KEY")
    check_signing_keys(settings)
    assert settings.database_url
    if settings.database_url.startswith("postgresql"):  # build_handler refuses the others with its own line
        revision = check_database(settings.database_url)
        log.info("database answers, schema at revision %s", revision)


async def database_problem(engine: AsyncEngine, timeout: float = READY_TIMEOUT_S) -> str | None:
    """None when ``SELECT 1`` succeeds within ``timeout``; else a short reason (no URL, no password)."""
    async def ping() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    try:
        await asyncio.wait_for(ping(), timeout)
    except TimeoutError:
        return f"no answer within {timeout:.0f} s"
    except Exception as e:  # any failure means "not ready"; the reason is the exception's type only
        if _login_refused(e):
            return "the server refused the login (user, password or database name): fix DATABASE_URL"
        return f"unreachable ({type(e).__name__})"
    return None


def _login_refused(e: BaseException) -> bool:
    """A driver error (SQLAlchemy's wrapper, psycopg's or asyncpg's) that means the credentials or the database
    name were refused, not that the server is down."""
    orig = getattr(e, "orig", None) or e
    state = getattr(orig, "sqlstate", None)
    reason = str(orig).lower()
    return state in _AUTH_SQLSTATES or "authentication failed" in reason or (
        "does not exist" in reason and ("role" in reason or "database" in reason))
