"""Human durations for the command line (``10m``, ``1h30m``, ``500ms``, ``2d``, or bare seconds ``90``). Pure."""

from __future__ import annotations

import re

# "ms" before "m" and "s": the longest unit must win at each position.
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|d|h|m|s)")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def parse_seconds(text: str) -> float:
    """The duration ``text`` in seconds.

    Raises:
        ValueError: not a duration (the message shows good ones).
    """
    s = text.strip().lower()
    if _NUMBER.fullmatch(s):
        return float(s)
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"not a duration: {text!r}; use e.g. 10m, 1h30m, 45s, 500ms, 2d or plain seconds")
    return total
