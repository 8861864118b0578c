from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import kdsearch
from kdsearch import cli
from kdsearch.commands.common import (
    parse_sets,
    password_hidden,
    recorded_resume,
    storage_option,
    storage_url,
)
from kdsearch.commands.export import LIKE_HERE, cap_set, reproduced_on, train_command
from kdsearch.commands.train import kernel_notes
from kdsearch.data import load_data
from kdsearch.errors import KdsearchError, KdsearchWarning
from kdsearch.models import build_model
from kdsearch.recipe import Recipe

from .conftest import (
    SEARCH_VALUES,
    SMALL_SPACE,
    CliHere,
    auto_on_cpu,
    cpu_like,
    run_cli,
    tiny_recipe,
    write_study,
)


def test_train_of_an_export_notes_another_precision_and_how_to_match_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu_like(monkeypatch, avx512_bf16=True)  # a CPU that multiplies bf16, whatever this one is
    recipe, export = tiny_recipe(), Path("w/recipe.yaml")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def note(meta: dict[str, Any], precision: str, device: torch.device, r: Recipe = recipe) -> str:
        (said,) = kernel_notes(export, meta, r, precision, device)
        return said

    assert kernel_notes(export, {}, recipe, "fp32", cpu) == []  # an export that kept none
    assert kernel_notes(export, {"precision": "fp32"}, recipe, "fp32", cpu) == []
    for edited in ("fp64", ["bf16"]):  # a meta.json edited by hand: no `--set` no recipe takes
        assert kernel_notes(export, {"precision": edited}, recipe, "fp32", cpu) == []
    assert note({"precision": "bf16"}, "fp32", cpu) == (
        "note: the exported student in w trained in bf16 and this run trains in fp32 "
        "(`precision: auto` on this machine), so its weights will differ; "
        "`--set precision=bf16` trains it as it did"
    )
    # fp16 needs CUDA: no --set to offer on the CPU, one on a GPU
    assert note({"precision": "fp16"}, "bf16", cpu).endswith("so its weights will differ")
    assert note({"precision": "fp16"}, "bf16", cuda).endswith(
        "`--set precision=fp16` trains it as it did"
    )
    # a recipe that pins its precision is not "on this machine"
    pinned = tiny_recipe({"precision": "fp32"})
    assert "(`precision: fp32`), so" in note({"precision": "bf16"}, "fp32", cpu, pinned)
    # a CPU without bf16 instructions, no cap: bf16 is emulated there too
    cpu_like(monkeypatch, avx512_bf16=False)
    assert note({"precision": "bf16"}, "fp32", cpu).endswith(
        "so its weights will differ; `--set precision=bf16` trains in bf16, but this CPU "
        "emulates it: slowly, and rounding otherwise than bf16 hardware does"
    )
    cpu_like(monkeypatch, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    # a oneDNN cap here, the export's not recorded (before kdsearch kept it): named where it
    # made `auto` fp32, and bf16 under it is emulated
    assert note({"precision": "bf16"}, "fp32", cpu).endswith(
        "(`precision: auto` on this machine, where oneDNN's instruction set is capped at AVX2, "
        "below bf16's), so its weights will differ; `--set precision=bf16` trains in bf16, but "
        "emulated under the cap at AVX2: slowly, and rounding otherwise than bf16 hardware does"
    )
    assert "(`precision: fp32`), so" in note({"precision": "bf16"}, "fp32", cpu, pinned)
    assert note({"precision": "fp32"}, "bf16", cpu, tiny_recipe({"precision": "bf16"})).endswith(
        "(`precision: bf16`), so its weights will differ; `--set precision=fp32` trains it as it did"
    )
    assert "capped" not in note({"precision": "bf16"}, "fp16", cuda)  # the cap is the CPU's alone
    # the export recorded its cap: where it differs, on the CPU, it is said with how to match it,
    # and a `--set precision=` alone is not offered (it would not give the same weights)
    made = {"device": "cpu", "precision": "bf16", "onednn_cap": ""}
    # the same cap there (its bf16 emulated too): `--set precision=bf16` does train it as it did
    assert kernel_notes(export, made | {"onednn_cap": "AVX2"}, pinned, "fp32", cpu) == [
        "note: the exported student in w trained in bf16 and this run trains in fp32 "
        "(`precision: fp32`), so its weights will differ; `--set precision=bf16` trains it as it did"
    ]
    uncapped_there = kernel_notes(export, made, recipe, "fp32", cpu)
    assert uncapped_there == [
        "note: the exported student in w trained in bf16 and this run trains in fp32 "
        "(`precision: auto` on this machine, where oneDNN's instruction set is capped at AVX2, "
        "below bf16's), so its weights will differ",
        "note: the exported student in w trained in bf16 and this run trains in fp32 under "
        "ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's CPU kernels differ by the cap on its instruction set "
        "(ONEDNN_MAX_CPU_ISA), so its weights will differ; with ONEDNN_MAX_CPU_ISA and "
        "DNNL_MAX_CPU_ISA unset, it trains as it did",
    ]
    # where the cap unset would still not give the export's precision, the note says both: an
    # fp32 export from a CPU without bf16, trained here under the cap; a run that pins fp32
    fp32_there = {"device": "cpu", "precision": "fp32", "onednn_cap": ""}
    (cap_note,) = kernel_notes(export, fp32_there, recipe, "fp32", cpu)
    assert cap_note.endswith(
        "with ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA unset and `--set precision=fp32`, it "
        "trains as it did"
    )
    assert kernel_notes(export, made, pinned, "fp32", cpu)[1].endswith(
        "with ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA unset and `--set precision=bf16`, it "
        "trains as it did"
    )
    # ALL and DEFAULT cap nothing, recorded or set; a cap name no oneDNN knows is not compared
    assert kernel_notes(export, made | {"onednn_cap": "DEFAULT"}, recipe, "fp32", cpu) == (
        uncapped_there
    )
    assert kernel_notes(export, made | {"onednn_cap": "avx2"}, recipe, "bf16", cpu) == []  # AVX2
    assert kernel_notes(export, made | {"onednn_cap": "FOO"}, recipe, "bf16", cpu) == []
    assert kernel_notes(export, made | {"onednn_cap": False}, recipe, "bf16", cpu) == []
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "all")
    assert kernel_notes(export, made, recipe, "bf16", cpu) == []
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    capped_there = {"device": "cpu", "precision": "fp32", "onednn_cap": "AVX2"}
    assert kernel_notes(export, capped_there, pinned, "fp32", cpu) == [
        "note: the exported student in w trained in fp32 under ONEDNN_MAX_CPU_ISA=AVX2 and this "
        "run trains in fp32: oneDNN's CPU kernels differ by the cap on its instruction set "
        "(ONEDNN_MAX_CPU_ISA), so its weights will differ; with `ONEDNN_MAX_CPU_ISA=AVX2` set, "
        "it trains as it did"
    ]
    # the same cap, or an export trained on a GPU (cuDNN's kernels): nothing to say of caps
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert kernel_notes(export, capped_there, pinned, "fp32", cpu) == []
    on_gpu = capped_there | {"device": "cuda"}
    assert kernel_notes(export, on_gpu, pinned, "fp32", cpu) == []


