from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState, create_trial

from kdsearch.commands.common import load_recipe
from kdsearch.data import ImageData, load_data
from kdsearch.errors import KdsearchError
from kdsearch.export import Winner, _copy_checked, check_out, export
from kdsearch.models import build_model
from kdsearch.paths import staging_path
from kdsearch.promote import _record, open_promoted, plan
from kdsearch.recipe import Recipe, flatten
from kdsearch.search.worker import JobResult
from kdsearch.study.contents import PER_MACHINE
from kdsearch.study.storage import open_storage
from kdsearch.teacher import TeacherFiles, get_teacher, weights_digest

from .conftest import SMALL_SPACE, CliHere, auto_on_cpu, run_cli, write_study

pytestmark = pytest.mark.slow


def assert_retrained_alike(root: Path, export: str, val_acc: float) -> None:
    """`OMP_NUM_THREADS=1 kdsearch train EXPORT/recipe.yaml`, as the export's last line says,
    gives the exported student again (its validation accuracy and its weights), on a machine
    without kdsearch's cache: the teacher comes from the export, it is not trained again."""
    empty = root / "another-machine-cache"
    again = run_cli(
        "train",
        f"{export}/recipe.yaml",
        cwd=root,
        env={"OMP_NUM_THREADS": "1", "KDSEARCH_CACHE_DIR": str(empty)},
    )
    assert again.returncode == 0, again.stderr
    # named after the export (every export's file is recipe.yaml), in studies/runs
    (out,) = (root / "studies" / "runs").glob(f"{Path(export).name}-2*")
    assert f"teacher resnet8 (checkpoint, {root / export / 'teacher.pt'})" in again.stderr
    assert "not the images, splits or normalisation" not in again.stderr, (
        "the same data as the export's"
    )
    assert "is not the teacher" not in again.stderr, "the export's own teacher"
    assert "its weights will differ" not in again.stderr, "the precision it trained in"
    assert not (empty / "teachers").exists(), "no teacher trained"
    # what `train` wrote runs again from anywhere: its teacher paths are absolute
    rerun = Recipe.load(out / "recipe.yaml")
    assert rerun.teacher.checkpoint == str(root / export / "teacher.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_acc"] == pytest.approx(val_acc)
    exported = torch.load(root / export / "student.pt", weights_only=True)
    retrained = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.allclose(retrained[k], v, atol=1e-5) for k, v in exported.items())


def record_all(root: Path, **attrs: object) -> None:
    """Every run of the study in root/studies/s.db (its search's and its promotion's) recorded
    with these values of attributes it holds, as if it had trained so."""
    with sqlite3.connect(root / "studies" / "s.db") as db:
        for key, value in attrs.items():
            db.execute(
                "UPDATE trial_user_attributes SET value_json = ? WHERE key = ?",
                (json.dumps(value), key),
            )


