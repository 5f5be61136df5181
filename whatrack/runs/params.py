"""Notebook parameters: what a phase declares (papermill's ``inspect_notebook``) and strict checking of ``-p`` values.

A notebook's ``parameters`` cell is its contract: ``name: type = default  # help``. An unknown name is an error that
lists the known ones (ploomber's strict mode, not papermill's warning); a value is coerced to the declared type
(``int``, ``float``, ``bool``, ``str``, or any literal for other annotations); a value equal to a secret is refused,
because no secret is ever a parameter (they are recorded in the executed notebook). Given the run's mode, a value
that mode cannot run is refused too (:data:`MODE_CHECKS`: phase 30's offline-only fault scenarios in cloud mode), so
that the run stops before any kernel starts.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from whatrack.errors import RunError

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


@dataclass(frozen=True)
class Parameter:
    """One declared parameter of a notebook."""

    name: str
    type_name: str
    default: str
    help: str


def parameters_cell_index(path: Path) -> int | None:
    """Index of the cell tagged ``parameters`` in the notebook at ``path``, or None."""
    nb = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    for i, cell in enumerate(nb.cells):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return i
    return None


def declared(path: Path) -> dict[str, Parameter]:
    """The parameters declared by the notebook at ``path`` (name → :class:`Parameter`).

    Raises:
        RunError: the notebook has no cell tagged ``parameters``.
    """
    import papermill

    if parameters_cell_index(path) is None:
        raise RunError(path.stem, "no cell tagged 'parameters'; tag the cell of typed defaults 'parameters' "
                       "(View → Cell Toolbar → Tags in Jupyter)")
    out: dict[str, Parameter] = {}
    for name, p in papermill.inspect_notebook(path).items():
        out[name] = Parameter(name, str(p["inferred_type_name"]), str(p["default"]), str(p["help"]))
    return out


def coerce(value: str, type_name: str, *, name: str, phase: str) -> Any:
    """Turn the command-line text ``value`` into the declared type.

    Raises:
        RunError: the text is not a value of that type (the message names the parameter and shows a good value).
    """
    t = type_name.replace(" ", "")
    if t.startswith("Optional[") or t.endswith("|None"):
        if value.strip().lower() in ("none", "null", ""):
            return None
        t = t[len("Optional["):-1] if t.startswith("Optional[") else t[: -len("|None")]
    try:
        if t == "int":
            return int(value)
        if t == "float":
            return float(value)
        if t == "bool":
            v = value.strip().lower()
            if v in _TRUE:
                return True
            if v in _FALSE:
                return False
            raise ValueError(value)
        if t == "str":
            return value
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        example = {"int": "200", "float": "0.5", "bool": "true"}.get(t, "a Python literal, e.g. [1, 2]")
        raise RunError(phase, f"parameter {name}: {value!r} is not a {type_name} (example: -p {name}={example})") \
            from e


def parse_assignments(items: Sequence[str]) -> list[tuple[str | None, str, str]]:
    """Split ``-p`` items into ``(phase or None, name, raw value)``; ``phase.name=value`` targets one phase.

    Raises:
        RunError: an item is not ``name=value``.
    """
    out: list[tuple[str | None, str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RunError("-", f"-p {item!r}: expected name=value (or phase.name=value), e.g. -p sample_size=50")
        phase, dot, name = key.rpartition(".")
        out.append((phase if dot else None, name, value))
    return out


def _faults_in(value: Any, mode: str) -> str | None:
    """Phase 30's ``faults``: an offline-only scenario in cloud mode (or an unknown one) is refused."""
    from whatrack.errors import ConfigError
    from whatrack.proof.scenarios import parse_names, select

    try:
        select(parse_names(str(value)), mode=mode)
    except ConfigError as e:
        return e.problem
    return None


#: Checks of a parameter's value against the run's mode: (phase number, parameter) → a function of (value, mode)
#: returning why the value cannot run in that mode, or None.
MODE_CHECKS: dict[tuple[str, str], Callable[[Any, str], str | None]] = {("30", "faults"): _faults_in}


def resolve(assignments: Sequence[tuple[str | None, str, str]], notebooks: Mapping[str, Path],
            secrets: Iterable[str] = (), *, mode: str | None = None) -> dict[str, dict[str, Any]]:
    """Check every assignment against the chosen notebooks and coerce it: phase → {name: value}.

    A plain ``name=value`` applies to every chosen phase that declares ``name``; ``phase.name=value`` to that phase.
    With ``mode`` (``cloud`` or ``offline``), each value is also checked against what that mode can run
    (:data:`MODE_CHECKS`).

    Raises:
        RunError: an unknown phase or parameter (with the known ones), a value of the wrong type, a value that
            equals a secret setting, or a value the run's mode cannot run (e.g. ``-p 30.faults=postgres_outage`` in
            cloud mode: the message names the offline-only scenario and the cloud-safe ones).
    """
    decl = {phase: declared(path) for phase, path in notebooks.items()}
    secret_set = {s for s in secrets if s}
    out: dict[str, dict[str, Any]] = {phase: {} for phase in notebooks}
    for target, name, raw in assignments:
        if raw in secret_set:
            raise RunError(target or "-", f"parameter {name}: the value is a secret setting; secrets are never "
                           "parameters (they would be written into the executed notebook); the notebooks read them "
                           "from the environment")
        if target is not None:
            phases = [p for p in notebooks if p == target or p.split("_", 1)[0] == target]
            if not phases:
                raise RunError(target, f"-p {target}.{name}: phase {target!r} is not in this run "
                               f"(chosen: {', '.join(notebooks)})")
        else:
            phases = list(notebooks)
        hits = [p for p in phases if name in decl[p]]
        if not hits:
            known = sorted({n for p in phases for n in decl[p]})
            where = phases[0] if len(phases) == 1 else "run"
            raise RunError(where, f"unknown parameter {name!r}; known parameters: {', '.join(known) or '(none)'}")
        for p in hits:
            out[p][name] = coerce(raw, decl[p][name].type_name, name=name, phase=p)
            check = MODE_CHECKS.get((p.split("_", 1)[0], name)) if mode is not None else None
            why = check(out[p][name], mode) if check is not None and mode is not None else None
            if why:
                raise RunError(p, f"-p {name}={raw} refused in {mode} mode: {why}")
    return out
