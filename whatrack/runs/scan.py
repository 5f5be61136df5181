"""The secrets scan: no file a run wrote may hold a secret value or a token-shaped string.

Every file under a run directory is read as bytes and searched for each secret value (as given, URL-quoted as in a
URL, HTML- and JSON-escaped as in a report or a notebook file) and for token shapes: JWTs (``eyJ...``, QStash
signatures), QStash signing keys (``sig_...``) and ``Bearer`` credentials. A finding names the file, the notebook cell
for ``.ipynb`` files, and the kind of match, never the matched text. :func:`redact` then removes what was found, so
that a failed run leaves no secret on disk.
"""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from whatrack.settings import MASK

log = logging.getLogger("whatrack.runs.scan")

#: Values shorter than this are not searched for: a 3-character "secret" matches everywhere and proves nothing.
MIN_SECRET_LEN = 6

#: Token shapes, each with the name a finding reports. The JWT needs its three dot-separated parts, which base64 image
#: data (no dots) never forms; ``sig_`` cannot occur in base64 (no underscore in its alphabet).
TOKEN_SHAPES: tuple[tuple[str, re.Pattern[bytes]], ...] = (
    ("JWT-shaped token", re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    ("QStash signing key (sig_...)", re.compile(rb"sig_[A-Za-z0-9]{16,}")),
    ("Bearer credential", re.compile(rb"Bearer\s+[A-Za-z0-9._~+/=-]{12,}")),
)


@dataclass(frozen=True)
class Finding:
    """One hit: where it is and what kind of thing it is (never the thing itself).

    Attributes:
        file: path relative to the scanned directory.
        kind: ``secret value`` or the token shape's name.
        cell: for ``.ipynb`` files, the execution count (``In [N]``) of the cell the hit is in, when it is in an
            executed code cell (the same number the notebook, its HTML and the run's index show).
        setting: the environment name of the secret matched, when known (a name is not a secret).
    """

    file: str
    kind: str
    cell: int | None = None
    setting: str | None = None

    def describe(self) -> str:
        where = f"{self.file} cell {self.cell}" if self.cell is not None else self.file
        what = f"{self.kind} ({self.setting})" if self.setting else self.kind
        return f"{what} in {where}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _needles(secrets: Iterable[tuple[str | None, str]]) -> list[tuple[str | None, bytes]]:
    out: dict[bytes, str | None] = {}
    for name, value in secrets:
        if not value or len(value) < MIN_SECRET_LEN:
            continue
        # As written, URL-quoted (in a URL), HTML-escaped (rendered reports), JSON-escaped (notebook files).
        for form in {value, quote(value, safe=""), html.escape(value), json.dumps(value)[1:-1]}:
            out.setdefault(form.encode(), name)
    # Longest first, so that a secret containing another is reported (and redacted) whole.
    return sorted(((n, b) for b, n in out.items()), key=lambda t: len(t[1]), reverse=True)


def _hits(data: bytes, needles: Sequence[tuple[str | None, bytes]]) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for name, needle in needles:
        if needle in data:
            found.append(("secret value", name))
    for kind, pattern in TOKEN_SHAPES:
        if pattern.search(data):
            found.append((kind, None))
    return found


def _matches(data: bytes, kind: str, name: str | None, needles: Sequence[tuple[str | None, bytes]]) -> bool:
    if kind == "secret value":
        return any(n in data for nm, n in needles if nm == name)
    return any(p.search(data) for k, p in TOKEN_SHAPES if k == kind)


def _notebook_cells(data: bytes) -> list[tuple[int | None, bytes]] | None:
    """Each cell of a notebook file as (its execution count, the number ``In [N]`` shows, or None; its JSON)."""
    try:
        nb = json.loads(data)
        return [(c.get("execution_count"), json.dumps(c).encode()) for c in nb.get("cells", [])]
    except (ValueError, AttributeError):
        return None


def scan_dir(root: Path, secrets: Iterable[tuple[str | None, str]], *,
             exclude: Sequence[Path] = ()) -> list[Finding]:
    """Scan every file under ``root``.

    Args:
        root: the run directory.
        secrets: ``(setting name or None, value)`` pairs; values shorter than :data:`MIN_SECRET_LEN` are skipped.
        exclude: directories under ``root`` not to scan.

    Returns:
        The findings, empty when the directory is clean.
    """
    needles = _needles(secrets)
    findings: list[Finding] = []
    excluded = [e.resolve() for e in exclude]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if any(path.resolve().is_relative_to(e) for e in excluded):
            continue
        rel = str(path.relative_to(root))
        data = path.read_bytes()
        hits = _hits(data, needles)
        if not hits:
            continue
        cells = _notebook_cells(data) if path.suffix == ".ipynb" else None
        for kind, name in hits:
            cell_hits: list[int | None] = sorted(
                {n for n, cell in cells or [] if _matches(cell, kind, name, needles)}, key=lambda n: n or 0)
            findings.extend(Finding(rel, kind, n, name) for n in (cell_hits or [None]))
    for f in findings:
        log.warning("secrets scan: %s", f.describe())
    return findings


def redact(root: Path, findings: Sequence[Finding], secrets: Iterable[tuple[str | None, str]]) -> None:
    """Replace every secret value and token shape in the files named by ``findings`` with the mask, in place."""
    needles = _needles(secrets)
    for rel in sorted({f.file for f in findings}):
        path = root / rel
        data = path.read_bytes()
        for _, needle in needles:
            data = data.replace(needle, MASK.encode())
        for _, pattern in TOKEN_SHAPES:
            data = pattern.sub(MASK.encode(), data)
        path.write_bytes(data)
        log.info("secrets scan: redacted %s", rel)


def redact_text(text: str, secrets: Iterable[tuple[str | None, str]]) -> str:
    """``text`` with every secret value and token shape masked: for excerpts that go into a report."""
    data = text.encode()
    for _, needle in _needles(secrets):
        data = data.replace(needle, MASK.encode())
    for _, pattern in TOKEN_SHAPES:
        data = pattern.sub(MASK.encode(), data)
    return data.decode(errors="replace")
