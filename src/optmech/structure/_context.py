"""What every engine method shares: the parameter set θ, input checks, and a probing context.

θ is every parameter with ``requires_grad=True``, each tensor once (``named_parameters`` drops
tied duplicates, so a shared weight is one block of θ whose Jacobian is its total derivative).
Probing uses eval semantics (dropout off, BatchNorm on running statistics) so that A_x is a
per-sample quantity; the context restores every module's mode, every buffer and the RNG state.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .signature import Batch, OutputSelectionError


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter with requires_grad, tied tensors listed once."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module, got {type(model).__name__} instead. "
            "Wrap a plain function in an nn.Module whose forward maps (batch, ...) to (batch, classes)."
        )
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    meta = [n for n, p in params if p.is_meta]
    if meta:
        raise ValueError(
            f"model: expected parameters that hold values, got parameters on the meta device ({', '.join(meta[:3])}"
            f"{' …' if len(meta) > 3 else ''}). Materialise the model first (model.to_empty(device='cpu') and load its "
            "weights, or build it outside torch.device('meta'))."
        )
    inference = [n for n, p in params if p.is_inference()]
    if inference:
        raise ValueError(
            f"model: expected parameters usable by autograd, got inference tensors ({', '.join(inference[:3])}"
            f"{' …' if len(inference) > 3 else ''}): the model was built or loaded under torch.inference_mode(). "
            "Build or load it outside inference mode."
        )
    if not params:
        raise ValueError(
            "model: expected at least one parameter with requires_grad=True, got none. "
            "The structural matrix J_x J_xᵀ is taken over trainable parameters; unfreeze some."
        )
    return params


def outside_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that names the first caller outside optmech (the user's line),
    counted from the function that calls this one."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "optmech":
        frame, level = frame.f_back, level + 1
    return level


def layer_of(param_name: str) -> str:
    """The module path owning a parameter ("blocks.0.conv1.weight" -> "blocks.0.conv1"; "(root)" at top level)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else "(root)"


def add_group(groups: dict | None, name: str, rows: slice, part: torch.Tensor, n: int) -> None:
    """groups[name][rows] += part, creating a zero (n, C, C) tensor on first use; no-op without groups."""
    if groups is None:
        return
    if name not in groups:
        groups[name] = torch.zeros(n, *part.shape[1:], dtype=part.dtype, device=part.device)
    groups[name][rows] += part


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def prepare_inputs(model: nn.Module, inputs: object, name: str = "inputs") -> torch.Tensor | Batch:
    """Check a batch of inputs and cast floating inputs to the model's dtype and device.

    A tensor gives a tensor; a tuple or mapping of tensors (:class:`.signature.Batch`) gives a Batch of the same
    structure, every tensor checked and cast (named ``inputs['attention_mask']``, ``inputs[1]``).
    """
    if isinstance(inputs, Batch):
        return inputs
    if isinstance(inputs, (tuple, list, Mapping)):
        return Batch(inputs, name).map(lambda key, t: _prepare_tensor(model, t, f"{name}[{key!r}]"))
    return _prepare_tensor(model, inputs, name)


