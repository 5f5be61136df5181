"""Pure message logic of the offline QStash broker: publish headers in, message records out, and the JSON views.

A message record is a JSON-ready dict whose keys are the wire names of the Message shape (protocols/qstash.md §1.4)
plus a few internal ones (``retried``, ``contentType``, ``timeout``, ``kind``, ``cancel``, the callback settings). The
body travels beside it as bytes. No I/O here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from whatrack.devstack.qstash.durations import (
    HeaderError,
    eval_retry_delay_ms,
    parse_bool,
    parse_duration_s,
    parse_flow_control,
)

Record = dict[str, Any]

#: QStash's documented default (docs since 2026-07): 3 retries, so 4 attempts.
DEFAULT_RETRIES = 3
#: Per-attempt HTTP timeout when the publisher sets none: the free plan's maximum response duration (15 min).
DEFAULT_TIMEOUT_S = 900
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_CALLBACK_CONFIG = ("method", "timeout", "retries", "retry-delay", "delay")
_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(prefix: str) -> str:
    """An id shaped like QStash's (``msg_`` + 26 base58 characters); unguessable.

    One 192-bit draw written in base 58 (the low 26 digits: bias below 2^-40), not 26 draws: a per-character
    ``secrets.choice`` cost more broker CPU per message than signing it.
    """
    n = int.from_bytes(secrets.token_bytes(24), "big")
    out = []
    for _ in range(26):
        n, d = divmod(n, 58)
        out.append(_ALPHABET[d])
    return prefix + "".join(out)


def canonical(name: str) -> str:
    """Go's canonical MIME header form (``test-header`` → ``Test-Header``): how QStash reports header names."""
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def is_url(destination: str) -> bool:
    return destination.startswith(("http://", "https://"))


@dataclass
class CallbackSettings:
    """How a callback (or failure callback) message is sent: its URL, forwarded headers and own config."""

    url: str | None = None
    header: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)


@dataclass
class PublishSpec:
    """Everything a publish request's headers say, validated; shared by each message it fans out to."""

    method: str = "POST"
    content_type: str | None = None
    header: dict[str, list[str]] = field(default_factory=dict)
    retries: int = DEFAULT_RETRIES
    retry_delay: str | None = None
    delay_s: int = 0
    not_before_ms: int | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    dedup_id: str | None = None
    content_dedup: bool = False
    callback: CallbackSettings = field(default_factory=CallbackSettings)
    failure_callback: CallbackSettings = field(default_factory=CallbackSettings)
    flow: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    cron: str | None = None
    schedule_id: str | None = None
    queue: str | None = None
    #: Upstash-Redact-Fields: what the events (logs) must not show: the body, all headers, or named headers.
    redact_body: bool = False
    redact_all_headers: bool = False
    redact_headers: set[str] = field(default_factory=set)

    def logged_header(self, header: dict[str, list[str]]) -> dict[str, list[str]] | None:
        """The forwarded headers as the events may show them (None when all are redacted or there are none)."""
        if self.redact_all_headers:
            return None
        return {k: v for k, v in header.items() if k not in self.redact_headers} or None


def _int_header(headers: Mapping[str, str], name: str, example: str) -> int | None:
    raw = headers.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError as e:
        raise HeaderError(canonical(name), f"{raw!r} is not an integer", example) from e
    if value < 0:
        raise HeaderError(canonical(name), f"{raw!r} is negative", example)
    return value


def _callback_settings(headers: Mapping[str, str], prefix: str) -> CallbackSettings:
    cb = CallbackSettings(url=headers.get(prefix) or None)
    if cb.url is not None and not is_url(cb.url):
        raise HeaderError(canonical(prefix), f"{cb.url!r} is not an http(s) URL", "https://example.com/cb")
    for name, value in headers.items():
        if not name.startswith(prefix + "-"):
            continue
        rest = name[len(prefix) + 1:]
        if rest in _CALLBACK_CONFIG:
            cb.config[rest] = value
        elif rest.startswith("forward-"):
            cb.header.setdefault(canonical(rest[len("forward-"):]), []).append(value)
        else:  # the py SDK's quirk: callback_headers arrive as Upstash-Callback-<k>, not ...-Forward-<k>
            cb.header.setdefault(canonical(rest), []).append(value)
    return cb


