"""The follow-up worker: a Python ``bullmq.Worker`` on queue ``followup``, built the arq way.

A :class:`WorkerContext` (store, UAZAPI client, realtime publisher) is built once at start-up and shared by every job;
:func:`process_followup` is a plain ``async def``. Per job: validate the payload; skip if the lead replied since the
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
import json
import logging
import signal
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import redis.asyncio as aredis
from bullmq import Job, UnrecoverableError

from whatrack import redis_tcp
from whatrack.errors import ConfigError, PayloadError, PublishError, SendError, StackError
from whatrack.followups.bull import FollowupBullWorker
from whatrack.followups.constants import (
    DEFAULT_CONCURRENCY,
    DRAIN_DELAY_S,
    JOB_NAME,
    KEY_PREFIX,
    LOCK_DURATION_MS,
    MAX_STALLED_COUNT,
    QUEUE_NAME,
    REMOVE_ON_COMPLETE,
    REMOVE_ON_FAIL,
    SENT_RECORD_TTL_S,
    STALLED_INTERVAL_MS,
    sent_key,
)
from whatrack.followups.jobs import FollowupJob, pooled_client
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
from whatrack.metrics import Metrics
from whatrack.settings import Settings, mask_url
from whatrack.times import iso

log = logging.getLogger("whatrack.followups.worker")

#: ``track_source`` on our sends: the UAZAPI echo webhook carries it back, so the handler can tell our sends apart.
TRACK_SOURCE = "whatrack-followup"
#: Seconds a graceful shutdown waits for running jobs before it forces the close (below Kubernetes' 30 s default).
SHUTDOWN_GRACE_S = 25.0
_LOCK_RACE = "could not renew lock for job "
#: How long a failed renewal waits for the job's completion reply before it counts as a lost lock.
LOCK_RACE_GRACE_S = 1.0
#: Pooled connections beyond one per running job: the blocking wait, moveToActive, lock renewal, stalled check.
POOL_SPARE = 6
#: Seconds a job that may have been sent waits for UAZAPI's echo of that send before sending again. The echo goes
#: UAZAPI → QStash → endpoint → database, normally well under a second; QStash's first retry comes seconds later.
ECHO_WAIT_S = 10.0
#: Seconds between two looks for the echo while waiting (one indexed query each).
ECHO_POLL_S = 0.25


# -- the collaborators, as the worker uses them ----------------------------------------------------------------------


class FollowupStore(Protocol):
    """What the worker needs from ``whatrack.store.api.Store``."""

    async def get_instance(self, instance_id: int) -> Any: ...
    async def find_lead(self, organization_id: int, lead_id: int) -> Any: ...
    async def lead_replied_since(self, lead_id: int, since: datetime) -> bool: ...
    async def save_outbound(self, inst: Any, *, lead_id: int, text: str, job_id: str, external_id: str,
                            provider_id: str | None, sent_at: datetime) -> Any: ...
    async def mark_published(self, message_id: Any) -> None: ...
    async def find_outbound_by_track(self, inst: Any, track_id: str) -> Any: ...


class Sender(Protocol):
    """What the worker needs from ``whatrack.uazapi.normalizer.UazapiClient``."""

    async def send_text(self, number: str, text: str, *, track_source: str | None = None,
                        track_id: str | None = None) -> Any: ...


class Publisher(Protocol):
    """What the worker needs from ``whatrack.realtime.Realtime``."""

    async def publish_message(self, stored: Any) -> None: ...


@dataclass
class WorkerContext:
    """Everything a job needs, built once at start-up. ``redis`` is set by the worker (its own pooled client).

    ``uazapi_for``, when set, picks the client for an instance (UAZAPI sends with the instance's own token);
    otherwise every send goes through ``uazapi``. ``echo_wait_s`` / ``echo_poll_s``: how long and how often a job
    that may have been sent looks for UAZAPI's echo before sending again.
    """

    store: FollowupStore
    uazapi: Sender
    realtime: Publisher
    redis: aredis.Redis | None = None
    uazapi_for: Callable[[Any], Awaitable[Sender]] | None = None
    closers: list[Callable[[], Awaitable[object]]] = field(default_factory=list)
    echo_wait_s: float = ECHO_WAIT_S
    echo_poll_s: float = ECHO_POLL_S

    async def aclose(self) -> None:
        """Run the closers (last registered first); one failing does not stop the others."""
        for close in reversed(self.closers):
            try:
                await close()
            except Exception:
                log.exception("closing the worker context")
        self.closers.clear()


ContextFactory = Callable[[Settings], Awaitable[WorkerContext]]


# -- the job -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentRecord:
    """The UAZAPI result of a send, kept in Redis under the job until the message is stored."""

    message_id: str
    provider_id: str | None
    sent_at: datetime

    def to_json(self) -> str:
        return json.dumps({"messageId": self.message_id, "providerId": self.provider_id,
                           "sentAt": self.sent_at.isoformat()})

    @classmethod
    def from_json(cls, raw: str) -> SentRecord:
        d = json.loads(raw)
        return cls(str(d["messageId"]), d.get("providerId"), datetime.fromisoformat(d["sentAt"]))


def may_have_been_sent(job: Job) -> bool:
    """Whether an earlier attempt of ``job`` started and never finished (killed or stalled), so it may have sent.

    ``ats`` counts the current attempt too: a clean run or a retry after a failure has ``ats == atm + 1``.
    """
    started = int(getattr(job, "attemptsStarted", 0) or 0)
    return started > int(job.attemptsMade or 0) + 1 or int(getattr(job, "stalledCounter", 0) or 0) > 0


def _record_from_echo(stored: Any) -> SentRecord:
    sent_at = stored.realtime.get("sentAt") if isinstance(getattr(stored, "realtime", None), dict) else None
    at = datetime.fromisoformat(sent_at) if isinstance(sent_at, str) else datetime.now(UTC)
    return SentRecord(str(stored.external_id), stored.provider_id, at)


async def _find_echo(ctx: WorkerContext, inst: Any, job_id: str, *, wait: bool) -> SentRecord | None:
    """The send of ``job_id`` that UAZAPI echoed back, polling up to ``ctx.echo_wait_s`` when ``wait``."""
    deadline = time.monotonic() + (ctx.echo_wait_s if wait else 0.0)
    while True:
        stored = await ctx.store.find_outbound_by_track(inst, job_id)
        if stored is not None:
            return _record_from_echo(stored)
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(ctx.echo_poll_s)


async def _keep_first(r: aredis.Redis, job_id: str, record: SentRecord) -> tuple[SentRecord, bool]:
    """Write the job's send record unless one exists (NX: a stalled job running in two workers keeps the first);
    return the record in force and whether it is ours."""
    if await r.set(sent_key(job_id), record.to_json(), nx=True, ex=SENT_RECORD_TTL_S):
        return record, True
    first = _text(await r.get(sent_key(job_id)))
    return (SentRecord.from_json(first), False) if first is not None else (record, False)


def _text(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


def _redis(ctx: WorkerContext) -> aredis.Redis:
    if ctx.redis is None:
        raise StackError("WorkerContext.redis is not set: start jobs through FollowupWorker")
    return ctx.redis


async def process_followup(ctx: WorkerContext, job: Job) -> dict[str, Any]:
    """Run one follow-up job; the return value is stored by BullMQ (camelCase, readable from Node).

    Raises:
        UnrecoverableError: the job can never succeed (malformed payload, unknown instance or lead, UAZAPI refused
            the number): failed at once, no retry.
        SendError, StoreError, PublishError: transient; BullMQ retries with the queue's backoff.
    """
    t0 = time.monotonic()
    job_id = str(job.id)
    if job.name != JOB_NAME:
        raise UnrecoverableError(f"job name {job.name!r} is not {JOB_NAME!r}: this queue only runs follow-ups")
    try:
        fu = FollowupJob.from_wire(job.data, default_scheduled_at=datetime.fromtimestamp(job.timestamp / 1000, UTC))
    except PayloadError as e:
        raise UnrecoverableError(f"malformed follow-up job {job_id}: {e}") from e
    inst = await ctx.store.get_instance(fu.instance_id)
    if inst is None or inst.organization_id != fu.organization_id:
        raise UnrecoverableError(f"instance {fu.instance_id} not found in organization {fu.organization_id}; "
                                 "register it (whatrack instances add) or fix the job's instanceId")
    lead = await ctx.store.find_lead(fu.organization_id, fu.lead_id)
    if lead is None:
        raise UnrecoverableError(f"lead {fu.lead_id} not found in organization {fu.organization_id}")

    r = _redis(ctx)
    raw = _text(await r.get(sent_key(job_id)))
    record = SentRecord.from_json(raw) if raw is not None else None
    unsure = record is None and may_have_been_sent(job)
    if unsure:  # an attempt cut short may have sent: UAZAPI's echo of that send is the proof
        record = await _find_echo(ctx, inst, job_id, wait=False)
    if record is None and await ctx.store.lead_replied_since(fu.lead_id, fu.scheduled_at):
        log.info("follow-up %s skipped: lead %s replied since %s (%.0f ms)", job_id, fu.lead_id,
                 iso(fu.scheduled_at), (time.monotonic() - t0) * 1000)
        return {"status": "skipped", "reason": "lead replied"}
    if record is None and unsure:
        record = await _find_echo(ctx, inst, job_id, wait=True)
        if record is None:
            log.warning("follow-up %s: no echo of an earlier attempt's send within %.1f s: sending (a second time, "
                        "if that attempt did send)", job_id, ctx.echo_wait_s)
    already_sent, from_echo = record is not None, raw is None and record is not None
    if raw is not None and record is not None:
        log.info("follow-up %s was sent before (message %s): not sending again", job_id, record.message_id)
    elif record is not None:
        log.warning("follow-up %s was sent by an attempt cut short (its echo, message %s, is stored): not sending "
                    "again", job_id, record.message_id)
        record, _ = await _keep_first(r, job_id, record)
    else:
        number = lead.phone or lead.remote_jid
        sender = await ctx.uazapi_for(inst) if ctx.uazapi_for is not None else ctx.uazapi
        try:
            res = await sender.send_text(number, fu.text, track_source=TRACK_SOURCE, track_id=job_id)
        except SendError as e:
            if not e.retryable:
                raise UnrecoverableError(f"UAZAPI refused follow-up {job_id} (status {e.status}): {e}") from e
            raise
        record, first = await _keep_first(r, job_id, SentRecord(str(res.message_id), res.provider_id,
                                                                 datetime.now(UTC)))
        if not first:
            log.warning("follow-up %s was sent twice (a stalled job ran in two workers)", job_id)
    stored = await ctx.store.save_outbound(inst, lead_id=fu.lead_id, text=fu.text, job_id=job_id,
                                           external_id=record.message_id, provider_id=record.provider_id,
                                           sent_at=record.sent_at)
    if not stored.published:
        try:
            await ctx.realtime.publish_message(stored)
        except PublishError as e:
            # Sent and stored: the job is done. The row stays unpublished, in the outbox, which the endpoint's
            # publisher delivers when Centrifugo answers again; failing the job would only retry a finished send.
            log.warning("follow-up %s stored; its realtime publication is left to the outbox (%s)", job_id, e)
        else:
            await ctx.store.mark_published(stored.message_id)
    log.info("follow-up %s sent to lead %s (attempt %d, %.0f ms)", job_id, fu.lead_id, job.attemptsMade + 1,
             (time.monotonic() - t0) * 1000)
    return {"status": "sent", "messageId": record.message_id, "providerId": record.provider_id,
            "storedNow": bool(stored.created), "sentEarlier": already_sent, "fromEcho": from_echo}


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
