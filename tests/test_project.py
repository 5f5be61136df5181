"""The project's own promises: environment.yml names pyproject's dependencies; CI runs the README's test command; the
package's import graph keeps its layers and has no cycle; each command is wired to its subpackage's cli module."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_names_the_same_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    listed = {line.strip()[2:].strip().strip('"') for line in (ROOT / "environment.yml").read_text().splitlines()
              if line.startswith("      - ")}
    assert listed - {"-e ."} == wanted


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0] and "make run" in readme.split("\n## ")[0]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_import_graph_keeps_the_layers_and_has_no_cycle() -> None:
    """The [tool.importlinter] contracts of pyproject.toml, as `make lint` checks them (lazy imports included)."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_module_of_the_package_top_has_a_layer() -> None:
    """A new top-level module or subpackage must be placed in the layers contract, or nothing checks its imports."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [layers] = [c["layers"] for c in contracts if c.get("id") == "layers"]
    named = {m.strip() for layer in layers for m in layer.split("|")}
    pkg = ROOT / "whatrack"
    top = {f"whatrack.{p.stem}" for p in pkg.glob("*.py") if p.name != "__init__.py"}
    top |= {f"whatrack.{p.name}" for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert top == named


def test_lint_runs_the_import_contracts() -> None:
    lint = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "lint-imports" in lint


def test_the_package_top_holds_at_most_15_modules() -> None:
    top = sorted(p.name for p in (ROOT / "whatrack").glob("*.py"))
    assert len(top) <= 15, f"{len(top)} modules directly in whatrack/: {top}; move some into a subpackage"


def _commands() -> dict[str, str]:
    from whatrack.cli import COMMANDS

    return COMMANDS


def test_every_command_lives_in_a_subpackage_cli_module() -> None:
    commands = _commands()
    assert {"serve", "normalize", "instances", "db", "worker", "followup", "migrate", "loadtest", "faults", "replay",
            "run", "report", "lab", "alerts", "stack"} <= set(commands)
    for name, module in commands.items():
        assert module.startswith("whatrack.") and module.endswith(".cli") and module.count(".") == 2, (name, module)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_a_command_parses_with_only_its_own_cli_module(command: str) -> None:
    """``whatrack COMMAND --help`` imports the command's cli module and none of the other command modules."""
    code = (
        "import json, sys\n"
        "from whatrack.cli import COMMANDS, build_parser\n"
        f"parser = build_parser([{command!r}])\n"
        "choices = parser._subparsers._group_actions[0].choices\n"
        "print(json.dumps({'choices': sorted(choices), 'modules': sorted(m for m in sys.modules\n"
        "                  if m in set(COMMANDS.values()))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    commands = _commands()
    assert command in out["choices"]
    assert out["modules"] == [commands[command]]
    assert sorted(out["choices"]) == sorted(c for c, m in commands.items() if m == commands[command])
