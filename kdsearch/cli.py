"""The `kdsearch` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kdsearch import __version__
from kdsearch.errors import KdsearchError, NonFiniteLoss
from kdsearch.recipe import Recipe, load_yaml

console = Console(stderr=True, highlight=False, soft_wrap=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """`path=value` pairs; each value is read as YAML, so `6`, `true`, `[1, 2]` keep their types."""
    changes: dict[str, Any] = {}
    for item in items:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise KdsearchError(
                f"--set {item!r}: expected PATH=VALUE, e.g. distill.kd.temperature=6"
            )
        changes[path.strip()] = load_yaml(text, source=f"--set {path}")
    return changes


def load_recipe(path: str, sets: Sequence[str]) -> Recipe:
    """A recipe file with the command line's `--set` overrides applied."""
    recipe = Recipe.load(path)
    return recipe.override(parse_sets(sets), source="--set") if sets else recipe


@contextmanager
def epoch_progress(label: str, epochs: int) -> Iterator[Callable[[Any], None]]:
    """A progress bar over epochs and one printed line per epoch; yields the report callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"{label} epochs", total=epochs)

        def report(stats: Any) -> None:
            parts = " ".join(f"{k} {v:.3f}" for k, v in stats.parts.items())
            progress.console.print(
                f"{label} epoch {stats.epoch:>3}/{epochs}  loss {stats.train_loss:.4f} ({parts})  "
                f"val acc {100 * stats.val_acc:6.2f}%  lr {stats.lr:.4g}  "
                f"{stats.images_per_sec:,.0f} img/s  {stats.seconds:.1f}s"
            )
            progress.advance(task)

        yield report


def prepare_teacher(recipe: Recipe, data: Any, heads: bool) -> Any:
    """The recipe's teacher (and its heads when asked), with progress while either trains."""
    from kdsearch.teacher import get_teacher

    with epoch_progress("teacher", recipe.teacher.train.epochs) as report:
        teacher = get_teacher(recipe, data, report, heads=False)
    if heads:
        from kdsearch.teacher import get_teacher_heads

        with epoch_progress("teacher heads", recipe.teacher.heads.epochs) as heads_report:
            teacher = replace(teacher, heads=get_teacher_heads(recipe, data, teacher, heads_report))
    return teacher


