"""The committed phase notebooks: their shape (papermill's contract, no outputs, no definitions).

Executing them is nbval's job, once per test run: ``pytest`` collects ``notebooks/`` (pyproject's testpaths, with
``--nbval-lax``) and notebooks/conftest.py brings the devstack up for their kernels and scans every cell's output for
secrets. The ``whatrack run`` machinery (papermill, parameters, reports, the secrets scan, a reused devstack) is
proved in tests/test_runs.py on tiny throwaway notebooks, so the phase notebooks are not executed a second time.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

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


# -- their execution: nbval, in the README's test command ----------------------------------------------------------


def test_the_test_command_executes_the_notebooks_with_nbval() -> None:
    """``make test`` (bare ``pytest``) collects notebooks/ with ``--nbval-lax``: that is where they are executed."""
    import tomllib

    ini = tomllib.loads((NOTEBOOKS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in ini["testpaths"]
    assert "--nbval-lax" in ini["addopts"].split()


def _nbval_conftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebooks_conftest", NOTEBOOKS / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cell_output_showing_a_secret_is_caught_by_name_only(tmp_path: Path) -> None:
    """The scan nbval's hook runs on every executed cell's outputs (notebooks/conftest.py)."""
    leaks = _nbval_conftest().leaks
    secrets = [("QSTASH_TOKEN", "qstash-planted-token-7c1d9e"), ("CENTRIFUGO_API_KEY", "cent-key-planted-55aa")]
    clean = [{"output_type": "stream", "name": "stdout", "text": "copied 40 jobs, 0 missing\n"}]
    assert leaks(clean, secrets, tmp_path / "a") == []
    leaky = [*clean, {"output_type": "execute_result", "data": {"text/plain": "'qstash-planted-token-7c1d9e'"}},
             {"output_type": "display_data", "data": {"text/html": "<pre>Bearer abcdefghijklmnop1234</pre>"}}]
    found = leaks(leaky, secrets, tmp_path / "b")
    assert found == ["Bearer credential", "secret value (QSTASH_TOKEN)"]
    assert not any("planted" in f for f in found)
    assert not (tmp_path / "b").exists()  # the outputs written for the scan are removed
