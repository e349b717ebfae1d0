"""The configuration of a paper reproduction, loaded from a TOML preset with ``key=value`` overrides.

    config = load_preset("quick", overrides=["seeds=[1, 2]", "train.n_probe=4"])

Presets live in ``optmech/experiments/presets/*.toml``; each starts with the command that runs it
and the time it takes (DESIGN §4.7). A path to any TOML file with the same keys works as well.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..models import INIT_SCHEMES, PAPER_MAPPINGS
from .config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ReproduceConfig", "SweepSettings", "TheorySettings", "ClaimSettings", "available_presets", "load_preset", "PresetError"]

#: TrainConfig fields a preset's [train] table may set (model, depth and seed come from the experiments)
_TRAIN_KEYS = set(TrainConfig.model_fields) - {"model", "depth", "seed", "skip", "dataset", "data_dir", "mapping", "init"}


class PresetError(ValueError):
    """A preset name, file or override is unusable."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SweepSettings(_Frozen):
    """Fig. 5: depth sweep at initialisation, one arm per initialisation scheme (READING.md §2)."""

    models: list[str] = Field(default_factory=lambda: ["a", "b", "c", "d"])
    depths: list[int] = Field(default_factory=lambda: list(range(11)))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    n_probe: int = Field(8, ge=1)
    inits: list[str] = Field(default_factory=lambda: ["pytorch", "he_normal"])

    @field_validator("inits")
    @classmethod
    def _inits(cls, v: list[str]) -> list[str]:
        bad = [i for i in v if i not in INIT_SCHEMES]
        if bad or not v:
            raise ValueError(f"unknown initialisation(s) {bad}; expected a non-empty list from {list(INIT_SCHEMES)}")
        return v


class TheorySettings(_Frozen):
    """Monte Carlo and exact checks of the theory (READING.md §1.7–§1.9, §5)."""

    seed: int = 0
    lemma2_ns: list[int] = Field(default_factory=lambda: [10, 30, 100])
    lemma2_ms: list[int] = Field(default_factory=lambda: [100, 1000, 10000])
    lemma2_trials: int = Field(200, ge=10)
    theorem4_K: int = Field(10, ge=2)
    theorem4_ms: list[int] = Field(default_factory=lambda: [50, 100, 1000, 10000, 100000])
    theorem4_trials: int = Field(200, ge=10)
    z_Ks: list[int] = Field(default_factory=lambda: [2, 5, 10, 100])
    z_ms: list[int] = Field(default_factory=lambda: [10, 22, 50, 100, 1000, 10000, 100000, 1000000])
    theorem2_ts: list[float] = Field(default_factory=lambda: [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001])
    gershgorin_trials: int = Field(500, ge=10)


class ClaimSettings(_Frozen):
    """Pre-registered thresholds of the claims checker (READING.md §2; each is printed in claims.json).

    Windows and iteration counts are in optimiser steps or records as named; with a record every
    ``probe_every`` steps, a window of w records spans w·probe_every iterations."""

    window: int = Field(50, ge=3, description="local Pearson window, in records")
    growing_from: int | None = Field(None, ge=2, description="the authors' variant: windows grow from this record until full (they used 2)")
    smooth: int = Field(25, ge=1, description="moving-median window (records) before locating the onset")
    onset_drop_bits: float = Field(0.5, gt=0, description="onset: first record this far below the first 10 records' median")
    converge_tol_bits: float = Field(0.25, gt=0, description="structural convergence: |G − G_final| stays below this")
    coincide_iters: int = Field(50, ge=0, description="C6.2: |onset − convergence| at most this many iterations")
    r_high: float = Field(0.9, gt=0, le=1, description="a local r counted as 'close to 1'")
    late_fraction: float = Field(500 / 938, gt=0, lt=1, description="'after batch 500' as a fraction of the run (500/938)")
    edge_iters: int = Field(100, ge=1, description="C2.2: the first / last this many iterations (at most a quarter of the run)")
    big_gap_bits: float = Field(2.0, gt=0, description="C5.3: G at least this large counts as U ≫ L")
    near_zero_fraction: float = Field(0.25, gt=0, lt=1, description="C5.1: at the largest depth, at most this fraction of the k = 0 value")
    rank_threshold: float = Field(0.85, gt=0, le=1, description="a trend: Spearman ρ at least this large in the stated direction "
                                  "(0.83 is the one-sided 5 % critical value for 6 depths)")
    min_effect_bits: float = Field(0.25, gt=0, description="smallest change of a log₂ quantity (G, U, L) that counts as an effect")
    min_effect_r: float = Field(0.1, gt=0, description="smallest change of a local Pearson r that counts as an effect")
    min_effect_iters: int = Field(50, ge=1, description="smallest difference of two onsets (iterations) that counts as an effect")
    min_slope_bits: float = Field(0.125, gt=0, description="C7.1: smallest difference of two slopes against k, bits per block")
    min_ratio_bits: float = Field(1.0, gt=0, description="C4.2: log₂ of the early/late ratio of |ΔG| (1 = twice as large)")
    skip_gain_bits: float = Field(1.0, gt=0, description="C5.grad: log₂‖g‖² with skip connections at least this much larger")
    learn_margin: float = Field(0.2, ge=0, lt=1, description="a run learned when its final held-out accuracy ≥ chance + this")
    late_learning_fraction: float = Field(0.4, gt=0, le=1, description="a learned run is at the edge of learning when its "
                                          "held-out accuracy first reached chance + learn_margin after this fraction of its steps")
    exclude_edge_runs: bool = Field(False, description="count a learned run at the edge of learning (learned after "
                                    "late_learning_fraction of its steps) as not measurable; when False, the claims are "
                                    "also evaluated so, and claims.json and the report say which verdicts move")
    degenerate_G_bits: float = Field(0.01, gt=0, description="a run or model is degenerate (A_x ≈ I) when its median G is below this")
    min_depths: int = Field(3, ge=2, description="a depth trend needs at least this many measurable depths")
    null_draws: int = Field(200, ge=0, description="null draws per claim for its false-pass rate")
    null_seed: int = Field(0, description="seed of the null draws (claims.json is reproducible)")
    max_false_pass: float = Field(0.05, gt=0, lt=1, description="a claim holds only when its null false-pass rate is at most this")


