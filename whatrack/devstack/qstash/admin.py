"""HTTP routes of the offline QStash broker for queues, schedules, URL groups, signing keys and flow control.

Shapes follow protocols/qstash.md §1.4: Queue, Schedule, UrlGroup, FlowControlInfo. Schedule pause/resume is accepted
as PATCH (both SDKs) and POST (OpenAPI); deleting a missing URL group answers 200 (the py tests rely on it).
"""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from whatrack.devstack.qstash.durations import HeaderError, parse_duration_s
from whatrack.devstack.qstash.http import broker_of, client_ip, json_body, lower_headers, raw_destination
from whatrack.devstack.qstash.model import Record, is_url, new_id, now_ms
from whatrack.devstack.qstash.publish import ApiError, next_fire_ms, schedule_record, schedule_view

OK = {"ok": True}


# queues ------------------------------------------------------------------------------------------------------------
async def _queue(request: Request, name: str) -> Record | None:
    s = broker_of(request).store
    h = {k.decode(): v.decode() for k, v in (await s.r.hgetall(s.k("queue", name))).items()}
    if not h:
        return None
    lag = int(await s.r.llen(s.k("queue", name, "items"))) + int(await s.r.scard(s.k("queue", name, "active")))
    return {"name": name, "parallelism": int(h.get("parallelism", 1)), "paused": h.get("paused") == "1",
            "createdAt": int(h["createdAt"]), "updatedAt": int(h["updatedAt"]), "lag": lag}


async def queue_upsert(request: Request) -> Response:
    b = broker_of(request)
    doc = await json_body(request)
    if not isinstance(doc, dict) or not doc.get("queueName"):
        raise ApiError(400, 'body must be JSON {"queueName": "...", "parallelism": 1, "paused": false}')
    name, par = str(doc["queueName"]), doc.get("parallelism", 1)
    if not isinstance(par, int) or par < 1:
        raise ApiError(400, f"parallelism must be an integer >= 1, got {par!r}")
    key, t = b.store.k("queue", name), now_ms()
    async with b.store.r.pipeline(transaction=True) as pipe:
        pipe.sadd(b.store.k("queues"), name)
        pipe.hsetnx(key, "createdAt", t)
        pipe.hset(key, mapping={"parallelism": par, "paused": "1" if doc.get("paused") else "0", "updatedAt": t})
        await pipe.execute()
    b.dispatcher.poke(name)
    return JSONResponse(OK)


async def queue_get(request: Request) -> Response:
    q = await _queue(request, request.path_params["name"])
    if q is None:
        raise ApiError(404, f"queue {request.path_params['name']} not found")
    return JSONResponse(q)


async def queue_list(request: Request) -> Response:
    s = broker_of(request).store
    names = sorted(n.decode() for n in await s.r.smembers(s.k("queues")))
    return JSONResponse([q for n in names if (q := await _queue(request, n)) is not None])


async def queue_delete(request: Request) -> Response:
    b = broker_of(request)
    name = request.path_params["name"]
    s = b.store
    waiting = [m.decode() for m in await s.r.lrange(s.k("queue", name, "items"), 0, -1)]
    for mid in waiting:  # a deleted queue's waiting messages end as CANCELED, not silently dropped
        got = await s.get_message(mid)
        if got:
            await b.dispatcher.finish_canceled(got[0])
    await s.r.delete(s.k("queue", name), s.k("queue", name, "items"))
    await s.r.srem(s.k("queues"), name)
    return JSONResponse(OK)


async def queue_pause(request: Request) -> Response:
    b = broker_of(request)
    name = request.path_params["name"]
    if not await b.store.r.exists(b.store.k("queue", name)):
        raise ApiError(404, f"queue {name} not found")
    paused = request.url.path.endswith("/pause")
    await b.store.r.hset(b.store.k("queue", name), mapping={"paused": "1" if paused else "0", "updatedAt": now_ms()})
    b.dispatcher.poke(name)
    return JSONResponse(OK)


# schedules ---------------------------------------------------------------------------------------------------------
async def schedule_create(request: Request) -> Response:
    b = broker_of(request)
    dest = raw_destination(request, "/v2/schedules/")
    if not dest or (not is_url(dest) and "://" in dest):
        raise ApiError(400, f"invalid destination {dest!r}: use an http(s) URL or a URL group name")
    headers = lower_headers(request)
    cron = headers.get("upstash-cron")
    if not cron:
        raise ApiError(400, "missing Upstash-Cron header (example: Upstash-Cron: */5 * * * *)")
    sid = headers.get("upstash-schedule-id") or new_id("scd_")
    old = await b.store.hget_json(b.store.k("schedules"), sid)
    s = schedule_record(sid, dest, cron, headers, await request.body(), client_ip(request),
                        old["createdAt"] if old else now_ms())
    s["nextScheduleTime"] = next_fire_ms(cron, now_ms())
    if old:
        s["isPaused"] = old.get("isPaused", False)
    async with b.store.r.pipeline(transaction=True) as pipe:
        pipe.hset(b.store.k("schedules"), sid, json.dumps(s))
        pipe.zadd(b.store.k("schedule_due"), {sid: s["nextScheduleTime"]})
        await pipe.execute()
    b.dispatcher.poke()
    return JSONResponse({"scheduleId": sid}, status_code=201)


async def _schedule(request: Request) -> Record:
    s = broker_of(request).store
    sid = request.path_params["sid"]
    got = await s.hget_json(s.k("schedules"), sid)
    if got is None:
        raise ApiError(404, f"schedule {sid} not found")
    return got


async def schedule_get(request: Request) -> Response:
    return JSONResponse(schedule_view(await _schedule(request)))


