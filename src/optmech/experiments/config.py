"""Configs are data (DESIGN §4.7): frozen, validated pydantic models saved with every run."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data import DATASETS
from ..losses import available_losses
from ..models import FAMILIES, INIT_SCHEMES, PAPER_MAPPINGS
from ..structure import available_methods

#: field -> options accepted (looked up when validating, so registries stay the one source of truth)
_NAMED_CHOICES = {
    "mapping": lambda: list(PAPER_MAPPINGS),
    "init": lambda: list(INIT_SCHEMES),
    "dataset": lambda: list(DATASETS),
    "loss": available_losses,
    "method": available_methods,
}
_NAMED_KINDS = {"mapping": "a–d mapping", "init": "initialisation", "dataset": "dataset", "loss": "loss", "method": "engine method"}


class TrainConfig(BaseModel):
    """One training run of the paper's setup (Sec. 5.1) with the probe on a schedule.

    Defaults are the paper's: SGD, lr 0.01, momentum 0.9, batch 64, 1 epoch, softmax
    cross-entropy, PyTorch default initialisation; the probe measures 16 fixed held-out samples
    before every step, on the same sample for every quantity (READING.md §1.5).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("a", description="paper letter a–d (through `mapping`) or a family: mlp, snet, cnn, resnet")
    depth: int = Field(1, ge=0, description="k, the number of repeated blocks")
    skip: bool | None = Field(None, description="skip connections (families only; letters fix it)")
    mapping: str = Field("reconstruction", description="a–d mapping, see optmech.models.PAPER_MAPPINGS")
    init: str = "pytorch"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    dataset: str = "mnist5k"
    data_dir: str | None = None
    loss: str = "softmax"
    alpha: float | None = Field(None, gt=1.0, description="Tsallis α for loss='entmax'")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="train exactly this many optimiser steps, passing over the "
                                 "training set as often as needed (replaces epochs; the paper's one epoch of MNIST is 938)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    eval_every: int = Field(100, ge=1, description="held-out loss and accuracy before every n-th step and after the last")
    eval_samples: int | None = Field(None, ge=1, description="held-out images for the evaluations along training "
                                        "(a fixed subset; all when unset); the final evaluation always uses all")
    channels_last: bool = Field(True, description="train convolutions in channels-last memory format (1.4–1.6x faster "
                                "steps on the CPU; the same values up to rounding)")
    stop_on_divergence: bool = Field(False, description="end the run, recorded as diverged, when the training loss "
                                     "becomes non-finite (instead of raising)")
    seed: int = 1
    dtype: Literal["float32", "float64"] = "float32"
    device: str = Field("cpu", description="torch device of the model, the batches and the probe: cpu, cuda, cuda:1, ...")
    probe_every: int = Field(1, ge=1, description="measure before every n-th step")
    n_probe: int = Field(16, ge=1, description="fixed held-out probe samples, chosen by seed")
    probe_split: Literal["test", "train"] = "test"
    probe_train_batch: bool = Field(False, description="also measure the current training batch")
    published_pair: bool = Field(
        False, description="make the authors' two probe images (held-out #0 and the first later held-out image with "
        "its label, READING.md §1.5) the first two fixed probes, so the as-published pairing can be evaluated")
    method: str = "auto"
    check: bool = Field(False, description="cross-check eᵀAe against autograd on every probe sample")
    check_every: int = Field(1, ge=1, description="with check: cross-check every n-th record (each checked record: every sample)")
    per_layer: bool = Field(False, description="record each module's share tr A_x^(l) as layer_trace:<module> columns")
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    records_per_part: int = Field(20, ge=1, description="records per Parquet part; a checkpoint follows each part")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        letters = set().union(*(m.keys() for m in PAPER_MAPPINGS.values()))
        if v not in FAMILIES and v not in letters:
            raise ValueError(f"unknown model {v!r}; expected a paper letter {sorted(letters)} or a family {list(FAMILIES)}")
        return v

    @field_validator("mapping", "init", "dataset", "loss", "method")
    @classmethod
    def _known_name(cls, v: str, info) -> str:
        options = _NAMED_CHOICES[info.field_name]()
        if v not in options:
            raise ValueError(f"unknown {_NAMED_KINDS[info.field_name]} {v!r}; expected one of {list(options)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            device = torch.device(v)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {v!r}; expected 'cpu', 'cuda' or 'cuda:<index>'")
        return str(device)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(v) <= 0:
            raise ValueError(f"structural-error weights (α, β, γ) must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.model in FAMILIES and self.skip is None:
            object.__setattr__(self, "skip", False)
        if self.model not in FAMILIES and self.skip is not None:
            raise ValueError(f"skip: paper model {self.model!r} fixes skip through the mapping; leave --skip unset or use a family name")
        if self.published_pair and self.probe_split != "test":
            raise ValueError("published_pair: the authors' probe images are held-out images; use probe_split='test'")
        if self.published_pair and self.n_probe < 2:
            raise ValueError(f"n_probe: published_pair needs at least 2 probe samples, got {self.n_probe}")
        if self.steps is not None and self.epochs != 1:
            raise ValueError(f"steps: give either steps ({self.steps}) or epochs ({self.epochs}), not both")
        if self.loss == "entmax" and self.alpha is None:
            raise ValueError("alpha: loss 'entmax' needs alpha > 1 (for example --alpha 1.5)")
        if self.loss != "entmax" and self.alpha is not None:
            raise ValueError(f"alpha: only used by loss 'entmax', got alpha={self.alpha} with loss {self.loss!r}")
        return self

    def loss_kwargs(self) -> dict:
        kw: dict = {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}
        if self.alpha is not None:
            kw["alpha"] = self.alpha
        return kw
