"""The server guard: servers a process started are stopped when it dies without stopping them (SIGKILL).

Real parts: a Python process that starts a redis-server and an embedded PostgreSQL of its own, then is killed. The
test run enabled the guard (``conftest``), so the processes it starts (these, notebook kernels) guard theirs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from whatrack.devstack import guard, process

_OWNER = """
import json, sys
from pathlib import Path
from whatrack.devstack import servers

# no guard.enable() here: WHATRACK_GUARD=1, inherited from the test run, is what enables it
work = Path(sys.argv[1])
redis = servers.RedisServer(work / "redis").start()
pg = servers.EmbeddedPostgres(work / "pg").start()
print(json.dumps({"redis": redis.server.pid, "pg_url": pg.url, "sockdir": str(pg.sockdir),
                  "pgdata": str(pg._pgdata)}), flush=True)
if sys.argv[2] == "clean":
    redis.stop()
    pg.remove()
    print("stopped", flush=True)
sys.stdin.read()  # killed here (or gone with the test: its stdin closes)
"""


def _owner(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    assert os.environ.get(guard.ENV) == "1"  # set by conftest's guard.enable(), inherited by the owner
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline())
    return proc, started


def _postmaster(pg_url: str) -> psutil.Process | None:
    port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            return psutil.Process(c.pid)
    return None


def _gone(pid: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_the_servers_of_a_killed_process_are_stopped_and_their_files_removed(tmp_path: Path) -> None:
    proc, started = _owner(tmp_path, "killed")
    with proc:
        postmaster = _postmaster(started["pg_url"])
        assert postmaster is not None and psutil.pid_exists(int(started["redis"]))
        os.kill(proc.pid, signal.SIGKILL)  # no finally, no atexit: only the guard is left to clean up
    assert _gone(int(started["redis"])), "redis-server still running after its owner was killed"
    assert _gone(postmaster.pid), "PostgreSQL still running after its owner was killed"
    deadline = time.monotonic() + 10
    while Path(started["sockdir"]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(started["sockdir"]).exists()
    if not Path(started["pgdata"]).is_relative_to(tmp_path):  # as root the data lives in the temp dir: removed too
        assert not Path(started["pgdata"]).exists()


def test_a_clean_stop_leaves_the_guard_nothing_to_do(tmp_path: Path) -> None:
    proc, started = _owner(tmp_path, "clean")
    with proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "stopped"
        guards = [p for p in psutil.Process(proc.pid).children()
                  if "whatrack.devstack.guard" in " ".join(p.cmdline())]
        assert len(guards) == 1
        proc.communicate("")  # stdin closed: the owner exits normally
    guards[0].wait(20)  # the guard exits too, having nothing left to stop
    assert not Path(started["sockdir"]).exists()


_UNGUARDED = """
import sys
from pathlib import Path
from whatrack.devstack import guard, servers

with guard.disabled():  # as `whatrack stack up` starts its stack (it inherited WHATRACK_GUARD=1 from the test run)
    redis = servers.RedisServer(Path(sys.argv[1]) / "redis").start()
print(redis.server.pid, redis.server.started, flush=True)
sys.stdin.read()
"""


def test_servers_outlive_the_process_that_started_them_when_guarding_is_disabled(tmp_path: Path) -> None:
    """``whatrack stack up`` starts servers meant to outlive it: it starts them with the guard disabled."""
    with subprocess.Popen([sys.executable, "-c", _UNGUARDED, str(tmp_path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        pid, created = proc.stdout.readline().split()
        os.kill(proc.pid, signal.SIGKILL)
    try:
        assert not _gone(int(pid), within_s=1.5)  # still serving
    finally:
        process.stop(int(pid), float(created))


def test_the_guard_is_off_inside_disabled_only() -> None:
    """``whatrack stack up`` runs in-process in some tests: the guard must be back on for the rest of the run."""
    with guard.disabled():
        assert guard.watch(rmtree=[]) is None
        assert guard.ENV not in os.environ  # nor do the processes started inside guard theirs
    assert os.environ.get(guard.ENV) == "1"
    key = guard.watch(rmtree=[])  # nothing to do, if it ever came to it
    assert key is not None
    guard.forget(key)


_COMMAND = """
import os, sys
from whatrack import cli
from whatrack.devstack import guard

assert guard.ENV not in os.environ and not guard._enabled  # a command started from a shell, not from a test run
code = cli.main(["normalize", sys.argv[1]])
print(code, os.environ.get(guard.ENV), guard._enabled)
"""


def test_every_command_guards_the_servers_it_starts() -> None:
    """``whatrack run``, ``lab`` and ``faults`` bring a devstack up for their own lifetime: a SIGKILL of the command
    must not leave it running (``whatrack stack up`` opts out, above). The command line enables the guard itself."""
    fixture = Path(__file__).parents[1] / "whatrack" / "fixtures" / "uazapi" / "messages_inbound_text.json"
    env = {k: v for k, v in os.environ.items() if k != guard.ENV}
    out = subprocess.run([sys.executable, "-c", _COMMAND, str(fixture)],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split()[-3:] == ["0", "1", "True"]
