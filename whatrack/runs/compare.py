"""Two runs side by side (``whatrack report --compare RUN_A RUN_B``): how a reviewer sees what a change did.

:func:`compare` is pure: two ``run.json`` dicts in, one comparison dict out, with

* ``criteria``: each acceptance criterion (phase 90) and each phase check, its verdict in A and in B, and whether it
  changed (a row present in one run only has verdict ``None`` in the other);
* ``phases``: each phase's status in A and B;
* ``figures``: each headline figure (run and phase durations, the load test's figures, the loss ledger's counts,
  each fault scenario's counts, the database counts) in A and B, the change and the change in percent, and whether
  the change is for the better where that is clear (fewer lost messages, lower latency, more throughput).

:func:`write_comparison` writes it as ``compare.json`` and a self-contained ``compare.html`` (no script, no external
URL).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from whatrack.errors import RunError

log = logging.getLogger("whatrack.runs.compare")

#: Keys of a phase's ``results.json`` whose numbers are headline figures: a flat mapping (``load``, ``ledger``,
#: ``counts``) or a list of rows named by ``scenario`` (``faults``).
HEADLINE_KEYS = ("load", "ledger", "counts", "faults")
#: Figures where less is better (matched on the figure's last part); the rest of :data:`HIGHER_IS_BETTER` is more.
LOWER_IS_BETTER = ("lost", "duplicated", "unexpected", "unknown", "duration_s", "seconds", "dlq", "retries")
HIGHER_IS_BETTER = ("ok", "accepted", "recovered", "per_s")


def load_run(path: Path) -> dict[str, Any]:
    """The ``run.json`` of a run directory (or the file itself).

    Raises:
        RunError: no ``run.json`` there, or it is not a run's.
    """
    f = path / "run.json" if path.is_dir() else path
    if not f.is_file():
        raise RunError(path.name, f"{f} not found: give a run directory (runs/<id>/) or its run.json")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunError(path.name, f"{f} is not JSON ({e}); re-render it with: whatrack report {f.parent}") from e
    if not isinstance(data, dict) or "phases" not in data:
        raise RunError(path.name, f"{f} is not a run's run.json (no 'phases')")
    return data


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


def headline(run: Mapping[str, Any]) -> dict[str, float]:
    """The headline figures of a run: ``name → number`` (names like ``30_validation ledger.lost``)."""
    out: dict[str, float] = {}
    if (d := _number(run.get("duration_s"))) is not None:
        out["run duration_s"] = d
    for ph in run.get("phases", []):
        name = str(ph.get("phase"))
        if (d := _number(ph.get("duration_s"))) is not None:
            out[f"{name} duration_s"] = d
        results = ph.get("results") or {}
        for key in HEADLINE_KEYS:
            value = results.get(key)
            if isinstance(value, Mapping):
                rows = {key: value}
            elif isinstance(value, list):
                rows = {f"{key}[{r.get('scenario', i)}]": r for i, r in enumerate(value) if isinstance(r, Mapping)}
            else:
                continue
            for prefix, row in rows.items():
                for k, v in row.items():
                    if (n := _number(v)) is not None:
                        out[f"{name} {prefix}.{k}"] = n
    return out


def _better(name: str, delta: float) -> bool | None:
    if not delta:
        return None
    last = name.rsplit(".", 1)[-1].rsplit(" ", 1)[-1]
    if last.endswith("_ms") or any(last == w or last.endswith(w) for w in LOWER_IS_BETTER):
        return delta < 0
    if any(last == w or last.endswith(w) for w in HIGHER_IS_BETTER):
        return delta > 0
    return None


def _verdicts(run: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in run.get("acceptance") or []:
        out[f"acceptance: {c.get('criterion')}"] = str(c.get("verdict"))
    for ph in run.get("phases", []):
        for c in (ph.get("results") or {}).get("checks", []):
            out[f"{ph.get('phase')}: {c.get('name')}"] = "pass" if c.get("passed") else "fail"
    return out


def _summary(run: Mapping[str, Any]) -> dict[str, Any]:
    prov = run.get("provenance") or {}
    return {"run_id": run.get("run_id"), "status": run.get("status"), "started": run.get("started"),
            "command": run.get("command"), "mode": run.get("mode"), "git_commit": prov.get("git_commit"),
            "git_dirty": prov.get("git_dirty"), "failure": run.get("failure")}


def compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Run A against run B (both ``run.json`` dicts). Pure."""
    va, vb = _verdicts(a), _verdicts(b)
    criteria = [{"criterion": k, "a": va.get(k), "b": vb.get(k), "changed": va.get(k) != vb.get(k)}
                for k in [*va, *(k for k in vb if k not in va)]]
    pa = {str(p.get("phase")): p.get("status") for p in a.get("phases", [])}
    pb = {str(p.get("phase")): p.get("status") for p in b.get("phases", [])}
    phases = [{"phase": k, "a": pa.get(k), "b": pb.get(k), "changed": pa.get(k) != pb.get(k)}
              for k in sorted({*pa, *pb})]
    fa, fb = headline(a), headline(b)
    figures: list[dict[str, Any]] = []
    for name in [*fa, *(k for k in fb if k not in fa)]:
        x, y = fa.get(name), fb.get(name)
        delta = None if x is None or y is None else round(y - x, 6)
        pct = None if delta is None or not x else round(100.0 * delta / abs(x), 1)
        figures.append({"figure": name, "a": x, "b": y, "delta": delta, "delta_pct": pct,
                        "better": None if delta is None else _better(name, delta)})
    return {"a": _summary(a), "b": _summary(b), "status_changed": a.get("status") != b.get("status"),
            "criteria": criteria, "phases": phases, "figures": figures,
            "changed": {"criteria": sum(c["changed"] for c in criteria),
                        "figures": sum(1 for f in figures if f["delta"] != 0)}}


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if v.is_integer() else f"{v:,.2f}"
    return str(v)


