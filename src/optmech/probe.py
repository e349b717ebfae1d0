"""The object a user holds: ``Probe(model, loss=...)`` and ``probe.measure(inputs, targets)``.

Two lines in any training loop::

    probe = optmech.Probe(model, loss="softmax")
    m = probe.measure(x_probe, y_probe)        # Measurement: per-sample tensors of shape (batch,)

Probing runs with eval semantics on the current weights and leaves the model's modes, buffers,
``.grad`` fields, the optimiser and the RNG stream untouched (DESIGN §5).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import torch
from torch import nn

from .losses import FenchelYoungLoss, check_logits, get_loss
from .metrics import EXTRAS, Measurement, measure_from
from .structure import (
    EngineMethod,
    EngineOptions,
    ForwardCapture,
    RouteReport,
    check_outputs,
    full_float32,
    model_cache,
    prepare_inputs,
    probing,
    structural_matrix,
    tf32_enabled,
    trainable_parameters,
)
from .structure.head import LowRankHead
from .structure.signature import Batch, OutputSelector, bound, select_logits

log = logging.getLogger("optmech.probe")

#: modules whose train-mode forward differs from eval mode (forward reuse is refused when active)
MODE_DEPENDENT = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)


def _mode_dependent(m: nn.Module) -> bool:
    if not m.training:
        return False
    if isinstance(m, MODE_DEPENDENT):
        return not hasattr(m, "p") or m.p > 0
    if isinstance(m, nn.MultiheadAttention):  # dropout on the attention weights: a float, not a submodule
        return m.dropout > 0
    if isinstance(m, nn.RNNBase):  # dropout between stacked layers
        return m.dropout > 0 and m.num_layers > 1
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):  # running statistics in eval only
        return m.track_running_stats
    return False


def mode_dependent_modules(model: nn.Module) -> list[str]:
    """Names of active modules whose training-mode forward differs from eval: dropout p > 0 (Dropout modules,
    ``nn.MultiheadAttention``'s and stacked RNNs' own), BatchNorm, InstanceNorm with running statistics."""
    return [name or type(m).__name__ for name, m in model.named_modules() if _mode_dependent(m)]

__all__ = ["Probe", "StepCapture", "ConsistencyError", "gradient_norm_autograd", "mode_dependent_modules"]


class ConsistencyError(RuntimeError):
    """Raised by ``check=True`` when eᵀAe disagrees with the autograd gradient norm."""


#: rtol of the check=True comparison per dtype of the model (DESIGN §4.2).
CHECK_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


#: rtol of the check for float32 when the captured training forward may have run in TF32 (the
#: probe's own passes are IEEE; the two sides then differ by TF32's ~1e-3 per product)
CHECK_RTOL_TF32 = 1e-2


def check_tolerance(gradient_norm, lambda_max, fitting_error, n_classes: int, dtype: torch.dtype, rtol: float | None = None):
    """Allowed |‖g‖²_autograd − eᵀAe| of the ``check`` cross-check, per sample (tensors or arrays).

    rtol·‖g‖² (:data:`CHECK_RTOL` by dtype) plus ten times the rounding scale of the two sides:
    - A's entries carry about C·eps·λmax, so eᵀAe carries C·eps·λmax·E_f;
    - autograd forms e = p − q in the model's dtype (the engine's e is float64): ‖δe‖ ≤ √C·eps and
      δ(eᵀAe) ≈ 2eᵀAδe ≤ 2√(‖g‖²·λmax·C)·eps. This term dominates for well-fitted samples
      (E_f ~ 1e-6) of badly conditioned A_x in float32.
    """
    eps = torch.finfo(dtype).eps
    rtol = CHECK_RTOL.get(dtype, 1e-3) if rtol is None else rtol
    scale = lambda_max * fitting_error * eps * n_classes + 2 * abs(gradient_norm * lambda_max * n_classes) ** 0.5 * eps
    return rtol * gradient_norm + 10 * scale


def gradient_norm_autograd(
    model: nn.Module, loss: FenchelYoungLoss, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """‖∇_θ d_Ω(q, f_θ(x))‖² per sample by one autograd call each (the oracle). -> (batch,) float64.

    One forward of the whole batch, then one backward per sample's loss. The batched forward is the
    one the engine differentiates: in float32 a per-sample forward may round differently and flip a
    ReLU or max-pool choice that sits at a tie, which changes the Jacobian itself (both are then
    exact for their own forward). Models whose samples interact (BatchNorm in train mode) are not
    measured this way (the probe runs eval semantics; ``capture`` refuses them).
    """
    params = [p for _, p in trainable_parameters(model)]
    out = []
    with torch.enable_grad():
        values = loss(model(inputs), targets, reduction="none")
        for b in range(inputs.shape[0]):
            grads = torch.autograd.grad(values[b], params, allow_unused=True, retain_graph=b + 1 < inputs.shape[0])
            out.append(sum(float((g.to(torch.float64) ** 2).sum()) for g in grads if g is not None))
    return torch.tensor(out, dtype=torch.float64, device=inputs.device)


class Probe:
    """Measures the paper's per-sample quantities on a model.

    Args:
        model: any ``nn.Module`` mapping a batch to logits (batch, classes), or to an output holding them.
        loss: a loss name (see :func:`optmech.get_loss`) or a ``FenchelYoungLoss``.
        method: engine method for A_x (``"auto"``, ``"gram"``, ``"jacobian"``, ``"loop"``).
        weights: (α, β, γ) of the structural error S = αG + βU + γL; default (1, 1, 1),
            under which S = 2U (the paper gives no values).
        rank_rtol: λmin ≤ rank_rtol·λmax flags a sample as rank deficient (default C·eps(dtype)).
        chunk_size: passed to :func:`optmech.structural_matrix`.
        check: cross-check ‖g‖² = eᵀAe against autograd on every sample (slower).
        per_layer: also keep each module's share A_x^(l) (``Measurement.per_layer``; the frame gets
            ``layer_trace:<module>`` columns).
        options: how the ``gram`` method may run (:class:`optmech.EngineOptions`).
        extras: extension columns to compute besides the paper's: ``"perp"`` (the bracket from A_x restricted
            to 1^⊥, a second eigendecomposition) and/or ``"gic"`` (GIC diagnostics); default none (NaN).
        output: where the logits are in the model's output: by default the output itself, its ``.logits``
            (Hugging Face), its ``"logits"`` key or its first item; else a key or attribute name, an index, or a
            function of the output (:func:`optmech.structure.signature.select_logits`).
        **loss_kwargs: options of the loss (``label_smoothing``, ``alpha``).

    Attributes:
        route: the :class:`optmech.RouteReport` of the latest measurement (which rule took each parameter,
            or why it went to the generic path); None before the first.

    Raises (from ``measure``):
        ValueError: one logit per sample (E_f = 0 by construction), bad inputs or targets (named).

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
        options: EngineOptions | None = None,
        extras: tuple[str, ...] = (),
        output: OutputSelector = None,
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
        self.options = EngineOptions() if options is None else options
        self.extras = tuple(extras)
        unknown = set(self.extras) - set(EXTRAS)
        if unknown:
            raise ValueError(f"extras: expected a subset of {list(EXTRAS)}, got {sorted(unknown)} instead.")
        self.output = output
        #: the route report of the latest measurement (which path each parameter went through)
        self.route = None

    def measure(self, inputs: torch.Tensor | tuple | Mapping, targets: torch.Tensor, *, check: bool | None = None) -> Measurement:
        """Per-sample quantities for a batch.

        Args:
            inputs: (batch, ...) model inputs, or a tuple (positional) or mapping (keyword) of such tensors, e.g. a
                tokenizer's ``{"input_ids": ..., "attention_mask": ...}``; each split along dimension 0.
            targets: (batch,) class indices or (batch, classes) target distributions.
            check: override the probe's ``check`` for this call.

        Returns:
            A :class:`~optmech.metrics.Measurement`.

        Raises:
            ConsistencyError: with check, when eᵀAe and autograd disagree beyond tolerance.
        """
        batch = prepare_inputs(self.model, inputs)
        self._check_targets(batch, targets)
        # the model as a function of one tensor returning logits (a structured batch: of the samples' indices)
        with bound(self.model, batch, self.output, cache=model_cache(self.model)) as x:

            def engine():
                result = structural_matrix(  # A left to the factors of a narrow logits layer where they hold it
                    self.model, x, method=self.method, options=self.options, chunk_size=self.chunk_size,
                    per_layer=self.per_layer, dense=False,
                )
                self.route = result.route
                logits = result.logits
                if logits is None:  # the method that ran had no eval forward over the batch: one more
                    with probing(self.model), torch.no_grad():
                        logits = check_outputs(self.model(x), x.shape[0])
                return logits, result.A, result.per_layer, result.method, result.head

            return self._assemble(x, targets, engine, self.check if check is None else check, eval_semantics=True)

    @staticmethod
    def _check_targets(x: torch.Tensor | Batch, targets: torch.Tensor) -> None:
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__} instead.")
        n = x.size if isinstance(x, Batch) else x.shape[0]
        if targets.shape[:1] != (n,):
            raise ValueError(
                f"targets: expected {n} targets to match the inputs' batch, got shape {tuple(targets.shape)} instead."
            )

    def _assemble(self, x, targets, engine, check: bool, *, eval_semantics: bool, check_rtol: float | None = None) -> Measurement:
        """(logits, A, groups, method, head) from ``engine()``; p, q and the loss from the logits; the Measurement."""
        logits, A, groups, ran, head = engine()
        if logits.shape[1] < 2:
            raise ValueError(
                f"model output: expected logits for at least 2 classes, got shape {tuple(logits.shape)}. With one class "
                "p = q = 1 for every sample, so E_f = 0 and the bounds say nothing. For a binary task return two logits "
                "(e.g. torch.cat([-z, z], 1) for a single score z)."
            )
        targets = targets.to(x.device)
        logits64 = logits.detach().to(torch.float64)
        q = self.loss.targets(targets, logits.shape[1], torch.float64)  # validates targets
        check_logits(logits64)  # finite logits, once (the loss' own call would check them and q again)
        p = self.loss.predict(logits64)
        loss = self.loss.divergence(q, logits64)
        auto = None
        if check:
            with probing(self.model) if eval_semantics else contextlib.nullcontext():
                auto = gradient_norm_autograd(self.model, self.loss, x, targets)
        m = measure_from(
            A, p, q, loss,
            simplex=self.loss.simplex, weights=self.weights, rank_rtol=self.rank_rtol,
            gradient_norm_autograd=auto, method=ran, per_layer=groups, extras=self.extras, head=head,
        )
        if auto is not None:
            self._assert_consistent(m, A.dtype if A is not None else head.core.dtype, check_rtol)
        return m

    def capture(self) -> StepCapture:
        """Reuse a training step's forward: hooks record it, ``measure`` then needs only the backward passes.

        Example::

            with probe.capture() as step:
                logits = model(x)                   # the training forward, in train mode
            m = step.measure(x, y, logits)          # before loss.backward(); the graph is kept
            loss = F.cross_entropy(logits, y); loss.backward(); optimizer.step()

        Only for models whose train-mode forward equals their eval-mode forward: active dropout or
        BatchNorm make the captured forward a different function, and are refused.

        The training forward is reused only when every trainable parameter sits in a layer that the
        captured forward makes fast. Otherwise (``nn.MultiheadAttention``, parameters used directly such
        as a class token or a positional embedding, modules of other types, tied weights) the capture
        would hand those parameters to the generic path, a vmapped backward through the whole network,
        while the standalone call recomputes attention in steps and follows direct uses (it may change
        the forward's graph, the training step's may not be touched): then ``measure`` runs
        :meth:`measure` on a forward of its own (logged once at INFO on ``optmech.probe``), faster on
        such models (docs/engine.md), and the hooks stay off the training forward.
        """
        active = mode_dependent_modules(self.model)
        if active:
            raise ValueError(
                f"capture: expected a model whose train-mode forward equals its eval forward, got active "
                f"dropout/BatchNorm modules {active[:5]} (attention or RNN dropout, InstanceNorm with running statistics "
                f"count too). Call probe.measure(x, y) instead (it runs eval semantics), or capture in eval mode."
            )
        return StepCapture(self)

    @staticmethod
    def _assert_consistent(m: Measurement, dtype: torch.dtype, rtol: float | None = None) -> None:
        rtol = CHECK_RTOL.get(dtype, 1e-3) if rtol is None else rtol
        err = (m.gradient_norm_autograd - m.gradient_norm).abs()
        tol = check_tolerance(m.gradient_norm, m.lambda_max, m.fitting_error, m.eigenvalues.shape[-1], dtype, rtol)
        bad = (err > tol).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ConsistencyError(
                f"check: eᵀA_x e = {float(m.gradient_norm[i]):.12g} but autograd gives ‖∇θ d‖² = "
                f"{float(m.gradient_norm_autograd[i]):.12g} on sample {i} ({len(bad)} samples differ beyond rtol {rtol:g}). "
                "The structural matrix does not match the model's gradients: report this with the model definition."
            )


