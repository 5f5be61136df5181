"""Shared fixtures: real Redis and PostgreSQL servers, a clean environment, fresh databases.

Servers: PostgreSQL at ``WHATRACK_TEST_PG_URL`` or the machine's own on 127.0.0.1:5432 when it answers, else the
embedded one; Redis is always a redis-server process of our own on a free port, so tests never touch anyone's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from whatrack.devstack import servers
from whatrack.settings import SECRET_ENV_NAMES

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "uazapi"

_SETTING_NAMES = (
    "DATABASE_URL", "UPSTASH_REDIS_URL", "UPSTASH_REDIS_REST_URL", "QSTASH_URL", "CENTRIFUGO_API_URL",
    "UAZAPI_BASE_URL", "WEBHOOK_PUBLIC_URL", "LEGACY_REDIS_URL", "WHATRACK_REDIS_CA_BUNDLE", "WHATRACK_MODE",
    *SECRET_ENV_NAMES,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's settings or `.env`: each starts from a clean environment."""
    for name in _SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The UAZAPI webhook fixtures shipped in ../shared/fixtures/uazapi."""
    if not FIXTURES.is_dir():
        pytest.fail(f"UAZAPI fixtures not found at {FIXTURES}: the repo expects ../shared beside it")
    return FIXTURES


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A libpq URL of a PostgreSQL server on which the tests may create databases."""
    given = os.environ.get("WHATRACK_TEST_PG_URL")
    if given:
        yield given
        return
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    if servers.postgres_answers(local):
        yield local
        return
    with servers.EmbeddedPostgres(tmp_path_factory.mktemp("pg")) as pg:
        yield pg.url


@pytest.fixture
def make_pg_database(pg_admin_url: str) -> Iterator[Callable[[], str]]:
    """Factory: a fresh, empty PostgreSQL database per call (a libpq URL), dropped after the test."""
    made: list[str] = []

    def make() -> str:
        name = f"whatrack_test_{uuid.uuid4().hex[:12]}"
        url = servers.create_database(pg_admin_url, name)
        made.append(name)
        return url

    yield make
    for name in made:
        servers.drop_database(pg_admin_url, name)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisServer]:
    """A plain-TCP redis-server process of our own for the whole session."""
    with servers.RedisServer(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture
def redis_url(redis_server: servers.RedisServer) -> str:
    """The session Redis, emptied before the test."""
    import redis

    with redis.Redis.from_url(redis_server.url) as r:
        r.flushall()
    return redis_server.url
