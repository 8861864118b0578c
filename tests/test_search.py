"""Real searches on Ray: the study must tell the truth, survive kill -9 and Ctrl-C, and work on a
Ray cluster and on PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import optuna
import psutil
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState

from kdsearch.commands.common import same_teacher
from kdsearch.errors import StudyError
from kdsearch.models import build_model, count_parameters
from kdsearch.space import SearchSpace
from kdsearch.study.contents import trial_recipe
from kdsearch.study.record import Record
from kdsearch.teacher import TeacherFiles, weights_digest

from .conftest import SMALL_SPACE, CliHere, auto_on_cpu, run_cli, write_study

pytestmark = pytest.mark.slow

SPACE = """
study: {name: tiny}
base:
  data: {dataset: digits, subset: 600, val_fraction: 0.3}
  teacher: {arch: resnet8, train: {epochs: 3, lr: 0.1}}
  student: {arch: resnet8}
  schedule: {epochs: 4, kind: cosine}
  device: cpu
space:
  optim.lr: {type: categorical, choices: [0.1, 0.002, 0.05, 1.0e12]}
  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}
search: {trials: 8, concurrent: 2, per_trial: {cpu: 1}, sampler: random, seed: 0}
asha: {max_epochs: 4, grace_epochs: 1, reduction_factor: 2}
"""
MAX_EPOCHS = 4
# The seeded random sampler draws the learning rates' indices 3, 0, 3, 3, 1, 2, 3, 2. The
# `search` fixture runs one trial at a time, so the outcome does not hang on which of two fresh
# workers warms up first: trial 1 (0.1, the first at every rung) completes, and trial 4 (0.002,
# about chance after one epoch) reaches the first rung after it and is stopped there.


def kdsearch(*args: str, cwd: Path, env: dict[str, str], **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdsearch.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )  # type: ignore[call-overload]


def workdir(root: Path) -> tuple[Path, dict[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "space.yaml").write_text(SPACE)
    return root, dict(os.environ, KDSEARCH_CACHE_DIR=str(root / "cache"), COLUMNS="200")


def trials(root: Path, name: str = "tiny") -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root}/studies/{name}.db").trials


# the tests that read the one search below run on one worker of a parallel run, which runs it once
ONE_SEARCH = pytest.mark.xdist_group("tiny-search")


@pytest.fixture(scope="module")
def search(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    root, env = workdir(tmp_path_factory.mktemp("search"))
    (root / "space.yaml").write_text(SPACE.replace("concurrent: 2", "concurrent: 1"))
    proc = kdsearch("run", "space.yaml", cwd=root, env=env)
    out, err = proc.communicate(timeout=600)
    return root, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@ONE_SEARCH
def test_search_ends_with_every_trial_finished(
    search: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, proc = search
    assert proc.returncode == 0, proc.stderr
    # stderr is not a terminal here: the status comes as a line whenever trials have finished,
    # as in a log, and the last one says 8/8
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trials ")]
    finished = [int(line.split("/")[0].removeprefix("trials ")) for line in lines]
    assert finished == sorted(set(finished)) and finished[0] > 0 and finished[-1] == 8, lines
    assert len(finished) >= 2, "a line before the last"
    states = [t.state for t in trials(root)]
    assert len(states) == 8 and TrialState.RUNNING not in states


@ONE_SEARCH
def test_resuming_a_finished_search_runs_nothing_and_says_so(
    search: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, _ = search
    env = dict(os.environ, KDSEARCH_CACHE_DIR=str(root / "cache"), COLUMNS="200")
    before = [(t.number, t.state, t.datetime_complete) for t in trials(root)]
    for extra in ([], ["--trials", "4"]):
        proc = kdsearch("run", "space.yaml", "--resume", *extra, cwd=root, env=env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        asked = extra[-1] if extra else "8"
        assert f"already holds 8 trials ({asked} asked for); none to run" in err
        assert "trials 8/8: " in err and "teacher" not in err, "no data, teacher or Ray"
    assert [(t.number, t.state, t.datetime_complete) for t in trials(root)] == before


@ONE_SEARCH
def test_asha_stopped_trials_are_pruned_and_full_ones_complete(
    search: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, _ = search
    done = [t for t in trials(root) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert {t.state for t in done} == {TrialState.COMPLETE, TrialState.PRUNED}
    for t in done:
        epochs = int(t.user_attrs["epochs"])
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1)), (
            "one value per epoch, the last included"
        )
        if t.state == TrialState.COMPLETE:
            assert epochs == MAX_EPOCHS and t.value == t.intermediate_values[MAX_EPOCHS]
        else:
            assert epochs < MAX_EPOCHS and t.value == t.intermediate_values[epochs]


def test_a_search_one_trial_at_a_time_gives_the_same_study_when_run_again(
    tmp_path: Path,
) -> None:
    """As the README says of `search.seed`: on a CPU, one trial at a time, the same space run
    again proposes, trains, stops and records the same trials, TPE's own proposals past its
    10 random ones included (12 trials)."""
    space = (
        SPACE.replace("sampler: random", "sampler: tpe")
        .replace("trials: 8, concurrent: 2", "trials: 12, concurrent: 1")
        .replace("max_epochs: 4", "max_epochs: 2")
        .replace("epochs: 4, kind", "epochs: 2, kind")
    )
    studies = []
    for run in ("first", "again"):
        root, env = workdir(tmp_path / run)
        (root / "space.yaml").write_text(space)
        env["KDSEARCH_CACHE_DIR"] = str(tmp_path / "cache")  # one teacher for both
        proc = kdsearch("run", "space.yaml", cwd=root, env=env)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        studies.append(
            [(t.number, t.state, t.params, t.value, t.intermediate_values) for t in trials(root)]
        )
    assert len(studies[0]) == 12 and studies[0] == studies[1]
    assert {state for _, state, *_ in studies[0]} >= {TrialState.COMPLETE, TrialState.PRUNED}


@ONE_SEARCH
def test_a_trial_whose_loss_went_nan_is_failed_with_its_reason(
    search: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, proc = search
    diverged = [t for t in trials(root) if t.params["optim.lr"] == 1.0e12]
    assert diverged, "the seeded sampler draws the diverging learning rate at least once"
    for t in diverged:
        assert t.state == TrialState.FAIL
        assert t.user_attrs["failure"].startswith(
            "NonFiniteLoss: the training loss became nan in epoch 1"
        )
    others = [t for t in trials(root) if t.params["optim.lr"] != 1.0e12]
    assert all(t.state != TrialState.FAIL for t in others)
    assert "failed #" in proc.stderr


@ONE_SEARCH
def test_trials_and_study_carry_their_attributes(
    search: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, _ = search
    all_trials = trials(root)
    ids = [t.user_attrs["ray_trial_id"] for t in all_trials]
    assert len(set(ids)) == len(ids)
    params = count_parameters(build_model("resnet8", 10, 1))
    for t in all_trials:
        recipe = trial_recipe(t)
        assert recipe.optim.lr == t.params["optim.lr"] and recipe.schedule.epochs == MAX_EPOCHS
        assert t.user_attrs["wall_seconds"] > 0 and t.user_attrs["attempt"] == 1
        assert t.user_attrs["training_attempt"] == 1, "Tune's start of the trial is recorded"
        if t.state != TrialState.FAIL:
            assert t.user_attrs["images_per_sec"] > 0 and t.user_attrs["student_params"] == params
            assert t.user_attrs["threads"] == 1, "per_trial.cpu: 1"
            assert t.user_attrs["device"] == "cpu"  # what the recipe's device became there
            # and what its `precision: auto` became: bf16 on a CPU that multiplies bf16
            assert t.user_attrs["precision"] == auto_on_cpu()
            assert t.user_attrs["onednn_cap"] == ""  # none set on oneDNN's instruction set
            busy = t.user_attrs["train_seconds"] + t.user_attrs["eval_seconds"]
            assert 0 < busy < t.user_attrs["wall_seconds"]
            per_epoch, rest = divmod(t.user_attrs["train_images"], t.user_attrs["epochs"])
            assert per_epoch > 0 and rest == 0, "the same whole batches every epoch"
        else:  # its busy time to the last epoch it finished is reported too (overhead.py and
            # teacher_cache.py read it): none, for these, which diverge in epoch 1
            assert (t.user_attrs["train_seconds"], t.user_attrs["train_images"]) == (0, 0)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root}/studies/tiny.db")
    assert study.user_attrs["space"] == (root / "space.yaml").read_text()
    assert study.user_attrs["kdsearch_version"] and study.user_attrs["metric"] == "val_acc"


def _wait_for(
    condition: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen[str],
    every: float = 0.5,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the search did not get there in time"
        time.sleep(every)


def _finished_and_running(root: Path) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    try:
        ts = trials(root)
    except Exception:  # the study is not created yet
        return [], []
    return [t for t in ts if t.state.is_finished()], [
        t for t in ts if t.state == TrialState.RUNNING
    ]


def running(title: str, session: int) -> bool:
    """Whether some process of session `session` has a command line starting with `title` (Ray
    names a worker by the task it runs). Only that session's: a search of a test running beside
    this one has workers of the same name."""
    for p in in_session(session):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith(title):
                return True
    return False


def scratch_of(pid: int) -> list[Path]:
    """The temporary folders the search driven by process `pid` left behind."""
    host = socket.gethostname()
    return list(Path(tempfile.gettempdir()).glob(f"kdsearch-search-{host}-{pid}-*"))


def test_a_folder_handed_over_is_removed_only_once_its_lock_is_released(tmp_path: Path) -> None:
    from kdsearch.leftover import remove_once_released

    folder = tmp_path / "scratch"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the driver holds it until it ends
        remove_once_released(folder)
        time.sleep(1.0)
        assert folder.exists(), "removed while its driver still held it"
        (folder / "tune").mkdir()  # the driver's other threads still write in it meanwhile
        (folder / "tune" / "experiment_state.json").write_text("{}")
        time.sleep(0.5)
        assert (folder / "tune").exists(), "removed while its driver still held it"
    finally:
        os.close(fd)
    for what in ("removed once released", "removed again where a dying worker wrote in it"):
        deadline = time.monotonic() + 30
        while folder.exists():
            assert time.monotonic() < deadline, f"not {what}"
            time.sleep(0.05)
        if what == "removed once released":
            time.sleep(0.5)
            (folder / "teacher-outputs").mkdir(parents=True)


HANDS_OVER = """
import shutil, sys, time
from pathlib import Path
from kdsearch.leftover import SETTLE_S, remove_once_released

