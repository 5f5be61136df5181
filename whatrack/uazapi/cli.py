"""``whatrack normalize PATH...``: each UAZAPI webhook file's normalized event as one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from whatrack.errors import PayloadError
from whatrack.uazapi.normalizer import normalize, parse_body


def normalize_file(path: Path) -> dict[str, Any]:
    """One output line of ``whatrack normalize``: the event's JSON with ``file``, or an ``error`` line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        return {"file": str(path), "event": "error", "error": f"unreadable: {e.strerror or e}"}
    try:
        event = normalize(parse_body(raw))
    except PayloadError as e:
        return {"file": str(path), "event": "error", "error": f"{e.reason}: {e.detail}"}
    return {"file": str(path), **event.to_json()}


def _cmd_normalize(args: argparse.Namespace) -> int:
    failed = 0
    out = sys.stdout
    for p in args.paths:
        line = normalize_file(Path(p))
        failed += line["event"] == "error"
        # Lone surrogates (valid JSON escapes) cannot be UTF-8 encoded: write them back as the JSON escape they were.
        text = json.dumps(line, ensure_ascii=False, default=str) + "\n"
        out.buffer.write(text.encode("utf-8", "backslashreplace")) if hasattr(out, "buffer") else out.write(text)
    out.flush()
    return 1 if failed else 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``whatrack normalize PATH...``: print each webhook file's normalized event as one JSON line."""
    p = subparsers.add_parser("normalize", help="normalize UAZAPI webhook JSON files (one JSON line per file)",
                              description="Print each file's normalized event as a JSON line; exit 1 if any file "
                              "cannot be normalized (its line has event=error).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="webhook body files (raw JSON as UAZAPI posts it)")
    p.set_defaults(func=_cmd_normalize)
