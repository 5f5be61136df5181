"""Alerts (PRD §10.3): five rules over two snapshots of a running service (``whatrack alerts``: :mod:`.cli`).

A snapshot reads four sources: the endpoint's ``/metrics`` (Prometheus text), a PING to ``UPSTASH_REDIS_URL``
(through :mod:`whatrack.redis_tcp`, TLS verified), the QStash DLQ (the official client's ``dlq.list``) and the BullMQ
``followup`` queue's keys. Two snapshots ``window`` apart are compared by pure rule functions; a rule whose source
could not be read is ``unknown`` (with the reason), never a crash. Rules are data (:class:`Rule`), so the table in
``docs/operations.md`` and the code cannot drift apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from whatrack.durations import parse_seconds
from whatrack.errors import ConfigError
from whatrack.logs import RedactingFilter
from whatrack.settings import Settings, mask_url

log = logging.getLogger("whatrack.alerts.rules")

State = Literal["firing", "ok", "unknown"]

#: Each source gets this long per snapshot: an unreachable one must make the check ``unknown``, not hang it.
PROBE_TIMEOUT_S = 5.0
#: The handler's histogram bounds (metrics.py): "slower than N s" is read at the largest bound <= N.
_WEBHOOK_FAMILY = "whatrack_webhooks_total"
_DURATION_FAMILY = "whatrack_webhook_duration_seconds"
_REDIS_ERRORS = "whatrack_redis_connection_errors_total"


@dataclass(frozen=True)
class QueueSample:
    """The ``followup`` queue at one moment: jobs ready to run, and the newest finish time (ms, 0 = none)."""

    ready: int  # wait + paused + prioritized + delayed jobs already due
    last_finished_ms: int


@dataclass(frozen=True)
class Snapshot:
    """What each source said at ``taken_at`` (monotonic seconds). ``None`` + an ``*_error`` when it could not say."""

    taken_at: float
    metrics: dict[str, float] | None = None
    metrics_error: str | None = None
    redis_ok: bool | None = None
    redis_error: str | None = None
    dlq_count: int | None = None
    dlq_error: str | None = None
    queue: QueueSample | None = None
    queue_error: str | None = None


@dataclass(frozen=True)
class Verdict:
    state: State
    value: float | None
    detail: str


@dataclass(frozen=True)
class Rule:
    """One alert rule. ``condition(first, second, threshold)`` is pure; ``window_s`` is the default window."""

    name: str
    description: str
    condition: Callable[[Snapshot, Snapshot, float], Verdict]
    threshold: float
    window_s: float
    severity: Literal["critical", "warning"]
    unit: str = ""


@dataclass(frozen=True)
class Result:
    rule: str
    severity: str
    state: State
    value: float | None
    threshold: float
    detail: str
    description: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- pure helpers over metric samples ---------------------------------------------------------------------------------


def _delta(first: dict[str, float], second: dict[str, float], key: str) -> float:
    """Increase of a counter between two scrapes; a restarted process (counter went down) counts from zero."""
    a, b = first.get(key, 0.0), second.get(key, 0.0)
    return b - a if b >= a else b


def _buckets(sample: dict[str, float]) -> dict[float, float]:
    prefix = _DURATION_FAMILY + "_bucket{le=\""
    out: dict[float, float] = {}
    for key, v in sample.items():
        if key.startswith(prefix):
            out[float(key[len(prefix):-2])] = v
    return out


def _both_metrics(first: Snapshot, second: Snapshot) -> tuple[dict[str, float], dict[str, float]] | str:
    if first.metrics is None or second.metrics is None:
        return f"metrics unreadable: {first.metrics_error or second.metrics_error}"
    return first.metrics, second.metrics


def _window(first: Snapshot, second: Snapshot) -> float:
    return max(second.taken_at - first.taken_at, 1e-3)


# -- the five conditions (pure) ---------------------------------------------------------------------------------------


def redis_failing(first: Snapshot, second: Snapshot, threshold: float) -> Verdict:
    """PING to UPSTASH_REDIS_URL fails now, or the Redis error counter grew by more than ``threshold``."""
    m = _both_metrics(first, second)
    errors = _delta(m[0], m[1], _REDIS_ERRORS) if not isinstance(m, str) else None
    if second.redis_ok is False:
        return Verdict("firing", errors, f"PING failed: {second.redis_error}")
    if errors is not None and errors > threshold:
        return Verdict("firing", errors, f"{errors:.0f} Redis connection error(s) counted in the window")
    if second.redis_ok is None and errors is None:
        return Verdict("unknown", None, f"no probe ({second.redis_error}) and {m}")
    return Verdict("ok", errors or 0.0, "PING answered" if second.redis_ok else "no Redis errors counted")


def signature_failures(first: Snapshot, second: Snapshot, threshold: float) -> Verdict:
    """Rejected signatures per minute over the window above ``threshold`` (QStash itself never sends a bad one)."""
    m = _both_metrics(first, second)
    if isinstance(m, str):
        return Verdict("unknown", None, m)
    rejected = _delta(m[0], m[1], _WEBHOOK_FAMILY + '{outcome="rejected_signature"}')
    per_min = rejected * 60.0 / _window(first, second)
    state: State = "firing" if per_min > threshold else "ok"
    return Verdict(state, round(per_min, 2), f"{rejected:.0f} rejected in {_window(first, second):.1f} s")


def slow_processing(first: Snapshot, second: Snapshot, threshold: float, *, slow_s: float = 10.0) -> Verdict:
    """Share of deliveries in the window slower than ``slow_s`` above ``threshold`` (a fraction)."""
    m = _both_metrics(first, second)
    if isinstance(m, str):
        return Verdict("unknown", None, m)
    b1, b2 = _buckets(m[0]), _buckets(m[1])
    bounds = sorted(b for b in b2 if b <= slow_s)
    if not bounds:
        return Verdict("unknown", None, f"no histogram bucket at or below {slow_s} s")
    bound = bounds[-1]
    total = _delta(m[0], m[1], _DURATION_FAMILY + "_count")
    transient = _delta(m[0], m[1], _WEBHOOK_FAMILY + '{outcome="transient"}')
    if total <= 0:
        return Verdict("ok", 0.0, "no deliveries in the window")
    fast = b2.get(bound, 0.0) - b1.get(bound, 0.0) if b2.get(bound, 0.0) >= b1.get(bound, 0.0) else b2.get(bound, 0.0)
    share = max(total - fast, 0.0) / total
    state: State = "firing" if share > threshold else "ok"
    return Verdict(state, round(share, 4), f"{total - fast:.0f} of {total:.0f} deliveries slower than {bound:g} s "
                                           f"({transient:.0f} answered 503/500: timeouts or outages)")


def dlq_not_empty(first: Snapshot, second: Snapshot, threshold: float) -> Verdict:
    """QStash's DLQ holds more than ``threshold`` messages (each is a webhook that was never stored)."""
    if second.dlq_count is None:
        return Verdict("unknown", None, f"DLQ unreadable: {second.dlq_error}")
    state: State = "firing" if second.dlq_count > threshold else "ok"
    return Verdict(state, float(second.dlq_count), "messages waiting in the QStash DLQ" if second.dlq_count
                   else "DLQ empty")


