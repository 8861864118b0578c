"""`kdsearch train`: one student from a recipe."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch import __version__
from kdsearch.commands.common import load_recipe, loaded_data, prepare_teacher, student_trained
from kdsearch.display import console
from kdsearch.errors import KdsearchError
from kdsearch.paths import placed_files, run_files, writable_folder, write_errors
from kdsearch.recipe import followed

if TYPE_CHECKING:
    import torch

    from kdsearch.recipe import Recipe


def cmd_train(args: argparse.Namespace) -> int:
    """Train one student from a recipe and write recipe.yaml, metrics.json and student.pt."""
    recipe = load_recipe(args.recipe, args.set)  # before the heavy imports: bad input fails fast
    import torch

    from kdsearch.distill import needs_teacher, needs_teacher_heads
    from kdsearch.teacher import refuse_unusable_checkpoints
    from kdsearch.train import evaluate_split, kernel_cap, resolve_device, trained_precision

    if needs_teacher(recipe):
        refuse_unusable_checkpoints(recipe)

    out = (
        Path(args.out)
        if args.out
        else Path("studies/runs") / f"{run_name(args.recipe)}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    writable_folder(out, "--out")
    held = run_files(out) if out.is_dir() else []
    if held:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise KdsearchError(f"--out {out} already holds files ({shown}); choose another folder")
    device = resolve_device(recipe.device)
    precision = trained_precision(recipe, device)
    console.print(
        f"kdsearch {__version__}: {recipe.teacher.arch} -> {recipe.student.arch} on "
        f"{recipe.data.dataset}, {device.type}, {precision}"
    )
    data = loaded_data(recipe.data)
    recipe_file = followed(args.recipe)  # an export's recipe.yaml, linked from elsewhere too
    exported = export_meta(recipe_file)
    searched = exported.get("data_fingerprint")  # a fingerprint is a hash's hex digits; a
    # value of another kind, from a hand-edited file, counts as not kept
    if isinstance(searched, str) and searched != data.fingerprint:
        console.print(
            f"note: these are not the images, splits or normalisation the exported student in "
            f"{recipe_file.parent} trained on (data fingerprint {data.fingerprint[:12]}, "
            f"there {searched[:12]}); its meta.json's accuracies do not carry over",
        )
    for note in kernel_notes(recipe_file, exported, recipe, precision, device):
        console.print(note)
    teacher = None
    if needs_teacher(recipe):
        teacher = prepare_teacher(recipe, data, needs_teacher_heads(recipe))
        console.print(
            f"teacher {recipe.teacher.arch} ({teacher.source}, {teacher.path}): "
            f"val acc {100 * teacher.val_acc:.2f}%"
            + (f"; its heads: {teacher.heads_path}" if teacher.heads_path else "")
        )
        if (replaced := replaced_teacher(recipe_file, exported, teacher.path)) is not None:
            console.print(
                f"note: {teacher.path} is not the teacher the exported student in "
                f"{recipe_file.parent} learned from (weights hash {replaced[0]}, there "
                f"{replaced[1]}); its meta.json's accuracies do not carry over"
            )
    result = student_trained("student", recipe, data, teacher)
    test_acc, test_loss = evaluate_split(result.student, data.test, data, recipe)
    metrics = {
        "val_acc": result.val_acc,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "epochs": len(result.history),
        "seconds": round(result.seconds, 2),
        "images_per_sec": round(result.images_per_sec, 1),
        "student_params": result.params,
        "device": str(device),
        "precision": precision,
        "onednn_cap": kernel_cap(device),
        "teacher": None
        if teacher is None
        else {
            "arch": recipe.teacher.arch,
            "source": teacher.source,
            "path": str(teacher.path),
            "val_acc": teacher.val_acc,
            **({"heads_path": str(teacher.heads_path)} if teacher.heads_path else {}),
        },
        "history": [vars(s) for s in result.history],
        "inputs": data.inputs(),  # what serving the student needs: size, normalisation, classes
        "kdsearch": __version__,
    }

    def write(folder: Path) -> None:
        (folder / "recipe.yaml").write_text(recipe.to_yaml())
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        weights = {k: v.cpu() for k, v in result.student.state_dict().items()}
        torch.save(weights, folder / "student.pt")

    with write_errors(f"--out {out}"):
        written = placed_files(out, write)
    if written != out:
        console.print(f"note: another run wrote into {out} while this one trained")
    console.print(
        f"student {recipe.student.arch}: val acc {100 * result.val_acc:.2f}%, "
        f"test acc {100 * test_acc:.2f}%; wrote {written}/recipe.yaml, metrics.json, student.pt"
    )
    return 0


def run_name(recipe: str) -> str:
    """What names a run of `recipe` by default: its file's name, but an export's `recipe.yaml`
    its folder's (the runs of two exports are told apart)."""
    path = Path(recipe).resolve()
    return path.parent.name if path.name == "recipe.yaml" and path.parent.name else path.stem


