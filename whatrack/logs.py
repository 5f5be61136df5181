"""Logging set-up for the CLI and notebooks (the package itself never configures the root logger).

:class:`RedactingFilter` replaces every known secret value in a record's final message, a last line of defence behind
the rule that nothing logs a secret in the first place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

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
