"""The ``whatrack`` command. Each subcommand lives in the module it drives; this file only wires them.

Exit codes: 0 all good; 1 the work found a failure (a verdict, a check); 2 a usage or configuration error. Every
failure prints one line that says what failed and what to do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from whatrack import __version__
from whatrack.errors import WhatrackError

log = logging.getLogger("whatrack.cli")

#: Modules that add subcommands: each defines ``add_commands(subparsers)``; a subcommand's parser sets ``func``,
#: a callable taking the parsed args and returning the exit code.
COMMAND_MODULES = (
    "whatrack.runs",          # run, report, lab
    "whatrack.devstack.cli",  # stack up|down|status|env
    "whatrack.app",           # serve
    "whatrack.replay",        # replay (the fixtures through the endpoint)
    "whatrack.store",         # instances add|list, db upgrade
    "whatrack.uazapi",        # normalize
    "whatrack.followups",     # worker, followup schedule
    "whatrack.migration",     # migrate probe|inventory|copy|verify|rollback
    "whatrack.loadtest",      # loadtest
    "whatrack.alerts",        # alerts check
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whatrack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"whatrack {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # a part not built yet
            raise
        mod.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from whatrack import logs

    logs.configure("DEBUG" if args.verbose else "INFO")
    try:
        return int(args.func(args) or 0)
    except WhatrackError as e:
        print(f"whatrack {args.command}: {e}", file=sys.stderr)
        return 2 if type(e).__name__ == "ConfigError" else 1
    except KeyboardInterrupt:
        print(f"whatrack {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
