"""Forged, replayed and malformed ``Upstash-Signature`` headers over real HTTP: each gets 401, stores nothing, and
neither the response nor the logs ever carry the token or a signing key.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import jwt
import pytest
import pytest_asyncio
from adversarial_support import CURRENT, NEXT, ROTATED_OUT, Endpoint, fresh_endpoint

from whatrack.devstack import servers
from whatrack.devstack.qstash.sign import body_hash, new_jti

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ep(pg_admin_url: str, redis_server: servers.RedisServer, fixtures_dir: Path) -> AsyncIterator[Endpoint]:
    """One endpoint and database for the module: every case must leave it without a message row."""
    async with fresh_endpoint(pg_admin_url, redis_server.url, fixtures_dir) as e:
        yield e


async def _messages(ep: Endpoint) -> int:
    return (await ep.store.counts())["message"]


def _claims(ep: Endpoint, body: bytes, **over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"iss": "Upstash", "sub": ep.url, "iat": now, "nbf": now, "exp": now + 300,
                                 "jti": new_jti(), "body": body_hash(body)}
    claims.update(over)
    return claims


def _hs(claims: dict[str, object], key: str, alg: str) -> str:
    with warnings.catch_warnings():  # PyJWT warns that our 35-byte key is short for HS384/512: that is the point
        warnings.simplefilter("ignore")
        return jwt.encode(claims, key.encode(), algorithm=alg, headers={"typ": "JWT"})


def _alg_none(claims: dict[str, object]) -> str:
    def b64(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


#: name -> (headers builder, the reason the endpoint must give)
CASES: dict[str, tuple[Callable[[Endpoint, bytes], list[str]], str]] = {
    "expired_replay": (lambda ep, b: [ep.sign(b, now=int(time.time()) - 400)], "expired"),
    "expired_by_one_second": (lambda ep, b: [ep.sign(b, now=int(time.time()) - 302)], "expired"),
    "not_yet_valid": (lambda ep, b: [ep.sign(b, now=int(time.time()) + 120)], "not_yet_valid"),
    "another_url": (lambda ep, b: [ep.sign(b, url="https://other.example.com/api/v1/webhooks/qstash/whatsapp")],
                    "wrong_url"),
    "another_path_on_our_host": (lambda ep, b: [ep.sign(b, url=ep.url.replace("whatsapp", "other"))], "wrong_url"),
    "rotated_out_key": (lambda ep, b: [ep.sign(b, ROTATED_OUT)], "bad_key"),
    "hs384": (lambda ep, b: [_hs(_claims(ep, b), CURRENT, "HS384")], "malformed"),
    "hs512": (lambda ep, b: [_hs(_claims(ep, b), CURRENT, "HS512")], "malformed"),
    "alg_none": (lambda ep, b: [_alg_none(_claims(ep, b))], "malformed"),
    "garbage": (lambda ep, b: ["!!garbage%%"], "malformed"),
    "three_dots_of_garbage": (lambda ep, b: ["a.b.c"], "malformed"),
    "base64_junk_parts": (lambda ep, b: ["eyJhbGciOi.eyJpc3MiOiJV.c2ln"], "malformed"),
    "empty": (lambda ep, b: [""], "malformed"),
    "only_dots": (lambda ep, b: [".."], "malformed"),
    "two_valid_headers": (lambda ep, b: [ep.sign(b), ep.sign(b)], "malformed"),
    "valid_and_forged": (lambda ep, b: [ep.sign(b), ep.sign(b, ROTATED_OUT)], "malformed"),
    "huge_10k": (lambda ep, b: [ep.sign(b) + "A" * 10_000], "malformed"),
    "bearer_prefix": (lambda ep, b: ["Bearer " + ep.sign(b)], "malformed"),
    "no_body_claim": (lambda ep, b: [_hs({k: v for k, v in _claims(ep, b).items() if k != "body"}, CURRENT, "HS256")],
                      "body_changed"),
    "audience_set": (lambda ep, b: [_hs(_claims(ep, b, aud="evil"), CURRENT, "HS256")], "bad_claims"),
    "issuer_lowercase": (lambda ep, b: [_hs(_claims(ep, b, iss="upstash"), CURRENT, "HS256")], "bad_claims"),
    "body_of_another_delivery": (lambda ep, b: [ep.sign(b + b" ")], "body_changed"),
    "key_as_base64": (lambda ep, b: [_hs(_claims(ep, b), base64.b64encode(CURRENT.encode()).decode(), "HS256")],
                      "bad_key"),
}


def _leaks(text: str, tokens: list[str]) -> list[str]:
    return [s[:12] + "..." for s in [*tokens, CURRENT, NEXT, ROTATED_OUT] if s and len(s) > 3 and s in text]


@pytest.mark.parametrize("case", list(CASES))
async def test_forged_signature_is_401_stores_nothing_and_leaks_nothing(
        ep: Endpoint, case: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = (ep.fixtures / "messages_inbound_text.json").read_bytes()
    build, reason = CASES[case]
    tokens = build(ep, body)
    async with httpx.AsyncClient(timeout=30) as c:
        r = await ep.post(c, body, [("Upstash-Signature", t) for t in tokens], signed=False)
    assert r.status_code == 401, r.text
    assert r.json() == {"error": "invalid_signature", "reason": reason}
    assert await _messages(ep) == 0
    everything = f"{r.headers!r}\n{r.text}\n{caplog.text}"
    assert _leaks(everything, [t.strip() for t in tokens]) == []


async def test_missing_header_and_header_far_over_any_limit(ep: Endpoint) -> None:
    body = (ep.fixtures / "messages_inbound_text.json").read_bytes()
    async with httpx.AsyncClient(timeout=30) as c:
        r = await ep.post(c, body, signed=False)
        assert (r.status_code, r.json()["reason"]) == (401, "missing")
        # 1 MiB of header: refused by the HTTP layer or the verifier, never processed, never a 5xx
        r = await ep.post(c, body, [("Upstash-Signature", ep.sign(body) + "A" * (1 << 20))], signed=False)
        assert 400 <= r.status_code < 500
        assert CURRENT not in r.text
    assert await _messages(ep) == 0


async def test_a_replayed_valid_token_stores_once(ep: Endpoint) -> None:
    """Within its 5 minutes a captured token can be replayed; idempotency on the message id makes it harmless."""
    body = (ep.fixtures / "messages_inbound_text.json").read_bytes()
    token = ep.sign(body)
    async with httpx.AsyncClient(timeout=30) as c:
        statuses = [(await ep.post(c, body, [("Upstash-Signature", token)], signed=False)).json()["status"]
                    for _ in range(5)]
    assert statuses == ["stored"] + ["duplicate"] * 4
    assert await _messages(ep) == 1


async def test_next_key_still_passes_after_all_that(ep: Endpoint) -> None:
    body = (ep.fixtures / "messages_outbound_text_fromme.json").read_bytes()
    before = await _messages(ep)
    async with httpx.AsyncClient(timeout=30) as c:
        r = await ep.post(c, body, [("Upstash-Signature", ep.sign(body, NEXT))], signed=False)
    assert r.status_code == 200 and await _messages(ep) == before + 1