def _prepare_tensor(model: nn.Module, inputs: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor of shape (batch, ...), or a tuple or mapping of them (the model's positional "
            f"or keyword inputs), got {type(inputs).__name__} instead."
        )
    if inputs.is_inference():  # made under torch.inference_mode (Lightning's validate/test): a normal copy for autograd
        with torch.inference_mode(False):
            inputs = inputs.clone()
    if inputs.is_meta:
        raise ValueError(f"{name}: expected a tensor that holds values, got one on the meta device. Pass real data.")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch of shape (batch, ...), got shape {tuple(inputs.shape)} instead.")
    if inputs.is_floating_point():
        # one reduction first (about 5× cheaper than isfinite on every value): the sum is finite unless
        # some value is NaN/inf or the sum overflowed, and then the per-sample check decides
        if not math.isfinite(inputs.sum().item()):  # (one scalar read: isfinite on a tensor is four more ops)
            finite = torch.isfinite(inputs).flatten(1).all(1) if inputs.dim() > 1 else torch.isfinite(inputs)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                raise ValueError(
                    f"{name}: expected finite values, got NaN or inf in samples {bad[:10]}{'…' if len(bad) > 10 else ''}. "
                    "Remove or repair those samples before probing."
                )
        inputs = inputs.to(model_dtype(model))
    device = next(model.parameters()).device
    return inputs.to(device)


def check_outputs(out: object, batch: int) -> torch.Tensor:
    """The model's output must be logits of shape (batch, classes), finite."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"model output: expected a tensor of logits (batch, classes), got {type(out).__name__} instead. "
            "Pass output=... (a key or attribute name, an index, or a function of the output that returns the logits)."
        )
    if out.dim() != 2 or out.shape[0] != batch:
        raise ValueError(
            f"model output: expected logits of shape ({batch}, classes), got shape {tuple(out.shape)} instead. "
            "Return (or select with output=...) one row of logits per sample, e.g. a sequence model's logits at one position."
        )
    return out


def forward_failure(model: nn.Module, inputs: torch.Tensor, err: BaseException, shown: str | None = None) -> Exception | None:
    """A clear error to raise from ``err`` when the model's own forward fails on ``inputs`` (a wrong width, a wrong
    dtype: the user's mistake, not the engine's), or None when a plain forward runs (the engine's path failed).
    ``shown``: how to describe the inputs (default: their shape and dtype). No logits in the model's output: that
    error itself (it names ``output=``)."""
    try:
        with torch.no_grad():
            model(inputs)
    except OutputSelectionError as no_logits:
        return no_logits
    except Exception as plain:  # noqa: BLE001 - any failure of the user's forward is reported the same way
        first = str(plain).splitlines()[0] if str(plain) else type(plain).__name__
        shown = shown or f"shape {tuple(inputs.shape)} and dtype {inputs.dtype}"
        return ValueError(
            f"inputs: the model's own forward fails on inputs of {shown} "
            f"({type(plain).__name__}: {first}), before the engine ran. Pass inputs of the shape, dtype and device the "
            "model expects, or fix the model's forward."
        )
    return None


def _legacy_tf32_state() -> tuple[str, bool] | None:
    """(float32 matmul precision, cuDNN allow_tf32) through the legacy API, or None when the process
    set precision through the per-backend ``fp32_precision`` API (torch ≥ 2.9) in a way the legacy
    getters refuse to read."""
    try:
        return torch.get_float32_matmul_precision(), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


def _precision_knobs() -> list:
    """The per-backend settings of the newer API that decide TF32 for CUDA matmuls and cuDNN convolutions."""
    return [torch.backends.cuda.matmul, torch.backends.cudnn.conv]


def tf32_enabled() -> bool:
    """Whether float32 CUDA matmuls or cuDNN convolutions may run in TF32 (10-bit mantissa) now."""
    legacy = _legacy_tf32_state()
    if legacy is not None:
        return legacy[0] != "highest" or legacy[1]
    inherited = getattr(torch.backends, "fp32_precision", "none")
    return any(k.fp32_precision == "tf32" or (k.fp32_precision == "none" and inherited == "tf32") for k in _precision_knobs())


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """IEEE float32 for matmuls and cuDNN convolutions for the duration (TF32 off); restored afterwards.

    PyTorch lets cuDNN convolutions use TF32 by default on Ampere and later GPUs: about 1e-3
    relative error per product, enough to move λmin of an ill-conditioned A_x and to fail the
    ``check`` cross-check at float32's 1e-3. The probe's own passes run without it. The settings
    are changed through whichever API the process uses (mixing the legacy ``allow_tf32`` with
    torch ≥ 2.9's ``fp32_precision`` makes torch refuse to read them).
    """
    legacy = _legacy_tf32_state()
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        return
    knobs = _precision_knobs()
    saved = [k.fp32_precision for k in knobs]
    for k in knobs:
        k.fp32_precision = "ieee"
    try:
        yield
    finally:
        for k, value in zip(knobs, saved):
            k.fp32_precision = value


@contextlib.contextmanager
def probing(model: nn.Module) -> Iterator[None]:
    """Eval semantics, autograd on (also inside ``torch.inference_mode``) and IEEE float32 (:func:`full_float32`)
    for the duration; restore modes,
    buffers (values), RNG state and the TF32 settings afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = sorted({b.device.index for b in model.parameters() if b.device.type == "cuda"}) if cuda else []
    # inference_mode(False): the probe may be called inside torch.inference_mode (Lightning's validate and test)
    with torch.random.fork_rng(devices=devices), full_float32(), torch.inference_mode(False):
        try:
            if any(mode for _, mode in modes):
                model.eval()
            yield
        finally:
            for m, mode in modes:
                if m.training != mode:
                    m.training = mode
            with torch.no_grad():
                for b, saved in buffers:
                    if not torch.equal(b, saved):
                        b.copy_(saved)
