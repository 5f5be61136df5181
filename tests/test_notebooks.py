"""The committed phase notebooks: their shape (papermill's contract, no outputs, no definitions), an nbval smoke run,
and the whole suite executed through ``whatrack run`` against the offline devstack."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from whatrack.runs import execute as runs
from whatrack.runs import params as runs_params
from whatrack.runs import scan as runs_scan

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PHASES = ("00_prepare", "10_redis_migration", "20_qstash_integration", "30_validation", "40_rollback",
          "90_acceptance")
SECRET_NAMES = ("token", "key", "password", "secret", "signature")


def load(phase: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{phase}.ipynb", as_version=4)


def python_of(cell_source: str) -> ast.Module:
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(cell_source))


# -- shape ---------------------------------------------------------------------------------------------------------


def test_the_phase_notebooks_are_all_there() -> None:
    assert tuple(runs.discover(NOTEBOOKS)) == PHASES


@pytest.mark.parametrize("phase", PHASES)
def test_committed_without_outputs_or_execution_counts(phase: str) -> None:
    nb = load(phase)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: strip them (nbstripout)"
            assert cell.execution_count is None, f"cell {i} has an execution count"
    assert "papermill" not in nb.metadata, "an executed copy was committed"
    nbformat.validate(nb)


@pytest.mark.parametrize("phase", PHASES)
def test_opens_with_markdown_then_a_typed_parameters_cell(phase: str) -> None:
    nb = load(phase)
    intro = nb.cells[0]
    assert intro.cell_type == "markdown" and intro.source.startswith("# ")
    for part in ("**Purpose.**", "**Inputs.**", "**Outputs.**", "**Pass**"):
        assert part in intro.source, f"the opening cell says nothing about {part}"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1], "exactly one cell tagged 'parameters', right after the markdown"
    assert tagged[0] != len(nb.cells) - 1
    src = nb.cells[1].source
    tree = python_of(src)
    assert tree.body and all(isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) for s in tree.body), \
        "every parameter is `name: type = default  # help`"
    for line in src.splitlines():
        assert "  # " in line, f"parameter without a help comment: {line}"
    declared = runs_params.declared(NOTEBOOKS / f"{phase}.ipynb")
    assert len(declared) == len(tree.body)
    for p in declared.values():
        assert p.type_name in ("int", "float", "bool", "str"), f"{p.name}: annotate with a simple type"
        assert p.help, p.name
        assert not any(s in p.name.lower() for s in SECRET_NAMES), f"{p.name}: secrets are never parameters"
        ast.literal_eval(p.default)  # a literal, not an expression that reads something


@pytest.mark.parametrize("phase", PHASES)
def test_calls_the_package_defines_nothing_asserts_and_records(phase: str) -> None:
    nb = load(phase)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    for src in code:
        for node in ast.walk(python_of(src)):
            assert not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda), \
                f"a definition in a notebook cell: move it into the package\n{src}"
    joined = "\n".join(code)
    assert "assert " in joined, "verdicts are assertions"
    assert f'runs.record("{phase}"' in joined, "the phase records its results"
    assert "plt.show()" in joined or "display(fig)" in joined, "a phase shows at least one plot"


def test_no_token_shaped_string_is_committed_in_a_notebook() -> None:
    assert runs_scan.scan_dir(NOTEBOOKS, []) == []


# -- execution against the devstack ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def devstack(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Path]:
    """One offline devstack for the module's executions (on a fresh database); the runs reuse it (``stack_dir``)."""
    from whatrack.devstack import servers
    from whatrack.devstack.stack import Stack

    name = f"whatrack_nb_{uuid.uuid4().hex[:10]}"
    stack = Stack(tmp_path_factory.mktemp("stack"), database_url=servers.create_database(pg_admin_url, name))
    stack.up()
    try:
        yield stack.dir
    finally:
        stack.down()
        servers.drop_database(pg_admin_url, name)


@pytest.mark.slow
def test_nbval_smoke_runs_a_notebook_with_the_stack_environment(devstack: Path, tmp_path: Path) -> None:
    from whatrack.devstack.stack import load_env

    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    shutil.copy(NOTEBOOKS / "00_prepare.ipynb", nb_dir)
    env = {**os.environ, **load_env(devstack)}
    r = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
                        str(nb_dir / "00_prepare.ipynb")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
    results = json.loads((tmp_path / "runs" / "lab" / "00_prepare" / "results.json").read_text())
    assert results["passed"] is True and results["mode"] == "offline"


@pytest.mark.slow
def test_the_whole_suite_through_whatrack_run(devstack: Path, tmp_path: Path) -> None:
    from whatrack.cli import main

    # Small on purpose (CI); `make run` uses the notebooks' defaults.
    params = ["seed_jobs=10", "new_jobs=2", "messages=40", "faults=endpoint_sigkill", "fault_messages=30",
              "timeout_s=30"]
    code = main(["run", "--notebooks", str(NOTEBOOKS), "--runs-dir", str(tmp_path / "runs"), "--stack-dir",
                 str(devstack), *(a for p in params for a in ("-p", p))])
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    data = json.loads((run_dir / "run.json").read_text())
    failed = [(p["phase"], p["error"]) for p in data["phases"] if p["status"] != "passed"]
    assert code == 0, f"{data['failure']}: {failed}"
    assert [p["phase"] for p in data["phases"]] == list(PHASES)
    assert data["mode"] == "offline" and "reused" in data["stack"]["how"]
    assert data["scan"]["clean"] and data["scan"]["files"] > 20
    assert data["acceptance"] and all(c["verdict"] == "pass" for c in data["acceptance"])
    faults = next(p for p in data["phases"] if p["phase"] == "30_validation")["results"]["faults"]
    assert [(f["scenario"], f["lost"], f["duplicated"]) for f in faults] == [("endpoint_sigkill", 0, 0)]
    index = (run_dir / "index.html").read_text()
    for phase in PHASES:
        assert f'href="{phase}/{phase}.html"' in index
        assert (run_dir / phase / "results.json").is_file()
    assert data["provenance"]["git_commit"] and data["provenance"]["packages"]["bullmq"]