class StepCapture:
    """Returned by :meth:`Probe.capture`: records one forward, then :meth:`measure` on it."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.forward = ForwardCapture(probe.model, trainable_parameters(probe.model), EngineOptions.training_step())
        # reuse the training forward only when it leaves nothing to the generic path (see Probe.capture)
        self.reuse = not self.forward.unclaimed
        self.tf32 = False

    def __enter__(self) -> StepCapture:
        self.tf32 = tf32_enabled()  # the settings the training forward about to be captured runs under
        if self.reuse:
            self.forward.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.reuse:
            self.forward.__exit__(*exc)

    def measure(self, inputs: torch.Tensor | tuple | Mapping, targets: torch.Tensor, logits: object) -> Measurement:
        """The Measurement of the captured forward (inputs, targets as in :meth:`Probe.measure`)."""
        probe = self.probe
        batch = prepare_inputs(probe.model, inputs)
        n = batch.size if isinstance(batch, Batch) else batch.shape[0]
        logits = check_outputs(select_logits(logits, probe.output), n)
        if logits.grad_fn is None:
            raise ValueError("logits: expected the output of the captured forward with its graph, got a tensor without grad_fn. "
                             "Run the forward inside `with probe.capture()` and without torch.no_grad().")

        probe._check_targets(batch, targets)
        if not self.reuse:
            said = model_cache(probe.model).warned  # said once per model
            if frozenset({"capture: own forward"}) not in said:
                said.add(frozenset({"capture: own forward"}))
                log.info("capture: %s has parameters the training forward's capture leaves to the generic path (%s); "
                         "measuring on a forward of its own (faster)", type(probe.model).__name__, ", ".join(self.forward.unclaimed[:6]))
            return probe.measure(inputs, targets)

        def engine():
            groups = {} if probe.per_layer else None
            factors: dict = {}
            A, routes = self.forward.structural_matrix(logits, x, n_classes=logits.shape[1], groups=groups, keep_graph=True,
                                                       factors=factors, dense=False)
            probe.route = RouteReport("gram", list(routes.values()))
            return logits, A, groups, "gram", LowRankHead.from_factors(factors)

        # the backward passes and the check in IEEE float32; the forward was the training step's, so
        # when it may have run in TF32 (float32 on a GPU) the check allows for that (CHECK_RTOL_TF32)
        tf32_forward = self.tf32 and logits.is_cuda and logits.dtype == torch.float32
        # the model as a function of one tensor for the generic path and the check (a structured batch: its indices)
        with full_float32(), bound(probe.model, batch, probe.output, cache=model_cache(probe.model)) as x:
            return probe._assemble(x, targets, engine, probe.check, eval_semantics=False,
                                   check_rtol=CHECK_RTOL_TF32 if tf32_forward else None)
