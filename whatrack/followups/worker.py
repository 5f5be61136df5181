"""The follow-up worker: a Python ``bullmq.Worker`` on queue ``followup``, built the arq way.

A :class:`~whatrack.followups.process.WorkerContext` (store, UAZAPI client, realtime publisher) is built once at
start-up and shared by every job; :func:`~whatrack.followups.process.process_followup` (one job, in its own module)
is a plain ``async def``. Per job: validate the payload; skip if the lead replied since the
follow-up was scheduled; send through UAZAPI; record the send in Redis (``bull:followup:<id>:sent``) *before* the
database write, so a retry (or a rescued stalled job) never sends twice; store the outbound message idempotently on
the job id; publish it in realtime (when Centrifugo fails, the row stays in the outbox for the endpoint's publisher:
the job is done).

A worker killed (SIGKILL, OOM, node loss) after UAZAPI accepted a send but before the ``:sent`` record was written
leaves no record; its job comes back through stalled recovery. Such a job *may* have been sent: BullMQ's job hash
counts attempts started (``ats``) apart from attempts made (``atm``), so a started attempt that never finished shows
as ``ats > atm + 1`` while the job runs again (or ``stc``, the stalled counter, is set). Before sending such a job the
worker looks for the evidence: UAZAPI echoes every API send as a ``fromMe`` webhook carrying our ``track_id`` (the job
id), which the endpoint stores (``Store.find_outbound_by_track``). Found: the ``:sent`` record is rebuilt from it and
the job goes on to store and publish (both idempotent) without sending. Not found yet: the worker polls for it up to
``WorkerContext.echo_wait_s`` (the echo travels UAZAPI → QStash → endpoint, normally well under a second), then sends.

The window left, honestly: an echo slower than that wait (QStash or the endpoint down for longer, or the echo lost)
still means a second send, and so does a send that timed out on the wire (the attempt *finished*, as a failure, so
nothing flags it). UAZAPI offers no idempotency key, so the lead can then get the follow-up twice; the database and
realtime stay exact either way (one row per WhatsApp message).

bullmq 3.4.4's traps, fixed here (protocols/bullmq.md §1.3):

* redis-py 8's 5 s socket timeout broke the blocking BZPOPMIN: the client gets ``redis_tcp``'s 30 s timeout;
* the blocking connection never read the server version, so waits were rounded up to whole seconds (delayed jobs
  up to 1 s late): the version is read before the worker runs;
* one connection used one command at a time capped a worker near 1/(2·RTT) jobs/s: the worker gets a pooled client;
* no signal handling: SIGTERM/SIGINT close the worker gracefully (a second signal, or the grace period, forces it;
  forced jobs stay active and come back through stalled recovery);
* Python runs its first stalled check one interval after start; this worker runs one at start, as Node does;
* an idle worker ran one ``moveToActive`` per concurrency slot per wait: fetches take turns on a drained queue;
* a job cost two round trips (complete, then fetch): completing now fetches the next job, as Node does.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any, cast

import redis.asyncio as aredis
from bullmq import Job

from whatrack import redis_tcp
from whatrack.errors import ConfigError, StackError
from whatrack.followups.bull import FollowupBullWorker
from whatrack.followups.constants import (
    DEFAULT_CONCURRENCY,
    DRAIN_DELAY_S,
    KEY_PREFIX,
    LOCK_DURATION_MS,
    MAX_STALLED_COUNT,
    QUEUE_NAME,
    REMOVE_ON_COMPLETE,
    REMOVE_ON_FAIL,
    STALLED_INTERVAL_MS,
)
from whatrack.followups.jobs import pooled_client
from whatrack.followups.monitor import (
    MONITOR_INTERVAL_S,
    MetricsServer,
    QueueMonitor,
    count_failure,
    count_outcome,
    is_connection_error,
    is_final_failure,
    serve_metrics,
)
from whatrack.followups.process import ContextFactory, FollowupStore, Sender, WorkerContext, process_followup
from whatrack.metrics import Metrics
from whatrack.settings import Settings, mask_url

log = logging.getLogger("whatrack.followups.worker")

#: Seconds a graceful shutdown waits for running jobs before it forces the close (below Kubernetes' 30 s default).
SHUTDOWN_GRACE_S = 25.0
_LOCK_RACE = "could not renew lock for job "
#: How long a failed renewal waits for the job's completion reply before it counts as a lost lock.
LOCK_RACE_GRACE_S = 1.0
#: Pooled connections beyond one per running job: the blocking wait, moveToActive, lock renewal, stalled check.
POOL_SPARE = 6

# -- the worker ----------------------------------------------------------------------------------------------------


def worker_client(url: str, *, ca_bundle: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                  pooled: bool = True) -> aredis.Redis:
    """The redis-py client a worker runs on: TLS verified, 30 s socket timeout, ``decode_responses`` (bullmq needs
    it). Pooled: each running job, the blocking wait, the lock renewal and the stalled check get their own
    connection. ``pooled=False`` gives bullmq's own single-connection shape (for comparison in the bench)."""
    if pooled:
        return pooled_client(url, ca_bundle=ca_bundle, max_connections=concurrency + POOL_SPARE)
    kw = redis_tcp.connection_kwargs(url, ca_bundle=ca_bundle)
    return aredis.Redis.from_url(url, decode_responses=True, single_connection_client=True, **kw)


