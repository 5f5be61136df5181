"""Tiny throwaway phase notebooks and an in-process ``whatrack run|report|lab`` for the runs tests."""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat

from whatrack.runs import cli as runs_cli

PARAMS = "sample_size: int = 3  # messages\nlabel: str = 'x'  # a label\nratio: float = 0.5  # a ratio\n" \
         "dry_run: bool = True  # copy nothing"


def write_nb(path: Path, *cells: str, params: str = PARAMS, title: str = "Tiny phase") -> Path:
    """A phase notebook: a markdown title, a tagged parameters cell, then the cells given (``md:`` ones markdown)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\nWhat it does."), p,
                *(nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbformat.v4.new_code_cell(c)
                  for c in cells)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def cli(*argv: str) -> int:
    """``whatrack run|report|lab ARGV`` in this process; its exit code."""
    parser = argparse.ArgumentParser(prog="whatrack")
    runs_cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))
