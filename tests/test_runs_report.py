"""Run reports read clean: self-contained HTML, no stderr box in a passing run, one cell numbering, pages that fit
1280 px (in headless Chromium when one is installed), ``whatrack report --compare``, and ``whatrack lab``'s settings."""

from __future__ import annotations

import contextlib
import fcntl
import html.parser
import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
import runs_support
from runs_support import cli

from whatrack import logs
from whatrack.devstack.servers import free_port
from whatrack.errors import RunError
from whatrack.runs import compare as runs_compare
from whatrack.runs import execute as runs
from whatrack.runs import report as runs_report


def write_nb(path: Path, *cells: str, title: str = "Tiny phase") -> Path:
    """A phase notebook whose one parameter is ``size`` (3)."""
    return runs_support.write_nb(path, *cells, params="size: int = 3  # a size", title=title)

STDERR_MIME = "application/vnd.jupyter.stderr"


class _Loads(html.parser.HTMLParser):
    """Every URL a page would fetch on load: script/img/iframe ``src``, stylesheet ``href``, CSS ``url(...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.stderr_outputs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("script", "img", "iframe", "audio", "video", "source", "embed") and a.get("src"):
            self.urls.append(str(a["src"]))
        if tag == "link" and a.get("href"):
            self.urls.append(str(a["href"]))
        if a.get("data-mime-type") == STDERR_MIME:
            self.stderr_outputs += 1

    def handle_data(self, data: str) -> None:  # <style> contents
        self.urls += re.findall(r"url\(\s*['\"]?([^'\")\s]+)", data)
        self.urls += re.findall(r"@import\s+['\"]([^'\"]+)", data)


def page_loads(page: Path) -> _Loads:
    p = _Loads()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def external(urls: list[str]) -> list[str]:
    """The URLs that leave the page's own files: a scheme other than data: / file:, or protocol-relative."""
    return [u for u in urls if re.match(r"(?i)^(https?:)?//", u)
            or (re.match(r"(?i)^[a-z][a-z0-9+.-]*:", u) and not u.lower().startswith(("data:", "file:")))]