Processor = Callable[[Job], Awaitable[Any]]


class FollowupWorker:
    """A started ``bullmq.Worker`` with the trap fixes; :meth:`close` shuts it down.

    ``metrics`` (default: a registry of its own) gets the job outcomes, the Redis connection errors and what the
    :class:`~whatrack.followups.monitor.QueueMonitor` sees every ``monitor_interval_s`` (paused, jobs per state).
    """

    def __init__(self, url: str, processor: Processor, *, ca_bundle: str | None = None,
                 concurrency: int = DEFAULT_CONCURRENCY, lock_duration_ms: int = LOCK_DURATION_MS,
                 stalled_interval_ms: int = STALLED_INTERVAL_MS, pooled: bool = True,
                 queue_name: str = QUEUE_NAME, metrics: Metrics | None = None,
                 monitor_interval_s: float = MONITOR_INTERVAL_S) -> None:
        if concurrency < 1:
            raise ConfigError("--concurrency", f"must be at least 1, got {concurrency}", "10")
        self.url = url
        self.client = worker_client(url, ca_bundle=ca_bundle, concurrency=concurrency, pooled=pooled)
        self.concurrency = concurrency
        opts: dict[str, Any] = {
            "connection": self.client, "prefix": KEY_PREFIX, "concurrency": concurrency, "autorun": False,
            "lockDuration": lock_duration_ms, "stalledInterval": stalled_interval_ms,
            "maxStalledCount": MAX_STALLED_COUNT, "drainDelay": DRAIN_DELAY_S,
            "removeOnComplete": REMOVE_ON_COMPLETE, "removeOnFail": REMOVE_ON_FAIL,
        }

        async def run_job(job: Job, token: str) -> Any:
            return await processor(job)

        self.worker = FollowupBullWorker(queue_name, run_job, opts)
        self.metrics = metrics if metrics is not None else Metrics()
        self.monitor = QueueMonitor(self.client, self.metrics, url=url, queue_name=queue_name,
                                    interval_s=monitor_interval_s)
        self.worker.on("completed", lambda job, result, *_: count_outcome(self.metrics, result))
        self.worker.on("failed", self._on_failed)
        self.worker.on("error", self._on_error)
        #: The worker's errors (not job failures), for health checks and tests; benign races are left out.
        self.errors: list[Exception] = []
        self._judging: set[asyncio.Future[None]] = set()
        self._task: asyncio.Future[Any] | None = None

    def _on_failed(self, job: Job, err: Exception, *_: object) -> None:
        count_failure(self.metrics, job, err)
        log.warning("follow-up %s %s: %s", job.id, "failed" if is_final_failure(job, err) else "will be retried", err)

    def _on_error(self, err: Exception, *_: object) -> None:
        if is_connection_error(err):
            self.metrics.redis_errors.inc()
        text = str(err)
        if text.startswith(_LOCK_RACE):
            # The renewal often races a completion: the script that completed the job (and dropped its lock) ran
            # first, and its reply is still on the way. Judge once that reply has had time to land.
            task = asyncio.ensure_future(self._judge_lock_failure(err, text.removeprefix(_LOCK_RACE)))
            self._judging.add(task)
            task.add_done_callback(self._judging.discard)
            return
        log.error("worker error: %s: %s", type(err).__name__, err)
        self.errors.append(err)

    async def _judge_lock_failure(self, err: Exception, job_id: str) -> None:
        await asyncio.sleep(LOCK_RACE_GRACE_S)
        if job_id not in self.worker.lockManager.tracked_jobs:
            log.debug("lock renewal raced the completion of job %s", job_id)
            return
        log.warning("job %s lost its lock while running: another worker may run it too (sends stay idempotent)",
                    job_id)
        self.errors.append(err)

    async def start(self) -> None:
        """Read the server version (whole-second waits otherwise), check for stalled jobs, start taking jobs."""
        assert self.worker.blockingRedisConnection is not None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            version = await self.worker.blockingRedisConnection.getRedisVersion()
            await self.worker.redisConnection.getRedisVersion()
        for w in caught:  # bullmq warns when maxmemory-policy is not noeviction: jobs could be evicted
            log.warning("redis at %s: %s", mask_url(self.url), w.message)
        await self.worker.runStalledJobsCheck()
        await self.monitor.sample()  # a paused queue is said at once, not after the first interval
        self.monitor.start()
        self._task = asyncio.ensure_future(self.worker.run())
        log.info("follow-up worker on %s (redis %s), concurrency %d", mask_url(self.url), version, self.concurrency)

    @property
    def task(self) -> asyncio.Future[Any]:
        if self._task is None:
            raise StackError("the worker was not started")
        return self._task

    async def close(self, *, timeout: float | None = SHUTDOWN_GRACE_S, force: bool = False) -> None:
        """Stop taking jobs and wait for the running ones (up to ``timeout`` s); then, or with ``force``, abandon
        them: they stay active under their lock and come back to a worker through stalled recovery."""
        await self.monitor.stop()
        closing = asyncio.ensure_future(self.worker.close())
        done = False
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while not force and not done and time.monotonic() < deadline:
            # A fetch that started its blocking wait just after close() cancelled the current one would hold the
            # close for up to drainDelay (10 s): cancel any wait that appears while closing.
            waiting = self.worker.waiting
            if waiting is not None and not waiting.done():
                waiting.cancel()
            done = (await asyncio.wait({closing}, timeout=0.05))[0] != set()
        if not done:
            log.warning("forcing the close: %d running job(s) come back through stalled recovery",
                        len(self.worker.processing))
            self.worker.forceClosing = True
            self.worker.cancelProcessing()
            await closing
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as e:  # the run loop tripped over the connections close() just closed
                log.debug("worker run loop ended with %s during close", type(e).__name__)
        if self._judging:
            await asyncio.wait(set(self._judging))
        # Last, once no task of the worker runs: bullmq closed this pool already, but a command that was still
        # connecting then (the run loop's first CLIENT SETNAME, when close follows start at once) put a fresh
        # connection back into it afterwards, which nothing would ever close (a leaked socket).
        await self.client.aclose()


