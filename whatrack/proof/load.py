"""The load generator: N generated UAZAPI webhooks published through QStash to the endpoint, followed to the database
and to realtime, measured, and reconciled by the loss ledger.

The endpoint runs as its own process (``whatrack serve --workers K``, :class:`EndpointProcess`), PostgreSQL as its
own, QStash is the devstack broker offline or the real one in cloud mode: only the settings differ. :func:`run_load`
returns a :class:`LoadResult` (throughput, latency percentiles, retries, DLQ, the ledger);
``whatrack loadtest`` prints it and exits 1 when a message was lost or duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from whatrack.devstack import guard, process
from whatrack.errors import ConfigError, PublishError, StackError, StoreError
from whatrack.proof.config import DEFAULT_CONCURRENCY as DEFAULT_CONCURRENCY  # re-exported
from whatrack.proof.config import LoadConfig as LoadConfig  # re-exported
from whatrack.proof.generate import Webhook, generate, instances_of
from whatrack.proof.ledger import Ledger, Replay, Sent, classify, collect, dlq_items, replay_dlq, retry_schedule
from whatrack.proof.plots import Percentiles, latency_stats
from whatrack.proof.replay import require_endpoint
from whatrack.qstash import SETTLED_STATES
from whatrack.settings import SECRET_ENV_NAMES, Settings

if TYPE_CHECKING:
    from whatrack.qstash import Publisher

log = logging.getLogger("whatrack.proof.load")

#: Seconds without a new row before the settle wait asks QStash whether the missing messages are still in flight.
STALL_CHECK_S = 3.0
#: Seconds between the settle wait's "still retrying" lines.
PENDING_LOG_S = 30.0
#: Seconds past QStash's last backoff the settle wait allows for the last attempt itself (QStash's request timeout
#: is minutes on paid plans; a healthy endpoint answers in well under a second).
SETTLE_MARGIN_S = 60.0
#: Seconds between two reads of QStash's events while waiting for every copy of a webhook to be delivered (each read
#: is one API call per 100 messages: a real QStash counts them).
COPIES_POLL_S = 0.5


@dataclass
class LoadResult:
    """A load run's figures and its ledger (notebook friendly: ``result.ledger.frame()``)."""

    config: LoadConfig
    published: int
    accepted: int
    publish_s: float  # first publish to last publish answered
    drain_s: float  # first publish to the last row committed
    accepted_per_s: float
    stored_per_s: float  # rows committed per second, first publish to last commit
    commit: Percentiles
    realtime: Percentiles
    retries: int  # QStash delivery attempts beyond the first (RETRY events)
    dlq: int  # messages found in the DLQ before the replay
    replays: list[Replay]
    ledger: Ledger
    sent: list[Sent] = field(repr=False, default_factory=list)
    delivered: int | None = None  # with copies > 1: QStash messages DELIVERED (each webhook's every copy counted)

    @property
    def passed(self) -> bool:
        return self.ledger.passed

    def pending_note(self) -> str | None:
        """What is still pending, when QStash still holds messages (None otherwise): one line for the summary."""
        n = self.ledger.undelivered
        if not n:
            return None
        waits = ", ".join(f"{w:.0f} s" for w in retry_schedule(self.config.retries))
        return (f"{n} message(s) undelivered (QStash retrying): not lost, not delivered yet; QStash's default backoff "
                f"waits {waits} before its {self.config.retries} retries, then moves a message to the DLQ. Check "
                "the endpoint (whatrack serve, /readyz), then run again with a longer --settle-timeout or replay "
                "the DLQ.")

    def summary(self) -> dict[str, Any]:
        """The headline figures as one flat dict (a row of a table)."""
        return {
            "messages": self.published, "accepted": self.accepted, "accepted_per_s": round(self.accepted_per_s, 1),
            "stored_per_s": round(self.stored_per_s, 1), "commit_p50_ms": round(self.commit.p50, 1),
            "commit_p95_ms": round(self.commit.p95, 1), "commit_p99_ms": round(self.commit.p99, 1),
            "commit_max_ms": round(self.commit.max, 1), "realtime_p99_ms": round(self.realtime.p99, 1),
            "retries": self.retries, "dlq": self.dlq, "replayed": len(self.replays),
            **{k: v for k, v in self.ledger.counts().items() if k != "total"}, "passed": self.passed,
        }


