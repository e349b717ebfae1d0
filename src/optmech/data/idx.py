"""Reader for the IDX format of MNIST and Fashion-MNIST (gzipped or not).

Layout: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions n, then n
big-endian uint32 sizes, then the data in C order. Images are idx3 (magic 2051), labels idx1
(magic 2049).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from .errors import DataFileError, DatasetNotFoundError

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049

#: split -> (images stem, labels stem); both "train-images-idx3-ubyte" and "train-images.idx3-ubyte" occur.
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise DataFileError(
            f"{path}: could not read the file ({exc}). It looks truncated or corrupt; download it again."
        ) from None


def read_idx(path: str | Path, *, expected_magic: int) -> np.ndarray:
    """Read one IDX file into a uint8 array, checking magic number, header and size."""
    path = Path(path)
    data = _read_bytes(path)
    kind = "images (idx3)" if expected_magic == IMAGES_MAGIC else "labels (idx1)"
    if len(data) < 4:
        raise DataFileError(f"{path}: expected an IDX {kind} file, got only {len(data)} bytes. Download it again.")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        raise DataFileError(
            f"{path}: expected IDX magic number {expected_magic} for {kind}, got {magic} instead. "
            "The file is not an MNIST-style IDX file, or images and labels are swapped."
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(f"{path}: header truncated ({len(data)} bytes, expected at least {header}). Download it again.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise DataFileError(
            f"{path}: header declares shape {tuple(dims)} = {expected} bytes of data, got {len(data) - header} instead. "
            "The file is truncated or corrupt; download it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_files(root: Path, split: str) -> tuple[Path, Path]:
    """Locate (images, labels) for a split under root, root/raw, root/MNIST/raw or root/FashionMNIST/raw."""
    image_stem, label_stem = IDX_STEMS[split]
    candidates_dirs = [root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    found = []
    for stem in (image_stem, label_stem):
        names = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
        hit = next((d / n for d in candidates_dirs for n in names if (d / n).is_file()), None)
        if hit is None:
            raise DatasetNotFoundError(
                f"{root}: expected the IDX file {stem}[.gz] for split {split!r} in {root} "
                f"(or its raw/, MNIST/raw/ or FashionMNIST/raw/ subfolder), found none. "
                "Put the four standard IDX files (train/t10k images and labels) there, or pass --data-dir."
            )
        found.append(hit)
    return found[0], found[1]


def load_idx_split(root: Path, split: str, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, h, w) uint8, labels (N,) int64) of one split, cross-checked."""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{root}: expected a directory holding the IDX files, but it does not exist. Pass the right --data-dir."
        )
    images_path, labels_path = find_idx_files(root, split)
    images = read_idx(images_path, expected_magic=IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=LABELS_MAGIC)
    if images.ndim != 3:
        raise DataFileError(f"{images_path}: expected 3 dimensions (N, h, w), got shape {images.shape} instead.")
    if labels.shape[0] != images.shape[0]:
        raise DataFileError(
            f"{labels_path}: expected {images.shape[0]} labels to match {images_path.name}, got {labels.shape[0]} instead."
        )
    if labels.size and int(labels.max()) >= n_classes:
        raise DataFileError(f"{labels_path}: expected labels in [0, {n_classes}), found {int(labels.max())}.")
    return images, labels.astype(np.int64)
