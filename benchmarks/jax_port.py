"""A PyTorch model as a pure JAX function ``apply(params, x)`` with the same weights (for neural-tangents).

The model is traced with ``torch.fx`` and its graph is replayed with ``jax.lax``; only the layers of
this project's models are supported (Conv2d, grouped too, Linear, ReLU, MaxPool2d, AdaptiveAvgPool2d(1), Flatten,
Identity, Dropout in eval, and ``+``). Convolutions keep PyTorch's layouts (NCHW inputs, OIHW kernels). A Linear's
weight is stored as JAX's dense layers store it, (in, out), and applied as ``x @ W``: neural-tangents'
STRUCTURED_DERIVATIVES recognises a dense layer only when the parameter itself enters ``dot_general``, so a
transpose inside the function (``x @ W.T`` with the (out, in) matrix, ``linear="torch"``) hides the structure and
sends it down its generic path. Needs jax (see neural_tangents_env.md).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.fx as fx
from torch import nn


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _module(mod: nn.Module, name: str, params: dict, x, linear: str):
    if isinstance(mod, nn.Linear):
        out = x @ params[f"{name}.weight"] if linear == "stored" else x @ params[f"{name}.weight"].T
        return out + params[f"{name}.bias"] if mod.bias is not None else out
    if isinstance(mod, nn.Conv2d):
        if _pair(mod.dilation) != (1, 1) or isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            raise NotImplementedError(f"{name}: only dilation=1, integer zero padding")
        ph, pw = _pair(mod.padding)
        out = jax.lax.conv_general_dilated(x, params[f"{name}.weight"], window_strides=_pair(mod.stride),
                                           padding=[(ph, ph), (pw, pw)], dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                           feature_group_count=mod.groups)  # torch's (O, I/groups, H, W) weights
        return out + params[f"{name}.bias"][None, :, None, None] if mod.bias is not None else out
    if isinstance(mod, nn.ReLU):
        return jnp.maximum(x, 0)
    if isinstance(mod, nn.MaxPool2d):
        (kh, kw), (sh, sw), (ph, pw) = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding)
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, kh, kw), (1, 1, sh, sw), [(0, 0), (0, 0), (ph, ph), (pw, pw)])
    if isinstance(mod, nn.AdaptiveAvgPool2d) and _pair(mod.output_size) == (1, 1):
        return x.mean(axis=(2, 3), keepdims=True)
    if isinstance(mod, nn.Flatten):
        return x.reshape(x.shape[0], -1)
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return x
    raise NotImplementedError(f"{name}: no JAX port for {type(mod).__name__}")


def to_jax(model: nn.Module, dtype=np.float32, linear: str = "stored"):
    """(apply, params): ``apply(params, x)`` = ``model(x)`` in eval mode; params hold the trainable tensors.

    ``linear``: ``"stored"`` (default) keeps each Linear weight as its transpose (in, out), applied as ``x @ W``
    (how JAX models are written, and the form neural-tangents' structured rules recognise); ``"torch"`` keeps
    PyTorch's (out, in) matrix and applies ``x @ W.T``.
    """
    if linear not in ("stored", "torch"):
        raise ValueError(f"linear: expected 'stored' or 'torch', got {linear!r} instead.")
    model = model.eval()
    graph = fx.symbolic_trace(model)
    modules = dict(graph.named_modules())
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            value = p.detach().cpu().numpy().astype(dtype)
            params[n] = jnp.asarray(value.T if linear == "stored" and n in linears else value)

    def apply(params, x):
        env = {}
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "call_module":
                env[node] = _module(modules[node.target], node.target, params, env[node.args[0]], linear)
            elif node.op == "call_function" and node.target in (operator.add, torch.add):
                a, b = (env[v] if isinstance(v, fx.Node) else v for v in node.args[:2])
                env[node] = a + b
            elif node.op == "output":
                return env[node.args[0]]
            else:
                raise NotImplementedError(f"fx node {node.op} {node.target}")

    return apply, params
