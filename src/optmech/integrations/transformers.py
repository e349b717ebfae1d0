"""``ProbeCallback`` for the Hugging Face ``Trainer``: the probe on a fixed batch every n optimiser steps.

    from optmech.integrations.transformers import ProbeCallback
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    callback = ProbeCallback(probe_batch=({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, labels),
                             every_n_steps=50)
    Trainer(model=model, args=args, train_dataset=..., callbacks=[callback]).train()

The model is probed as it is (a ``...ForSequenceClassification`` returns an output with ``.logits``; keyword inputs
are a mapping). Each measurement's summary (:func:`.sinks.summary_scalars`) is appended to ``state.log_history``
(with ``step``), so it is saved with the Trainer's state and shown by ``trainer.state.log_history``; ``sinks=``
writes it to TensorBoard, W&B, MLflow or Parquet as well (:mod:`.sinks`). Only the main process
(``state.is_world_process_zero``) probes, on its own copy of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..probe import Probe
from ._batch import to_device
from .sinks import Sink, summary_scalars

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on what is installed
    raise ImportError("transformers is not installed: `pip install optmech[transformers]` to use optmech.integrations.transformers.") from err

__all__ = ["ProbeCallback"]


class ProbeCallback(TrainerCallback):
    """Measure ``probe_batch = (inputs, targets)`` after optimiser steps 1, n, 2n, … (see the module docstring).

    Args:
        probe_batch: ``(inputs, targets)``; inputs a tensor, a tuple or a mapping of tensors (keyword inputs).
        every_n_steps: the schedule.
        prefix: the tags' prefix.
        sinks: extra :mod:`.sinks` (closed at the end of training).
        **probe_kwargs: passed to :class:`optmech.Probe` (``loss``, ``method``, ``output``, ``extras``, …).
    """

    def __init__(self, probe_batch: tuple[Any, torch.Tensor], *, every_n_steps: int = 50, prefix: str = "optmech/probe",
                 sinks: Sequence[Sink] = (), **probe_kwargs) -> None:
        if not isinstance(probe_batch, (tuple, list)) or len(probe_batch) != 2:
            raise ValueError(f"probe_batch: expected (inputs, targets), got {type(probe_batch).__name__} instead.")
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected a positive integer, got {every_n_steps!r} instead.")
        self.probe_batch = probe_batch
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.sinks = list(sinks)
        self.probe_kwargs = probe_kwargs
        self._probe: Probe | None = None
        #: the latest Measurement
        self.latest = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if model is None or not state.is_world_process_zero or not (step == 1 or step % self.every_n_steps == 0):
            return control
        if self._probe is None or self._probe.model is not model:
            self._probe = Probe(model, **self.probe_kwargs)
        device = next(model.parameters()).device
        inputs, targets = self.probe_batch
        m = self._probe.measure(to_device(inputs, device), targets.to(device))
        self.latest = m
        scalars = summary_scalars(m, self.prefix)
        state.log_history.append({**scalars, "step": step})
        for sink in self.sinks:
            sink.log(step, m, self.prefix)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sink in self.sinks:
            sink.close()
        return control