def kernel_notes(
    recipe_file: Path, meta: dict[str, Any], recipe: Recipe, precision: str, device: torch.device
) -> list[str]:
    """What to say where this run will not do the arithmetic the export holding `recipe_file`
    (its `meta`) did: another precision (`precision: auto` resolves by machine: bf16 where the
    CPU or GPU multiplies bf16), or on the CPU another cap on oneDNN's instruction set, which
    changes its kernels in any precision. Nothing where they agree or the export kept neither
    (a value no recipe or cap takes, from a hand-edited file, counts as not kept)."""
    from kdsearch.train import (
        DTYPES,
        ISAS_WITHOUT_BF16,
        arithmetic,
        cpu_multiplies_bf16,
        kernel_cap,
        recorded_cap,
        trained_precision,
    )

    cap = kernel_cap(device)
    there = meta.get("precision")
    there = there if isinstance(there, str) and there in DTYPES else None
    on_cpus = meta.get("device") == "cpu" and device.type == "cpu"
    there_cap = recorded_cap(meta.get("onednn_cap")) if on_cpus else None
    caps_differ = there_cap is not None and there_cap != cap
    notes = []
    if there is not None and there != precision:
        why = f"`precision: {recipe.precision}`" + (
            " on this machine" if recipe.precision == "auto" else ""
        )
        if cap in ISAS_WITHOUT_BF16 and recipe.precision == "auto":  # what made `auto` fp32 here
            why += f", where oneDNN's instruction set is capped at {cap}, below bf16's"
        emulated = there == "bf16" and device.type == "cpu" and not cpu_multiplies_bf16()
        if caps_differ or (there == "fp16" and device.type != "cuda"):  # the cap's note says how
            how = ""
        elif emulated and not (there_cap == cap and cap in ISAS_WITHOUT_BF16):
            by = f"emulated under the cap at {cap}" if cap else "this CPU emulates it"
            how = (
                f"; `--set precision=bf16` trains in bf16, but {by}: slowly, and rounding "
                "otherwise than bf16 hardware does"
            )
        else:  # (an export emulated under the same cap trains as it did)
            how = f"; `--set precision={there}` trains it as it did"
        notes.append(
            f"note: the exported student in {recipe_file.parent} trained in {there} and this run "
            f"trains in {precision} ({why}), so its weights will differ{how}"
        )
    if caps_differ:
        how = (
            f"`ONEDNN_MAX_CPU_ISA={there_cap}` set"
            if there_cap
            else "ONEDNN_MAX_CPU_ISA and DNNL_MAX_CPU_ISA unset"
        )
        if there is not None and trained_precision(recipe, device, there_cap) != there:
            how += f" and `--set precision={there}`"  # what the recipe gives under that cap
        notes.append(
            f"note: the exported student in {recipe_file.parent} trained "
            f"{arithmetic(there, there_cap)} and this run trains {arithmetic(precision, cap)}: "
            "oneDNN's CPU kernels differ by the cap on its instruction set "
            f"(ONEDNN_MAX_CPU_ISA), so its weights will differ; with {how}, it trains as it did"
        )
    return notes


def export_meta(recipe_file: Path) -> dict[str, Any]:
    """The meta.json of the export holding `recipe_file`; empty for a recipe that is not in an
    export. Here, not in kdsearch.export, which writes it: `train` should not import Ray to
    read it."""
    file = recipe_file.parent / "meta.json"
    try:
        found = json.loads(file.read_text())
    except FileNotFoundError:  # not an export
        return {}
    except (OSError, ValueError) as err:  # unreadable, not JSON: said, not passed over
        why = err.strerror if isinstance(err, OSError) and err.strerror else "not JSON"
        console.print(f"note: {file} cannot be read ({why}); this run is not compared with it")
        return {}
    if not isinstance(found, dict) or not isinstance(found.get("study"), str):  # as `export`
        # tells its own folder (a hand-written file, or another tool's meta.json)
        console.print(
            f"note: {file} is not an export's meta.json; this run is not compared with it"
        )
        return {}
    return found


def replaced_teacher(recipe_file: Path, meta: dict[str, Any], path: Path) -> tuple[str, str] | None:
    """Where the teacher at `path` is a file of the export holding `recipe_file` whose weights
    hash otherwise than its meta.json records (the file replaced since): both hashes."""
    from kdsearch.teacher import weights_digest

    files = meta.get("teacher_files")
    for name, recorded in files.items() if isinstance(files, dict) else ():
        if not isinstance(recorded, dict) or not isinstance(recorded.get("digest"), str):
            continue
        if (recipe_file.parent / str(name)).resolve() == path.resolve():
            here = weights_digest(path)
            return (here, recorded["digest"]) if here != recorded["digest"] else None
    return None