def cmd_train(args: argparse.Namespace) -> int:
    """Train one student from a recipe and write recipe.yaml, metrics.json and student.pt."""
    recipe = load_recipe(args.recipe, args.set)  # before the heavy imports: bad input fails fast
    import torch

    from kdsearch.data import load_data
    from kdsearch.distill import needs_teacher, needs_teacher_heads
    from kdsearch.train import autocast_dtype, evaluate_split, resolve_device, train

    out = (
        Path(args.out)
        if args.out
        else Path("studies/runs") / (f"{Path(args.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    if (out / "student.pt").exists():
        raise KdsearchError(f"--out {out} already holds a trained student; choose another folder")
    device = resolve_device(recipe.device)
    dtype = autocast_dtype(recipe.precision, device)
    console.print(
        f"kdsearch {__version__}: {recipe.teacher.arch} -> {recipe.student.arch} on "
        f"{recipe.data.dataset}, {device.type}, {dtype or torch.float32}"
    )
    with console.status("loading data"):
        data = load_data(
            recipe.data, progress=lambda what, done, total: console.print(f"{what}: {done}/{total}")
        )
    console.print(
        f"data: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes"
    )
    teacher = None
    if needs_teacher(recipe):
        teacher = prepare_teacher(recipe, data, needs_teacher_heads(recipe))
        console.print(
            f"teacher {recipe.teacher.arch} ({teacher.source}, {teacher.path}): "
            f"val acc {100 * teacher.val_acc:.2f}%"
        )
    with epoch_progress("student", recipe.schedule.epochs) as report:
        result = train(
            recipe,
            data,
            report,
            teacher=teacher.model if teacher else None,
            teacher_heads=teacher.heads if teacher else None,
        )
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
        "precision": str(dtype or torch.float32),
        "teacher": None
        if teacher is None
        else {
            "arch": recipe.teacher.arch,
            "source": teacher.source,
            "path": str(teacher.path),
            "val_acc": teacher.val_acc,
        },
        "history": [vars(s) for s in result.history],
        "kdsearch": __version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    torch.save({k: v.cpu() for k, v in result.student.state_dict().items()}, out / "student.pt")
    console.print(
        f"student {recipe.student.arch}: val acc {100 * result.val_acc:.2f}%, "
        f"test acc {100 * test_acc:.2f}%; wrote {out}/recipe.yaml, metrics.json, student.pt"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Search a space: trials on Ray Tune with ASHA, every one recorded in an Optuna study."""
    from kdsearch.space import SearchSpace
    from kdsearch.study import Record, default_storage, open_storage, redact

    space = SearchSpace.load(args.space)
    if args.set:
        space = space.with_base_changes(parse_sets(args.set))
    name = args.study or space.config.study.name
    url = args.storage or space.config.study.storage or default_storage(name)
    target = args.trials or space.config.search.trials
    record = Record(open_storage(url), name, space, target=target, resume=args.resume)

    if args.address not in (None, "auto"):
        use_ray_token(os.environ)
    from kdsearch.data import load_data
    from kdsearch.losses import LOSSES
    from kdsearch.search import active_terms, run_search

    done_before = len(record.study.trials) - record.tally().running
    console.print(
        f"kdsearch {__version__}: study {name!r} in {redact(url)}: {target} trials "
        f"({done_before} finished before, {len(record.orphans)} to run again), "
        f"at most {space.config.asha.max_epochs} epochs each"
    )
    with console.status("loading data"):
        data = load_data(space.base.data)
    terms = active_terms(space)
    teacher = None
    if any(LOSSES[t].needs_teacher for t in terms):
        teacher = prepare_teacher(space.base, data, any(LOSSES[t].has_teacher_heads for t in terms))
        console.print(
            f"teacher {space.base.teacher.arch} ({teacher.source}): "
            f"val acc {100 * teacher.val_acc:.2f}%"
        )
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        outcome = run_search(
            space,
            record,
            data,
            teacher,
            address=args.address,
            status=lambda tally: live.update(status_line(tally, target)),
        )
    console.print(status_line(outcome.tally, target) + f" in {outcome.seconds:.0f} s")
    for line in outcome.tally.failures[-5:]:
        console.print(f"  failed {line}", markup=False)
    finished = outcome.tally.complete + outcome.tally.pruned + outcome.tally.failed
    if finished < target:
        console.print(
            f"stopped with {finished} of {target} trials finished; "
            f"`kdsearch run {args.space} --resume` finishes the search"
        )
        return 130
    console.print(
        f"study {name!r} is in {redact(url)}; `kdsearch dashboard {redact(url)}` shows it"
    )
    return 0


def use_ray_token(env: MutableMapping[str, str]) -> None:
    """Clusters started with `ray start` check a token that Ray loads by itself only for
    `--address auto`; for an explicit address, turn token mode on when a token is at hand. Ray
    reads this setting when it is first imported, so this runs before kdsearch.search is."""
    if "RAY_AUTH_MODE" in env:
        return
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if "RAY_AUTH_TOKEN" in env or token_file.is_file():
        env["RAY_AUTH_MODE"] = "token"


def status_line(tally: Any, target: int) -> str:
    """One line: trials by state and the best so far."""
    finished = tally.complete + tally.pruned + tally.failed
    line = (
        f"trials {finished}/{target}: {tally.complete} complete, {tally.pruned} pruned, "
        f"{tally.failed} failed, {tally.running} running"
    )
    if tally.best is not None:
        value, number, params = tally.best
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
        )
        line += f"; best {100 * value:.2f}% (#{number}: {shown})"
    return line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(prog="kdsearch", description="AutoML for knowledge distillation.")
    parser.add_argument("--version", action="version", version=f"kdsearch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train one student from a recipe YAML")
    p.add_argument("recipe", help="a recipe YAML file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a recipe value, e.g. --set distill.kd.temperature=6 (repeatable)",
    )
    p.add_argument("--out", help="output folder (default: studies/runs/<recipe>-<time>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="search a space of distillation recipes")
    p.add_argument("space", help="a search space YAML file (search_spaces/*.yaml)")
    p.add_argument("--trials", type=int, help="trials the study should hold (default: the space's)")
    p.add_argument("--study", help="study name (default: the space's study.name)")
    p.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///studies/<study>.db)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a value of the base recipe (repeatable)",
    )
    p.add_argument(
        "--address",
        help="join the Ray cluster at this address (default: start "
        "a local Ray sized to this machine)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted or killed search of the same study",
    )
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `kdsearch` console command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KdsearchError as err:
        console.print(f"kdsearch: error: {err}", markup=False)
        return 2
    except NonFiniteLoss as err:
        console.print(f"kdsearch: training diverged: {err}", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("kdsearch: interrupted; nothing of the unfinished run was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