class ReproduceConfig(_Frozen):
    """Everything ``optmech reproduce`` runs: training runs for Figs 2–4 and 6–9, the depth sweep of
    Fig. 5 with its initialisation arms, and the theory experiments; then claims and the report."""

    name: str
    description: str = ""
    dataset: str = "mnist5k"
    data_dir: str | None = None
    mapping: str = "reconstruction"
    seeds: list[int] = Field(default_factory=lambda: [1], description="training seeds (one run per model, depth and seed)")
    bounds_models: list[str] = Field(default_factory=lambda: ["a", "b", "c", "d"], description="Figs 2–4")
    bounds_depth: int = Field(1, ge=0)
    depth_models: list[str] = Field(default_factory=lambda: ["a", "b"], description="Figs 6–9")
    depths: list[int] = Field(default_factory=lambda: list(range(6)))
    train_inits: list[str] = Field(default_factory=lambda: ["he_normal", "pytorch"],
                                   description="initialisation arms of the training runs: the first is the main arm (Figs 2–4 "
                                   "and the main verdicts), Figs 6–9 run in every arm")
    train: dict = Field(default_factory=dict, description="TrainConfig fields shared by every training run")
    sweep: SweepSettings = Field(default_factory=SweepSettings)
    theory: TheorySettings = Field(default_factory=TheorySettings)
    claims: ClaimSettings = Field(default_factory=ClaimSettings)

    @field_validator("bounds_models", "depth_models")
    @classmethod
    def _letters(cls, v: list[str]) -> list[str]:
        letters = set(PAPER_MAPPINGS["reconstruction"])
        bad = [m for m in v if m not in letters]
        if bad:
            raise ValueError(f"unknown paper model(s) {bad}; expected letters from {sorted(letters)}")
        return v

    @field_validator("train_inits")
    @classmethod
    def _train_inits(cls, v: list[str]) -> list[str]:
        bad = [i for i in v if i not in INIT_SCHEMES]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"train_inits: expected distinct names from {list(INIT_SCHEMES)}, got {v}")
        return v

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v: dict) -> dict:
        bad = sorted(set(v) - _TRAIN_KEYS)
        if bad:
            raise ValueError(f"[train] does not take {bad}; expected keys from {sorted(_TRAIN_KEYS)}")
        try:  # the values too, before any job starts (a bad device or loss would fail every training job)
            TrainConfig(**v)
        except ValidationError as exc:
            raise ValueError("; ".join(f"train.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        return v

    @property
    def main_init(self) -> str:
        """The main initialisation arm (Figs 2–4 and the main verdicts)."""
        return self.train_inits[0]

    def train_config(self, model: str, depth: int, seed: int, init: str | None = None) -> TrainConfig:
        """The TrainConfig of one training run (validated); ``init`` defaults to the main arm."""
        return TrainConfig(model=model, depth=depth, seed=seed, init=init or self.main_init, dataset=self.dataset,
                           data_dir=self.data_dir, mapping=self.mapping, **self.train)

    def train_runs(self) -> list[tuple[str, int, int, str]]:
        """(model, depth, seed, init) of every training run, each once."""
        runs = {(m, self.bounds_depth, s, self.main_init) for m in self.bounds_models for s in self.seeds}
        runs |= {(m, k, s, i) for m in self.depth_models for k in self.depths for s in self.seeds for i in self.train_inits}
        return sorted(runs)


def _preset_dir():
    return resources.files("optmech.experiments") / "presets"


def available_presets() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def _parse_override(text: str) -> tuple[list[str], object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise PresetError(f"override {text!r}: expected key=value (for example train.n_probe=4 or seeds=[1,2]).")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word such as dataset=fashion-mnist
    return key.strip().split("."), parsed


def load_preset(preset: str | Path, overrides: list[str] | tuple[str, ...] = (), **fields) -> ReproduceConfig:
    """Read a preset by name (``quick``, ``paper``, ``fashion``, ``cifar10``) or TOML path; apply
    ``key=value`` overrides (dotted keys reach tables) and then ``fields``; validate."""
    path = Path(preset)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise PresetError(f"preset: expected a TOML file at {path}, found none.")
        text = path.read_text()
    else:
        resource = _preset_dir() / f"{preset}.toml"
        if not resource.is_file():
            raise PresetError(f"preset: unknown preset {str(preset)!r}; expected one of {available_presets()} or a path to a .toml file.")
        text = resource.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"preset {preset}: expected valid TOML, got a parse error ({exc}).") from None
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise PresetError(f"override {item!r}: {'.'.join(keys[:-1])} is not a table.")
        node[keys[-1]] = value
    data.update({k: v for k, v in fields.items() if v is not None})
    return ReproduceConfig(**data)
