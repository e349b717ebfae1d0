"""``ProbeCallback`` for PyTorch Lightning: the probe on a schedule in ``fit``, and once per ``validate`` / ``test``.

    from optmech.integrations.lightning import ProbeCallback
    trainer = L.Trainer(callbacks=[ProbeCallback(probe_batch=(x_probe, y_probe), every_n_steps=50)])

What it measures and where it goes:

- in ``fit``, after every ``every_n_steps``-th optimiser step (and after the first): the fixed ``probe_batch``
  (``(inputs, targets)``; inputs a tensor, a tuple or a mapping, as :meth:`optmech.Probe.measure` takes), and/or the
  training batch just used (``on_train_batch=True``; ``batch_to_inputs`` turns a batch into ``(inputs, targets)``,
  by default ``batch[0], batch[1]``), under the prefixes ``optmech/probe`` and ``optmech/train_batch``;
- in ``validate`` and ``test``: the first batch of each dataloader (``optmech/val``, ``optmech/test``), at the
  trainer's current global step. Lightning runs these loops under ``torch.inference_mode``; the probe turns it off
  for its own passes.

The summary of each measurement (:func:`.sinks.summary_scalars`: medians and quartiles of U, L, G, log₂ E_f, …)
goes to every logger of the trainer through ``logger.log_metrics``; a ``TensorBoardLogger`` also gets the
histograms of U, L, G and log₂ E_f; ``sinks=`` adds sinks of :mod:`.sinks`. The latest measurement of each prefix
is kept in ``callback.latest``.

Distributed training (DDP): **rank 0 probes**, on its own copy of the model (equal on every rank after each
optimiser step), with the fixed probe batch or its own training shard; the other ranks skip the probe and wait
for nothing (the probe runs no collective operation), so the measurement costs rank 0's time only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..probe import Probe
from ._batch import to_device
from .sinks import Sink, TensorBoardSink, summary_scalars

try:  # the package is `lightning` (2.x); `pytorch_lightning` is its older name
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError("lightning is not installed: `pip install optmech[lightning]` to use optmech.integrations.lightning.") from err

__all__ = ["ProbeCallback"]


def _default_split(batch: Any) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, dict) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"batch_to_inputs: the default expects (inputs, targets, ...) or a mapping with 'labels', got {type(batch).__name__}. "
        "Pass batch_to_inputs=lambda batch: (inputs, targets)."
    )


class ProbeCallback(pl.Callback):
    """The optmech probe inside a Lightning ``Trainer`` (see the module docstring).

    Args:
        probe_batch: ``(inputs, targets)`` measured on the schedule in ``fit`` (None: only the training batch).
        every_n_steps: measure after global steps 1, n, 2n, … of ``fit``.
        on_train_batch: also measure the training batch of those steps.
        on_validation, on_test: measure the first batch of ``validate`` / ``test`` dataloaders.
        batch_to_inputs: a dataloader batch → ``(inputs, targets)``.
        model: the ``nn.Module`` to probe (default: the LightningModule itself; pass its inner network when
            ``forward`` does not map inputs to logits).
        sinks: extra :mod:`.sinks` to write to (the caller closes them).
        **probe_kwargs: passed to :class:`optmech.Probe` (``loss``, ``method``, ``output``, ``extras``, …).
    """

    def __init__(
        self,
        probe_batch: tuple[Any, torch.Tensor] | None = None,
        *,
        every_n_steps: int = 50,
        on_train_batch: bool = False,
        on_validation: bool = True,
        on_test: bool = True,
        batch_to_inputs: Callable[[Any], tuple[Any, torch.Tensor]] = _default_split,
        model: torch.nn.Module | None = None,
        sinks: Sequence[Sink] = (),
        **probe_kwargs,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive integer, got {every_n_steps!r} instead.")
        if probe_batch is None and not on_train_batch and not (on_validation or on_test):
            raise ValueError("probe_batch: expected a batch to probe, or on_train_batch/on_validation/on_test=True; got nothing to measure.")
        if probe_batch is not None and (not isinstance(probe_batch, (tuple, list)) or len(probe_batch) != 2):
            raise ValueError(f"probe_batch: expected (inputs, targets), got {type(probe_batch).__name__} instead.")
        self.probe_batch = probe_batch
        self.every_n_steps = every_n_steps
        self.on_train_batch = on_train_batch
        self.on_validation, self.on_test = on_validation, on_test
        self.batch_to_inputs = batch_to_inputs
        self.model = model
        self.sinks = list(sinks)
        self.probe_kwargs = probe_kwargs
        self._probe: Probe | None = None
        self._last_step = -1
        #: the latest Measurement of each prefix
        self.latest: dict[str, Any] = {}

    # --- the probe and where results go -------------------------------------------------------------------------

    def probe(self, pl_module) -> Probe:
        target = self.model if self.model is not None else pl_module
        if self._probe is None or self._probe.model is not target:
            self._probe = Probe(target, **self.probe_kwargs)
        return self._probe

    def _measure(self, trainer, pl_module, inputs, targets, prefix: str) -> None:
        device = pl_module.device
        targets = targets.to(device)
        m = self.probe(pl_module).measure(to_device(inputs, device), targets)
        step = trainer.global_step
        self.latest[prefix] = m
        scalars = summary_scalars(m, prefix)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            writer = getattr(logger, "experiment", None)
            if type(logger).__name__ == "TensorBoardLogger" and writer is not None:
                TensorBoardSink(writer=writer).log_histograms(step, m, prefix)
        for sink in self.sinks:
            sink.log(step, m, prefix)

    def _due(self, step: int) -> bool:
        return step == 1 or step % self.every_n_steps == 0

    # --- hooks ----------------------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimiser steps done
        if not trainer.is_global_zero or not self._due(step) or self._last_step == step:
            return
        self._last_step = step
        if self.probe_batch is not None:
            self._measure(trainer, pl_module, *self.probe_batch, prefix="optmech/probe")
        if self.on_train_batch:
            self._measure(trainer, pl_module, *self.batch_to_inputs(batch), prefix="optmech/train_batch")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self.on_validation and batch_idx == 0 and trainer.is_global_zero and not trainer.sanity_checking:
            self._measure(trainer, pl_module, *self.batch_to_inputs(batch), prefix=_split("optmech/val", dataloader_idx))

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        if self.on_test and batch_idx == 0 and trainer.is_global_zero:
            self._measure(trainer, pl_module, *self.batch_to_inputs(batch), prefix=_split("optmech/test", dataloader_idx))


def _split(prefix: str, dataloader_idx: int) -> str:
    return prefix if dataloader_idx == 0 else f"{prefix}_{dataloader_idx}"
