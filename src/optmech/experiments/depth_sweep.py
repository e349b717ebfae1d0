"""Fig. 5: U, L and G against depth at initialisation (no training), for the paper's models a–d.

    from optmech.experiments.depth_sweep import DepthSweepConfig, depth_sweep
    frame = depth_sweep(DepthSweepConfig(depths=list(range(6)), seeds=[0, 1, 2]), "runs/fig5")

For every (model, depth k, initialisation seed) the model is built fresh and measured on the same
fixed held-out probe samples; one Parquet part per (model, k) is written atomically, so an
interrupted sweep resumes where it stopped (finished parts are not recomputed).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import data as datasets
from ..metrics import EXTRAS
from ..models import INIT_SCHEMES, PAPER_MAPPINGS, build_paper, n_params, paper_spec
from ..probe import Probe
from ..records import atomic_write

__all__ = ["DepthSweepConfig", "depth_sweep", "read_depth_sweep"]


class DepthSweepConfig(BaseModel):
    """Depth sweep at initialisation (READING.md §2, Fig. 5: k = 0…10, ≥ 5 seeds, several probes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["a", "b", "c", "d"])
    depths: list[int] = Field(default_factory=lambda: list(range(11)))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    n_probe: int = Field(8, ge=1)
    dataset: str = "mnist5k"
    data_dir: str | None = None
    init: str = "pytorch"
    mapping: str = "reconstruction"
    method: str = "auto"

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        letters = set(PAPER_MAPPINGS["reconstruction"])
        bad = [m for m in v if m not in letters]
        if bad or not v:
            raise ValueError(f"models: expected paper letters from {sorted(letters)}, got {v}")
        return v

    @field_validator("depths")
    @classmethod
    def _depths(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 0:
            raise ValueError(f"depths: expected non-negative integers, got {v}")
        return sorted(set(v))

    @field_validator("init")
    @classmethod
    def _init(cls, v: str) -> str:
        if v not in INIT_SCHEMES:
            raise ValueError(f"unknown initialisation {v!r}; expected one of {list(INIT_SCHEMES)}")
        return v


def depth_sweep(config: DepthSweepConfig, out: str | Path) -> pd.DataFrame:
    """Run (or resume) the sweep into ``out/depth_sweep/`` and return all rows.

    Rows: model, family, skip, depth, seed, n_params, sample_id, init, and every Measurement column.
    """
    folder = Path(out) / "depth_sweep"
    folder.mkdir(parents=True, exist_ok=True)
    heldout = datasets.load(config.dataset, root=config.data_dir, split="test")
    ids = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(7919))[: config.n_probe].sort().values
    x, y = heldout.inputs[ids], heldout.targets[ids]
    for letter in config.models:
        family, skip = paper_spec(letter, config.mapping)
        for depth in config.depths:
            part = folder / f"{letter}-k{depth:02d}-{config.init}.parquet"
            if part.is_file():
                continue  # finished earlier
            frames = []
            for seed in config.seeds:
                model = build_paper(letter, depth=depth, mapping=config.mapping, init=config.init,
                                    input_shape=heldout.input_shape, seed=seed)
                frame = Probe(model, method=config.method, extras=EXTRAS).measure(x, y).to_frame()
                frame.insert(0, "model", letter)
                frame.insert(1, "family", family)
                frame.insert(2, "skip", skip)
                frame.insert(3, "depth", depth)
                frame.insert(4, "seed", seed)
                frame.insert(5, "n_params", n_params(model))
                frame.insert(6, "sample_id", ids.numpy())
                frame.insert(7, "init", config.init)
                frames.append(frame)
            with atomic_write(part) as tmp:
                pq.write_table(pa.Table.from_pandas(pd.concat(frames, ignore_index=True), preserve_index=False), tmp)
    return read_depth_sweep(out, config)


def read_depth_sweep(out: str | Path, config: DepthSweepConfig | None = None) -> pd.DataFrame:
    """All rows of a sweep folder (restricted to ``config``'s models, depths and init when given)."""
    folder = Path(out) / "depth_sweep"
    parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"{folder}: expected depth-sweep Parquet parts, found none. Run depth_sweep first.")
    frame = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
    if config is not None:
        keep = frame["model"].isin(config.models) & frame["depth"].isin(config.depths) & (frame["init"] == config.init)
        keep &= frame["seed"].isin(config.seeds)
        frame = frame[keep].reset_index(drop=True)
    return frame
