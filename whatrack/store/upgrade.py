"""Running the packaged Alembic migrations (``whatrack/store/alembic``) on a store's own connection.

No ``alembic.ini`` is needed: the script location is the installed package directory, so ``Store.upgrade()`` works
from a wheel as well as from the checkout.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger("whatrack.store.upgrade")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "alembic"

#: pg_advisory_xact_lock key: two processes starting at once migrate one after the other ("whatrack" in hex-ish).
_LOCK_KEY = 0x77_68_61_74_72_61_63_6B


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config pointing at the packaged migrations (and at ``connection`` when given)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade_sync(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    before = current_revision(connection)
    command.upgrade(alembic_config(connection), "head")
    after = current_revision(connection)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)


async def upgrade(conn: AsyncConnection) -> None:
    """Migrate the database of ``conn`` to the head revision, inside the caller's transaction."""
    await conn.run_sync(_upgrade_sync)


async def revision(conn: AsyncConnection) -> str | None:
    """The database's current Alembic revision (None when it was never migrated)."""
    return await conn.run_sync(current_revision)
