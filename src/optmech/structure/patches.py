"""Layer inputs as per-position feature matrices (patches), in buffers kept between calls.

A Linear layer's input over positions t is (n, K = in_features, S = positions); a convolution
layer's (Conv1d, Conv2d, Conv3d) is its unfolded patches (n, K = c_in·kernel, S = output positions), built as a strided
view of the padded input and copied once (the values of ``F.unfold``; docs/engine.md has its cost on
CPU). The padding is the layer's own: integer, ``"valid"`` or ``"same"`` (the odd one of an even
total on the far side, as torch pads), zeros or the layer's ``padding_mode`` (reflect, replicate,
circular: the input the convolution's weights actually saw). The patches are written into buffers of the
model's workspace (:class:`.cache.Workspace`), kept between calls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import SHARED, Workspace

__all__ = ["layer_patches", "layer_dims", "out_features"]


def _conv_pads(module: nn.Module, k: tuple[int, ...], d: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(before, after) padding per spatial dimension of a convolution (a Conv1d seen as 2-D, height 1).

    ``"same"``: a total of d·(k − 1) per dimension, ⌊total/2⌋ before and the rest after (as torch's
    ``_ConvNd`` computes it); ``"valid"``: none; integers: symmetric.
    """
    if isinstance(module.padding, str):
        totals = [0] * len(k) if module.padding == "valid" else [di * (ki - 1) for ki, di in zip(k, d)]
        return tuple((t // 2, t - t // 2) for t in totals)
    pads = (0, module.padding[0]) if isinstance(module, nn.Conv1d) else module.padding
    return tuple((q, q) for q in pads)


def _conv_geometry(module: nn.Module, a: torch.Tensor):
    """(input as (n, c, *spatial), kernel, dilation, pads ((before, after) per spatial dimension), stride, output
    spatial shape) of a Conv1d (seen as 2-D, height 1), Conv2d or Conv3d."""
    if isinstance(module, nn.Conv1d):
        a = a.unsqueeze(-2)
        k, d, s = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
    else:
        k, d, s = module.kernel_size, module.dilation, module.stride
    p = _conv_pads(module, k, d)
    out = tuple((size + b + e - di * (ki - 1) - 1) // si + 1 for size, (b, e), ki, di, si in zip(a.shape[2:], p, k, d, s))
    return a, k, d, p, s, out


def _conv_patches(module: nn.Module, a: torch.Tensor, ws: Workspace, ones_row: bool = False, owner: object = None) -> torch.Tensor:
    """Input patches (batch, K = c_in·kernel [+ 1], S positions) for Conv1d/Conv2d/Conv3d.

    Built as a strided view of the padded input and copied once: the same values as
    ``F.unfold``. ``ones_row`` appends a row of ones (the bias's "input").
    The result lives in the workspace ``ws`` under ``owner`` (default: the module itself).
    """
    a, k, d, p, s, spatial = _conv_geometry(module, a)
    n, c = a.shape[:2]
    if not any(b or e for b, e in p):
        padded = a
    elif module.padding_mode == "zeros":
        padded = _zero_padded(a, p, ws)
    else:  # what the layer's forward convolves: F.pad with its mode (last dimension first), then no padding
        padded = F.pad(a, tuple(q for pair in reversed(p) for q in pair), mode=module.padding_mode)
    stride = padded.stride()
    view = padded.as_strided(
        (n, c, *k, *spatial),
        (stride[0], stride[1], *(st * di for st, di in zip(stride[2:], d)), *(st * si for st, si in zip(stride[2:], s))),
    )
    K, S = c * math.prod(k), math.prod(spatial)
    out = ws.get(module if owner is None else owner, "patches", (n, K + int(ones_row), S), a.dtype, a.device)
    out[:, :K].view(n, c, *k, *spatial).copy_(view)
    if ones_row:
        out[:, K].fill_(1.0)
    return out


def _zero_padded(a: torch.Tensor, p: tuple[tuple[int, int], ...], ws: Workspace) -> torch.Tensor:
    """``a`` zero-padded by p ((before, after) per spatial dimension) in a buffer kept between calls whose zero
    border is written once.

    Shared by every layer with the same padded shape and padding (the interior, always fully
    overwritten, is then the same region). Saves ``F.pad``'s fresh allocation and fill each call.
    """
    n, c, *sizes = a.shape
    padded = [size + b + e for size, (b, e) in zip(sizes, p)]
    out = ws.get(SHARED, f"padded{p}", (n, c, *padded), a.dtype, a.device, zeroed=True)
    out[(slice(None), slice(None), *(slice(b, b + size) for size, (b, _) in zip(sizes, p)))].copy_(a)
    return out


def layer_dims(module: nn.Module, a: torch.Tensor) -> tuple[int, int]:
    """(K input features per position, S positions) of a fast layer for its input a, without building patches."""
    if isinstance(module, nn.Linear):
        return module.in_features, a[0].numel() // module.in_features
    a, k, _, _, _, spatial = _conv_geometry(module, a)
    return a.shape[1] * math.prod(k), math.prod(spatial)


def layer_patches(module: nn.Module, a: torch.Tensor, ws: Workspace, ones_row: bool = False, owner: object = None) -> torch.Tensor:
    """The layer's per-sample inputs as (n, K features [+ 1], S positions): Linear over all middle dims, Conv patches.

    ``ones_row`` appends a row of ones, so that a bias gradient Σ_s b_s is one more column of the weight GEMM.
    """
    n = a.shape[0]
    if isinstance(module, nn.Linear):
        a = a.reshape(n, -1, module.in_features).transpose(1, 2)
        return torch.cat([a, a.new_ones(n, 1, a.shape[2])], dim=1) if ones_row else a
    return _conv_patches(module, a, ws, ones_row, owner)


def out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels
