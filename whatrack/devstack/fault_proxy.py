"""A TCP proxy that breaks a link on command: latency, connection resets, or a full outage, each for N seconds.

It sits in front of any part of the offline stack (PostgreSQL, Centrifugo, the "Upstash" Redis), carries TLS
transparently (it only moves bytes), and optionally terminates TLS itself (``server_ssl``), which is how a
redis-server built without TLS is made to look like Upstash. Control it from Python (:class:`FaultProxy` methods)
or over HTTP (:func:`control_app`, driven by :class:`FaultControl`). Without ``--control-port`` it is a plain TLS
front (servers.RedisServer starts it so): no HTTP endpoint, and neither starlette nor httpx is imported.

    python -m whatrack.devstack.fault_proxy --listen-port 7001 --target 127.0.0.1:6379 --control-port 7002
    python -m whatrack.devstack.fault_proxy --listen-port 7001 --target 127.0.0.1:6380 --tls-cert C --tls-key K
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from whatrack.errors import StackError

if TYPE_CHECKING:  # imported where used: a TLS front without control endpoint starts faster without them
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse

log = logging.getLogger("whatrack.devstack.fault_proxy")


@dataclass
class FaultState:
    """What is broken right now. ``until`` is a monotonic deadline (``None``: until :meth:`FaultProxy.heal`)."""

    latency_ms: float = 0.0
    reset: bool = False
    outage: bool = False
    until: float | None = None
    counters: dict[str, int] = field(default_factory=lambda: {"accepted": 0, "reset": 0, "refused_window": 0})


def _abort_with_rst(transport: asyncio.BaseTransport) -> None:
    """Close a connection with a TCP RST (SO_LINGER 0), the way a crashed peer or a middlebox does."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; what it reads goes to its peer (now, or ``latency`` later)."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self._last_due = 0.0  # keeps order when the latency changes mid-stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        with contextlib.suppress(OSError, AttributeError):
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.link.made(self)

    def _deliver(self, action: Callable[[], None]) -> None:
        ms = self.link.proxy.state.latency_ms
        loop = asyncio.get_running_loop()
        if not ms and self._last_due <= loop.time():
            action()
            return
        self._last_due = max(self._last_due, loop.time() + ms / 1000.0)
        loop.call_at(self._last_due, action)

    def data_received(self, data: bytes) -> None:
        self._deliver(lambda: self._write_peer(data))

    def _write_peer(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        def half_close() -> None:
            peer = self.peer
            if peer is not None and peer.transport is not None and not peer.transport.is_closing():
                if peer.transport.can_write_eof():
                    peer.transport.write_eof()
                else:
                    peer.transport.close()

        self._deliver(half_close)
        return True  # keep our side open for the other direction (TLS transports close anyway)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(self, exc)

    # Flow control: when a peer's send buffer fills, stop reading here until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Link:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.closed = False

    def made(self, side: _Side) -> None:
        if side is not self.client:
            assert self.client.transport is not None
            self.client.transport.resume_reading()
            return
        assert side.transport is not None
        state = self.proxy.state
        state.counters["accepted"] += 1
        if state.reset or state.outage:
            state.counters["refused_window"] += 1
            self.closed = True
            _abort_with_rst(side.transport)
            return
        side.transport.pause_reading()  # until the upstream is connected
        self.proxy._links.add(self)
        task = asyncio.get_running_loop().create_task(self._connect())
        self.proxy._tasks.add(task)
        task.add_done_callback(self.proxy._tasks.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self.upstream, *self.proxy.target)
        except OSError:
            self.abort(rst=True)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        other = side.peer
        if other is not None and other.transport is not None and not other.transport.is_closing():
            # the peer went: pass the end on (after any delayed data), as a reset if it was one
            if exc is not None:
                other._deliver(lambda: _abort_with_rst(other.transport) if other.transport else None)
            else:
                other._deliver(lambda: other.transport.close() if other.transport else None)
        if all(s.transport is None or s.transport.is_closing() for s in (self.client, self.upstream)):
            self.closed = True
            self.proxy._links.discard(self)

    def abort(self, *, rst: bool) -> None:
        for s in (self.client, self.upstream):
            if s.transport is not None and not s.transport.is_closing():
                if rst:
                    _abort_with_rst(s.transport)
                else:
                    s.transport.abort()
        self.closed = True
        self.proxy._links.discard(self)


class FaultProxy:
    """An asyncio TCP proxy ``listen_host:listen_port`` → ``target_host:target_port`` with injectable faults."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 server_ssl: ssl.SSLContext | None = None) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = listen_port
        self.server_ssl = server_ssl
        self.state = FaultState()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._heal_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        await self._listen()
        log.info("fault proxy 127.0.0.1:%d -> %s:%d (tls termination: %s)", self.port, *self.target,
                 self.server_ssl is not None)
        return self

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Link(self).client, self.listen_host, self.port,
                                                ssl=self.server_ssl, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._heal_task:
            self._heal_task.cancel()
        if self._server:
            self._server.close()
            self._server = None
        self._cut_all()
        if self._tasks:  # upstream connections still being made: let them finish (and be cut)
            await asyncio.wait(set(self._tasks), timeout=5)
            self._cut_all()
        await asyncio.sleep(0)  # let the aborted transports call connection_lost

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- faults ---------------------------------------------------------------------------------------------------

    async def latency(self, ms: float, seconds: float | None = None) -> None:
        """Delay every chunk by ``ms`` in each direction (for ``seconds``, else until :meth:`heal`)."""
        if ms < 0:
            raise StackError(f"latency must be >= 0 ms, got {ms}")
        await self._set(FaultState(latency_ms=float(ms), counters=self.state.counters), seconds)

    async def reset(self, seconds: float | None = None) -> None:
        """Reset every open connection now; for ``seconds`` also reset each new one as soon as it is accepted."""
        self._cut_all(rst=True)
        if seconds:
            await self._set(FaultState(reset=True, counters=self.state.counters), seconds)

    async def outage(self, seconds: float | None = None) -> None:
        """Refuse new connections (nothing listens) and cut the open ones, for ``seconds`` or until :meth:`heal`."""
        await self._set(FaultState(outage=True, counters=self.state.counters), seconds)
        if self._server:
            self._server.close()
            self._server = None
        self._cut_all(rst=True)

    async def heal(self) -> None:
        """End every fault now."""
        if self._heal_task and self._heal_task is not asyncio.current_task():
            self._heal_task.cancel()
        self._heal_task = None
        if self.state.outage or self._server is None:
            await self._listen()  # listening again before the state says healed: a caller may connect at once
        self.state = FaultState(counters=self.state.counters)
        log.info("fault proxy :%d healed", self.port)

    async def _set(self, new: FaultState, seconds: float | None) -> None:
        if self._heal_task:
            self._heal_task.cancel()
            self._heal_task = None
        if self.state.outage and not new.outage and self._server is None:
            await self._listen()
        new.until = time.monotonic() + seconds if seconds else None
        self.state = new
        if seconds:
            self._heal_task = asyncio.create_task(self._heal_later(seconds))
        log.info("fault proxy :%d fault latency=%sms reset=%s outage=%s for %s s", self.port, new.latency_ms,
                 new.reset, new.outage, seconds)

    async def _heal_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.heal()

    def status(self) -> dict[str, Any]:
        s = self.state
        remaining = max(0.0, s.until - time.monotonic()) if s.until else None
        fault = "outage" if s.outage else "reset" if s.reset else "latency" if s.latency_ms else "none"
        return {"port": self.port, "target": f"{self.target[0]}:{self.target[1]}", "fault": fault,
                "latency_ms": s.latency_ms, "remaining_s": remaining, "open_connections": len(self._links),
                **s.counters}

    def _cut_all(self, *, rst: bool = False) -> None:
        for link in list(self._links):
            link.abort(rst=rst)
            if rst:
                self.state.counters["reset"] += 1
        self._links.clear()


# -- HTTP control ---------------------------------------------------------------------------------------------------


def _float_arg(request: Request, name: str, default: float | None = None) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    return float(raw)


def control_app(proxy: FaultProxy) -> Starlette:
    """The control endpoint: ``POST /latency?ms=&seconds=``, ``/reset?seconds=``, ``/outage?seconds=``, ``/heal``;
    ``GET /status``. Each answers with the status object."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(proxy.status())

    async def act(request: Request) -> JSONResponse:
        action = request.path_params["action"]
        try:
            seconds = _float_arg(request, "seconds")
            if action == "latency":
                await proxy.latency(_float_arg(request, "ms", 0.0) or 0.0, seconds)
            elif action == "reset":
                await proxy.reset(seconds)
            elif action == "outage":
                await proxy.outage(seconds)
            elif action == "heal":
                await proxy.heal()
            else:
                return JSONResponse({"error": f"unknown action {action!r}: use latency, reset, outage or heal"},
                                    status_code=404)
        except (ValueError, StackError) as e:
            return JSONResponse({"error": f"bad parameter: {e}"}, status_code=400)
        return JSONResponse(proxy.status())

    return Starlette(routes=[Route("/status", status, methods=["GET"]),
                             Route("/health", status, methods=["GET"]),
                             Route("/{action}", act, methods=["POST"])])


class FaultControl:
    """Drives a fault proxy's HTTP control endpoint (``url`` as recorded in the stack's state file)."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _post(self, action: str, **params: float | None) -> dict[str, Any]:
        import httpx

        q = {k: str(v) for k, v in params.items() if v is not None}
        try:
            r = httpx.post(f"{self.url}/{action}", params=q, timeout=self.timeout)
        except httpx.HTTPError as e:
            raise StackError(f"fault proxy control at {self.url} did not answer: {e}") from e
        if r.status_code != 200:
            raise StackError(f"fault proxy refused {action}: {r.text}")
        out: dict[str, Any] = r.json()
        return out

    def latency(self, ms: float, seconds: float | None = None) -> dict[str, Any]:
        return self._post("latency", ms=ms, seconds=seconds)

    def reset(self, seconds: float | None = None) -> dict[str, Any]:
        return self._post("reset", seconds=seconds)

    def outage(self, seconds: float | None = None) -> dict[str, Any]:
        return self._post("outage", seconds=seconds)

    def heal(self) -> dict[str, Any]:
        return self._post("heal")

    def status(self) -> dict[str, Any]:
        import httpx

        try:
            r = httpx.get(f"{self.url}/status", timeout=self.timeout)
        except httpx.HTTPError as e:
            raise StackError(f"fault proxy control at {self.url} did not answer: {e}") from e
        out: dict[str, Any] = r.json()
        return out


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context for terminating TLS in the proxy."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    sctx = server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    proxy = await FaultProxy(host or "127.0.0.1", int(port), listen_port=args.listen_port, server_ssl=sctx).start()
    try:
        if args.control_port is None:  # a TLS front: serve until SIGTERM / SIGINT
            done = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, done.set)
            await done.wait()
            return
        import uvicorn

        config = uvicorn.Config(control_app(proxy), host="127.0.0.1", port=args.control_port, log_level="warning",
                                access_log=False, lifespan="off")
        await uvicorn.Server(config).serve()
    finally:
        await proxy.close()


def _loop_factory(front_only: bool) -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop for a plain TLS front when installed (``uvicorn[standard]`` brings it): it moves TLS records
    with less CPU per hop (PING through the front: 61 us against 80 us). Not for a fault proxy: under uvloop a
    connection accepted after an outage's re-listen hangs (uvloop 0.23), so faults run on asyncio's own loop."""
    if front_only:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m whatrack.devstack.fault_proxy", description=__doc__.splitlines()[0])
    p.add_argument("--listen-port", type=int, required=True)
    p.add_argument("--target", required=True, help="host:port to forward to")
    p.add_argument("--control-port", type=int, help="HTTP control endpoint port (loopback); none: a plain TLS front")
    p.add_argument("--tls-cert", help="terminate TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="... and this key (PEM)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.tls_cert is None) != (args.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    with asyncio.Runner(loop_factory=_loop_factory(args.control_port is None)) as runner:
        runner.run(_serve(args))


if __name__ == "__main__":
    main()
