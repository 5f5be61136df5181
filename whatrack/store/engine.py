"""The store's engine: a bounded asyncio connection pool, SQLite write serialization, and the one place where
database exceptions become :class:`~whatrack.errors.StoreError`.

PostgreSQL (psycopg 3 async): a 5 s connect timeout so that an unreachable database fails fast, an optional
``statement_timeout``, ``pool_pre_ping`` so that connections that died with a restarted server are replaced.
SQLite (aiosqlite): WAL, foreign keys, a busy timeout, and every transaction opened with ``BEGIN IMMEDIATE`` (and a
process-local lock) so that concurrent writers queue instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError, SQLAlchemyError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from whatrack.errors import PayloadError, StoreError
from whatrack.settings import MASK, Settings

log = logging.getLogger("whatrack.store.engine")

T = TypeVar("T")

#: Seconds to wait for a TCP connection to PostgreSQL: long enough for a slow network, short enough that a webhook
#: fails (and QStash retries) well inside QStash's request timeout.
CONNECT_TIMEOUT_S = 5
#: Seconds to wait for a free pooled connection before giving up with StoreError.
POOL_TIMEOUT_S = 10
#: SQLite's busy handler waits this long for another process's write lock.
SQLITE_BUSY_TIMEOUT_S = 30
#: Attempts of one transaction when the database reports a deadlock, a serialization failure or a locked file.
MAX_ATTEMPTS = 5

# SQLSTATEs a retry of the same transaction fixes: serialization_failure, deadlock_detected.
_RETRY_SQLSTATES = {"40001", "40P01"}


def normalise_url(url: str) -> str:
    """Accept ``postgresql://``, ``postgres://``, ``sqlite:///`` too (Settings maps them to the async drivers)."""
    normalised = Settings.from_env({"DATABASE_URL": url}, env_files=()).database_url
    assert normalised is not None
    return normalised


def make_engine(url: str, *, pool_size: int, statement_timeout_ms: int | None) -> AsyncEngine:
    """An AsyncEngine for ``url`` (normalised to psycopg / aiosqlite) with a bounded pool."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, pool_size=pool_size)
    connect_args: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "whatrack"}
    if statement_timeout_ms:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_ms)}"
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_timeout=POOL_TIMEOUT_S, pool_pre_ping=True,
        pool_recycle=1800, connect_args=connect_args,
    )


def _sqlite_engine(url: str, *, pool_size: int) -> AsyncEngine:
    memory = url.rstrip("/").endswith(("sqlite+aiosqlite:", ":memory:")) or "mode=memory" in url
    kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    if not memory:  # an in-memory database lives in one connection (StaticPool): no pool to size
        kwargs |= {"pool_size": pool_size, "max_overflow": pool_size, "pool_timeout": POOL_TIMEOUT_S,
                   "pool_pre_ping": True}
    engine = create_async_engine(url, **kwargs)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control from the sqlite3 module, so that the "begin" hook below decides how to begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", f"busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}",
                       "synchronous=NORMAL"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead of one of them
        # failing later with "database is locked" when it upgrades a read lock.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _sqlstate(e: BaseException) -> str | None:
    orig = getattr(e, "orig", None)
    return getattr(orig, "sqlstate", None)


def is_retryable(e: BaseException) -> bool:
    """Whether running the same transaction again may succeed right away (deadlock, serialization, locked)."""
    if _sqlstate(e) in _RETRY_SQLSTATES:
        return True
    return isinstance(e, DBAPIError) and "database is locked" in str(getattr(e, "orig", ""))


def describe(e: BaseException) -> str:
    """A one-line, secret-free description of a database error (no SQL, no parameters, no URL)."""
    orig = getattr(e, "orig", None) or e
    first = (str(orig).strip().splitlines() or [""])[0][:240]
    state = _sqlstate(e)
    kind = type(orig).__name__
    return f"{kind}{f' [{state}]' if state else ''}: {first}" if first else kind


class Database:
    """An engine plus the transaction runner every Store operation goes through."""

    def __init__(self, url: str, *, pool_size: int = 10, statement_timeout_ms: int | None = None) -> None:
        self.engine = make_engine(url, pool_size=pool_size, statement_timeout_ms=statement_timeout_ms)
        self.dialect = self.engine.dialect.name
        # SQLAlchemy hides the password as "***"; show whatrack's one mask instead.
        self.safe_url = self.engine.url.render_as_string(hide_password=True).replace(":***@", f":{MASK}@", 1)
        # SQLite has one writer at a time: queue this process's transactions here rather than in the busy handler.
        self._lock = asyncio.Lock() if self.dialect == "sqlite" else None
        db_file = self.engine.url.database if self.dialect == "sqlite" else None
        self._sqlite_dir = Path(db_file).parent if db_file and db_file != ":memory:" else None

    @contextlib.asynccontextmanager
    async def _serialized(self) -> AsyncIterator[None]:
        if self._lock is None:
            yield
            return
        async with self._lock:
            yield

    async def transaction(self, op: str, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction; retry it on deadlock / serialization failure / locked database.

        Raises:
            PayloadError: a value the database can never hold (retrying cannot help).
            StoreError: any other database failure (``from`` the original); nothing of the transaction is kept.
        """
        if self._sqlite_dir is not None and not self._sqlite_dir.is_dir():
            # Checked here, not left to the driver: aiosqlite leaks a worker thread when its connect fails.
            raise StoreError(f"database {op} failed: the SQLite directory {self._sqlite_dir} does not exist; "
                             "create it or fix DATABASE_URL")
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                async with self._serialized(), self.engine.begin() as conn:
                    return await fn(conn)
            except (SQLAlchemyError, UnicodeEncodeError, OSError, TimeoutError) as e:
                if isinstance(e, DataError | UnicodeEncodeError) or (
                        isinstance(e, StatementError) and isinstance(e.orig, UnicodeEncodeError)):
                    # A value the database can never hold (a NUL in text, a lone surrogate, an out-of-range
                    # number): retrying cannot help, so it is non-retryable for the caller (the webhook answers 489).
                    raise PayloadError("unstorable_value", f"database {op} refused a value: {describe(e)}") from e
                if attempt < MAX_ATTEMPTS and is_retryable(e):
                    log.debug("%s: %s, attempt %d, retrying", op, describe(e), attempt)
                    await asyncio.sleep(random.uniform(0.005, 0.05) * attempt)  # jitter: do not collide again
                    continue
                log.warning("%s failed on %s: %s", op, self.safe_url, describe(e))
                raise StoreError(f"database {op} failed: {describe(e)}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def dispose(self) -> None:
        await self.engine.dispose()
