"""Loaded first for every test (``tests/`` and the nbval run of ``notebooks/``): parallel pytest-xdist workers take
disjoint slices of the port range ``whatrack.devstack.servers.free_port`` draws from, so that a port one worker's
devstack reserved for a server it starts later is never bound meanwhile by another worker's server."""

from __future__ import annotations

import os


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
