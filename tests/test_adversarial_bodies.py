"""Hostile bodies against the real endpoint on PostgreSQL: generated and mutated UAZAPI payloads, huge bodies, slow
clients.

Every signed body gets 2xx (stored/ignored/...), 489 (non-retryable, straight to the DLQ) or another 4xx; never a 5xx
(a retry storm for something that can never succeed), never a crash, never a partial row. Valid messages are stored
verbatim (NUL and lone surrogates, which PostgreSQL cannot hold, become U+FFFD: ``store_rows.clean_text``).

Most of the 10,000+ generated payloads go through ``WebhookHandler.handle`` in-process (real Store, real Centrifugo
stand-in, real signature check); a few hundred go over HTTP. Hypothesis is derandomized so CI sees the same inputs.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import re
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from adversarial_support import Endpoint, fresh_endpoint, integrity_violations
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from whatrack.devstack import servers
from whatrack.webhook.app import MAX_BODY_BYTES

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Payloads per strategy, in-process; their sum is the "10,000 generated payloads per CI run" of the brief. Each
#: Hypothesis example is a batch of BATCH payloads delivered concurrently (as QStash does), which also amortises
#: Hypothesis's per-example cost.
BATCH = 5
N_RANDOM_JSON = 5_000
N_MUTATED = 3_000
N_VERBATIM = 2_000
N_HTTP = 300
INTEGRITY_EVERY = 500

#: Tried inputs by kind and result, printed at the end of the module (pytest -s or -rA shows it).
TALLY: Counter[str] = Counter()

HYPOTHESIS = {"deadline": None, "derandomize": True, "database": None, "phases": [Phase.explicit, Phase.generate],
              "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large, HealthCheck.large_base_example]}

EDGE_STRINGS = [
    "'; DROP TABLE message; --", "Robert'); DROP TABLE lead;--", "\u0000", "a\u0000b", "\ud800", "x\udfffy",
    "\u202eRTL override\u202c", "مرحبا بالعالم", "שלום", "👩\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈",
    "e\u0301\u0301\u0301",
    "Z\u0351\u0350\u0357\u036b\u0305", "\ufeffBOM", "\u2028\u2029", "\\", "\"", "{}", "null", "\r\n\t", " ",
    "%s%s%n", "${jndi:ldap://x}", "<script>alert(1)</script>", "\U0010ffff", "\x7f\x1b[31m",
]
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ep(pg_admin_url: str, redis_server: servers.RedisServer, fixtures_dir: Path) -> AsyncIterator[Endpoint]:
    logging.getLogger("whatrack.webhook.handler").addHandler(FAILURES)
    try:
        async with fresh_endpoint(pg_admin_url, redis_server.url, fixtures_dir) as e:
            yield e
            assert await integrity_violations(e.store) == {}
    finally:
        logging.getLogger("whatrack.webhook.handler").removeHandler(FAILURES)
    print("\nadversarial bodies tried:", dict(sorted(TALLY.items())))


def _fixtures(fixtures_dir: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(fixtures_dir.glob("*.json"))}


FIXTURES = _fixtures(Path(__file__).resolve().parent.parent / "whatrack" / "fixtures" / "uazapi")


# -- strategies -------------------------------------------------------------------------------------------------------

edge_text = st.sampled_from(EDGE_STRINGS)
# Hypothesis's generation is the dominant cost per payload here: short texts and small trees keep it a few ms.
any_text = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | any_text | edge_text)
json_values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(any_text, ch, max_size=3),
                           max_leaves=5)
event_types = st.sampled_from(["messages", "messages_update", "connection", "groups", "Messages", " messages ", "",
                               "presence", "newsletter_messages"]) | any_text


@st.composite
def random_envelopes(draw: st.DrawFn) -> Any:
    """Random JSON, often shaped like an envelope (EventType, token, message/chat/event) to reach the normalizer."""
    if draw(st.integers(0, 3)) == 0:
        return draw(json_values)
    env: dict[str, Any] = {"EventType": draw(event_types | json_values)}
    token = FIXTURES["messages_inbound_text.json"]["token"]
    for key in ("instanceName", "owner", "token", "message", "chat", "event", "state", "instance", "type"):
        if draw(st.booleans()):
            env[key] = token if key == "token" and draw(st.booleans()) else draw(json_values)
    wrap = draw(st.integers(0, 6))
    if wrap == 1:
        return [env]
    if wrap == 2:
        return {"body": env, "webhookUrl": "https://n8n.example", "executionMode": "production"}
    if wrap == 3:
        return {"event": draw(event_types), "instance": draw(any_text), "data": env}
    return env


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> Any:
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


class Pick:
    """Where a mutation's choices come from: Hypothesis draws (shrinkable) or a seeded ``random.Random`` (cheap)."""

    def __init__(self, draw: st.DrawFn | None = None, rnd: random.Random | None = None) -> None:
        self.draw, self.rnd = draw, rnd

    def choice(self, seq: list[Any]) -> Any:
        if self.draw is not None:
            return self.draw(st.sampled_from(seq))
        assert self.rnd is not None
        return self.rnd.choice(seq)

    def int(self, lo: int, hi: int) -> int:
        if self.draw is not None:
            return self.draw(st.integers(lo, hi))
        assert self.rnd is not None
        return self.rnd.randint(lo, hi)

    def text(self) -> str:
        if self.draw is not None:
            return self.draw(edge_text) + self.draw(any_text)
        assert self.rnd is not None
        r = self.rnd
        chars = [chr(r.choice([r.randint(0, 0x7F), r.randint(0x80, 0xFFFF), r.randint(0x10000, 0x10FFFF)]))
                 for _ in range(r.randint(0, 12))]
        return r.choice(EDGE_STRINGS) + "".join(chars)

    def json(self, depth: int = 0) -> Any:
        if self.draw is not None:
            return self.draw(json_values)
        assert self.rnd is not None
        r = self.rnd
        kind = r.randint(0, 7 if depth < 2 else 5)
        if kind == 0:
            return None
        if kind == 1:
            return r.choice([True, False])
        if kind == 2:
            return r.choice([0, -1, 2**63, -(2**70), r.randint(-(10**12), 10**12)])
        if kind == 3:
            return r.choice([0.5, -1e308, 1e-300, r.uniform(-1e6, 1e6)])
        if kind in (4, 5):
            return self.text()
        if kind == 6:
            return [self.json(depth + 1) for _ in range(r.randint(0, 3))]
        return {self.text(): self.json(depth + 1) for _ in range(r.randint(0, 3))}


