"""Loaded first for every test (``tests/`` and the nbval run of ``notebooks/``), for pytest-xdist (``make test``):

- parallel workers take disjoint slices of the port range ``whatrack.devstack.servers.free_port`` draws from, so that
  a port one worker's devstack reserved for a server it starts later is never bound meanwhile by another worker;
- with ``--dist loadfile`` the phase notebooks are one unit: one worker runs them all, in order (phase 90 judges the
  results phases 00-40 recorded; on separate workers it could run before them), on one devstack.
"""

from __future__ import annotations

import os
from typing import Any

import pytest


def _port_slice() -> None:
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not worker.startswith("gw") or not count.isdigit() or "WHATRACK_PORT_RANGE" in os.environ:
        return
    from whatrack.devstack.servers import PORT_RANGE

    low, high = PORT_RANGE
    size = (high - low) // max(1, int(count))
    start = low + int(worker[2:]) * size
    os.environ["WHATRACK_PORT_RANGE"] = f"{start}-{start + size}"


_port_slice()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile``, with every ``notebooks/*.ipynb`` in one scope."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class NotebooksTogether(LoadFileScheduling):  # type: ignore[misc]  # xdist ships no types
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("notebooks/") and ".ipynb" in nodeid.split("::", 1)[0]:
                return "notebooks"
            return str(super()._split_scope(nodeid))

    return NotebooksTogether(config, log)
