"""The defaults of a notebook run, shared by :mod:`whatrack.runs.execute` and the commands (:mod:`whatrack.runs.cli`)
without importing papermill or nbformat."""

from __future__ import annotations

#: Per-cell limit: a hung cell (a blocked Redis call) fails the run instead of hanging CI. The slowest cell (the load
#: test) takes well under a minute offline.
DEFAULT_CELL_TIMEOUT = 900
#: The devstack broker's retry backoff scale for a run: QStash's real delays (12 s, 2.5 min, ...) times 0.2, so that a
#: fault scenario's retries land within the run; what is proven (nothing lost) does not depend on the delays.
DEFAULT_TIME_SCALE = 0.2
