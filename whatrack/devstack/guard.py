"""A guard process: stops the servers a process started when that process dies without stopping them.

A test run or a benchmark owns its servers for its own lifetime: embedded PostgreSQL (daemonized by ``pg_ctl``), Redis
processes in sessions of their own, a devstack. Its ``finally`` blocks stop them; but a SIGKILL, an OOM kill, or a
Ctrl-C that lands in the middle of the clean-up skips those, and the servers ran on with nobody to stop them.

Once :func:`enable` is called (the test suite's ``conftest``, every ``whatrack`` command,
:func:`whatrack.cli.run_script` for the benchmarks), the servers started in this process, and in the processes it starts
(``WHATRACK_GUARD=1`` in their environment: notebook kernels, commands run as subprocesses), are registered with one
guard process per owner: ``python -m whatrack.devstack.guard``, in a session of its own (a Ctrl-C to the terminal does
not reach it), reading its orders on a pipe. When the pipe closes (its owner exited, however it exited), it carries out
what is still registered: stop the processes (SIGTERM, then SIGKILL), run the stop commands, remove the directories. A
server its owner stopped itself is forgotten first, so a clean exit leaves the guard nothing to do. Servers meant to
outlive the command that started them (``whatrack stack up``) are never registered: that command starts them inside
:func:`disabled`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("whatrack.devstack.guard")

_pipe: IO[str] | None = None
_proc: subprocess.Popen[str] | None = None
#: Set by :func:`enable` for the processes this one starts: they guard what they start too.
ENV = "WHATRACK_GUARD"
_enabled = os.environ.get(ENV) == "1"
_released = False  # this process is exiting: no new guard
_count = 0
_lock = threading.Lock()  # servers start in threads too (the devstack starts PostgreSQL beside the rest)


def enable() -> None:
    """Guard the servers this process, and the processes it starts, start from now on (see the module docstring)."""
    global _enabled
    _enabled = True
    os.environ[ENV] = "1"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Start servers meant to outlive this process (``whatrack stack up``): none started inside is guarded, nor
    by the processes started inside. The guard is as it was afterwards."""
    global _enabled
    was, inherited = _enabled, os.environ.pop(ENV, None)
    _enabled = False
    try:
        yield
    finally:
        _enabled = was
        if inherited is not None:
            os.environ[ENV] = inherited


def watch(*, pid: int | None = None, started: float | None = None, run: list[str] | None = None,
          rmtree: list[str] | None = None) -> str | None:
    """Register what to do if this process dies first: stop ``pid`` (its process group; ``started``: its start time,
    so a reused pid is left alone), run the command ``run``, remove the directories ``rmtree``.

    Returns the key to :func:`forget` it by, or ``None`` when guarding is not enabled (or the guard cannot start:
    the servers still run, unguarded, and the owner's own clean-up still stops them).
    """
    global _count
    if not _enabled:
        return None
    with _lock:
        _count += 1
        key = str(_count)
    return key if _send({"key": key, "pid": pid, "started": started, "run": run, "rmtree": rmtree or []}) else None


def forget(key: str | None) -> None:
    """The owner stopped it itself: nothing left for the guard to do about ``key``."""
    if key is not None:
        _send({"forget": key})


def _send(order: dict[str, Any]) -> bool:
    with _lock:  # one whole line at a time
        return _send_locked(order)


def _send_locked(order: dict[str, Any]) -> bool:
    global _pipe, _proc
    if _released:
        return False
    try:
        if _pipe is None:
            _proc = subprocess.Popen([sys.executable, "-m", "whatrack.devstack.guard"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     text=True, cwd="/")  # not the owner's directory, which may go first
            _pipe = _proc.stdin
            atexit.register(_release)
        assert _pipe is not None
        _pipe.write(json.dumps(order) + "\n")
        _pipe.flush()
        return True
    except (OSError, ValueError) as e:  # the guard died (it never should): the owner's own clean-up still runs
        log.warning("the server guard is gone (%s): servers started from now on are not guarded", e)
        return False


def _release() -> None:
    """At a clean exit: close the pipe (the guard carries out what is left, normally nothing, and exits by itself)."""
    global _pipe, _proc, _released
    _released = True
    if _pipe is not None:
        with contextlib.suppress(OSError):
            _pipe.close()
    if _proc is not None:
        _proc.returncode = 0  # not waited for, on purpose: it runs on after this process; no "still running" warning
    _pipe = _proc = None


# -- the guard process ------------------------------------------------------------------------------------------


def carry_out(order: dict[str, Any]) -> None:
    """What the owner left undone for one server: stop its process group, run its stop command, remove its files."""
    from whatrack.devstack.process import stop

    if order.get("pid"):
        stop(int(order["pid"]), order.get("started"))
    if order.get("run"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(order["run"], capture_output=True, timeout=60, check=False)
    for path in order.get("rmtree") or []:
        shutil.rmtree(Path(path), ignore_errors=True)


def main() -> None:
    """Read orders until the owner's end of the pipe closes; then carry out the ones not forgotten, newest first."""
    pending: dict[str, dict[str, Any]] = {}
    for line in sys.stdin:
        with contextlib.suppress(ValueError):
            order = json.loads(line)
            if "forget" in order:
                pending.pop(str(order["forget"]), None)
            else:
                pending[str(order["key"])] = order
    for order in reversed(list(pending.values())):
        with contextlib.suppress(Exception):  # one failing must not keep the others running
            carry_out(order)


if __name__ == "__main__":
    main()