def queue_backlog(first: Snapshot, second: Snapshot, threshold: float) -> Verdict:
    """Ready follow-up jobs grew by more than ``threshold`` while no job finished: no worker is consuming."""
    if first.queue is None or second.queue is None:
        return Verdict("unknown", None, f"queue unreadable: {first.queue_error or second.queue_error}")
    growth = second.queue.ready - first.queue.ready
    finished = second.queue.last_finished_ms > first.queue.last_finished_ms
    state: State = "firing" if growth > threshold and not finished else "ok"
    why = "a job finished in the window" if finished else "no job finished in the window"
    return Verdict(state, float(growth), f"{second.queue.ready} ready (was {first.queue.ready}); {why}")


def publish_lag(first: Snapshot, second: Snapshot, threshold: float) -> Verdict:
    """Messages published to Centrifugo more than ``threshold`` seconds after their commit in the window, or an
    outbox holding messages at both scrapes while nothing was published (Centrifugo down: the webhook still answers
    200 and the endpoint's publisher retries, so this is where an outage shows)."""
    m = _both_metrics(first, second)
    if isinstance(m, str):
        return Verdict("unknown", None, m)
    family, depth_key = "whatrack_realtime_publish_lag_seconds", "whatrack_realtime_outbox_messages"
    prefix = family + '_bucket{le="'
    bounds = sorted(float(k[len(prefix):-2]) for k in m[1] if k.startswith(prefix) and "+Inf" not in k)
    bounds = [b for b in bounds if b <= threshold]
    if not bounds:
        return Verdict("unknown", None, f"no publish-lag bucket at or below {threshold:g} s")
    bucket = f'{prefix}{bounds[-1]}"}}'
    total = _delta(m[0], m[1], family + "_count")
    late = max(total - _delta(m[0], m[1], bucket), 0.0)
    waiting = min(m[0].get(depth_key, 0.0), m[1].get(depth_key, 0.0))
    if late > 0:
        return Verdict("firing", late, f"{late:.0f} of {total:.0f} publications more than {bounds[-1]:g} s after "
                                       "their commit")
    if waiting > 0 and total == 0:
        return Verdict("firing", waiting, f"{waiting:.0f} message(s) waiting in the outbox, none published in the "
                                          "window: Centrifugo down or no publisher running")
    return Verdict("ok", 0.0, f"{total:.0f} publication(s) in the window, none late")


