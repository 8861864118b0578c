from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from kdsearch.models import build_model
from kdsearch.recipe import Recipe, flatten

from .conftest import SMALL_SPACE, run_cli, write_study

pytestmark = pytest.mark.slow


def assert_retrained_alike(root: Path, export: str, val_acc: float) -> None:
    """`OMP_NUM_THREADS=1 kdsearch train EXPORT/recipe.yaml`, as the export's last line says,
    gives the exported student again: its validation accuracy and its weights."""
    again = run_cli(
        "train", f"{export}/recipe.yaml", "--out", "again", cwd=root, env={"OMP_NUM_THREADS": "1"}
    )
    assert again.returncode == 0, again.stderr
    metrics = json.loads((root / "again" / "metrics.json").read_text())
    assert metrics["val_acc"] == pytest.approx(val_acc)
    exported = torch.load(root / export / "student.pt", weights_only=True)
    retrained = torch.load(root / "again" / "student.pt", weights_only=True)
    assert all(torch.allclose(retrained[k], v, atol=1e-5) for k, v in exported.items())


def test_export_of_a_promoted_study_reproduces_with_kdsearch_train(tmp_path: Path) -> None:
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
    assert recipe == Recipe.from_yaml(best.user_attrs["recipe"]), "the recipe loads back equal"
    assert json.loads((out / "hyperparameters.json").read_text()) == flatten(recipe.to_dict())
    state = torch.load(out / "student.pt", weights_only=True)
    build_model("resnet8", 10, 1).load_state_dict(state)  # strict: the student alone
    # The promotion trained with one thread (per_trial.cpu: 1); the CPU's channels-last kernels
    # split their sums by thread, so the same weights need the same thread count, which the
    # export's last line and meta.json give.
    assert meta["threads"] == 1
    assert "`OMP_NUM_THREADS=1 kdsearch train winner/recipe.yaml` reproduces it" in proc.stderr
    assert_retrained_alike(tmp_path, "winner", best.value)  # same recipe, same CPU: same student
    # the promoted weights moved away (a copied study, a PostgreSQL study read elsewhere)
    (tmp_path / "studies" / "s-promoted").rename(tmp_path / "moved")
    proc = run_cli("export", "s", "--out", "w2", cwd=tmp_path)
    assert proc.returncode == 2 and "the promoted student's weights are not at" in proc.stderr
    assert "Traceback" not in proc.stderr


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


def test_export_refuses_a_folder_holding_something_else(tmp_path: Path) -> None:
    write_study(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    proc = run_cli("export", "s", "--out", "w", cwd=tmp_path)
    assert proc.returncode == 2 and "not an export of study 's'" in proc.stderr
    assert "training the best trial" not in proc.stderr, "refused before any training"
    assert (tmp_path / "w" / "notes.txt").read_text() == "mine"
    (tmp_path / "w" / "meta.json").write_text("{not json")
    proc = run_cli("export", "s", "--out", "w", cwd=tmp_path)
    assert proc.returncode == 2 and "not an export of study 's'" in proc.stderr
    proc = run_cli("export", "s", "--out", "w/notes.txt", cwd=tmp_path)
    assert proc.returncode == 2 and "--out w/notes.txt is a file; name a folder" in proc.stderr
    assert "training the best trial" not in proc.stderr and "Traceback" not in proc.stderr
    # a search that would export there is refused before it starts
    (tmp_path / "e.yaml").write_text(SMALL_SPACE.replace("name: s}", "name: e}\nexport: {dir: w}"))
    proc = run_cli("run", "e.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "not an export of study 'e'" in proc.stderr
    assert not (tmp_path / "studies" / "e.db").exists()
