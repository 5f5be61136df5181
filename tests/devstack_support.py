"""Helpers for the devstack tests: start a stand-in as the subprocess the stack would start, and stop it by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from whatrack.devstack import servers
from whatrack.devstack.stack import _SETTING_ENV


@contextmanager
def spawn(module: str, args: list[str], env: dict[str, str], port: int, log_dir: Path) -> Iterator[int]:
    """Run ``python -m module args`` with ``env`` (on top of a settings-free environment) until ``port`` answers."""
    child_env = {k: v for k, v in os.environ.items() if k not in _SETTING_ENV}
    child_env.update(env)
    log = log_dir / f"{module.rsplit('.', 1)[-1]}-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=child_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            servers.wait_for_port("127.0.0.1", port, timeout=30)
        except Exception:
            raise RuntimeError(f"{module} did not start: {log.read_text()[-2000:]}") from None
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def tls_redis(workdir: Path) -> Iterator[tuple[servers.RedisServer, Path]]:
    """A redis-server serving TLS only, with a password, and the CA file that verifies it."""
    from whatrack.devstack import tls

    files = tls.make_ca_and_server_cert(workdir / "tls")
    with servers.RedisServer(workdir / "redis", tls=servers.TLSFiles(files.ca, files.cert, files.key),
                             password="test-password-123") as r:
        yield r, files.ca


@contextmanager
def rest_server(redis_url: str, ca: Path, log_dir: Path, token: str) -> Iterator[str]:
    """The Upstash REST stand-in in front of ``redis_url``; yields its URL."""
    port = servers.free_port()
    env = {"UPSTASH_REDIS_URL": redis_url, "UPSTASH_REDIS_REST_TOKEN": token, "WHATRACK_REDIS_CA_BUNDLE": str(ca)}
    with spawn("whatrack.devstack.upstash_rest_server", ["--port", str(port)], env, port, log_dir):
        yield f"http://127.0.0.1:{port}"
