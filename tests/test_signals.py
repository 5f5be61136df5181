"""Nothing left running: SIGTERM to a whatrack command stops its children (issue 12 item 5).

``whatrack lab`` is the widest case: it brings the offline devstack up (eleven processes in their own sessions) and
starts JupyterLab; a SIGTERM must leave none of them, nor the stack's recorded processes, running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

READY_TIMEOUT_S = 120.0


def _still_running(procs: list[psutil.Process]) -> list[str]:
    """The processes of ``procs`` that still run (the same process: psutil compares the start time), after a bounded
    wait for the ones already exiting."""
    _, alive = psutil.wait_procs(procs, timeout=10)
    out = []
    for p in alive:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return out


def _stack_pids(stack_dir: Path) -> list[psutil.Process]:
    state = json.loads((stack_dir / "state.json").read_text())
    out = []
    for part in state["parts"].values():
        pid = part.get("pid")
        if pid:
            try:
                out.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
    return out


def _wait_for(predicate: object, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if proc.poll() is not None:
            pytest.fail(f"whatrack lab exited ({proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"whatrack lab: no {what} after {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def test_sigterm_to_lab_stops_jupyter_and_the_stack(tmp_path: Path) -> None:
    stack_dir, nb_dir, log = tmp_path / "stack", tmp_path / "notebooks", tmp_path / "lab.log"
    nb_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WHATRACK_STACK_DIR",)}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "jupyter-runtime")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "whatrack.cli", "lab", "--no-browser",
                                 "--stack-dir", str(stack_dir), "--notebooks", str(nb_dir)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        _wait_for(lambda: "/lab?token=" in log.read_text(errors="replace"), READY_TIMEOUT_S, "JupyterLab URL",
                  proc, log)
        me = psutil.Process(proc.pid)
        tree = me.children(recursive=True)
        stack = _stack_pids(stack_dir)
        assert any("jupyterlab" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
        assert len(stack) >= 10, "the lab did not bring the devstack up"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        assert rc == 130, log.read_text()[-2000:]  # interrupted is not success
        left = _still_running(tree + stack)
        assert not left, f"left running after SIGTERM: {left}"
        assert "stopped" in log.read_text(), "the stack was not brought down"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in psutil.process_iter(["cmdline"]):
            if str(stack_dir) not in " ".join(p.info["cmdline"] or []):
                continue  # never leave a stack behind, even when the assertion above failed
            p.kill()


def test_sigterm_to_run_stops_the_kernel(tmp_path: Path) -> None:
    import nbformat

    nb_dir, log = tmp_path / "nb", tmp_path / "run.log"
    nb_dir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("wait_s: float = 120.0  # seconds")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# 00 Sleep"), params,
                nbformat.v4.new_code_cell("import time\ntime.sleep(wait_s)")]
    nbformat.write(nb, nb_dir / "00_sleep.ipynb")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "whatrack.cli", "run", "--no-stack", "--notebooks", str(nb_dir),
                                 "--runs-dir", str(tmp_path / "runs")], stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
    try:
        def kernels() -> list[psutil.Process]:
            try:
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return []
            return [p for p in tree if "ipykernel" in " ".join(p.cmdline())]

        _wait_for(lambda: kernels() and (tmp_path / "runs").exists(), READY_TIMEOUT_S, "kernel", proc, log)
        started = kernels()
        time.sleep(1.0)  # the kernel is running the sleeping cell (not a timing assertion: only lets it start)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc == 130, log.read_text()[-2000:]
        assert not _still_running(started), "the kernel outlived `whatrack run`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
