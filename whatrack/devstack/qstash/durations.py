"""Pure parsers for the offline QStash broker: durations, retry-delay expressions, backoff, flow-control values.

No I/O here (protocols/qstash.md §1.3, §3.2, §3.8). Every parser raises :class:`HeaderError` with a message that names
the header, what was wrong and what a good value looks like; the broker turns it into a 400.
"""

from __future__ import annotations

import ast
import email.utils
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from whatrack.errors import WhatrackError

#: QStash caps every computed retry delay (default backoff, Retry-After & co) at one day (docs, retry page).
MAX_RETRY_DELAY_S = 86400.0


class HeaderError(WhatrackError):
    """A request header the broker cannot accept (answered with 400 and this text)."""

    def __init__(self, header: str, problem: str, example: str) -> None:
        self.header = header
        super().__init__(f"invalid {header} header: {problem} (example: {header}: {example})")


_QSTASH_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_QSTASH_DURATION = re.compile(r"(\d+)([smhd])")


def parse_duration_s(value: str, header: str) -> int:
    """A QStash duration (``10s``, ``1h30m3s``, ``1d10h30m``, or bare seconds ``45``) in whole seconds.

    Raises:
        HeaderError: not such a duration.
    """
    text = value.strip().lower()
    if text.isdigit():
        return int(text)
    pos, total = 0, 0
    for m in _QSTASH_DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _QSTASH_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise HeaderError(header, f"{value!r} is not a duration of s/m/h/d parts", "1h30m")
    return total


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration_s(text: str) -> float | None:
    """A Go-style duration (``6m5s``, ``1.5s``, ``300ms``) in seconds, or None if ``text`` is not one."""
    pos, total = 0, 0.0
    for m in _GO_DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return total if text and pos == len(text) else None


#: Response headers that tell QStash when to retry, in the order they are consulted (protocols/qstash.md §3.2).
RETRY_AFTER_HEADERS = ("retry-after", "x-ratelimit-reset", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")


def retry_after_s(headers: Mapping[str, str], now_s: float) -> float | None:
    """Seconds to wait as asked by a response's ``Retry-After`` (or rate-limit reset) header, or None.

    Each header may hold seconds, an RFC 1123 date or a Go duration; ``0`` means now. A value beyond one day (or one
    that cannot be read) is ignored, so the default backoff applies.
    """
    for name in RETRY_AFTER_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        text = raw.strip()
        wait: float | None
        try:
            wait = float(text)
        except ValueError:
            wait = parse_go_duration_s(text)
            if wait is None:
                try:
                    wait = email.utils.parsedate_to_datetime(text).timestamp() - now_s
                except (TypeError, ValueError, IndexError):
                    wait = None
        if wait is not None and math.isfinite(wait) and wait <= MAX_RETRY_DELAY_S:
            return max(0.0, wait)
    return None


def default_backoff_s(retried: int) -> float:
    """QStash's default wait before retry number ``retried`` (1 for the first retry): ``min(86400, e^(2.5·n))`` s."""
    return min(MAX_RETRY_DELAY_S, math.exp(min(2.5 * retried, 50.0)))


_FUNCS: dict[str, Callable[..., float]] = {
    "pow": lambda a, b: math.pow(a, b),
    "sqrt": math.sqrt,
    "abs": abs,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
    "round": round,
    "min": min,
    "max": max,
}
_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: math.pow(a, b),
}
_MAX_EXPR_LEN = 256


def _eval(node: ast.AST, retried: float) -> float:
    if isinstance(node, ast.Expression):
        return _eval(node.body, retried)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id == "retried":
        return retried
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval(node.operand, retried)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, retried), _eval(node.right, retried))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and node.args):
        return float(_FUNCS[node.func.id](*(_eval(a, retried) for a in node.args)))
    raise ValueError(f"{type(node).__name__} is not allowed")


def eval_retry_delay_ms(expression: str, retried: int) -> float:
    """Evaluate an ``Upstash-Retry-Delay`` expression (milliseconds) for ``retried`` (0 for the first retry).

    Only numbers, ``retried``, ``+ - * / % **`` and pow, sqrt, abs, exp, floor, ceil, round, min, max are allowed:
    the expression is walked as an AST, never passed to ``eval``.

    Raises:
        HeaderError: the expression is malformed, uses anything else, or does not give a finite number >= 0.
    """
    example = "pow(2, retried) * 1000"
    if len(expression) > _MAX_EXPR_LEN:
        raise HeaderError("Upstash-Retry-Delay", f"longer than {_MAX_EXPR_LEN} characters", example)
    try:
        value = _eval(ast.parse(expression.strip(), mode="eval"), float(retried))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError) as e:
        raise HeaderError("Upstash-Retry-Delay", f"cannot evaluate {expression!r}: {e}", example) from e
    if not math.isfinite(value) or value < 0:
        raise HeaderError("Upstash-Retry-Delay", f"{expression!r} gives {value}, not a delay", example)
    return value


@dataclass(frozen=True)
class FlowControl:
    """A message's flow-control limits: None means unlimited; ``period`` in seconds (default 1)."""

    key: str
    parallelism: int | None = None
    rate: int | None = None
    period: int = 1


def parse_flow_control(key: str, value: str | None) -> FlowControl:
    """Parse ``Upstash-Flow-Control-Value`` (``parallelism=P, rate=R, period=1h30m3s``; separators `,` or `, `).

    Raises:
        HeaderError: an unknown part or a bad number.
    """
    header = "Upstash-Flow-Control-Value"
    example = "parallelism=2, rate=10, period=1s"
    parts: dict[str, str] = {}
    for chunk in (value or "").split(","):
        chunk = chunk.strip()
        if not chunk:
            continue
        name, sep, val = chunk.partition("=")
        name = name.strip().lower()
        if not sep or name not in ("parallelism", "rate", "period"):
            raise HeaderError(header, f"unknown part {chunk!r}", example)
        parts[name] = val.strip()
    try:
        parallelism = int(parts["parallelism"]) if "parallelism" in parts else None
        rate = int(parts["rate"]) if "rate" in parts else None
    except ValueError as e:
        raise HeaderError(header, "parallelism and rate must be integers", example) from e
    period = parse_duration_s(parts["period"], header) if "period" in parts else 1
    if (parallelism is not None and parallelism < 1) or (rate is not None and rate < 1) or period < 1:
        raise HeaderError(header, "parallelism, rate and period must be at least 1", example)
    return FlowControl(key=key, parallelism=parallelism, rate=rate, period=period)


def parse_bool(value: str | None) -> bool:
    """A header boolean: ``true``/``True``/``1`` (py sends ``str(bool)``, JS sends ``true``)."""
    return (value or "").strip().lower() in ("true", "1", "yes")