def default_rules(*, slow_s: float = 10.0, window_s: float = 30.0) -> tuple[Rule, ...]:
    """The PRD §10.3 rules (plus DLQ and backlog). ``slow_s``: what counts as a slow delivery (handler timeout 20 s)."""
    def slow(a: Snapshot, b: Snapshot, t: float) -> Verdict:
        return slow_processing(a, b, t, slow_s=slow_s)

    return (
        Rule("redis_connection", "Upstash Redis unreachable: BullMQ follow-ups stall", redis_failing, 0, window_s,
             "critical", "errors"),
        Rule("signature_failures", "QStash signature verification failing: forged traffic or a rotated key",
             signature_failures, 5, window_s, "warning", "per min"),
        Rule("processing_timeout", f"deliveries slower than {slow_s:g} s: database or realtime degraded", slow, 0.05,
             window_s, "critical", "share"),
        Rule("dlq_not_empty", "webhooks in the QStash DLQ: messages not stored until retried", dlq_not_empty, 0,
             window_s, "critical", "messages"),
        Rule("queue_backlog", "follow-up jobs piling up with no worker consuming", queue_backlog, 0, window_s,
             "warning", "jobs"),
        Rule("publish_lag", "messages reaching Centrifugo late or not at all (realtime outbox)", publish_lag, 10,
             window_s, "critical", "messages"),
    )


def evaluate(rules: Sequence[Rule], first: Snapshot, second: Snapshot) -> list[Result]:
    """Every rule's verdict on the two snapshots. Pure; a rule that raises is ``unknown``."""
    out = []
    for r in rules:
        try:
            v = r.condition(first, second, r.threshold)
        except Exception as e:  # a rule bug must not hide the other alerts
            v = Verdict("unknown", None, f"rule failed: {type(e).__name__}")
        out.append(Result(r.name, r.severity, v.state, v.value, r.threshold, v.detail, r.description))
    return out


# -- sources (I/O; each returns an error string instead of raising) ---------------------------------------------------


