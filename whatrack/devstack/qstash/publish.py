"""Accepting messages in the offline QStash broker: publish, enqueue, URL-group fan-out, deduplication, schedules.

Shared by the HTTP routes (publish, enqueue, batch, DLQ retry) and the schedule trigger. A message is accepted when
its record, its place in the due set (or its queue) and its CREATED event are written in one atomic Redis step.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import zoneinfo
from typing import Any

from croniter import croniter

from whatrack.devstack.qstash.durations import HeaderError
from whatrack.devstack.qstash.flow import FlowControl
from whatrack.devstack.qstash.model import (
    PublishSpec,
    Record,
    dedup_key,
    event,
    is_url,
    make_message,
    now_ms,
    parse_publish_headers,
)
from whatrack.devstack.qstash.store import Store
from whatrack.errors import WhatrackError

log = logging.getLogger("whatrack.devstack.qstash.publish")


class ApiError(WhatrackError):
    """An API request the broker answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


async def resolve(store: Store, destination: str) -> list[tuple[str, str | None, str | None]]:
    """``(url, topicName, endpointName)`` per delivery target of ``destination`` (a URL or a URL-group name).

    Raises:
        ApiError: 400 for a URL with another scheme, 404 for an unknown URL group.
    """
    if is_url(destination):
        return [(destination, None, None)]
    if "://" in destination or not destination:
        raise ApiError(400, f"invalid destination url: {destination!r} has no http:// or https:// scheme; "
                            "publish to an http(s) URL or to an existing URL group name")
    group = await store.hget_json(store.k("topics"), destination)
    if not group or not group["endpoints"]:
        raise ApiError(404, f"URL group {destination!r} not found; create it with POST /v2/topics/<name>/endpoints")
    return [(ep["url"], destination, ep.get("name")) for ep in group["endpoints"]]


async def publish(store: Store, flow: FlowControl, destination: str, spec: PublishSpec, body: bytes, *,
                  caller_ip: str | None, queue: str | None = None, schedule_id: str | None = None,
                  extra: list[list[Any]] | None = None) -> tuple[bool, Any]:
    """Accept one publish; returns ``(deduplicated, response)`` where response is an object or, for a URL group, a list.

    Raises:
        ApiError: the destination is invalid or unknown.
    """
    targets = await resolve(store, destination)
    created = now_ms()
    recs = [make_message(spec, url, caller_ip=caller_ip, created=created, topic=topic, endpoint=endpoint,
                         queue=queue, schedule_id=schedule_id) for url, topic, endpoint in targets]
    if is_url(destination):
        response: Any = {"messageId": recs[0]["messageId"]}
    else:
        response = [{"messageId": r["messageId"], "url": r["url"]} for r in recs]
    commands: list[list[Any]] = list(extra or [])
    for rec in recs:
        commands += store.message_commands(rec, body)
        commands.append(store.event_command(event(
            rec, "CREATED", created, header=spec.logged_header(rec["header"]),
            body=None if spec.redact_body else base64.b64encode(body).decode(), nextDeliveryTime=rec["notBefore"])))
    earlier = await store.accept(commands, dedup_key(spec, destination, body), response)
    if earlier is not None:
        if isinstance(earlier, list):
            return True, [{**item, "deduplicated": True} for item in earlier]
        return True, {**earlier, "deduplicated": True}
    for rec in recs:
        if "flowControlKey" in rec:
            await flow.observe(rec)
    return False, response


# schedules ---------------------------------------------------------------------------------------------------------

def next_fire_ms(cron: str, after_ms: int) -> int:
    """The next trigger of a 5-field cron expression (optionally ``CRON_TZ=Area/City`` first) after ``after_ms``.

    Raises:
        HeaderError: not a valid expression or time zone.
    """
    text = cron.strip()
    tz: dt.tzinfo = dt.UTC
    if text.startswith(("CRON_TZ=", "TZ=")):
        zone, _, text = text.partition(" ")
        try:
            tz = zoneinfo.ZoneInfo(zone.split("=", 1)[1])
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
            raise HeaderError("Upstash-Cron", f"unknown time zone in {cron!r}",
                              "CRON_TZ=America/Sao_Paulo 0 9 * * *") from e
    if len(text.split()) != 5 or not croniter.is_valid(text):
        raise HeaderError("Upstash-Cron", f"{cron!r} is not a 5-field cron expression", "*/5 * * * *")
    start = dt.datetime.fromtimestamp(after_ms / 1000, tz)
    return int(croniter(text, start).get_next(float) * 1000)