async def schedule_list(request: Request) -> Response:
    s = broker_of(request).store
    all_ = await s.hall_json(s.k("schedules"))
    return JSONResponse([schedule_view(v) for _, v in sorted(all_.items(), key=lambda kv: kv[1]["createdAt"])])


async def schedule_delete(request: Request) -> Response:
    s = broker_of(request).store
    sid = request.path_params["sid"]
    await s.r.hdel(s.k("schedules"), sid)
    await s.r.zrem(s.k("schedule_due"), sid)
    return JSONResponse(OK)


async def schedule_pause(request: Request) -> Response:
    s = broker_of(request).store
    sched = await _schedule(request)
    sched["isPaused"] = request.url.path.endswith("/pause")
    await s.hset_json(s.k("schedules"), sched["scheduleId"], sched)
    return JSONResponse(OK)


# URL groups --------------------------------------------------------------------------------------------------------
async def _endpoints(request: Request) -> list[Record]:
    doc = await json_body(request)
    eps = doc.get("endpoints") if isinstance(doc, dict) else None
    if not isinstance(eps, list) or not all(isinstance(e, dict) for e in eps):
        raise ApiError(400, 'body must be JSON {"endpoints": [{"url": "https://...", "name": "optional"}]}')
    return eps


async def topic_add(request: Request) -> Response:
    s = broker_of(request).store
    name = request.path_params["name"]
    eps = await _endpoints(request)
    for e in eps:
        if not is_url(str(e.get("url", ""))):
            raise ApiError(400, f"endpoint url {e.get('url')!r} is not an http(s) URL")
    t = now_ms()
    group = await s.hget_json(s.k("topics"), name) or {"name": name, "createdAt": t, "endpoints": []}
    known = {e["url"] for e in group["endpoints"]}
    for e in eps:
        if e["url"] not in known:
            group["endpoints"].append({k: e[k] for k in ("url", "name") if e.get(k)})
            known.add(e["url"])
    group["updatedAt"] = t
    await s.hset_json(s.k("topics"), name, group)
    return JSONResponse(OK)


async def topic_remove(request: Request) -> Response:
    s = broker_of(request).store
    name = request.path_params["name"]
    eps = await _endpoints(request)
    group = await s.hget_json(s.k("topics"), name)
    if group is None:
        raise ApiError(404, f"URL group {name} not found")
    urls = {e["url"] for e in eps if e.get("url")}
    names = {e["name"] for e in eps if e.get("name")}
    group["endpoints"] = [e for e in group["endpoints"] if e["url"] not in urls and e.get("name") not in names]
    group["updatedAt"] = now_ms()
    if group["endpoints"]:
        await s.hset_json(s.k("topics"), name, group)
    else:  # removing the last endpoint deletes the group
        await s.r.hdel(s.k("topics"), name)
    return JSONResponse(OK)


async def topic_get(request: Request) -> Response:
    s = broker_of(request).store
    group = await s.hget_json(s.k("topics"), request.path_params["name"])
    if group is None:
        raise ApiError(404, f"URL group {request.path_params['name']} not found")
    return JSONResponse(group)


async def topic_list(request: Request) -> Response:
    s = broker_of(request).store
    return JSONResponse(sorted((await s.hall_json(s.k("topics"))).values(), key=lambda g: g["name"]))


async def topic_delete(request: Request) -> Response:
    s = broker_of(request).store
    await s.r.hdel(s.k("topics"), request.path_params["name"])
    return JSONResponse(OK)


# signing keys ------------------------------------------------------------------------------------------------------
async def keys_get(request: Request) -> Response:
    current, nxt = broker_of(request).keys
    return JSONResponse({"current": current, "next": nxt})


async def keys_rotate(request: Request) -> Response:
    current, nxt = await broker_of(request).rotate_keys()
    return JSONResponse({"current": current, "next": nxt})


# flow control ------------------------------------------------------------------------------------------------------
async def flow_list(request: Request) -> Response:
    flow = broker_of(request).flow
    return JSONResponse([await flow.info(k) for k in sorted(flow.keys)])


async def flow_get(request: Request) -> Response:
    flow = broker_of(request).flow
    key = request.path_params["key"]
    if key not in flow.keys:
        raise ApiError(404, f"flow-control key {key} not found")
    return JSONResponse(await flow.info(key))


async def global_parallelism(request: Request) -> Response:
    return JSONResponse({"parallelismMax": 0, "parallelismCount": len(broker_of(request).dispatcher.in_flight)})


async def flow_action(request: Request) -> Response:
    b = broker_of(request)
    key, action = request.path_params["key"], request.path_params["action"]
    ks = b.flow.get(key)
    q = request.query_params
    try:
        if action in ("pause", "resume"):
            ks.paused = action == "pause"
        elif action == "pin":
            if q.get("parallelism"):
                ks.parallelism_max, ks.pinned_parallelism = int(q["parallelism"]), True
            if q.get("rate"):
                ks.rate_max, ks.pinned_rate = int(q["rate"]), True
            if q.get("period"):
                ks.rate_period = parse_duration_s(q["period"], "period")
        elif action == "unpin":
            if q.get("parallelism", "").lower() == "true":
                ks.pinned_parallelism = False
            if q.get("rate", "").lower() == "true":
                ks.pinned_rate = False
        elif action == "resetRate":  # the count restarts and a new period begins now
            ks.rate_count, ks.period_start = 0, time.time()
        else:
            raise ApiError(404, f"unknown flow-control action {action}")
    except (ValueError, HeaderError) as e:
        raise ApiError(400, f"pin takes integer parallelism and rate, and a period like 10s or 1m: {e}") from e
    await b.flow.save(ks)
    b.dispatcher.poke()
    return JSONResponse(OK)
