"""HTTP routes of the offline QStash broker for messages: publish, enqueue, batch, messages, events, DLQ.

Paths and JSON shapes are QStash v2's as the official Python SDK sends and parses them (protocols/qstash.md §1.2,
§1.4). The destination of a publish is rebuilt from the raw request path plus the raw query string, because the SDK
pastes the destination URL into the path unencoded.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from whatrack.devstack.qstash.durations import HeaderError
from whatrack.devstack.qstash.http import (
    DEFAULT_PAGE,
    MAX_PAGE,
    BrokerState,
    broker_of,
    client_ip,
    json_body,
    lower_headers,
    raw_destination,
)
from whatrack.devstack.qstash.model import Record, event, message_view, now_ms, parse_publish_headers
from whatrack.devstack.qstash.publish import ApiError, publish, resolve


async def publish_route(request: Request) -> Response:
    b = broker_of(request)
    dest = raw_destination(request, "/v2/publish/")
    spec = parse_publish_headers(lower_headers(request))
    dup, resp = await publish(b.store, b.flow, dest, spec, await request.body(), caller_ip=client_ip(request))
    b.dispatcher.poke()
    return JSONResponse(resp, status_code=202 if dup else 201)


async def enqueue_route(request: Request) -> Response:
    b = broker_of(request)
    rest = raw_destination(request, "/v2/enqueue/")
    queue, sep, dest = rest.partition("/")
    if not queue or not sep:
        raise ApiError(400, "enqueue path must be /v2/enqueue/<queue>/<destination>")
    spec = parse_publish_headers(lower_headers(request))
    dup, resp = await publish(b.store, b.flow, dest, spec, await request.body(), caller_ip=client_ip(request),
                              queue=queue)
    b.dispatcher.poke(queue)
    return JSONResponse(resp, status_code=202 if dup else 201)


async def batch_route(request: Request) -> Response:
    b = broker_of(request)
    items = await json_body(request)
    if not isinstance(items, list) or not all(isinstance(i, dict) and i.get("destination") for i in items):
        raise ApiError(400, "batch body must be a JSON array of {destination, headers, body, queue}")
    prepared = []
    for i, item in enumerate(items):  # validate every item before accepting any: a bad item writes nothing
        headers = {str(k).lower(): str(v) for k, v in (item.get("headers") or {}).items()}
        try:
            spec = parse_publish_headers(headers)
            await resolve(b.store, str(item["destination"]))
        except HeaderError as e:
            raise ApiError(400, f"batch item {i}: {e}") from e
        except ApiError as e:
            raise ApiError(e.status, f"batch item {i}: {e}") from e
        body = item.get("body")
        prepared.append((item["destination"], spec, (body or "").encode("utf-8"), item.get("queue")))
    out = []
    for dest, spec, body, queue in prepared:
        _, resp = await publish(b.store, b.flow, dest, spec, body, caller_ip=client_ip(request), queue=queue)
        out.append(resp)
        b.dispatcher.poke(queue)
    return JSONResponse(out, status_code=200)


async def get_message(request: Request) -> Response:
    b = broker_of(request)
    got = await b.store.get_message(request.path_params["mid"])
    if got is None:
        raise ApiError(404, f"message {request.path_params['mid']} not found")
    return JSONResponse(message_view(*got))


async def cancel(b: BrokerState, mid: str) -> bool:
    """Cancel one live message: at once when it waits, after its attempt when it is in flight."""
    s = b.store
    got = await s.get_message(mid)
    if got is None or not await s.r.sismember(s.k("live"), mid):
        return False
    rec = got[0]
    cmds: list[list[Any]] = [s.event_command(event(rec, "CANCEL_REQUESTED", now_ms())), ["ZREM", s.k("due"), mid]]
    if rec.get("queueName"):
        cmds.append(["LREM", s.k("queue", rec["queueName"], "items"), 0, mid])
    if rec.get("flowControlKey"):
        cmds.append(["ZREM", s.k("fc", rec["flowControlKey"], "wait"), mid])
    removed = await s.group.run(cmds)
    if any(removed[1:]):
        await b.dispatcher.finish_canceled(rec)
    else:  # in flight: the attempt's outcome decides; a failure ends as CANCELED instead of a retry
        b.dispatcher.cancel_requested.add(mid)
        await s.r.hset(s.k("msg", mid), "rec", json.dumps({**rec, "cancel": True}))
    return True


async def cancel_route(request: Request) -> Response:
    mid = request.path_params["mid"]
    if not await cancel(broker_of(request), mid):
        raise ApiError(404, f"message {mid} not found or already finished")
    return JSONResponse({"cancelled": 1}, status_code=202)


async def cancel_many_route(request: Request) -> Response:
    b = broker_of(request)
    doc = await json_body(request)
    ids = (doc or {}).get("messageIds") if isinstance(doc, dict) else None
    ids = ids or request.query_params.getlist("messageIds")
    if not ids:  # no body and no filter: cancel all
        ids = [m.decode() for m in await b.store.r.smembers(b.store.k("live"))]
    n = 0
    for mid in ids:
        n += await cancel(b, str(mid))
    return JSONResponse({"cancelled": n})


def _int_param(request: Request, name: str, default: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ApiError(400, f"query parameter {name} must be an integer, got {raw!r}") from e


_IN_PROGRESS = {"ACTIVE", "RETRY", "ERROR"}


def _event_matches(ev: Record, q: Any, ids: set[str], frm: int | None, to: int | None) -> bool:
    state = q.get("state")
    if state and not (ev["state"] == state or (state == "IN_PROGRESS" and ev["state"] in _IN_PROGRESS)):
        return False
    if ids and ev["messageId"] not in ids:
        return False
    for param, key in (("url", "url"), ("topicName", "topicName"), ("queueName", "queueName"),
                       ("scheduleId", "scheduleId"), ("flowControlKey", "flowControlKey")):
        if q.get(param) and ev.get(key) != q[param]:
            return False
    if q.get("label") and q["label"] not in (ev.get("labels") or []):
        return False
    return not ((frm is not None and ev["time"] < frm) or (to is not None and ev["time"] > to))


async def events_route(request: Request) -> Response:
    b = broker_of(request)
    q = request.query_params
    count = min(_int_param(request, "count", DEFAULT_PAGE) or DEFAULT_PAGE, MAX_PAGE)
    ids = set(q.getlist("messageIds")) | ({q["messageId"]} if q.get("messageId") else set())
    frm, to = _int_param(request, "fromDate"), _int_param(request, "toDate")
    cursor = q.get("cursor") or None
    found: list[Record] = []
    next_cursor: str | None = None
    while len(found) < count:
        page = await b.store.events_page(cursor, 2000)
        if not page:
            break
        for rid, ev in page:
            cursor = rid
            if _event_matches(ev, q, ids, frm, to):
                found.append(ev)
                if len(found) == count:
                    next_cursor = rid
                    break
    key = "logs" if request.url.path.endswith("/logs") else "events"
    doc: Record = {key: found}
    if next_cursor:
        doc["cursor"] = next_cursor
    return JSONResponse(doc)
