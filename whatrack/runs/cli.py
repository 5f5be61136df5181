"""``whatrack run``, ``whatrack report`` and ``whatrack lab`` (what they do: :mod:`whatrack.runs.execute`).

Building the parser imports nothing heavy: papermill, nbformat and the devstack are imported by the command that runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from whatrack.runs.defaults import DEFAULT_CELL_TIMEOUT, DEFAULT_TIME_SCALE


def _cmd_run(args: argparse.Namespace) -> int:
    from whatrack.errors import RunError
    from whatrack.runs.execute import execute

    # One progress line per phase is ours; papermill's and nbconvert's chatter (alt text hints) is not.
    logging.getLogger("papermill").setLevel(logging.WARNING)
    logging.getLogger("traitlets").setLevel(logging.ERROR)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        outcome = execute(args.phases, assignments=args.param, notebook_dir=args.notebooks,
                          runs_dir=args.runs_dir, stack_dir=args.stack_dir, use_stack=not args.no_stack,
                          cell_timeout=args.cell_timeout, progress=progress, time_scale=args.time_scale)
    except RunError as e:
        print(f"whatrack run: {e}", file=sys.stderr)
        return 2
    if not outcome.ok:
        print(f"whatrack run: {outcome.data['failure']}; see {outcome.index}", file=sys.stderr)
        return 1
    print(outcome.index)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from whatrack.errors import RunError
    from whatrack.runs.execute import rerender

    try:
        if args.compare:
            from whatrack.runs import compare

            run_a, run_b = args.compare
            out = args.output or run_b.parent / "compare" / f"{run_a.name}_vs_{run_b.name}"
            print(compare.write_comparison(out, compare.compare(compare.load_run(run_a), compare.load_run(run_b))))
            return 0
        if args.run_dir is None:
            print("whatrack report: give RUN_DIR, or --compare RUN_A RUN_B", file=sys.stderr)
            return 2
        print(rerender(args.run_dir))
    except RunError as e:
        print(f"whatrack report: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_lab(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    from whatrack.runs.execute import default_notebook_dir, lab_command, run_environment

    nb_dir = args.notebooks or default_notebook_dir()
    settings_dir = tempfile.TemporaryDirectory(prefix="whatrack-lab-")  # JupyterLab's overrides, for this session
    cmd = lab_command(nb_dir, Path(settings_dir.name), no_browser=args.no_browser)
    with settings_dir, run_environment(dict(os.environ), use_stack=not args.no_stack,
                                       stack_dir=args.stack_dir) as (env, how):
        print(f"whatrack lab: devstack {how}", file=sys.stderr)
        proc = subprocess.Popen(cmd, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (whatrack.cli turns it into this)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            print("whatrack lab: interrupted; JupyterLab stopped", file=sys.stderr)
            return 130  # the shell's code for "stopped by a signal", not success


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``report`` and ``lab`` to the ``whatrack`` command."""
    p = sub.add_parser("run", help="execute the phase notebooks into runs/<id>/ and write its index.html")
    p.add_argument("phases", nargs="*", metavar="PHASE", help="phases to run (default: all), e.g. 00 10 or rollback")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set a notebook parameter (PHASE.NAME=VALUE for one phase); repeatable")
    p.add_argument("--notebooks", type=Path, default=None, help="directory of the phase notebooks")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="parent of the run directory (runs)")
    p.add_argument("--stack-dir", type=Path, default=None, help="devstack directory (default runs/.stack)")
    p.add_argument("--no-stack", action="store_true", help="do not start the offline devstack; use the environment")
    p.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT, help="seconds one cell may take")
    p.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE,
                   help="devstack broker retry delays x this, when the run starts the stack (1.0: QStash's own)")
    p.set_defaults(func=_cmd_run)

    r = sub.add_parser("report", help="re-render a run's index.html and run.json from its files, or compare two runs")
    r.add_argument("run_dir", type=Path, metavar="RUN_DIR", nargs="?")
    r.add_argument("--compare", type=Path, nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="write compare.html and compare.json: each verdict and headline figure of A and B, changes")
    r.add_argument("-o", "--output", type=Path, default=None,
                   help="directory of the comparison (default: RUN_B's parent/compare/A_vs_B)")
    r.set_defaults(func=_cmd_report)

    lab = sub.add_parser("lab", help="open JupyterLab on the notebooks with the devstack's environment loaded")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser (print the URL)")
    lab.add_argument("--notebooks", type=Path, default=None, help="directory of the phase notebooks")
    lab.add_argument("--stack-dir", type=Path, default=Path("runs/.stack"), help="devstack directory")
    lab.add_argument("--no-stack", action="store_true", help="do not start the offline devstack")
    lab.set_defaults(func=_cmd_lab)
