"""One follow-up job, and the context every job shares: what :class:`~whatrack.followups.worker.FollowupWorker` runs.

A :class:`WorkerContext` (store, UAZAPI client, realtime publisher) is built once at start-up and shared by every job;
:func:`process_followup` is a plain ``async def``. Per job: validate the payload; skip if the lead replied since the
follow-up was scheduled; send through UAZAPI; record the send in Redis (``bull:followup:<id>:sent``) *before* the
database write, so a retry (or a rescued stalled job) never sends twice; store the outbound message idempotently on
the job id; publish it in realtime (when Centrifugo fails, the row stays in the outbox for the endpoint's publisher:
the job is done).

A job that *may* have been sent by an attempt cut short (:func:`may_have_been_sent`) looks for UAZAPI's echo of that
send before sending again; the worker's module docstring tells the whole story and the window it leaves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import redis.asyncio as aredis
from bullmq import Job, UnrecoverableError

from whatrack.errors import PayloadError, PublishError, SendError, StackError
from whatrack.followups.constants import JOB_NAME, SENT_RECORD_TTL_S, sent_key
from whatrack.followups.jobs import FollowupJob
from whatrack.settings import Settings
from whatrack.times import iso

log = logging.getLogger("whatrack.followups.process")

#: ``track_source`` on our sends: the UAZAPI echo webhook carries it back, so the handler can tell our sends apart.
TRACK_SOURCE = "whatrack-followup"
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
