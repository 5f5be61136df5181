"""Notebook runs: execute the phase notebooks with papermill, render them, index them, and prove no secret got in.

Commands (parsers in :mod:`whatrack.runs.cli`, wired by :mod:`whatrack.cli`):

* ``whatrack run [PHASE ...] [-p NAME=VALUE ...] [--no-stack]``: executes the chosen phase notebooks of ``notebooks/``
  (all by default, in order; a phase is named ``10``, ``redis_migration`` or ``10_redis_migration``) into
  ``runs/<UTC timestamp>-<id>/``, one directory per phase with the executed notebook, its HTML, its ``results.json``
  and its figures; then ``index.html`` (open it first) and ``run.json``. ``-p name=value`` sets a parameter in every
  chosen phase that declares it, ``-p 10.name=value`` in one phase; unknown names are errors, values are coerced to
  the declared type. A failing phase stops the run (the index names the phase and the cell) and the exit code is 1.
  In offline mode with no devstack running, the run brings the devstack up in ``runs/.stack`` (``--stack-dir``; its
  broker's retry delays scaled by ``--time-scale``, 0.2) and down afterwards; a stack already running there is reused.
  The kernels get the settings through their environment, never as parameters. Cloud mode (real Upstash
  credentials in the environment or ``.env``) starts nothing.
* ``whatrack report RUN_DIR``: re-renders a run's ``index.html`` and ``run.json`` from its files.
  ``whatrack report --compare RUN_A RUN_B [-o DIR]`` writes ``compare.html`` and ``compare.json``: each criterion's
  verdict and each headline figure of both runs side by side with the change (:mod:`whatrack.runs.compare`).
* ``whatrack lab [--no-browser] [--no-stack]``: opens JupyterLab (on 127.0.0.1, token auth on) on ``notebooks/`` with
  the devstack's environment loaded into the server and so into every kernel (the stack in ``runs/.stack`` is reused
  when running, else brought up, and down again when JupyterLab exits with Ctrl-C). ``--no-browser`` prints the URL
  instead of opening a browser. A notebook run in the lab records its results under ``runs/lab/<phase>/``, where
  the acceptance notebook reads them. The lab asks nothing about Jupyter news and its file browser shows the
  notebooks only (:func:`lab_command`).

Every page a run writes is self-contained (no CDN script: it opens offline), numbers cells as the notebook does
(``In [N]``), and prints times in ISO-8601 (:mod:`whatrack.runs.report`).

Before a run is declared done every file it wrote is scanned (:mod:`whatrack.runs.scan`) for the values of every
secret setting of the environment the run used (the devstack's generated secrets included) and for token-shaped
strings; a hit fails the run, names the file and notebook cell, and the hit is redacted from the file.

Notebooks call :func:`record` at the end of each phase, :func:`check` / :func:`criterion` to build verdict rows, and the
acceptance notebook :func:`load_results` to read the other phases' results (all in :mod:`whatrack.runs.record`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from whatrack.errors import ConfigError, RunError, StackError, WhatrackError
from whatrack.runs import params as runs_params
from whatrack.runs import preflight
from whatrack.runs import report as runs_report
from whatrack.runs import scan as runs_scan
from whatrack.runs.defaults import DEFAULT_CELL_TIMEOUT, DEFAULT_TIME_SCALE
from whatrack.runs.record import PHASE_MARKER, RESULTS_FILE, check, criterion, load_results, phase_dir, record
from whatrack.settings import SECRET_ENV_NAMES, Secret, Settings, url_password
from whatrack.times import now_iso

__all__ = ["PHASE_MARKER", "RESULTS_FILE", "RunOutcome", "check", "choose", "criterion", "discover",
           "execute", "lab_command", "load_results", "phase_dir", "record", "rerender", "run_environment",
           "secret_pairs"]

log = logging.getLogger("whatrack.runs.execute")

ACCEPTANCE_PHASE = "90"


# -- choosing notebooks --------------------------------------------------------------------------------------------


def default_notebook_dir() -> Path:
    """``./notebooks`` when it exists, else the repository's ``notebooks/`` beside the package."""
    here = Path.cwd() / "notebooks"
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "notebooks"


def discover(notebook_dir: Path) -> dict[str, Path]:
    """The phase notebooks ``NN_<name>.ipynb`` in ``notebook_dir``, in order: phase (the stem) → path."""
    found = sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    return {p.stem: p for p in found}


