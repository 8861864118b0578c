from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest

from kdsearch.report import build_report
from kdsearch.study import open_storage

from .conftest import SEARCH_VALUES, run_cli, write_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def test_trials_prints_a_table_or_writes_csv(tmp_path: Path) -> None:
    write_study(tmp_path)
    shown = run_cli("trials", "s", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].split() == [
        "number",
        "state",
        "value",
        "epochs",
        "distill.kd.temperature",
    ]
    # accuracy in percent as `run` prints it; "-" where there is no value
    rows = [line.split()[:4] for line in shown.stdout.splitlines()[1:]]
    assert rows[1] == ["1", "COMPLETE", "90.00%", "2"] and rows[4] == ["4", "FAIL", "-", "0"]
    url = f"sqlite:///{tmp_path}/studies/s.db"
    optuna.create_study(study_name="only-running", storage=url).ask()  # no value, no epochs yet
    running = run_cli("trials", "only-running", "--storage", url, cwd=tmp_path)
    assert running.stdout.splitlines()[1].split() == ["0", "RUNNING", "-", "-"], running.stdout
    written = run_cli("trials", "s", "--csv", "t.csv", cwd=tmp_path)
    assert written.returncode == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table["state"]) == [state for state, _ in SEARCH_VALUES.values()]
    assert list(table["epochs"]) == [len(v) for _, v in SEARCH_VALUES.values()]


def test_a_missing_study_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("trials", "nothere", cwd=tmp_path)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == "kdsearch: error: no study database at studies/nothere.db; pass --storage URL"
    )
    write_study(tmp_path)
    proc = run_cli(
        "report", "other", "--storage", f"sqlite:///{tmp_path}/studies/s.db", cwd=tmp_path
    )
    assert (
        proc.returncode == 2
        and "no study named 'other' in this storage (it holds: s)" in proc.stderr
    )


def test_a_file_that_is_not_a_study_database_is_left_as_it_was(tmp_path: Path) -> None:
    mine = tmp_path / "mine.db"
    with closing(sqlite3.connect(mine)) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.commit()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text.db").write_text("not a database\n")
    for file in ("mine.db", "empty", "text.db"):
        before = (tmp_path / file).read_bytes()
        for args in (
            ["trials", "s", "--storage", f"sqlite:///{file}"],
            ["dashboard", file, "--port", "0"],
        ):
            proc = run_cli(*args, cwd=tmp_path)
            assert proc.returncode == 2, proc.stderr
            assert f"{file} is not a study database" in proc.stderr
        assert (tmp_path / file).read_bytes() == before


def test_a_mistyped_storage_or_output_creates_nothing(tmp_path: Path) -> None:
    write_study(tmp_path)
    for command in ("promote", "export", "report", "trials"):
        extra = ["--out", "x"] if command == "export" else []
        proc = run_cli(command, "s", "--storage", "sqlite:///studies/typo.db", *extra, cwd=tmp_path)
        assert proc.returncode == 2 and "no study database at studies/typo.db" in proc.stderr
    proc = run_cli("dashboard", "studies/typo.db", "--port", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "no study database at studies/typo.db" in proc.stderr
    (tmp_path / "folder").mkdir()
    for args, expected in (
        (["report", "s", "--out", "nowhere/r.html"], "--out nowhere/r.html: no folder nowhere"),
        (["report", "s", "--out", "folder"], "--out folder is a folder; name a file"),
        (["trials", "s", "--csv", "nowhere/t.csv"], "--csv nowhere/t.csv: no folder nowhere"),
    ):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "space.yaml", "studies"]
    assert [p.name for p in (tmp_path / "studies").iterdir()] == ["s.db"]


def test_a_study_kdsearch_did_not_write_is_one_line(tmp_path: Path) -> None:
    url = write_study(tmp_path)
    optuna.create_study(study_name="other", storage=url).optimize(lambda t: 1.0, n_trials=1)
    for command, extra in (("promote", []), ("export", ["--out", "x"])):
        proc = run_cli(command, "other", "--storage", url, *extra, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "study 'other' was not written by `kdsearch run`" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_report_holds_every_section_and_needs_no_network(tmp_path: Path) -> None:
    url = write_study(tmp_path)
    page = build_report(open_storage(url), "s")
    for title in (
        "Optimization history",
        "Learning curves",
        "Parallel coordinates",
        "Parameter importances",
        "distill.kd.temperature against the metric",
    ):
        assert f"<h2>{title}</h2>" in page
    assert page.count("Plotly.newPlot") == 5
    assert "<script src=" not in page, "plotly.js is inlined, not fetched"


@needs_chromium
def test_report_figures_are_drawn_in_a_browser(tmp_path: Path) -> None:
    write_study(tmp_path)
    assert run_cli("report", "s", "--out", "r.html", cwd=tmp_path).returncode == 0
    dom = chromium("--dump-dom", (tmp_path / "r.html").as_uri(), profile=tmp_path / "p").stdout
    assert dom.count('class="main-svg"') >= 5, "plotly drew an SVG for every figure"
    assert "trial 1" in dom  # hover labels of the learning curves are in the drawn traces


def _serve(tmp_path: Path, storage: str = "studies/s.db") -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdsearch.cli", "dashboard", storage, "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/dashboard/", line)
    assert match, line + proc.stderr.read() if proc.stderr else line
    return proc, int(match.group(1))


def _get(url: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_dashboard_serves_the_study_on_loopback(tmp_path: Path) -> None:
    write_study(tmp_path)
    (tmp_path / "s").mkdir()  # a folder of the same name does not hide the study
    proc, port = _serve(tmp_path, "s")  # a study name, as the other commands take
    try:
        summaries = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["s"]  # type: ignore[index,union-attr]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}")  # type: ignore[index]
        trials = detail["trials"]
        assert [t["state"] for t in trials] == [s.capitalize() for s, _ in SEARCH_VALUES.values()]  # type: ignore[union-attr]
        assert {"recipe", "ray_trial_id", "epochs"} <= {
            a["key"] for a in detail["union_user_attrs"]
        }  # type: ignore[union-attr]
        assert detail["has_intermediate_values"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@needs_chromium
def test_dashboard_page_renders_the_trials(tmp_path: Path) -> None:
    write_study(tmp_path)
    proc, port = _serve(tmp_path)
    try:
        dom = chromium(
            "--dump-dom",
            f"http://127.0.0.1:{port}/dashboard/studies/1/trials",
            profile=tmp_path / "p",
        ).stdout
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for number in SEARCH_VALUES:
        assert f"Trial {number}" in dom


def test_dashboard_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    write_study(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("dashboard", "studies/s.db", "--port", str(port), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(
        f"kdsearch: error: cannot listen on 127.0.0.1:{port}"
    )
