"""The offline QStash broker's delivery loop: claim due messages, deliver them signed, record each outcome atomically.

One dispatcher task claims due messages in batches (moving them to a lease set) and hands each to a bounded pool of
delivery tasks sharing one keep-alive ``aiohttp.ClientSession`` (a tenth of httpx's CPU per request, measured: with
httpx the client took two thirds of the broker's CPU per delivered message). Every outcome (delivered, retry scheduled,
failed to the DLQ, canceled), with its events and any callback message, is one Redis transaction. Nothing polls when
a wakeup signal works: publishes, retries, queue and flow-control slots freed and a full pool's first free slot set an
``asyncio.Event``; timers only cover the next due time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import certifi

from whatrack.devstack.qstash.durations import HeaderError, default_backoff_s, eval_retry_delay_ms, retry_after_s
from whatrack.devstack.qstash.flow import FlowControl
from whatrack.devstack.qstash.model import (
    Record,
    callback_body,
    callback_spec,
    event,
    make_message,
    now_ms,
    response_fields,
)
from whatrack.devstack.qstash.publish import fire_due_schedules
from whatrack.devstack.qstash.sign import sign
from whatrack.devstack.qstash.store import FINISHED_GRACE_S, Store

log = logging.getLogger("whatrack.devstack.qstash.delivery")

#: Concurrent delivery attempts: enough to keep a 2-core machine busy at > 1,000 deliveries/s with a fast endpoint.
DEFAULT_CONCURRENCY = 128
#: Messages claimed per Redis round trip.
CLAIM_BATCH = 256
#: Lease length. An expired lease is taken back only when no attempt for that message runs in this process, so a
#: long attempt is never doubled; a restart takes back every lease (the attempts died with the old process).
LEASE_MARGIN_S = 60
#: Longest the loop sleeps without a signal: bounds how late a message published by another process is noticed.
IDLE_WAIT_S = 1.0
#: After a wakeup, wait this long for more (a batch publish accepts its messages one by one): one claim per burst
#: rather than one per message, for at most this much latency.
COALESCE_S = 0.002
#: Response bodies are kept (DLQ, events, callbacks) up to this size, as QStash truncates to its plan limit.
MAX_RESPONSE_BODY = 64 * 1024


#: The host the official qstash-py tests deliver to; with ``emulate_httpstatus`` it is answered here, offline.
MOCK_HTTPSTATUS = "mock.httpstatus.io"


async def mock_httpstatus(url: str) -> Attempt:
    """What ``https://mock.httpstatus.io/<code>[?sleep=ms]`` answers: status <code>, body "<code> <Reason>"."""
    parts = urlsplit(url)
    try:
        code = int(parts.path.strip("/").split("/")[0])
        reason = HTTPStatus(code).phrase
    except ValueError:
        return Attempt(404, {}, b"404 Not Found")
    sleep_ms = parse_qs(parts.query).get("sleep", ["0"])[0]
    if sleep_ms.isdigit():
        await asyncio.sleep(int(sleep_ms) / 1000)
    return Attempt(code, {"content-type": "text/plain"}, f"{code} {reason}".encode())


def _merged(headers: Any) -> dict[str, str]:
    """Response headers lower-cased, repeated names joined with ", " (as one HTTP field value)."""
    out: dict[str, str] = {}
    for k, v in headers.items():
        name = k.lower()
        out[name] = f"{out[name]}, {v}" if name in out else v
    return out