async def serve(url: str, ctx: WorkerContext, *, ca_bundle: str | None = None,
                concurrency: int = DEFAULT_CONCURRENCY, shutdown_grace_s: float = SHUTDOWN_GRACE_S,
                metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
    """Run the follow-up worker until SIGTERM or SIGINT, then shut down gracefully (a second signal forces it).

    ``metrics_port``: serve the worker's metrics at ``http://metrics_host:metrics_port/metrics`` (None: not served).
    """
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: forcing the shutdown", sig.name)
            force.set()
        else:
            log.info("%s: finishing running jobs, then stopping", sig.name)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    fw = FollowupWorker(url, lambda job: process_followup(ctx, job), ca_bundle=ca_bundle, concurrency=concurrency)
    exporter: MetricsServer | None = None
    if ctx.redis is None:
        # Jobs get a pool of their own: on the worker's, they could hold back its lock renewals.
        ctx.redis = pooled_client(url, ca_bundle=ca_bundle, max_connections=concurrency + 2)
        ctx.closers.append(ctx.redis.aclose)
    try:
        if metrics_port is not None:
            exporter = serve_metrics(fw.metrics, metrics_port, metrics_host)
        await fw.start()
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({stopper, fw.task}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if fw.task.done() and not stop.is_set():
            fw.task.result()  # the run loop died: raise its error
        forcer = asyncio.ensure_future(force.wait())
        closer = asyncio.ensure_future(fw.close(timeout=shutdown_grace_s))
        await asyncio.wait({closer, forcer}, return_when=asyncio.FIRST_COMPLETED)
        if not closer.done():
            fw.worker.forceClosing = True
            fw.worker.cancelProcessing()
            await closer
        forcer.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if exporter is not None:
            exporter.close()
        await ctx.aclose()
    log.info("follow-up worker stopped")


# -- start-up ------------------------------------------------------------------------------------------------------


async def default_context(settings: Settings) -> WorkerContext:
    """The production context: PostgreSQL store, the UAZAPI client, Centrifugo.

    Raises:
        ConfigError: a setting the worker needs is missing.
    """
    settings.require("DATABASE_URL", "UAZAPI_BASE_URL", "UAZAPI_INSTANCE_TOKENS", "CENTRIFUGO_API_URL",
                     "CENTRIFUGO_API_KEY")
    from whatrack import realtime
    from whatrack.store import api as store
    from whatrack.uazapi import client as uazapi_send

    assert settings.database_url and settings.uazapi_base_url
    base_url = settings.uazapi_base_url
    st = store.Store.from_url(settings.database_url)
    rt = realtime.Realtime.from_settings(settings)
    # UAZAPI's /send/text authenticates with the sending instance's own token (never the admin token): one client
    # per instance, built on first use from UAZAPI_INSTANCE_TOKENS.
    clients: dict[str, uazapi_send.UazapiClient] = {}

    async def uazapi_for(inst: Any) -> Sender:
        client = clients.get(inst.name)
        if client is None:
            client = clients[inst.name] = uazapi_send.UazapiClient(base_url, settings.instance_token(inst.name))
        return client

    async def close_clients() -> None:
        for c in clients.values():
            await c.aclose()

    first = settings.uazapi_instance_tokens[0][0]
    ua = uazapi_send.UazapiClient(base_url, settings.instance_token(first))
    if not hasattr(st, "get_instance"):
        await st.aclose()
        raise StackError("whatrack.store.api.Store has no get_instance(instance_id) -> InstanceRef | None, which the "
                         "follow-up worker needs to find the sending instance")
    ctx = WorkerContext(store=cast(FollowupStore, st), uazapi=ua, realtime=rt, uazapi_for=uazapi_for)
    ctx.closers.append(close_clients)
    for part in (st, rt, ua):
        closer = getattr(part, "aclose", None)
        if closer is not None:
            ctx.closers.append(closer)
    return ctx


def load_context_factory(spec: str | None) -> ContextFactory:
    """``module:function`` (an async ``(settings) -> WorkerContext``), or the default.

    Raises:
        ConfigError: the spec does not name an importable function.
    """
    if not spec:
        return default_context
    mod_name, sep, fn_name = spec.partition(":")
    if not sep or not mod_name or not fn_name:
        raise ConfigError("--context", f"{spec!r} is not MODULE:FUNCTION", "mypkg.worker:build_context")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError("--context", f"cannot load {spec!r}: {e}", "mypkg.worker:build_context") from e
    if not callable(fn):
        raise ConfigError("--context", f"{spec!r} is not callable", "mypkg.worker:build_context")
    return fn  # type: ignore[no-any-return]


def main(*, concurrency: int = DEFAULT_CONCURRENCY, context: str | None = None, metrics_port: int | None = None,
         metrics_host: str = "127.0.0.1") -> int:
    """``whatrack worker``: settings from the environment, run until a signal (metrics: see :func:`serve`).

    Raises:
        ConfigError: UPSTASH_REDIS_URL (or what the context needs) is missing or malformed.
    """
    settings = Settings.from_env()
    settings.require("UPSTASH_REDIS_URL")
    url = settings.upstash_redis_url
    assert url is not None
    factory = load_context_factory(context)

    async def go() -> None:
        ctx = await factory(settings)
        await serve(url, ctx, ca_bundle=settings.redis_ca_bundle, concurrency=concurrency,
                    metrics_port=metrics_port, metrics_host=metrics_host)

    asyncio.run(go())
    return 0
