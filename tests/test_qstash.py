"""The verifier: the official Receiver's verdict, with the precise reason on failure, and nothing secret leaked."""

from __future__ import annotations

import time
import warnings

import jwt
import pytest

from whatrack.devstack.qstash.sign import sign
from whatrack.errors import ConfigError, SignatureError
from whatrack.qstash import Verifier, body_hash
from whatrack.settings import Settings

CURRENT = "sig_7kYjw48mhY7kAjqNGcy6cr29RJ6r"
NEXT = "sig_5ZB6DVzB1wjE8S6rZ7eenA8Pdnhs"
URL = "https://whatrack.example.com/api/v1/webhooks/qstash/whatsapp"
BODY = b'{"EventType": "messages", "text": "ol\xc3\xa1"}'


@pytest.fixture
def verifier() -> Verifier:
    return Verifier(CURRENT, NEXT, url=URL)


def _reason(verifier: Verifier, body: bytes, sigs: list[str], suffix: str = "") -> str:
    with pytest.raises(SignatureError) as e:
        verifier.verify(body, sigs, url_suffix=suffix)
    for secret in (CURRENT, NEXT, *sigs):
        assert secret not in str(e.value)
    return e.value.reason


def test_current_and_next_key_pass(verifier: Verifier) -> None:
    verifier.verify(BODY, [sign(BODY, URL, CURRENT)])
    verifier.verify(BODY, [sign(BODY, URL, NEXT)])


def test_url_suffix_is_part_of_the_signed_url(verifier: Verifier) -> None:
    verifier.verify(BODY, [sign(BODY, URL + "/messages/text", CURRENT)], url_suffix="/messages/text")
    assert _reason(verifier, BODY, [sign(BODY, URL, CURRENT)], "/messages/text") == "wrong_url"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: [], "missing"),
        (lambda: [sign(BODY, URL, "sig_SomeoneElsesKey0000000000000")], "bad_key"),
        (lambda: [sign(BODY, URL.replace("whatrack", "evil"), CURRENT)], "wrong_url"),
        (lambda: [sign(BODY, URL, CURRENT, now=int(time.time()) - 600)], "expired"),
        (lambda: [sign(BODY, URL, CURRENT, now=int(time.time()) + 600)], "not_yet_valid"),
        (lambda: [sign(BODY + b" ", URL, CURRENT)], "body_changed"),
        (lambda: ["garbage"], "malformed"),
        (lambda: ["a.b.c"], "malformed"),
        (lambda: [sign(BODY, URL, CURRENT), sign(BODY, URL, CURRENT)], "malformed"),
    ],
)
def test_each_failure_names_its_check(verifier: Verifier, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    assert _reason(verifier, BODY, make()) == reason


def test_each_signing_key_is_checked_once_not_once_per_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyJWT checks an HMAC key (not PEM, SSH, DER or a JWK) on every token; the verifier's HS256 keeps the verdict
    for a key that passed. A key the check refuses is still refused, every time."""
    from jwt import api_jws
    from jwt.algorithms import HMACAlgorithm

    checked: list[bytes] = []
    original = HMACAlgorithm.prepare_key

    def spy(self: HMACAlgorithm, key: str | bytes) -> bytes:
        checked.append(key.encode() if isinstance(key, str) else key)
        return original(self, key)

    monkeypatch.setattr(HMACAlgorithm, "prepare_key", spy)
    verifier = Verifier(CURRENT, NEXT, url=URL)
    kept = getattr(api_jws.get_algorithm_by_name("HS256").prepare_key, "cache_clear", None)
    if kept is not None:  # forget the verdicts earlier tests left (the same keys)
        kept()
    for _ in range(5):
        verifier.verify(BODY, [sign(BODY, URL, CURRENT)])
        verifier.verify(BODY, [sign(BODY, URL, NEXT)])  # current key first (refused), then the next one
    assert checked == [CURRENT.encode(), NEXT.encode()]
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    for _ in range(2):
        with pytest.raises(jwt.InvalidKeyError):
            jwt.decode(sign(BODY, URL, CURRENT), pem, algorithms=["HS256"], options={"verify_exp": False})
    assert checked.count(pem.encode()) == 2


def test_one_byte_changed_in_the_body(verifier: Verifier) -> None:
    sig = sign(BODY, URL, CURRENT)
    tampered = BODY.replace(b"messages", b"messagez")
    assert _reason(verifier, tampered, [sig]) == "body_changed"


def test_alg_none_and_hs512_are_refused(verifier: Verifier) -> None:
    now = int(time.time())
    claims = {"iss": "Upstash", "sub": URL, "iat": now, "nbf": now, "exp": now + 300, "jti": "j",
              "body": body_hash(BODY)}
    none_token = jwt.encode(claims, None, algorithm="none")
    assert _reason(verifier, BODY, [none_token]) == "malformed"
    with warnings.catch_warnings():  # PyJWT warns that a 32-byte key is short for HS512: that is the point
        warnings.simplefilter("ignore")
        hs512 = jwt.encode(claims, CURRENT.encode(), algorithm="HS512")
    assert _reason(verifier, BODY, [hs512]) == "malformed"


def test_bad_claims(verifier: Verifier) -> None:
    now = int(time.time())
    base = {"iss": "Upstash", "sub": URL, "iat": now, "nbf": now, "exp": now + 300, "jti": "j",
            "body": body_hash(BODY)}
    for change in ({"iss": "upstash"}, {"aud": "x"}, {"jti": 1.5}):
        token = jwt.encode({**base, **change}, CURRENT.encode(), algorithm="HS256")
        assert _reason(verifier, BODY, [token]) == "bad_claims"


def test_non_utf8_body_is_verified_by_the_same_rules(verifier: Verifier) -> None:
    body = b"\xff\xfe not utf-8"
    verifier.verify(body, [sign(body, URL, CURRENT)])
    assert _reason(verifier, body, [sign(body + b"x", URL, CURRENT)]) == "body_changed"


def test_from_settings_needs_keys_and_url() -> None:
    with pytest.raises(ConfigError) as e:
        Verifier.from_settings(Settings.from_env({}))
    assert e.value.variable == "QSTASH_CURRENT_SIGNING_KEY"
    with pytest.raises(ConfigError) as e:
        Verifier.from_settings(Settings.from_env({"QSTASH_CURRENT_SIGNING_KEY": CURRENT,
                                                  "QSTASH_NEXT_SIGNING_KEY": NEXT}))
    assert e.value.variable == "WEBHOOK_PUBLIC_URL"
