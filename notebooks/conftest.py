"""nbval over the phase notebooks (``pytest --nbval-lax notebooks/``): the devstack is brought up for the session.

A collection hook, not a fixture: nbval starts each notebook's kernel before fixtures are set up,
and the kernel inherits the environment at that moment; the stack comes up only when notebook cells
were actually collected. ``--nbval-lax`` compares no outputs; the notebooks' own ``assert`` cells
carry the verdicts, so a failing check fails its cell.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

_state: dict[str, Any] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    if not any(str(item.path).endswith(".ipynb") for item in session.items):
        return
    from whatrack.devstack.stack import Stack

    stack = Stack(Path(tempfile.mkdtemp(prefix="whatrack-nbval-")))
    env = stack.up(time_scale=0.2)
    _state.update(stack=stack, saved=dict(os.environ))
    os.environ.update(env)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stack = _state.pop("stack", None)
    if stack is not None:
        os.environ.clear()
        os.environ.update(_state.pop("saved"))
        stack.down()
        shutil.rmtree(stack.dir, ignore_errors=True)
