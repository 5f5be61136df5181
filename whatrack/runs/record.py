"""What a phase notebook calls: :func:`record` its results, :func:`check` / :func:`criterion` rows, and
:func:`load_results` of the other phases (re-exported by :mod:`whatrack.runs.execute`, which notebooks import).

Inside a ``whatrack run`` kernel the working directory is the phase's directory in the run (the runner leaves
:data:`PHASE_MARKER` there); elsewhere (JupyterLab) results go to ``runs/lab/<phase>/`` (or under ``WHATRACK_LAB_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from whatrack.times import now_iso

log = logging.getLogger("whatrack.runs.record")

#: File the runner leaves in each phase directory, so that :func:`record` in the kernel knows where it runs.
PHASE_MARKER = ".whatrack-phase.json"
RESULTS_FILE = "results.json"


def _now() -> str:
    return now_iso()



def _jsonable(v: Any) -> Any:
    if hasattr(v, "to_dict") and hasattr(v, "columns"):  # a pandas DataFrame
        return json.loads(v.to_json(orient="records", date_format="iso"))
    if hasattr(v, "to_dict") and callable(v.to_dict):
        return v.to_dict()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    if isinstance(v, (set, frozenset, tuple)):
        return list(v)
    return str(v)


#: Where results go outside a ``whatrack run`` when set (the nbval run of the notebooks: a folder of its own, so
#: that phase 90 judges that run's phases, never results an earlier session left in ``runs/lab``).
LAB_DIR_ENV = "WHATRACK_LAB_DIR"


def lab_root() -> Path:
    """Where results go outside a ``whatrack run``: ``WHATRACK_LAB_DIR``, else ``runs/lab`` of the repository."""
    if os.environ.get(LAB_DIR_ENV):
        return Path(os.environ[LAB_DIR_ENV])
    cwd = Path.cwd()
    base = cwd.parent if cwd.name == "notebooks" else cwd
    return base / "runs" / "lab"


def phase_dir() -> Path | None:
    """The phase directory when called inside a ``whatrack run`` kernel, else None (an interactive session)."""
    return Path.cwd() if (Path.cwd() / PHASE_MARKER).is_file() else None


def check(name: str, passed: object, evidence: object) -> dict[str, Any]:
    """One verdict row for a phase's ``results["checks"]``: what was checked, whether it held, and the evidence."""
    return {"name": name, "passed": bool(passed), "evidence": str(evidence)}


def criterion(criterion: str, passed: object, evidence: object) -> dict[str, Any]:
    """One row of the acceptance table (``results["criteria"]`` of phase 90); ``passed=None``: no evidence."""
    verdict = "no evidence" if passed is None else "pass" if passed else "fail"
    return {"criterion": criterion, "verdict": verdict, "evidence": str(evidence)}


def record(phase: str, results: Mapping[str, Any]) -> Path:
    """Write a phase's results as ``results.json`` beside the executed notebook (``runs/lab/<phase>/`` outside a run).

    ``results`` is any JSON-able mapping (DataFrames become lists of records). By convention it holds ``checks``
    (rows from :func:`check`) and, for phase 90, ``criteria`` (rows from :func:`criterion`); ``passed`` is set from the
    checks unless given.

    Returns:
        The path written.
    """
    where = phase_dir() or lab_root() / phase
    where.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"phase": phase, "recorded": _now(), **results}
    # A criterion without evidence does not fail the phase by itself: the acceptance notebook's assert decides.
    rows = list(payload.get("checks", [])) + [
        {"passed": c.get("verdict") != "fail"} for c in payload.get("criteria", [])]
    payload.setdefault("passed", all(bool(r.get("passed")) for r in rows))
    path = where / RESULTS_FILE
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    log.info("recorded %s results in %s", phase, path)
    return path


def load_results(run_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every phase's recorded results in a run (default: the current run, or ``runs/lab`` outside one): phase → dict."""
    if run_dir is None:
        here = phase_dir()
        run_dir = here.parent if here else lab_root()
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(run_dir.glob(f"*/{RESULTS_FILE}")):
        out[p.parent.name] = json.loads(p.read_text(encoding="utf-8"))
    return out