def test_export_of_a_promoted_study_reproduces_with_kdsearch_train(
    tmp_path: Path, isolated_cache: Path, cli_here: CliHere
) -> None:
    write_study(tmp_path)
    assert (
        run_cli(
            "promote", "s", "--top-k", "1", "--seeds", "2", "--epochs", "2", cwd=tmp_path
        ).returncode
        == 0
    )
    proc = run_cli("export", "s", "--out", "winner", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "winner"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "promoted" and meta["trial"] == 1 and meta["seeds"] == [0, 1]
    assert {"kdsearch", "torch", "optuna", "ray"} <= set(meta["versions"])
    runs = [
        t
        for t in optuna.load_study(
            study_name="s-promoted", storage=f"sqlite:///{tmp_path}/studies/s.db"
        ).trials
        if t.user_attrs["source_trial"] == 1 and t.state == TrialState.COMPLETE
    ]
    best = max(runs, key=lambda t: (t.value, -t.user_attrs["seed"]))
    recipe = Recipe.load(out / "recipe.yaml")
    # the recipe loads back equal, but for the teacher it names: the one the export holds
    assert recipe == Recipe.from_yaml(best.user_attrs["recipe"]).override(
        {"teacher.checkpoint": str(out / "teacher.pt")}
    )
    assert "checkpoint: teacher.pt" in (out / "recipe.yaml").read_text(), "the folder can move"
    assert meta["teacher_files"]["teacher.pt"]["digest"] == best.user_attrs["teacher_digest"]
    assert meta["teacher_files"]["teacher.pt"]["checked"] is True
    assert meta["data_fingerprint"] == best.user_attrs["data_fingerprint"]
    assert meta["inputs"] == best.user_attrs["inputs"] and meta["inputs"]["channels"] == 1
    assert meta["failed_seeds"] == [] and meta["planned_seeds"] == 2
    assert meta["storage"] == str((tmp_path / "studies" / "s.db").resolve())
    assert "failed at" not in proc.stderr and "seeds a promotion asked for" not in proc.stderr
    assert "trained on other images, splits or normalisation" not in proc.stderr
    assert not (out / "teacher.heads.pt").exists(), "no term of the winner reads heads"
    # plain KD ahead of the winner: told, with how to train it, and the winner exported
    plain_kd = (
        "SELECT trial_id FROM trial_params WHERE param_name = 'source_trial' AND param_value = -2"
    )
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        kept = db.execute(
            f"SELECT trial_id, value FROM trial_values WHERE trial_id IN ({plain_kd})"
        )
        was = kept.fetchall()
        db.execute(f"UPDATE trial_values SET value = 1.0 WHERE trial_id IN ({plain_kd})")
    ahead = cli_here("export", "s", "--out", "ahead", cwd=tmp_path)
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        db.executemany(
            "UPDATE trial_values SET value = ? WHERE trial_id = ?", [(v, i) for i, v in was]
        )
    assert len(was) == 2 and ahead.returncode == 0, ahead.stderr
    said = " ".join(ahead.stderr.split())
    assert (
        f"note: plain KD scored higher on validation (100.00% against {100 * meta['metrics']['val_acc_mean']:.2f}%) "
        "than the best searched recipe, which is exported all the same; for plain KD, "
    ) in said
    # the command it gives trains plain KD's seed-0 run as recorded (it said only "the base
    # recipe with every distill weight but ce's and kd's at 0", and no file or seed)
    found = re.search(r"for plain KD, `([^`]+)` trains its seed 0 run again", said)
    assert found is not None, said
    words = shlex.split(found.group(1))
    assert words[:4] == ["OMP_NUM_THREADS=1", "kdsearch", "train", "ahead/recipe.yaml"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert "distill.kd.temperature=4.0" in sets  # the base's, where the winner searched it
    told = load_recipe(str(tmp_path / "ahead" / "recipe.yaml"), sets)
    (recorded,) = [
        Recipe.from_yaml(t.user_attrs["recipe"])
        for t in optuna.load_study(
            study_name="s-promoted", storage=f"sqlite:///{tmp_path}/studies/s.db"
        ).trials
        if t.user_attrs["label"] == "plain KD" and t.user_attrs["seed"] == 0
    ]
    machine = {key: told.get(key) for key in PER_MACHINE}
    assert told == recorded.override(machine)
    assert json.loads((tmp_path / "ahead" / "meta.json").read_text())["trial"] == 1
    as_written = Recipe.from_yaml((out / "recipe.yaml").read_text())  # paths as in the file
    assert json.loads((out / "hyperparameters.json").read_text()) == flatten(as_written.to_dict())
    state = torch.load(out / "student.pt", weights_only=True)
    build_model("resnet8", 10, 1).load_state_dict(state)  # strict: the student alone
    # The promotion trained with one thread (per_trial.cpu: 1); the CPU's channels-last kernels
    # split their sums by thread, so the same weights need the same thread count, which the
    # export's last line and meta.json give.
    assert meta["threads"] == 1
    assert "`OMP_NUM_THREADS=1 kdsearch train winner/recipe.yaml` reproduces it" in proc.stderr
    assert best.user_attrs["device"] == meta["device"] == "cpu"
    # and the precision `auto` became there, which `kdsearch train` of the export compares
    here = auto_on_cpu()
    assert best.user_attrs["precision"] == meta["precision"] == here
    assert best.user_attrs["onednn_cap"] == meta["onednn_cap"] == ""  # none on oneDNN

    # runs of device `auto` on a machine where that is CUDA, which trained on its CPU (per_trial
    # gpu 0): the line pins the CPU the weights trained on; the recipe keeps the machine's `auto`
    def run_device(was: str, now: str) -> None:
        with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
            db.execute(
                "UPDATE trial_user_attributes SET value_json = replace(value_json, ?, ?) "
                "WHERE key = 'recipe'",
                (f"device: {was}", f"device: {now}"),
            )

    run_device("cpu", "auto")
    with pytest.MonkeyPatch.context() as cuda_here:
        cuda_here.setattr(torch.cuda, "is_available", lambda: True)
        on_cuda = cli_here("export", "s", "--out", "winner", cwd=tmp_path)
    run_device("auto", "cpu")
    assert on_cuda.returncode == 0, on_cuda.stderr
    assert (
        "`OMP_NUM_THREADS=1 kdsearch train winner/recipe.yaml --set device=cpu` reproduces it"
        in on_cuda.stderr
    )
    assert Recipe.load(out / "recipe.yaml").device == "auto"
    out.rename(tmp_path / "moved-winner")  # the export is a folder that can go anywhere
    assert_retrained_alike(tmp_path, "moved-winner", best.value)  # same recipe, CPU: same student
    # the export's teacher file replaced since: a retraining says it learns from another one
    shipped = tmp_path / "moved-winner" / "teacher.pt"
    halved = {k: v * 0.5 if k.startswith("fc.") else v for k, v in torch.load(shipped).items()}
    torch.save(halved, shipped)
    swapped = cli_here(
        "train",
        "moved-winner/recipe.yaml",
        "--set",
        "schedule.epochs=1",
        "--out",
        "sw",
        cwd=tmp_path,
    )
    assert swapped.returncode == 0, swapped.stderr
    assert (
        f"note: {shipped} is not the teacher the exported student in moved-winner learned from "
        f"(weights hash {weights_digest(shipped)}, there {meta['teacher_files']['teacher.pt']['digest']})"
    ) in " ".join(swapped.stderr.split())
    # the cached teacher the promotion learned from, trained again since (or replaced): the
    # export refuses to ship another teacher with the student, and writes nothing
    (cached,) = (isolated_cache / "teachers").glob("resnet8-*[0-9a-f].pt")
    other = build_model("resnet8", 10, 1).state_dict()
    torch.save(other, cached)
    proc = cli_here("export", "s", "--out", "w3", cwd=tmp_path)
    assert proc.returncode == 2 and f"{cached} is not the teacher file" in proc.stderr
    assert not (tmp_path / "w3").exists(), "nothing written, not even the folder"
    cached.unlink()  # gone: moved, or promoted on another machine
    proc = cli_here("export", "s", "--out", "new/nested dir", cwd=tmp_path)
    assert proc.returncode == 2 and f"learned from is not at {cached}" in proc.stderr
    assert not (tmp_path / "new").exists(), "the folders it made are gone again"
    # a promotion by a kdsearch that recorded no teacher files: the base recipe's teacher as
    # this machine has it, said to be unchecked, and never one trained now
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        db.execute("DELETE FROM trial_user_attributes WHERE key LIKE 'teacher_%'")
    proc = cli_here("export", "s", "--out", "w4", cwd=tmp_path)
    assert proc.returncode == 2 and "the teacher it trained against is not on" in proc.stderr
    assert not (isolated_cache / "teachers" / cached.name).exists(), "no teacher trained"
    torch.save(other, cached)
    proc = cli_here("export", "s", "--out", "w4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "the promotion recorded no teacher file" in proc.stderr
    unchecked = json.loads((tmp_path / "w4" / "meta.json").read_text())["teacher_files"]
    assert unchecked["teacher.pt"]["checked"] is False
    assert (tmp_path / "w4" / "teacher.pt").read_bytes() == cached.read_bytes()
    # promoted on other data than this machine loads: said, and meta.json keeps the promotion's
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        db.execute(
            "UPDATE trial_user_attributes SET value_json = '\"f00d\"' WHERE key = 'data_fingerprint'"
        )
    # and a seed of the winner that diverged, of four asked for: said, and in meta.json
    promoted = optuna.load_study(
        study_name="s-promoted", storage=f"sqlite:///{tmp_path}/studies/s.db"
    )
    promoted.set_user_attr("seeds:2", 5)  # asked for at this budget
    promoted.set_user_attr("seeds:40", 9)  # at another: not this mean's
    for seed, failure in ((2, "OutOfMemoryError: CUDA out of memory"), (3, "NonFiniteLoss: nan")):
        promoted.add_trial(
            create_trial(
                state=TrialState.FAIL,
                params={"source_trial": 1, "seed": seed},
                distributions=best.distributions,
                user_attrs={**best.user_attrs, "seed": seed, "failure": failure},
            )
        )
    proc = cli_here("export", "s", "--out", "w5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert (
        "note: the promoted student trained on other images, splits or normalisation than this machine"
        in said
    )
    assert "note: seed 2 of the winner failed at 2 epochs (`kdsearch trials s-promoted`" in said
    assert "note: the winner's mean is over 2 of the 5 seeds a promotion asked for" in said
    # the promotion that trains them, as it was asked for (a bare `promote s` plans the space's)
    again = "`kdsearch promote s --top-k 1 --seeds 5 --epochs 2`"
    assert f"{again} tries them again" in said and f"{again} trains the rest" in said
    # a seed that diverged is not sent to be tried again: on the CPU it diverges the same way
    assert (
        "note: seed 3 of the winner diverged at 2 epochs, its loss non-finite (`kdsearch trials "
        "s-promoted` says why); its mean is over the seeds that finished, and a try again with "
        "the same seed, on the CPU with the same thread count, diverges the same way"
    ) in said
    meta = json.loads((tmp_path / "w5" / "meta.json").read_text())
    assert meta["data_fingerprint"] == "f00d" and meta["inputs"] == best.user_attrs["inputs"]
    assert (meta["seeds"], meta["failed_seeds"], meta["planned_seeds"]) == ([0, 1], [2, 3], 5)
    # a search of the study running on another machine, whose best trials may yet change: a
    # promotion or an export says so (and a `run` on this one would not: `searching_now`)
    storage = open_storage(f"sqlite:///{tmp_path}/studies/s.db")
    beat = "heartbeat:far:4242"  # a driver as `this_driver` names them, on host "far"
    storage.set_study_system_attr(storage.get_study_id_from_name("s"), beat, time.time())
    proc = cli_here("promote", "s", "--top-k", "1", "--seeds", "2", "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0 and "runs to train: 0" in proc.stderr, proc.stderr
    assert "promoting the best trial of 's' with 2 seeds" in proc.stderr
    running = "note: 's' is still being searched (by far:4242); this {} its best trials so far"
    assert running.format("promotes") in " ".join(proc.stderr.split())
    # the search resumed after the promotion and found a better trial: exported all the same
    # (a promotion confirmed this one), with the promotion that trains the newcomer
    search = optuna.load_study(study_name="s", storage=storage)
    was_best = search.trials[1]
    newcomer = Recipe.from_yaml(was_best.user_attrs["recipe"]).override(
        {"distill.kd.temperature": 7.5}
    )
    search.add_trial(
        create_trial(
            state=TrialState.COMPLETE,
            value=0.99,
            params={**was_best.params, "distill.kd.temperature": 7.5},
            distributions=was_best.distributions,
            user_attrs={**was_best.user_attrs, "recipe": newcomer.to_yaml()},
        )
    )
    search.add_trial(  # and trial #1's recipe again, better: its promoted runs stand for it
        create_trial(
            state=TrialState.COMPLETE,
            value=0.95,
            params=was_best.params,
            distributions=was_best.distributions,
            user_attrs=was_best.user_attrs,
        )
    )
    proc = cli_here("export", "s", "--out", "w5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert (
        "note: trial #5 of the search scored higher there than the exported recipe's (#1) and no "
        "promotion at 2 epochs has trained it (it finished after the promotion ran, or it "
        "stopped first); `kdsearch promote s --top-k 2 --seeds 5 --epochs 2` does, then export "
        "again"
    ) in said
    assert json.loads((tmp_path / "w5" / "meta.json").read_text())["trial"] == 1
    assert running.format("exports") in said
    # the promotion trains the newcomer, and it fails on every seed: on no leaderboard row,
    # and said, not passed over in silence
    for seed in range(2):
        promoted.add_trial(
            create_trial(
                state=TrialState.FAIL,
                params={"source_trial": 5, "seed": seed},
                distributions=best.distributions,
                user_attrs={
                    **best.user_attrs,
                    "source_trial": 5,
                    "label": "trial 5",
                    "seed": seed,
                    "failure": "NonFiniteLoss: nan",
                },
            )
        )
    proc = cli_here("export", "s", "--out", "w5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert (
        "trial #5 of the search scored higher there than the exported recipe's (#1) and no"
        not in said
    )
    assert (
        "note: trial #5 of the search scored higher there than the exported recipe's (#1), but "
        "its recipe finished no seed at 2 epochs (`kdsearch trials s-promoted` says why)"
    ) in said
    assert json.loads((tmp_path / "w5" / "meta.json").read_text())["trial"] == 1
    storage.set_study_system_attr(storage.get_study_id_from_name("s"), beat, 0.0)  # it ended
    # the promoted weights moved away (a copied study, a PostgreSQL study read elsewhere)
    (tmp_path / "studies" / "s-promoted").rename(tmp_path / "moved")
    proc = cli_here("export", "s", "--out", "w2", cwd=tmp_path)
    assert proc.returncode == 2 and "the promoted student's weights are not at" in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "moved").rename(tmp_path / "studies" / "s-promoted")
    # promoted in another precision than `auto` gives here (another kind of CPU, a oneDNN cap
    # set or unset): the line does not send the user to "a machine like this one"
    there = "fp32" if here == "bf16" else "bf16"
    record_all(tmp_path, precision=there)
    proc = cli_here("export", "s", "--out", "w6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "`OMP_NUM_THREADS=1 kdsearch train w6/recipe.yaml` reproduces it on a machine where its "
        f"`precision: auto` is {there}, as where it trained (here it is {here})"
    ) in " ".join(proc.stderr.split())
    assert json.loads((tmp_path / "w6" / "meta.json").read_text())["precision"] == there
    # promoted in fp32 under a cap on oneDNN's instruction set: the command sets it again, and
    # under it `auto` is fp32 on any CPU
    record_all(tmp_path, onednn_cap="AVX2", precision="fp32")
    proc = cli_here("export", "s", "--out", "w7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "`OMP_NUM_THREADS=1 ONEDNN_MAX_CPU_ISA=AVX2 kdsearch train w7/recipe.yaml` reproduces it "
        "on a machine like this one"
    ) in " ".join(proc.stderr.split())
    assert json.loads((tmp_path / "w7" / "meta.json").read_text())["onednn_cap"] == "AVX2"
    # promoted under none in the precision `auto` is not here, exported under a cap: the command
    # cannot take the cap away, and the line says both
    record_all(tmp_path, onednn_cap="", precision=there)
    with pytest.MonkeyPatch.context() as capped_here:
        capped_here.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        proc = cli_here("export", "s", "--out", "w8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "`OMP_NUM_THREADS=1 kdsearch train w8/recipe.yaml` reproduces it on a machine where its "
        f"`precision: auto` is {there}, as where it trained (here it is {here}), with "
        "ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA unset"
    ) in " ".join(proc.stderr.split())


def test_export_without_a_promotion_trains_the_best_trial(tmp_path: Path) -> None:
    write_study(tmp_path)
    proc = run_cli("export", "s", "--out", "w", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing promoted: training the best trial (#1)" in proc.stderr
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["source"] == "search" and meta["trial"] == 1
    assert 0.0 <= meta["metrics"]["test_acc"] <= 1.0
    assert Recipe.load(tmp_path / "w" / "recipe.yaml").schedule.epochs == 2
    # retrained with the trial's one thread (not this process's default), so the export is the
    # trial's own student and the line it prints says how to train it again
    assert meta["threads"] == 1
    assert "`OMP_NUM_THREADS=1 kdsearch train w/recipe.yaml` reproduces it" in proc.stderr
    assert_retrained_alike(tmp_path, "w", meta["metrics"]["val_acc"])


def test_export_without_a_promotion_says_when_the_search_learned_from_another_teacher(
    tmp_path: Path,
) -> None:
    url = write_study(tmp_path)
    study = optuna.load_study(study_name="s", storage=url)
    study.set_user_attr("teacher_files", {"teacher_file": "/gone.pt", "teacher_digest": "0" * 16})
    # and a promotion whose runs of the searched recipe all diverged: the export fell back to
    # the search's best trial saying only "nothing promoted"
    promoted = open_promoted(open_storage(url), "s")
    for run in plan(study, top_k=1, seeds=2, epochs=2):
        failure = "NonFiniteLoss: nan" if run.source_trial >= 0 else None
        value = 0.0 if failure else 0.5
        weights = None if failure else {}
        result = JobResult(run.key, {1: value}, value, value, 1, 0.1, 1.0, weights, failure)
        _record(promoted, run, result, tmp_path, None, {"data_fingerprint": None})
    proc = run_cli("export", "s", "--out", "w", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "note: no run of a searched recipe has finished in the promotion (2 failed, 2 of them "
        "diverged; `kdsearch trials s-promoted` says why); no promotion confirms this trial's "
        "score, which is from the search's budget"
    ) in " ".join(proc.stderr.split())
    # the baselines that did finish there, which the searched recipe's score does not compare
    # to, each with the command that trains its first run from the exported recipe (it named
    # "the base recipe with every distill weight but ce's and kd's at 0", and no file or seed)
    said = " ".join(proc.stderr.split())
    runs = optuna.load_study(study_name="s-promoted", storage=url).trials
    for baseline in ("plain KD", "student alone"):
        found = re.search(
            f"note: {baseline} finished in the promotion, 50.00% on validation at 2 epochs "
            f"\\(mean of 2 seeds\\); for {baseline}, `([^`]+)` trains its seed 0 run again",
            said,
        )
        assert found is not None, said
        words = shlex.split(found.group(1))
        assert words[:4] == ["OMP_NUM_THREADS=1", "kdsearch", "train", "w/recipe.yaml"]
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        told = load_recipe(str(tmp_path / "w" / "recipe.yaml"), sets)
        (recorded,) = [
            Recipe.from_yaml(t.user_attrs["recipe"])
            for t in runs
            if t.user_attrs["label"] == baseline and t.user_attrs["seed"] == 0
        ]
        assert told == recorded.override({key: told.get(key) for key in PER_MACHINE})
    assert re.search(
        r"note: the teacher file \S+ hashes [0-9a-f]{16}, but the runs recorded before learned "
        r"from one that hashed 0{16}: .*the exported student learns from this one",
        " ".join(proc.stderr.split()),
    )
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["teacher_files"]


def test_export_ships_the_heads_an_hsakd_student_learned_from(tmp_path: Path) -> None:
    recipe = Recipe.from_dict(
        {
            "data": {"dataset": "digits", "subset": 300, "val_fraction": 0.3},
            "teacher": {"arch": "resnet8", "train": {"epochs": 2}, "heads": {"epochs": 1}},
            "student": {"arch": "resnet8"},
            "distill": {"kd": {"weight": 0.0}, "hsakd": {"weight": 1.0, "placement": [2, 3]}},
            "schedule": {"epochs": 2, "kind": "cosine"},
            "device": "cpu",
        }
    )
    data = load_data(recipe.data)
    teacher = get_teacher(recipe, data)  # trained and cached, with its heads, for the run below
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    first = run_cli("train", "r.yaml", "--out", "first", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    metrics = json.loads((tmp_path / "first" / "metrics.json").read_text())
    weights = torch.load(tmp_path / "first" / "student.pt", weights_only=True)
    winner = Winner(recipe, recipe, "search", 0, metrics, None, [0], 1)
    files = TeacherFiles.of(teacher, heads=True)
    url = f"sqlite:///{tmp_path}/studies/s.db"
    export(winner, "s", url, tmp_path / "w", weights, data, files)
    written = Recipe.from_yaml((tmp_path / "w" / "recipe.yaml").read_text())
    assert written.teacher.checkpoint == "teacher.pt"
    assert written.teacher.heads.checkpoint == "teacher.heads.pt"
    assert (tmp_path / "w" / "teacher.heads.pt").read_bytes() == teacher.heads_path.read_bytes()  # type: ignore[union-attr]
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert set(meta["teacher_files"]) == {"teacher.pt", "teacher.heads.pt"}
    # what serving the student outside kdsearch needs: its input's shape and normalisation
    assert meta["inputs"] == {
        "channels": 1,
        "image_size": 8,
        "mean": pytest.approx(list(data.mean)),
        "std": pytest.approx(list(data.std)),
        "classes": [str(c) for c in range(10)],
    }
    assert meta["data_fingerprint"] == data.fingerprint
    # neither the teacher nor its heads trained again where the export is trained
    assert_retrained_alike(tmp_path, "w", metrics["val_acc"])
    # on other images, splits or normalisation, the retraining says its accuracy is not the export's; in
    # another precision than the export trained in (an export from a machine where `auto` is
    # bf16, trained again where it is fp32, or the other way), it says that and how to match it
    here = auto_on_cpu()
    there = "fp32" if here == "bf16" else "bf16"
    (tmp_path / "w" / "meta.json").write_text(json.dumps({**meta, "precision": there}))
    other = run_cli(
        "train",
        "w/recipe.yaml",
        "--set",
        "data.val_fraction=0.2",
        "--set",
        "schedule.epochs=1",
        "--out",
        "other",
        cwd=tmp_path,
    )
    assert other.returncode == 0, other.stderr
    assert (
        "note: these are not the images, splits or normalisation the exported student in w trained on"
        in (" ".join(other.stderr.split()))
    )
    assert (
        f"note: the exported student in w trained in {there} and this run trains in {here} "
        "(`precision: auto` on this machine), so its weights will differ; "
        f"`--set precision={there}` trains it as it did"
    ) in " ".join(other.stderr.split())
    # exported again, of a winner that reads no teacher: the earlier teacher files go
    plain = replace(winner, recipe=recipe.override({"distill.hsakd.weight": 0.0}))
    export(plain, "s", url, tmp_path / "w", weights, data, None)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "hyperparameters.json",
        "meta.json",
        "recipe.yaml",
        "student.pt",
    ]


def test_export_refuses_a_folder_holding_something_else(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what an export killed before it could clean up leaves (and only that) is no obstacle
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".student.pt.4242.tmp").write_bytes(b"half")  # an older version's
    staging_path(tmp_path / "killed" / "meta.json").write_text("{half")
    url = write_study(tmp_path)
    check_out(tmp_path / "killed", "s", url)
    (tmp_path / "killed" / ".notes.4242.tmp").write_text("mine")
    with pytest.raises(KdsearchError, match="already holds files that are not an export"):
        check_out(tmp_path / "killed", "s", url)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    ran = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert ran.returncode == 2 and "not an export of study 's'" in ran.stderr
    assert "training the best trial" not in ran.stderr, "refused before any training"
    assert (tmp_path / "w" / "notes.txt").read_text() == "mine"
    (tmp_path / "w" / "meta.json").write_text("{not json")
    ran = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert ran.returncode == 2 and "not an export of study 's'" in ran.stderr
    # an export of another study of the same name, from another database: kept
    (tmp_path / "w" / "notes.txt").unlink()
    other = {"study": "s", "storage": "/elsewhere/studies/s.db"}
    (tmp_path / "w" / "meta.json").write_text(json.dumps(other))
    ran = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert ran.returncode == 2 and "holds an export of another study named 's'" in ran.stderr
    assert "the one in /elsewhere/studies/s.db" in " ".join(ran.stderr.split())
    assert json.loads((tmp_path / "w" / "meta.json").read_text()) == other
    # one of this study (the file it names, however the URL names it; or one of an older
    # kdsearch, which named no storage) may be replaced
    here = {"study": "s", "storage": str((tmp_path / "studies" / "s.db").resolve())}
    for previous in (here, {"study": "s"}):
        (tmp_path / "w" / "meta.json").write_text(json.dumps(previous))
        check_out(tmp_path / "w", "s", url)
    (tmp_path / "w" / "meta.json").write_text(json.dumps(here))
    monkeypatch.chdir(tmp_path)
    check_out(tmp_path / "w", "s", "sqlite:///studies/s.db")
    (tmp_path / "w" / "notes.txt").write_text("mine")
    ran = cli_here("export", "s", "--out", "w/notes.txt", cwd=tmp_path)
    assert ran.returncode == 2 and "--out w/notes.txt is a file; name a folder" in ran.stderr
    assert "training the best trial" not in ran.stderr and "Traceback" not in ran.stderr
    # a search that would export there is refused before it starts, and leaves nothing
    fresh = tmp_path / "fresh"
    (fresh / "w").mkdir(parents=True)
    (fresh / "w" / "notes.txt").write_text("mine")
    (fresh / "e.yaml").write_text(SMALL_SPACE.replace("name: s}", "name: e}\nexport: {dir: w}"))
    ran = cli_here("run", "e.yaml", cwd=fresh)
    assert ran.returncode == 2 and "not an export of study 'e'" in ran.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ["e.yaml", "w"], "no ./studies made"
    # nor one whose export would go where the search keeps its study: refused only at the end,
    # after the search and its promotion had run, as a folder that held files
    for folder in ("studies", "."):  # ('' is refused as empty: test_space)
        (fresh / "e.yaml").write_text(
            SMALL_SPACE.replace("name: s}", f"name: e}}\nexport: {{dir: '{folder}'}}")
        )
        ran = cli_here("run", "e.yaml", cwd=fresh)
        assert ran.returncode == 2, ran.stderr
        assert "is where the study's database is kept (studies/e.db)" in ran.stderr
        assert sorted(p.name for p in fresh.iterdir()) == ["e.yaml", "w"], "no ./studies made"


def small_winner() -> tuple[Winner, ImageData, dict[str, torch.Tensor]]:
    """A search's winner on a few digits, the data and the student weights to export."""
    recipe = Recipe.from_dict(
        {
            "data": {"dataset": "digits", "subset": 200},
            "teacher": {"arch": "resnet8"},
            "student": {"arch": "resnet8"},
            "distill": {"kd": {"weight": 0.0}},
            "device": "cpu",
        }
    )
    data = load_data(recipe.data)
    weights = build_model("resnet8", data.num_classes, data.channels).state_dict()
    return Winner(recipe, recipe, "search", 0, {"search_val_acc": 0.5}, None, [0], 1), data, weights


def test_a_ctrl_c_while_the_files_move_into_place_ends_the_export_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped half-way, the folder would hold some files and no meta.json naming the export,
    which every rerun refuses as a folder of someone else's."""
    winner, data, weights = small_winner()
    url = f"sqlite:///{tmp_path}/studies/s.db"
    moved: list[str] = []
    move_file = shutil.move

    def move_then_stop(source: Path, target: Path) -> object:
        moved.append(Path(target).name)
        if len(moved) == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, after recipe.yaml moved
        return move_file(source, target)

    monkeypatch.setattr("kdsearch.paths.shutil.move", move_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export(winner, "s", url, tmp_path / "w", weights, data, None)
    assert moved[-1] == "meta.json"  # every file moved first
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [
        "hyperparameters.json",
        "meta.json",
        "recipe.yaml",
        "student.pt",
    ]
    check_out(tmp_path / "w", "s", url)  # an export of the study: a rerun may replace it


def test_an_export_the_disk_cannot_take_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    winner, data, weights = small_winner()

    def full(*_: object, **__: object) -> None:  # as torch.save reports ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 47296")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(KdsearchError) as refused:
        export(winner, "s", f"sqlite:///{tmp_path}/s.db", tmp_path / "w", weights, data, None)
    assert str(refused.value) == (
        f"--out {tmp_path / 'w'}: cannot write there (write failed); nothing was written"
    )
    assert not (tmp_path / "w").exists()


def test_a_teacher_file_that_cannot_be_read_is_named_not_the_export_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = tmp_path / "teacher.pt"
    torch.save({"w": torch.zeros(2)}, teacher)
    real_open = Path.open

    def unreadable(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == teacher:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", unreadable)
    (tmp_path / "w").mkdir()
    with pytest.raises(KdsearchError) as refused:
        _copy_checked(teacher, weights_digest(teacher), tmp_path / "w" / "teacher.pt")
    assert str(refused.value) == f"cannot read the teacher file {teacher} (Permission denied)"
    assert list((tmp_path / "w").iterdir()) == []


def test_a_best_trial_trained_on_the_cpu_of_a_cuda_machine_is_retrained_there(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search with per_trial gpu 0 and device `auto` on a GPU machine: its trials trained on
    the CPU, so the export's student trains there too (here CUDA would fail: there is none),
    and the line says how to train it again so; the recipe keeps the machine's `auto`."""
    space = SMALL_SPACE.replace("device: cpu", "device: auto").replace(
        "kd: {weight: 0.9", "kd: {weight: 0.0"
    )
    write_study(tmp_path, space)
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        db.execute(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) "
            "SELECT trial_id, 'device', '\"cpu\"' FROM trials"
        )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ran = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "`OMP_NUM_THREADS=1 kdsearch train w/recipe.yaml --set device=cpu` reproduces it" in (
        ran.stderr
    )
    assert Recipe.load(tmp_path / "w" / "recipe.yaml").device == "auto"
    meta = json.loads((tmp_path / "w" / "meta.json").read_text())
    assert meta["device"] == "cpu"
    assert meta["precision"] == auto_on_cpu()  # `auto` there


def test_an_export_that_trains_the_best_trial_in_another_precision_says_so(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """Nothing promoted: the export trains the best trial again, here. Where `auto` resolves
    otherwise here than it did for the trial (another kind of CPU, a oneDNN cap set or unset),
    the exported student is not the trial's own, and the export says so before training."""
    write_study(tmp_path, SMALL_SPACE.replace("kd: {weight: 0.9", "kd: {weight: 0.0"))
    here = auto_on_cpu()
    there = "fp32" if here == "bf16" else "bf16"
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        db.execute(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) "
            f"SELECT trial_id, 'precision', '\"{there}\"' FROM trials"
        )
    ran = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    said = " ".join(ran.stderr.split())
    assert (
        f"trained in {there} and this run trains in {here} (`precision: auto` here), so the "
        "exported student is not the trial's own; export where and as the search ran for that"
    ) in said
    assert said.index("not the trial's own") < said.index("winner epoch")  # before training
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["precision"] == here
    # where it agrees, nothing is said
    record_all(tmp_path, precision=here)
    again = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "not the trial's own" not in again.stderr
    # the trial trained under a cap on oneDNN's instruction set, and this run under none: its
    # kernels differ, so the student is not the trial's either
    with sqlite3.connect(tmp_path / "studies" / "s.db") as db:
        db.execute(
            "INSERT INTO trial_user_attributes (trial_id, key, value_json) "
            "SELECT trial_id, 'onednn_cap', '\"AVX2\"' FROM trials"
        )
    capped = cli_here("export", "s", "--out", "w", cwd=tmp_path)
    assert capped.returncode == 0, capped.stderr
    assert (
        f"trained in {here} under ONEDNN_MAX_CPU_ISA=AVX2 and this run trains in {here} "
        "(`precision: auto` here), so the exported student is not the trial's own"
    ) in " ".join(capped.stderr.split())
    assert json.loads((tmp_path / "w" / "meta.json").read_text())["onednn_cap"] == ""