folder = Path(sys.argv[1])
shutil.rmtree(folder)  # as a stopped search's driver removes its folder, then hands it over
remove_once_released(folder)
time.sleep(SETTLE_S + 1.5)  # Tune's syncing thread, slow on a loaded machine, writes it again
(folder / "tune").mkdir(parents=True)
(folder / "tune" / "experiment_state.json").write_text("{}")
time.sleep(0.5)
"""


def test_a_folder_written_by_its_driver_after_a_pause_is_removed_again(tmp_path: Path) -> None:
    """A search stopped by a second Ctrl-C left its scratch folder behind in CI again: its
    remover kept the folder removed until nothing had written it for 2 s, but the driver's own
    threads may write it later than that on a loaded machine, until the driver ends. The remover
    now keeps removing it until the driver has ended, and settles only then."""
    folder = tmp_path / "scratch"
    (folder / "teacher-outputs").mkdir(parents=True)
    driver = subprocess.run(
        [sys.executable, "-c", HANDS_OVER, str(folder)], capture_output=True, text=True, timeout=60
    )
    assert driver.returncode == 0, driver.stderr
    deadline = time.monotonic() + 30
    while folder.exists():
        assert time.monotonic() < deadline, "written after the pause, and left"
        time.sleep(0.05)


def test_a_search_removes_only_its_own_hosts_folders_of_dead_drivers() -> None:
    from kdsearch.search.tuner import scratch_folder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp, host = Path(tempfile.gettempdir()), socket.gethostname()
    left = tmp / f"kdsearch-search-{host}-{dead.pid}-x1"
    live = tmp / f"kdsearch-search-{host}-{os.getppid()}-x2"  # a live process's
    # Trials of a search driven from another machine (whose name starts with this one's): its
    # driver's pid means nothing here.
    remote = tmp / f"kdsearch-search-{host}-b-{dead.pid}-x3"
    # A live search in a container on this host's network sharing its /tmp: its PID means
    # nothing here either, but it holds its folder's lock.
    beside = tmp / f"kdsearch-search-{host}-{dead.pid}-x4"
    # Left by an earlier process under this one's PID (a restarted container's PID 1)
    mine = tmp / f"kdsearch-search-{host}-{os.getpid()}-x5"
    for folder in (left, live, remote, beside, mine):
        (folder / "teacher-outputs").mkdir(parents=True)
    held = os.open(beside, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with scratch_folder() as new:
            assert not left.exists() and not mine.exists()
            assert live.is_dir() and remote.is_dir() and beside.is_dir()
            assert new.name.startswith(f"kdsearch-search-{host}-{os.getpid()}-")
            with scratch_folder() as second:  # this one, held, is no earlier process's
                assert new.is_dir() and second != new
        assert not new.exists() and not second.exists(), "removed as the search ends"
    finally:
        os.close(held)
        for folder in (left, live, remote, beside, mine):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("ends", ["stopped", "finished"])
def test_a_stopped_searchs_folder_written_after_its_removal_is_removed_again(ends: str) -> None:
    """A search stopped by a second Ctrl-C left its scratch folder behind once in CI: the
    removal as the search ends takes a moment, and Tune's threads and the workers Ray is still
    ending may write in the folder after it. A stopped or failed search hands the folder to a
    process of its own too, which removes it again (`leftover.settled`)."""
    from kdsearch.search.tuner import scratch_folder

    with contextlib.suppress(KeyboardInterrupt), scratch_folder() as folder:
        if ends == "stopped":
            raise KeyboardInterrupt
    time.sleep(0.3)  # written again after the removal, as Tune's thread writes its state
    (folder / "tune").mkdir(parents=True)
    deadline = time.monotonic() + (15 if ends == "stopped" else 3)  # (3: past the remover's 2 s)
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        # a search that finished has nothing left writing: its folder is removed once, at once
        assert folder.exists() is (ends == "finished")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def in_session(session: int) -> list[psutil.Process]:
    """The live processes of a session (a zombie has exited and holds nothing)."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def stop_session(session: int) -> list[psutil.Process]:
    """Stop the processes of session `session`, which a test started as a session leader (a
    search's driver, `ray start`), and only those: Ray's daemons and the workers and agents they
    start stay in it (`ray stop` would stop every Ray on the machine, a search running beside the
    tests included). Returns the processes still running."""
    procs = in_session(session)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # a killed driver's trial workers may not heed SIGTERM at all: a short wait, then SIGKILL
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return in_session(session)