# -- headless Chromium (when installed) ----------------------------------------------------------------------------


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no port, no
    extra package)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # the protocol's fixed descriptors: Chromium reads 3, writes 4 (kept by pass_fds)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--disable-extensions", "--disable-background-networking",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds, pass_fds=(3, 4))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return dict(json.loads(msg))

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            m = self._read(deadline)
            if m.get("id") == self._next:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return dict(m.get("result", {}))
            self.events.append(m)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            for m in self.events:
                if m.get("method") == method:
                    return m
            self.events.append(self._read(deadline))

    def open(self, page: Path, width: int = 1280) -> tuple[str, dict[str, Any]]:
        """Load ``page`` in a ``width`` px window; returns the session and the page's measures."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", session=s)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=s)
        self.send("Page.navigate", {"url": page.resolve().as_uri()}, session=s)
        self.wait_event("Page.loadEventFired")
        stderr = f"document.querySelectorAll('[data-mime-type=\"{STDERR_MIME}\"]').length"
        expression = ("({scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, "
                      "stderr: " + stderr + "})")
        got = self.send("Runtime.evaluate", {"returnByValue": True, "expression": expression}, session=s)
        return s, dict(got["result"]["value"])

    def requests(self) -> list[str]:
        return [m["params"]["request"]["url"] for m in self.events if m.get("method") == "Network.requestWillBeSent"]

    def errors(self) -> list[str]:
        out = []
        for m in self.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(str(p.get("args")))
            elif m.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(str(p["entry"].get("text")) + " " + str(p["entry"].get("url", "")))
            elif m.get("method") == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails")))
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, EOFError, TimeoutError):
            self.send("Browser.close")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


# -- a passing run reads clean -------------------------------------------------------------------------------------

PASSING = (
    "md:## Setting up",
    "import logging\nimport matplotlib.pyplot as plt\nimport pandas as pd\nfrom IPython.display import display\n"
    "import whatrack.runs\nfrom whatrack import logs\nlogs.configure('WARNING')\n"
    "pd.set_option('display.max_colwidth', 160)",
    "md:## A negative test: its expected log line is evidence, not a red box",
    "with logs.expected('whatrack.webhook', 'signature rejected') as rejected:\n"
    "    logging.getLogger('whatrack.webhook.handler').warning('[qstash] signature rejected: %s', 'bad signature')\n"
    "display(pd.DataFrame({'expected log line': rejected}))\nassert len(rejected) == 1",
    "wide = pd.DataFrame([{f'column_{i}': 'a-rather-long-value-' * 3 for i in range(24)}])\ndisplay(wide)",
    "plt.bar(['ok', 'lost'], [size, 0])\nplt.show()",
    "whatrack.runs.record('00_first', {'checks': [whatrack.runs.check('size', size == 3, f'size {size}'),\n"
    "    whatrack.runs.check('long evidence', True, '_'.join(['unbreakable'] * 40))]})",
)


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("passing")
    nb_dir = tmp / "nb"
    write_nb(nb_dir / "00_first.ipynb", *PASSING, title="00 First phase: the set-up")
    write_nb(nb_dir / "90_acceptance.ipynb",
             "import whatrack.runs\nr = whatrack.runs.load_results()",
             "whatrack.runs.record('90_acceptance', {'criteria': [whatrack.runs.criterion("
             "'no message lost', r['00_first']['passed'], '0 lost of 3')]})", title="90 Acceptance")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        out = runs.execute(notebook_dir=nb_dir, runs_dir=tmp / "runs", use_stack=False)
    assert out.ok, out.data["failure"]
    return out.run_dir


@pytest.mark.slow
def test_a_passing_run_shows_no_stderr_and_loads_nothing_external(passing_run: Path) -> None:
    pages = [passing_run / "index.html", passing_run / "00_first" / "00_first.html",
             passing_run / "90_acceptance" / "90_acceptance.html"]
    for page in pages:
        loads = page_loads(page)
        assert loads.stderr_outputs == 0, page
        assert external(loads.urls) == [], page
        text = page.read_text(encoding="utf-8")
        assert "require.js" not in text and "MathJax" not in text and "cdnjs" not in text, page
    phase = (passing_run / "00_first" / "00_first.html").read_text(encoding="utf-8")
    assert "WARNING whatrack.webhook.handler [qstash] signature rejected: bad signature" in phase  # as a table row
    assert "data:image/png;base64," in phase  # the figure is inside the page


@pytest.mark.slow
def test_the_index_has_titles_without_numbers_iso_times_and_the_dirty_flag(passing_run: Path) -> None:
    data = json.loads((passing_run / "run.json").read_text())
    assert [p["title"] for p in data["phases"]] == ["First phase: the set-up", "Acceptance"]
    index = (passing_run / "index.html").read_text(encoding="utf-8")
    assert "00 First" not in index and "<code>00_first</code></a></td><td>First phase: the set-up</td>" in index
    times = re.findall(r"<time>([^<]*)</time>", index)
    assert len(times) >= 4 and all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t) for t in times), times
    assert "<th>git dirty</th>" in index


@pytest.mark.slow
def test_a_passing_run_fits_1280_px_in_headless_chromium(passing_run: Path, tmp_path: Path) -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH: the static checks above still ran "
                    "(install one, e.g. apt-get install chromium, to load the pages in a real browser)")
    browser = Browser(binary, tmp_path / "profile")
    try:
        for page in (passing_run / "index.html", passing_run / "00_first" / "00_first.html"):
            browser.events.clear()
            _, got = browser.open(page)
            assert got["stderr"] == 0, page
            assert got["scrollWidth"] <= got["innerWidth"] == 1280, (page, got)
            assert [u for u in browser.requests() if not u.startswith(("file:", "data:", "about:"))] == [], page
            assert browser.errors() == [], page
    finally:
        browser.close()


# -- one numbering of cells ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_run_names_the_cell_by_the_number_the_notebook_shows(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    nb_dir = tmp_path / "nb"
    write_nb(nb_dir / "00_broken.ipynb", "md:## first", "x = 1", "md:## second", "md:## third",
             "assert size < 2, f'too many: {size}'")
    assert cli("run", "--notebooks", str(nb_dir), "--no-stack", "--runs-dir", str(tmp_path / "runs")) == 1
    # cells: title, parameters (In [1]), md, x = 1 (In [2]), md, md, the assert (In [3]): the 7th cell of the file
    assert "phase 00_broken failed at cell 3: AssertionError" in capsys.readouterr().err
    (d,) = (tmp_path / "runs").iterdir()
    err = json.loads((d / "run.json").read_text())["phases"][0]["error"]
    assert (err["cell"], err["cell_index"]) == (3, 6)
    assert "Failed in cell 3\n(<code>In [3]</code> in the notebook)" in (d / "index.html").read_text()
    nb = nbformat.read(d / "00_broken" / "00_broken.ipynb", as_version=4)  # type: ignore[no-untyped-call]
    (failing,) = [c for c in nb.cells if "assert size" in c.source]
    assert failing.execution_count == 3
    assert re.search(r"jp-InputPrompt[^>]*>In\s\[3\]:</div>.{0,400}?>assert<",  # the page's prompt, same number
                     (d / "00_broken" / "00_broken.html").read_text(), re.S)


# -- logs.expected -------------------------------------------------------------------------------------------------


def test_expected_log_lines_are_collected_and_the_others_still_written(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("WARNING", ["s3cret-value-1"])
        log = logging.getLogger("whatrack.webhook.handler")
        with logs.expected("whatrack.webhook", "signature rejected") as lines:
            log.warning("[qstash] signature rejected: key %s", "s3cret-value-1")
            log.warning("[webhook] non-retryable payload: %s", "no id")  # not expected: still written
            logging.getLogger("whatrack.store").warning("signature rejected elsewhere")  # another logger
        log.warning("[qstash] signature rejected: after the block")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], root.level = saved
    assert lines == ["WARNING whatrack.webhook.handler [qstash] signature rejected: key ********"]
    assert "non-retryable payload" in err and "signature rejected elsewhere" in err and "after the block" in err
    assert "key ********" not in err and "s3cret" not in err


# -- compare two runs ----------------------------------------------------------------------------------------------


def _run(run_id: str, *, lost: int, p99: float, per_s: float, verdict: str, duration: float) -> dict[str, Any]:
    return {
        "run_id": run_id, "status": "passed" if verdict == "pass" else "failed", "started": "2026-12-04T10:00:00+00:00",
        "command": "whatrack run", "mode": "offline", "duration_s": duration, "failure": None,
        "provenance": {"git_commit": "abc", "git_dirty": run_id == "B"},
        "acceptance": [{"criterion": "No message is lost", "verdict": verdict, "evidence": f"{lost} lost"}],
        "phases": [
            {"phase": "30_validation", "status": "passed" if verdict == "pass" else "failed", "duration_s": 40.0,
             "results": {"checks": [{"name": "no message lost", "passed": lost == 0, "evidence": f"{lost} lost"}],
                         "load": {"messages": 300, "accepted_per_s": per_s, "commit_p99_ms": p99, "passed": True},
                         "ledger": {"ok": 300 - lost, "lost": lost, "duplicated": 0, "total": 300},
                         "faults": [{"scenario": "endpoint_sigkill", "passed": True, "lost": 0, "ok": 100}]}},
        ],
    }


def test_compare_gives_each_verdict_and_each_figure_with_its_change() -> None:
    a = _run("A", lost=0, p99=200.0, per_s=50.0, verdict="pass", duration=100.0)
    b = _run("B", lost=2, p99=150.0, per_s=50.0, verdict="fail", duration=80.0)
    c = runs_compare.compare(a, b)
    assert c["status_changed"] is True and (c["a"]["git_dirty"], c["b"]["git_dirty"]) == (False, True)
    rows = {r["criterion"]: r for r in c["criteria"]}
    assert rows["acceptance: No message is lost"] == {"criterion": "acceptance: No message is lost", "a": "pass",
                                                      "b": "fail", "changed": True}
    assert rows["30_validation: no message lost"]["changed"] is True
    figs = {f["figure"]: f for f in c["figures"]}
    assert figs["30_validation ledger.lost"] == {"figure": "30_validation ledger.lost", "a": 0.0, "b": 2.0,
                                                      "delta": 2.0, "delta_pct": None, "better": False}
    assert (figs["30_validation load.commit_p99_ms"]["delta"], figs["30_validation load.commit_p99_ms"]["delta_pct"],
            figs["30_validation load.commit_p99_ms"]["better"]) == (-50.0, -25.0, True)
    assert figs["30_validation load.accepted_per_s"]["delta"] == 0 and figs["run duration_s"]["delta_pct"] == -20.0
    assert figs["30_validation faults[endpoint_sigkill].lost"]["delta"] == 0
    assert "30_validation load.passed" not in figs  # booleans are verdicts, not figures
    assert c["changed"] == {"criteria": 2, "figures": 4}  # duration, lost, ok, p99


def test_report_compare_writes_a_self_contained_page_and_json(tmp_path: Path) -> None:
    for rid, lost in (("A", 0), ("B", 1)):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "run.json").write_text(json.dumps(
            _run(rid, lost=lost, p99=100.0, per_s=40.0, verdict="pass" if not lost else "fail", duration=60.0)))
    out = tmp_path / "cmp"
    assert cli("report", "--compare", str(tmp_path / "A"), str(tmp_path / "B"), "-o", str(out)) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["a"]["run_id"] == "A" and data["b"]["run_id"] == "B"
    page = out / "compare.html"
    text = page.read_text()
    assert '<code>30_validation ledger.lost</code></td>\n<td class="num">0</td>\n<td class="num">1</td>' in text
    assert 'class="num worse">+1</td>' in text and "No message is lost" in text
    assert external(page_loads(page).urls) == [] and "<script" not in text


def test_report_compare_of_a_directory_without_run_json_is_a_clear_error(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "A").mkdir()
    assert cli("report", "--compare", str(tmp_path / "A"), str(tmp_path / "A")) == 2
    assert "run.json not found: give a run directory" in capsys.readouterr().err
    with pytest.raises(RunError, match=r"not a run's run\.json"):
        (tmp_path / "x.json").write_text("[]")
        runs_compare.load_run(tmp_path / "x.json")


# -- whatrack lab --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lab(nb_dir: Path, tmp: Path) -> Iterator[tuple[str, str]]:
    port, token = free_port(), "lab-test-token-0123456789"
    cmd = runs.lab_command(nb_dir, tmp / "settings", no_browser=True)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "rt"), "JUPYTER_DATA_DIR": str(tmp / "data"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp / "user-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "ws")}
    log = (tmp / "lab.log").open("wb")  # closed below, after the server
    proc = subprocess.Popen([*cmd, f"--port={port}", f"--IdentityProvider.token={token}"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/api/status", params={"token": token}, timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (tmp / "lab.log").read_text()
            time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_lab_shows_only_the_notebooks_and_asks_nothing_about_news(tmp_path: Path) -> None:
    nb_dir = tmp_path / "notebooks"
    write_nb(nb_dir / "00_a.ipynb", "x = 1")
    (nb_dir / "conftest.py").write_text("# nbval hooks\n")
    (nb_dir / "__pycache__").mkdir()
    with _lab(nb_dir, tmp_path) as (base, token):
        headers = {"Authorization": f"token {token}"}
        listing = httpx.get(f"{base}/api/contents", headers=headers, timeout=10).json()
        assert sorted(c["name"] for c in listing["content"]) == ["00_a.ipynb"]
        plugin = "@jupyterlab/apputils-extension:notification"
        got = httpx.get(f"{base}/lab/api/settings/{plugin}", headers=headers, timeout=10).json()
        assert got["settings"].get("fetchNews", got["schema"]["properties"]["fetchNews"]["default"]) == "false"
        assert got["schema"]["properties"]["fetchNews"]["default"] == "false"  # our override, not "none" (ask)


def test_lab_command_keeps_the_server_on_loopback(tmp_path: Path) -> None:
    cmd = runs.lab_command(tmp_path, tmp_path / "s")
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"] and "--ServerApp.ip=127.0.0.1" in cmd
    assert "--ContentsManager.hide_globs=conftest.py" in cmd
    overrides = json.loads((tmp_path / "s" / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"
    assert runs_report.notebook_title(write_nb(tmp_path / "10_x.ipynb", title="10 Redis migration")) == \
        "Redis migration"
