"""Defensive readers for webhook fields: every value may be missing or of the wrong type, none of them raises.

Pure functions used by the UAZAPI (and Evolution) normalizers: strings, booleans sent as ``"False"``, numbers sent as
strings, JIDs with device suffixes, and timestamps in seconds, milliseconds or ISO-8601 (protocols/uazapi.md §8, §9).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

#: The shared empty mapping returned for a missing or mistyped object (read-only: nobody can fill it by mistake).
EMPTY: Mapping[str, Any] = MappingProxyType({})

#: WhatsApp message ids are 20-40 characters (``AC`` + 32 hex from phones, ``3EB0`` + 18 from web); anything longer
#: than this is not an id, and would only fail later in the database.
MAX_ID_CHARS = 128

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NON_DIGITS = re.compile(r"[^0-9]+")
_TRUE = frozenset({"true", "1", "yes", "t", "y"})
# Epoch values below 1e11 are seconds (1e11 s is the year 5138; 1e11 ms is 1973), per S6's parseTimestamp; the
# same factor-of-1000 steps then separate milliseconds, microseconds and nanoseconds.
_SECONDS_BELOW, _MILLIS_BELOW, _MICROS_BELOW = 1e11, 1e14, 1e17
# Longer digit strings are not timestamps, ids or sizes (and int() refuses more than 4300 digits anyway).
_MAX_NUMBER_CHARS = 40


def as_str(value: Any) -> str | None:
    """A non-blank string, stripped (for ids, JIDs, names of things); anything else is None."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def as_text(value: Any) -> str | None:
    """A non-empty string kept verbatim (message text: no stripping); anything else is None."""
    return value if isinstance(value, str) and value else None


def as_dict(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else the shared empty mapping."""
    return value if isinstance(value, dict) else EMPTY


def as_bool(value: Any) -> bool:
    """True for ``true``, ``"True"``/``"true"``/``"1"``, and non-zero numbers; False for anything else (§9)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0 and not (isinstance(value, float) and math.isnan(value))
    if isinstance(value, str):
        return value.strip().lower() in _TRUE
    return False


def as_int(value: Any) -> int | None:
    """A non-negative integer from an int, a whole float or a digit string (protobuf longs arrive as strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value >= 0 and value.is_integer() else None
    if isinstance(value, str):
        s = value.strip()
        if 0 < len(s) <= _MAX_NUMBER_CHARS and s.isascii() and s.isdigit():
            return int(s)
    return None


def as_float(value: Any) -> float | None:
    """A finite float from a number or a numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        f = float(value) if not isinstance(value, int) or abs(value) < 2**53 else None
    elif isinstance(value, str) and 0 < len(value) <= _MAX_NUMBER_CHARS:
        try:
            f = float(value)
        except ValueError:
            return None
    else:
        return None
    return f if f is not None and math.isfinite(f) else None


def bare_id(value: Any) -> str | None:
    """A bare WhatsApp message id: ``"<owner>:<messageid>"`` loses its prefix; blank or non-string → None."""
    s = as_str(value)
    if s is None:
        return None
    return s.rpartition(":")[2].strip() or None


def bare_jid(jid: str) -> str:
    """A JID without its device suffix: ``138401042923712:2@lid`` → ``138401042923712@lid`` (§4)."""
    user, at, server = jid.strip().partition("@")
    if ":" in user:
        user = user.partition(":")[0]
    return f"{user}{at}{server}"


def phone_digits(value: str | None) -> str | None:
    """Digits only: ``"+55 11 98888-7777"`` → ``5511988887777``; a JID loses its server and device suffix."""
    if not value:
        return None
    user = value.partition("@")[0]
    if "@" in value and ":" in user:
        user = user.partition(":")[0]
    digits = _NON_DIGITS.sub("", user)
    return digits or None


def pn_jid(value: Any) -> str | None:
    """``value`` as a bare phone-number JID (``<digits>@s.whatsapp.net``), or None if it is not one (a LID, a group)."""
    s = as_str(value)
    if s is None or "@" not in s:
        return None
    jid = bare_jid(s)
    user, _, server = jid.partition("@")
    if server.lower() not in ("s.whatsapp.net", "c.us") or not phone_digits(user):
        return None
    return jid


def skip_reason(chat_jid: str) -> str | None:
    """Why a chat is not a conversation to store (status posts, broadcast lists, channels), or None (§4, §13)."""
    server = chat_jid.rpartition("@")[2].lower()
    if chat_jid == "status@broadcast":
        return "status_broadcast: a status post, not a conversation"
    if server == "broadcast":
        return "broadcast_list: a broadcast list copy (each recipient's chat gets its own message)"
    if server == "newsletter":
        return "newsletter: channel posts are not conversations"
    return None


def timestamp(value: Any) -> datetime | None:
    """An aware UTC datetime from epoch seconds / ms / µs / ns (number or digit string) or an ISO-8601 string.

    Zero, negative, non-finite, out-of-range and unparseable values give None (§8).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        s = value.strip()
        if not s or len(s) > _MAX_NUMBER_CHARS:
            return None
        if s.isascii() and s.replace(".", "", 1).isdigit():
            value = float(s) if "." in s else int(s)
        else:
            return _iso(s)
    if not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value <= 0:
        return None
    try:
        if value < _SECONDS_BELOW:
            return _EPOCH + timedelta(seconds=value)
        if value < _MILLIS_BELOW:
            return _EPOCH + timedelta(milliseconds=value)
        if value < _MICROS_BELOW:
            return _EPOCH + timedelta(microseconds=value)
        return _EPOCH + timedelta(microseconds=value / 1000)
    except OverflowError:
        return None


def _iso(s: str) -> datetime | None:
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except (OverflowError, ValueError):
        return None
