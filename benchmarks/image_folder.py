"""How fast an image folder loads: its images decoded in one thread against one thread per core,
and a whole folder loaded the first time (decoded) and again (from the decoded cache), in one run.

    python benchmarks/image_folder.py [--sizes 32,64,128,256,512] [--images 1000] [--rounds 3]
        [--root DIR [--subset N]] [--out FILE.md]

Decoding: for each of `--sizes`, `--images` JPEG files (quality 90) of that many pixels square,
smooth colour gradients with noise on them, written once to a temporary folder, are decoded by
kdsearch's decoder (`data.imagefolder.decode_images`) at their size and resized to 32 x 32, in
this thread and on one thread per core, alternately, `--rounds` times: microseconds an image
(medians) and the speed-up of the threads. kdsearch decodes a folder on threads only where its
first images took at least `data.imagefolder.THREADED_FROM` seconds each; the last column says
which it chose.

Whole load (with `--root`, an image folder of train/ and test/ such as CIFAR-10 as JPEG):
`load_data` in a fresh process with an empty cache folder (listing, decoding, caching), then in
another fresh process with that cache (listing, checking the cache is current, reading it), and
each load's seconds inside its process (not the process's start and imports). With `--subset`,
the same two loads of `data.subset: N` of it, from a cache of their own: its kept training images
and the test split decoded, not the whole folder.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tables import Table, command_line, cpu_name, positive, run

from kdsearch.data.imagefolder import PROBE_IMAGES, decode_images, probe_decoding

TARGET = 32  # the resized rows' size, CIFAR's
SIZES = [32, 64, 128, 256, 512]


def write_images(folder: Path, size: int, count: int) -> list[str]:
    """`count` JPEG files of `size` x `size` pixels in `folder` (kept if there already)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    ramp = np.linspace(0, 255, size)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        if not path.exists():
            r, g = np.meshgrid(np.roll(ramp, i), ramp[::-1])
            image = np.stack([r, g, (r + g) / 2], axis=2) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def per_image_us(paths: list[str], size: int | None, threaded: bool) -> float:
    """Microseconds an image to decode `paths` in this thread or on threads."""
    started = time.perf_counter()
    for _ in decode_images(paths, size, threaded):
        pass
    return (time.perf_counter() - started) / len(paths) * 1e6


def chosen(paths: list[str], size: int | None) -> str:
    """Whether kdsearch would decode the rest of these on threads, timing the first as it does."""
    probe = probe_decoding(paths, size)
    while True:
        try:
            next(probe)
        except StopIteration as done:
            return "threads" if done.value else "one"


LOAD = """
import json, sys, time
from kdsearch.data import load_data
from kdsearch.recipe import DataConfig
started = time.perf_counter()
subset = int(sys.argv[2]) if sys.argv[2] else None
data = load_data(DataConfig(dataset="imagefolder", root=sys.argv[1], subset=subset))
print(json.dumps({"seconds": time.perf_counter() - started, "images": len(data.train) +
    len(data.val) + len(data.test)}))
"""


def load_seconds(root: str, cache: str, subset: int | None) -> tuple[float, int]:
    """Seconds `load_data` took for the folder at `root` (`subset` of its training images, or
    all) in a fresh process with `cache`, and the images it loaded."""
    env = {**os.environ, "KDSEARCH_CACHE_DIR": cache}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, root, str(subset or "")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        sys.exit(f"image_folder.py: loading {root} failed:\n{done.stderr.strip()}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return float(out["seconds"]), int(out["images"])


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument(
        "--sizes", type=lambda text: [positive(s) for s in text.split(",")], default=SIZES
    )
    parser.add_argument("--images", type=positive, default=1000)
    parser.add_argument("--rounds", type=positive, default=3)
    parser.add_argument("--root", help="an image folder to load whole")
    parser.add_argument("--subset", type=positive, help="also load this many of its images")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if args.images <= PROBE_IMAGES:
        parser.error(f"--images must be more than {PROBE_IMAGES}, the images kdsearch times")
    if args.root and not Path(args.root).is_dir():
        parser.error(f"--root {args.root} is not a folder")
    if args.subset and not args.root:
        parser.error("--subset needs --root")
    decoding = Table(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.images} JPEG images a size, medians "
        f"of {args.rounds} rounds\n",
        "| image px | resized to | one thread, us/image | threads, us/image | threads' speed-up "
        "| kdsearch uses |",
        "|---|---|---|---|---|---|",
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            paths = write_images(Path(tmp) / str(size), size, args.images)
            for target in (None, TARGET):
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for threaded in (False, True):
                        times[threaded].append(per_image_us(paths, target, threaded))
                one, threads = (statistics.median(times[t]) for t in (False, True))
                decoding.row(
                    f"| {size} | {target or '-'} | {one:.0f} | {threads:.0f} | "
                    f"{one / threads:.2f}x | {chosen(paths, target)} |"
                )
        lines = decoding.lines
        if args.root:
            loading = Table(
                "", "| folder | subset | images | first load, s | again, s |", "|---" * 5 + "|"
            )
            for subset in (None, args.subset) if args.subset else (None,):
                cache = str(Path(tmp) / f"cache-{subset}")
                first, images = load_seconds(args.root, cache, subset)
                again, _ = load_seconds(args.root, cache, subset)
                loading.row(
                    f"| {args.root} | {subset or '-'} | {images:,} | {first:.1f} | {again:.1f} |"
                )
            lines = lines + loading.lines
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run(main)
