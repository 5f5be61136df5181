"""The offline QStash broker's pure parts: signing, durations, retry-delay expressions, backoff, header parsing."""

from __future__ import annotations

import email.utils
import math

import jwt
import pytest
from qstash import Receiver
from qstash.errors import SignatureError

from whatrack.devstack.qstash.durations import (
    HeaderError,
    default_backoff_s,
    eval_retry_delay_ms,
    parse_duration_s,
    parse_flow_control,
    parse_go_duration_s,
    retry_after_s,
)
from whatrack.devstack.qstash.model import callback_spec, dedup_key, make_message, parse_publish_headers
from whatrack.devstack.qstash.publish import next_fire_ms
from whatrack.devstack.qstash.sign import body_hash, sign

CUR, NXT = "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r", "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs"


@pytest.mark.parametrize(("body", "want"), [
    (b"", "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU="),
    (b"test-body", "2dhlzFTsYGePGxGQhK15rn-TV9HEUZxkV94zFLf7uoo="),
    (b'{"hello": "world"}', "X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="),
])
def test_body_hash_matches_the_documented_vectors(body: bytes, want: str) -> None:
    assert body_hash(body) == want


def test_signature_has_exactly_the_qstash_claims_and_verifies_with_the_sdk() -> None:
    url = "https://example.com/hook?a=1"
    token = sign(b"test-body", url, CUR, now=1_700_000_000)
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, CUR.encode(), algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False,
                                                                             "verify_iat": False})
    assert set(claims) == {"iss", "sub", "iat", "nbf", "exp", "jti", "body"}
    assert claims["iss"] == "Upstash" and claims["sub"] == url
    assert claims["iat"] == claims["nbf"] == 1_700_000_000 and claims["exp"] == 1_700_000_300
    assert isinstance(claims["jti"], str) and claims["jti"].startswith("jwt_")
    live = sign(b"test-body", url, CUR)
    Receiver(CUR, NXT).verify(signature=live, body="test-body", url=url)
    Receiver("sig_000000000000000000000000000000", CUR).verify(signature=live, body="test-body", url=url)
    with pytest.raises(SignatureError):
        Receiver(CUR, NXT).verify(signature=live, body="test-bodY", url=url)
    with pytest.raises(SignatureError):
        Receiver(CUR, NXT).verify(signature=live, body="test-body", url=url + "&b=2")
    with pytest.raises(SignatureError):
        Receiver(NXT, NXT).verify(signature=live, body="test-body", url=url)


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("1h30m3s", 5403), ("1d10h30m", 124200), ("45", 45),
                                               ("2m", 120)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration_s(text, "Upstash-Delay") == seconds


@pytest.mark.parametrize("bad", ["", "10x", "s10", "1h 30m", "-5s", "1.5h"])
def test_bad_durations_name_the_header(bad: str) -> None:
    with pytest.raises(HeaderError, match="Upstash-Delay"):
        parse_duration_s(bad, "Upstash-Delay")


def test_go_durations() -> None:
    assert parse_go_duration_s("6m5s") == 365
    assert parse_go_duration_s("300ms") == pytest.approx(0.3)
    assert parse_go_duration_s("1.5s") == pytest.approx(1.5)
    assert parse_go_duration_s("5 minutes") is None


def test_retry_after_forms_and_the_one_day_cap() -> None:
    now = 1_700_000_000.0
    assert retry_after_s({"retry-after": "7"}, now) == 7
    assert retry_after_s({"retry-after": "0"}, now) == 0
    assert retry_after_s({"x-ratelimit-reset": "6m5s"}, now) == 365
    date = email.utils.formatdate(now + 120, usegmt=True)
    assert retry_after_s({"retry-after": date}, now) == pytest.approx(120)
    assert retry_after_s({"retry-after": str(2 * 86400)}, now) is None  # beyond a day: default backoff
    assert retry_after_s({"retry-after": "soon"}, now) is None
    assert retry_after_s({}, now) is None


def test_default_backoff_is_e_to_the_2_5_n_capped_at_a_day() -> None:
    assert default_backoff_s(1) == pytest.approx(math.exp(2.5))  # ~12 s, the docs' first retry
    assert default_backoff_s(2) == pytest.approx(math.exp(5.0))  # ~2 m 28 s
    assert default_backoff_s(5) == 86400
    assert default_backoff_s(1000) == 86400


@pytest.mark.parametrize(("expr", "retried", "ms"), [
    ("7000 * retried", 2, 14000), ("pow(2, retried) * 1000", 3, 8000), ("1000", 5, 1000),
    ("max(10, min(100, retried * 30))", 2, 60), ("sqrt(16) + abs(-1) + floor(1.7) + ceil(0.2) + round(2.4)", 0, 9),
    ("exp(0) * 100", 0, 100), ("2 ** retried", 3, 8), ("-(-5)", 0, 5),
])
def test_retry_delay_expressions(expr: str, retried: int, ms: float) -> None:
    assert eval_retry_delay_ms(expr, retried) == pytest.approx(ms)


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "retried.__class__", "open('x')",
                                  "lambda: 1", "[1][0]", "1 if 1 else 2", "retried / 0", "pow(10, 1000)",
                                  "-5", "foo", "1 +", "x" * 300])
