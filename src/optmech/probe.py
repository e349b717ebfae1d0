"""The object a user holds: ``Probe(model, loss=...)`` and ``probe.measure(inputs, targets)``.

Two lines in any training loop::

    probe = optmech.Probe(model, loss="softmax")
    m = probe.measure(x_probe, y_probe)        # Measurement: per-sample tensors of shape (batch,)

Probing runs with eval semantics on the current weights and leaves the model's modes, buffers,
``.grad`` fields, the optimiser and the RNG stream untouched (DESIGN §5).
"""

from __future__ import annotations

import torch
from torch import nn

from .losses import FenchelYoungLoss, get_loss
from .metrics import Measurement, measure_from
from .structure import EngineMethod, structural_matrix
from .structure._context import check_outputs, prepare_inputs, probing, trainable_parameters

__all__ = ["Probe", "ConsistencyError", "gradient_norm_autograd"]


class ConsistencyError(RuntimeError):
    """Raised by ``check=True`` when eᵀAe disagrees with the autograd gradient norm."""


#: rtol of the check=True comparison per dtype of the model (DESIGN §4.2).
CHECK_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def gradient_norm_autograd(
    model: nn.Module, loss: FenchelYoungLoss, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """‖∇_θ d_Ω(q, f_θ(x))‖² per sample by one autograd call each (the oracle). -> (batch,) float64."""
    params = [p for _, p in trainable_parameters(model)]
    out = []
    with torch.enable_grad():
        for b in range(inputs.shape[0]):
            value = loss(model(inputs[b : b + 1]), targets[b : b + 1], reduction="sum")
            grads = torch.autograd.grad(value, params, allow_unused=True)
            out.append(sum(float((g.to(torch.float64) ** 2).sum()) for g in grads if g is not None))
    return torch.tensor(out, dtype=torch.float64, device=inputs.device)


class Probe:
    """Measures the paper's per-sample quantities on a model.

    Args:
        model: any ``nn.Module`` mapping (batch, ...) to logits (batch, classes).
        loss: a loss name (see :func:`optmech.get_loss`) or a ``FenchelYoungLoss``.
        method: engine method for A_x (``"auto"``, ``"jacobian"``, ``"loop"``).
        weights: (α, β, γ) of the structural error S = αG + βU + γL; default (1, 1, 1),
            under which S = 2U (the paper gives no values).
        rank_rtol: λmin ≤ rank_rtol·λmax flags a sample as rank deficient (default C·eps(dtype)).
        chunk_size: passed to :func:`optmech.structural_matrix`.
        check: cross-check ‖g‖² = eᵀAe against autograd on every sample (slower).
        per_layer: also keep each module's share A_x^(l) (``Measurement.per_layer``; the frame gets
            ``layer_trace:<module>`` columns).
        **loss_kwargs: options of the loss (``label_smoothing``, ``alpha``).

    Example:
        >>> probe = Probe(model, loss="softmax")
        >>> m = probe.measure(x, y)
        >>> m.to_frame()[["log_fitting_error", "lower", "upper", "bound_holds"]]
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | FenchelYoungLoss = "softmax",
        *,
        method: str | EngineMethod = "auto",
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        rank_rtol: float | None = None,
        chunk_size: int | None = None,
        check: bool = False,
        per_layer: bool = False,
        **loss_kwargs,
    ) -> None:
        trainable_parameters(model)  # validates the model early
        self.model = model
        self.loss = get_loss(loss, **loss_kwargs)
        self.method = method
        self.weights = tuple(float(w) for w in weights)
        if len(self.weights) != 3 or min(self.weights) <= 0:
            raise ValueError(f"weights: expected three positive numbers (α, β, γ), got {weights!r} instead.")
        self.rank_rtol = rank_rtol
        self.chunk_size = chunk_size
        self.check = check
        self.per_layer = per_layer

    def measure(self, inputs: torch.Tensor, targets: torch.Tensor, *, check: bool | None = None) -> Measurement:
        """Per-sample quantities for a batch.

        Args:
            inputs: (batch, ...) model inputs.
            targets: (batch,) class indices or (batch, classes) target distributions.
            check: override the probe's ``check`` for this call.

        Returns:
            A :class:`~optmech.metrics.Measurement`.

        Raises:
            ConsistencyError: with check, when eᵀAe and autograd disagree beyond tolerance.
        """
        x = prepare_inputs(self.model, inputs)
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__} instead.")
        if targets.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"targets: expected {x.shape[0]} targets to match the inputs' batch, got shape {tuple(targets.shape)} instead."
            )
        targets = targets.to(x.device)
        with probing(self.model), torch.no_grad():
            logits = check_outputs(self.model(x), x.shape[0])
        logits64 = logits.to(torch.float64)
        q = self.loss.targets(targets, logits.shape[1], torch.float64)  # validates targets
        p = self.loss.predict(logits64)
        loss = self.loss(logits64, q, reduction="none")
        result = structural_matrix(
            self.model, x, method=self.method, chunk_size=self.chunk_size, return_method=True, per_layer=self.per_layer
        )
        A, groups, ran = result if self.per_layer else (result[0], None, result[1])
        auto = None
        if self.check if check is None else check:
            with probing(self.model):
                auto = gradient_norm_autograd(self.model, self.loss, x, targets)
        m = measure_from(
            A, p, q, loss,
            simplex=self.loss.simplex, weights=self.weights, rank_rtol=self.rank_rtol,
            gradient_norm_autograd=auto, method=ran, per_layer=groups,
        )
        if auto is not None:
            self._assert_consistent(m, A.dtype)
        return m

    @staticmethod
    def _assert_consistent(m: Measurement, dtype: torch.dtype) -> None:
        rtol = CHECK_RTOL.get(dtype, 1e-3)
        scale = m.lambda_max * m.fitting_error * torch.finfo(dtype).eps * m.A.shape[-1]
        err = (m.gradient_norm_autograd - m.gradient_norm).abs()
        bad = (err > rtol * m.gradient_norm + 10 * scale).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ConsistencyError(
                f"check: eᵀA_x e = {float(m.gradient_norm[i]):.12g} but autograd gives ‖∇θ d‖² = "
                f"{float(m.gradient_norm_autograd[i]):.12g} on sample {i} ({len(bad)} samples differ beyond rtol {rtol:g}). "
                "The structural matrix does not match the model's gradients: report this with the model definition."
            )