def choose(available: Mapping[str, Path], wanted: Sequence[str]) -> dict[str, Path]:
    """The notebooks for ``wanted`` phases (``10``, ``redis_migration`` or ``10_redis_migration``), in phase order.

    Raises:
        RunError: a phase matches no notebook (the message lists the phases there are).
    """
    if not available:
        raise RunError("-", "no phase notebooks (NN_name.ipynb) found; run from the repository root or pass "
                       "--notebooks DIR")
    if not wanted:
        return dict(available)
    chosen: set[str] = set()
    for w in wanted:
        hits = [s for s in available if w in (s, s.split("_", 1)[0], s.split("_", 1)[-1])]
        if not hits:
            raise RunError(w, f"no such phase; phases: {', '.join(available)}")
        chosen.update(hits)
    return {s: p for s, p in available.items() if s in chosen}


# -- the environment a run uses ------------------------------------------------------------------------------------


def secret_pairs(settings: Settings) -> list[tuple[str | None, str]]:
    """``(setting name, value)`` for every secret the settings hold (names where known); for the scan."""
    pairs: list[tuple[str | None, str]] = []
    for name in SECRET_ENV_NAMES:
        v = getattr(settings, name.lower(), None)
        if isinstance(v, Secret) and v:
            pairs.append((name, v.reveal()))
        elif isinstance(v, tuple):  # per-instance tokens: (instance name, Secret) pairs
            pairs += [(f"{name} ({instance})", t.reveal()) for instance, t in v]
    for name in ("DATABASE_URL", "UPSTASH_REDIS_URL", "LEGACY_REDIS_URL"):
        pw = url_password(getattr(settings, name.lower(), None))
        if pw:
            pairs.append((name + " password", pw))
    known = {v for _, v in pairs}
    pairs += [(None, v) for v in settings.secret_values() if v not in known]
    return pairs


@contextlib.contextmanager
def run_environment(base: Mapping[str, str], *, use_stack: bool, stack_dir: Path,
                    time_scale: float = 1.0) -> Iterator[tuple[dict[str, str], str]]:
    """The environment the kernels get: ``base`` plus, offline, the devstack's settings (started here if needed,
    with the broker's retry delays scaled by ``time_scale``).

    Yields:
        (environment, a sentence saying where the services came from).

    Raises:
        StackError: the devstack is needed but cannot start.
    """
    settings = Settings.from_env(base)
    if settings.mode == "cloud":
        yield dict(base), "none (cloud mode: the settings point at Upstash)"
        return
    if not use_stack:
        yield dict(base), "not used (--no-stack): the environment as given"
        return
    try:
        from whatrack.devstack import stack as devstack
    except ModuleNotFoundError as e:
        raise StackError("the offline devstack (whatrack.devstack.stack) is missing; use --no-stack with cloud "
                         "settings, or install the full package") from e
    st = devstack.Stack(stack_dir, database_url=base.get("DATABASE_URL"))
    if st.is_up():
        yield {**base, **st.env()}, f"reused the devstack already running in {stack_dir}"
        return
    log.info("starting the devstack in %s", stack_dir)
    st.up(time_scale=time_scale)
    try:
        yield {**base, **st.env()}, f"started in {stack_dir} for this run and stopped after it"
    finally:
        st.down()


def _kernel_manager_class(env: Mapping[str, str]) -> type:
    """A kernel manager that starts the kernel with ``env`` (papermill otherwise passes this process's own)."""
    from jupyter_client.manager import AsyncKernelManager

    class _EnvKernelManager(AsyncKernelManager):
        # IPC sockets (files in the runtime dir, owner-only) rather than loopback TCP: nothing else on the machine
        # can connect to the kernel, and ipykernel has no plain-TCP warning to print.
        def __init__(self, **kw: Any) -> None:
            kw.setdefault("transport", "ipc")
            super().__init__(**kw)

        # start_kernel calls _async_pre_start_kernel, which hands ``env`` on to the provisioner's Popen.
        async def _async_pre_start_kernel(self, **kw: Any) -> Any:
            kw["env"] = {**dict(env), **kw.get("env", {})}
            return await super()._async_pre_start_kernel(**kw)

    return _EnvKernelManager


# -- JupyterLab ----------------------------------------------------------------------------------------------------

