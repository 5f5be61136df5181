"""whatrack.runs: parameters, executing tiny throwaway notebooks with papermill, reports, and the secrets scan."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nbformat
import pytest
from runs_support import cli, write_nb

from whatrack.devstack.stack import Stack
from whatrack.errors import RunError
from whatrack.runs import execute as runs
from whatrack.runs import params as runs_params
from whatrack.runs import scan as runs_scan
from whatrack.runs.execute import secret_pairs
from whatrack.settings import Settings

#: Loggers ``whatrack.logs.configure`` turns down.
QUIETED = ("httpx", "httpcore", "asyncio", "aiosqlite", "urllib3", "alembic")

# -- parameters ----------------------------------------------------------------------------------------------------


def test_declared_parameters_come_from_the_tagged_cell(tmp_path: Path) -> None:
    nb = write_nb(tmp_path / "00_a.ipynb", "pass")
    d = runs_params.declared(nb)
    assert list(d) == ["sample_size", "label", "ratio", "dry_run"]
    assert d["sample_size"].type_name == "int" and d["sample_size"].help == "messages"


def test_a_notebook_without_a_parameters_cell_is_an_error(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, tmp_path / "00_bare.ipynb")
    with pytest.raises(RunError, match="no cell tagged 'parameters'"):
        runs_params.declared(tmp_path / "00_bare.ipynb")


def test_values_are_coerced_to_the_declared_type(tmp_path: Path) -> None:
    nbs = {"00_a": write_nb(tmp_path / "00_a.ipynb"), "10_b": write_nb(tmp_path / "10_b.ipynb")}
    got = runs_params.resolve(runs_params.parse_assignments(
        ["sample_size=50", "ratio=2", "dry_run=no", "10_b.label=hello=world"]), nbs)
    assert got["00_a"] == {"sample_size": 50, "ratio": 2.0, "dry_run": False}
    assert got["10_b"] == {"sample_size": 50, "ratio": 2.0, "dry_run": False, "label": "hello=world"}
    assert type(got["00_a"]["ratio"]) is float


def test_unknown_parameter_names_the_known_ones(tmp_path: Path) -> None:
    nbs = {"00_a": write_nb(tmp_path / "00_a.ipynb")}
    with pytest.raises(RunError) as e:
        runs_params.resolve([(None, "sampel_size", "3")], nbs)
    assert "unknown parameter 'sampel_size'" in str(e.value)
    assert "dry_run, label, ratio, sample_size" in str(e.value)


@pytest.mark.parametrize(("item", "problem"), [
    ("sample_size=many", "is not a int"),
    ("dry_run=maybe", "is not a bool"),
    ("no_equals_sign", "expected name=value"),
    ("20.label=x", "phase '20' is not in this run"),
])
def test_bad_values_are_clear_errors(tmp_path: Path, item: str, problem: str) -> None:
    nbs = {"00_a": write_nb(tmp_path / "00_a.ipynb")}
    with pytest.raises(RunError, match=problem):
        runs_params.resolve(runs_params.parse_assignments([item]), nbs)


def test_a_secret_is_never_a_parameter(tmp_path: Path) -> None:
    nbs = {"00_a": write_nb(tmp_path / "00_a.ipynb")}
    with pytest.raises(RunError, match="secrets are never parameters") as e:
        runs_params.resolve([(None, "label", "qstash-token-value-123")], nbs, ["qstash-token-value-123"])
    assert "qstash-token-value-123" not in str(e.value)


def test_choose_phases_by_number_or_name(tmp_path: Path) -> None:
    for n in ("00_prepare", "10_redis_migration", "90_acceptance"):
        write_nb(tmp_path / f"{n}.ipynb")
    avail = runs.discover(tmp_path)
    assert list(runs.choose(avail, ["90", "redis_migration"])) == ["10_redis_migration", "90_acceptance"]
    assert list(runs.choose(avail, [])) == list(avail)
    with pytest.raises(RunError, match="phases: 00_prepare, 10_redis_migration, 90_acceptance"):
        runs.choose(avail, ["50"])


def test_unknown_parameter_exits_2_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_nb(tmp_path / "nb" / "00_a.ipynb", "pass")
    assert cli("run", "--notebooks", str(tmp_path / "nb"), "--no-stack", "-p", "nope=1") == 2
    assert "unknown parameter 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- record / load_results -----------------------------------------------------------------------------------------


def test_record_outside_a_run_writes_under_runs_lab(tmp_path: Path) -> None:
    import pandas as pd

    p = runs.record("10_x", {"checks": [runs.check("copied", True, "3 keys")],
                             "table": pd.DataFrame({"a": [1, 2]})})
    assert p == tmp_path / "runs" / "lab" / "10_x" / "results.json"
    got = runs.load_results()["10_x"]
    assert got["passed"] is True and got["table"] == [{"a": 1}, {"a": 2}]
    runs.record("20_y", {"checks": [runs.check("verified", False, "1 missing")]})
    assert runs.load_results()["20_y"]["passed"] is False


# -- runs ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_passing_run_writes_index_results_and_provenance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHATRACK_TEST_MARK", "from-the-runner")
    nb_dir = tmp_path / "nb"
    write_nb(nb_dir / "00_first.ipynb",
             "import os\nimport matplotlib.pyplot as plt\nimport whatrack.runs\n"
             "plt.plot([1, 2, sample_size])\nplt.show()",
             "assert os.environ['WHATRACK_TEST_MARK'] == 'from-the-runner'  # env reaches the kernel",
             "whatrack.runs.record('00_first', {'checks': [whatrack.runs.check('size', sample_size == 7, "
             "sample_size)]})", title="First phase")
    write_nb(nb_dir / "90_acceptance.ipynb",
             "import whatrack.runs\nr = whatrack.runs.load_results()\nassert r['00_first']['passed']",
             "whatrack.runs.record('90_acceptance', {'criteria': [whatrack.runs.criterion("
             "'no message lost', r['00_first']['passed'], 'ledger: 0 lost')]})", title="Acceptance")
    out = runs.execute(assignments=["sample_size=7"], notebook_dir=nb_dir, runs_dir=tmp_path / "runs",
                       use_stack=False)
    assert out.ok, out.data["failure"]
    d = out.run_dir
    assert d.parent == tmp_path / "runs"
    for f in ("index.html", "run.json", "00_first/00_first.ipynb", "00_first/00_first.html",
              "00_first/results.json", "90_acceptance/results.json"):
        assert (d / f).is_file(), f
    data = json.loads((d / "run.json").read_text())
    assert data["status"] == "passed" and data["mode"] == "offline"
    assert data["phases"][0]["parameters"] == {"sample_size": 7}
    assert data["phases"][0]["defaults"] == {"sample_size": "3", "label": "'x'", "ratio": "0.5", "dry_run": "True"}
    assert data["provenance"]["packages"]["papermill"]
    assert {"git_commit", "git_dirty", "python"} <= set(data["provenance"])
    assert data["scan"]["clean"] is True
    assert data["acceptance"] == [{"criterion": "no message lost", "verdict": "pass", "evidence": "ledger: 0 lost"}]
    fig = d / data["phases"][0]["figures"][0]
    assert fig.read_bytes().startswith(b"\x89PNG")
    index = (d / "index.html").read_text()
    assert "First phase" in index and "no message lost" in index and 'href="00_first/00_first.html"' in index
    assert "<code>7</code></td>\n<td>set by -p" in index and "<code>&#39;x&#39;</code></td>\n<td>default" in index
    # the executed notebook carries the injected parameter, not the environment
    executed = (d / "00_first" / "00_first.ipynb").read_text()
    assert "sample_size = 7" in executed and "from-the-runner" not in executed.split("injected-parameters")[1][:400]
    # re-rendering the index works from the files alone
    (d / "index.html").unlink()
    assert cli("report", str(d)) == 0 and (d / "index.html").is_file()


@pytest.mark.slow
def test_a_failing_cell_fails_the_run_and_the_index_names_it(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    nb_dir = tmp_path / "nb"
    write_nb(nb_dir / "00_ok.ipynb", "x = 1")
    write_nb(nb_dir / "10_broken.ipynb", "y = 2", "assert sample_size < 2, f'too many: {sample_size}'")
    write_nb(nb_dir / "20_after.ipynb", "z = 3")
    code = cli("run", "--notebooks", str(nb_dir), "--no-stack", "--runs-dir", str(tmp_path / "runs"))
    assert code == 1
    err = capsys.readouterr().err
    assert "phase 10_broken failed at cell 3: AssertionError: too many: 3" in err
    (d,) = (tmp_path / "runs").iterdir()
    data = json.loads((d / "run.json").read_text())
    assert [p["status"] for p in data["phases"]] == ["passed", "failed", "not-run"]
    e = data["phases"][1]["error"]
    assert (e["cell_index"], e["ename"], e["evalue"]) == (3, "AssertionError", "too many: 3")
    assert "assert sample_size < 2" in e["source"]
    index = (d / "index.html").read_text()
    assert "10_broken" in index and "Failed in cell 3" in index and "assert sample_size &lt; 2" in index
    assert (d / "10_broken" / "10_broken.html").is_file()


@pytest.mark.slow
def test_a_secret_printed_by_a_notebook_fails_the_run_without_showing_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    token = "qstash-planted-token-4f9a1c2e7b"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJodHRwczovL2V4YW1wbGUifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    nb_dir = tmp_path / "nb"
    write_nb(nb_dir / "00_leaky.ipynb", "x = 1", "import os\nprint('token is', os.environ['QSTASH_TOKEN'])",
             f"print('{jwt[:20]}' + '{jwt[20:]}')")
    monkeypatch.setenv("QSTASH_TOKEN", token)
    monkeypatch.setenv("QSTASH_URL", "http://127.0.0.1:1")
    out = runs.execute(notebook_dir=nb_dir, runs_dir=tmp_path / "runs", use_stack=False)
    assert not out.ok
    assert out.data["phases"][0]["status"] == "passed"  # the notebook ran; the scan failed the run
    found = {(f["file"], f["cell"], f["kind"], f["setting"]) for f in out.data["scan"]["findings"]}
    assert ("00_leaky/00_leaky.ipynb", 3, "secret value", "QSTASH_TOKEN") in found
    assert ("00_leaky/00_leaky.ipynb", 4, "JWT-shaped token", None) in found
    assert any(f[0] == "00_leaky/00_leaky.html" for f in found)
    assert "QSTASH_TOKEN" in out.data["failure"] and "00_leaky.ipynb cell 3" in out.data["failure"]
    for p in out.run_dir.rglob("*"):
        if p.is_file():
            b = p.read_bytes()
            assert token.encode() not in b and jwt.encode() not in b, p
    assert "secret value (QSTASH_TOKEN)" in (out.run_dir / "index.html").read_text()


@pytest.mark.slow
def test_a_run_on_the_running_devstack_reuses_it_and_leaks_none_of_its_secrets(devstack: Stack,
                                                                               tmp_path: Path) -> None:
    """``whatrack run --stack-dir`` on a running devstack (what a second ``make run`` does): the stack is reused,
    the kernels get its settings (TLS Redis answers), printing the settings shows none of its generated secrets."""
    from whatrack.cli import main

    nb_dir = tmp_path / "nb"
    write_nb(nb_dir / "00_probe.ipynb",
             "import whatrack.runs\nfrom whatrack import redis_tcp\nfrom whatrack.settings import Settings\n"
             "settings = Settings.from_env()\nprint(settings)",
             "r = redis_tcp.connect_sync(settings.upstash_redis_url, ca_bundle=settings.redis_ca_bundle)\n"
             "pong = r.ping()\nr.close()\nassert pong",
             "whatrack.runs.record('00_probe', {'checks': [whatrack.runs.check('target answers', pong, "
             "settings.mode)]})", title="Probe")
    write_nb(nb_dir / "90_acceptance.ipynb",
             "import whatrack.runs\nr = whatrack.runs.load_results()",
             "whatrack.runs.record('90_acceptance', {'criteria': [whatrack.runs.criterion("
             "'the stack answers', r['00_probe']['passed'], 'ping')]})", title="Acceptance")
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {n: logging.getLogger(n).level for n in QUIETED}
    try:  # the real entry point, which configures logging for the process: put the test session's back after it
        code = main(["run", "--notebooks", str(nb_dir), "--runs-dir", str(tmp_path / "runs"), "--stack-dir",
                     str(devstack.dir), "-p", "sample_size=2"])
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    (run_dir,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    data = json.loads((run_dir / "run.json").read_text())
    assert code == 0, data["failure"]
    assert data["mode"] == "offline" and data["stack"]["how"].startswith("reused")
    assert devstack.is_up()  # a reused stack is not stopped by the run
    assert data["phases"][0]["results"]["checks"][0]["passed"] is True
    assert data["acceptance"] == [{"criterion": "the stack answers", "verdict": "pass", "evidence": "ping"}]
    printed = (run_dir / "00_probe" / "00_probe.ipynb").read_text()
    assert "Settings(" in printed and "QSTASH_TOKEN=" in printed  # the settings were printed, masked
    assert data["scan"]["clean"] is True, data["scan"]
    secrets = [v for _, v in secret_pairs(Settings.from_env(devstack.env(), env_files=()))]
    assert len(secrets) >= 3  # the stack's generated secrets were among the scan's needles
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert not any(v.encode() in p.read_bytes() for v in secrets), p


def test_provenance_names_the_checkout_and_the_packages() -> None:
    """What the runs of the phase notebooks record about where they came from (git commit, package versions)."""
    from whatrack.runs import report

    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    prov = report.provenance(notebooks)
    if (notebooks.parent / ".git").exists():
        assert prov["git_commit"]
    assert prov["packages"]["bullmq"] and prov["packages"]["papermill"] and prov["python"]


# -- the scan itself -----------------------------------------------------------------------------------------------


def test_scan_finds_values_quoted_values_and_token_shapes(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("password=p%40ss%2Fword99 in a URL")
    (tmp_path / "d.html").write_text("<pre>k&lt;e&quot;y-9876543</pre>")
    (tmp_path / "b.log").write_text("Authorization: Bearer abcdefghijklmnop1234")
    (tmp_path / "c.txt").write_text("sig_7kYqQ3vR8nK2mP9wX4tL6 and nothing else")
    (tmp_path / "clean.txt").write_text("nothing to see; short=abc; eyJnot.a.jwt")
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "env").write_text("QSTASH_TOKEN=p@ss/word99")
    secrets = [("UPSTASH_REDIS_URL password", "p@ss/word99"), ("X", "abc"), ("CENTRIFUGO_API_KEY", 'k<e"y-9876543')]
    found = runs_scan.scan_dir(tmp_path, secrets, exclude=[tmp_path / "stack"])
    assert sorted((f.file, f.kind) for f in found) == [
        ("a.txt", "secret value"), ("b.log", "Bearer credential"), ("c.txt", "QStash signing key (sig_...)"),
        ("d.html", "secret value")]
    assert all("p@ss" not in f.describe() and "sig_7k" not in f.describe() for f in found)
    runs_scan.redact(tmp_path, found, secrets)
    assert runs_scan.scan_dir(tmp_path, secrets, exclude=[tmp_path / "stack"]) == []
    assert (tmp_path / "a.txt").read_text() == "password=******** in a URL"


def test_secret_pairs_name_per_instance_tokens() -> None:
    from whatrack.runs.execute import secret_pairs
    from whatrack.settings import Settings

    pairs = secret_pairs(Settings.from_env({"UAZAPI_INSTANCE_TOKENS": "sales:tok-aaa1,support:tok-bbb2",
                                            "QSTASH_TOKEN": "qs-token-1"}, env_files=()))
    assert ("UAZAPI_INSTANCE_TOKENS (support)", "tok-bbb2") in pairs
    assert ("QSTASH_TOKEN", "qs-token-1") in pairs
