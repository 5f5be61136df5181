"""Child processes of the devstack and the proofs, handled one way.

A child runs in a session (and process group) of its own, so a signal reaches everything it forked and a Ctrl-C in
the parent's terminal does not. It is stopped with SIGTERM (SIGINT for PostgreSQL's postmaster), then SIGKILL after a
grace period. A process recorded by pid is recognised later by its start time, so a recycled pid is never signalled;
a zombie counts as stopped (a detached child's new parent, pid 1, may reap it late). Errors quote the tail of the
child's log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from whatrack.errors import StackError

log = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL unless a caller says otherwise.
GRACE_S = 5.0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
#: Start times above this are seconds since the epoch (what versions before this one recorded), not since boot.
_EPOCH_STARTS = 1e9


def boot_id() -> str:
    """This boot's id (Linux; ``""`` elsewhere): start times recorded in another boot match no process of this one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def created(pid: int) -> float | None:
    """When process ``pid`` started, or ``None`` when it is gone.

    On Linux in seconds since the machine booted (``/proc/PID/stat``), which a step of the wall clock does not move:
    psutil's ``create_time`` is that plus the boot time in wall-clock seconds, and the boot time moves with every
    clock step (NTP, a laptop or a VM resumed from suspend). Recorded with such a value, a process was "another
    process" after a step, and was never stopped. Elsewhere psutil's ``create_time``.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19]) / _CLOCK_TICKS  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def alive(pid: int | None, started: float | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, when ``started`` (:func:`created`) is given, is the process that
    started then."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is None:
            return True
        now = p.create_time() if started > _EPOCH_STARTS else created(pid)  # recorded by an earlier version
    except psutil.Error:
        return False
    return now is not None and abs(now - started) < 1


def _group_alive(pgid: int) -> bool:
    """Whether a live (non-zombie) process is left in process group ``pgid``."""
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def _signal(pid: int, sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _wait_gone(pid: int, started: float | None, proc: subprocess.Popen[bytes] | None, deadline: float) -> bool:
    """Wait until ``pid`` is gone or ``deadline`` (monotonic) passes; reap it if it is our child."""
    while time.monotonic() < deadline:
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                return True
        elif not alive(pid, started):
            return True
        else:
            time.sleep(0.02)
    return not alive(pid, started) if proc is None else proc.poll() is not None


def stop(pid: int | None, started: float | None = None, *, grace: float = GRACE_S, group: bool = True,
         first: int = signal.SIGTERM, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop process ``pid`` (its whole group when ``group``): ``first`` (SIGTERM), then SIGKILL after ``grace``
    seconds. ``proc``, when this process started it, is reaped. Returns whether it was running.

    A pid whose start time differs from ``started`` is another process now and is left alone.
    """
    child = Child("process", pid or 0, started, proc=proc, group=group, first=first)
    return bool(stop_all([child], grace=grace))


def stop_all(children: Sequence[Child], *, grace: float = GRACE_S) -> list[Child]:
    """Stop ``children`` together: each gets its first signal at once, then each one still running after ``grace``
    seconds (or with processes left in its group) gets SIGKILL. Returns those that were running."""
    running = [c for c in children if c.pid and alive(c.pid, c.started)]
    for c in children:
        if c not in running and c.proc is not None:  # exited already: reap it
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(1)
    deadline = time.monotonic() + grace
    for c in running:
        _signal(c.pid, c.first, group=c.group)
    for c in running:
        gone = _wait_gone(c.pid, c.started, c.proc, deadline)
        if c.group:  # the leader's children (uvicorn's workers, ...) get the rest of the grace period too
            gone = _wait_group_gone(c.pid, deadline) and gone
        if not gone:
            log.warning("%s (pid %d) still running %.0f s after signal %d: SIGKILL", c.name, c.pid, grace, c.first)
            _signal(c.pid, signal.SIGKILL, group=c.group)
            killed = time.monotonic() + 5
            _wait_gone(c.pid, c.started, c.proc, killed)
            if c.group:  # SIGKILL takes effect, not at once: the whole group, not only its leader
                _wait_group_gone(c.pid, killed)
    return running


def _wait_group_gone(pgid: int, deadline: float) -> bool:
    """Wait until no live process is left in group ``pgid`` or ``deadline`` (monotonic) passes; whether none is."""
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _group_alive(pgid)


def stop_popen(proc: subprocess.Popen[bytes] | None, *, grace: float = GRACE_S) -> None:
    """:func:`stop` for a child started here in a session of its own (``start_new_session=True``)."""
    if proc is not None:
        stop(proc.pid, grace=grace, proc=proc)


def kill_popen(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the whole process group of a child started here (as a crash or an OOM kill would), and reap it."""
    if proc is not None and (proc.poll() is None or _group_alive(proc.pid)):  # the leader, or what it left behind
        _signal(proc.pid, signal.SIGKILL, group=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def tail(path: str | Path | None, n: int = 15, sep: str = "\n") -> str:
    """The last ``n`` lines of a log file, joined with ``sep`` (``"(no log)"`` when there is none)."""
    if not path:
        return "(no log)"
    try:
        with open(path, errors="replace") as f:
            return sep.join(f.read().splitlines()[-n:])
    except OSError:
        return "(no log)"


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0, *, child: Child | None = None) -> None:
    """Wait until something accepts TCP connections at ``host:port``; fail at once if ``child`` exits first.

    Raises:
        StackError: nothing answered within ``timeout`` seconds, or ``child`` exited (with its log's last lines).
    """
    deadline = time.monotonic() + timeout
    while True:
        if accepts(host, port):
            return
        if child is not None and not child.alive():
            raise StackError(f"{child.name} exited (code {child.returncode()}) before answering on {host}:{port}; "
                             f"last log lines:\n{child.tail()}")
        if time.monotonic() > deadline:
            extra = f"; last log lines of {child.name}:\n{child.tail()}" if child is not None else ""
            raise StackError(f"nothing answered on {host}:{port} within {timeout:.0f} s{extra}")
        time.sleep(0.01)


@dataclass
class Child:
    """A process started by :meth:`spawn` (or known by pid and start time), with its log file."""

    name: str
    pid: int
    started: float | None
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    group: bool = True  # signal its whole process group (it leads one: started with a session of its own)
    first: int = signal.SIGTERM  # the polite signal (SIGINT for PostgreSQL's postmaster: a fast shutdown)

    @classmethod
    def spawn(cls, argv: Sequence[str], *, name: str, log: Path, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None) -> Child:
        """Start ``argv`` in a session of its own, stdout and stderr appended to ``log``, stdin closed."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, proc.pid, created(proc.pid), log, proc)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return alive(self.pid, self.started)

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, grace: float = GRACE_S) -> bool:
        """SIGTERM to the group, SIGKILL after ``grace`` s. Returns whether it was running."""
        return bool(stop_all([self], grace=grace))

    def kill(self) -> None:
        """SIGKILL to the group now."""
        if self.proc is not None:
            kill_popen(self.proc)
        elif alive(self.pid, self.started):
            _signal(self.pid, signal.SIGKILL, group=True)

    def tail(self, n: int = 15) -> str:
        return tail(self.log, n)

    def wait_for_port(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        """Wait until ``host:port`` answers; if it does not, stop the child and raise with its log's tail."""
        try:
            wait_for_port(host, port, timeout, child=self)
        except StackError:
            self.stop()
            raise