def _err(e: BaseException) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def read_metrics(url: str, client: httpx.AsyncClient) -> tuple[dict[str, float] | None, str | None]:
    from whatrack.metrics import parse

    try:
        r = await client.get(url, timeout=PROBE_TIMEOUT_S)
        r.raise_for_status()
        return parse(r.text), None
    except (httpx.HTTPError, ValueError) as e:
        return None, f"{mask_url(url)}: {_err(e)}"


async def ping_redis(settings: Settings) -> tuple[bool | None, str | None]:
    """PING ``UPSTASH_REDIS_URL`` once (no retries: the alert wants the truth now, not after backoff)."""
    if not settings.upstash_redis_url:
        return None, "UPSTASH_REDIS_URL is not set"
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from whatrack import redis_tcp

    try:
        kw = redis_tcp.connection_kwargs(settings.upstash_redis_url, ca_bundle=settings.redis_ca_bundle,
                                         socket_timeout=PROBE_TIMEOUT_S)
    except ConfigError as e:
        return None, str(e)
    kw.update(socket_connect_timeout=PROBE_TIMEOUT_S, retry=Retry(NoBackoff(), 0), health_check_interval=0)
    client = aredis.Redis.from_url(settings.upstash_redis_url, **kw)
    try:
        await asyncio.wait_for(client.ping(), PROBE_TIMEOUT_S * 2)
        return True, None
    except Exception as e:  # ConnectionError, TimeoutError, SSL errors, AuthenticationError
        return False, f"{mask_url(settings.upstash_redis_url)}: {_err(e)}"
    finally:
        await client.aclose()


async def dlq_size(settings: Settings) -> tuple[int | None, str | None]:
    """How many messages the QStash DLQ holds (first page; 100 means "100 or more")."""
    if not settings.qstash_token:
        return None, "QSTASH_TOKEN is not set"
    from qstash import AsyncQStash

    client = AsyncQStash(settings.qstash_token.reveal(), base_url=settings.qstash_url, retry=False)
    try:
        res = await asyncio.wait_for(client.dlq.list(count=100), PROBE_TIMEOUT_S * 2)
        return len(res.messages), None
    except Exception as e:  # QStashError, httpx errors, timeouts
        return None, f"QStash at {settings.qstash_url}: {_err(e) if 'Bearer' not in str(e) else type(e).__name__}"
    finally:
        # The SDK has no close(); its httpx client is reached through ``http`` (as loadtest.close_publisher does).
        inner = getattr(getattr(client, "http", None), "_client", None)
        if inner is not None:
            await inner.aclose()


async def queue_sample(settings: Settings, queue_name: str | None = None) -> tuple[QueueSample | None, str | None]:
    """Read the ``followup`` queue's keys: ready jobs (wait, paused, prioritized, delayed and due) and last finish."""
    if not settings.upstash_redis_url:
        return None, "UPSTASH_REDIS_URL is not set"
    from whatrack import redis_tcp
    from whatrack.followups import constants as followups

    prefix = f"{followups.KEY_PREFIX}:{queue_name or followups.QUEUE_NAME}:"
    client = redis_tcp.connect(settings.upstash_redis_url, ca_bundle=settings.redis_ca_bundle,
                               socket_timeout=PROBE_TIMEOUT_S)
    try:
        now_ms = int(time.time() * 1000)
        pipe = client.pipeline(transaction=False)
        pipe.llen(prefix + "wait")
        pipe.llen(prefix + "paused")
        pipe.zcard(prefix + "prioritized")
        # BullMQ scores delayed jobs as due_ms * 0x1000 + a counter: everything below (now+1)*0x1000 is due.
        pipe.zcount(prefix + "delayed", "-inf", (now_ms + 1) * 0x1000 - 1)
        # completed/failed are scored by finishedOn (ms): the top score is the newest finish.
        pipe.zrevrange(prefix + "completed", 0, 0, withscores=True)
        pipe.zrevrange(prefix + "failed", 0, 0, withscores=True)
        wait, paused, prio, due, done, failed = await asyncio.wait_for(pipe.execute(), PROBE_TIMEOUT_S * 2)
        last = max([int(s) for _, s in done] + [int(s) for _, s in failed] + [0])
        return QueueSample(int(wait) + int(paused) + int(prio) + int(due), last), None
    except Exception as e:
        return None, f"{mask_url(settings.upstash_redis_url)}: {_err(e)}"
    finally:
        await client.aclose()