def test_an_exports_command_says_where_it_gives_the_weights_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under the cap on oneDNN the command sets (the one the run trained under), or none where
    the run had none: `auto` may resolve otherwise there than in this process."""
    cpu_like(monkeypatch, avx512_bf16=True)  # bf16 natively
    recipe, unset = tiny_recipe(), ", with ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA unset"

    def other(there: str, here: str) -> str:
        return f"a machine where its `precision: auto` is {there}, as where it trained (here it is {here})"

    assert reproduced_on(recipe, False, "cpu", "bf16", "") == LIKE_HERE
    assert reproduced_on(recipe, False, "cpu", "fp32", "") == other("fp32", "bf16")
    assert reproduced_on(recipe, False, "cpu", "fp32", "AVX2") == LIKE_HERE  # fp32 under AVX2
    assert reproduced_on(recipe, False, "cpu", "bf16", "AVX2") == other("bf16", "fp32")
    assert reproduced_on(recipe, False, "cpu", "bf16", None) == LIKE_HERE  # kept no cap
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert reproduced_on(recipe, False, "cpu", "bf16", "") == LIKE_HERE + unset
    assert reproduced_on(recipe, False, "cpu", "fp32", "") == other("fp32", "bf16") + unset
    assert reproduced_on(recipe, False, "cpu", "fp32", "AVX2") == LIKE_HERE
    assert reproduced_on(recipe, False, "cpu", "bf16", None) == other("bf16", "fp32")  # this cap
    assert [cap_set(*run) for run in (("cpu", "avx2"), ("cuda", "AVX2"), ("cpu", "FOO"))] == [
        "AVX2",
        "",
        "",
    ]


def test_train_of_an_export_whose_meta_json_is_damaged_says_it_compares_nothing(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """A damaged meta.json turned every note of `train` off (the data, the precision, the
    teacher), and said nothing; a hand-written one (no study named) was compared with."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "recipe.yaml").write_text(tiny_recipe({"schedule.epochs": 1}).to_yaml())
    written = '{"precision": "fp64", "data_fingerprint": 5}'
    for text, why in (
        ("{bad", "cannot be read (not JSON)"),
        ("[1]", "is not an export's"),
        (written, "is not an export's"),
    ):
        (tmp_path / "w" / "meta.json").write_text(text)
        ran = cli_here("train", "w/recipe.yaml", "--out", f"o{len(text)}", cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr
        said = " ".join(ran.stderr.split())
        assert f"note: w/meta.json {why}" in said and "this run is not compared with it" in said
    # the recipe given as a link: the meta.json beside the file it leads to
    (tmp_path / "link.yaml").symlink_to(tmp_path / "w" / "recipe.yaml")
    ran = cli_here("train", "link.yaml", "--out", "ol", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    meta = tmp_path.resolve() / "w" / "meta.json"
    assert f"note: {meta} is not an export's" in " ".join(ran.stderr.split())
    # an export's, edited: a fingerprint that is not one is passed over, as a precision is
    (tmp_path / "w" / "meta.json").write_text('{"study": "s", "data_fingerprint": 5}')
    ran = cli_here("train", "w/recipe.yaml", "--out", "of", cwd=tmp_path)
    assert ran.returncode == 0 and "note:" not in ran.stderr, ran.stderr
    (tmp_path / "w" / "meta.json").unlink()  # no meta.json: a recipe that is not an export
    ran = cli_here("train", "w/recipe.yaml", "--out", "o", cwd=tmp_path)
    assert ran.returncode == 0 and "meta.json" not in ran.stderr, ran.stderr


def test_train_writes_recipe_metrics_and_a_bare_student(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(tiny_recipe().to_yaml())
    out = tmp_path / "out"
    proc = run_cli(
        "train",
        "r.yaml",
        "--set",
        "distill.kd.temperature=2",
        "--set",
        "schedule.epochs=3",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "teacher epoch   2/2" in proc.stderr and "student epoch   3/3" in proc.stderr
    assert "" not in proc.stderr.splitlines(), "the bars, off a terminal, left empty lines"
    resolved = Recipe.load(out / "recipe.yaml")
    assert resolved == tiny_recipe({"distill.kd.temperature": 2.0, "schedule.epochs": 3})
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and len(metrics["history"]) == 3
    assert 0.0 <= metrics["test_acc"] <= 1.0 and metrics["teacher"]["source"] == "trained"
    # what serving the student needs, as an export's meta.json holds it
    assert metrics["inputs"] == load_data(resolved.data).inputs()
    # the device and precision `auto` became, in the words an export's meta.json uses
    assert metrics["device"] == "cpu"
    assert metrics["precision"] == auto_on_cpu() and metrics["onednn_cap"] == ""
    assert f"on synthetic, cpu, {metrics['precision']}" in proc.stderr
    state = torch.load(out / "student.pt", weights_only=True)
    build_model("resnet8", 10, 3).load_state_dict(state)  # strict: no head, no teacher weights
    again = run_cli("train", "r.yaml", "--out", str(out), cwd=tmp_path)
    assert again.returncode == 2, again.stderr
    assert "already holds files (metrics.json, recipe.yaml, student.pt)" in again.stderr


def test_heads_of_every_term_are_dropped_from_the_saved_student(tmp_path: Path) -> None:
    changes = {f"distill.{n}.weight": 1.0 for n in ("pkt", "crd", "cktf", "sskd", "hsakd", "stkd")}
    recipe = tiny_recipe(
        {
            **changes,
            "distill.crd.negatives": 64,
            "distill.cktf.negatives": 64,
            "teacher.heads.epochs": 1,
            "schedule.epochs": 1,
        }
    )
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    proc = run_cli("train", "r.yaml", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "teacher heads epoch   1/1" in proc.stderr
    state = torch.load(tmp_path / "o" / "student.pt", weights_only=True)
    build_model("resnet8", 10, 3).load_state_dict(state)
    # the heads' file, which `teacher.heads.checkpoint` takes elsewhere, is named and recorded
    heads = json.loads((tmp_path / "o" / "metrics.json").read_text())["teacher"]["heads_path"]
    assert Path(heads).is_file() and f"; its heads: {heads}" in " ".join(proc.stderr.split())


def test_student_alone_needs_no_teacher(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(tiny_recipe({"distill.kd.weight": 0.0}).to_yaml())
    proc = run_cli("train", "r.yaml", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "teacher" not in proc.stderr
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["teacher"] is None


@pytest.mark.parametrize(
    ("recipe_text", "args", "expected"),
    [
        (None, ["missing.yaml"], "missing.yaml: no such file"),
        (
            "data: {dataset: digits}\nteacher: {arch: resnet20}\nstudent: {arch: resnet8, width: 2}",
            ["r.yaml"],
            "student.width: unknown key",
        ),
        (
            tiny_recipe().to_yaml(),
            ["r.yaml", "--set", "distill.kd.temperature"],
            "expected PATH=VALUE",
        ),
        (
            tiny_recipe().to_yaml(),
            ["r.yaml", "--set", "optim.lr=fast"],
            "optim.lr: Input should be a valid number",
        ),
        (
            tiny_recipe().to_yaml(),
            [
                "r.yaml",
                "--set",
                "data.dataset=cifar10",
                "--set",
                "data.download=false",
                "--set",
                "data.root=nowhere",
            ],
            "cifar10 is not in",
        ),
        (
            tiny_recipe().to_yaml(),
            ["r.yaml", "--set", "teacher.checkpoint=nope.pt"],
            "/nope.pt: no such file",  # made absolute against the working folder
        ),
        (tiny_recipe().to_yaml(), ["r.yaml", "--bogus"], "unrecognized arguments: --bogus"),
        (  # the last value won without a word
            tiny_recipe().to_yaml(),
            ["r.yaml", "--set", "optim={lr: 0.1}", "--set", "optim.lr=0.2"],
            "--set optim.lr given twice (0.1, then 0.2); give it once",
        ),
        (
            tiny_recipe().to_yaml(),
            ["r.yaml", "--out", "a", "--out", "b"],
            "kdsearch train: error: --out given twice (a, then b); give it once",
        ),
        (
            SMALL_SPACE,
            ["r.yaml"],
            "r.yaml: a search space (it has space: and base:), not a recipe; `kdsearch run` "
            "takes a search space, `kdsearch train` a recipe",
        ),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    tmp_path: Path, recipe_text: str | None, args: list[str], expected: str
) -> None:
    if recipe_text is not None:
        (tmp_path / "r.yaml").write_text(recipe_text)
    proc = run_cli("train", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert errors == lines[-1:], proc.stderr  # one error line, the last; progress may come before
    assert expected in lines[-1]
    assert "Traceback" not in proc.stderr


def test_train_whose_files_cannot_be_written_is_one_line_and_leaves_nothing(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that filled during the training: torch.save's RuntimeError was a traceback, and
    a folder of a cut-short student.pt beside its recipe that every rerun refused."""
    (tmp_path / "r.yaml").write_text(tiny_recipe({"distill.kd.weight": 0.0}).to_yaml())

    def full(*_: object, **__: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 47296")

    monkeypatch.setattr(torch, "save", full)
    ran = cli_here("train", "r.yaml", "--out", "o", cwd=tmp_path)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert ran.stderr.strip().splitlines()[-1] == (
        "kdsearch: error: --out o: cannot write there (write failed); nothing was written"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_divergence_is_reported_without_a_traceback(tmp_path: Path) -> None:
    recipe = tiny_recipe({"distill.kd.weight": 0.0, "optim.lr": 1.0e12})
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    proc = run_cli("train", "r.yaml", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 1
    assert "training diverged" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "student.pt").exists()


def test_version_and_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kdsearch.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("kdsearch ")
    helptext = subprocess.run(
        [sys.executable, "-m", "kdsearch.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--set PATH=VALUE" in helptext and "--out" in helptext


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "s.yaml", "--trials", "0"], "argument --trials: 0 is not a positive number"),
        (["run", "s.yaml", "--trials", "-3"], "argument --trials: -3 is not a positive number"),
        (["run", "s.yaml", "--study", "../x"], "argument --study: '../x': a study name is"),
        (["promote", "s", "--seeds", "-1"], "argument --seeds: -1 is not a positive number"),
        (["promote", "s", "--top-k", "0"], "argument --top-k: 0 is not a positive number"),
        (["promote", "s", "--epochs", "two"], "argument --epochs: 'two' is not a whole number"),
        (["dashboard", "s.db", "--port", "99999"], "argument --port: 99999 is not a port"),
        # an empty path (a shell variable that was not set): not this folder, not stdout
        (["train", "r.yaml", "--out", ""], "argument --out: an empty value names nothing"),
        (["export", "s", "--out", ""], "argument --out: an empty value names nothing"),
        (["report", "s", "--out", " "], "argument --out: an empty value names nothing"),
        (["trials", "s", "--csv", ""], "argument --csv: an empty value names nothing"),
        (["trials", "s", "--storage", ""], "argument --storage: an empty value names nothing"),
        (["run", ""], "argument space: an empty value names nothing"),
        # the top parser's error, which sent the user to `kdsearch --help`
        (
            ["trials", "s", "extra"],
            "trials: error: unrecognized arguments: extra (see kdsearch trials --help)",
        ),
        (["--bogus", "trials", "s"], "kdsearch: error: unrecognized arguments: --bogus"),
    ],
)
def test_bad_option_values_are_usage_errors(
    tmp_path: Path, cli_here: CliHere, args: list[str], expected: str
) -> None:
    proc = cli_here(*args, cwd=tmp_path)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_an_unusable_out_is_refused_before_training(tmp_path: Path, cli_here: CliHere) -> None:
    (tmp_path / "r.yaml").write_text(tiny_recipe().to_yaml())
    (tmp_path / "taken").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "recipe.yaml").write_text("my notes")
    for out, expected in (
        ("taken", "--out taken is a file"),
        ("taken/o", "taken is a file"),
        ("dangling", "--out dangling is a link to nothing"),
        ("mine", "--out mine already holds files (recipe.yaml)"),
        ("/proc/kdsearch-out", "--out /proc/kdsearch-out: cannot write"),  # even as root
    ):
        ran = cli_here("train", "r.yaml", "--out", out, cwd=tmp_path)
        assert ran.returncode == 2 and expected in ran.stderr, ran.stderr
        assert "data:" not in ran.stderr and "Traceback" not in ran.stderr  # nothing loaded
    assert (tmp_path / "taken").read_text() == "mine"
    assert (tmp_path / "mine" / "recipe.yaml").read_text() == "my notes"


def test_run_check_refuses_the_storages_the_run_refuses(tmp_path: Path, cli_here: CliHere) -> None:
    """`--check` passed a working folder where ./studies cannot be made (the run then ended in
    a traceback), a storage file that is not a study database and a password holding an '@',
    each of which the run refuses: both now refuse them, in the same line."""
    import sqlite3

    space = tmp_path / "s.yaml"
    space.write_text(SMALL_SPACE)
    (tmp_path / "notes.db").write_text("my notes")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    cases = [
        (  # even root cannot make a folder there
            Path("/proc"),
            [],
            "the study storage's folder studies: cannot write there (No such file or directory);"
            " run from a folder you can write in, or name a study storage with --storage",
        ),
        (
            tmp_path,
            ["--storage", "notes.db"],
            f"{tmp_path}/notes.db is not a study database (it is not an SQLite database)\n",
        ),
        (
            tmp_path,
            ["--storage", "other.db"],
            f"{tmp_path}/other.db is not a study database (it holds no Optuna tables)\n",
        ),
        (
            tmp_path,
            ["--storage", "postgresql://u:p@w@h/db"],
            "cannot open the study storage postgresql://u:***@h/db: its password holds an '@'",
        ),
    ]
    for cwd, options, expected in cases:
        for check in (["--check"], []):
            ran = cli_here("run", str(space), *options, *check, cwd=cwd)
            assert ran.returncode == 2, (options, check, ran.stderr)
            assert ran.stderr.startswith(f"kdsearch: error: {expected}"), ran.stderr
            assert "Traceback" not in ran.stderr and "teacher" not in ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db", "other.db", "s.yaml"]
    assert (tmp_path / "notes.db").read_text() == "my notes"


def test_a_trial_bigger_than_this_machine_is_refused_before_any_work(
    tmp_path: Path, cli_here: CliHere
) -> None:
    (tmp_path / "s.yaml").write_text(SMALL_SPACE.replace("cpu: 1", "cpu: 4096"))
    ran = cli_here("run", "s.yaml", cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.startswith("kdsearch: error: s.yaml: search.per_trial.cpu is 4096, but")
    assert "teacher" not in ran.stderr and not (tmp_path / "studies").exists()
    # more trials at once than fit: said (then refused here for its data, to end at once)
    (tmp_path / "s.yaml").write_text(SMALL_SPACE.replace("concurrent: 2", "concurrent: 4096"))
    sets = ["--set", "data.dataset=cifar10", "--set", "data.download=false"]
    ran = cli_here("run", "s.yaml", *sets, "--set", "data.root=nowhere", cwd=tmp_path)
    cpus = len(os.sched_getaffinity(0))
    said = " ".join(ran.stderr.split())
    assert (
        f"note: s.yaml: search.concurrent is 4096, but this machine has room for {cpus} "
        f"trial{'s' * (cpus > 1)} at once (1 CPU"  # (and a share of a GPU, where it has one)
    ) in said and f"each), so {cpus} run at a time" in said


def test_a_search_asking_for_more_trials_than_its_space_holds_is_told(
    tmp_path: Path, cli_here: CliHere
) -> None:
    space = SMALL_SPACE.replace(
        "  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}\n",
        "  distill.kd.temperature: {type: categorical, choices: [2.0, 4.0]}\n"
        "  $extra: {type: categorical, choices: [none, pkt]}\n"
        "  distill.pkt.weight: {type: categorical, choices: [50, 100], when: {$extra: pkt}}\n",
    )
    (tmp_path / "s.yaml").write_text(space)
    ran = cli_here("run", "s.yaml", "--check", "--trials", "7", cwd=tmp_path)
    said = " ".join(ran.stderr.split())
    assert ran.returncode == 0, ran.stderr
    assert (
        "note: s.yaml: the space holds 6 different trials and the search asks for 7, so at "
        "least 1 repeats an earlier trial's configuration, trained again from the start; set "
        "search.trials (or --trials) to 6, or widen the space"
    ) in said
    ran = cli_here("run", "s.yaml", "--check", "--trials", "6", cwd=tmp_path)
    assert ran.returncode == 0 and "note:" not in ran.stderr, ran.stderr


def test_a_cluster_address_where_nothing_answers_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    with socket.socket() as s:  # held, never listening: refused, and no one else can take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        address = f"127.0.0.1:{port}"
        proc = run_cli("run", "s.yaml", "--address", address, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there" in proc.stderr
    assert "teacher" not in proc.stderr and not (tmp_path / "studies").exists()


def test_ray_address_in_the_environment_is_the_cluster_to_join(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As `ray job submit` and Ray's pods set it: a local Ray was started with this machine's
    CPU count, which Ray refuses for a cluster (a ValueError's traceback)."""
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    with socket.socket() as s:  # held, never listening
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        # as set, not turned to token mode where a test's `ray start` left a token: Ray has been
        # imported in this process already, and its later local Rays would refuse that mode
        monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
        ran = cli_here("run", "s.yaml", cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert f"cannot join the Ray cluster at {address}: nothing answers there" in ran.stderr
    assert not (tmp_path / "studies" / "s.db").exists()


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "ray://head:10001"])
def test_a_ray_address_variable_kdsearch_cannot_join_is_named_as_the_variable(
    tmp_path: Path, cli_here: CliHere, monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    """`ray job submit`'s users set RAY_ADDRESS to the Jobs API's http address: an error about an
    --address never typed, even for a space file that does not exist, was all they got."""
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    monkeypatch.setenv("RAY_ADDRESS", address)
    for command in (
        ["run", "s.yaml"],
        ["promote", "s"],
        ["run", "missing.yaml"],
        ["run", "s.yaml", "--address", "auto"],  # Ray would read the variable for `auto`
    ):
        ran = cli_here(*command, cwd=tmp_path)
        assert ran.returncode == 2, ran.stderr
        assert ran.stderr.startswith(f"kdsearch: error: RAY_ADDRESS='{address}'"), ran.stderr
        assert "--address" not in ran.stderr.split(";")[0] and "Traceback" not in ran.stderr
        assert ("Jobs API" in ran.stderr) == address.startswith("http")
    monkeypatch.setenv("RAY_ADDRESS", "")  # set but empty: as unset
    assert "RAY_ADDRESS" not in cli_here("run", "missing.yaml", cwd=tmp_path).stderr
    assert not (tmp_path / "studies").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="trials get a GPU here")
@pytest.mark.parametrize(
    ("searched", "why"),
    [
        ("device: {type: categorical, choices: [cpu, cuda]}", "device: cuda, but trials get"),
        ("precision: {type: categorical, choices: [fp32, fp16]}", "precision: fp16 needs CUDA"),
    ],
)
def test_a_searched_device_or_precision_trials_cannot_train_with_is_refused(
    tmp_path: Path, cli_here: CliHere, searched: str, why: str
) -> None:
    """Accepted, these failed every trial that drew them (7 of 16), where the same values in
    the base or --set are refused before the search starts."""
    space = SMALL_SPACE.replace("space:\n", f"space:\n  {searched}\n")
    space = space.replace("  device: cpu\n", "  device: auto\n")  # (fp16 with cpu: refused)
    (tmp_path / "s.yaml").write_text(space)
    ran = cli_here("run", "s.yaml", cwd=tmp_path)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.startswith(f"kdsearch: error: {why}"), ran.stderr
    assert "no GPU (the Ray cluster has no GPU); use " in ran.stderr
    assert not (tmp_path / "studies").exists()


@pytest.mark.parametrize(
    "address", ["nonsense", "host:notaport", "host:70000", ":6379", "::1:6379", "http://h:8265"]
)
def test_an_address_ray_cannot_parse_is_refused_in_one_line(tmp_path: Path, address: str) -> None:
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    for command in (["run", "s.yaml"], ["promote", "s"]):
        proc = run_cli(*command, "--address", address, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        why = f"argument --address: {address!r} is not auto or HOST:PORT"
        assert why in proc.stderr and len(proc.stderr.splitlines()) == 1
        assert not (tmp_path / "studies").exists()


def test_a_warning_of_kdsearch_is_one_line_and_others_stay_as_python_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: CliHere
) -> None:
    def command(args: argparse.Namespace) -> int:  # as a damaged teacher cache is met
        warnings.simplefilter("always")  # as warnings raised from other places are: each shown
        for _ in range(2):  # once (a teacher loaded by position, for the search and again for
            # its promotion, warned twice)
            warnings.warn(
                "cannot use the cached run:fire:1/t.pt (truncated); training it again",
                KdsearchWarning,
                stacklevel=1,
            )
        warnings.warn("a library's own warning", DeprecationWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_trials", command)
    with pytest.warns(DeprecationWarning, match="a library's own warning"):  # Python's way
        ran = cli_here("trials", "s", cwd=tmp_path)
        assert warnings.showwarning is not cli.show_warning  # Python's again once main returns
    assert ran.returncode == 0
    assert ran.stderr.splitlines() == [  # as it is: no emoji for :fire:
        "kdsearch: warning: cannot use the cached run:fire:1/t.pt (truncated); training it again"
    ]
    with pytest.warns(DeprecationWarning):
        again = cli_here("trials", "s", cwd=tmp_path)  # another command: said again
    assert again.stderr == ran.stderr


def test_another_kdsearch_in_the_working_directory_is_refused(tmp_path: Path) -> None:
    # Ray's workers would import it in place of the kdsearch running, trial after trial
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    shutil.copytree(Path(kdsearch.__file__).parent, tmp_path / "kdsearch")
    copy = tmp_path / "kdsearch" / "recipe.py"
    copy.write_text(copy.read_text() + "# another version\n")

    def installed(*args: str) -> subprocess.CompletedProcess[str]:
        # -P: as the console script, which does not import from the working directory
        command = [sys.executable, "-P", "-m", "kdsearch.cli", *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    for command in (["run", "s.yaml"], ["promote", "s"]):
        proc = installed(*command)
        assert proc.returncode == 2, proc.stderr
        assert f"{tmp_path / 'kdsearch'} is another kdsearch than the one running" in " ".join(
            proc.stderr.split()
        )
        assert not (tmp_path / "studies").exists()
    copy.write_text(copy.read_text().removesuffix("# another version\n"))  # the same code: fine
    proc = installed("promote", "s")
    assert proc.returncode == 2 and "no study database at" in proc.stderr, proc.stderr


def test_a_storage_that_is_not_a_study_database_is_refused_before_any_work(
    tmp_path: Path, cli_here: CliHere
) -> None:
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    (tmp_path / "studies").write_text("a file where the default folder goes\n")
    ran = cli_here("run", "s.yaml", cwd=tmp_path)
    assert ran.returncode == 2 and "./studies is a file, not the folder" in ran.stderr
    (tmp_path / "notes.db").write_text("not a database\n")
    ran = cli_here("run", "s.yaml", "--storage", "sqlite:///notes.db", cwd=tmp_path)
    assert ran.returncode == 2 and "notes.db is not a study database" in ran.stderr
    assert (tmp_path / "notes.db").read_text() == "not a database\n"
    assert "teacher" not in ran.stderr
    ran = cli_here("run", "s.yaml", "--storage", "notes.db", cwd=tmp_path)  # a path: that file
    assert ran.returncode == 2 and f"{tmp_path}/notes.db is not a study database" in ran.stderr
    # the space's study.storage takes a path as --storage does (it was passed on unparsed)
    (tmp_path / "p.yaml").write_text(SMALL_SPACE.replace("name: s}", "name: s, storage: notes.db}"))
    ran = cli_here("run", "p.yaml", cwd=tmp_path)
    assert ran.returncode == 2 and f"{tmp_path}/notes.db is not a study database" in ran.stderr
    # and a URL SQLAlchemy cannot parse is refused with the space, naming the key
    bad = SMALL_SPACE.replace("name: s}", "name: s, storage: 'postgres ql://db/kd'}")
    (tmp_path / "u.yaml").write_text(bad)
    ran = cli_here("run", "u.yaml", cwd=tmp_path)
    assert ran.returncode == 2 and "study.storage" in ran.stderr, ran.stderr
    assert "'postgres ql://db/kd' is not an SQLAlchemy URL (dialect://" in ran.stderr


def test_an_export_folder_holding_something_else_is_refused_before_any_work(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """Named as the space file set it: there is no --out to change."""
    (tmp_path / "s.yaml").write_text(SMALL_SPACE + "export: {dir: w}\n")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    ran = cli_here("run", "s.yaml", cwd=tmp_path)
    assert ran.returncode == 2
    assert "s.yaml: export.dir w already holds files that are not an export of study 's'" in (
        " ".join(ran.stderr.split())
    )
    assert not (tmp_path / "studies").exists() and (tmp_path / "w" / "notes.txt").is_file()


def test_the_promoted_study_of_a_search_with_a_long_name_is_looked_for(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """Its name (the search's, 200 characters, and -promoted) was refused as too long, though
    it is read from the search's file: the `kdsearch trials NAME-promoted` that promote prints
    failed."""
    name = "L" * 200
    shown = cli_here("trials", f"{name}-promoted", cwd=tmp_path)
    assert shown.returncode == 2
    assert shown.stderr.strip() == (
        f"kdsearch: error: no study database at studies/{name}-promoted.db (no studies/ folder "
        "here: a search keeps its study in studies/ where it ran); check the name, or pass "
        "--storage with the study's file or URL"
    )
    too_long = cli_here("trials", f"{name}L-promoted", cwd=tmp_path)
    assert "a study name is at most 200 characters" in too_long.stderr


def test_a_study_name_that_no_search_takes_names_no_file(tmp_path: Path, cli_here: CliHere) -> None:
    """`kdsearch trials ../x` read ./x.db, outside studies/, and `trials ''` studies/.db."""
    write_study(tmp_path)  # studies/s.db
    shutil.copy(tmp_path / "studies" / "s.db", tmp_path / "outside.db")  # studies/../outside.db
    rule = "a study name is letters, digits, '_', '.' and '-', not starting with '.', '_' or '-'"
    for command in ("trials", "report", "promote", "export"):
        for name in ("../outside", "", "studies/s"):
            out = ["--out", "w"] if command == "export" else []
            ran = cli_here(command, name, *out, cwd=tmp_path)
            assert ran.returncode == 2 and ran.stderr == (
                f"kdsearch: error: {name!r}: {rule}; a study database elsewhere: pass --storage "
                "FILE\n"
            ), ran.stderr
    assert cli_here("trials", "s", cwd=tmp_path).returncode == 0
    # the dashboard's STORAGE, a bare name looked for in studies/: the file is there, the name
    # says why it is not taken (it said "no study database at studies/x y.db")
    shutil.copy(tmp_path / "studies" / "s.db", tmp_path / "studies" / "x y.db")
    ran = cli_here("dashboard", "x y", "--host", "256.0.0.1", cwd=tmp_path)  # (had it taken
    # the name, an address it cannot listen on ends it, rather than a server that runs on)
    assert ran.returncode == 2 and ran.stderr == (
        f"kdsearch: error: 'x y': {rule}; to serve that file, give its path (studies/x y.db)\n"
    ), ran.stderr


def test_a_count_past_what_a_study_records_is_refused(tmp_path: Path, cli_here: CliHere) -> None:
    """`--trials 99999999999` ran, as far as a search of that many trials runs."""
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    ran = cli_here("run", "space.yaml", "--check", "--trials", "2147483648", cwd=tmp_path)
    assert ran.returncode == 2 and (
        "argument --trials: 2147483648 is more than a study records (2147483647)" in ran.stderr
    )
    ran = cli_here("run", "space.yaml", "--check", "--trials", "2147483647", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr


def test_check_refuses_a_storage_whose_driver_is_not_installed(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """`run --check --storage mysql://...` said "checked", and the search then failed."""
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    for url, why in (
        (
            "mysql://kd:hunter2@db/kd",
            "the module 'MySQLdb' its driver needs is not installed; pip install mysqlclient",
        ),
        ("foo://db/kd", "Can't load plugin: sqlalchemy.dialects:foo"),
    ):
        ran = cli_here("run", "space.yaml", "--check", "--storage", url, cwd=tmp_path)
        shown = url.replace("hunter2", "***")
        assert ran.returncode == 2, ran.stderr
        assert f"cannot open the study storage {shown}: {why}" in ran.stderr
    ran = cli_here("run", "space.yaml", "--check", "--storage", "postgresql://db/kd", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr  # psycopg2 is installed: nothing connects


def test_a_storage_path_is_the_sqlite_url_of_the_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_url("studies/s.db") == f"sqlite:///{tmp_path}/studies/s.db"
    assert storage_url("/data/s.db") == "sqlite:////data/s.db"
    monkeypatch.setenv("HOME", "/home/u")  # as a space file's study.storage may write it
    assert storage_url("~/s.db") == "sqlite:////home/u/s.db"
    url = "postgresql+psycopg2://user:secret@db:5432/kd"
    assert storage_url(url) == url
    # a printed command shows the URL without its password, and says so
    assert password_hidden(url) == " (its password hidden)"
    assert password_hidden("postgresql://db:5432/kd") == password_hidden(storage_url("s.db")) == ""
    # a command printed for the user names the storage only where it would not find it itself
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "s.db").touch()
    for found in ("sqlite:///studies/s.db", f"sqlite:///{tmp_path}/studies/s.db"):
        assert storage_option("s", found) == ""
        assert storage_option("s-promoted", found) == ""  # promote records it in the search's
    assert storage_option("s", "sqlite:////data/s.db") == " --storage sqlite:////data/s.db"
    (tmp_path / "studies" / "s-promoted.db").touch()  # a file of that name: found before s.db
    named = storage_option("s-promoted", f"sqlite:///{tmp_path}/studies/s.db")
    assert named == f" --storage sqlite:///{tmp_path}/studies/s.db"
    assert storage_option("s", url) == " --storage 'postgresql+psycopg2://user:***@db:5432/kd'"


def test_a_search_whose_every_trial_failed_exits_with_status_1(tmp_path: Path) -> None:
    space = SMALL_SPACE.replace(
        "  distill.kd.temperature: {type: float, low: 1.0, high: 8.0}",
        "  optim.nesterov: {type: categorical, choices: [true]}\n"
        "  optim.momentum: {type: categorical, choices: [0.0]}",
    )
    (tmp_path / "s.yaml").write_text(space)
    proc = run_cli("run", "s.yaml", "--set", "optim.nesterov=false", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (
        "note: --set optim.nesterov: the space searches optim.nesterov in every trial, so no "
        "trial trains with this value" in " ".join(proc.stderr.split())
    )
    assert "0 complete, 0 pruned, 5 failed" in proc.stderr
    assert "no trial completed, so there is no result to promote or export" in proc.stderr


def test_a_search_that_fails_before_its_first_trial_leaves_no_study(
    tmp_path: Path, cli_here: CliHere
) -> None:
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    sets = ["--set", "data.dataset=cifar10", "--set", "data.download=false"]
    ran = cli_here("run", "s.yaml", *sets, "--set", "data.root=nowhere", cwd=tmp_path)
    assert ran.returncode == 2 and "cifar10 is not in" in ran.stderr, ran.stderr
    assert not (tmp_path / "studies").exists()  # nor the folder made for it
    # in a file that holds another study, only the new one goes (and --resume of a study not
    # there yet says it starts one)
    other = tmp_path / "other.db"
    optuna.create_study(study_name="kept", storage=f"sqlite:///{other}")
    storage = ["--storage", f"sqlite:///{other}", "--resume"]
    ran = cli_here("run", "s.yaml", *sets, "--set", "data.root=nowhere", *storage, cwd=tmp_path)
    assert ran.returncode == 2 and "cifar10 is not in" in ran.stderr, ran.stderr
    assert f"note: no study 's' in sqlite:///{other} yet, so --resume starts it" in " ".join(
        ran.stderr.split()
    )
    names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{other}")]
    assert names == ["kept"]


def test_commands_that_run_no_trials_start_without_ray_or_scikit_learn(tmp_path: Path) -> None:
    """`trials` and `export` of a promoted study import neither (seconds each, in every such
    command): Ray only where trials run, the digits read from scikit-learn's file."""
    write_study(tmp_path)
    (tmp_path / "taken").write_text("a file, so the export stops after its imports")
    script = (
        "import sys; from kdsearch.cli import main\n"
        "assert main(['trials', 's']) == 0\n"
        "assert main(['export', 's', '--out', 'taken']) == 2\n"
        "from kdsearch.data import load_data; from kdsearch.recipe import DataConfig\n"
        "load_data(DataConfig(dataset='digits'))\n"
        "print(sorted({'ray', 'sklearn', 'scipy'} & set(sys.modules)))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("item", "empty"), [("optim={}", "optim"), ("distill={kd: {}, pkt: {weight: 1}}", "distill.kd")]
)
def test_a_set_of_an_empty_mapping_is_refused_not_ignored(item: str, empty: str) -> None:
    """It sets no key: a user who meant to reset a section would see nothing happen."""
    with pytest.raises(KdsearchError) as info:
        parse_sets([item])
    assert str(info.value) == (
        f"--set {item}: {empty} is an empty mapping, which changes nothing; name the keys to "
        f"change ({empty}.KEY=VALUE)"
    )
    assert parse_sets(["optim={lr: 0.1}"]) == {"optim.lr": 0.1}


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["train", "r.yaml"], "kdsearch: interrupted (nothing half-done was written)"),
        (
            ["promote", "s"],
            "kdsearch: interrupted (the runs that had finished are kept, and the same command "
            "again trains only the others; nothing half-done was written)",
        ),
    ],
)
def test_an_interrupted_command_says_what_it_kept(
    command: list[str],
    said: str,
    cli_here: CliHere,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every command said 'what had finished is kept', `train`, which keeps nothing, too."""

    def stopped(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command[0]}", stopped)
    ran = cli_here(*command, cwd=tmp_path)
    assert ran.returncode == 130 and " ".join(ran.stderr.split()) == said


LOST_CTRL_C = """
import sys, time
from kdsearch import cli


class Finalized:
    def __del__(self) -> None:
        raise KeyboardInterrupt  # as a Ctrl-C that lands while Python runs a finalizer


def command(args: object) -> int:
    Finalized()  # collected at once: its KeyboardInterrupt is 'ignored' where it was raised
    for _ in range(100):  # a teacher's epochs, say
        time.sleep(0.05)
    print("ran to its end")
    return 0


cli.cmd_train = command
sys.exit(cli.main(["train", "r.yaml"]))
"""


def test_a_ctrl_c_lost_in_a_finalizer_still_stops_the_command(tmp_path: Path) -> None:
    """A Ctrl-C that landed while SQLAlchemy ran a weak-reference callback was printed as
    'Exception ignored in ... KeyboardInterrupt' and lost: the search trained its teacher and
    every trial, and ended with status 0."""
    ran = subprocess.run(
        [sys.executable, "-c", LOST_CTRL_C],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 130, ran.stdout + ran.stderr
    assert "ran to its end" not in ran.stdout
    assert "kdsearch: interrupted" in ran.stderr and "Exception ignored" not in ran.stderr


def run_script(script: str, arg: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`script` run by this Python with the argument `arg` in folder `cwd`, its output buffered
    as by default (PYTHONUNBUFFERED unset), captured."""
    return subprocess.run(
        [sys.executable, "-c", script, arg],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )


LATE_STOP = """
import atexit, os, signal, sys, time
from kdsearch import cli


class TornDown:
    def __del__(self) -> None:  # as Python tears the modules down (torch's finalizers, a second)
        if WHEN == "teardown":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.write(2, b"torn down\\n")


def stop_in_exit_handler() -> None:  # an exit handler registered as the command ran (Ray's)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    os.write(2, b"exit handler ran on\\n")


def command(args: object) -> int:
    if WHEN == "exit handler":
        atexit.register(stop_in_exit_handler)
    print("the command's last line", file=sys.stderr)
    return 1  # (no result: the status to keep)


WHEN = sys.argv[1]
if WHEN == "teardown":  # a handler before kdsearch's (coverage's, say): Python tears down
    atexit.register(lambda: None)
held = TornDown()
cli.cmd_train = command
sys.argv = ["kdsearch", "train", "r.yaml"]
cli.entry()
"""


@pytest.mark.parametrize("when", ["exit handler", "teardown"])
def test_a_stop_as_a_finished_command_winds_down_keeps_its_status(
    tmp_path: Path, when: str
) -> None:
    """A Ctrl-C in the second after an export's last line (Python running its exit handlers and
    tearing down torch) ended the finished command by SIGINT, status 130, or printed a
    KeyboardInterrupt's traceback."""
    ran = run_script(LATE_STOP, when, tmp_path)
    assert ran.returncode == 1, ran.stderr
    assert "the command's last line" in ran.stderr and "KeyboardInterrupt" not in ran.stderr
    assert "interrupted" not in ran.stderr
    # in an exit handler it ends the process at once; past them it is ignored
    assert "exit handler ran on" not in ran.stderr
    assert ("torn down" in ran.stderr) is (when == "teardown")


ENDS = """
import atexit, os, sys
from kdsearch import cli


class TornDown:
    def __del__(self) -> None:
        os.write(2, b"torn down\\n")


def command(args: object) -> int:
    # as Ray's and torch's do; what it prints is in the stream's buffer when ours runs
    atexit.register(lambda: print("exit handler ran", file=sys.stderr, end=""))
    atexit.register(lambda: sys.stdout.write("end"))
    sys.stdout.write("x" * 300_000)  # more than a pipe holds at once
    if HOW == "raises":
        raise RuntimeError("a bug")
    return 1


HOW = sys.argv[1]
if HOW == "after another's handler":  # coverage's, say: it must still run, after ours
    atexit.register(lambda: print("earlier handler ran", file=sys.stderr))
held = TornDown()
cli.cmd_train = command
sys.argv = ["kdsearch", "train", "r.yaml"]
cli.entry()
"""


def skip_where_exit_handlers_start_registered() -> None:
    """Skip where this Python registers an exit handler before any code runs (coverage's hook
    for subprocesses, a sitecustomize's): there kdsearch leaves the ending to Python."""
    code = "import atexit; print(atexit._ncallbacks())"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if int(ran.stdout) != 0:
        pytest.skip("an exit handler is registered as this Python starts")


@pytest.mark.parametrize("how", ["returns", "raises", "after another's handler"])
def test_a_finished_command_ends_after_its_exit_handlers_with_its_output_and_status(
    tmp_path: Path, how: str
) -> None:
    """Python's teardown of torch's and Ray's modules took 0.4-1 s after every command's last
    line; the process now ends after the exit handlers, flushed. A command that raised (a bug),
    or one under an exit handler registered before kdsearch's, ends as Python ends it."""
    if how == "returns":
        skip_where_exit_handlers_start_registered()
    ran = run_script(ENDS, how, tmp_path)
    assert ran.stdout == "x" * 300_000 + "end"
    assert "exit handler ran" in ran.stderr
    assert ran.returncode == 1, ran.stderr
    if how == "returns":
        assert "torn down" not in ran.stderr, ran.stderr
    else:
        assert "torn down" in ran.stderr  # Python's own ending, teardown and all
    assert ("RuntimeError: a bug" in ran.stderr) is (how == "raises")
    assert ("earlier handler ran" in ran.stderr) is (how == "after another's handler")


UNWRITABLE = """
import os, sys
from kdsearch import cli


def command(args: object) -> int:
    if HOW == "full":
        os.dup2(os.open("/dev/full", os.O_WRONLY), 1)
    else:  # a reader that has gone, as `kdsearch trials S --csv - | true`
        read, write = os.pipe()
        os.close(read)
        os.dup2(write, 1)
    sys.stdout.write("the last rows")  # in the stream's buffer at exit
    return 0


HOW = sys.argv[1]
cli.cmd_train = command
sys.argv = ["kdsearch", "train", "r.yaml"]
cli.entry()
"""


@pytest.mark.parametrize(("where", "status"), [("full", 2), ("gone", 141)])
def test_output_that_cannot_be_written_at_the_end_is_not_lost_without_a_word(
    tmp_path: Path, where: str, status: int
) -> None:
    """`kdsearch trials S --csv - > /dev/full` ended 0 with its rows lost once the process
    ended without Python's last flush, which says so with status 120."""
    skip_where_exit_handlers_start_registered()
    ran = run_script(UNWRITABLE, where, tmp_path)
    assert ran.returncode == status, ran.stderr
    said = "kdsearch: error: cannot write the output: No space left on device\n"
    assert ran.stderr == (said if where == "full" else "")


@pytest.mark.parametrize("unbuffered", ["1", ""])
@pytest.mark.parametrize("option", ["--version", "--help"])
def test_help_and_version_that_cannot_be_written_say_so(
    tmp_path: Path, option: str, unbuffered: str
) -> None:
    """To a full disk they ended 0 with nothing said: argparse ignores a failed write
    (unbuffered, the write itself fails) and exits before the command's own ending, which checks
    its output's last flush (buffered, that flush fails). To a reader gone, 141, as a command."""
    skip_where_exit_handlers_start_registered()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, gone = os.pipe()
    os.close(read)
    for where, status, said in (
        ("/dev/full", 2, "kdsearch: error: cannot write the output: No space left on device\n"),
        (gone, 141, ""),
    ):
        with open(where, "w") as out:
            ran = subprocess.run(
                [sys.executable, "-m", "kdsearch.cli", option],
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
                env={**env, "PYTHONUNBUFFERED": unbuffered} if unbuffered else env,
            )
        assert (ran.returncode, ran.stderr) == (status, said)
    ran = run_cli(option, cwd=tmp_path)
    assert ran.returncode == 0 and "kdsearch" in ran.stdout.splitlines()[0] and ran.stderr == ""


def test_a_missing_teacher_checkpoint_is_refused_before_the_data_loads(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """It was found missing only after the data set had loaded (minutes, for a large one), with
    the header and the data line printed before the error, and a search's study created."""
    (tmp_path / "r.yaml").write_text(tiny_recipe().to_yaml())
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    for command in ("train r.yaml", "run space.yaml"):
        for key in ("teacher.checkpoint", "teacher.heads.checkpoint"):
            sets = [f"{key}=/nope.pt"]
            if key == "teacher.heads.checkpoint":
                (tmp_path / "t.pt").write_bytes(b"")  # there: the heads' file is what is missing
                sets.append("teacher.checkpoint=t.pt")
            ran = cli_here(*command.split(), *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
            assert ran.returncode == 2 and ran.stdout == ""
            assert ran.stderr == f"kdsearch: error: {key}: /nope.pt: no such file\n"
    assert not (tmp_path / "studies").exists()


def test_a_teacher_checkpoint_that_holds_no_weights_is_refused_before_the_data_loads(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """A text file, or one cut short, named as the teacher passed `run --check` and was found
    out only once the data set had loaded."""
    (tmp_path / "r.yaml").write_text(tiny_recipe().to_yaml())
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    (tmp_path / "notes.pt").write_text("hi\n")
    for command in ("train r.yaml", "run space.yaml", "run space.yaml --check"):
        ran = cli_here(*command.split(), "--set", "teacher.checkpoint=notes.pt", cwd=tmp_path)
        assert ran.returncode == 2 and ran.stdout == ""
        assert ran.stderr == (
            f"kdsearch: error: teacher.checkpoint: {tmp_path}/notes.pt: not a loadable weights "
            "file (not a torch.save file, or a damaged one: its reader stopped at KeyError 105)\n"
        )
    assert not (tmp_path / "studies").exists()


def test_an_option_of_one_value_given_twice_is_refused(tmp_path: Path, cli_here: CliHere) -> None:
    """`--trials 20 --trials 4 --resume` ran with 4, `--study a --study b` searched b: argparse
    keeps the last value without a word."""
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    for args, option, values in (
        (["--trials", "20", "--trials", "4"], "--trials", "20, then 4"),
        (["--study", "a", "--resume", "--study", "b"], "--study", "a, then b"),
    ):
        ran = cli_here("run", "space.yaml", *args, cwd=tmp_path)
        assert ran.returncode == 2 and ran.stderr == (
            f"kdsearch run: error: {option} given twice ({values}); give it once (see kdsearch "
            "run --help)\n"
        )
    assert not (tmp_path / "studies").exists()


def test_a_search_run_again_without_resume_is_refused_before_torch_and_ray_load(
    tmp_path: Path,
) -> None:
    """The same command twice, the common slip, is refused in about a second: before, it waited
    for torch and Ray to import (6-7 s on two cores) and the study's own refusal."""
    write_study(tmp_path)  # studies/s.db, its search's trials finished
    code = (
        "import sys; from kdsearch.cli import main; status = main(['run', 'space.yaml']); "
        "print(status, sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.stdout.split("\n")[-2] == "2 []", (proc.stdout, proc.stderr)
    assert proc.stderr == (
        f"kdsearch: error: study 's' already holds {len(SEARCH_VALUES)} trials; add --resume to "
        "finish it, or choose another --study name\n"
    )


def test_an_option_is_taken_only_as_spelled_in_full(tmp_path: Path, cli_here: CliHere) -> None:
    """argparse's prefixes read `promote S --seed 1` (meant: the seed) as `--seeds 1`."""
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    for command, given in (  # with the options meant, where one is close
        (["promote", "s", "--seed", "1"], "--seed 1; did you mean --seeds?"),
        (
            ["run", "space.yaml", "--trial", "3", "--chek"],
            "--trial 3 --chek; did you mean --trials (for --trial), --check (for --chek)?",
        ),
        (["trials", "s", "--sto", "x.db"], "--sto x.db"),
        (["trials", "s", "--csv=t.csv", "--sot=value"], "--sot=value; did you mean --sort?"),
    ):
        ran = cli_here(*command, cwd=tmp_path)
        assert ran.returncode == 2 and ran.stderr == (
            f"kdsearch {command[0]}: error: unrecognized arguments: {given} (see kdsearch "
            f"{command[0]} --help)\n"
        ), ran.stderr
    assert not (tmp_path / "studies").exists()


def test_a_train_command_turns_a_recipe_file_into_another_recipe_but_for_the_machine(
    tmp_path: Path,
) -> None:
    """What export's note prints for a baseline that beat the winner."""
    exported = tiny_recipe(
        {
            "distill.stkd.weight": 1.95,
            "distill.stkd.mix": "cutmix",
            "optim.lr": 0.05,
            "seed": 1,
            "data.root": str(tmp_path / "here"),
            "schedule.kind": "multistep",
            "schedule.milestones": [1],
        }
    )
    (tmp_path / "my export").mkdir()
    file = tmp_path / "my export" / "recipe.yaml"
    file.write_text(exported.to_yaml())
    wanted = tiny_recipe(
        {
            "optim.lr": 1e-5,
            "seed": 0,
            "data.root": "/elsewhere",
            "schedule.kind": "multistep",
            "schedule.epochs": 4,
            "schedule.milestones": [1, 3],
        }
    )
    assert shlex.split(train_command(file, wanted, threads=None, cpu=False))[:3] == [
        "kdsearch",
        "train",
        str(file),
    ]
    command = train_command(file, wanted, threads=1, cpu=True)  # as it trained, on the CPU
    words = shlex.split(command)
    assert words[:4] == ["OMP_NUM_THREADS=1", "kdsearch", "train", str(file)]
    assert command.endswith(" --set device=cpu")
    words = words[:-2]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert sets == [
        "distill.stkd.mix=mixup",  # a bare word
        "distill.stkd.weight=0.0",
        "optim.lr=1e-05",
        "schedule.epochs=4",
        "schedule.milestones=[1, 3]",
        "seed=0",
    ], command
    told = Recipe.load(file).override(parse_sets(sets))
    assert told == wanted.override({"data.root": exported.data.root})  # this machine's folder
    # trained under a cap on oneDNN's instruction set: under it again (its kernels, its weights)
    capped = shlex.split(train_command(file, wanted, threads=1, cpu=False, cap="AVX2"))
    assert capped[:4] == ["OMP_NUM_THREADS=1", "ONEDNN_MAX_CPU_ISA=AVX2", "kdsearch", "train"]
    assert shlex.split(train_command(file, wanted, threads=1, cpu=False, cap=""))[1] == "kdsearch"


def test_the_recorded_resume_command_gives_study_where_the_run_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trials` said `--study s` where the run itself had named no study (the space's), so
    the same stop gave two different commands."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path}/studies/s.db"
    options = {"space": str(tmp_path / "s.yaml"), "trials": None, "set": [], "address": None}
    told = recorded_resume({"run_options": {**options, "study": None}}, "s", url)
    assert told == "kdsearch run s.yaml --resume"
    told = recorded_resume({"run_options": {**options, "study": "s"}}, "s", url)
    assert told == "kdsearch run s.yaml --study s --resume"
    # recorded before the study was: as before, named
    assert recorded_resume({"run_options": options}, "s", url).endswith("--study s --resume")


def test_check_runs_the_checks_of_a_search_and_writes_nothing(
    tmp_path: Path, cli_here: CliHere
) -> None:
    """A user writing a space had no way to check it without starting a study."""
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    ran = cli_here("run", "s.yaml", "--check", "--trials", "3", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert " ".join(ran.stderr.split()) == (
        "s.yaml: checked: 1 parameter, 3 trials of at most 2 epochs, 2 at a time on this "
        "machine, for study 's' in sqlite:///studies/s.db; the data, the teacher and the study "
        "are first read when it runs"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
    (tmp_path / "s.yaml").write_text(SMALL_SPACE.replace("cpu: 1", "cpu: 4096"))
    ran = cli_here("run", "s.yaml", "--check", cwd=tmp_path)
    assert ran.returncode == 2 and "search.per_trial.cpu is 4096" in ran.stderr
    # a storage the search would refuse is refused by the check (it said "checked", exit 0)
    (tmp_path / "s.yaml").write_text(SMALL_SPACE)
    ran = cli_here("run", "s.yaml", "--check", "--storage", "nowhere/x.db", cwd=tmp_path)
    assert ran.returncode == 2 and "no folder" in ran.stderr and "nowhere" in ran.stderr
    ran = cli_here("run", "s.yaml", "--check", "--storage", "sqlite://", cwd=tmp_path)
    assert ran.returncode == 2 and "in memory is lost" in ran.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]
    # a study that already holds trials, which the search refuses without --resume: so does the
    # check (it said "checked", exit 0), and with --resume it passes; the file is only read
    write_study(tmp_path)
    before = (tmp_path / "studies" / "s.db").read_bytes()
    ran = cli_here("run", "s.yaml", "--check", cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr.splitlines() == [
        "kdsearch: error: study 's' already holds 5 trials; add --resume to finish it, or choose "
        "another --study name"
    ]
    assert cli_here("run", "s.yaml", "--check", "--resume", cwd=tmp_path).returncode == 0
    assert cli_here("run", "s.yaml", "--check", "--study", "t", cwd=tmp_path).returncode == 0
    assert (tmp_path / "studies" / "s.db").read_bytes() == before
    # an image folder that is not there (it said "checked"; the search then failed to load it)
    shown = cli_here(
        "run",
        "s.yaml",
        "--check",
        "--study",
        "t",
        "--set",
        "data.dataset=imagefolder",
        "--set",
        "data.root=nowhere",
        cwd=tmp_path,
    )
    assert shown.returncode == 2 and shown.stderr.splitlines() == [
        f"kdsearch: error: imagefolder: data.root {tmp_path}/nowhere does not exist"
    ]


@pytest.mark.parametrize(
    "command",
    [
        ("trials", "s"),
        ("report", "s", "--out", "r.html"),
        ("export", "s", "--out", "w"),
        ("promote", "s", "--epochs", "2", "--seeds", "1"),
    ],
)
def test_a_study_that_cannot_be_read_stops_each_command_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_here: CliHere, command: tuple[str, ...]
) -> None:
    """A server lost, or an SQLite file locked past its timeout, as the command reads the
    study's trials: it was Optuna's traceback and status 1."""
    import sqlite3

    from optuna.storages import RDBStorage

    write_study(tmp_path)

    def locked(*args: object, **kwargs: object) -> None:
        raise optuna.exceptions.StorageInternalError("read") from sqlite3.OperationalError(
            "database is locked"
        )

    monkeypatch.setattr(RDBStorage, "get_all_trials", locked)
    monkeypatch.setattr(RDBStorage, "_get_trials", locked)
    done = cli_here(*command, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "kdsearch: error: cannot use the study storage sqlite:///studies/s.db: database is locked"
    ), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "studies"]
