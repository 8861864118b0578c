"""The sources that need no files: scikit-learn's handwritten digits (read from the file it
ships) and synthetic blobs for tests."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdsearch.data.base import Progress, Raw, Split, seeded_generator, stratified_take, take
from kdsearch.recipe import DataConfig


def digits_table() -> np.ndarray:
    """scikit-learn's 1,797 digits, a row each: 64 pixels (8x8, values 0..16), then the label.
    Read from the file scikit-learn ships, without importing scikit-learn, which takes seconds
    (with SciPy) in every process that loads them; through `load_digits` where the file is not
    where scikit-learn has always kept it."""
    spec = find_spec("sklearn")
    folders = spec.submodule_search_locations if spec else None
    for folder in folders or []:
        file = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if file.is_file():
            return np.loadtxt(file, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.column_stack([bunch.data, bunch.target])


def read_digits(cfg: DataConfig, progress: Progress | None) -> Raw:
    table = torch.as_tensor(digits_table())
    # 8x8 images with values 0..16 (17 levels), times 16: 0..240, and 16 clamped to 255.
    x = table[:, :64].reshape(-1, 1, 8, 8).mul(16).clamp(0, 255).to(torch.uint8)
    y = table[:, 64].to(torch.int64)
    # The test split is the same for every data.seed (which seeds only the subset and the
    # validation split), as the other sources' official splits are; seed 0 is the split of old.
    test_idx, train_idx = stratified_take(y, round(0.2 * len(y)), seeded_generator(0, "test"))
    every = Split(x, y)
    classes = tuple(str(c) for c in range(10))
    return Raw(take(every, train_idx), take(every, test_idx), classes, hflip=False)


def read_synthetic(cfg: DataConfig, progress: Progress | None) -> Raw:
    """Ten classes of noisy coloured blobs: learnable in a few epochs, for tests. The same
    images for every data.seed, which draws the subset and the validation split."""
    gen = seeded_generator(0, "synthetic")
    size = cfg.image_size or 16
    templates = F.interpolate(
        torch.rand(10, 3, 4, 4, generator=gen),
        size=(size, size),
        mode="bilinear",
        align_corners=False,
    )

    def draw(n: int) -> Split:
        y = torch.arange(n) % 10
        noise = torch.randn(n, 3, size, size, generator=gen) * 0.25
        x = (templates[y] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
        return Split(x, y)

    return Raw(draw(800), draw(200), tuple(f"class{c}" for c in range(10)), hflip=True)