#: JupyterLab settings ``whatrack lab`` overrides: no "notified about official Jupyter news?" prompt and no update
#: check (both would fetch from the internet, which a migration workstation may not reach, and distract a reviewer).
LAB_OVERRIDES: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}
#: Files of ``notebooks/`` the lab's file browser hides (besides jupyter_server's defaults): only notebooks show.
LAB_HIDDEN = ("__pycache__", "*.pyc", "*.pyo", ".DS_Store", "*~", "conftest.py")


def lab_command(nb_dir: Path, settings_dir: Path, *, no_browser: bool = False) -> list[str]:
    """The JupyterLab command line of ``whatrack lab``; writes its settings overrides into ``settings_dir``.

    ``settings_dir`` becomes JupyterLab's application settings directory (``overrides.json`` there sets
    :data:`LAB_OVERRIDES` as defaults; the user can still change them in the lab). An ``overrides.json`` of the
    default application settings directory, when there is one, is kept and merged under ours.
    """
    settings_dir.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {}
    try:
        from jupyterlab.commands import get_app_dir

        default = Path(get_app_dir()) / "settings" / "overrides.json"
        if default.is_file():
            overrides = json.loads(default.read_text(encoding="utf-8"))
    except (ImportError, OSError, ValueError) as e:  # no JupyterLab (the command will say so) or a broken file
        log.debug("no default JupyterLab overrides: %s", e)
    for plugin, values in LAB_OVERRIDES.items():
        overrides[plugin] = {**overrides.get(plugin, {}), **values}
    (settings_dir / "overrides.json").write_text(json.dumps(overrides, indent=1) + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={nb_dir}", "--ServerApp.ip=127.0.0.1",
           f"--LabApp.app_settings_dir={settings_dir}",
           *(f"--ContentsManager.hide_globs={g}" for g in LAB_HIDDEN)]
    if no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI machines run as root; JupyterLab refuses that otherwise
    return cmd


# -- executing a run -----------------------------------------------------------------------------------------------


def _now() -> str:
    return now_iso()