async def snapshot(settings: Settings, metrics_url: str | None, client: httpx.AsyncClient) -> Snapshot:
    """Read every source at once. Never raises: each failure becomes that source's ``*_error``."""
    async def none() -> tuple[None, str]:
        return None, "no metrics URL (pass --metrics-url or set WEBHOOK_PUBLIC_URL)"

    taken = time.monotonic()
    (m, m_err), (r, r_err), (d, d_err), (q, q_err) = await asyncio.gather(
        read_metrics(metrics_url, client) if metrics_url else none(), ping_redis(settings), dlq_size(settings),
        queue_sample(settings))
    return Snapshot(taken, m, m_err, r, r_err, d, d_err, q, q_err)


async def check(settings: Settings, *, metrics_url: str | None, window_s: float,
                rules: Sequence[Rule] | None = None) -> list[Result]:
    """Two snapshots ``window_s`` apart, evaluated. Details never carry a secret (redacted from settings)."""
    rules = rules if rules is not None else default_rules(window_s=window_s)
    async with httpx.AsyncClient() as client:
        first = await snapshot(settings, metrics_url, client)
        await asyncio.sleep(window_s)
        second = await snapshot(settings, metrics_url, client)
    redact = RedactingFilter(settings.secret_values()).redact
    results = [dataclasses.replace(r, detail=redact(r.detail)) for r in evaluate(rules, first, second)]
    for r in results:
        if r.state != "ok":
            log.warning("alert %s %s: %s", r.rule, r.state, r.detail)
    return results


async def notify(url: str, results: Sequence[Result]) -> str | None:
    """POST the firing results as JSON to ``url``; return an error description, or None when it was accepted."""
    firing = [r.as_dict() for r in results if r.state == "firing"]
    if not firing:
        return None
    payload = {"source": "whatrack", "firing": firing, "at": int(time.time())}
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as c:
            r = await c.post(url, content=json.dumps(payload, ensure_ascii=False),
                             headers={"Content-Type": "application/json"})
        r.raise_for_status()
        return None
    except httpx.HTTPError as e:
        return f"notification to {mask_url(url)} failed: {_err(e)}"


def render_table(results: Sequence[Result]) -> str:
    """The plain-text table ``alerts check`` prints (rule, state, value, threshold, detail)."""
    rows = [("rule", "state", "value", "threshold", "detail")]
    for r in results:
        value = "-" if r.value is None else f"{r.value:g}"
        rows.append((r.rule, r.state, value, f"{r.threshold:g}", r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
                     for row in rows)


def default_metrics_url(settings: Settings) -> str | None:
    """``/metrics`` on the host serving WEBHOOK_PUBLIC_URL (offline: the local endpoint)."""
    if not settings.webhook_public_url:
        return None
    p = urlsplit(settings.webhook_public_url)
    return urlunsplit((p.scheme, p.netloc, "/metrics", "", ""))


# -- parsing ---------------------------------------------------------------------------------------------------------


def parse_window(text: str) -> float:
    """``"30s"``, ``"1m"``, ``"500ms"``, ``"2"`` (seconds) as seconds.

    Raises:
        ValueError: not one number with an optional unit.
    """
    seconds = parse_seconds(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a window like 30s, 1m, 500ms or 2 (seconds)")
    return seconds
