"""The ``whatrack`` command. Each subcommand lives in its subpackage's ``cli`` module; this file only wires them.

Exit codes: 0 all good; 1 the work found a failure (a verdict, a check); 2 a usage or configuration error. Every
failure prints one line that says what failed and what to do.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from whatrack import __version__
from whatrack.errors import WhatrackError

log = logging.getLogger("whatrack.cli")

#: The command module behind each top-level command: its subpackage's ``cli``. Each defines
#: ``add_commands(subparsers)``; a subcommand's parser sets ``func``, a callable taking the parsed args and returning
#: the exit code. Only the module behind the command being run is imported, so ``whatrack normalize`` does not pay for
#: importing papermill and bullmq. A command module imports the code it drives when the command runs.
COMMANDS = {
    "run": "whatrack.runs.cli", "report": "whatrack.runs.cli", "lab": "whatrack.runs.cli",
    "stack": "whatrack.devstack.cli",
    "serve": "whatrack.webhook.cli",
    "instances": "whatrack.store.cli", "db": "whatrack.store.cli", "leads": "whatrack.store.cli",
    "normalize": "whatrack.uazapi.cli",
    "worker": "whatrack.followups.cli", "followup": "whatrack.followups.cli",
    "migrate": "whatrack.migration.cli",
    "loadtest": "whatrack.proof.cli", "faults": "whatrack.proof.cli", "replay": "whatrack.proof.cli",
    "dlq": "whatrack.proof.cli",
    "alerts": "whatrack.alerts.cli",
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``whatrack`` parser: with a known command in ``argv``, only that command's module is imported; without
    one (``whatrack --help``, ``whatrack``), every command module is, to list them all."""
    parser = argparse.ArgumentParser(prog="whatrack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"whatrack {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    modules = [COMMANDS[wanted]] if wanted else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_commands(sub)
    return parser


def stop_on_sigterm() -> None:
    """Make SIGTERM act as Ctrl-C (SIGINT), so every command's ``finally`` and ``with`` blocks stop its children
    (JupyterLab, kernels, endpoints, a devstack it brought up). A second SIGTERM during that clean-up is ignored:
    the clean-up itself ends in SIGKILL for whatever does not stop (:mod:`whatrack.devstack.process`)."""

    def on_term(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        on_int = signal.getsignal(signal.SIGINT)
        if callable(on_int) and on_int is not signal.default_int_handler:
            on_int(signal.SIGINT, frame)  # type: ignore[arg-type]  # asyncio.run's: cancels the main task
            return
        raise KeyboardInterrupt  # as Ctrl-C does (also when SIGINT is ignored, as in a script's background job)

    signal.signal(signal.SIGTERM, on_term)


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Run a script's ``main`` (the benchmarks) as a command runs: SIGTERM acts as Ctrl-C, so its ``finally`` blocks
    stop the servers it started (and a guard process stops them if it is killed); interrupted, it exits with one line
    instead of a traceback."""
    from whatrack.devstack import guard

    stop_on_sigterm()
    guard.enable()
    try:
        code = main()
    except KeyboardInterrupt:
        sys.exit("interrupted: servers stopped")
    sys.exit(code or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from whatrack import logs
    from whatrack.errors import ConfigError
    from whatrack.settings import Settings

    try:  # redact the configured secrets' values from every log line, not only token-shaped strings
        secrets = Settings.from_env().secret_values()
    except ConfigError:
        secrets = []  # the command itself will report the bad setting
    logs.configure("DEBUG" if args.verbose else "INFO", secrets)
    stop_on_sigterm()
    # A command killed outright (SIGKILL, the OOM killer) skips its clean-up: the servers it started (the devstack
    # of `whatrack run`, `lab` or `faults`) are stopped by a guard process. `whatrack stack up` opts out: its stack is
    # meant to outlive it.
    from whatrack.devstack import guard

    guard.enable()
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