def new_run_dir(runs_dir: Path) -> Path:
    """A fresh ``runs/<UTC timestamp>-<short id>/`` directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    d = runs_dir / f"{stamp}-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    return d


@dataclasses.dataclass
class RunOutcome:
    """What :func:`execute` produced."""

    run_dir: Path
    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.data["status"] == "passed")

    @property
    def index(self) -> Path:
        return self.run_dir / "index.html"


def _execute_phase(phase: str, src: Path, params: dict[str, Any], pdir: Path, km_class: type,
                   cell_timeout: int | None, secrets: Sequence[tuple[str | None, str]]) -> dict[str, Any]:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    pdir.mkdir(parents=True)
    (pdir / PHASE_MARKER).write_text(json.dumps({"phase": phase}) + "\n", encoding="utf-8")
    out_nb = pdir / f"{phase}.ipynb"
    defaults = {n: p.default for n, p in runs_params.declared(src).items()}
    rec: dict[str, Any] = {"phase": phase, "title": runs_report.notebook_title(src), "parameters": params,
                           "defaults": defaults,
                           "notebook": f"{phase}/{out_nb.name}", "html": None, "figures": [], "results": None,
                           "error": None, "started": _now()}
    t0 = time.monotonic()
    try:
        papermill.execute_notebook(str(src), str(out_nb), parameters=params, cwd=str(pdir), kernel_name="python3",
                                   progress_bar=False, log_output=False, execution_timeout=cell_timeout,
                                   kernel_manager_class=km_class)
        rec["status"] = "passed"
    except PapermillExecutionError as e:
        rec["status"] = "failed"
        excerpt = "\n".join(str(e.source).splitlines()[:12])
        # "cell": the execution count the notebook shows (In [N]), the one number a reviewer sees everywhere;
        # "cell_index": the cell's position in the file (markdown cells included), for tools.
        rec["error"] = {"cell": e.exec_count, "cell_index": e.cell_index, "ename": e.ename,
                        "evalue": runs_scan.redact_text(str(e.evalue)[:500], secrets),
                        "source": runs_scan.redact_text(excerpt, secrets)}
    except Exception as e:  # a dead kernel, a timeout, a missing kernel: the phase failed, the run still reports
        rec["status"] = "failed"
        rec["error"] = {"cell": None, "cell_index": None, "ename": type(e).__name__,
                        "evalue": runs_scan.redact_text(str(e)[:500], secrets), "source": ""}
    rec["duration_s"] = round(time.monotonic() - t0, 2)
    rec["ended"] = _now()
    if out_nb.exists():
        html = pdir / f"{phase}.html"
        runs_report.render_html(out_nb, html)
        rec["html"] = f"{phase}/{html.name}"
        rec["figures"] = [str(p.relative_to(pdir.parent)) for p in runs_report.extract_figures(out_nb,
                                                                                              pdir / "figures")]
    res = pdir / RESULTS_FILE
    if res.exists():
        rec["results"] = json.loads(res.read_text(encoding="utf-8"))
        if rec["status"] == "passed" and rec["results"].get("passed") is False:
            rec["status"] = "failed"
            rec["error"] = {"cell": None, "cell_index": None, "ename": "VerdictFailed",
                            "evalue": "the phase recorded a failing check", "source": ""}
    return rec


def _missing_settings(chosen: Mapping[str, Path], params: Mapping[str, Mapping[str, Any]],
                      env: Mapping[str, str]) -> str | None:
    """The settings a phase declares it requires (a ``required`` parameter: ``"all"`` or names, as phase 00 does)
    that are missing or malformed in ``env``, all in one line with examples; None when there are none."""
    import ast

    for phase, src in chosen.items():
        decl = runs_params.declared(src).get("required")
        if decl is None:
            continue
        value = params[phase].get("required")
        if value is None:
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(decl.default)
        names = preflight.REQUIRED if value in (None, "all") else [n.strip() for n in str(value).split(",")
                                                                    if n.strip()]
        problems = preflight.settings_problems(env, names)
        if problems:
            return f"phase {phase} not started: {preflight.problems_text(problems)}"
    return None


def _acceptance(phases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    for ph in phases:
        if str(ph["phase"]).startswith(ACCEPTANCE_PHASE) and ph.get("results"):
            return list(ph["results"].get("criteria", [])) or None
    return None


def finish(run_dir: Path, data: dict[str, Any], secrets: Sequence[tuple[str | None, str]],
           exclude: Sequence[Path] = ()) -> None:
    """Write the index and ``run.json``, scan the whole run, and on a hit redact, fail the run and re-write both."""
    data["acceptance"] = _acceptance(data["phases"])
    runs_report.write_index(run_dir, data)
    runs_report.write_run_json(run_dir, data)
    findings = runs_scan.scan_dir(run_dir, secrets, exclude=exclude)
    files = sum(1 for p in run_dir.rglob("*") if p.is_file())
    data["scan"] = {"clean": not findings, "files": files, "findings": [f.to_dict() for f in findings]}
    if findings:
        runs_scan.redact(run_dir, findings, secrets)
        data["status"] = "failed"
        data["failure"] = ("secrets scan failed: " + "; ".join(f.describe() for f in findings[:5])
                           + (" ..." if len(findings) > 5 else "") + " (redacted; fix the cell so it prints no secret)")
    runs_report.write_index(run_dir, data)
    runs_report.write_run_json(run_dir, data)


def execute(phases: Sequence[str] = (), *, assignments: Sequence[str] = (), notebook_dir: Path | None = None,
            runs_dir: Path = Path("runs"), stack_dir: Path | None = None, use_stack: bool = True,
            cell_timeout: int | None = DEFAULT_CELL_TIMEOUT, environ: Mapping[str, str] | None = None,
            progress: Callable[[str], None] | None = None, time_scale: float = DEFAULT_TIME_SCALE) -> RunOutcome:
    """Run the chosen phase notebooks into a new run directory and report on them.

    Args:
        phases: phases to run (default all), see :func:`choose`.
        assignments: ``-p`` items, ``name=value`` or ``phase.name=value``.
        notebook_dir: where the phase notebooks are (default :func:`default_notebook_dir`).
        runs_dir: parent of the run directory.
        stack_dir: the devstack's directory (default ``runs_dir/.stack``).
        use_stack: bring up (or reuse) the offline devstack in offline mode.
        time_scale: the devstack broker's retry backoff scale when this run starts the stack.
        cell_timeout: seconds one cell may take.
        environ: the environment to start from (default: this process's).
        progress: called with one line per phase.

    Returns:
        The outcome; ``outcome.ok`` is False when a phase failed or the secrets scan found something.

    Raises:
        RunError: before anything runs, for an unknown phase or parameter or a badly typed value.
        ConfigError: before anything runs, listing every malformed setting; or the environment points at a
            devstack that is stopped.
        StackError: the devstack was needed and could not start.
    """
    say = progress or (lambda line: log.info("%s", line))
    nb_dir = notebook_dir or default_notebook_dir()
    chosen = choose(discover(nb_dir), phases)
    base = dict(os.environ if environ is None else environ)  # the kernels inherit it, as papermill's would
    stale = preflight.stale_stack(base)
    if stale:
        raise ConfigError("WHATRACK_STACK_DIR", stale)
    preflight.require_settings(base, ())  # every malformed setting at once, before any stack or kernel starts
    base_settings = Settings.from_env(base)
    params = runs_params.resolve(runs_params.parse_assignments(assignments), chosen, base_settings.secret_values(),
                                 mode=base_settings.mode)  # e.g. an offline-only fault refused in cloud mode
    stack_dir = stack_dir or runs_dir / ".stack"
    run_dir = new_run_dir(runs_dir)
    t0 = time.monotonic()
    data: dict[str, Any] = {"run_id": run_dir.name, "status": "running", "started": _now(), "ended": None,
                            "duration_s": 0.0, "mode": None, "stack": None, "failure": None, "scan": None,
                            "command": " ".join(["whatrack run", *phases, *(f"-p {a}" for a in assignments)]),
                            "notebook_dir": str(nb_dir), "provenance": runs_report.provenance(nb_dir),
                            "phases": [{"phase": s, "title": runs_report.notebook_title(p), "status": "not-run",
                                        "parameters": params[s], "html": None, "notebook": None, "figures": [],
                                        "results": None, "error": None, "duration_s": None}
                                       for s, p in chosen.items()]}
    secrets: list[tuple[str | None, str]] = secret_pairs(Settings.from_env(base))
    try:
        with run_environment(base, use_stack=use_stack, stack_dir=stack_dir, time_scale=time_scale) as (env, how):
            settings = Settings.from_env(env)
            secrets = secret_pairs(settings)
            scale = time_scale if how.startswith("started") else None  # a reused stack keeps its own
            data["mode"], data["stack"] = settings.mode, {"how": how, "time_scale": scale}
            km_class = _kernel_manager_class(env)
            data["failure"] = _missing_settings(chosen, params, env)  # before any kernel starts
            for i, (phase, src) in enumerate(chosen.items() if data["failure"] is None else ()):
                say(f"[{i + 1}/{len(chosen)}] {phase} ...")
                rec = _execute_phase(phase, src, params[phase], run_dir / phase, km_class, cell_timeout, secrets)
                data["phases"][i] = rec
                where = f" at cell {rec['error']['cell']}" if rec["error"] and rec["error"]["cell"] else ""
                say(f"[{i + 1}/{len(chosen)}] {phase} {rec['status']}{where} ({rec['duration_s']:.1f} s)")
                if rec["status"] != "passed":
                    err = rec["error"] or {}
                    evalue = " ".join(str(err.get("evalue")).split())[:300]  # one line, whatever the cell raised
                    data["failure"] = f"phase {phase} failed{where}: {err.get('ename')}: {evalue}"
                    break
    except StackError as e:
        data["failure"] = f"devstack: {e}"
    except WhatrackError as e:  # e.g. the stack's settings did not validate: the run still gets its index
        data["failure"] = f"{type(e).__name__}: {e}"
    data["status"] = "passed" if all(p["status"] == "passed" for p in data["phases"]) else "failed"
    data["ended"], data["duration_s"] = _now(), round(time.monotonic() - t0, 2)
    exclude = [stack_dir] if stack_dir.resolve().is_relative_to(run_dir.resolve()) else []
    finish(run_dir, data, secrets, exclude)
    say(f"run {data['status']}: {run_dir / 'index.html'}")
    return RunOutcome(run_dir, data)


def rerender(run_dir: Path) -> Path:
    """Re-render ``index.html`` and ``run.json`` of an existing run from its files (results re-read).

    Raises:
        RunError: ``run_dir`` holds no ``run.json``.
    """
    rj = run_dir / "run.json"
    if not rj.is_file():
        raise RunError(run_dir.name, f"{rj} not found: give the directory of a run (runs/<id>/)")
    data = json.loads(rj.read_text(encoding="utf-8"))
    for ph in data["phases"]:
        res = run_dir / ph["phase"] / RESULTS_FILE
        if res.is_file():
            ph["results"] = json.loads(res.read_text(encoding="utf-8"))
    data["acceptance"] = _acceptance(data["phases"])
    runs_report.write_run_json(run_dir, data)
    return runs_report.write_index(run_dir, data)