def write_comparison(out_dir: Path, comparison: Mapping[str, Any]) -> Path:
    """Write ``compare.json`` and ``compare.html`` into ``out_dir``; returns the HTML's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    page = out_dir / "compare.html"
    page.write_text(env.from_string(_PAGE).render(c=comparison), encoding="utf-8")
    log.info("comparison written to %s", page)
    return page


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>whatrack runs compared: {{ c.a.run_id }} → {{ c.b.run_id }}</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
 table{border-collapse:collapse;margin:.5em 0;display:block;max-width:100%;overflow-x:auto}
 td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top;overflow-wrap:break-word}
 th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
 code{font:13px ui-monospace,monospace}
 .passed,.pass{color:#05702b;font-weight:600}.failed,.fail{color:#b00020;font-weight:600}
 tr.changed{background:#fff6d6} .better{color:#05702b}.worse{color:#b00020}
</style></head><body>
<h1>Run <code>{{ c.a.run_id }}</code> (A) → <code>{{ c.b.run_id }}</code> (B)</h1>
<table><tr><th></th><th>A</th><th>B</th></tr>
{% for k in ["status", "started", "mode", "command", "git_commit", "git_dirty", "failure"] %}
<tr{% if k != "started" and c.a[k] != c.b[k] %} class="changed"{% endif %}><th>{{ k | replace("_", " ") }}</th>
<td{% if k == "status" %} class="{{ c.a[k] }}"{% endif %}>{{ c.a[k] | fmt }}</td>
<td{% if k == "status" %} class="{{ c.b[k] }}"{% endif %}>{{ c.b[k] | fmt }}</td></tr>{% endfor %}
</table>
<p>{{ c.changed.criteria }} verdict(s) and {{ c.changed.figures }} figure(s) changed.</p>

<h2>Verdicts</h2>
<table><tr><th>criterion or check</th><th>A</th><th>B</th><th>changed</th></tr>
{% for r in c.criteria %}<tr{% if r.changed %} class="changed"{% endif %}><td>{{ r.criterion }}</td>
<td class="{{ r.a }}">{{ r.a | fmt }}</td><td class="{{ r.b }}">{{ r.b | fmt }}</td>
<td>{{ "yes" if r.changed else "" }}</td></tr>{% endfor %}
</table>

<h2>Phases</h2>
<table><tr><th>phase</th><th>A</th><th>B</th></tr>
{% for r in c.phases %}<tr{% if r.changed %} class="changed"{% endif %}><td><code>{{ r.phase }}</code></td>
<td class="{{ r.a }}">{{ r.a | fmt }}</td><td class="{{ r.b }}">{{ r.b | fmt }}</td></tr>{% endfor %}
</table>

<h2>Headline figures</h2>
<table><tr><th>figure</th><th>A</th><th>B</th><th>change</th><th>change %</th></tr>
{% for f in c.figures %}<tr{% if f.delta != 0 %} class="changed"{% endif %}><td><code>{{ f.figure }}</code></td>
<td class="num">{{ f.a | fmt }}</td>
<td class="num">{{ f.b | fmt }}</td>
<td class="num {{ '' if f.better is none else ('better' if f.better else 'worse') }}">{% if f.delta is not none
%}{{ '+' if f.delta > 0 else '' }}{{ f.delta | fmt }}{% else %}–{% endif %}</td>
<td class="num">{% if f.delta_pct is not none %}{{ '+' if f.delta_pct > 0 else '' }}{{ f.delta_pct }} %{% else
%}–{% endif %}</td></tr>{% endfor %}
</table>
</body></html>
"""