def schedule_view(s: Record) -> Record:
    """The Schedule JSON of ``GET /v2/schedules/<id>``."""
    spec = parse_publish_headers(s["headers"])
    body = base64.b64decode(s["body"])
    view: Record = {"scheduleId": s["scheduleId"], "destination": s["destination"], "cron": s["cron"],
                    "createdAt": s["createdAt"], "method": spec.method, "retries": spec.retries,
                    "isPaused": s.get("isPaused", False), "header": spec.header,
                    "timeout": spec.timeout_s, "nextScheduleTime": s.get("nextScheduleTime")}
    try:
        view["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        view["bodyBase64"] = s["body"]
    optional = {"callback": spec.callback.url, "failureCallback": spec.failure_callback.url,
                "callbackHeader": spec.callback.header or None,
                "failureCallbackHeader": spec.failure_callback.header or None,
                "delay": spec.delay_s or None, "callerIP": s.get("callerIP"), "queueName": spec.queue,
                "retryDelayExpression": spec.retry_delay, "label": spec.labels[0] if spec.labels else None,
                "lastScheduleTime": s.get("lastScheduleTime"), "lastScheduleStates": s.get("lastScheduleStates")}
    view.update({k: v for k, v in optional.items() if v is not None})
    if spec.flow:
        view.update({k: v for k, v in spec.flow.items() if v is not None})
    return view


async def fire_due_schedules(store: Store, flow: FlowControl, now: int) -> int:
    """Trigger every schedule whose time has come; returns how many fired. Each trigger is one atomic write."""
    due = await store.r.zrangebyscore(store.k("schedule_due"), "-inf", now)
    fired = 0
    for raw in due:
        sid = raw.decode()
        s = await store.hget_json(store.k("schedules"), sid)
        if s is None:
            await store.r.zrem(store.k("schedule_due"), sid)
            continue
        nxt = next_fire_ms(s["cron"], now)
        s["nextScheduleTime"] = nxt
        if s.get("isPaused"):
            await store.r.zadd(store.k("schedule_due"), {sid: nxt})
            await store.hset_json(store.k("schedules"), sid, s)
            continue
        spec = parse_publish_headers(s["headers"])
        spec.dedup_id, spec.content_dedup = None, False
        s["lastScheduleTime"] = now
        update = [["ZADD", store.k("schedule_due"), nxt, sid]]
        try:
            _, resp = await publish(store, flow, s["destination"], spec, base64.b64decode(s["body"]),
                                    caller_ip=s.get("callerIP"), queue=spec.queue, schedule_id=sid, extra=update)
            ids = [r["messageId"] for r in (resp if isinstance(resp, list) else [resp])]
            s["lastScheduleStates"] = dict.fromkeys(ids, "IN_PROGRESS")
            s.pop("error", None)
        except ApiError as e:
            s["error"] = str(e)
            await store.r.zadd(store.k("schedule_due"), {sid: nxt})
        await store.hset_json(store.k("schedules"), sid, s)
        fired += 1
        log.info("schedule %s fired; next at %d", sid, nxt)
    return fired


def schedule_record(sid: str, destination: str, cron: str, headers: dict[str, str], body: bytes,
                    caller_ip: str | None, created: int) -> Record:
    """The stored form of a schedule: the create request's headers are kept and re-read at each trigger."""
    kept = {k: v for k, v in headers.items()
            if k.startswith("upstash-") or k == "content-type"}
    for k in ("upstash-cron", "upstash-schedule-id", "upstash-deduplication-id", "upstash-not-before",
              "upstash-content-based-deduplication"):
        kept.pop(k, None)
    parse_publish_headers(kept)  # validate now, so a bad header is the creator's 400, not a silent trigger failure
    return {"scheduleId": sid, "destination": destination, "cron": cron, "createdAt": created, "headers": kept,
            "body": base64.b64encode(body).decode(), "isPaused": False, "callerIP": caller_ip,
            "nextScheduleTime": next_fire_ms(cron, created)}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
