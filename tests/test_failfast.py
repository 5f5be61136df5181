"""Fail fast, name the fix (issue 12 item 3): a broken configuration stops a command within seconds with one line.

``whatrack serve`` with a wrong PostgreSQL password, an unmigrated database, an unreachable server or a malformed
signing key exits non-zero at start-up (it used to listen and answer 503 to every delivery); ``/readyz`` is 503 while
the database is down and ``/healthz`` stays 200. ``whatrack loadtest`` with nothing listening at
``WEBHOOK_PUBLIC_URL`` stops before it publishes, naming the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from whatrack.devstack import servers
from whatrack.devstack.fault_proxy import FaultProxy
from whatrack.devstack.serving import serving
from whatrack.errors import ConfigError, StoreError
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.webhook.app import create_app
from whatrack.webhook.startup import check_database, check_signing_keys

CURRENT = "sig_failfastCurrentKey000000000000"
NEXT = "sig_failfastNextKey00000000000000000"
#: Seconds a fail-fast command may take (the issue's bound; before the fix these commands never exited by themselves).
FAIL_FAST_S = 15


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QSTASH_", "DATABASE_", "CENTRIFUGO_"))}
    try:
        return subprocess.run([sys.executable, "-m", "whatrack.cli", *args], env={**base, **env}, cwd=cwd,
                              capture_output=True, text=True, timeout=FAIL_FAST_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"whatrack {args[0]} did not stop within {FAIL_FAST_S} s: {e.stderr!r}")


def _serve_env(database_url: str, **over: str) -> dict[str, str]:
    port = servers.free_port()
    return {"DATABASE_URL": database_url, "QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT,
            "WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}{WEBHOOK_PATH}",
            "CENTRIFUGO_API_URL": "http://127.0.0.1:1/api", "CENTRIFUGO_API_KEY": "cent-key", **over}


def _with_login(url: str, user: str, password: str) -> str:
    p = urlsplit(url)
    return urlunsplit(p._replace(netloc=f"{user}:{password}@{p.hostname}:{p.port}"))


@pytest.fixture
def password_role(pg_admin_url: str, make_migrated_database: Callable[[], str]) -> Iterator[tuple[str, str]]:
    """A login role that PostgreSQL authenticates by password (a pg_hba line for it alone, scram-sha-256), and a
    migrated database it owns. Yields (the database URL with the right password, the password)."""
    role, password = f"ff_{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    db_url = make_migrated_database()
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        hba = Path(str(admin.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
        if not os.access(hba, os.W_OK):
            pytest.skip(f"cannot edit {hba} to make PostgreSQL ask for a password")
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        original = hba.read_text()
        hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{original}")
        admin.execute("SELECT pg_reload_conf()")
    with psycopg.connect(db_url, autocommit=True) as db:
        db.execute(f"GRANT SELECT ON alembic_version TO {role}")
    try:
        yield _with_login(db_url, role, password), password
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            hba.write_text(original)
            admin.execute("SELECT pg_reload_conf()")
        with psycopg.connect(db_url, autocommit=True) as db:
            db.execute(f"REVOKE ALL ON alembic_version FROM {role}")
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {role}")


# -- whatrack serve at start-up ------------------------------------------------------------------------------------


def test_serve_with_a_wrong_password_exits_with_one_line(password_role: tuple[str, str], tmp_path: Path) -> None:
    good_url, password = password_role
    assert check_database(good_url)  # the right password passes: the failure below is the password's
    wrong = _with_login(good_url, urlsplit(good_url).username or "", "not-the-password")
    r = _run(["serve"], _serve_env(wrong), tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "DATABASE_URL" in lines[0] and "refused the login" in lines[0]
    assert "not-the-password" not in r.stderr and password not in r.stderr


def test_serve_on_an_unmigrated_database_says_db_upgrade(make_pg_database: Callable[[], str],
                                                          tmp_path: Path) -> None:
    r = _run(["serve"], _serve_env(make_pg_database()), tmp_path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "has no whatrack schema" in r.stderr and "whatrack db upgrade" in r.stderr


def test_serve_with_no_database_listening_exits_with_one_line(tmp_path: Path) -> None:
    url = f"postgresql://whatrack:pw@127.0.0.1:{servers.free_port()}/whatrack"
    r = _run(["serve"], _serve_env(url), tmp_path)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "DATABASE_URL: no PostgreSQL answers" in r.stderr and "pw@" not in r.stderr


@pytest.mark.parametrize("value", ["notakey", "sig_short", "eyJhbGciOiJIUzI1NiJ9.token.value"])
def test_malformed_signing_keys_are_refused_before_listening(value: str, tmp_path: Path) -> None:
    settings = Settings.from_env({"QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": value},
                                 env_files=())
    with pytest.raises(ConfigError) as e:
        check_signing_keys(settings)
    assert e.value.variable == "QSTASH_NEXT_SIGNING_KEY" and value not in str(e.value)
    check_signing_keys(Settings.from_env({"QSTASH_CURRENT_SIGNING_KEY": CURRENT, "QSTASH_NEXT_SIGNING_KEY": NEXT},
                                         env_files=()))
    r = _run(["serve"], _serve_env("postgresql://u:p@127.0.0.1:1/x", QSTASH_CURRENT_SIGNING_KEY=value), tmp_path)
    assert r.returncode == 2 and "QSTASH_CURRENT_SIGNING_KEY" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and value not in r.stderr


def test_unreachable_database_is_a_store_error_not_a_config_error() -> None:
    with pytest.raises(StoreError):
        check_database(f"postgresql+psycopg://u:p@127.0.0.1:{servers.free_port()}/x")


# -- /readyz -------------------------------------------------------------------------------------------------------


async def test_readyz_is_503_while_the_database_is_down(make_migrated_database: Callable[[], str]) -> None:
    db = urlsplit(make_migrated_database())
    assert db.hostname and db.port
    async with FaultProxy(db.hostname, db.port) as proxy:
        through = urlunsplit(db._replace(netloc=f"{db.username or 'postgres'}@127.0.0.1:{proxy.port}"))
        port = servers.free_port()
        settings = Settings.from_env(_serve_env(through) | {
            "WEBHOOK_PUBLIC_URL": f"http://127.0.0.1:{port}{WEBHOOK_PATH}"}, env_files=())
        async with serving(create_app(settings), port=port) as base, httpx.AsyncClient(timeout=30) as c:
            assert (await c.get(f"{base}/readyz")).status_code == 200
            await proxy.outage()
            down = await c.get(f"{base}/readyz")
            assert down.status_code == 503 and "password" not in down.text
            assert (await c.get(f"{base}/healthz")).status_code == 200  # liveness: the process is fine
            await proxy.heal()
            assert (await c.get(f"{base}/readyz")).status_code == 200


# -- loadtest / replay: something must answer at WEBHOOK_PUBLIC_URL -------------------------------------------------


def _silent_url() -> str:
    return f"http://127.0.0.1:{servers.free_port()}{WEBHOOK_PATH}"


@pytest.mark.parametrize("command", [["loadtest", "-n", "100"], ["replay"]])
def test_publishing_commands_stop_when_nothing_answers(command: list[str], tmp_path: Path) -> None:
    url = _silent_url()
    env = {"DATABASE_URL": f"postgresql://u:p@127.0.0.1:{servers.free_port()}/x", "QSTASH_TOKEN": "qstash-token",
           "QSTASH_URL": f"http://127.0.0.1:{servers.free_port()}", "WEBHOOK_PUBLIC_URL": url,
           "CENTRIFUGO_API_URL": "http://127.0.0.1:1/api", "CENTRIFUGO_API_KEY": "cent-key"}
    r = _run(command, env, tmp_path)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"nothing answers at WEBHOOK_PUBLIC_URL={url}" in last
    assert "whatrack serve" in last and "--serve" in last


async def test_require_endpoint_accepts_any_http_answer() -> None:
    from starlette.applications import Starlette

    from whatrack.proof.replay import require_endpoint

    async with serving(Starlette()) as base:  # no routes at all: every path answers 404, which still "answers"
        assert await require_endpoint(f"{base}{WEBHOOK_PATH}") == 404
    with pytest.raises(ConfigError) as e:
        await require_endpoint(_silent_url())
    assert e.value.variable == "WEBHOOK_PUBLIC_URL"


async def test_messages_qstash_still_retries_are_undelivered_never_lost(devstack_env: dict[str, str]) -> None:
    """Nothing listens at the destination: the broker keeps each message in RETRY on its backoff. The ledger counts
    them undelivered (pending, not passed); once QStash gives up (here: cancelled), they count lost."""
    from whatrack.proof.generate import generate
    from whatrack.proof.ledger import classify, collect, wait_until
    from whatrack.proof.load import close_publisher, publish_all
    from whatrack.qstash import Publisher
    from whatrack.realtime import Realtime
    from whatrack.store.api import Store

    settings = Settings.from_env(devstack_env, env_files=())
    assert settings.database_url and settings.qstash_token
    publisher = Publisher(settings.qstash_token.reveal(), base_url=settings.qstash_url, destination=_silent_url())
    store, realtime = Store.from_url(settings.database_url), Realtime.from_settings(settings)
    try:
        sent = await publish_all(publisher, generate(5, seed=77, instances=1, leads=2), retries=3, bar=False)
        ids = [s.qstash_id for s in sent if s.qstash_id]
        assert len(ids) == 5

        async def retrying() -> bool:
            return set((await publisher.states(ids)).values()) <= {"RETRY", "ERROR"} and \
                len(await publisher.states(ids)) == 5

        assert await wait_until(retrying, timeout=30, interval=0.2), await publisher.states(ids)
        held = classify(sent, await collect(store, realtime, publisher, sent, organization_id=-1))
        assert held.undelivered == 5 and held.lost == 0, held.summary()
        assert not held.passed and held.summary().startswith("PENDING")
        assert all("QStash retrying" in e.detail for e in held.entries)
        for mid in ids:
            await publisher.client.message.cancel(mid)

        async def settled() -> bool:
            return set((await publisher.states(ids)).values()) == {"CANCELED"}

        assert await wait_until(settled, timeout=30, interval=0.2), await publisher.states(ids)
        gone = classify(sent, await collect(store, realtime, publisher, sent, organization_id=-1))
        assert gone.lost == 5 and gone.undelivered == 0, gone.summary()
    finally:
        await close_publisher(publisher)
        await realtime.aclose()
        await store.aclose()


# -- whatrack run and phase 00: every problem at once, before any kernel -------------------------------------------


def test_every_wrong_and_missing_setting_is_listed_at_once_with_an_example(tmp_path: Path) -> None:
    from whatrack.runs import preflight

    env = {"DATABASE_URL": "mysql://u:p@127.0.0.1/x", "UPSTASH_REDIS_URL": "redis://eu1-x.upstash.io:6379",
           "WHATRACK_REDIS_CA_BUNDLE": str(tmp_path / "no-such-ca.pem"), "QSTASH_TOKEN": "qstash-token"}
    problems = preflight.settings_problems(env, preflight.REQUIRED, env_files=())
    by_name = {p.variable: p for p in problems}
    assert {"DATABASE_URL", "UPSTASH_REDIS_URL", "WHATRACK_REDIS_CA_BUNDLE"} <= set(by_name)
    assert {"LEGACY_REDIS_URL", "QSTASH_CURRENT_SIGNING_KEY", "WEBHOOK_PUBLIC_URL", "CENTRIFUGO_API_KEY"} <= \
        {p.variable for p in problems if "is not set" in p.problem}
    assert "QSTASH_TOKEN" not in by_name
    assert all(p.example for p in problems if p.variable != "WHATRACK_REDIS_CA_BUNDLE" or p.example)
    text = preflight.problems_text(problems)
    assert "p@" not in text and "qstash-token" not in text


def test_run_lists_missing_settings_before_any_kernel_starts(tmp_path: Path) -> None:
    import json

    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    r = _run(["run", "00", "--no-stack", "--notebooks", str(notebooks), "--runs-dir", str(tmp_path / "runs")],
             {}, tmp_path)
    assert r.returncode == 1, r.stderr
    assert "not started" in r.stderr and "QSTASH_TOKEN: is not set" in r.stderr and "(example: " in r.stderr
    (run_json,) = (tmp_path / "runs").glob("*/run.json")
    phases = json.loads(run_json.read_text())["phases"]
    assert [p["status"] for p in phases] == ["not-run"]  # no kernel was started for it


def test_run_on_a_stopped_devstack_says_so_in_one_line(tmp_path: Path) -> None:
    stopped = tmp_path / "stack"
    stopped.mkdir()
    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    r = _run(["run", "00", "--notebooks", str(notebooks), "--runs-dir", str(tmp_path / "runs")],
             {"WHATRACK_STACK_DIR": str(stopped), "WHATRACK_MODE": "offline"}, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "WHATRACK_STACK_DIR" in lines[0] and "whatrack stack up" in lines[0], r.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_phase_00_checks_asks_every_service_for_real(devstack_env: dict[str, str]) -> None:
    from whatrack.runs import preflight

    good = Settings.from_env(devstack_env, env_files=())
    assert [p for p in preflight.check_services(good) if p.severity == "error"] == []
    broken = {**devstack_env, "QSTASH_TOKEN": "not-the-token", "CENTRIFUGO_API_KEY": "not-the-key",
              "QSTASH_NEXT_SIGNING_KEY": "sig_" + "N" * 28}
    broken.pop("WHATRACK_REDIS_CA_BUNDLE", None)
    problems = preflight.check_services(Settings.from_env(broken, env_files=()))
    found = {p.variable: p.problem for p in problems if p.severity == "error"}
    assert "refused the token" in found["QSTASH_TOKEN"]
    assert "refused the API key" in found["CENTRIFUGO_API_KEY"]
    assert "WHATRACK_REDIS_CA_BUNDLE" in found["UPSTASH_REDIS_URL"]  # TLS to the stack's CA, without the bundle
    assert "not-the-token" not in str(problems) and "not-the-key" not in str(problems)


def test_serve_with_a_good_configuration_starts_is_ready_and_stops_on_sigterm(
        make_migrated_database: Callable[[], str], tmp_path: Path) -> None:
    import signal
    import time

    import psutil

    env = _serve_env(make_migrated_database())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("QSTASH_", "DATABASE_", "CENTRIFUGO_"))}
    root = urlsplit(env["WEBHOOK_PUBLIC_URL"])._replace(path="").geturl()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "whatrack.cli", "serve", "--workers", "2"],
                                env={**base, **env}, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{root}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "serve did not start"
                time.sleep(0.2)
        assert httpx.get(f"{root}/readyz", timeout=10).status_code == 200
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(workers, timeout=10)  # the last ones may still be exiting: a bounded wait
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the credentials refused while serving -------------------------------------------------------------------------


async def test_credentials_refused_while_serving_go_to_the_dlq_not_to_retries(
        password_role: tuple[str, str], fixtures_dir: Path) -> None:
    """The password changed under a running endpoint: no retry can fix that, so a delivery is answered 489 (QStash's
    DLQ keeps it for a replay after the fix), never a 503 that spends QStash's retries; /readyz names DATABASE_URL."""
    import json

    from whatrack.devstack.qstash.sign import sign
    from whatrack.store.api import Store

    good_url, _ = password_role
    role = urlsplit(good_url).username
    admin_url = urlunsplit(urlsplit(good_url)._replace(netloc=f"postgres@{urlsplit(good_url).hostname}:"
                                                              f"{urlsplit(good_url).port}"))
    fixture = json.loads((fixtures_dir / "messages_inbound_text.json").read_text())
    with psycopg.connect(admin_url, autocommit=True) as db:
        db.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}")
        db.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}")
    store = Store.from_url(admin_url)
    await store.register_instance("Acme", fixture["instanceName"], fixture["token"], owner=fixture["owner"])
    port = servers.free_port()
    public = f"http://127.0.0.1:{port}{WEBHOOK_PATH}"
    settings = Settings.from_env(_serve_env(good_url) | {"WEBHOOK_PUBLIC_URL": public}, env_files=())

    async def deliver(c: httpx.AsyncClient, external_id: str) -> httpx.Response:
        body = json.dumps(fixture | {"message": fixture["message"] | {"messageid": external_id,
                                                                       "id": f"{fixture['owner']}:{external_id}"}})
        return await c.post(public, content=body, headers={"Content-Type": "application/json",
                                                            "Upstash-Signature": sign(body.encode(), public, CURRENT)})

    try:
        async with serving(create_app(settings), port=port) as base, httpx.AsyncClient(timeout=30) as c:
            assert (await deliver(c, "AUTH0000000000000001")).status_code == 200
            with psycopg.connect(admin_url, autocommit=True) as db:  # the password changes; its sessions end
                db.execute(f"ALTER ROLE {role} PASSWORD 'rotated-elsewhere'")
                db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
            refused = await deliver(c, "AUTH0000000000000002")
            assert refused.status_code == 489, refused.text
            assert refused.headers["Upstash-NonRetryable-Error"] == "true"
            assert refused.json()["error"] == "database_auth_failed"
            ready = await c.get(f"{base}/readyz")
            assert ready.status_code == 503 and "DATABASE_URL" in ready.text, ready.text
            assert "rotated-elsewhere" not in ready.text + refused.text
        assert (await store.counts())["message"] == 1  # the refused one waits in the DLQ, not half-written here
    finally:
        await store.aclose()
        with psycopg.connect(admin_url, autocommit=True) as db:
            db.execute(f"DROP OWNED BY {role}")  # its grants, so that the fixture can drop the role
