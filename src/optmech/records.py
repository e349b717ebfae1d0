"""The run directory: ``run.json``, per-sample Parquet parts and checkpoints, all written atomically.

Layout of a run directory::

    run.json                     resolved config, versions, seed, status, timings, summary
    records/part-SSSSSSSS-EEEEEEEE.parquet   rows of records with steps S…E (inclusive)
    steps.parquet                per-step aggregates over the probe samples (written when the run completes)
    evals.parquet                held-out loss and accuracy along training (rewritten with every checkpoint)
    checkpoint.pt                model, optimiser, RNG state and the step to continue from

Every file is written to a temporary name in the same folder and renamed (atomic on POSIX), so a
killed run leaves only complete files. A part is written before the checkpoint that follows it;
on resume, parts that start at or after the checkpoint's step are dropped and recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = ["atomic_write", "write_json_atomic", "read_json", "RecordWriter", "read_records", "save_checkpoint",
           "load_checkpoint", "write_parquet_atomic", "read_parquet_folder", "Reproduction", "read_reproduction",
           "step_aggregates", "AGGREGATED", "fixed_probe_medians", "published_pairing", "probe_arrays",
           "PROBE_COLUMNS"]

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
    return pd.concat([_read_parquet(p) for p in parts], ignore_index=True)


def fixed_probe_medians(records: pd.DataFrame, columns) -> pd.DataFrame:
    """Per step (the index), the median over the fixed probe samples of each column; training-batch rows
    are left out. These are the curves the figures draw and the claims checker reads."""
    fixed = records[records["probe_set"] != "train_batch"]
    return fixed.groupby("step")[list(columns)].median()


#: the per-sample columns that the paper's figures and claims read
PROBE_COLUMNS = ("log_fitting_error", "lower", "upper", "U", "L", "G", "log_gradient_norm")


def probe_arrays(records: pd.DataFrame, columns=PROBE_COLUMNS) -> dict:
    """The fixed probe rows as one array per column, an image per row: {column: (n_images, n_records),
    "steps": (n_records,), "ids": (n_images,)} — so every per-image statistic reads E_f, the bounds,
    U, L and G of the same image (training-batch rows left out)."""
    fixed = records[records["probe_set"] != "train_batch"]
    out = {}
    for column in columns:
        wide = fixed.pivot(index="sample_id", columns="step", values=column)
        out[column] = wide.to_numpy(dtype=float)
    out["steps"] = wide.columns.to_numpy(dtype=float)
    out["ids"] = wide.index.to_numpy()
    return out


def published_pairing(records: pd.DataFrame, pair) -> pd.DataFrame:
    """The authors' pairing (READING.md §1.5) per step: log₂ E_f and the same-sample bracket of image
    ``pair[0]``, the bounds of image ``pair[1]`` (``published_lower``/``published_upper``, as their
    main_convergence.py plots them), and whether those bracket the fitting error (``bracketed``)."""
    fixed = records[records["probe_set"] != "train_batch"]
    val = fixed[fixed["sample_id"] == pair[0]].set_index("step")
    test = fixed[fixed["sample_id"] == pair[1]].set_index("step")
    out = val[["log_fitting_error", "lower", "upper"]].copy()
    out["published_lower"], out["published_upper"] = test["lower"], test["upper"]
    out["bracketed"] = (out["published_lower"] <= out["log_fitting_error"]) & (out["log_fitting_error"] <= out["published_upper"])
    return out


#: columns summarised per step and probe set in ``steps.parquet``
AGGREGATED = ("log_fitting_error", "lower", "upper", "log_gradient_norm", "U", "L", "G", "loss")


def step_aggregates(records: pd.DataFrame) -> pd.DataFrame:
    """Per-step aggregates of per-sample records: one row per (step, probe_set) with the number of
    samples, Theorem 3 violations, rank-deficient samples, the training loss, and the median, 25 %
    and 75 % quantiles of every column of :data:`AGGREGATED` (``<column>_median`` …).

    Medians of the log quantities are taken per column; they do not bracket one another the way
    each sample's values do (Theorem 3 is per sample, READING.md §1.5).
    """
    if not len(records):
        return pd.DataFrame()
    grouped = records.groupby(["step", "probe_set"], sort=True)
    out = grouped.agg(n_samples=("bound_holds", "size"), violations=("bound_holds", lambda s: int((~s).sum())),
                      rank_deficient=("rank_deficient", "sum"), train_loss=("train_loss", "first"))
    for column in AGGREGATED:
        q = grouped[column].quantile([0.25, 0.5, 0.75]).unstack()
        out[f"{column}_q25"], out[f"{column}_median"], out[f"{column}_q75"] = q[0.25], q[0.5], q[0.75]
    return out.reset_index()


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


def write_parquet_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``frame`` as one Parquet file, atomically."""
    with atomic_write(Path(path)) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)


def read_parquet_folder(folder: str | os.PathLike) -> pd.DataFrame:
    """All ``*.parquet`` files of a folder (recursively), concatenated; empty frame when none."""
    parts = sorted(Path(folder).rglob("*.parquet")) if Path(folder).is_dir() else []
    frames = [_read_parquet(p) for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: expected a readable Parquet file, got an error ({exc}). Delete it and resume the run (or re-run the reproduction) to recompute it.") from None


@dataclasses.dataclass
class Reproduction:
    """What ``optmech reproduce`` wrote, read back from its directory (records only, no models).

    Attributes:
        run_dir: the directory.
        meta: ``reproduce.json`` (config, versions, per-job timings).
        train: {(model, depth, seed, init): per-sample records of that training run}.
        train_meta: {(model, depth, seed, init): that run's run.json, with its held-out evaluations along
            training under "evals" (a DataFrame read from evals.parquet)}.
        sweep: the depth-sweep rows of every initialisation arm (column ``init``).
        theory: {name: table} of the theory experiments.
    """

    run_dir: Path
    meta: dict
    train: dict
    train_meta: dict
    sweep: pd.DataFrame
    theory: dict


def read_reproduction(run_dir: str | os.PathLike) -> Reproduction:
    """Read a reproduction directory: ``reproduce.json``, ``train/*/``, ``sweep/``, ``theory/*.parquet``."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "reproduce.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir}: expected a reproduction directory with reproduce.json, found none. "
                                "Run `optmech reproduce --out DIR` first.")
    meta = read_json(meta_path)
    train, train_meta = {}, {}
    for sub in sorted((run_dir / "train").glob("*/run.json")) if (run_dir / "train").is_dir() else []:
        info = read_json(sub)
        if info.get("status") != "complete":
            continue
        cfg = info["config"]
        key = (cfg["model"], int(cfg["depth"]), int(cfg["seed"]), cfg.get("init", "pytorch"))
        train[key], train_meta[key] = read_records(sub.parent), info
        evals = sub.parent / "evals.parquet"
        info["evals"] = _read_parquet(evals) if evals.is_file() else pd.DataFrame()
    theory = {p.stem: _read_parquet(p) for p in sorted((run_dir / "theory").glob("*.parquet"))}
    return Reproduction(run_dir=run_dir, meta=meta, train=train, train_meta=train_meta,
                        sweep=read_parquet_folder(run_dir / "sweep"), theory=theory)