def mutate(pick: Pick) -> tuple[str, Any]:
    """A shared fixture with 1-3 mutations: drop, retype, nest deeper, huge string, unicode edge, null object."""
    name = pick.choice(sorted(FIXTURES))
    doc: Any = copy.deepcopy(FIXTURES[name])
    if pick.int(0, 1) and isinstance(doc.get("message"), dict):  # a new id: exercise the insert, not the dup
        doc["message"]["messageid"] = f"{pick.int(0, 2**64):X}AB"
        doc["message"].pop("id", None)
    ops = []
    for _ in range(pick.int(1, 3)):
        paths = _paths(doc)
        path = pick.choice(paths[1:] if len(paths) > 1 else paths)
        op = pick.choice(["drop", "retype", "nest", "huge", "unicode", "null_object"])
        ops.append(op)
        if op == "drop" and path:
            doc = _set(doc, path, None, delete=True)
        elif op == "retype":
            doc = _set(doc, path, pick.json())
        elif op == "nest":
            cur: Any = doc
            for k in path:
                cur = cur[k]
            doc = _set(doc, path, pick.choice([{"value": cur}, [cur], [[cur]], {"a": {"b": cur}}]))
        elif op == "huge":
            doc = _set(doc, path, pick.choice(list("aé👩\u0000")) * pick.int(1_000, 100_000))
        elif op == "unicode":
            doc = _set(doc, path, pick.text())
        elif isinstance(doc, dict):
            key = pick.choice(["message", "chat", "event", "instance", "content"])
            target = doc.get("message") if key == "content" and isinstance(doc.get("message"), dict) else doc
            target[key] = None
    return f"{name}:{'+'.join(ops)}", doc


@st.composite
def mutated_fixtures(draw: st.DrawFn) -> tuple[str, Any]:
    return mutate(Pick(draw=draw))


