"""``whatrack stack up|down|status|env``: the offline stack from the command line.

The stack directory is ``runs/.stack`` unless ``WHATRACK_STACK_DIR`` says otherwise (read here, at the CLI edge,
and nowhere in the library).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from whatrack.devstack import guard
from whatrack.devstack.stack import DEFAULT_DIR, PARTS, Stack
from whatrack.errors import StackError

ENV_HELP = ("print `export NAME='value'` lines for a shell to source: eval \"$(whatrack stack env)\". "
            "This prints the stack's secrets, on purpose, to your own terminal; do not pipe it into logs.")


def _stack_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir or os.environ.get("WHATRACK_STACK_DIR") or DEFAULT_DIR)


def _database_url() -> str | None:
    from whatrack.settings import Settings

    return Settings.from_env(env_files=()).database_url


def _parts(spec: str | None, without: str | None) -> list[str] | None:
    if not spec and not without:
        return None
    chosen = [p.strip() for p in (spec or ",".join(PARTS)).split(",") if p.strip()]
    skip = {p.strip() for p in (without or "").split(",") if p.strip()}
    return [p for p in chosen if p not in skip]


def cmd_up(args: argparse.Namespace) -> int:
    stack = Stack(_stack_dir(args), database_url=_database_url())
    if stack.is_up():
        print(f"stack already running in {stack.dir}")
        _print_status(stack)
        return 0
    t0 = time.monotonic()
    with guard.disabled():  # the stack outlives this command: `whatrack stack down` stops it
        stack.up(parts=_parts(args.parts, args.without), time_scale=args.time_scale)
    print(f"stack up in {time.monotonic() - t0:.1f} s in {stack.dir}; settings in {stack.env_path} "
          "(source them with: eval \"$(whatrack stack env)\")")
    _print_status(stack)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = Stack(_stack_dir(args))
    stopped = stack.down()
    print(f"stack in {stack.dir} stopped ({len(stopped)} processes)" if stopped else
          f"no running stack in {stack.dir}")
    return 0


def _print_status(stack: Stack) -> int:
    rows = stack.status()
    if not rows:
        print(f"no stack in {stack.dir}: run `whatrack stack up`")
        return 1
    table: list[tuple[Any, ...]] = [("PART", "PID", "PORT", "HEALTH", "URL / DETAIL (binary, why down)")]
    table += [(r.name, r.pid or "-", r.port or "-", r.health, "  ".join(x for x in (r.url, r.detail) if x))
              for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + str(row[4]))
    return 0 if all(r.health in ("up", "missing", "external") for r in rows) else 1


def cmd_status(args: argparse.Namespace) -> int:
    return _print_status(Stack(_stack_dir(args)))


def cmd_env(args: argparse.Namespace) -> int:
    stack = Stack(_stack_dir(args))
    env = stack.env()
    dead = stack.dead()
    if dead:  # settings that point at dead processes would only fail later, further from the cause
        raise StackError(f"the stack in {stack.dir} is partly down ({', '.join(dead)} stopped running): run "
                         "`whatrack stack up` to restart it, then `whatrack stack env` again")
    sys.stdout.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())))
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``stack up|down|status|env`` to the ``whatrack`` command."""
    stack = subparsers.add_parser("stack", help="the offline stack (Redis x3, PostgreSQL, QStash, Upstash REST, "
                                                "Centrifugo, UAZAPI, fault proxies) on loopback")
    sub = stack.add_subparsers(dest="stack_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", help="stack directory (default: $WHATRACK_STACK_DIR or runs/.stack)")

    up = sub.add_parser("up", help="start the stack (reports the running one if it is up)")
    common(up)
    up.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PARTS)}")
    up.add_argument("--without", help="comma-separated parts to leave out")
    up.add_argument("--time-scale", type=float, default=1.0, help="QStash broker time scale (retries, delays)")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop what `up` started and remove the state")
    common(down)
    down.set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="each part with its pid, port, health (probed now) and, for the Redis "
                                           "parts, the server binary and version its process runs")
    common(status)
    status.set_defaults(func=cmd_status)
    env = sub.add_parser("env", help=ENV_HELP, description=ENV_HELP)
    common(env)
    env.set_defaults(func=cmd_env)
