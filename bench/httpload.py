"""A lean HTTP/1.1 load client for the benchmarks: raw asyncio protocols, requests built before the clock starts.

Why not aiohttp or httpx: the client shares this 2-core machine with the server it measures, so every microsecond it
spends is taken from the server. Here a request is a ready ``bytes`` object written to a keep-alive socket, and a
response is parsed only as far as its status line and ``Content-Length``. The client runs in its own process (pinned
to a CPU of its own where the caller asks), reads pickled requests from a file and writes its results as JSON.

Two modes:

- **closed loop** (``rate=0``): ``connections`` sockets, each sending its next request as soon as the previous
  answer arrives: the saturation throughput;
- **open loop** (``rate>0``): request *i* is due at ``start + i / rate`` whether or not earlier ones were answered
  (an idle connection takes it; if none is idle a new one is opened, up to ``connections``; beyond that it waits).
  Latency counts from the due time, not the send time, so queueing in the client is not hidden (no coordinated
  omission).

Usage (as a process): ``python bench/httpload.py REQUESTS.pickle RESULT.json HOST PORT CONNECTIONS RATE [CPU]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from typing import cast


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """One complete HTTP/1.1 POST as bytes."""
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
            "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0
    cpu_s: float = 0.0


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, runner: _Runner) -> None:
        self.runner = runner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.due = 0.0
        self.busy = False
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        self.ready.set_result(None)

    def send(self, request: bytes, due: float) -> None:
        assert self.transport is not None
        self.busy, self.due = True, due
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buf) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buf[:end + 4 + length]
        self.busy = False
        self.runner.done(self, status, time.perf_counter() - self.due)

    def connection_lost(self, exc: Exception | None) -> None:
        self.runner.lost(self, was_busy=self.busy)
        self.busy = False


class _Runner:
    def __init__(self, host: str, port: int, requests: list[bytes], connections: int, rate: float) -> None:
        self.host, self.port, self.requests = host, port, requests
        self.connections, self.rate = connections, rate
        self.results = Results()
        self.next = 0
        self.answered = 0
        self.idle: list[_Conn] = []
        self.open = 0
        self.waiting: list[float] = []  # due times of open-loop requests with no connection free yet
        self.finished = asyncio.get_running_loop().create_future()

    async def connect(self) -> _Conn:
        self.open += 1
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
        await conn.ready
        return conn

    def _account(self) -> None:
        self.answered += 1
        if self.answered == len(self.requests) and not self.finished.done():
            self.finished.set_result(None)

    def done(self, conn: _Conn, status: int, latency: float) -> None:
        r = self.results
        r.latencies.append(latency)
        r.statuses[status] = r.statuses.get(status, 0) + 1
        self._account()
        self._give(conn)

    def lost(self, conn: _Conn, *, was_busy: bool) -> None:
        """A connection closed (the server's keep-alive timeout, or a failure): never send on it again; a request in
        flight on it is an error; requests waiting for a connection get a new one."""
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if was_busy:
            self.results.errors += 1
            self._account()
        if self.waiting and self.open < self.connections and not self.finished.done():
            self.open += 1
            asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """A new connection for a waiting open-loop request (``open`` already counts it)."""
        self.open -= 1
        try:
            conn = await self.connect()
        except OSError:
            while self.waiting:  # nothing answers any more: each waiting request is an error
                self.waiting.pop(0)
                self.next += 1
                self.results.errors += 1
                self._account()
            return
        self._give(conn)

    def _give(self, conn: _Conn) -> None:
        """A connection is free: closed loop sends at once; open loop sends a waiting request or parks it."""
        if self.next >= len(self.requests):
            return
        if not self.rate:
            self._send(conn, time.perf_counter())
        elif self.waiting:
            self._send(conn, self.waiting.pop(0))
        else:
            self.idle.append(conn)

    def _send(self, conn: _Conn, due: float) -> None:
        req = self.requests[self.next]
        self.next += 1
        conn.send(req, due)

    async def run(self) -> Results:
        loop = asyncio.get_running_loop()
        cpu0, t0 = time.process_time(), time.perf_counter()
        if not self.rate:
            conns = [await self.connect() for _ in range(self.connections)]
            t0 = time.perf_counter()
            for c in conns:
                self._give(c)
        else:
            self.idle = [await self.connect() for _ in range(min(8, self.connections))]
            t0 = time.perf_counter()
            for i in range(len(self.requests)):
                due = t0 + i / self.rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.idle:
                    self._send(self.idle.pop(), due)
                elif self.open < self.connections:
                    conn = await self.connect()
                    self._send(conn, due)
                else:
                    self.waiting.append(due)
        # Never wait forever: what is unanswered a minute after the last request was due (open loop), or ten
        # minutes after the start (closed loop), is counted as errors.
        patience = 60.0 if self.rate else 600.0
        try:
            await asyncio.wait_for(asyncio.shield(self.finished), timeout=patience)
        except TimeoutError:
            self.results.errors += len(self.requests) - self.answered
            print(f"httpload: {len(self.requests) - self.answered} request(s) unanswered after {patience:.0f} s: "
                  "counted as errors", file=sys.stderr)
        self.results.elapsed = time.perf_counter() - t0
        self.results.cpu_s = time.process_time() - cpu0
        del loop
        return self.results


def run(host: str, port: int, requests: list[bytes], connections: int, rate: float = 0.0) -> Results:
    """Send every request; closed loop when ``rate`` is 0, else open loop at ``rate`` requests per second."""

    async def go() -> Results:
        return await _Runner(host, port, requests, connections, rate).run()

    try:  # uvloop's transports are C: about half the client's CPU per request of asyncio's own loop
        import uvloop
    except ImportError:
        return asyncio.run(go())
    return uvloop.run(go())


def main(argv: list[str]) -> None:
    reqs_path, out_path, host, port, conns, rate = argv[:6]
    if len(argv) > 6:
        os.sched_setaffinity(0, {int(argv[6])})
    with open(reqs_path, "rb") as f:
        requests = pickle.load(f)  # noqa: S301 - a file this benchmark wrote a moment ago
    r = run(host, int(port), requests, int(conns), float(rate))
    with open(out_path, "w") as f:
        json.dump({"latencies": r.latencies, "statuses": r.statuses, "errors": r.errors, "elapsed": r.elapsed,
                   "cpu_s": r.cpu_s}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
