"""Logging set-up for the CLI and notebooks (the package itself never configures the root logger).

:class:`RedactingFilter` replaces every known secret value in a record's final message, a last line of defence behind
the rule that nothing logs a secret in the first place. :func:`expected` takes the log lines a negative test provokes
on purpose (a forged request's ``signature rejected``) out of the output, for the notebook to show them as evidence.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator

from whatrack.settings import MASK

# Token-shaped strings: JWTs (QStash signatures), QStash signing keys.
_TOKEN_SHAPES = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}|sig_[A-Za-z0-9]{16,}")


class RedactingFilter(logging.Filter):
    """Masks the given secret values and token-shaped strings in every record it sees."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, MASK)
        return _TOKEN_SHAPES.sub(MASK, text)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        red = self.redact(msg)
        if red != msg:
            record.msg, record.args = red, None
        return True


def configure(level: str | int = "INFO", secrets: Iterable[str] = ()) -> None:
    """Configure the root logger once: one line per record, secrets redacted."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "asyncio", "aiosqlite", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Expected(logging.Filter):
    """Takes the records of ``prefix`` loggers whose message contains ``text`` (already redacted when a
    :class:`RedactingFilter` ran first) into ``lines`` instead of letting the handler write them."""

    def __init__(self, prefix: str, text: str, lines: list[str]) -> None:
        super().__init__()
        self.prefix, self.text, self.lines = prefix, text, lines
        self._redact = RedactingFilter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == self.prefix or record.name.startswith(self.prefix + ".")):
            return True
        msg = record.getMessage()
        if self.text not in msg:
            return True
        line = f"{record.levelname} {record.name} {self._redact.redact(msg)}"
        if len(self.lines) < 1000:  # a storm of one line stays bounded
            self.lines.append(line)
        return False


@contextlib.contextmanager
def expected(logger: str, text: str) -> Iterator[list[str]]:
    """The log lines a negative test provokes on purpose, as evidence instead of output.

    Within the block, records of ``logger`` (and its children) whose message contains ``text`` are not written by
    the root logger's handlers (nor by logging's last-resort stderr handler) but collected, one
    ``"LEVEL logger message"`` line each, into the yielded list. Every other record is logged as usual, so an
    unexpected warning still shows.

    Example::

        with logs.expected("whatrack.webhook", "signature rejected") as rejected:
            forged = await http.post(url, content=body, headers={"upstash-signature": "not.a.signature"})
        assert forged.status_code == 401 and rejected  # the rejection was logged, and is shown as evidence
    """
    lines: list[str] = []
    flt = _Expected(logger, text, lines)
    handlers = list(logging.getLogger().handlers)
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for h in handlers:
        h.addFilter(flt)
    try:
        yield lines
    finally:
        for h in handlers:
            h.removeFilter(flt)
