"""HTTP routes of the offline QStash broker for the dead-letter queue: list, get, delete (one, many), retry.

Bulk operations accept the Python SDK's JSON body (``{"dlqIds": [...]}``) and the JS SDK's query form
(``?dlqIds=a&dlqIds=b``) alike (protocols/qstash.md §1.2).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from whatrack.devstack.qstash.http import DEFAULT_PAGE, MAX_PAGE, broker_of, client_ip, json_body, lower_headers
from whatrack.devstack.qstash.model import CallbackSettings, PublishSpec, Record, message_view, parse_publish_headers
from whatrack.devstack.qstash.publish import ApiError, publish
from whatrack.devstack.qstash.store import Store

_RESPONSE_KEYS = ("dlqId", "responseStatus", "responseHeader", "responseBody", "responseBodyBase64")


async def load(store: Store, dlq_id: str) -> tuple[Record, bytes] | None:
    rec, body = await store.r.hmget(store.k("dlq", dlq_id), ["rec", "body"])
    return (json.loads(rec), bytes(body or b"")) if rec else None


def dlq_view(rec: Record, body: bytes) -> Record:
    view = message_view({k: v for k, v in rec.items() if k not in _RESPONSE_KEYS}, body)
    view.update({k: rec[k] for k in _RESPONSE_KEYS if k in rec})
    return view


def _matches(rec: Record, q: Any) -> bool:
    for param, key in (("messageId", "messageId"), ("url", "url"), ("topicName", "topicName"),
                       ("queueName", "queueName"), ("scheduleId", "scheduleId"), ("callerIp", "callerIP")):
        if q.get(param) and rec.get(key) != q[param]:
            return False
    if q.get("responseStatus") and str(rec.get("responseStatus")) != q["responseStatus"]:
        return False
    if q.get("label") and q["label"] not in (rec.get("labels") or []):
        return False
    t = int(rec["dlqId"].split("-")[0])
    frm, to = q.get("fromDate"), q.get("toDate")
    return not ((frm and t < int(frm)) or (to and t > int(to)))


async def list_route(request: Request) -> Response:
    s = broker_of(request).store
    q = request.query_params
    try:
        count = min(int(q.get("count") or DEFAULT_PAGE), MAX_PAGE)
        int(q.get("fromDate") or 0), int(q.get("toDate") or 0)
    except ValueError as e:
        raise ApiError(400, f"count, fromDate and toDate must be integers: {e}") from e
    ids = [i.decode() for i in await s.r.zrevrange(s.k("dlq"), 0, -1)]
    cursor = q.get("cursor")
    if cursor and cursor in ids:
        ids = ids[ids.index(cursor) + 1:]
    out: list[Record] = []
    last = None
    for dlq_id in ids:
        got = await load(s, dlq_id)
        if got is None or not _matches(got[0], q):
            continue
        out.append(dlq_view(*got))
        last = dlq_id
        if len(out) == count:
            break
    doc: Record = {"messages": out}
    if len(out) == count and last and ids and last != ids[-1]:
        doc["cursor"] = last
    return JSONResponse(doc)


async def get_route(request: Request) -> Response:
    got = await load(broker_of(request).store, request.path_params["dlq_id"])
    if got is None:
        raise ApiError(404, f"DLQ message {request.path_params['dlq_id']} not found")
    return JSONResponse(dlq_view(*got))


async def _delete(store: Store, ids: list[str]) -> int:
    n = 0
    for dlq_id in ids:
        async with store.r.pipeline(transaction=True) as pipe:
            pipe.zrem(store.k("dlq"), dlq_id)
            pipe.delete(store.k("dlq", dlq_id))
            removed, _ = await pipe.execute()
        n += int(removed)
    return n


async def delete_route(request: Request) -> Response:
    dlq_id = request.path_params["dlq_id"]
    if not await _delete(broker_of(request).store, [dlq_id]):
        raise ApiError(404, f"DLQ message {dlq_id} not found")
    return JSONResponse({"deleted": 1})


async def _ids(request: Request) -> list[str]:
    doc = await json_body(request)
    ids = doc.get("dlqIds") if isinstance(doc, dict) else None
    return [str(i) for i in (ids or request.query_params.getlist("dlqIds"))]


async def delete_many_route(request: Request) -> Response:
    s = broker_of(request).store
    ids = await _ids(request)
    if not ids and request.query_params.get("all", "").lower() == "true":
        ids = [i.decode() for i in await s.r.zrange(s.k("dlq"), 0, -1)]
    return JSONResponse({"deleted": await _delete(s, ids)})


def _spec_of(rec: Record, overrides: dict[str, str]) -> PublishSpec:
    """The original message's settings, with any configuration header of the retry request winning."""
    spec = PublishSpec(method=rec["method"], content_type=rec.get("contentType"), header=rec.get("header") or {},
                       retries=rec["maxRetries"], retry_delay=rec.get("retryDelayExpression"),
                       timeout_s=rec.get("timeout", 900), labels=rec.get("labels") or [],
                       callback=CallbackSettings(rec.get("callback"), rec.get("callbackHeader") or {},
                                                 rec.get("callbackConfig") or {}),
                       failure_callback=CallbackSettings(rec.get("failureCallback"),
                                                         rec.get("failureCallbackHeader") or {},
                                                         rec.get("failureCallbackConfig") or {}))
    if rec.get("flowControlKey"):
        spec.flow = {k: rec.get(k) for k in ("flowControlKey", "parallelism", "rate", "period")}
    given = parse_publish_headers(overrides)
    for header, attr in (("upstash-method", "method"), ("upstash-retries", "retries"), ("upstash-delay", "delay_s"),
                         ("upstash-not-before", "not_before_ms"), ("upstash-timeout", "timeout_s"),
                         ("upstash-retry-delay", "retry_delay"), ("upstash-label", "labels")):
        if header in overrides:
            setattr(spec, attr, getattr(given, attr))
    spec.header = {**spec.header, **given.header}
    return spec


async def _retry(request: Request, dlq_id: str) -> Record:
    b = broker_of(request)
    got = await load(b.store, dlq_id)
    if got is None:
        raise ApiError(404, f"DLQ message {dlq_id} not found")
    rec, body = got
    spec = _spec_of(rec, lower_headers(request))
    dest = rec["url"]
    extra = [["ZREM", b.store.k("dlq"), dlq_id], ["DEL", b.store.k("dlq", dlq_id)]]
    _, resp = await publish(b.store, b.flow, dest, spec, body, caller_ip=client_ip(request),
                            queue=rec.get("queueName"), extra=extra)
    b.dispatcher.poke(rec.get("queueName"))
    out: Record = resp
    return out


async def retry_route(request: Request) -> Response:
    return JSONResponse(await _retry(request, request.path_params["dlq_id"]), status_code=201)


async def retry_many_route(request: Request) -> Response:
    return JSONResponse({"responses": [await _retry(request, i) for i in await _ids(request)]}, status_code=201)
