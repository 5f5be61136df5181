"""Realtime publication through Centrifugo's server API, with the official ``cent`` async client.

Each stored message is published to its conversation's channel (the PRD's ``publishNewMessage(conversationId,
{id, content, senderType, sentAt})``). The publication carries an ``idempotency_key`` derived from the message, so a
retried webhook (stored, then realtime failed, then redelivered) or two concurrent redeliveries publish once.

Browsers connect to Centrifugo over WebSocket (``CENTRIFUGO_WS_URL``) with tokens whatrack's backend mints:
:func:`connection_token` for a user and :func:`subscription_token` for one conversation channel (HS256 JWTs signed
with ``CENTRIFUGO_TOKEN_HMAC_SECRET_KEY``, Centrifugo's ``client.token.hmac_secret_key``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

import jwt
import msgspec
from aiohttp import ClientSession
from cent import (
    AsyncClient,
    BatchRequest,
    CentApiResponseError,
    CentDecodeError,
    CentError,
    HistoryRequest,
    PublishRequest,
)
from cent.dto import BatchResult, CentResult, Response
from pydantic import TypeAdapter

from whatrack.errors import ConfigError, PublishError
from whatrack.settings import Settings

log = logging.getLogger("whatrack.realtime")


def _complete_cent_models() -> tuple[type, ...]:
    """Build the schemas of cent's result models once, here, instead of on every reply.

    cent (5.x) defines its result models incomplete (pydantic's mock validators) and reads each reply with a new
    ``TypeAdapter``: every Centrifugo answer rebuilt the schema of every model it touched. Profiled in the endpoint:
    5.2 ms of CPU to read one 32-publication batch reply (about 10 % of the endpoint's CPU at saturation), 0.6 ms
    with the models completed. The parametrised ``Response[...]`` classes are kept too: pydantic's cache of
    parametrised generics holds them weakly, so without a reference each call made (and built) them anew.
    """
    import inspect

    from cent import dto
    from pydantic import BaseModel

    for obj in vars(dto).values():
        if (inspect.isclass(obj) and issubclass(obj, BaseModel) and obj is not BaseModel
                and not obj.__pydantic_complete__ and not obj.__pydantic_generic_metadata__["parameters"]):
            obj.model_rebuild()
    return (dto.Response[dto.BatchResult], dto.Response[dto.PublishResult], dto.Response[dto.HistoryResult])


_CENT_MODELS = _complete_cent_models()

#: One pydantic ``TypeAdapter`` per reply type, built on first use (see :class:`_Batch`).
_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(t: Any) -> TypeAdapter[Any]:
    a = _ADAPTERS.get(t)
    if a is None:
        a = _ADAPTERS[t] = TypeAdapter(t)
    return a


class _Batch(BatchRequest):
    """cent's ``BatchRequest``, its reply read with adapters built once instead of one new ``TypeAdapter`` per reply.

    cent 5.2 (``dto._validate_batch``) makes a ``TypeAdapter`` for each command of a batch reply, and each one
    builds its validator again (about 10 us each, measured; 3 ms for a full 300-publication batch): 4.5 % of the
    endpoint's CPU at saturation in a py-spy profile. The reply is read by the same rules and gives the same result:
    each command's reply validated as its result type, a reply that is an error (no result under the command's name)
    a ``KeyError``, as in cent.
    """

    def parse_response(self, content: str) -> Response[CentResult]:
        try:
            data = json.loads(content)
            replies = [_adapter(r.__returning__).validate_python(j[r.__api_method__])
                       for r, j in zip(self.requests, data["replies"], strict=False)]
            response: Response[CentResult] = _adapter(Response[BatchResult]).validate_python(
                {"result": {"replies": replies}})
        except ValueError as err:  # not JSON, or a reply that is not its result type (a ValidationError)
            raise CentDecodeError from err
        return response

#: Seconds per call: a realtime server slower than this fails the webhook (5xx) so QStash retries later, rather
#: than holding the delivery until QStash's own timeout.
TIMEOUT_S = 5.0
#: Lifetime of the tokens minted for browsers; Centrifugo asks the client for a fresh one when it runs out.
TOKEN_TTL_S = 3600


def _token_secret(settings: Settings) -> str:
    settings.require("CENTRIFUGO_TOKEN_HMAC_SECRET_KEY")
    assert settings.centrifugo_token_hmac_secret_key
    return settings.centrifugo_token_hmac_secret_key.reveal()


def _user(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError("a Centrifugo token needs a non-empty user id (the `sub` claim)")
    return user_id


def connection_token(settings: Settings, user_id: str, *, ttl_s: int = TOKEN_TTL_S, now: float | None = None) -> str:
    """A Centrifugo connection token (HS256 JWT with ``sub`` and ``exp``) for ``user_id``.

    Raises:
        ConfigError: ``CENTRIFUGO_TOKEN_HMAC_SECRET_KEY`` is not set.
        ValueError: ``user_id`` is empty.
    """
    issued = int(time.time() if now is None else now)
    claims = {"sub": _user(user_id), "iat": issued, "exp": issued + ttl_s}
    return jwt.encode(claims, _token_secret(settings), algorithm="HS256")


def subscription_token(settings: Settings, user_id: str, channel: str, *, ttl_s: int = TOKEN_TTL_S,
                       now: float | None = None) -> str:
    """A Centrifugo subscription token (``sub``, ``channel``, ``exp``): lets ``user_id`` subscribe to ``channel``.

    Raises:
        ConfigError: ``CENTRIFUGO_TOKEN_HMAC_SECRET_KEY`` is not set.
        ValueError: ``user_id`` or ``channel`` is empty.
    """
    if not channel:
        raise ValueError("a subscription token needs a channel")
    issued = int(time.time() if now is None else now)
    claims = {"sub": _user(user_id), "channel": channel, "iat": issued, "exp": issued + ttl_s}
    return jwt.encode(claims, _token_secret(settings), algorithm="HS256")


class Publishable(Protocol):
    """What :meth:`Realtime.publish_message` needs of a stored message (``store.StoredMessage`` has it)."""

    @property
    def channel(self) -> str: ...
    @property
    def provider_id(self) -> str: ...
    @property
    def realtime(self) -> dict[str, Any]: ...


_ENCODE = msgspec.json.Encoder()


def request_json(obj: Any) -> str:
    """The JSON text of a request cent sends (aiohttp's ``json_serialize``): msgspec writes the same JSON values as
    ``json.dumps`` (UTF-8 text where ``json.dumps`` escapes non-ASCII), for a batch of 64 publications in 14 us
    instead of 118 us; what msgspec refuses (a lone surrogate) goes to ``json.dumps`` as before."""
    try:
        return _ENCODE.encode(obj).decode()
    except (TypeError, ValueError, msgspec.MsgspecError):
        return json.dumps(obj)


class Realtime:
    """Publishes stored messages to Centrifugo. Build once per process; close with :meth:`aclose`."""

    def __init__(self, api_url: str, api_key: str, *, timeout: float = TIMEOUT_S) -> None:
        self._client = AsyncClient(api_url, api_key, timeout=timeout,
                                   session=ClientSession(json_serialize=request_json))
        self.api_url = api_url

    @classmethod
    def from_settings(cls, settings: Settings) -> Realtime:
        settings.require("CENTRIFUGO_API_URL", "CENTRIFUGO_API_KEY")
        assert settings.centrifugo_api_url and settings.centrifugo_api_key
        if not settings.centrifugo_api_url.rstrip("/").endswith("/api"):
            raise ConfigError("CENTRIFUGO_API_URL", "must be the server API base URL, ending in /api",
                              "https://centrifugo.example.com/api")
        return cls(settings.centrifugo_api_url, settings.centrifugo_api_key.reveal())

    async def publish_message(self, stored: Publishable) -> None:
        """Publish one stored message to its conversation channel.

        Raises:
            PublishError: Centrifugo unreachable, timed out, or refused (a retry may succeed).
        """
        started = time.perf_counter()
        req = PublishRequest(channel=stored.channel, data=stored.realtime,
                             idempotency_key=f"msg:{stored.provider_id}"[:256])
        try:
            await self._client.publish(req)
        except CentError as e:
            raise PublishError(f"Centrifugo publish to {stored.channel} failed: {type(e).__name__}: "
                               f"{str(e)[:200]}") from e
        except (OSError, TimeoutError) as e:
            raise PublishError(f"Centrifugo unreachable: {type(e).__name__}") from e
        log.debug("[realtime] published to %s in %.1f ms", stored.channel, (time.perf_counter() - started) * 1e3)

    async def publish_batch(self, items: list[tuple[str, dict[str, Any], str]]) -> list[bool]:
        """Publish ``(channel, data, idempotency_key)`` items in one ``batch`` call; which of them Centrifugo took.

        When Centrifugo refuses some commands of the batch (cent cannot read such a reply), each item is published
        on its own to learn which: the idempotency keys make the second attempt of an accepted one a no-op.

        Raises:
            PublishError: Centrifugo unreachable, timed out, or refused the whole call (a retry may succeed).
        """
        if not items:
            return []
        requests = [PublishRequest(channel=c, data=d, idempotency_key=k[:256]) for c, d, k in items]
        try:
            await self._client.batch(_Batch(requests=requests, parallel=True))
            return [True] * len(items)
        except (OSError, TimeoutError) as e:
            raise PublishError(f"Centrifugo unreachable: {type(e).__name__}") from e
        except (CentError, KeyError) as e:
            if not isinstance(e, KeyError | CentApiResponseError):
                raise PublishError(f"Centrifugo batch failed: {type(e).__name__}: {str(e)[:200]}") from e
        ok: list[bool] = []
        for req in requests:  # some replies were errors: find out which, one by one
            try:
                await self._client.publish(req)
                ok.append(True)
            except CentApiResponseError as e:
                log.warning("[realtime] Centrifugo refused a publication to %s: %s", req.channel, str(e)[:200])
                ok.append(False)
            except (CentError, OSError, TimeoutError) as e:
                raise PublishError(f"Centrifugo publish to {req.channel} failed: {type(e).__name__}") from e
        return ok

    async def history(self, channel: str, limit: int = 100) -> list[dict[str, Any]]:
        """The channel's recent publications (data dicts), oldest first, for checks and the loss ledger.

        Raises:
            PublishError: Centrifugo unreachable or refused.
        """
        try:
            res = await self._client.history(HistoryRequest(channel=channel, limit=limit))
        except (CentError, OSError, TimeoutError) as e:
            raise PublishError(f"Centrifugo history of {channel} failed: {type(e).__name__}") from e
        return [dict(p.data) for p in res.publications]

    async def aclose(self) -> None:
        await self._client.close()
