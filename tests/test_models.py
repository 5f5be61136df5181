"""Models and migrations: the migrated schema is exactly the models on PostgreSQL and SQLite; pure row helpers;
the ``instances`` and ``db`` commands."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from store_helpers import TOKEN, message, outbound

from whatrack import cli
from whatrack.errors import ConfigError, PayloadError
from whatrack.events import STATUS_ORDER
from whatrack.store import rows as store_rows
from whatrack.store.api import Store
from whatrack.store.models import ALL_TABLES, Base, UTCDateTime
from whatrack.store.upgrade import alembic_config, head_revision


@pytest.fixture(params=["postgresql", pytest.param("sqlite", marks=pytest.mark.sqlite)])
def db_url(request: pytest.FixtureRequest, make_pg_database: Callable[[], str], tmp_path: Path) -> str:
    """A fresh, empty database (never migrated)."""
    if request.param == "postgresql":
        return make_pg_database()
    return f"sqlite:///{tmp_path}/models.db"


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrations_build_exactly_the_models(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        assert await store.revision() is None
        async with store.engine.connect() as conn:
            assert len(await conn.run_sync(_diff)) > 0  # the comparison does see a missing schema
        await store.upgrade()
        await store.upgrade()  # idempotent
        assert await store.revision() == head_revision()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert names == {*ALL_TABLES, "alembic_version"}
    finally:
        await store.aclose()


async def test_downgrade_to_base_and_back(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        await store.upgrade()
        async with store.engine.begin() as conn:
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "base"))
            assert await conn.run_sync(lambda c: set(inspect(c).get_table_names())) <= {"alembic_version"}
        await store.upgrade()
        assert (await store.counts())["message"] == 0
    finally:
        await store.aclose()


async def test_concurrent_upgrades_do_not_collide(db_url: str) -> None:
    stores = [Store.from_url(db_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.upgrade() for s in stores))
        assert await stores[0].revision() == head_revision()
    finally:
        for s in stores:
            await s.aclose()


# -- the UTC type ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect_name", ["postgresql", "sqlite"])
def test_utc_datetime_normalises_zones(dialect_name: str) -> None:
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
    from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite

    dialect = PGDialect_psycopg() if dialect_name == "postgresql" else SQLiteDialect_aiosqlite()  # type: ignore[no-untyped-call]
    t = UTCDateTime()
    brt = datetime(2026, 1, 1, 7, 0, tzinfo=timezone(timedelta(hours=-3)))
    stored = t.process_bind_param(brt, dialect)
    assert stored is not None and stored.hour == 10
    assert (stored.tzinfo is None) == (dialect_name == "sqlite")  # SQLite keeps one naive-UTC text format
    back = t.process_result_value(datetime(2026, 1, 1, 10, 0), dialect)
    assert back == datetime(2026, 1, 1, 10, 0, tzinfo=UTC) and back is not None and back.tzinfo == UTC
    assert t.process_bind_param(None, dialect) is None


# -- pure row helpers -----------------------------------------------------------------------------------------------


def test_message_values_outbound_is_user_inbound_is_lead() -> None:
    assert store_rows.message_values(message())["sender_type"] == "LEAD"
    out = store_rows.message_values(outbound())
    assert (out["sender_type"], out["direction"], out["status"]) == ("USER", "outbound", "sent")


def test_receipt_sources_never_move_backwards() -> None:
    for i, status in enumerate(STATUS_ORDER):
        sources = store_rows.receipt_sources(status)
        assert status not in sources
        assert all(STATUS_ORDER.index(s) < i for s in sources if s != "failed")
        assert "deleted" not in sources
    assert store_rows.receipt_sources("failed") == ("pending", "sent")
    assert "deleted" not in store_rows.receipt_sources("deleted")
    with pytest.raises(PayloadError):
        store_rows.receipt_sources("Read")  # the normalizer lower-cases; the store refuses the raw form


def test_check_message_event_names_the_field() -> None:
    with pytest.raises(PayloadError, match="lead_phone has 40 characters, the limit is 32"):
        store_rows.check_message_event(replace(message(), lead_phone="9" * 40))
    store_rows.check_message_event(message(text="x" * 1_000_000))  # content has no limit


def test_realtime_payload_shape() -> None:
    row = {"id": 7, "content": "oi", "sender_type": "USER", "sent_at": datetime(2026, 1, 1, 10, tzinfo=UTC),
           "conversation_id": 3, "external_id": "E1", "type": "text", "direction": "outbound"}
    assert store_rows.realtime_payload(row) == {"id": 7, "content": "oi", "senderType": "USER",
                                                "sentAt": "2026-01-01T10:00:00Z", "conversationId": 3,
                                                "externalId": "E1", "type": "text", "direction": "outbound"}
    assert store_rows.channel(3) == "conversation:3"
    assert store_rows.token_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# -- commands -------------------------------------------------------------------------------------------------------


def test_instances_and_db_commands(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    assert cli.main(["db", "upgrade"]) == 0
    assert f"revision {head_revision()}" in capsys.readouterr().out

    monkeypatch.setenv("INSTANCE_TOKEN", TOKEN)
    assert cli.main(["instances", "add", "--organization", "acme", "--name", "inst-a", "--owner", "5511999990000",
                     "--token-env", "INSTANCE_TOKEN"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("token-from-stdin-42\n"))
    assert cli.main(["instances", "add", "--organization", "acme", "--name", "inst-b"]) == 0
    assert cli.main(["instances", "list"]) == 0
    out = capsys.readouterr()
    assert "inst-a" in out.out and "inst-b" in out.out and "5511999990000" in out.out
    assert TOKEN not in out.out + out.err and "token-from-stdin-42" not in out.out + out.err
    assert store_rows.token_hash(TOKEN) not in out.out

    async def found() -> tuple[Any, Any]:
        s = Store.from_url(db_url)
        try:
            return await s.find_instance("inst-a", TOKEN), await s.find_instance("inst-b", "token-from-stdin-42")
        finally:
            await s.aclose()

    a, b = asyncio.run(found())
    assert a is not None and b is not None

    monkeypatch.delenv("INSTANCE_TOKEN")
    assert cli.main(["instances", "add", "--organization", "acme", "--name", "x", "--token-env",
                     "INSTANCE_TOKEN"]) == 2
    assert "INSTANCE_TOKEN" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # there is no way to put a token on the command line...
        cli.main(["instances", "add", "--organization", "acme", "--name", "x", "--token", TOKEN])
    capsys.readouterr()
    # ... and a token pasted where the variable name goes is refused without being echoed
    assert cli.main(["instances", "add", "--organization", "acme", "--name", "x", "--token-env", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "--token-env" in err and TOKEN not in err


def test_commands_need_database_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["db", "upgrade"]) == 2
    assert "DATABASE_URL" in capsys.readouterr().err


def test_read_token_refuses_empty() -> None:
    from whatrack.store.cli import read_token

    assert read_token("T", {"T": " tok "}) == "tok"
    with pytest.raises(ConfigError, match="T: is not set"):
        read_token("T", {"T": ""})
