"""The one way whatrack writes a time: ISO-8601 in UTC with a ``Z``, as JavaScript's ``toISOString()`` does. Pure."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(t: datetime | float | None, timespec: str = "milliseconds") -> str:
    """``t`` as ``2026-12-04T13:10:06.123Z``; ``-`` for None.

    ``t`` is a datetime (naive ones are taken as UTC) or epoch milliseconds (Redis, BullMQ and QStash count in
    those). ``timespec`` is :meth:`datetime.isoformat`'s (``seconds``, ``milliseconds``, ``microseconds``, ``auto``).
    """
    if t is None:
        return "-"
    if isinstance(t, datetime):
        dt = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    else:
        dt = datetime.fromtimestamp(t / 1000, UTC)
    return dt.isoformat(timespec=timespec).replace("+00:00", "Z")


def now_iso(timespec: str = "seconds") -> str:
    """The current time, as :func:`iso` writes it."""
    return iso(datetime.now(UTC), timespec)
