"""Runs of the phase notebooks: what a notebook records (this package's top), executing and reporting (submodules).

A notebook imports ``whatrack.runs`` for :func:`record`, :func:`check` and :func:`criterion`; executing a run
(papermill, nbconvert) lives in :mod:`whatrack.runs.execute`, so a kernel does not import it.
"""

from whatrack.runs.record import PHASE_MARKER, RESULTS_FILE, check, criterion, load_results, phase_dir, record

__all__ = ["PHASE_MARKER", "RESULTS_FILE", "check", "criterion", "load_results", "phase_dir", "record"]