# -- the endpoint as a process ------------------------------------------------------------------------------------

class EndpointProcess:
    """The endpoint as a subprocess in its own session (so SIGKILL reaches every worker): uvicorn with the factory
    ``whatrack serve`` uses (``whatrack.webhook.app:app_from_env``) and K worker processes. (``whatrack serve`` itself
    builds the handler outside an event loop before starting uvicorn, which ``cent``'s aiohttp session refuses.)

    Args:
        env: the settings (e.g. the stack's env); the parent's whatrack settings are not inherited.
        port: where it listens (default: the port of ``WEBHOOK_PUBLIC_URL``).
        workers: uvicorn worker processes.
    """

    def __init__(self, env: dict[str, str], *, port: int | None = None, workers: int = 1) -> None:
        self.env = dict(env)
        public = env.get("WEBHOOK_PUBLIC_URL") or ""
        self.port = port or urlsplit(public).port or 0
        if not self.port:
            raise ConfigError("WEBHOOK_PUBLIC_URL", "needs a loopback URL with a port to run the endpoint",
                              "http://127.0.0.1:8000/api/v1/webhooks/qstash/whatsapp")
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self._guard: str | None = None  # stopped by a guard process if this one dies first
        self._cwd = tempfile.TemporaryDirectory(prefix="whatrack-endpoint-")
        self.log_path = os.path.join(self._cwd.name, "endpoint.log")
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EndpointProcess:
        """Start and wait until ``/healthz`` answers.

        Raises:
            StackError: the port is taken (another endpoint, a `whatrack serve` left running: its answer would be
                taken for ours, and a fault would kill ours, not it), or it exited or did not answer in time (with
                its log's last lines).
        """
        from whatrack.devstack.process import accepts

        if accepts("127.0.0.1", self.port):
            raise StackError(f"port {self.port} (of WEBHOOK_PUBLIC_URL) is already taken: stop what listens there "
                             "(a `whatrack serve`?) so that this endpoint process, which the run starts, stops and "
                             "kills, is the one that answers")
        child = {k: v for k, v in os.environ.items() if k not in SECRET_ENV_NAMES and not k.startswith("WHATRACK_")}
        child.update(self.env, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "whatrack.webhook.app:app_from_env", "--factory",
                 "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers), "--log-level", "warning",
                 "--no-access-log"], env=child, cwd=self._cwd.name, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._guard = guard.watch(pid=self.proc.pid, started=process.created(self.proc.pid))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise StackError(f"endpoint exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"endpoint did not answer on :{self.port} within {timeout:.0f} s: {self.tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole process group (master and workers), as a crash or an OOM kill would."""
        process.kill_popen(self.proc)
        guard.forget(self._guard)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL after 15 s."""
        process.stop_popen(self.proc, grace=15.0)
        self.proc = None
        guard.forget(self._guard)

    def tail(self, n: int = 10) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(f.read().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        self.stop()
        self._cwd.cleanup()

    def __enter__(self) -> EndpointProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- publishing ---------------------------------------------------------------------------------------------------

@dataclass
class Progress:
    """Shared counters a fault hook reads to time its injection (``published / total``)."""

    total: int
    published: int = 0

    @property
    def fraction(self) -> float:
        return self.published / self.total if self.total else 1.0

    async def reached(self, fraction: float, poll: float = 0.05) -> None:
        while self.fraction < fraction:
            await asyncio.sleep(poll)


async def publish_all(publisher: Publisher, webhooks: Sequence[Webhook], *, rate: float | None = None,
                      concurrency: int = DEFAULT_CONCURRENCY, retries: int = 3, progress: Progress | None = None,
                      bar: bool = True, copies: int = 1) -> list[Sent]:
    """Publish every body (at ``rate`` per second, or as fast as ``concurrency`` allows); one :class:`Sent` each.

    ``copies`` > 1 publishes each body that many times, back to back: as many QStash messages, so QStash delivers
    the same webhook that many times (what its at-least-once delivery may do; the duplicate-delivery fault). A
    publish that raises is recorded with outcome ``unknown`` (QStash may or may not have it), never as accepted.
    """
    # tqdm.auto warns "IProgress not found" on import in a kernel without ipywidgets, even for a disabled bar.
    tqdm = importlib.import_module("tqdm.auto" if bar else "tqdm.std").tqdm

    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    webhooks = [w for w in webhooks for _ in range(copies)]
    sem = asyncio.Semaphore(concurrency)
    out: list[Sent | None] = [None] * len(webhooks)
    started = time.monotonic()
    pbar = tqdm(total=len(webhooks), desc="publish", unit="msg", disable=not bar, leave=False)

    async def one(i: int, w: Webhook) -> None:
        if rate:
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        async with sem:
            at = time.time()
            try:
                qid = await publisher.publish_webhook(w.body, retries=retries)
                out[i] = Sent(w.provider_id, at, "accepted", qid, w.body)
            except PublishError as e:
                log.warning("[loadtest] publish of %s has an unknown outcome: %s", w.provider_id, e)
                out[i] = Sent(w.provider_id, at, "unknown", None, w.body)
        if progress is not None:
            progress.published += 1
        pbar.update(1)

    try:
        await asyncio.gather(*(one(i, w) for i, w in enumerate(webhooks)))
    finally:
        pbar.close()
    return [s for s in out if s is not None]


async def retry_count(publisher: Publisher, since_ms: int) -> int:
    """RETRY events QStash logged for the publisher's destination since ``since_ms`` (delivery attempts beyond the
    first). Best effort: 0 with a warning when the events cannot be read."""
    from qstash.log import LogFilter, LogState

    n, cursor = 0, None
    flt = LogFilter(url=publisher.destination, state=LogState.RETRY, from_time=since_ms)
    try:
        while True:
            res = await publisher.client.log.list(cursor=cursor, count=1000, filter=flt)
            n += len(res.logs)
            cursor = res.cursor
            if not cursor or not res.logs:
                return n
    except Exception as e:
        log.warning("[loadtest] QStash retry events could not be read: %s", type(e).__name__)
        return n


# -- settling -----------------------------------------------------------------------------------------------------

def settle_timeout_for(retries: int) -> float:
    """The settle wait that follows QStash's default retry schedule: every backoff of ``retries`` retries, plus
    :data:`SETTLE_MARGIN_S` for the last attempt (settle returns as soon as QStash has settled every message)."""
    return sum(retry_schedule(retries)) + SETTLE_MARGIN_S


async def settle(store: Any, publisher: Publisher, sent: Sequence[Sent], organization_id: int, *,
                 timeout: float) -> bool:
    """Wait until every accepted message is stored and published, or until QStash has settled the rest (FAILED: in
    the DLQ; or DELIVERED, yet not stored: lost, nothing more will come), or ``timeout``. Returns whether
    everything accepted arrived. While QStash still retries some, a line every :data:`PENDING_LOG_S` says how many
    (the ledger then counts those still held at the end as undelivered, never lost)."""
    want = {s.provider_id: s.qstash_id for s in sent if s.qstash_id}
    deadline = time.monotonic() + timeout
    last_count, last_change, last_said = -1, time.monotonic(), 0.0
    while True:
        try:
            rows = await store.message_rows(organization_id=organization_id)
        except StoreError as e:  # the database link may still be healing from a fault: the reader waits too
            if time.monotonic() > deadline:
                raise
            log.info("[loadtest] reading the message rows failed (%s); trying again", e)
            await asyncio.sleep(0.5)
            continue
        done = {r["provider_id"] for r in rows if r["published_at"] is not None}
        missing = [want[p] for p in want if p not in done]
        if not missing:
            return True
        # Stored but not yet published: the outbox still owes them (a killed publisher's claim comes back when its
        # lease runs out), so QStash having settled them is no reason to stop waiting.
        owed = {r["provider_id"] for r in rows if r["published_at"] is None} & want.keys()
        now = time.monotonic()
        if len(done) != last_count:
            last_count, last_change = len(done), now
        elif now - last_change > STALL_CHECK_S:
            states = await publisher.states([m for m in missing if m])
            if owed and now - last_said > PENDING_LOG_S / 3:
                last_said = now
                log.info("[loadtest] %d stored messages wait for the realtime outbox (a killed publisher's claim "
                         "returns after its lease)", len(owed))
            elif not owed and all(states.get(m) in SETTLED_STATES for m in missing if m):
                log.info("[loadtest] %d messages settled by QStash without arriving (%s)", len(missing),
                         dict(Counter(states.get(m) for m in missing)))
                return False
            if now - last_said > PENDING_LOG_S:
                last_said = now
                log.info("[loadtest] %d messages not arrived, QStash still retrying them (%s); waiting up to %.0f s "
                         "more", len(missing), dict(Counter(states.get(m, "no event yet") for m in missing)),
                         max(deadline - now, 0))
            last_change = now
        if now > deadline:
            log.warning("[loadtest] settle wait (%.0f s) over with %d messages not arrived; those QStash still "
                        "retries are counted undelivered", timeout, len(missing))
            return False
        await asyncio.sleep(0.25)


async def settle_copies(publisher: Publisher, sent: Sequence[Sent], *, timeout: float) -> dict[str, str]:
    """Wait until QStash has settled every accepted message of ``sent`` (DELIVERED, FAILED or CANCELED), or
    ``timeout``: with several copies per webhook, a row is there after the first delivery, and the ledger must count
    what the later ones did. Returns the states (best effort: empty when QStash's events cannot be read)."""
    ids = [s.qstash_id for s in sent if s.qstash_id]
    deadline = time.monotonic() + timeout
    while True:
        try:
            states = await publisher.states(ids)
        except PublishError as e:
            log.warning("[loadtest] QStash events could not be read while waiting for the copies: %s", e)
            return {}
        waiting = [m for m in ids if states.get(m) not in SETTLED_STATES]
        if not waiting:
            return states
        if time.monotonic() > deadline:
            log.warning("[loadtest] %d of %d messages not settled by QStash after %.0f s", len(waiting), len(ids),
                        timeout)
            return states
        await asyncio.sleep(COPIES_POLL_S)


async def close_publisher(publisher: Publisher) -> None:
    """Close the publisher's HTTP client (``Publisher`` has no ``aclose`` yet: the SDK's httpx client is reached
    through ``AsyncQStash.http``)."""
    closer = getattr(publisher, "aclose", None)
    if closer is not None:
        await closer()
        return
    inner = getattr(getattr(publisher.client, "http", None), "_client", None)
    if inner is not None:
        await inner.aclose()


# -- the run ------------------------------------------------------------------------------------------------------

Hook = Callable[[Progress], Coroutine[Any, Any, None]]


async def run_load(settings: Settings, config: LoadConfig, *, during: Hook | None = None) -> LoadResult:
    """Generate, publish, settle, reconcile. The endpoint must already be running (see :class:`EndpointProcess`).

    Args:
        during: an async hook started with the publishing (fault injection); it is awaited before settling.

    Raises:
        ConfigError: a needed setting is missing, or nothing answers at ``WEBHOOK_PUBLIC_URL``.
        StoreError / PublishError: the database or QStash failed outside the load itself.
    """
    from whatrack.qstash import Publisher
    from whatrack.realtime import Realtime
    from whatrack.store.api import Store

    settings.require("DATABASE_URL", "QSTASH_TOKEN", "WEBHOOK_PUBLIC_URL", "CENTRIFUGO_API_URL")
    assert settings.database_url
    await require_endpoint(settings.webhook_public_url)  # seconds, not a silent settle wait then "lost"
    webhooks = generate(config.n, seed=config.seed, instances=config.instances, leads=config.leads)
    org_name = config.organization or f"whatrack loadtest {config.seed}"
    store = Store.from_url(settings.database_url)
    publisher = Publisher.from_settings(settings)
    realtime = Realtime.from_settings(settings)
    try:
        await store.upgrade()
        org_id = 0
        for inst in instances_of(webhooks, config.seed, config.instances):
            org_id = (await store.register_instance(org_name, inst.name, inst.token, owner=inst.owner)).organization_id
        progress = Progress(len(webhooks) * config.copies)
        since_ms = int(time.time() * 1000)
        t0 = time.time()
        hook: asyncio.Task[None] | None = asyncio.create_task(during(progress)) if during else None
        try:
            sent = await publish_all(publisher, webhooks, rate=config.rate, concurrency=config.concurrency,
                                     retries=config.retries, progress=progress, bar=config.progress,
                                     copies=config.copies)
        finally:
            if hook is not None:
                await hook
        publish_s = max(max((s.at for s in sent), default=t0) - t0, 1e-9)
        await settle(store, publisher, sent, org_id, timeout=config.settle_timeout)
        delivered = None
        if config.copies > 1:  # the first copy stored the row: wait until QStash delivered the others too
            states = await settle_copies(publisher, sent, timeout=config.settle_timeout)
            delivered = sum(1 for v in states.values() if v == "DELIVERED")
        obs = await collect(store, realtime, publisher, sent, organization_id=org_id)
        dlq_before = len([d for d in obs.dlq if d.provider_id in {s.provider_id for s in sent}])
        replays: list[Replay] = []
        if config.replay_dlq and dlq_before:
            mine = [d for d in await dlq_items(publisher) if d.provider_id in {s.provider_id for s in sent}]
            replays = await replay_dlq(publisher, mine, retries=config.retries)
            await settle(store, publisher, sent, org_id, timeout=config.settle_timeout)
            obs = await collect(store, realtime, publisher, sent, organization_id=org_id, replays=replays)
        ledger = classify(sent, obs, replays)
        retries = await retry_count(publisher, since_ms)
    finally:
        await realtime.aclose()
        await store.aclose()
        await close_publisher(publisher)
    accepted = sum(1 for s in sent if s.outcome == "accepted")
    last_commit = max((r.created_at for r in obs.rows), default=t0)
    drain_s = max(last_commit - t0, 1e-9)
    result = LoadResult(
        config=config, published=len(sent), accepted=accepted, publish_s=publish_s, drain_s=drain_s,
        accepted_per_s=accepted / publish_s, stored_per_s=len(obs.rows) / drain_s,
        commit=latency_stats((e.created_at - e.sent_at) * 1e3 for e in ledger.entries
                             if e.created_at is not None and e.sent_at is not None),
        realtime=latency_stats((e.published_at - e.sent_at) * 1e3 for e in ledger.entries
                               if e.published_at is not None and e.sent_at is not None),
        retries=retries, dlq=dlq_before, replays=replays, ledger=ledger, sent=sent, delivered=delivered)
    log.info("[loadtest] %d messages: %s; %.0f accepted/s, %.0f stored/s, commit %s", len(sent), ledger.summary(),
             result.accepted_per_s, result.stored_per_s, result.commit)
    return result
