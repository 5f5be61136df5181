"""Shared fixtures: real Redis and PostgreSQL servers, a clean environment, fresh databases, one offline devstack.

Servers: PostgreSQL at ``WHATRACK_TEST_PG_URL`` or the machine's own on 127.0.0.1:5432 when it answers, else the
embedded one; Redis is always a redis-server process of our own on a free port, so tests never touch anyone's data.
Migrated databases are copies of a template migrated once per session (``CREATE DATABASE ... TEMPLATE``); the
devstack is brought up once per session for the tests that only use it (tests that kill parts keep their own).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from whatrack.devstack import servers
from whatrack.devstack.stack import Stack
from whatrack.settings import SECRET_ENV_NAMES

#: The UAZAPI webhook fixtures: the copies the package ships (``whatrack.proof.replay`` replays them), in this repo.
FIXTURES = Path(__file__).resolve().parent.parent / "whatrack" / "fixtures" / "uazapi"

_SETTING_NAMES = (
    "DATABASE_URL", "UPSTASH_REDIS_URL", "UPSTASH_REDIS_REST_URL", "QSTASH_URL", "CENTRIFUGO_API_URL",
    "UAZAPI_BASE_URL", "WEBHOOK_PUBLIC_URL", "LEGACY_REDIS_URL", "WHATRACK_REDIS_CA_BUNDLE", "WHATRACK_MODE",
    *SECRET_ENV_NAMES,
)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C and SIGTERM (a CI timeout, ``kill``) stop the whole run, and the session's fixtures are torn down, so
    the servers they started (PostgreSQL, Redis, devstack parts) stop with it instead of being left running.

    Ctrl-C raises ``KeyboardInterrupt`` wherever the run is. Left to the default, the event loop of an async test
    (``asyncio.Runner``) turns it into a cancellation of that test alone: the test failed and the run went on.
    SIGTERM acts as Ctrl-C (:func:`whatrack.cli.stop_on_sigterm`), where it used to end the run at once and leave
    every server running.
    """
    from whatrack.cli import stop_on_sigterm
    from whatrack.devstack import guard

    signal.signal(signal.SIGINT, _interrupt)
    stop_on_sigterm()
    guard.enable()  # and whatever this run's clean-up does not reach (a SIGKILL), the guard stops


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's settings or `.env`: each starts from a clean environment."""
    for name in _SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Put the root logger back after each test: a test running ``whatrack.cli.main`` in-process configures it (as
    the command does) with a handler on that test's captured stderr, which later records would hit once closed."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The UAZAPI webhook fixtures shipped in the package (whatrack/fixtures/uazapi)."""
    if not FIXTURES.is_dir():
        pytest.fail(f"UAZAPI fixtures not found at {FIXTURES}: restore whatrack/fixtures/uazapi from git")
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


@pytest.fixture(scope="session")
def migrated_template(pg_admin_url: str) -> Iterator[str]:
    """The name of a database migrated to the head revision once per session: the template of
    :func:`make_migrated_database` (nothing else connects to it, as ``CREATE DATABASE ... TEMPLATE`` requires)."""
    from whatrack.store.api import Store

    name = f"whatrack_tmpl_{uuid.uuid4().hex[:12]}"
    url = servers.create_database(pg_admin_url, name)

    async def migrate() -> None:
        store = Store.from_url(url)
        try:
            await store.upgrade()
        finally:
            await store.aclose()

    # A thread of its own: the fixture may be first requested from inside an async fixture, where a loop runs.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(migrate())).result()
    yield name
    servers.drop_database(pg_admin_url, name)


def create_from_template(admin_url: str, name: str, template: str) -> str:
    """``CREATE DATABASE name TEMPLATE template`` on the server at ``admin_url``; the URL that reaches it."""
    import psycopg

    with psycopg.connect("postgresql://" + admin_url.split("://", 1)[1], autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    scheme, _, rest = admin_url.partition("://")
    netloc, _, path = rest.partition("/")
    query = "?" + path.split("?", 1)[1] if "?" in path else ""
    return f"{scheme}://{netloc}/{name}{query}"


@pytest.fixture
def make_migrated_database(pg_admin_url: str, migrated_template: str) -> Iterator[Callable[[], str]]:
    """Factory: a fresh PostgreSQL database already at the head revision per call (a libpq URL), dropped after the
    test. A copy of the session's template, so ``Store.upgrade()`` on it finds nothing to do."""
    made: list[str] = []

    def make() -> str:
        name = f"whatrack_test_{uuid.uuid4().hex[:12]}"
        url = create_from_template(pg_admin_url, name, migrated_template)
        made.append(name)
        return url

    yield make
    for name in made:
        servers.drop_database(pg_admin_url, name)


#: The session devstack's QStash broker backoff scale (the notebooks' nbval stack uses the same): QStash's retry
#: delays x 0.05 (0.6 s, 7.4 s, 90 s).
DEVSTACK_TIME_SCALE = 0.05


@pytest.fixture(scope="session")
def devstack(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str,
             migrated_template: str) -> Iterator[Stack]:
    """One offline devstack for the whole session, on a migrated database of its own on the session PostgreSQL.

    For tests that only use the stack: a test that kills or pauses a part, or needs an empty stack, brings up its
    own (``running_stack``). Its settings reach a test through :func:`devstack_env`.
    """
    name = f"whatrack_stack_{uuid.uuid4().hex[:10]}"
    stack = Stack(tmp_path_factory.mktemp("devstack"),
                  database_url=create_from_template(pg_admin_url, name, migrated_template))
    try:
        stack.up(time_scale=DEVSTACK_TIME_SCALE)  # on failure: what started is stopped, the error names the part
        yield stack
    finally:
        stack.down()
        servers.drop_database(pg_admin_url, name)


@pytest.fixture
def devstack_env(devstack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The session devstack's settings, exported into this test's environment (undone after it)."""
    env = devstack.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