@dataclass
class Attempt:
    """What one delivery attempt produced."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def non_retryable(self) -> bool:
        return self.status == 489 and self.headers.get("upstash-nonretryable-error", "").lower() == "true"


class Dispatcher:
    """Runs deliveries for one broker. ``signing_key`` is read at each attempt, so a rotation applies at once."""

    def __init__(self, store: Store, flow: FlowControl, signing_key: Callable[[], str], *, time_scale: float = 1.0,
                 concurrency: int = DEFAULT_CONCURRENCY, emulate_httpstatus: bool = False) -> None:
        self.store = store
        self.flow = flow
        self.signing_key = signing_key
        self.time_scale = time_scale
        self.concurrency = concurrency
        self.emulate_httpstatus = emulate_httpstatus
        self.wake = asyncio.Event()
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.cancel_requested: set[str] = set()
        self.dirty_queues: set[str] = set()
        self._dlq_seq = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_schedule: int | None = 0  # 0: look at the schedules on the first pass
        self.delivered = 0

    # lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        moved = await self.store.recover()
        if moved:
            log.info("recovered %d in-flight or wait-listed messages from an earlier run", moved)
        await self.flow.load()
        self.dirty_queues.update(m.decode() for m in await self.store.r.smembers(self.store.k("queues")))
        tls = ssl.create_default_context(cafile=certifi.where())  # certificates verified, as QStash does
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency, ssl=tls),
                                              trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="qstash-dispatcher")

    async def stop(self) -> None:
        """Stop claiming and cancel attempts in flight; their leases return them to due at the next start."""
        self._stopping = True
        self.wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self.in_flight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def poke(self, queue: str | None = None) -> None:
        if queue:
            self.dirty_queues.add(queue)
        self.wake.set()

    # the loop --------------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        last_lease_check = 0.0
        while not self._stopping:
            self.wake.clear()
            try:
                timeout = await self._pass()
                if time.monotonic() - last_lease_check > 5:
                    last_lease_check = time.monotonic()
                    await self._reclaim_expired()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis briefly unreachable: keep the loop alive, try again shortly
                log.exception("dispatcher pass failed; retrying")
                timeout = 0.5
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):  # not wait_for, which can swallow a cancellation (3.11)
                        await self.wake.wait()
                    await asyncio.sleep(COALESCE_S)

    async def _pass(self) -> float:
        """One pass; returns how long to sleep (0 = go again at once) unless woken. One Redis round trip when idle."""
        now = now_ms()
        if self._next_schedule is not None and self._next_schedule <= now:
            await fire_due_schedules(self.store, self.flow, now)
        for q in list(self.dirty_queues):
            self.dirty_queues.discard(q)
            await self.store.pump_queue(q, now)
        rate_wake = await self.flow.release(time.time()) if self.flow.waiting else None
        free = self.concurrency - len(self.in_flight)
        if free <= 0:
            return IDLE_WAIT_S
        want = min(free, CLAIM_BATCH)
        claimed = await self.store.claim(now, want, now + 1000 * LEASE_MARGIN_S)
        self._next_schedule = claimed.next_schedule
        for mid, rec, body in claimed.items:
            await self._dispatch(mid, rec, body)
        if len(claimed.items) == want:
            return 0.0
        waits = [IDLE_WAIT_S]
        for t in (claimed.next_due, claimed.next_schedule):
            if t is not None:
                waits.append(max(0.0, (t - now_ms()) / 1000))
        if rate_wake is not None:
            waits.append(max(0.0, rate_wake - time.time()))
        return min(waits)

    async def _reclaim_expired(self) -> None:
        expired = [m for m in await self.store.expired_leases(now_ms()) if m not in self.in_flight]
        for mid in expired:
            async with self.store.r.pipeline(transaction=True) as pipe:
                pipe.zrem(self.store.k("lease"), mid)
                pipe.zadd(self.store.k("due"), {mid: now_ms()})
                await pipe.execute()
        if expired:
            log.warning("re-queued %d messages whose lease ran out", len(expired))

    async def _dispatch(self, mid: str, rec: Record, body: bytes) -> None:
        if rec.get("cancel") or mid in self.cancel_requested:
            await self.finish_canceled(rec)
            return
        key = rec.get("flowControlKey")
        if key:
            if self.flow.get(key).blocked(time.time()):
                await self.flow.park(key, mid, rec["notBefore"])
                return
            self.flow.start(key)
        self.in_flight[mid] = asyncio.create_task(self._attempt(rec, body), name=f"deliver-{mid}")

    # one attempt -----------------------------------------------------------------------------------------------
    async def _attempt(self, rec: Record, body: bytes) -> None:
        mid = rec["messageId"]
        started = now_ms()
        quiet = False
        try:
            result = await self._send(rec, body)
            await self._record(rec, body, result, started)
            # A plain delivery that ended well changes nothing the loop waits for, unless the pool was full: no pass
            # (a pass is a Redis round trip; one per delivery cost more broker CPU than the delivery itself).
            quiet = result.ok and not any(rec.get(k) for k in ("flowControlKey", "queueName", "callback"))
        except asyncio.CancelledError:
            raise
        except Exception:  # a Redis failure while recording: the lease brings the message back, never lost
            log.exception("recording the outcome of %s failed; it will be attempted again", mid)
        finally:
            full = len(self.in_flight) >= self.concurrency
            self.in_flight.pop(mid, None)
            if rec.get("flowControlKey"):
                self.flow.finish(rec["flowControlKey"])
            if full or not quiet:
                self.wake.set()

    async def _send(self, rec: Record, body: bytes) -> Attempt:
        if self.emulate_httpstatus and urlsplit(rec["url"]).hostname == MOCK_HTTPSTATUS:
            return await mock_httpstatus(rec["url"])
        headers = {"User-Agent": "Upstash-QStash", "Upstash-Message-Id": rec["messageId"],
                   "Upstash-Retried": str(rec.get("retried", 0))}
        for name, values in (rec.get("header") or {}).items():
            headers[name] = ", ".join(values)
        if rec.get("contentType"):
            headers["Content-Type"] = rec["contentType"]
        for src, dst in (("topicName", "Upstash-Topic-Name"), ("scheduleId", "Upstash-Schedule-Id"),
                         ("callerIP", "Upstash-Caller-Ip")):
            if rec.get(src):
                headers[dst] = rec[src]
        headers["Upstash-Signature"] = sign(body, rec["url"], self.signing_key())
        assert self._session is not None, "Dispatcher.start() first"
        try:
            # No Content-Type of aiohttp's own: a message published without one is delivered without one.
            async with self._session.request(rec["method"], rec["url"], data=body, headers=headers,
                                             allow_redirects=False, skip_auto_headers=("Content-Type",),
                                             timeout=aiohttp.ClientTimeout(total=float(rec.get("timeout", 900)))
                                             ) as resp:
                content = await resp.read()
                return Attempt(resp.status, _merged(resp.headers), content[:MAX_RESPONSE_BODY])
        except TimeoutError:
            return Attempt(error=f"ReadTimeout: no answer within {rec.get('timeout', 900)} s")
        except (aiohttp.ClientError, OSError, ValueError) as e:  # refused, reset, TLS, a URL it cannot reach
            return Attempt(error=f"{type(e).__name__}: {e}".rstrip(": "))

    def _retry_delay_ms(self, rec: Record, result: Attempt) -> float:
        retried = rec.get("retried", 0)
        asked = retry_after_s(result.headers, time.time())
        if asked is not None:
            return asked * 1000 * self.time_scale
        if rec.get("retryDelayExpression"):
            try:
                return eval_retry_delay_ms(rec["retryDelayExpression"], retried) * self.time_scale
            except HeaderError:
                log.warning("retry delay of %s no longer evaluates; using the default backoff", rec["messageId"])
        return default_backoff_s(retried + 1) * 1000 * self.time_scale

    async def _record(self, rec: Record, body: bytes, result: Attempt, started: int) -> None:
        """Write the attempt's outcome, its events and any callback message as one atomic group."""
        mid = rec["messageId"]
        t = now_ms()
        st = self.store
        canceled = mid in self.cancel_requested
        final_failure = not result.ok and (result.non_retryable or canceled
                                           or rec.get("retried", 0) >= rec["maxRetries"])
        cmds: list[list[Any]] = [["ZREM", st.k("lease"), mid], st.event_command(event(rec, "ACTIVE", started))]
        if rec.get("callback"):
            cmds += self._callback(rec, body, result, failure=False, dlq_id=None)
        if result.ok:
            cmds.append(st.event_command(event(rec, "DELIVERED", t, responseStatus=result.status)))
            cmds += self._finish(rec)
        elif canceled:
            cmds.append(st.event_command(event(rec, "CANCELED", t)))
            cmds += self._finish(rec)
        else:
            error = result.error or f"status {result.status}"
            resp = response_fields(result.status, result.headers, result.body)
            cmds.append(st.event_command(event(rec, "ERROR", t, error=error, **resp)))
            if final_failure:
                dlq_id = f"{t}-{next(self._dlq_seq)}"
                cmds.append(st.event_command(event(rec, "FAILED", t, error=error, **resp)))
                cmds.append(["HSET", st.k("dlq", dlq_id), "rec", json.dumps({**rec, **resp, "dlqId": dlq_id}),
                             "body", body])
                cmds.append(["ZADD", st.k("dlq"), t, dlq_id])
                if rec.get("failureCallback"):
                    cmds += self._callback(rec, body, result, failure=True, dlq_id=dlq_id)
                cmds += self._finish(rec)
            else:
                due = int(t + self._retry_delay_ms(rec, result))
                rec = {**rec, "retried": rec.get("retried", 0) + 1}
                cmds.append(["HSET", st.k("msg", mid), "rec", json.dumps(rec)])
                cmds.append(["ZADD", st.k("due"), due, mid])
                cmds.append(st.event_command(event(rec, "RETRY", t, nextDeliveryTime=due)))
        await st.apply(cmds)
        if result.ok:
            self.delivered += 1
        if rec.get("queueName") and (result.ok or final_failure or canceled):
            self.dirty_queues.add(rec["queueName"])
        self.cancel_requested.discard(mid)
        log.debug("attempt %s of %s: %s", rec.get("retried", 0), mid, result.status or result.error)

    def _finish(self, rec: Record) -> list[list[Any]]:
        """The writes that end a message: no longer live, readable for a grace period, its queue slot freed."""
        mid = rec["messageId"]
        cmds: list[list[Any]] = [["SREM", self.store.k("live"), mid],
                                 ["EXPIRE", self.store.k("msg", mid), FINISHED_GRACE_S]]
        if rec.get("queueName"):
            cmds.append(["SREM", self.store.k("queue", rec["queueName"], "active"), mid])
        return cmds

    def _callback(self, rec: Record, body: bytes, result: Attempt, *, failure: bool,
                  dlq_id: str | None) -> list[list[Any]]:
        """The writes that accept a callback (or failure callback) message about this attempt."""
        url = rec["failureCallback" if failure else "callback"]
        payload = callback_body(rec, body, result.status, result.headers, result.body, dlq_id=dlq_id)
        t = now_ms()
        cb = make_message(callback_spec(rec, failure), url, caller_ip=rec.get("callerIP"), created=t,
                          kind="failureCallback" if failure else "callback")
        self.wake.set()
        return [*self.store.message_commands(cb, payload), self.store.event_command(event(cb, "CREATED", t))]

    async def finish_canceled(self, rec: Record) -> None:
        """End a message that was canceled before (or instead of) its next attempt."""
        mid = rec["messageId"]
        await self.store.apply([["ZREM", self.store.k("lease"), mid],
                                    self.store.event_command(event(rec, "CANCELED", now_ms())), *self._finish(rec)])
        self.cancel_requested.discard(mid)
        if rec.get("queueName"):
            self.dirty_queues.add(rec["queueName"])