def parse_publish_headers(headers: Mapping[str, str], *, now: int | None = None) -> PublishSpec:
    """Validate a publish/enqueue/batch/schedule request's headers (names lower-case).

    Raises:
        HeaderError: a malformed header (names it and shows a good value).
    """
    spec = PublishSpec()
    method = headers.get("upstash-method")
    if method:
        spec.method = method.strip().upper()
        if spec.method not in _METHODS:
            raise HeaderError("Upstash-Method", f"{method!r} is not an HTTP method", "POST")
    spec.content_type = headers.get("content-type")
    for name, value in headers.items():
        if name.startswith("upstash-forward-"):
            spec.header.setdefault(canonical(name[len("upstash-forward-"):]), []).append(value)
    retries = _int_header(headers, "upstash-retries", "3")
    spec.retries = DEFAULT_RETRIES if retries is None else retries
    spec.retry_delay = headers.get("upstash-retry-delay") or None
    if spec.retry_delay is not None:
        eval_retry_delay_ms(spec.retry_delay, 0)  # validate now: a bad expression is the publisher's 400
    if headers.get("upstash-delay"):
        spec.delay_s = parse_duration_s(headers["upstash-delay"], "Upstash-Delay")
    not_before = _int_header(headers, "upstash-not-before", str(int(time.time()) + 60))
    if not_before is not None:
        spec.not_before_ms = not_before * 1000
    if headers.get("upstash-timeout"):
        spec.timeout_s = max(1, parse_duration_s(headers["upstash-timeout"], "Upstash-Timeout"))
    spec.dedup_id = headers.get("upstash-deduplication-id") or None
    spec.content_dedup = parse_bool(headers.get("upstash-content-based-deduplication"))
    spec.callback = _callback_settings(headers, "upstash-callback")
    spec.failure_callback = _callback_settings(headers, "upstash-failure-callback")
    fc_key = headers.get("upstash-flow-control-key")
    if fc_key:
        fc = parse_flow_control(fc_key, headers.get("upstash-flow-control-value"))
        spec.flow = {"flowControlKey": fc.key, "parallelism": fc.parallelism, "rate": fc.rate, "period": fc.period}
    label = headers.get("upstash-label")
    if label:
        spec.labels = [p.strip() for p in label.split(",") if p.strip()]
    for part in (headers.get("upstash-redact-fields") or "").split(","):
        part = part.strip()
        if part == "body":
            spec.redact_body = True
        elif part in ("header", "headers"):
            spec.redact_all_headers = True
        elif part.startswith("header[") and part.endswith("]"):
            spec.redact_headers.add(canonical(part[7:-1]))
        elif part:
            raise HeaderError("Upstash-Redact-Fields", f"unknown field {part!r}", "body,header[Authorization]")
    spec.cron = headers.get("upstash-cron") or None
    spec.schedule_id = headers.get("upstash-schedule-id") or None
    spec.queue = headers.get("upstash-queue-name") or None
    return spec