def test_retry_delay_expressions_reject_everything_else(expr: str) -> None:
    with pytest.raises(HeaderError, match="Upstash-Retry-Delay"):
        eval_retry_delay_ms(expr, 1)


def test_flow_control_values_with_either_separator_or_empty() -> None:
    fc = parse_flow_control("k", "parallelism=2, rate=10, period=1h30m3s")
    assert (fc.parallelism, fc.rate, fc.period) == (2, 10, 5403)
    fc = parse_flow_control("k", "rate=1,period=5")
    assert (fc.parallelism, fc.rate, fc.period) == (None, 1, 5)
    assert parse_flow_control("k", "").period == 1
    with pytest.raises(HeaderError, match="Flow-Control-Value"):
        parse_flow_control("k", "speed=3")


def test_py_sdk_headers_are_parsed_case_insensitively_with_its_quirks() -> None:
    spec = parse_publish_headers({
        "content-type": "application/json", "upstash-forward-test-header": "v", "upstash-retries": "0",
        "upstash-content-based-deduplication": "True", "upstash-callback": "https://cb.example/x",
        "upstash-callback-x-token": "abc", "upstash-callback-retries": "1", "upstash-delay": "1d10h30m",
        "upstash-label": "a,b", "upstash-flow-control-key": "k", "upstash-flow-control-value": "",
        "upstash-method": "put",
    })
    assert spec.header == {"Test-Header": ["v"]} and spec.retries == 0 and spec.content_dedup
    assert spec.callback.header == {"X-Token": ["abc"]} and spec.callback.config == {"retries": "1"}
    assert spec.delay_s == 124200 and spec.labels == ["a", "b"] and spec.method == "PUT"
    assert spec.flow == {"flowControlKey": "k", "parallelism": None, "rate": None, "period": 1}
    rec = make_message(spec, "https://d.example/", caller_ip="1.2.3.4", created=1000)
    assert rec["notBefore"] == 1000 + 124200 * 1000 and rec["label"] == "a" and rec["labels"] == ["a", "b"]
    cb = callback_spec(rec, failure=False)
    assert cb.retries == 1 and cb.header == {"X-Token": ["abc"]}


@pytest.mark.parametrize(("header", "value"), [("upstash-retries", "many"), ("upstash-not-before", "tomorrow"),
                                               ("upstash-method", "FETCH"), ("upstash-retry-delay", "eval('1')"),
                                               ("upstash-callback", "ftp://x"), ("upstash-timeout", "forever")])
def test_malformed_headers_are_refused_with_the_header_named(header: str, value: str) -> None:
    with pytest.raises(HeaderError) as e:
        parse_publish_headers({header: value})
    assert e.value.header.lower() == header


def test_dedup_keys_cover_destination_body_type_and_forwarded_headers() -> None:
    base = {"upstash-content-based-deduplication": "true", "content-type": "text/plain"}
    k = dedup_key(parse_publish_headers(base), "https://a/", b"x")
    assert k == dedup_key(parse_publish_headers(base), "https://a/", b"x")
    assert k != dedup_key(parse_publish_headers(base), "https://b/", b"x")
    assert k != dedup_key(parse_publish_headers(base), "https://a/", b"y")
    assert k != dedup_key(parse_publish_headers({**base, "upstash-forward-h": "1"}), "https://a/", b"x")
    assert dedup_key(parse_publish_headers({}), "https://a/", b"x") is None
    assert dedup_key(parse_publish_headers({"upstash-deduplication-id": "d1"}), "https://a/", b"x") == \
        dedup_key(parse_publish_headers({"upstash-deduplication-id": "d1"}), "https://zzz/", b"other")


def test_cron_with_and_without_time_zone() -> None:
    t0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
    assert next_fire_ms("*/5 * * * *", t0) == 1_700_000_100_000
    assert next_fire_ms("0 9 * * *", t0) == 1_700_038_800_000  # 09:00 UTC next day
    assert next_fire_ms("CRON_TZ=America/Sao_Paulo 0 9 * * *", t0) == 1_700_038_800_000 + 3 * 3600_000
    for bad in ("* * *", "61 * * * *", "CRON_TZ=Mars/Olympus 0 9 * * *"):
        with pytest.raises(HeaderError, match="Upstash-Cron"):
            next_fire_ms(bad, t0)


def test_redact_fields_hide_body_and_headers_from_the_events_only() -> None:
    spec = parse_publish_headers({"upstash-redact-fields": "body, header[Authorization]",
                                  "upstash-forward-authorization": "Bearer s3cret", "upstash-forward-x": "1"})
    assert spec.redact_body and spec.logged_header(spec.header) == {"X": ["1"]}
    assert spec.header["Authorization"] == ["Bearer s3cret"]  # still delivered
    assert parse_publish_headers({"upstash-redact-fields": "header"}).logged_header({"X": ["1"]}) is None
    with pytest.raises(HeaderError, match="Redact"):
        parse_publish_headers({"upstash-redact-fields": "everything"})
