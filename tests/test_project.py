"""The project's own promises: environment.yml names pyproject's dependencies; CI runs the README's test command."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
