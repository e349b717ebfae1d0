"""Reader for CIFAR-10's "python version" (pickled batches data_batch_1…5 and test_batch).

Each batch is a pickled dict with b"data" (10000, 3072) uint8 in channel-major order and
b"labels" (10000 ints). Pickle executes code when loaded: only point this at files you trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .errors import DataFileError, DatasetNotFoundError

CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _batch_dir(root: Path) -> Path:
    for d in (root, root / "cifar-10-batches-py"):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return d
    raise DatasetNotFoundError(
        f"{root}: expected the CIFAR-10 python batches (data_batch_1…5, test_batch) in {root} or "
        f"{root / 'cifar-10-batches-py'}, found none. Extract cifar-10-python.tar.gz there, or pass --data-dir."
    )


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one pickled batch."""
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: expected a CIFAR-10 batch file here, found none. Re-extract the archive.")
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataFileError(f"{path}: could not unpickle the CIFAR-10 batch ({type(exc).__name__}: {exc}). Re-extract it.") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch)[:5] if isinstance(batch, dict) else type(batch).__name__
        raise DataFileError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}. Is this CIFAR-10 (python version)?")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataFileError(f"{path}: expected b'data' of shape (N, 3072) uint8, got {data.shape} {data.dtype} instead.")
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataFileError(f"{path}: expected {data.shape[0]} labels in [0, 10), got shape {labels.shape}.")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: expected a directory holding CIFAR-10 batches, but it does not exist. Pass --data-dir.")
    d = _batch_dir(root)
    parts = [read_cifar_batch(d / name) for name in CIFAR_BATCHES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