@pytest.mark.parametrize(
    "how", ["kill -9", "ctrl-c", "sigterm", "ctrl-c twice", "sigterm to the group"]
)
def test_a_killed_or_interrupted_search_resumes_without_losing_or_repeating_a_trial(
    tmp_path: Path, how: str
) -> None:
    root, env = workdir(tmp_path)
    # trials long enough that the study is seen with 3 finished and some running: at 600 images
    # a loaded machine once saw the whole search end between two looks
    (root / "space.yaml").write_text(SPACE.replace("subset: 600", "subset: 1000"))
    proc = kdsearch(
        "run", "space.yaml", "--trials", "10", cwd=root, env=env, start_new_session=True
    )
    try:

        def caught_in_flight() -> bool:
            finished, running = _finished_and_running(root)  # one look at the study
            return len(finished) >= 3 and bool(running)

        _wait_for(caught_in_flight, 300, proc, every=0.2)
        before = {
            t.number: (t.state, t.value, t.datetime_complete)
            for t in _finished_and_running(root)[0]
        }
        if how == "kill -9":
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        elif how == "sigterm to the group":  # GNU timeout, SLURM: Ray's processes die of it
            os.killpg(proc.pid, signal.SIGTERM)
        else:  # SIGTERM (timeout, a batch scheduler) stops it as Ctrl-C does
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            if how == "ctrl-c twice":  # an impatient user: Tune does not wait on the second
                time.sleep(0.7)
                proc.send_signal(signal.SIGINT)
        raced = False
        if how != "kill -9":
            _, err = proc.communicate(timeout=120)
            # Ray's core may end the driver first, where it touches its object store gone with
            # the group: status 1 and Ray's lines only (README, "Resume, Ctrl-C and kill -9");
            # the study is then as after kill -9
            raced = how == "sigterm to the group" and proc.returncode == 1
            raced = raced and "kdsearch:" not in err and "Traceback" not in err
            if not raced:
                assert proc.returncode == 130, err
                hint = "`kdsearch run space.yaml --trials 10 --resume` finishes the search"
                assert hint in err and "Traceback" not in err and "SIGTERM received" not in err
    finally:
        stop_session(proc.pid)  # the killed driver's Ray
    # `trials` names the whole command that finishes the search, as the run's own last line
    # does: it said `kdsearch run SPACE --study tiny --resume`, which would also have grown the
    # study to the space's 16 trials
    shown = kdsearch("trials", "tiny", cwd=root, env=env)
    _, err = shown.communicate(timeout=120)
    assert "`kdsearch run space.yaml --trials 10 --resume` runs" in " ".join(err.split()), err
    # the attempt each runs again as: the next, once it had its recipe; one caught while it was
    # proposed (before its recipe was recorded) never trained, so it keeps its attempt
    left = {
        t.number: int(t.user_attrs.get("attempt", 1)) + ("recipe" in t.user_attrs)
        for t in trials(root)
        if t.state == TrialState.RUNNING
    }
    assert left, "the stop must have caught trials in flight"
    # where the watch ended the driver (a group SIGTERM), a process of its own removes the
    # folder once the driver has ended, a moment after
    deadline = time.monotonic() + 30
    killed = how == "kill -9"
    while not (killed or raced) and scratch_of(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not raced:  # where Ray's core ended the driver, the folder may be gone or left: both seen
        assert bool(scratch_of(proc.pid)) == killed, "Ctrl-C cleans up its own"
    if how in ("sigterm", "ctrl-c twice"):  # they leave the study as Ctrl-C does, which resumes
        stopped = {t.number: (t.state, t.value, t.datetime_complete) for t in trials(root)}
        assert all(stopped[n] == was for n, was in before.items()), "a finished trial changed"
        return
    resumed = kdsearch("run", "space.yaml", "--trials", "10", "--resume", cwd=root, env=env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert not scratch_of(proc.pid), "the next search removes a killed search's temporary files"
    assert not scratch_of(resumed.pid)
    final = trials(root)
    assert len(final) == 10 and all(t.state.is_finished() for t in final)
    for t in final:
        if t.number in before:
            assert (t.state, t.value, t.datetime_complete) == before[t.number], (
                "a finished trial changed"
            )
        elif t.number in left:
            assert t.user_attrs["attempt"] == left[t.number], (
                f"an interrupted trial runs again under its number: {t.user_attrs}"
            )
            assert t.user_attrs["training_attempt"] == left[t.number], "its start recorded"


@contextlib.contextmanager
def ray_head(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A `ray start --head` of 2 CPUs on a free port of 127.0.0.1, and that port; stopped after
    the block, and only its processes (`stop_session`). A port found free may be taken before
    the head binds it (by the Ray of a test running beside): tried three times."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray is not None
    failures: list[str] = []
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # its own temp dir, so it does not become the machine's "current cluster" for
        # address=auto; short, for Ray's socket paths
        temp_dir = tempfile.mkdtemp(prefix="kdsearch-test-ray-", dir="/tmp")
        head = subprocess.Popen(
            [
                ray,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={temp_dir}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its daemons stay in this session: stopped below, and only they
        )
        try:
            _, err = head.communicate(timeout=120)
            if head.returncode == 0:
                break
            failures.append(err)
        finally:
            if head.returncode != 0:
                stop_session(head.pid)
                shutil.rmtree(temp_dir, ignore_errors=True)
        assert len(failures) < 3, "\n".join(failures)
    try:
        assert in_session(head.pid), "the cluster's processes are found by their session"
        yield head, port
    finally:
        left = stop_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"the cluster's processes are stopped: {left}"


def test_search_joins_an_existing_ray_cluster(tmp_path: Path) -> None:
    root, env = workdir(tmp_path)
    with ray_head(env) as (_, port):
        # --check joins it too, and checks that a trial fits a node
        checked = kdsearch(
            "run", "space.yaml", "--check", "--address", f"127.0.0.1:{port}", cwd=root, env=env
        )
        _, err = checked.communicate(timeout=120)
        assert checked.returncode == 0, err
        assert "2 at a time on the cluster's 1 node," in " ".join(err.split()), err
        (root / "big.yaml").write_text(SPACE.replace("per_trial: {cpu: 1}", "per_trial: {cpu: 4}"))
        checked = kdsearch(
            "run", "big.yaml", "--check", "--address", f"127.0.0.1:{port}", cwd=root, env=env
        )
        _, err = checked.communicate(timeout=120)
        assert checked.returncode == 2, err
        assert "search.per_trial.cpu is 4, but the Ray cluster has 2 CPUs" in err, err
        assert not (root / "studies").exists(), "nothing written"
        proc = kdsearch(
            "run",
            "space.yaml",
            "--trials",
            "4",
            "--address",
            f"127.0.0.1:{port}",
            cwd=root,
            env=env,
        )
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert [t.state.is_finished() for t in trials(root)] == [True] * 4


def kill_gcs(session: int) -> None:
    """Kill the GCS of the Ray head started in session `session` (`ray_head`), and nothing else:
    as a driver on another node sees a head machine that is gone. (A driver on the node that
    goes loses its own object store too, and Ray may end it at once: see the README.)"""
    procs = [p for p in in_session(session) if "gcs_server" in " ".join(p.cmdline())]
    assert len(procs) == 1, procs
    procs[0].kill()
    procs[0].wait(timeout=10)


def test_a_search_whose_ray_cluster_is_lost_ends_in_one_line(tmp_path: Path) -> None:
    """The cluster's head lost mid-search: Ray would end the driver 60 s later with its
    tracebacks and status 1, its heartbeat still fresh."""
    root, env = workdir(tmp_path)
    # trials enough that they do not all end within the watch's 10 s on the workers left
    (root / "space.yaml").write_text(SPACE.replace("subset: 600", "subset: 1400"))
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "20"  # Ray's patience, halved by the watch
    with ray_head(env) as (head, port):
        address = f"127.0.0.1:{port}"
        proc = kdsearch(
            "run",
            "space.yaml",
            "--trials",
            "40",
            "--address",
            address,
            cwd=root,
            env=env,
            start_new_session=True,
        )
        try:
            _wait_for(
                lambda: (
                    len(_finished_and_running(root)[0]) >= 3
                    and bool(_finished_and_running(root)[1])
                ),
                300,
                proc,
            )
            kill_gcs(head.pid)
            _, err = proc.communicate(timeout=120)
        finally:
            stop_session(proc.pid)
    assert proc.returncode == 2, err  # Ray's own end: status 1
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kdsearch: error: the Ray cluster at {address} stopped answering")
    resume = f"`kdsearch run space.yaml --trials 40 --address {address} --resume`"
    assert last.endswith(
        f"{resume} finishes the search once the cluster is back (or, without --address, on "
        "this machine)"
    ), last
    ts = trials(root)
    failures = [t.user_attrs["failure"] for t in ts if t.state == TrialState.FAIL]
    assert all(f.startswith("NonFiniteLoss") for f in failures), "none failed with the cluster"
    assert any(t.state == TrialState.RUNNING for t in ts), "left to the resume"
    storage = optuna.storages.RDBStorage(f"sqlite:///{root}/studies/tiny.db")
    attrs = storage.get_study_system_attrs(storage.get_study_id_from_name("tiny"))
    beats = [v for k, v in attrs.items() if k.startswith("heartbeat:")]
    assert beats == [0.0], "marked ended: a resume takes its trials over at once"


def into_promotion_runs(proc: subprocess.Popen[str], session: int, seen: list[str]) -> None:
    """Read `proc`'s stderr into `seen` until its promotion starts, then wait until a run
    trains in a process of `session` (the driver's, or a cluster's)."""
    assert proc.stderr is not None
    while not any(line.startswith("promoting the") for line in seen[-1:]):
        line = proc.stderr.readline()
        assert line, "".join(seen)
        seen.append(line)
    deadline = time.monotonic() + 120
    while not running("ray::train_job", session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running("ray::train_job", session), "no promotion run trained within 120 s"


def test_a_promotion_whose_ray_cluster_is_lost_ends_in_one_line(tmp_path: Path) -> None:
    root, env = workdir(tmp_path)
    (root / "space.yaml").write_text(SPACE + "promote: {top_k: 1, seeds: 3, epochs: 400}\n")
    env["RAY_gcs_rpc_server_reconnect_timeout_s"] = "20"  # Ray's patience, halved by the watch
    with ray_head(env) as (head, port):
        address = f"127.0.0.1:{port}"
        args = ("run", "space.yaml", "--trials", "2", "--address", address)
        proc = kdsearch(*args, cwd=root, env=env, start_new_session=True)
        seen: list[str] = []
        try:
            into_promotion_runs(proc, head.pid, seen)
            kill_gcs(head.pid)
            _, err = proc.communicate(timeout=120)
        finally:
            stop_session(proc.pid)
    assert proc.returncode == 2, "".join(seen) + err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kdsearch: error: the Ray cluster at {address} stopped answering")
    assert "the promotion runs that had finished are kept" in last, last
    storage = f"sqlite:///{root}/studies/tiny.db"
    if "tiny-promoted" in optuna.get_all_study_names(storage):
        runs = optuna.load_study(study_name="tiny-promoted", storage=storage).trials
        assert not [t for t in runs if t.state == TrialState.FAIL], "none failed with the Ray"


POSTGRES = os.environ.get("KDSEARCH_TEST_POSTGRES")


@pytest.mark.skipif(
    not POSTGRES, reason="set KDSEARCH_TEST_POSTGRES to a PostgreSQL URL (.ci/run does)"
)
def test_two_drivers_share_one_postgresql_study(tmp_path: Path) -> None:
    assert POSTGRES is not None
    root, env = workdir(tmp_path)
    name = f"shared_{os.getpid()}_{int(time.time())}"
    args = (
        "run",
        "space.yaml",
        "--storage",
        POSTGRES,
        "--study",
        name,
        "--trials",
        "8",
        "--resume",
    )
    procs = [kdsearch(*args, cwd=root, env=env) for _ in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    ts = study.trials
    # a driver reads the count before it asks, so each other driver may add one more
    assert 8 <= len(ts) <= 9 and all(t.state.is_finished() for t in ts)
    assert sorted(t.number for t in ts) == list(range(len(ts)))
    ray_ids = [t.user_attrs["ray_trial_id"] for t in ts]
    assert len(set(ray_ids)) == len(ray_ids), "no trial recorded twice"
    drivers = {t.user_attrs["driver"] for t in ts}
    assert len(drivers) == 2, "both drivers ran trials into the one study"
    # the dashboard command its last lines name cannot hold the password: it says so
    assert "` (its password hidden))" in errs[0], errs[0]


def test_an_unreachable_storage_is_one_line_without_the_password(tmp_path: Path) -> None:
    root, env = workdir(tmp_path)
    proc = kdsearch(
        "run",
        "space.yaml",
        "--storage",
        "postgresql+psycopg2://kd:s3cret@127.0.0.1:1/x",
        cwd=root,
        env=env,
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdsearch: error: cannot open the study storage")
    assert "s3cret" not in err


def test_a_space_with_promote_and_export_sections_runs_end_to_end(tmp_path: Path) -> None:
    root, env = workdir(tmp_path)
    space = SPACE.replace("choices: [0.1, 0.002, 0.05, 1.0e12]", "choices: [0.05, 0.1]")
    (root / "space.yaml").write_text(
        space + "promote: {top_k: 1, seeds: 1, epochs: 4}\nexport: {dir: out/winner}\n"
    )
    # the address a `ray start --head` that is long gone left behind: without --address, the
    # search and the promotion start a Ray of their own (they tried to join it, and Ray
    # refused them num_cpus: a traceback)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")
    try:
        proc = kdsearch(
            "run", "space.yaml", "--trials", "4", cwd=root, env={**env, "RAY_TMPDIR": str(ray_tmp)}
        )
        _, err = proc.communicate(timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, err
    promoted = optuna.load_study(
        study_name="tiny-promoted", storage=f"sqlite:///{root}/studies/tiny.db"
    )
    assert (
        len(promoted.trials) == 3
    )  # the best trial, the student alone and plain KD, one seed each
    for name in ("recipe.yaml", "student.pt", "teacher.pt", "meta.json", "hyperparameters.json"):
        assert (root / "out" / "winner" / name).is_file()
    assert "exported the winner of 'tiny'" in err and "kdsearch train out/winner/recipe.yaml" in err


@pytest.mark.parametrize("to", ["the driver", "its group"])
def test_sigterm_still_stops_the_promotion_that_follows_a_search(tmp_path: Path, to: str) -> None:
    # Tune leaves its SIGINT handler behind after a search; a stop must not land in it. Sent to
    # the group (GNU timeout, SLURM), it stops the promotion's local Ray too.
    root, env = workdir(tmp_path)
    (root / "space.yaml").write_text(SPACE + "promote: {top_k: 1, seeds: 3, epochs: 400}\n")
    proc = kdsearch("run", "space.yaml", "--trials", "2", cwd=root, env=env, start_new_session=True)
    seen: list[str] = []
    try:
        # once the promotion's runs train, where the stop must reach the promotion, not the search
        into_promotion_runs(proc, proc.pid, seen)
        if to == "its group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop_session(proc.pid)
    # Ray's core may end the driver first, status 1 and Ray's lines only (see the search's test)
    if to == "its group" and proc.returncode == 1 and "kdsearch:" not in err:
        assert "Traceback" not in err, err
        return
    assert proc.returncode == 130, "".join(seen) + err
    assert "kdsearch: interrupted" in err
    if to == "its group":  # said by the watch of the promotion's Ray, which went with it
        assert "Ray with it; the promotion runs that had finished are kept" in err, err


def test_sigterm_after_a_search_s_ray_shut_down_still_stops_as_ctrl_c(tmp_path: Path) -> None:
    # Ray's C++ core left SIGTERM at the system's default once its Ray shut down: a SIGTERM in a
    # promotion's export, or as a search printed its last lines, ended the command with status
    # 143 and no word
    script = """
import os, signal, time
from kdsearch.cli import stop_on_sigterm
stop_on_sigterm()
from kdsearch.search.cluster import start_ray, stop_ray
start_ray(None)
stop_ray()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
except KeyboardInterrupt:
    print("stopped as Ctrl-C stops")
"""
    _, env = workdir(tmp_path)
    env.pop("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "stopped as Ctrl-C stops\n"


def test_a_watch_hears_sigterm_while_the_main_thread_is_held_up(tmp_path: Path) -> None:
    # A SIGTERM's Python handler runs only once the main thread is back in Python, which a call
    # into a Ray that died of the same SIGTERM may never be: the watch must hear of it anyway,
    # or it takes the stop for a lost Ray (status 2, 30 s later), as one CI run did
    script = """
import signal, time
from kdsearch.cli import stop_on_sigterm
stop_on_sigterm()
from kdsearch.search.cluster import RayWatch, start_ray
start_ray(None)
with RayWatch(None, "and so on", before=lambda: None):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # another thread takes it
    print("watching", flush=True)
    time.sleep(100)
"""
    _, env = workdir(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "watching\n"
        os.killpg(proc.pid, signal.SIGTERM)  # GNU timeout, SLURM: the local Ray's processes too
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        stop_session(proc.pid)
    # not heard, the watch would have taken the stop for a lost Ray: status 2 after 30 s
    assert proc.returncode == 130, f"after {time.monotonic() - sent:.1f} s: {err}"
    assert err.endswith("kdsearch: interrupted, and this machine's Ray with it; and so on\n"), err


def test_a_trial_out_of_gpu_memory_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial reports its failure (the driver records FAIL and goes on) instead of raising."""
    from kdsearch.data import load_data
    from kdsearch.recipe import DataConfig
    from kdsearch.search import worker

    from .conftest import tiny_recipe

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    reports: list[dict[str, object]] = []
    monkeypatch.setattr(worker, "train", out_of_memory)
    monkeypatch.setattr(worker.tune, "report", reports.append)
    shared = worker.share(load_data(DataConfig(dataset="synthetic")), None, "resnet8")
    recipe = tiny_recipe({"distill.kd.weight": 0.0})
    worker.run_trial({"number": 3, "recipe": recipe.to_yaml(), "threads": 1}, shared)
    (report,) = reports
    assert str(report["failure"]).startswith("OutOfMemoryError: CUDA out of memory")


def _broken_compile(fn: object, **options: object) -> object:
    def run(x: torch.Tensor) -> object:
        raise RuntimeError("no compiler for this operation")

    return run


def test_a_workers_trials_read_one_teacher_and_a_new_search_gets_its_own() -> None:
    """A reused worker built the teacher (and heads) from the object store's weights again for
    every trial, and `train` folded it again: a sixth of what a short trial cost besides its
    training. The trials only read it."""
    import pickle

    from kdsearch.data import load_data
    from kdsearch.losses.hsakd import HSAKD
    from kdsearch.recipe import DataConfig
    from kdsearch.search import worker
    from kdsearch.study.contents import METRIC
    from kdsearch.teacher import Teacher
    from kdsearch.train import ready

    from .conftest import tiny_recipe

    data = load_data(DataConfig(dataset="synthetic"))
    model = build_model("resnet8", data.num_classes, data.channels)
    heads = {"hsakd": HSAKD.teacher_heads(model, data.num_classes)}
    teacher = Teacher(model, "trained", Path("teacher.pt"), 0.5, heads)
    shared = worker.share(data, teacher, "resnet8")
    first = worker.unshare(shared)
    assert all(a is b for a, b in zip(worker.unshare(shared), first, strict=True))
    assert worker.unshare(pickle.loads(pickle.dumps(shared)))[1] is first[1], "as Ray hands it"
    search = worker.share(data, teacher, "resnet8")  # another search's, in a process Ray reused
    second = worker.unshare(search)
    assert second[1] is not first[1] and second[2]["hsakd"] is not first[2]["hsakd"]
    assert worker.UNSHARED.keys() == {search.token}, "the earlier one is let go"
    recipe = tiny_recipe({"schedule.epochs": 1}).override({"distill.hsakd.weight": 1.0})
    reports: list[dict[str, object]] = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(worker.tune, "report", reports.append)
        for number in (0, 1):
            worker.run_trial({"number": number, "recipe": recipe.to_yaml(), "threads": 1}, search)
    assert [r["epoch"] for r in reports] == [1, 1] and "failure" not in reports[-1]
    for key in (METRIC, "train_loss"):  # the second trial read the teacher and heads as they were
        assert reports[0][key] == reports[1][key], key
    teacher = second[1]
    assert teacher is not None and ready(teacher, torch.device("cpu")) is ready(
        teacher, torch.device("cpu")
    ), "folded and placed once"


def test_a_trials_and_a_promotion_runs_warnings_travel_with_their_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker's warnings reach no console: `compile: true` falling back to eager execution
    goes to the driver with the trial's reports and the promotion run's result instead."""
    import warnings

    from kdsearch.data import load_data
    from kdsearch.recipe import DataConfig
    from kdsearch.search import worker

    from .conftest import tiny_recipe

    reports: list[dict[str, object]] = []
    monkeypatch.setattr(torch, "compile", _broken_compile)
    monkeypatch.setattr(worker.tune, "report", reports.append)
    shared = worker.share(load_data(DataConfig(dataset="synthetic")), None, "resnet8")
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "schedule.epochs": 1, "compile": True})
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        worker.run_trial({"number": 3, "recipe": recipe.to_yaml(), "threads": 1}, shared)
        job = worker.train_job("best#0", recipe.to_yaml(), shared, 1, None)
    said = [
        "torch.compile failed (RuntimeError: no compiler for this operation); training goes on without it"
    ]
    assert [r["epoch"] for r in reports] == [1] and "failure" not in reports[-1]
    assert [r.get("warnings") for r in reports] == [said]
    assert job.failure is None and job.warnings == tuple(said)
    assert not [w for w in shown if "torch.compile" in str(w.message)]  # kept, not shown
    reports.clear()
    worker.run_trial(
        {"number": 4, "recipe": recipe.override({"compile": False}).to_yaml(), "threads": 1}, shared
    )
    assert reports and all("warnings" not in r for r in reports)
    reports.clear()  # a trial that fails: its warnings come with its failure
    diverges = recipe.override({"optim.lr": 1.0e12}).to_yaml()
    worker.run_trial({"number": 5, "recipe": diverges, "threads": 1}, shared)
    assert "NonFiniteLoss" in str(reports[-1]["failure"]) and reports[-1]["warnings"] == said
    # a promotion run that fails records where and how it trained as one that finishes does
    in_bf16 = recipe.override({"optim.lr": 1.0e12, "precision": "bf16"}).to_yaml()
    failed = worker.train_job("best#1", in_bf16, shared, 1, None)
    assert str(failed.failure).startswith("NonFiniteLoss") and failed.warnings == tuple(said)
    assert (failed.device, failed.precision, failed.onednn_cap) == ("cpu", "bf16", "")
    # and under a cap on oneDNN's instruction set, which changes its kernels: recorded, as a
    # trial records it, and `auto` is fp32 under it
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    failed = worker.train_job("best#1", diverges, shared, 1, None)
    assert (failed.precision, failed.onednn_cap) == ("fp32", "AVX2")
    reports.clear()
    plain = recipe.override({"compile": False}).to_yaml()
    worker.run_trial({"number": 6, "recipe": plain, "threads": 1}, shared)
    assert (reports[0]["precision"], reports[0]["onednn_cap"]) == ("fp32", "AVX2")


def test_the_driver_says_each_trials_warning_once_and_records_it(tmp_path: Path) -> None:
    from kdsearch.errors import KdsearchWarning
    from kdsearch.search import tuner
    from kdsearch.study.contents import METRIC
    from kdsearch.study.record import Record
    from kdsearch.study.storage import open_storage

    space = SearchSpace.from_yaml(SPACE, source="s.yaml")
    record = Record(open_storage(f"sqlite:///{tmp_path}/s.db"), "s", space, target=2, resume=False)
    asha = tuner.RecordingASHA(MAX_EPOCHS, 1, 2)
    searcher = tuner.KdSearcher(record, asha, 1.0, None)
    said = "torch.compile failed (RuntimeError: x); training goes on without it"
    with pytest.warns(KdsearchWarning) as shown:
        for ray_id in ("a", "b"):
            searcher.suggest(ray_id)
            for epoch in range(1, MAX_EPOCHS + 1):
                result = {"epoch": epoch, METRIC: 0.5, "warnings": [said]}
                searcher.on_trial_result(ray_id, result)
            searcher.on_trial_complete(ray_id, result)
    assert [str(w.message) for w in shown] == [f"trial 0: {said}"]
    trials = record.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs["warnings"] for t in trials] == [[said], [said]]


def test_a_trial_that_trains_in_another_precision_than_the_studys_earlier_ones_is_said(
    tmp_path: Path,
) -> None:
    """A resume on another kind of machine (or under another oneDNN cap), or a cluster of mixed
    nodes: trials in bf16 and fp32 were ranked together without a word."""
    from kdsearch.errors import KdsearchWarning
    from kdsearch.search import tuner
    from kdsearch.study.contents import METRIC
    from kdsearch.study.record import Record
    from kdsearch.study.storage import open_storage

    space = SearchSpace.from_yaml(SPACE, source="s.yaml")
    record = Record(open_storage(f"sqlite:///{tmp_path}/s.db"), "s", space, target=4, resume=False)
    asha = tuner.RecordingASHA(MAX_EPOCHS, 1, 2)

    def trial(searcher: tuner.KdSearcher, ray_id: str, precision: str, cap: str) -> None:
        searcher.suggest(ray_id)
        for epoch in range(1, MAX_EPOCHS + 1):
            result = {"epoch": epoch, METRIC: 0.5, "precision": precision, "onednn_cap": cap}
            searcher.on_trial_result(ray_id, result)
        searcher.on_trial_complete(ray_id, result)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alike: nothing said
        first = tuner.KdSearcher(record, asha, 1.0, None)
        trial(first, "a", "bf16", "")
        trial(first, "b", "bf16", "")
    resumed = tuner.KdSearcher(record, asha, 1.0, None)  # reads the study's trials
    with pytest.warns(KdsearchWarning) as shown:
        trial(resumed, "c", "fp32", "AVX2")
        trial(resumed, "d", "fp32", "AVX2")  # said once
    assert [str(w.message) for w in shown] == [
        "trial 2 trains in fp32 under ONEDNN_MAX_CPU_ISA=AVX2, and trials of the study before it "
        "trained in bf16: the study ranks them together"
    ]
    recorded = [t.user_attrs["onednn_cap"] for t in record.study.get_trials()]
    assert recorded == ["", "", "AVX2", "AVX2"]


def test_failed_trials_stay_out_of_ashas_rungs() -> None:
    """Their NaN went into the rung, where numpy warned "All-NaN slice encountered" onto the
    user's terminal once a rung held failed trials alone."""
    from kdsearch.search import tuner
    from kdsearch.study.contents import METRIC

    asha = tuner.RecordingASHA(MAX_EPOCHS, 1, 2)
    asha.set_search_properties(METRIC, "max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        for key in ("a", "b"):
            trial = SimpleNamespace(trial_id=key)
            asha.on_trial_add(None, trial)
            failed = {"epoch": 1, METRIC: float("nan"), "failure": "ValueError: x"}
            assert asha.on_trial_result(None, trial, failed) == "CONTINUE"
            asha.on_trial_complete(None, trial, failed)
        good = SimpleNamespace(trial_id="c")
        asha.on_trial_add(None, good)  # first to the rung: goes on
        assert asha.on_trial_result(None, good, {"epoch": 1, METRIC: 0.1}) == "CONTINUE"
    assert asha.stopped == set()
    rungs = [set(recorded) for b in asha._brackets for _, recorded in b._rungs]
    assert {"c"} in rungs and all(r in (set(), {"c"}) for r in rungs), rungs


def test_a_trial_whose_process_died_keeps_what_its_last_epoch_said(tmp_path: Path) -> None:
    """Tune ends such a trial with no result, and the attributes came from that result alone:
    its parameters, device, thread count and times were lost."""
    from kdsearch.search import tuner
    from kdsearch.study.contents import METRIC
    from kdsearch.study.record import Record
    from kdsearch.study.storage import open_storage

    space = SearchSpace.from_yaml(SPACE, source="s.yaml")
    record = Record(open_storage(f"sqlite:///{tmp_path}/s.db"), "s", space, target=1, resume=False)
    asha = tuner.RecordingASHA(MAX_EPOCHS, 1, 2)
    asha.errors["a"] = "The actor is dead because its worker process has died."
    searcher = tuner.KdSearcher(record, asha, 1.0, None)
    searcher.suggest("a")
    said = {"student_params": 78042, "device": "cpu", "threads": 1.0, "train_seconds": 2.5}
    for epoch in (1, 2):
        searcher.on_trial_result("a", {"epoch": epoch, METRIC: 0.5, **said})
    searcher.on_trial_complete("a", None, error=True)
    (trial,) = record.study.get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["failure"] == asha.errors["a"]
    assert {k: trial.user_attrs.get(k) for k in said} == said and trial.user_attrs["epochs"] == 2


def test_a_trial_whose_process_died_records_why(tmp_path: Path) -> None:
    """Tune tells the scheduler of the error before it copies the error's file to the trial's
    storage, where `trial.get_error()` looks: every death read "the trial's process failed"."""
    import ray
    from ray import tune

    from kdsearch.search.tuner import RecordingASHA
    from kdsearch.study.contents import METRIC

    def dies(config: dict[str, object]) -> None:
        tune.report({"epoch": 1, METRIC: 0.5})
        os._exit(1)  # as the kernel's OOM killer or a segfault ends a trial

    asha = RecordingASHA(MAX_EPOCHS, 1, 2)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(
            dies,
            tune_config=tune.TuneConfig(scheduler=asha, num_samples=1, metric=METRIC, mode="max"),
            run_config=tune.RunConfig(
                storage_path=str(tmp_path),
                verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        ).fit()
    finally:
        ray.shutdown()
    (why,) = asha.errors.values()
    assert "its worker process has died" in why


def test_a_failed_trial_gives_its_gpu_memory_back_once_its_tensors_are_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Emptying the CUDA cache while the exception (and so the failed step's frames) is alive
    frees nothing; it must come after, and before the next trial of a reused worker."""
    import weakref

    from kdsearch.data import load_data
    from kdsearch.recipe import DataConfig
    from kdsearch.search import worker

    from .conftest import tiny_recipe

    alive: list[weakref.ref[torch.nn.Module]] = []
    emptied_with: list[bool] = []  # whether a failed trial's model was still alive then

    def out_of_memory(*args: object, **kwargs: object) -> None:
        model = torch.nn.Linear(512, 512)
        alive.append(weakref.ref(model))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(worker, "train", out_of_memory)
    monkeypatch.setattr(worker.tune, "report", lambda metrics: None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: emptied_with.append(any(m() for m in alive))
    )
    shared = worker.share(load_data(DataConfig(dataset="synthetic")), None, "resnet8")
    recipe = tiny_recipe({"distill.kd.weight": 0.0})
    worker.run_trial({"number": 3, "recipe": recipe.to_yaml(), "threads": 1}, shared)
    # Emptied at the start (nothing yet) and after the failure, with the model gone.
    assert emptied_with == [False, False] and len(alive) == 1
    worker.run_trial({"number": 4, "recipe": recipe.to_yaml(), "threads": 1}, shared)
    assert emptied_with == [False, False, False, False] and len(alive) == 2


@pytest.mark.parametrize(
    ("device", "gpu_ids", "expected"),
    [
        ("auto", [], "cpu"),  # Ray gave no GPU: not GPU 0 unreserved
        ("auto", [3], "auto"),
        ("cuda:1", [3], "cuda"),  # the worker sees its one GPU as cuda:0
        ("cuda", [0], "cuda"),
        ("cpu", [0], "cpu"),
    ],
)
def test_a_worker_trains_on_the_device_ray_gave_it(
    device: str, gpu_ids: list[int], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdsearch.search import worker

    from .conftest import tiny_recipe

    monkeypatch.setattr(worker.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(worker.ray, "get_gpu_ids", lambda: gpu_ids)
    recipe = tiny_recipe({"device": device})
    assert worker.worker_recipe(recipe).device == expected
    assert worker.worker_recipe(recipe).student == recipe.student


@pytest.mark.parametrize("gpus", [0.0, 1.0])
def test_a_cuda_device_for_trials_given_no_gpu_is_refused(
    gpus: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kdsearch.errors import RecipeError
    from kdsearch.search import cluster
    from kdsearch.space import SearchConfig

    monkeypatch.setattr(cluster, "cluster_nodes", lambda: [{"CPU": 4.0, "GPU": gpus}])
    config = SearchConfig.model_validate({"per_trial": {"gpu": 0}})
    with pytest.raises(RecipeError, match=r"device: cuda, but trials get no GPU"):
        cluster.trial_resources(config, devices=["auto", "cuda"])
    with pytest.raises(RecipeError, match=r"precision: fp16 needs CUDA, but trials get no GPU"):
        cluster.trial_resources(config, devices=["auto"], precisions=["fp32", "fp16"])
    assert cluster.trial_resources(config, devices=["auto", "cpu"], precisions=["bf16"]) == (
        1.0,
        0.0,
    )


@pytest.mark.parametrize(
    ("per_trial", "concurrent", "gpus", "expected"),
    [
        ({"cpu": 2, "gpu": 0.25}, 4, 1.0, (2.0, 0.25)),  # four trials share one GPU
        ({"cpu": 1}, 4, 1.0, (1.0, 0.25)),  # `auto`: the GPU split between the concurrent trials
        ({"cpu": 1}, 2, 8.0, (1.0, 1.0)),  # never more than one GPU per trial
        ({"cpu": 1}, 2, 0.0, (1.0, 0.0)),  # `auto` on a machine without one: CPU trials
        # two to a GPU, so all three run (2/3 of a GPU each fitted one to a GPU: two ran)
        ({"cpu": 1}, 3, 2.0, (1.0, 0.5)),
        ({"cpu": 1}, 6, 4.0, (1.0, 0.5)),
    ],
)
def test_trial_resources_share_a_gpu_between_trials(
    monkeypatch: pytest.MonkeyPatch,
    per_trial: dict[str, float],
    concurrent: int,
    gpus: float,
    expected: tuple[float, float],
) -> None:
    from kdsearch.search import cluster
    from kdsearch.space import SearchConfig

    nodes = [{"CPU": 8.0, "GPU": gpus / 2}, {"CPU": 8.0, "GPU": gpus / 2}]  # two like nodes
    monkeypatch.setattr(cluster, "cluster_nodes", lambda: nodes)
    config = SearchConfig.model_validate({"per_trial": per_trial, "concurrent": concurrent})
    assert cluster.trial_resources(config) == expected


def test_a_gpu_share_the_cluster_lacks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdsearch.errors import RecipeError
    from kdsearch.search import cluster
    from kdsearch.space import SearchConfig

    monkeypatch.setattr(cluster, "cluster_nodes", lambda: [{"CPU": 2.0}])
    config = SearchConfig.model_validate({"per_trial": {"gpu": 0.25}})
    with pytest.raises(RecipeError, match=r"search\.per_trial\.gpu is 0\.25, but the Ray cluster"):
        cluster.trial_resources(config)


def test_a_local_ray_has_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM job given 2 of a node's 64 CPUs started a Ray of 64, as many trials at once."""
    from kdsearch.search import cluster

    monkeypatch.setattr(cluster.os, "sched_getaffinity", lambda pid: {3, 5})
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 64)
    assert cluster.usable_cpus() == 2 and cluster.local_resources()[0]["CPU"] == 2.0


def test_a_request_no_single_node_meets_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compared with the cluster's totals, two GPUs a trial on four one-GPU nodes passed, and
    the search waited forever with no trial running."""
    from kdsearch.errors import RecipeError
    from kdsearch.search import cluster
    from kdsearch.space import SearchConfig

    nodes = [{"CPU": 8.0, "GPU": 1.0}] * 4 + [{"CPU": 32.0}]
    monkeypatch.setattr(cluster, "cluster_nodes", lambda: nodes)
    two = SearchConfig.model_validate({"per_trial": {"cpu": 1, "gpu": 2}})
    with pytest.raises(RecipeError, match=r"per_trial\.gpu is 2, but its largest Ray node has 1"):
        cluster.trial_resources(two)
    cpus = SearchConfig.model_validate({"per_trial": {"cpu": 16, "gpu": 1}})
    with pytest.raises(RecipeError, match=r"16 CPUs with 1 GPUs, but no Ray node has both"):
        cluster.trial_resources(cpus)
    fits = SearchConfig.model_validate({"per_trial": {"cpu": 16, "gpu": 0}})
    assert cluster.trial_resources(fits) == (16.0, 0.0)


def one_lr_without_kd(search: str) -> SearchSpace:
    """SPACE with `search` in place of its trial count and concurrency, one learning rate that
    trains, and KD off (no teacher to prepare)."""
    text = (
        SPACE.replace("trials: 8, concurrent: 2", search)
        .replace("[0.1, 0.002, 0.05, 1.0e12]", "[0.1]")
        .replace(
            "student: {arch: resnet8}", "student: {arch: resnet8}\n  distill: {kd: {weight: 0.0}}"
        )
    )
    return SearchSpace.from_yaml(text, source="space.yaml")


@pytest.mark.parametrize("chosen", [None, "1"])
def test_a_search_in_a_callers_process_leaves_its_environment_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chosen: str | None
) -> None:
    """A library caller's later Tune runs keep Tune's console output: kdsearch turns it off for
    its own search only, and leaves it as the caller chose where the caller did."""
    from kdsearch.data import load_data
    from kdsearch.search.tuner import run_search
    from kdsearch.study.record import Record
    from kdsearch.study.storage import open_storage

    if chosen is None:
        monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    else:
        monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", chosen)
    space = one_lr_without_kd("trials: 1, concurrent: 2")
    record = Record(open_storage(f"sqlite:///{tmp_path}/s.db"), "s", space, target=1, resume=False)
    outcome = run_search(space, record, load_data(space.base.data), None)
    assert outcome.complete and outcome.tally.complete + outcome.tally.pruned == 1
    assert os.environ.get("RAY_AIR_NEW_OUTPUT") == chosen


def test_a_study_that_stops_taking_writes_stops_the_search_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: CliHere
) -> None:
    """A full disk mid-search: Tune logged the failed write of a finished trial and went on, and
    the search ended "complete" with that trial RUNNING; it stops, saying why and with the
    command that finishes it (it said only "--resume"), and the trial is left to that command."""
    import sqlite3

    from kdsearch.study import record

    (tmp_path / "space.yaml").write_text(one_lr_without_kd("trials: 3, concurrent: 1").text)
    write = record.write_trial

    def full_at_the_curve(*args: object, **kwargs: object) -> None:
        if "curve" in kwargs:  # the disk filled up while the first trial trained
            raise optuna.exceptions.StorageInternalError("commit") from sqlite3.OperationalError(
                "database or disk is full"
            )
        write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(record, "write_trial", full_at_the_curve)
    done = cli_here("run", "space.yaml", "--study", "s", "--trials", "3", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "kdsearch: error: cannot use the study storage sqlite:///studies/s.db: database or disk "
        "is full; what had finished is kept, and `kdsearch run space.yaml --study s --trials 3 "
        "--resume` finishes the search once the storage works again"
    ), done.stderr
    url = f"sqlite:///{tmp_path}/studies/s.db"
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [TrialState.RUNNING], "stopped at the first failed write, left to --resume"


@pytest.mark.parametrize(
    ("recorded", "state", "after", "said"),
    [
        (
            3,
            "COMPLETE",
            "",
            "stopped; `kdsearch run space.yaml --study s --resume` finishes the search",
        ),
        (5, "COMPLETE", "", "stopped as the search ended: its 5 trials had all finished"),
        (
            5,
            "COMPLETE",
            "promote: {top_k: 1, seeds: 1}\n",
            "stopped after the search; `kdsearch run space.yaml --study s --resume` does the "
            "space's promotion (the promotion runs already finished are kept)",
        ),
        (  # nothing for a resume to promote
            5,
            "FAIL",
            "promote: {top_k: 1, seeds: 1}\n",
            "stopped as the search ended: its 5 trials had all finished, none complete",
        ),
    ],
)
def test_a_ctrl_c_in_the_search_says_what_is_left_to_do(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli_here: CliHere,
    recorded: int,
    state: str,
    after: str,
    said: str,
) -> None:
    """A Ctrl-C that landed after the last of the 5 trials was recorded, before the summary,
    said that `--resume` finishes the search, which had no trial left to run."""

    def search(args: object, space: SearchSpace, record: Record, *_: object) -> None:
        for number in range(recorded):  # as the trials finish, then the Ctrl-C
            assert record.next_plan(f"ray{number}") is not None
            record.finish(number, TrialState[state], {1: 0.5}, {"epochs": 1, "threads": 1})
        raise KeyboardInterrupt

    monkeypatch.setattr("kdsearch.commands.run.search_trials", search)
    (tmp_path / "space.yaml").write_text(SMALL_SPACE + after)
    done = cli_here("run", "space.yaml", "--study", "s", cwd=tmp_path)
    assert done.returncode == 130
    assert done.stderr.splitlines()[-2:] == [
        said,
        "kdsearch: interrupted (what had finished is kept; nothing half-done was written)",
    ], done.stderr


def test_a_run_s_own_export_says_nothing_of_the_search_it_saw_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: CliHere
) -> None:
    """A resume with no trial left to run went on to the space's export, which noted that the
    search had stopped with 7 of the 10 trials an earlier `--trials 10` asked for."""
    from kdsearch.errors import DataError

    def search(args: object, space: SearchSpace, record: Record, *_: object) -> None:
        for number in range(7):  # of the 10 asked for, then the Ctrl-C
            assert record.next_plan(f"ray{number}") is not None
            record.finish(number, TrialState.COMPLETE, {1: 0.5}, {"epochs": 1, "threads": 1})
        raise KeyboardInterrupt

    def no_data(*_: object, **__: object) -> None:  # the export stops where it would load the data
        raise DataError("no data here")

    monkeypatch.setattr("kdsearch.commands.run.search_trials", search)
    monkeypatch.setattr("kdsearch.data.load_data", no_data)
    (tmp_path / "space.yaml").write_text(SMALL_SPACE + "export: {dir: w}\n")
    assert cli_here("run", "space.yaml", "--trials", "10", cwd=tmp_path).returncode == 130
    done = cli_here("run", "space.yaml", "--resume", cwd=tmp_path)  # 5 asked: none to run
    assert done.returncode == 2 and "note:" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "kdsearch: error: no data here"
    exported = cli_here("export", "s", "--out", "w", cwd=tmp_path)  # on its own, it says so
    assert exported.stderr.splitlines()[0].startswith(
        "note: the search of 's' stopped with 7 of its 10 trials finished;"
    ), exported.stderr


def record_of(
    study: optuna.Study, storage: object = None, *, others_alive: bool = False
) -> SimpleNamespace:
    """What the study checks of `kdsearch.commands` read of a `Record`: its study, its storage
    (the study's own unless given) and whether other drivers are alive in it."""
    return SimpleNamespace(
        study=study,
        storage=study._storage if storage is None else storage,
        others_alive=lambda: others_alive,
    )


def test_a_study_keeps_the_teacher_its_first_driver_recorded(tmp_path: Path) -> None:
    study = optuna.create_study(study_name="s")
    record = record_of(study)
    weights = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, weights)
    first = TeacherFiles(weights, weights_digest(weights))
    same_teacher(record, first)  # type: ignore[arg-type]
    assert study.user_attrs["teacher_files"]["teacher_digest"] == first.digest
    same_teacher(record, first)  # type: ignore[arg-type]  # a resume with the same teacher
    torch.save({"w": torch.ones(3)}, weights)  # trained again, or another machine's
    with pytest.raises(
        StudyError, match=r"study 's': the teacher file .* hashes .*\(--study NAME\)"
    ):
        same_teacher(record, TeacherFiles(weights, weights_digest(weights)))  # type: ignore[arg-type]


def test_a_file_gone_from_a_relative_cache_folder_is_said_to_be_gone_from_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The study records absolute paths; a KDSEARCH_CACHE_DIR given relative named the same
    file otherwise, and the refusal said to copy the file onto itself."""
    from kdsearch.commands.common import not_retrained

    monkeypatch.chdir(tmp_path)
    study = optuna.create_study(study_name="s")
    gone = tmp_path / "cache" / "teachers" / "t.pt"
    study.set_user_attr("teacher_files", {"teacher_file": str(gone), "teacher_digest": "ab"})
    with pytest.raises(StudyError, match="which is gone from this machine"):
        not_retrained(
            record_of(study),
            Path("cache/teachers/t.pt"),
            heads=False,
        )  # type: ignore[arg-type]


@pytest.mark.parametrize("lost", ["teacher", "heads"])
def test_a_resume_that_would_train_the_studys_teacher_again_is_refused_before(lost: str) -> None:
    """A --resume on a machine without the cached teacher trained it in full, and only then
    found it hashing otherwise (on a GPU it always does) and refused it."""
    from kdsearch.commands.common import prepare_teacher
    from kdsearch.data import load_data

    from .conftest import tiny_recipe

    recipe = tiny_recipe({"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1})
    data = load_data(recipe.data)
    files = TeacherFiles.of(prepare_teacher(recipe, data, True), True)
    study = optuna.create_study(study_name="s")
    record = record_of(study)
    same_teacher(record, files)  # type: ignore[arg-type]
    again = prepare_teacher(recipe, data, True, record)  # type: ignore[arg-type]  # all cached
    assert TeacherFiles.of(again, True) == files
    if lost == "teacher":
        gone, digest, what, key = files.weights, files.digest, "teacher", "teacher.checkpoint"
    else:
        assert files.heads is not None
        gone, digest = files.heads, files.heads_digest
        what, key = "teacher's heads", "teacher.heads.checkpoint"
    gone.unlink()
    with pytest.raises(StudyError) as refused:
        prepare_teacher(recipe, data, True, record)  # type: ignore[arg-type]
    assert not gone.exists(), "refused before training it again"
    assert str(refused.value) == (  # this machine's own cache, emptied since
        f"study 's': its trials learned from the {what} in {gone} (weights hash {digest}), "
        f"which is gone from this machine; trained again here it need not hash the same, and "
        f"would be refused after its training: put a copy of it back at {gone}, or name it "
        f"with --set {key}=FILE, or search in a new study (--study NAME)"
    )
    part = "heads_" if lost == "heads" else ""
    files_attr = dict(record.study.user_attrs["teacher_files"])
    files_attr[f"teacher_{part}file"] = "/elsewhere/teacher.pt"  # another machine's search
    record.study.set_user_attr("teacher_files", files_attr)
    with pytest.raises(StudyError) as refused:
        prepare_teacher(recipe, data, True, record)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"study 's': its trials learned from the {what} in /elsewhere/teacher.pt (weights hash "
        f"{digest}), and this machine has no copy at {gone}; trained again here it need not "
        f"hash the same, and would be refused after its training: copy that file to {gone}, "
        f"or name it with --set {key}=FILE, or search in a new study (--study NAME)"
    )


def test_a_resume_with_another_checkpoint_teacher_is_refused_before_its_heads(
    tmp_path: Path,
) -> None:
    """A resume whose `teacher.checkpoint` held other weights was refused for the heads it
    lacked, with advice (copy the old heads here) that would pair them with another teacher."""
    from kdsearch.commands.common import prepare_teacher
    from kdsearch.data import load_data

    from .conftest import tiny_recipe

    changes = {"distill.hsakd.weight": 1.0, "teacher.heads.epochs": 1}
    first = tiny_recipe(changes)
    data = load_data(first.data)
    trained = prepare_teacher(first, data, False)
    state = torch.load(trained.path, weights_only=True)
    state = state.get("state_dict", state)
    torch.save(state, tmp_path / "a.pt")
    state["fc.bias"] = state["fc.bias"] + 1.0
    torch.save(state, tmp_path / "b.pt")
    recipe = tiny_recipe(changes | {"teacher.checkpoint": str(tmp_path / "a.pt")})
    study = optuna.create_study(study_name="s")
    record = record_of(study)
    searched = prepare_teacher(recipe, data, True, record)  # type: ignore[arg-type]  # records
    assert record.study.user_attrs["teacher_files"] == TeacherFiles.of(searched, True).attrs()
    assert record.study.user_attrs["teacher_files"]["teacher_heads_digest"]  # its heads' too
    other = tiny_recipe(changes | {"teacher.checkpoint": str(tmp_path / "b.pt")})
    with pytest.raises(StudyError) as refused:
        prepare_teacher(other, data, True, record)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"study 's': the teacher file {tmp_path / 'b.pt'} hashes "
        f"{weights_digest(tmp_path / 'b.pt')}, but the runs recorded before learned from one "
        f"that hashed {weights_digest(tmp_path / 'a.pt')}: it was trained again or replaced "
        "since (the same weights saved under other names, or in another dtype, hash "
        "otherwise); put that file back, or search in a new study (--study NAME)"
    )


def test_a_resume_on_data_that_changed_since_is_refused(tmp_path: Path) -> None:
    """An image folder whose files changed between a search and its resume (one image added
    redraws its subset) was searched on as if nothing had: no setting differs, and nothing
    compared the data. The study records its data's fingerprint and a resume compares it."""
    from kdsearch.commands.run import same_data
    from kdsearch.data import load_data
    from kdsearch.recipe import DataConfig

    url = write_study(tmp_path)
    study = optuna.load_study(study_name="s", storage=url)
    digits = load_data(DataConfig(dataset="digits", subset=300, val_fraction=0.3))
    record = record_of(study)
    same_data(record, digits)  # type: ignore[arg-type]  # as an earlier kdsearch left it: not
    assert "data_fingerprint" not in study.user_attrs  # taken before the teacher has passed
    ran = run_cli("run", "space.yaml", "--resume", "--trials", "6", cwd=tmp_path)  # one more
    assert ran.returncode == 0, ran.stderr
    assert (
        "note: study 's' recorded no data fingerprint (an earlier kdsearch); its trials are "
        f"taken to have trained on the data loaded here ({digits.fingerprint[:12]})"
    ) in ran.stderr
    study = optuna.load_study(study_name="s", storage=url)
    assert study.user_attrs["data_fingerprint"] == digits.fingerprint
    study.set_user_attr("data_fingerprint", "0123456789abcdef")  # as another folder's was
    ran = run_cli("run", "space.yaml", "--resume", "--trials", "20", cwd=tmp_path)
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1] == (
        "kdsearch: error: study 's': its trials trained on other data than digits loads here "
        f"(data fingerprint 0123456789ab, here {digits.fingerprint[:12]}): its files changed "
        "since, or decode otherwise on this machine; put them back as they were, or search in "
        "a new study (--study NAME)"
    )


def test_a_study_of_no_trials_yet_takes_its_first_drivers_data() -> None:
    """A second driver with other data joined a study whose first driver was still preparing
    its teacher, and both searched it on different data. A driver alone in a study of no
    trials (a run refused before left a fingerprint, and the data was fixed) records its own."""
    from kdsearch.commands.run import same_data
    from kdsearch.data import load_data
    from kdsearch.recipe import DataConfig

    first = load_data(DataConfig(dataset="digits", subset=300, val_fraction=0.3))
    other = load_data(DataConfig(dataset="digits", subset=400, val_fraction=0.3))
    study = optuna.create_study(study_name="new")
    alone = record_of(study)
    same_data(alone, first)  # type: ignore[arg-type]
    assert study.user_attrs["data_fingerprint"] == first.fingerprint  # at once, for joiners
    joining = record_of(study, others_alive=True)
    with pytest.raises(StudyError, match=r"its trials are prepared by another driver on other"):
        same_data(joining, other)  # type: ignore[arg-type]
    same_data(alone, other)  # type: ignore[arg-type]
    assert study.user_attrs["data_fingerprint"] == other.fingerprint


def test_a_promotion_run_whose_process_died_is_one_failed_run() -> None:
    """Ray retried it from its first epoch, then `ray.get` raised out of the promotion, which
    cancelled every other run still training."""
    import ray

    from kdsearch.search.cluster import RayWatch
    from kdsearch.search.jobs import job_result

    @ray.remote(num_cpus=1, max_retries=0)
    def dies() -> None:
        os._exit(1)  # as Ray's memory monitor or a segfault ends a run

    @ray.remote(num_cpus=1)
    def raises() -> None:
        raise ValueError("a bug in the run")

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with RayWatch(None, "", before=lambda: None) as watch:  # the Ray answers: their own
            died = job_result(dies.remote(), "trial-1-seed0", watch)
            raised = job_result(raises.remote(), "trial-2-seed0", watch)
    finally:
        ray.shutdown()
    assert died.key == "trial-1-seed0" and died.weights is None
    assert died.failure is not None and died.failure.startswith("WorkerCrashedError")
    # no accuracy, as for a run that raised in its process: not a score of 0%
    assert math.isnan(died.val_acc) and math.isnan(died.test_acc)
    assert raised.failure == "ValueError: a bug in the run"


@pytest.mark.parametrize("reduction_factor", [2.0, 2.5, 1.5, 1.2, 10**0.5])
def test_a_resumed_search_enters_earlier_trials_into_the_rungs_as_a_live_search_did(
    reduction_factor: float,
) -> None:
    """A fractional reduction factor puts rungs between epochs (2.5: at 2.5, 6.25, 15.625); a
    live trial enters each at the first epoch past it, and a resumed search entered the epoch
    before (epochs 2, 6, 15 for 3, 7, 16), a lower accuracy, so it pruned less. Near 1 (1.2) a
    result fills one rung at most, and the result Tune hands the scheduler as a trial ends fills
    one more; sqrt(10) puts a rung at 10.000000000000002, which epoch 10 does not reach. The
    live side is driven as Tune drives a scheduler: results until it says STOP, then the end."""
    from types import SimpleNamespace

    from kdsearch.search.tuner import RecordingASHA
    from kdsearch.study.contents import METRIC

    live = RecordingASHA(16, 1, reduction_factor)
    live.set_search_properties(METRIC, "max")
    curves: dict[str, dict[int, float]] = {}
    for n in range(12):  # trials that learn at different speeds, so some are stopped
        trial = SimpleNamespace(trial_id=f"t{n}")
        live.on_trial_add(None, trial)  # type: ignore[arg-type]
        curve = curves.setdefault(trial.trial_id, {})
        for epoch in range(1, 17):
            result = {"epoch": epoch, METRIC: (epoch * (1 + n % 5)) / 100 + n / 1000}
            curve[epoch] = result[METRIC]
            if live.on_trial_result(None, trial, result) == "STOP":  # type: ignore[arg-type]
                break
        live.on_trial_complete(None, trial, result)  # type: ignore[arg-type]
    assert any(len(c) < 16 for c in curves.values()), "some trials were stopped"
    resumed = RecordingASHA(16, 1, reduction_factor)
    resumed.remember(curves)
    entered = [dict(recorded) for _, recorded in resumed._brackets[0]._rungs]
    assert entered == [dict(recorded) for _, recorded in live._brackets[0]._rungs]
    assert len(entered) >= 3 and all(entered)


def test_a_resume_refused_before_its_search_leaves_the_recorded_settings_as_they_were(
    tmp_path: Path,
) -> None:
    """`promote` and `export` run alone take the machine settings the study recorded last: a
    resume refused for a teacher file that is not there had recorded that file, and both then
    failed on it."""
    url = write_study(tmp_path)
    before = optuna.load_study(study_name="s", storage=url).user_attrs
    ran = run_cli(
        "run",
        "space.yaml",
        "--resume",
        "--trials",
        "6",
        "--set",
        "teacher.checkpoint=nope.pt",
        cwd=tmp_path,
    )
    assert ran.returncode == 2 and "nope.pt" in ran.stderr, ran.stderr
    after = optuna.load_study(study_name="s", storage=url).user_attrs
    assert after["base_recipe"] == before["base_recipe"]
    assert "nope.pt" not in after["base_recipe"]


def test_a_resume_counts_to_what_the_study_holds_and_notes_other_asha_or_sampler_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver killed with two trials proposed, resumed with --trials 1 and other rungs and
    sampler: its orphans run again whatever --trials says (the count read `trials 2/1`), and
    the settings that decide how they are stopped and proposed were taken silently. (One
    search for both: each costs half a minute of CI.)"""
    from kdsearch.study.record import Record
    from kdsearch.study.storage import open_storage

    (tmp_path / "studies").mkdir()
    space = SearchSpace.from_yaml(SMALL_SPACE, source="space.yaml")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with monkeypatch.context() as m:
        m.setattr("kdsearch.study.drivers.os.getpid", lambda: dead.pid)
        url = f"sqlite:///{tmp_path}/studies/s.db"
        first = Record(open_storage(url), "s", space, target=2, resume=False)
        for n in range(2):
            assert first.next_plan(f"r{n}") is not None
    retuned = SMALL_SPACE.replace("grace_epochs: 1", "grace_epochs: 2").replace(
        "sampler: random", "sampler: tpe"
    )
    (tmp_path / "space.yaml").write_text(retuned)
    ran = run_cli("run", "space.yaml", "--resume", "--trials", "1", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    said = " ".join(ran.stderr.split())
    assert "study 's' in" in said and ": 2 trials (0 finished before, 2 to run again)" in said
    assert re.search(r"trials 2/2: \d complete, \d pruned, 0 failed, 0 running", said), said
    # the data's splits, as `train` says them (SMALL_SPACE: 300 digits, 30% to validate)
    assert "data: 210 train / 90 val / 359 test images, 1x8x8, 10 classes" in said
    assert (
        "note: study 's' was searched with other settings (asha.grace_epochs 1 -> 2; "
        "search.sampler 'random' -> 'tpe'); the trials still to run are stopped and proposed by "
        "this run's, and the finished ones stay as they were"
    ) in said
    recorded = optuna.load_study(study_name="s", storage=url).user_attrs["space"]
    assert recorded == retuned, "recorded since: a next resume has nothing to note"


def test_a_study_that_cannot_record_its_data_stops_in_one_line_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: CliHere
) -> None:
    """The data's fingerprint is the first thing a run writes in a new study once the data has
    loaded; a disk that filled up then gave Optuna's traceback and status 1, and left the file
    a rerun would then find."""
    import sqlite3

    (tmp_path / "space.yaml").write_text(one_lr_without_kd("trials: 2, concurrent: 1").text)
    set_attr = optuna.Study.set_user_attr

    def full_at_the_fingerprint(study: optuna.Study, key: str, value: object) -> None:
        if key == "data_fingerprint":
            raise optuna.exceptions.StorageInternalError("commit") from sqlite3.OperationalError(
                "database or disk is full"
            )
        set_attr(study, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", full_at_the_fingerprint)
    done = cli_here("run", "space.yaml", "--study", "s", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "kdsearch: error: cannot use the study storage sqlite:///studies/s.db: database or disk "
        "is full"
    ), done.stderr
    assert not (tmp_path / "studies").exists(), "a refused run leaves no file"


def test_a_failed_write_of_an_older_studys_data_is_one_line_and_no_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`adopt_data` on a study an earlier kdsearch recorded without a fingerprint, where the
    write fails: the storage's one line, and no note that the data was taken as the study's."""
    import sqlite3

    from kdsearch.commands.run import adopt_data
    from kdsearch.data import load_data
    from kdsearch.errors import StorageError
    from kdsearch.recipe import DataConfig
    from kdsearch.study.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(study_name="s", storage=storage)
    digits = load_data(DataConfig(dataset="digits", subset=300, val_fraction=0.3))

    def full(*args: object) -> None:
        raise optuna.exceptions.StorageInternalError("commit") from sqlite3.OperationalError(
            "database or disk is full"
        )

    monkeypatch.setattr(optuna.Study, "set_user_attr", full)
    record = record_of(study, storage)
    capsys.readouterr()
    with pytest.raises(StorageError, match=r"s\.db: database or disk is full$"):
        adopt_data(record, digits)  # type: ignore[arg-type]
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("fails", ["read", "write"])
def test_a_study_that_cannot_read_or_record_its_teacher_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """The teacher files are read from the study and written to it after the teacher trained
    (on a server, perhaps an hour after the last write): a connection lost by then gave
    Optuna's traceback."""
    import sqlite3

    from kdsearch.errors import StorageError
    from kdsearch.study.storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(study_name="s", storage=storage)
    weights = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(3)}, weights)

    def lost(*args: object) -> None:
        raise optuna.exceptions.StorageInternalError("commit") from sqlite3.OperationalError(
            "server closed the connection unexpectedly"
        )

    if fails == "read":
        monkeypatch.setattr(type(storage), "get_study_user_attrs", lost)
    else:
        monkeypatch.setattr(optuna.Study, "set_user_attr", lost)
    with pytest.raises(StorageError, match=r"s\.db: server closed the connection unexpectedly$"):
        same_teacher(  # type: ignore[arg-type]
            record_of(study, storage),
            TeacherFiles(weights, weights_digest(weights)),
        )


def test_a_study_that_cannot_be_read_as_a_resume_starts_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: CliHere
) -> None:
    """The trials a resumed study holds and the settings it was searched with are read before
    the data loads; a storage lost there gave Optuna's traceback and status 1."""
    import sqlite3

    from kdsearch.study import contents

    (tmp_path / "space.yaml").write_text(one_lr_without_kd("trials: 2, concurrent: 1").text)

    def lost(*args: object) -> None:
        raise optuna.exceptions.StorageInternalError("read") from sqlite3.OperationalError(
            "database is locked"
        )

    monkeypatch.setattr(contents, "retuned_settings", lost)
    done = cli_here("run", "space.yaml", "--study", "s", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "kdsearch: error: cannot use the study storage sqlite:///studies/s.db: database is locked"
    ), done.stderr
