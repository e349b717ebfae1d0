"""The run directory: ``run.json``, per-sample Parquet parts and checkpoints, all written atomically.

Layout of a run directory::

    run.json                     resolved config, versions, seed, status, timings, summary
    records/part-SSSSSSSS-EEEEEEEE.parquet   rows of records with steps S…E (inclusive)
    checkpoint.pt                model, optimiser, RNG state and the step to continue from

Every file is written to a temporary name in the same folder and renamed (atomic on POSIX), so a
killed run leaves only complete files. A part is written before the checkpoint that follows it;
on resume, parts that start at or after the checkpoint's step are dropped and recomputed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = ["atomic_write", "write_json_atomic", "read_json", "RecordWriter", "read_records", "save_checkpoint", "load_checkpoint"]

_PART = re.compile(r"^part-(\d{8})-(\d{8})\.parquet$")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON to a temporary file and rename it over ``path``."""
    with atomic_write(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: expected valid JSON, got a parse error ({exc}). The file is corrupt.") from None


class RecordWriter:
    """Buffers per-sample rows and writes them as Parquet parts, one part per ``flush``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.dir = Path(run_dir) / "records"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._pending: list[pd.DataFrame] = []

    def add(self, rows: pd.DataFrame) -> None:
        self._pending.append(rows)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def flush(self) -> Path | None:
        """Write pending rows as one atomic part named by its step range; returns its path."""
        if not self._pending:
            return None
        frame = pd.concat(self._pending, ignore_index=True)
        first, last = int(frame["step"].min()), int(frame["step"].max())
        path = self.dir / f"part-{first:08d}-{last:08d}.parquet"
        with atomic_write(path) as tmp:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        self._pending.clear()
        return path

    def drop_from(self, step: int) -> list[Path]:
        """Delete parts whose first step is ≥ ``step`` (they are recomputed on resume), and temp files."""
        removed = []
        for path in sorted(self.dir.iterdir()):
            match = _PART.match(path.name)
            if match and int(match.group(1)) >= step:
                path.unlink()
                removed.append(path)
            elif path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink()
        return removed


def read_records(run_dir: str | os.PathLike) -> pd.DataFrame:
    """All per-sample rows of a run, ordered by step (then as written)."""
    folder = Path(run_dir) / "records"
    if not folder.is_dir():
        raise FileNotFoundError(f"{run_dir}: expected a run directory with a records/ folder, found none. Is this an optmech run?")
    parts = sorted(p for p in folder.iterdir() if _PART.match(p.name))
    if not parts:
        return pd.DataFrame()
    frames = []
    for p in parts:
        try:
            frames.append(pq.read_table(p).to_pandas())
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{p}: expected a readable Parquet part, got an error ({exc}). Delete it and resume the run.") from None
    return pd.concat(frames, ignore_index=True)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save to a temporary file, then rename."""
    with atomic_write(Path(path)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable checkpoint
        raise ValueError(f"{path}: could not load the checkpoint ({type(exc).__name__}: {exc}). Start the run again with --overwrite.") from None
