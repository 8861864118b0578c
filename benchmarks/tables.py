"""What the benchmarks share: the markdown table a benchmark prints as it measures (and writes to a
file at the end), the line naming the device it ran on, and the one-line end of a run on an error
the user caused."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kdsearch.errors import KdsearchError, NonFiniteLoss

if TYPE_CHECKING:
    import torch


class Table:
    """Lines printed at once (a long benchmark shows each row when it is measured), kept for
    `save`."""

    def __init__(self, *header: str) -> None:
        self.lines = list(header)
        print("\n".join(header), flush=True)

    def row(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, path: str | None) -> None:
        if path:
            Path(path).write_text("\n".join(self.lines) + "\n")


def device_line(device: torch.device) -> str:
    """`device: cuda (its name)` or `device: cpu (its model name)`, for a table's first line."""
    import torch  # here: the search benchmarks' `--bare` child must not pay for it first

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return f"device: {device.type} ({name})"


def machine_line(device: torch.device) -> str:
    """A table's first words: the device (`device_line`), the CPU threads torch uses, torch's
    version."""
    import torch

    return f"{device_line(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_name() -> str:
    """The CPU's model name (a virtual machine may name none), else the machine's type."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_line(doc: str) -> argparse.ArgumentParser:
    """The command line of a benchmark, whose --help shows its whole docstring as written (the
    usage with every default, what it measures and how)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def positive(text: str) -> int:
    """An option's value as a whole number of at least 1 (argparse names the option if not)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def step_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options of the step benchmarks: `--steps` timed (`steps` by default), `--rounds`,
    `--device` and `--out`."""
    parser.add_argument("--steps", type=positive, default=steps)
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="also write what it prints to this markdown file")


def pairs(text: str) -> list[tuple[str, str]]:
    """`teacher:student,...` as pairs of registered models (an argparse type)."""
    from kdsearch.models import MODELS

    out = []
    for pair in text.split(","):
        archs = pair.split(":")
        if len(archs) != 2:
            raise argparse.ArgumentTypeError(f"{pair!r} is not teacher:student")
        for arch in archs:
            if arch not in MODELS:
                raise argparse.ArgumentTypeError(f"no model {arch!r}; models: {', '.join(MODELS)}")
        out.append((archs[0], archs[1]))
    return out


def names(valid: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of `valid`."""

    def parse(text: str) -> list[str]:
        out = text.split(",")
        for name in out:
            if name not in valid:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(valid)}")
        return out

    return parse


def stdev(values: Sequence[float]) -> float:
    """The sample standard deviation; 0 for one value (one seed shows no spread)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run(main: Callable[[], None]) -> None:
    """Run a benchmark's `main`: an error the user can cause (a data set that is not there, CUDA
    where there is none) ends in one line and status 2, a diverged run in one line and status 1,
    as they do in the `kdsearch` command."""
    prog = Path(sys.argv[0]).name
    try:
        main()
    except KdsearchError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as err:
        print(f"{prog}: training diverged: {err}", file=sys.stderr)
        sys.exit(1)
