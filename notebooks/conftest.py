"""nbval over the phase notebooks (``pytest --nbval-lax notebooks/``): the devstack is brought up for the session.

This is the one execution of the phase notebooks in the README's test command (``make test``): tests/ checks their
shape and proves the ``whatrack run`` machinery on tiny notebooks instead of executing these a second time.

A setup hook, not a fixture: nbval starts each notebook's kernel when its first cell is set up, before fixtures, and
the kernel inherits the environment at that moment; so the stack comes up just before the first notebook cell runs
(not while tests/ runs, and not at all when no notebook cell runs). ``--nbval-lax`` compares no outputs; the
notebooks' own ``assert`` cells carry the verdicts, so a failing check fails its cell. Every cell's outputs are also
scanned for the stack's secrets and token-shaped strings (what ``whatrack run`` does to a run's files): a cell that
shows one fails, naming the setting, never the value.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: The nbval stack's QStash broker backoff scale (tests/conftest.py's session devstack uses the same): retries after
#: 0.6 s, 7.4 s, 90 s instead of QStash's 12 s, 148 s, 30 min, so that 30_validation's fault runs (a delivery
#: failing twice into the endpoint's restart) settle in seconds. ``whatrack run`` keeps 0.2 (``--time-scale``).
TIME_SCALE = 0.05

_state: dict[str, Any] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before nbval's own setup of the first notebook cell (which starts that notebook's kernel): the stack."""
    if "stack" in _state or not str(item.path).endswith(".ipynb"):
        return
    if "error" in _state:  # tried once for the session: every cell fails with that reason, no second attempt
        pytest.fail(_state["error"], pytrace=False)
    from whatrack.devstack.stack import Stack
    from whatrack.errors import WhatrackError
    from whatrack.runs.execute import secret_pairs
    from whatrack.runs.record import LAB_DIR_ENV
    from whatrack.settings import Settings

    stack = Stack(Path(tempfile.mkdtemp(prefix="whatrack-nbval-")))
    try:
        env = stack.up(time_scale=TIME_SCALE)
    except WhatrackError as e:
        _state["error"] = f"the devstack for the notebooks did not start: {e}"
        shutil.rmtree(stack.dir, ignore_errors=True)
        raise
    _state.update(stack=stack, saved=dict(os.environ),
                  secrets=secret_pairs(Settings.from_env(env, env_files=())))
    os.environ.update(env)
    # The phases' results of this session only (phase 90 reads them), not what an earlier one left in runs/lab.
    os.environ[LAB_DIR_ENV] = str(stack.dir / "lab")


def leaks(outputs: list[Any], secrets: list[tuple[str | None, str]], workdir: Path) -> list[str]:
    """What a cell's outputs show that they must not (``secret value (QSTASH_TOKEN)``, a token shape's name), by
    ``whatrack run``'s own scan of a file holding them; empty when clean. Never the value itself."""
    from whatrack.runs import scan as runs_scan

    workdir.mkdir(parents=True, exist_ok=True)
    try:
        (workdir / "outputs.json").write_text(json.dumps(outputs, default=str), encoding="utf-8")
        found = runs_scan.scan_dir(workdir, secrets)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return sorted({f"{f.kind} ({f.setting})" if f.setting else f.kind for f in found})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After a notebook cell ran: fail it when its outputs show a secret of the stack or a token-shaped string."""
    result = yield
    outputs = getattr(item, "test_outputs", None)
    stack = _state.get("stack")
    if outputs and stack is not None and str(item.path).endswith(".ipynb"):
        what = leaks(outputs, _state["secrets"], stack.dir / "nbval-outputs" / item.path.stem)
        if what:
            pytest.fail(f"{item.path.name} {item.name} shows {', '.join(what)} in its output: print no secrets",
                        pytrace=False)
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stack = _state.pop("stack", None)
    if stack is not None:
        os.environ.clear()
        os.environ.update(_state.pop("saved"))
        _state.pop("secrets", None)
        stack.down()
        shutil.rmtree(stack.dir, ignore_errors=True)