def dedup_key(spec: PublishSpec, destination: str, body: bytes) -> str | None:
    """The deduplication key of a publish: from its id, or from its content (destination, body, type, headers)."""
    if spec.dedup_id is not None:
        return "id:" + hashlib.sha256(spec.dedup_id.encode()).hexdigest()
    if not spec.content_dedup:
        return None
    h = hashlib.sha256()
    for part in (destination.encode(), body, (spec.content_type or "").encode(),
                 json.dumps(sorted(spec.header.items())).encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return "content:" + h.hexdigest()


def make_message(spec: PublishSpec, url: str, *, caller_ip: str | None, created: int, topic: str | None = None,
                 endpoint: str | None = None, queue: str | None = None, schedule_id: str | None = None,
                 kind: str = "message") -> Record:
    """A new message record for one destination URL."""
    not_before = spec.not_before_ms if spec.not_before_ms is not None else created + spec.delay_s * 1000
    rec: Record = {
        "messageId": new_id("msg_"), "url": url, "method": spec.method, "header": spec.header,
        "contentType": spec.content_type, "maxRetries": spec.retries, "retried": 0, "notBefore": not_before,
        "createdAt": created, "timeout": spec.timeout_s, "kind": kind,
    }
    optional = {
        "topicName": topic, "endpointName": endpoint, "queueName": queue, "scheduleId": schedule_id,
        "callerIP": caller_ip, "retryDelayExpression": spec.retry_delay,
        "callback": spec.callback.url, "failureCallback": spec.failure_callback.url,
        "label": spec.labels[0] if spec.labels else None, "labels": spec.labels or None,
    }
    rec.update({k: v for k, v in optional.items() if v is not None})
    if spec.callback.url:
        rec["callbackHeader"] = spec.callback.header
        rec["callbackConfig"] = spec.callback.config
    if spec.failure_callback.url:
        rec["failureCallbackHeader"] = spec.failure_callback.header
        rec["failureCallbackConfig"] = spec.failure_callback.config
    if spec.flow:
        rec.update({k: v for k, v in spec.flow.items() if v is not None})
    return rec


def body_fields(body: bytes) -> dict[str, str]:
    """``body`` when the bytes are UTF-8 text, else ``bodyBase64``."""
    try:
        return {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        return {"bodyBase64": base64.b64encode(body).decode()}


_INTERNAL = ("retried", "contentType", "timeout", "kind", "cancel", "callbackConfig", "failureCallbackConfig")


def message_view(rec: Record, body: bytes) -> Record:
    """The Message JSON of ``GET /v2/messages/{id}``."""
    view = {k: v for k, v in rec.items() if k not in _INTERNAL}
    header = dict(rec.get("header") or {})
    if rec.get("contentType"):
        header.setdefault("Content-Type", [rec["contentType"]])
    view["header"] = header
    view.update(body_fields(body))
    return view


def event(rec: Record, state: str, t: int, **extra: Any) -> Record:
    """One log event for ``rec`` (the keys the py ``parse_logs_response`` reads)."""
    ev: Record = {"time": t, "messageId": rec["messageId"], "state": state, "url": rec["url"]}
    for src, dst in (("topicName", "topicName"), ("endpointName", "endpointName"), ("queueName", "queueName"),
                     ("scheduleId", "scheduleId"), ("label", "label"), ("labels", "labels"),
                     ("retryDelayExpression", "retryDelayExpr"), ("flowControlKey", "flowControlKey")):
        if src in rec:
            ev[dst] = rec[src]
    ev.update({k: v for k, v in extra.items() if v is not None})
    return ev


def response_fields(status: int | None, headers: Mapping[str, str], body: bytes) -> Record:
    """``responseStatus``/``responseHeader``/``responseBody`` (or ``responseBodyBase64``) of a delivery attempt."""
    hdr: dict[str, list[str]] = {}
    for k, v in headers.items():
        hdr.setdefault(canonical(k), []).append(v)
    out: Record = {"responseStatus": status or 0, "responseHeader": hdr}
    try:
        out["responseBody"] = body.decode("utf-8")
    except UnicodeDecodeError:
        out["responseBodyBase64"] = base64.b64encode(body).decode()
    return out


def callback_body(rec: Record, body: bytes, status: int | None, resp_headers: Mapping[str, str],
                  resp_body: bytes, *, dlq_id: str | None = None) -> bytes:
    """The JSON QStash posts to a callback / failure callback (protocols/qstash.md §3.5)."""
    hdr: dict[str, list[str]] = {}
    for k, v in resp_headers.items():
        hdr.setdefault(canonical(k), []).append(v)
    doc: Record = {
        "status": status or 0, "header": hdr, "body": base64.b64encode(resp_body).decode(),
        "retried": rec.get("retried", 0), "maxRetries": rec["maxRetries"], "sourceMessageId": rec["messageId"],
        "url": rec["url"], "method": rec["method"], "sourceHeader": rec.get("header") or {},
        "sourceBody": base64.b64encode(body).decode(), "notBefore": rec["notBefore"], "createdAt": rec["createdAt"],
    }
    for k in ("topicName", "endpointName", "scheduleId", "callerIP"):
        if k in rec:
            doc[k] = rec[k]
    if dlq_id is not None:
        doc["dlqId"] = dlq_id
    return json.dumps(doc, separators=(",", ":")).encode()


def callback_spec(rec: Record, failure: bool) -> PublishSpec:
    """The settings of the callback message for ``rec``: its own config headers, else the original's retries."""
    prefix = "failureCallback" if failure else "callback"
    config: dict[str, str] = rec.get(prefix + "Config") or {}
    headers = {"content-type": "application/json"}
    for k, v in config.items():
        headers["upstash-" + k] = v
    spec = parse_publish_headers(headers)
    if "retries" not in config:
        spec.retries = rec["maxRetries"]
        spec.retry_delay = rec.get("retryDelayExpression")
    spec.header = rec.get(prefix + "Header") or {}
    return spec