def byte_fuzz(body: bytes, rnd: random.Random) -> bytes:
    """Classic fuzzing on the wire bytes: truncate, flip a byte, splice in an escape, repeat a slice."""
    if not body:
        return b"\x00"
    i = rnd.randrange(len(body))
    op = rnd.randint(0, 3)
    if op == 0:
        return body[:i]
    if op == 1:
        return body[:i] + bytes([rnd.randrange(256)]) + body[i + 1:]
    if op == 2:
        return body[:i] + rnd.choice([b"\\ud800", b"\\u0000", b'"', b"{", b"]", b"\xff\xfe", b"NaN"]) + body[i:]
    j = min(len(body), i + rnd.randint(1, 64))
    return body[:j] + body[i:j] * rnd.randint(2, 50) + body[j:]


def _encode(doc: Any, ascii_only: bool) -> bytes:
    if ascii_only:
        return json.dumps(doc).encode()
    # Lone surrogates cannot be UTF-8: surrogatepass writes them anyway, an invalid-UTF-8 body (must be a 489)
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


# -- the contract checked on every result -----------------------------------------------------------------------------

class _Failures(logging.Handler):
    """Collects the exceptions behind the handler's "unexpected failure" log lines (its 500s)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.seen.append(record.exc_info[1])


FAILURES = _Failures()


def _judge(kind: str, results: list[tuple[bytes, int, dict[str, Any], dict[str, str]]]) -> None:
    """The contract for one batch: 2xx with a known outcome, 489 with the non-retryable header, or another 4xx (not
    401: every body here is signed). Never a 5xx: for a body, that is QStash retrying what can never succeed."""
    failures, FAILURES.seen = FAILURES.seen, []
    fivexx = [(status, answer, body[:300]) for body, status, answer, _ in results
              if status >= 500]
    assert not fivexx, (fivexx, failures)
    for body, status, answer, headers in results:
        h = {k.lower(): v for k, v in headers.items()}
        TALLY[f"{kind} {status} {answer.get('status') or answer.get('error')}"] += 1
        if status == 489:
            assert h.get("upstash-nonretryable-error") == "true"
        elif status == 200:
            assert answer.get("status") in ("stored", "duplicate", "receipt", "instance", "ignored"), answer
        else:
            assert 400 <= status < 500 and status != 401, (status, answer, body[:300])


async def _deliver(ep: Endpoint, kind: str, bodies: list[bytes]) -> list[str]:
    FAILURES.seen = []
    outcomes = await asyncio.gather(*(ep.handler.handle(b, [ep.sign(b)]) for b in bodies))
    _judge(kind, [(b, o.status, o.body, o.headers) for b, o in zip(bodies, outcomes, strict=True)])
    before = sum(TALLY.values()) - len(bodies)
    if before // INTEGRITY_EVERY != (before + len(bodies)) // INTEGRITY_EVERY:
        assert await integrity_violations(ep.store) == {}
    return [o.outcome for o in outcomes]


# -- generated payloads, in-process -----------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=N_RANDOM_JSON // BATCH, **HYPOTHESIS)  # type: ignore[arg-type]
@given(doc=random_envelopes(), ascii_only=st.booleans(), rnd=st.randoms(use_true_random=False))
async def test_random_json_never_5xx(ep: Endpoint, doc: Any, ascii_only: bool, rnd: random.Random) -> None:
    """Per example: one Hypothesis envelope, two byte-fuzzed copies of it, two envelopes from the seeded fuzzer."""
    body = _encode(doc, ascii_only)
    pick = Pick(rnd=rnd)
    others = [_encode({"EventType": pick.choice(["messages", "messages_update", "connection", pick.text()]),
                       "token": FIXTURES["messages_inbound_text.json"]["token"], "message": pick.json(),
                       "chat": pick.json(), "event": pick.json()}, rnd.random() < 0.5) for _ in range(BATCH - 3)]
    await _deliver(ep, "random_json", [body, byte_fuzz(body, rnd), byte_fuzz(body, rnd), *others])


@pytest.mark.slow
@settings(max_examples=N_MUTATED // BATCH, **HYPOTHESIS)  # type: ignore[arg-type]
@given(case=mutated_fixtures(), ascii_only=st.booleans(), rnd=st.randoms(use_true_random=False))
async def test_mutated_fixtures_never_5xx(ep: Endpoint, case: tuple[str, Any], ascii_only: bool,
                                          rnd: random.Random) -> None:
    """Per example: one Hypothesis-mutated fixture and BATCH-1 more mutated by the seeded fuzzer."""
    bodies = [_encode(case[1], ascii_only)]
    bodies += [_encode(mutate(Pick(rnd=rnd))[1], rnd.random() < 0.5) for _ in range(BATCH - 1)]
    await _deliver(ep, "mutated", bodies)


verbatim_texts = (edge_text | st.text(st.characters(exclude_categories=()), min_size=1, max_size=300)
                  | st.lists(edge_text | any_text, min_size=1, max_size=6).map("".join)
                  | st.builds(lambda s, n: s * n, edge_text, st.integers(1, 5_000))).filter(bool)


@pytest.mark.slow
@settings(max_examples=N_VERBATIM // BATCH, **HYPOTHESIS)  # type: ignore[arg-type]
@given(texts=st.lists(st.tuples(verbatim_texts, st.booleans()), min_size=BATCH, max_size=BATCH))
async def test_valid_messages_are_stored_verbatim(ep: Endpoint, texts: list[tuple[str, bool]]) -> None:
    bodies, expected = [], {}
    for body_text, conversation in texts:
        doc = copy.deepcopy(FIXTURES["messages_inbound_text.json"])
        mid = uuid.uuid4().hex.upper()
        doc["message"].update(messageid=mid, id=f"{doc['owner']}:{mid}", text=body_text)
        if conversation:  # UAZAPI's plain-text shape: content is the string itself
            doc["message"].update(messageType="Conversation", content=body_text)
        bodies.append(json.dumps(doc).encode())  # ASCII escapes: lone surrogates travel as \udXXX
        sent = json.loads(json.dumps(body_text))  # what any JSON reader sees (an escaped surrogate pair is one char)
        expected[mid] = UNSTORABLE.sub("\ufffd", sent)
    assert await _deliver(ep, "verbatim", bodies) == ["stored"] * len(bodies)
    async with ep.store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT external_id, content FROM message WHERE external_id = ANY(:i)"),
                                   {"i": list(expected)})).all()
    assert dict(rows) == expected


async def test_store_refusals_are_non_retryable(ep: Endpoint) -> None:
    """Regression (found by this suite, fixed in handler 014c117): what the store's validation refuses (an over-long
    or NUL-holding id, an over-long instance status) is a 489, never a 500 that QStash would retry."""
    base = FIXTURES["messages_inbound_text.json"]
    cases = {
        "nul_in_chat_jid": {"chatid": "5511988887777\u0000@s.whatsapp.net"},
        "track_id_too_long": {"track_id": "t" * 5_000},
        "raw_type_too_long": {"messageType": "X" * 5_000},
        "chat_jid_too_long": {"chatid": "1" * 300 + "@s.whatsapp.net"},
        "instance_status_too_long": {},
    }
    statuses = {}
    for name, fields in cases.items():
        doc = copy.deepcopy(base)
        mid = uuid.uuid4().hex.upper()
        doc["message"].update(messageid=mid, id=f"{doc['owner']}:{mid}", **fields)
        doc["chat"]["wa_chatid"] = doc["message"]["chatid"]
        if not fields:  # a connection event whose status does not fit instance.status (32 characters)
            doc = copy.deepcopy(FIXTURES["connection_connected.json"])
            doc["instance"]["status"] = "x" * 5_000
        body = json.dumps(doc).encode()
        o = await ep.handler.handle(body, [ep.sign(body)])
        statuses[name] = (o.status, o.headers.get("Upstash-NonRetryable-Error"))
    assert statuses == {name: (489, "true") for name in cases}


async def test_unstorable_instance_names_are_non_retryable(ep: Endpoint) -> None:
    """Found by the mutated-fixture fuzzing. Fix: Store.find_instance returns None for a name or token holding a NUL
    or a lone surrogate (store_rows' unstorable set), and WebhookHandler._instance hashes the token with
    ``encode("utf-8", "surrogatepass")``; both then end as 489 unknown_instance."""
    base = FIXTURES["messages_inbound_text.json"]
    results = {}
    for field, value in (("instanceName", "demo\u0000"), ("instanceName", "demo\ud800"), ("token", "\ud800")):
        doc = copy.deepcopy(base)
        doc[field] = value
        body = json.dumps(doc).encode()
        o = await ep.handler.handle(body, [ep.sign(body)])
        results[(field, value)] = (o.status, o.body.get("error"))
    assert set(results.values()) == {(489, "unknown_instance")}, results


# -- over HTTP --------------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(ep: Endpoint) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


@pytest.mark.slow
@settings(max_examples=N_HTTP, **HYPOTHESIS)  # type: ignore[arg-type]
@given(case=mutated_fixtures() | random_envelopes().map(lambda d: ("random", d)), ascii_only=st.booleans())
async def test_generated_payloads_over_http(ep: Endpoint, http: httpx.AsyncClient, case: tuple[str, Any],
                                            ascii_only: bool) -> None:
    body = _encode(case[1], ascii_only)
    FAILURES.seen = []
    r = await ep.post(http, body)
    _judge("http", [(body, r.status_code, r.json(), dict(r.headers))])
    if len(body) > MAX_BODY_BYTES:
        assert r.status_code == 413


async def test_body_over_the_limit_is_413_without_being_read(ep: Endpoint) -> None:
    """A declared 50 MiB body is refused from its headers: the server answers before we send any of it."""
    host, port = "127.0.0.1", int(ep.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection(host, port)
    path = ep.url.split(str(port), 1)[1]
    writer.write((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Upstash-Signature: x.y.z\r\nContent-Length: {50 << 20}\r\n\r\n").encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    writer.close()
    await writer.wait_closed()


async def test_streamed_body_over_the_limit_is_413(ep: Endpoint, http: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):  # 40 x 64 KiB = 2.5 MiB, no Content-Length (chunked)
            yield b" " * 65_536

    before = (await ep.store.counts())["message"]
    r = await http.post(ep.url, content=chunks(), headers={"Upstash-Signature": "x.y.z"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    assert (await ep.store.counts())["message"] == before


async def test_a_client_gone_in_the_middle_of_its_body_leaves_nothing_and_no_error(
        ep: Endpoint, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    port = int(ep.base.rsplit(":", 1)[1])
    path = ep.url.split(str(port), 1)[1]
    doc = copy.deepcopy(FIXTURES["messages_inbound_text.json"])
    mid = uuid.uuid4().hex.upper()  # a message no other test of the module's endpoint stored
    doc["message"].update(messageid=mid, id=f"{doc['owner']}:{mid}")
    body = json.dumps(doc).encode()
    before = (await ep.store.counts())["message"]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nUpstash-Signature: {ep.sign(body)}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()  # gone, half the body sent
    await writer.wait_closed()
    await asyncio.sleep(0.2)
    assert (await ep.store.counts())["message"] == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # no 500, no traceback
    r = await ep.post(http, body)  # and the whole delivery, later, is stored
    assert r.status_code == 200 and r.json()["status"] == "stored"


async def test_slow_clients_do_not_block_other_deliveries(ep: Endpoint, http: httpx.AsyncClient) -> None:
    """Slowloris: connections that send half a request and stall. Valid deliveries still go through meanwhile."""
    port = int(ep.base.rsplit(":", 1)[1])
    path = ep.url.split(str(port), 1)[1]
    stalled: list[socket.socket] = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:  # headers never finished
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode())
        else:  # body promised, a trickle sent
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{{\"Event".encode())
        stalled.append(s)
    try:
        base = copy.deepcopy(FIXTURES["messages_inbound_text.json"])
        ids = []
        for _ in range(20):
            mid = uuid.uuid4().hex.upper()
            ids.append(mid)
            base["message"].update(messageid=mid, id=f"{base['owner']}:{mid}")
            r = await ep.post(http, json.dumps(base).encode())
            assert r.status_code == 200 and r.json()["status"] == "stored"
        for s in stalled:  # still open (not answered, not dropped) while the others were served
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in stalled:
            s.close()
    async with ep.store.engine.connect() as conn:
        n = (await conn.execute(text("SELECT count(*) FROM message WHERE external_id = ANY(:ids)"),
                                {"ids": ids})).scalar_one()
    assert n == 20


async def test_receipt_ids_the_database_cannot_hold_are_non_retryable(ep: Endpoint) -> None:
    """Found by the mutated-fixture fuzzing: a receipt whose MessageIDs hold a NUL made PostgreSQL refuse the query,
    which was answered 503 (QStash retried it forever). A value the database can never hold is non-retryable."""
    doc = copy.deepcopy(FIXTURES["messages_update_delivered.json"])
    doc["event"]["MessageIDs"] = ["AC50672C\u0000\u0010"]
    body = json.dumps(doc).encode()
    o = await ep.handler.handle(body, [ep.sign(body)])
    assert o.status in (200, 489), o
    if o.status == 489:
        assert o.headers["Upstash-NonRetryable-Error"] == "true"
