"""QStash: publishing webhooks (PRD §7.1) and verifying deliveries (PRD §7.2).

The verdict on a signature is the official ``qstash.Receiver``'s (current key, then next key, ``sub`` checked against
the endpoint's public URL, over the raw body bytes). The Receiver hides why a signature failed behind the next-key
attempt (protocols/qstash.md §2.2), so on failure :meth:`Verifier.diagnose` re-checks the token claim by claim and
``SignatureError.reason`` says which check failed. No error carries the token, a key or the signature.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jwt
import qstash
from jwt import api_jws
from jwt.algorithms import HMACAlgorithm
from qstash import AsyncQStash

from whatrack.errors import ConfigError, PublishError, SignatureError
from whatrack.settings import Settings

log = logging.getLogger("whatrack.qstash")

SIGNATURE_HEADER = "upstash-signature"
#: QStash answers this status + header to mean "never retry, straight to the DLQ".
NON_RETRYABLE_STATUS = 489
NON_RETRYABLE_HEADER = "Upstash-NonRetryable-Error"
#: QStash event states after which a message will not be delivered again.
SETTLED_STATES = frozenset({"DELIVERED", "FAILED", "CANCELED"})


def body_hash(body: bytes) -> str:
    """base64url(SHA-256(body)) without padding: the ``body`` claim as both receivers compare it."""
    return base64.urlsafe_b64encode(hashlib.sha256(body).digest()).decode().rstrip("=")


class _HS256KeyCheckedOnce(HMACAlgorithm):
    """PyJWT's own HS256, its check of the key (``prepare_key``) done once per key instead of once per token.

    PyJWT 2.15 checks an HMAC key on every token it verifies: that it is not PEM, not an SSH key, not DER (two
    ``cryptography`` parsers that each fail with an exception) and not a JWK (a JSON parse with a new decoder). For the
    two fixed signing keys that was 11 % of the endpoint's CPU at saturation (py-spy, ``bench/webhook.py -c 256``);
    one verification costs 25 us instead of 33. The check is a pure function of the key: its result is kept for the
    keys it passed (a key it refused is checked, and refused, every time). Signing and verifying are PyJWT's.
    """

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)

    @functools.lru_cache(maxsize=16)  # noqa: B019 (the one instance lives as long as the process: nothing leaks)
    def prepare_key(self, key: str | bytes) -> bytes:
        return super().prepare_key(key)


def _check_hs256_keys_once() -> None:
    """Make :class:`_HS256KeyCheckedOnce` the HS256 of ``jwt.decode`` (the one ``qstash.Receiver`` calls), once."""
    if not isinstance(api_jws.get_algorithm_by_name("HS256"), _HS256KeyCheckedOnce):
        jwt.unregister_algorithm("HS256")
        jwt.register_algorithm("HS256", _HS256KeyCheckedOnce())


class Verifier:
    """Verifies ``Upstash-Signature`` on a delivery. One instance per process; ``verify`` is cheap and thread-safe.

    Args:
        current_key: ``QSTASH_CURRENT_SIGNING_KEY``.
        next_key: ``QSTASH_NEXT_SIGNING_KEY`` (deliveries signed with it pass: that is how key rotation works).
        url: the public URL QStash delivers to; the token's ``sub`` must equal it. ``None`` skips the check.
    """

    def __init__(self, current_key: str, next_key: str, *, url: str | None) -> None:
        if not current_key or not next_key:
            raise ConfigError("QSTASH_CURRENT_SIGNING_KEY", "both signing keys are needed to verify deliveries",
                              "sig_<key from the Upstash console>")
        self._keys = (current_key, next_key)
        _check_hs256_keys_once()
        self._receiver = qstash.Receiver(current_key, next_key)
        self.url = url

    @classmethod
    def from_settings(cls, settings: Settings) -> Verifier:
        current, next_ = settings.signing_keys()
        settings.require("WEBHOOK_PUBLIC_URL")
        return cls(current, next_, url=settings.webhook_public_url)

    def verify(self, body: bytes, signatures: Sequence[str], *, url_suffix: str = "") -> None:
        """Accept the delivery or raise.

        Args:
            body: the raw request body, exactly as received (verified before anything parses it).
            signatures: every ``Upstash-Signature`` header value on the request (exactly one is acceptable).
            url_suffix: what the request path has beyond the public URL's (UAZAPI's ``addUrlEvents`` appends
                ``/{event}/{type}``; QStash signs the full URL it delivered to).

        Raises:
            SignatureError: with ``reason`` in ``missing``, ``malformed``, ``bad_key``, ``expired``,
                ``not_yet_valid``, ``wrong_url``, ``body_changed``, ``bad_claims``.
        """
        if not signatures:
            raise SignatureError("missing", "no Upstash-Signature header: is the request coming through QStash?")
        if len(signatures) > 1:
            raise SignatureError("malformed", f"{len(signatures)} Upstash-Signature headers; exactly one expected")
        signature = signatures[0].strip()
        if not signature or signature.count(".") != 2 or len(signature) > 8192:
            raise SignatureError("malformed", "Upstash-Signature is not a compact JWT")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        url = None if self.url is None else self.url + url_suffix
        if text is not None:
            try:
                self._receiver.verify(signature=signature, body=text, url=url)
                return
            except qstash.errors.SignatureError:
                pass
            except Exception:  # PyJWT raising something unexpected on hostile input: still a rejection
                log.debug("receiver raised on a hostile token", exc_info=False)
        # Rejected (or a non-UTF-8 body the Receiver cannot take): find out exactly why, or accept a valid
        # non-UTF-8 body by the same rules.
        self.diagnose(body, signature, url)

    def diagnose(self, body: bytes, signature: str, url: str | None) -> None:
        """Check the token claim by claim with the Receiver's rules; raise the precise :class:`SignatureError`.

        Returns normally only when the token is valid (used for bodies the Receiver cannot take as ``str``).
        """
        try:
            header = jwt.get_unverified_header(signature)
        except jwt.PyJWTError:
            raise SignatureError("malformed", "Upstash-Signature is not a decodable JWT") from None
        if header.get("alg") != "HS256":
            raise SignatureError("malformed", f"algorithm {str(header.get('alg'))[:16]!r} is not allowed; QStash "
                                              "signs with HS256")
        claims: dict[str, Any] | None = None
        for key in self._keys:
            try:
                claims = jwt.decode(signature, key, algorithms=["HS256"],
                                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                             "verify_iss": False, "verify_aud": False, "verify_sub": False,
                                             "verify_jti": False})
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:
                raise SignatureError("malformed", f"token could not be decoded: {type(e).__name__}") from None
        if claims is None:
            raise SignatureError("bad_key", "signed with a key that is neither the current nor the next signing "
                                            "key: check QSTASH_CURRENT_SIGNING_KEY / QSTASH_NEXT_SIGNING_KEY")
        now = time.time()
        if claims.get("iss") != "Upstash":
            raise SignatureError("bad_claims", "issuer is not 'Upstash'")
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            raise SignatureError("bad_claims", "exp and nbf are required numbers")
        if exp <= now:
            raise SignatureError("expired", f"token expired {int(now - exp)} s ago (a replay, or a clock off)")
        if nbf > now or (isinstance(iat, int | float) and iat > now):
            raise SignatureError("not_yet_valid", "token is not valid yet (nbf/iat in the future): check the clock")
        if iat is not None and not isinstance(iat, int | float):
            raise SignatureError("bad_claims", "iat is not a number")
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise SignatureError("bad_claims", "jti is not a string")
        if claims.get("aud") not in (None, ""):
            raise SignatureError("bad_claims", "token carries an audience")
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise SignatureError("bad_claims", "sub is missing")
        if url is not None and sub != url:
            raise SignatureError("wrong_url", f"token was issued for {sub[:200]!r}, this endpoint is "
                                              f"{url!r}: check WEBHOOK_PUBLIC_URL")
        claim = claims.get("body")
        if not isinstance(claim, str) or claim.rstrip("=") != body_hash(body):
            raise SignatureError("body_changed", "the body's SHA-256 does not match the signed hash: the body was "
                                                 "changed after signing")
        # Every check passed: only reachable for a body the Receiver cannot take as str (not UTF-8).


class Publisher:
    """Publishes webhook bodies to the endpoint through QStash (the official ``AsyncQStash`` client).

    Args:
        token: ``QSTASH_TOKEN``.
        base_url: ``QSTASH_URL`` (the devstack broker offline).
        destination: the endpoint's public URL (``WEBHOOK_PUBLIC_URL``).
    """

    def __init__(self, token: str, *, base_url: str, destination: str, retries: int | None = 3) -> None:
        self._client = AsyncQStash(token, base_url=base_url)
        self.base_url = base_url
        self.destination = destination
        self.retries = retries

    @classmethod
    def from_settings(cls, settings: Settings, *, destination: str | None = None) -> Publisher:
        settings.require("QSTASH_TOKEN")
        dest = destination or settings.webhook_public_url
        if not dest:
            raise ConfigError("WEBHOOK_PUBLIC_URL", "is not set: QStash needs the endpoint's public URL",
                              "https://whatrack.example.com/api/v1/webhooks/qstash/whatsapp")
        assert settings.qstash_token is not None
        return cls(settings.qstash_token.reveal(), base_url=settings.qstash_url, destination=dest)

    async def publish_webhook(self, body: bytes | str | dict[str, Any], *, dedup_id: str | None = None,
                              retries: int | None = None, delay: int | None = None) -> str:
        """Publish one webhook body; return QStash's message id.

        Raises:
            PublishError: QStash refused or could not be reached (after the SDK's own transport retries).
        """
        if isinstance(body, dict):
            body = json.dumps(body, ensure_ascii=False)
        try:
            res = await self._client.message.publish(
                url=self.destination, body=body, content_type="application/json", deduplication_id=dedup_id,
                retries=self.retries if retries is None else retries, delay=delay)
        except Exception as e:  # QStashError, RateLimitExceededError, httpx transport errors
            raise PublishError(f"QStash publish to {self.destination} failed: {_safe(e)}") from e
        assert not isinstance(res, list)
        return res.message_id

    async def states(self, message_ids: Sequence[str]) -> dict[str, str]:
        """The latest QStash event state per message id (``DELIVERED``, ``FAILED``, ``RETRY``, ...).

        Raises:
            PublishError: QStash could not be asked.
        """
        from qstash.log import LogFilter

        latest: dict[str, tuple[int, str]] = {}
        for i in range(0, len(message_ids), 100):
            chunk = list(message_ids[i:i + 100])
            cursor: str | None = None
            while True:
                try:
                    res = await self._client.log.list(cursor=cursor, count=1000,
                                                      filter=LogFilter(message_ids=chunk))
                except Exception as e:
                    raise PublishError(f"QStash events could not be read: {_safe(e)}") from e
                for ev in res.logs:
                    prev = latest.get(ev.message_id)
                    # Newest wins; within the same millisecond a settled state wins (a broker writes ERROR and
                    # FAILED in one step, and lists newest first).
                    if prev is None or ev.time > prev[0] or (ev.time == prev[0] and ev.state.value in SETTLED_STATES):
                        latest[ev.message_id] = (ev.time, ev.state.value)
                cursor = res.cursor
                if not cursor or not res.logs:
                    break
        return {k: v[1] for k, v in latest.items()}

    async def wait_settled(self, message_ids: Sequence[str], *, timeout: float = 60.0) -> dict[str, str]:
        """Wait until every message is DELIVERED or FAILED (or ``timeout`` passes); return the states."""
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            states = await self.states(message_ids)
            if all(states.get(m) in SETTLED_STATES for m in message_ids) or time.monotonic() > deadline:
                return states
            await asyncio.sleep(0.1)

    async def aclose(self) -> None:
        """Close the SDK's HTTP connections (the SDK itself has no close method)."""
        await self._client.http._client.aclose()

    @property
    def client(self) -> AsyncQStash:
        """The underlying official client (events, DLQ, keys) for notebooks and the ledger."""
        return self._client


def _safe(e: BaseException) -> str:
    text = str(e)
    return text[:300] if "Bearer" not in text else type(e).__name__

