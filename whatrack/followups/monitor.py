"""What the follow-up worker tells operators: its queue paused or not, jobs per state, job outcomes, Redis errors.

A worker on a paused queue takes no job and says nothing (BullMQ just waits): after a migration the ``followup``
queue stays paused on the target until someone resumes it, and jobs sit. :class:`QueueMonitor` looks at the queue
at start and every :data:`MONITOR_INTERVAL_S` (one Lua script call: one command on Upstash's bill), logs a WARNING
with the fix once each time the queue becomes paused (and an INFO when it runs again), and keeps the worker's
:class:`~whatrack.metrics.Metrics` up to date: ``whatrack_queue_paused{queue}``, ``whatrack_queue_jobs{queue,state}``
and ``whatrack_redis_connection_errors_total``. :func:`count_outcome` / :func:`count_failure` feed
``whatrack_followup_jobs_total{outcome}`` from the worker's completed/failed events.

:func:`serve_metrics` serves the registry at ``/metrics`` on a port of its own (``whatrack worker --metrics-port``),
bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis.asyncio as aredis
import redis.exceptions as rexc
from bullmq import UnrecoverableError
from prometheus_client import start_http_server

from whatrack.errors import ConfigError
from whatrack.followups.constants import KEY_PREFIX, QUEUE_NAME
from whatrack.metrics import Metrics
from whatrack.settings import mask_url

log = logging.getLogger("whatrack.followups.monitor")

#: Seconds between two looks at the queue while the worker runs.
MONITOR_INTERVAL_S = 30.0
#: What to run when the queue is paused (the warning says it).
RESUME_HINT = ("resume it with `whatrack followup resume` (after a migration: `whatrack migrate resume` on the "
               "target)")
#: The queue's state structures, in the order the script reads them (BullMQ 5 / bullmq-py 3.4 key layout).
LIST_STATES = ("wait", "active", "paused")
ZSET_STATES = ("delayed", "prioritized", "completed", "failed")
#: KEYS: meta, then the lists, then the sorted sets. Returns {paused flag, count per state...} in one round trip.
_SAMPLE_SCRIPT = """
local out = {redis.call('HEXISTS', KEYS[1], 'paused')}
for i = 2, 4 do out[#out + 1] = redis.call('LLEN', KEYS[i]) end
for i = 5, #KEYS do out[#out + 1] = redis.call('ZCARD', KEYS[i]) end
return out
"""
#: What counts as "Redis unreachable" (a refused connection, a timeout, a TLS or socket failure).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (rexc.ConnectionError, rexc.TimeoutError, OSError)


def is_connection_error(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a failure to reach Redis, not a command error."""
    seen: BaseException | None = err
    for _ in range(5):  # the cause chain, a few levels deep
        if seen is None:
            return False
        if isinstance(seen, CONNECTION_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class QueueSample:
    """The queue at one look: paused or not, and its jobs per state."""

    paused: bool
    counts: dict[str, int]


class QueueMonitor:
    """Looks at one BullMQ queue now and then; see the module docstring."""

    def __init__(self, client: aredis.Redis, metrics: Metrics, *, url: str, queue_name: str = QUEUE_NAME,
                 prefix: str = KEY_PREFIX, interval_s: float = MONITOR_INTERVAL_S) -> None:
        self.client, self.metrics, self.url = client, metrics, url
        self.queue_name, self.interval_s = queue_name, interval_s
        base = f"{prefix}:{queue_name}:"
        self._keys = [base + "meta", *(base + s for s in LIST_STATES), *(base + s for s in ZSET_STATES)]
        self._script = client.register_script(_SAMPLE_SCRIPT)
        #: The last state seen (None before the first look); ``reachable``: whether the last look reached Redis.
        self.paused: bool | None = None
        self.reachable = True
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> QueueSample | None:
        """Look once: update the metrics, log a change of state. None when Redis could not be reached (counted)."""
        try:
            raw = await self._script(keys=self._keys)
        except Exception as e:
            if not is_connection_error(e):
                log.warning("could not read queue %s: %s: %s", self.queue_name, type(e).__name__, e)
                return None
            self.metrics.redis_errors.inc()
            if self.reachable:
                log.warning("queue %s: redis at %s unreachable: %s", self.queue_name, mask_url(self.url),
                            type(e).__name__)
            self.reachable = False
            return None
        if not self.reachable:
            log.info("queue %s: redis at %s reachable again", self.queue_name, mask_url(self.url))
        self.reachable = True
        values = [int(v) for v in raw]
        counts = dict(zip((*LIST_STATES, *ZSET_STATES), values[1:], strict=True))
        self._observe(bool(values[0]), counts)
        return QueueSample(bool(values[0]), counts)

    def _observe(self, paused: bool, counts: dict[str, int]) -> None:
        self.metrics.queue_paused.labels(self.queue_name).set(1 if paused else 0)
        for state, n in counts.items():
            self.metrics.queue_depth.labels(self.queue_name, state).set(n)
        if paused and self.paused is not True:
            waiting = counts["wait"] + counts["paused"] + counts["prioritized"] + counts["delayed"]
            log.warning("queue %s on %s is PAUSED: this worker takes no job while it is (%d job(s) waiting or "
                        "delayed); %s", self.queue_name, mask_url(self.url), waiting, RESUME_HINT)
        elif not paused and self.paused is True:
            log.info("queue %s was resumed: taking jobs again", self.queue_name)
        self.paused = paused

    def start(self) -> None:
        """Look every ``interval_s`` in the background until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sample()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


def count_outcome(metrics: Metrics, result: Any) -> None:
    """A completed job: ``skipped`` when the worker skipped it (the lead replied), else ``sent``."""
    status = result.get("status") if isinstance(result, dict) else None
    metrics.followups.labels("skipped" if status == "skipped" else "sent").inc()


def is_final_failure(job: Any, err: BaseException) -> bool:
    """Whether BullMQ failed ``job`` for good (no retry left, or unrecoverable) rather than scheduling a retry."""
    return isinstance(err, UnrecoverableError) or int(job.attemptsMade or 0) >= int(job.opts.get("attempts") or 1)


def count_failure(metrics: Metrics, job: Any, err: BaseException) -> None:
    """A failed attempt: ``failed`` when final, ``retried`` when BullMQ runs it again."""
    metrics.followups.labels("failed" if is_final_failure(job, err) else "retried").inc()


@dataclass
class MetricsServer:
    """A running ``/metrics`` server (prometheus-client's, on a thread); :meth:`close` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(metrics: Metrics, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``metrics`` at ``http://host:port/metrics`` (port 0: any free port, see ``.port``).

    Raises:
        ConfigError: the port is taken or the address cannot be bound.
    """
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise ConfigError("--metrics-port", f"cannot serve metrics on {host}:{port}: {e.strerror or e}; pick a free "
                                            "port", "9101") from e
    ms = MetricsServer(server, thread)
    log.info("worker metrics at http://%s:%d/metrics", host, ms.port)
    return ms
