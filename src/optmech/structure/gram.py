"""A_x layer by layer: per-layer Gram contractions of inputs and backpropagated logit-Jacobians.

For a layer z = W a + b with per-sample input a and B_c = ∂f_c/∂z (one row per class c), the
layer's parameters contribute to A_x (DESIGN §3; Opacus' "ghost norm" generalised to C outputs):

- Linear, a of shape (d_in,):      A[c, c'] += (‖a‖² + 1)·(B_c · B_c')                 (bias: the +1)
- Linear over positions t (a_t):   A[c, c'] += Σ_{t,t'} (a_t·a_t')(b_{c,t}·b_{c',t'}) + (Σ_t b_{c,t})·(Σ_t b_{c',t})
- Conv (unfolded patches a_s):     A[c, c'] += Σ_{s,s'} (a_s·a_s')(b_{c,s}·b_{c',s'}) + bias term
  (grouped or depthwise: the same per group, summed; :mod:`.grouped`)
- Embedding (token ids):           A[c, c'] += Σ_{t,t'} [tok_t = tok_t'](b_{c,t}·b_{c',t'})
- BatchNorm (running statistics), LayerNorm, GroupNorm, z = x̂ ⊙ γ + β:
                                   A[c, c'] += ⟨Σ_pos b_c ⊙ x̂, Σ_pos b_c' ⊙ x̂⟩ + ⟨Σ_pos b_c, Σ_pos b_c'⟩

Each position-summed term is computed either in "ghost" form (the S×S Gram of the patches) or
by materialising the per-sample, per-class weight gradient G_c = Σ_s b_{c,s} a_sᵀ and taking
⟨G_c, G_c'⟩, whichever the cost model (:func:`.contract.contraction_costs`) says is cheaper for that layer.
A materialised layer with thin patches (K ≤ 2·d_out) contracts each b_c as its backward pass
delivers it; the others copy the b_c into one buffer and contract all classes in one batched GEMM,
building their patches only then, in a buffer shared by the layers of the same shape. On the CPU, a
Conv2d whose output feeds only [ReLU →] MaxPool2d is contracted at the pool's output instead, over
the positions the pool selected (:mod:`.pooled`): its backward passes stop there. In the
standalone call on the CPU, a convolution whose output feeds only an ``nn.ReLU`` (or only a sum
that feeds only one, as in a residual block) gets b_c from that ReLU's backward written straight
into the layer's buffer (:mod:`.relu_tap`), with no fresh tensor and no copy.

All B_c come from one forward with hooks and C backward passes of Σ_b f_c(x_b) (samples are
independent under eval semantics, so the summed backward gives every per-sample row), or one
vmapped backward of the C cotangents where that is faster: no convolution backward on the way
and small layer outputs (:func:`_one_pass`). On the CPU
the standalone call hands the model each Conv2d output in channels-last (the layers after keep
that layout, and oneDNN's backward kernels are faster in it); a forward that cannot take it (a
``.view`` of a convolution's output) is rerun in its own layout, from then on. Parameters
the fast path does not know — other module types, tied or reused weights, weights used outside
their module — are handed to the ``torch.func`` path restricted to those parameters; the two
contributions are summed. Never an inexact answer.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ._class_sink import ClassSink
from ._context import add_group, check_outputs
from .contract import contraction_costs, ghost_gram, materialised_gram
from .grouped import GroupedConvGram
from .jacobian import structural_matrix_jacobian
from .patches import SHARED, layer_dims, layer_patches, out_features, release_workspace, workspace
from .pooled import PooledConvGram, pooled_cost, pooled_output
from .relu_tap import ReluTap, tapped_relu

__all__ = ["structural_matrix_gram", "plan_layers", "LayerPlan", "ForwardCapture", "release_workspace"]

log = logging.getLogger("optmech.structure")

_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclasses.dataclass
class LayerPlan:
    """How one layer's parameters are handled: ``ghost``, ``materialise``, or ``func`` (fallback)."""

    name: str
    module: nn.Module
    params: list[str]
    strategy: str = "pending"


def _is_fast_layer(module: nn.Module) -> bool:
    if type(module) is nn.Embedding:  # max_norm renormalises in place, scale_grad_by_freq couples samples
        return module.max_norm is None and not module.scale_grad_by_freq
    if type(module) in _NORM_TYPES:  # elementwise affine z = x̂·γ + β; BatchNorm only on running statistics
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.running_mean is not None and module.running_var is not None
        return True
    if type(module) not in _FAST_TYPES:  # exact types only: subclasses may change forward
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):  # grouped ones too (:mod:`.grouped`)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
    return True


@dataclasses.dataclass
class GraphUses:
    """How many edges of the logits' autograd graph consume each leaf tensor and each node (by id).

    ``nodes`` keeps every visited node alive while this object lives: torch (2.11 at least) makes a
    Python wrapper per access and frees it after, so the id of a freed node could come back as
    another node's (the walk would skip it as seen, and its parameters' uses would go uncounted).
    """

    leaves: dict[int, int]
    consumers: dict[int, int]
    nodes: dict[int, object]


def _graph_uses(output: torch.Tensor) -> GraphUses:
    """Walk the autograd graph of ``output`` once, counting the consumers of each leaf and node."""
    leaves: dict[int, int] = {}
    consumers: dict[int, int] = {}
    seen: dict[int, object] = {}  # id -> the node itself, so that no id is reused during the walk
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)  # AccumulateGrad nodes hold their leaf
            if var is not None:
                leaves[id(var)] = leaves.get(id(var), 0) + 1
            else:
                consumers[id(nxt)] = consumers.get(id(nxt), 0) + 1  # nxt stays alive on the stack, then in seen
                stack.append(nxt)
    return GraphUses(leaves, consumers, seen)


def _backward_runs_convolution(out: torch.Tensor, zs: list[torch.Tensor], graph: GraphUses) -> bool:
    """Whether the backward passes from ``out`` to ``zs`` run a convolution's backward.

    autograd runs a node when a path leads from it to one of the targets (the zs' nodes), so the
    passes stop at the first layers' outputs: a network whose only convolution comes first, or is
    contracted at its pool's output (SNet), runs no convolution backward. ``graph`` (the logits'
    :func:`_graph_uses`) keeps every node alive, so that node ids stay unique during the walk.
    """
    targets = {id(z.grad_fn) for z in zs if z.grad_fn is not None}
    reaches: dict[int, bool] = {}  # node id -> a target lies at or below it
    stack = [(out.grad_fn, False)] if out.grad_fn is not None else []
    while stack:
        fn, expanded = stack.pop()
        if not expanded:
            if id(fn) in reaches:
                continue
            reaches[id(fn)] = False  # provisional: the graph is acyclic
            stack.append((fn, True))
            stack.extend((nxt, False) for nxt, _ in fn.next_functions if nxt is not None and id(nxt) not in reaches)
            continue
        runs = any(nxt is not None and reaches.get(id(nxt), False) for nxt, _ in fn.next_functions)
        if runs and "Convolution" in type(fn).__name__:
            return True
        reaches[id(fn)] = runs or id(fn) in targets
    return False


def plan_layers(model: nn.Module, named_params: list[tuple[str, torch.Tensor]]) -> tuple[list[LayerPlan], list[str]]:
    """Candidate fast layers (all of whose trainable parameters are in θ) and the remaining names."""
    wanted = {id(p): n for n, p in named_params}
    plans = []
    claimed: set[str] = set()
    for mod_name, module in model.named_modules():
        if not _is_fast_layer(module):
            continue
        own = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        if not own or not all(id(p) in wanted for p in own):
            continue  # frozen weight or bias: let the generic path deal with the partial layer
        names = [wanted[id(p)] for p in own]
        if any(n in claimed for n in names):
            continue  # the same parameter in two modules: tied, leave to the generic path
        claimed.update(names)
        plans.append(LayerPlan(mod_name, module, names))
    rest = [n for n, _ in named_params if n not in claimed]
    return plans, rest


#: materialised layers whose patches have at most this many rows per output channel contract each class at once
_IMMEDIATE_RATIO = 2

#: contract Conv2d → [ReLU] → MaxPool2d chains at the pool's output (:mod:`.pooled`); tests switch it off
_FOLD_POOLS = True

#: the standalone ``gram`` call hands the model its Conv2d outputs in channels-last on the CPU, for these dtypes
_CHANNELS_LAST = True
_CHANNELS_LAST_DTYPES = (torch.float32, torch.float64)

#: the standalone ``gram`` call on the CPU writes a conv's ReLU backward straight into the layer's buffer (:mod:`.relu_tap`)
_RELU_TAPS = True

#: on the CPU, C classes share one backward pass only while one class's ∂f/∂z of all layers is at most this many bytes
_PASS_BYTES = 4 * 2**20


def _is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last and not also contiguous (one channel or position makes both true)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _to_channels_last(z: torch.Tensor) -> bool:
    """Whether to hand the model a Conv2d output z in channels-last: a float32/float64 CPU z in another layout.

    oneDNN's CPU convolutions run their input-gradient (backward) kernels faster in channels-last
    than on NCHW tensors with few channels (on the paper's ResNet class, 0.6× the time), and a
    convolution keeps the layout of its input, so one conversion after the first convolution
    carries the rest of the network (benchmarks/README.md). The values are the same; sums may
    round differently. Not on GPUs, where cuDNN's choices differ; not in the training-step capture,
    which must not change what the training step computes.
    """
    return z.dim() == 4 and z.dtype in _CHANNELS_LAST_DTYPES and z.device.type == "cpu" and z.shape[1] > 1 and not _is_channels_last(z)


def _tappable_conv(module: nn.Module) -> bool:
    """A convolution whose sink a ReLU tap may write into: ungrouped (a grouped one has its own sink, :mod:`.grouped`)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


def _tappable_layout(z: torch.Tensor) -> bool:
    """z is laid out so that a kept buffer of C such tensors can be built: channels-last 4-D, or contiguous."""
    return _is_channels_last(z) or z.is_contiguous()


def _kept_per_class(owner: nn.Module, role: str, z: torch.Tensor, dtype: torch.dtype, classes: int) -> torch.Tensor:
    """A kept buffer (classes, *z.shape) whose every slot [c] has z's order of dimensions in memory.

    z must satisfy :func:`_tappable_layout`. For channels-last z (n, d, H, W) the memory holds (C, n, H, W, d).
    """
    if _is_channels_last(z):
        n, d, h, w = z.shape
        return workspace(owner, role, (classes, n, h, w, d), dtype, z.device).movedim(-1, 2)
    return workspace(owner, role, (classes, *z.shape), dtype, z.device)


class _LayerGram(ClassSink):
    """Accumulates one layer's contribution class by class: ``add(b_c)`` for c = 0…C−1, then ``result()``.

    b_c = ∂f_c/∂z has the layer output's shape (n, *z.shape[1:]), seen as (n, d_out, S).

    - ``materialise``: G_c = Σ_s b_{c,s} âᵀ_s with â the patches (n, K, S) plus a row of ones when
      there is a bias (its gradient Σ_s b_{c,s} is then one more row of the same GEMM); then
      A = ⟨G_c, G_c'⟩. With thin patches (K + 1 ≤ 2·d_out) each b_c is contracted as it arrives,
      G_cᵀ = â b_cᵀ (n, K+1, d_out), never copied (the â·bᵀ orientation is 1–2× faster on CPU than
      b·âᵀ for these shapes); otherwise the b_c are buffered like ``ghost`` and contracted in one
      batched GEMM, with the patches built only then.
    - ``ghost``: the b_c are copied into one (n, C·d_out, S) buffer so that the contraction is one
      batched GEMM (about 4× faster on CPU than C thin ones): A = ⟨b_c, b_c' Γ⟩, Γ = aᵀa (S×S), or
      (‖a‖²)·b_c·b_c' for a vector Linear (S = 1); plus the bias term ⟨Σ_s b_c, Σ_s b_c'⟩.
    """

    def __init__(
        self, plan: LayerPlan, a: torch.Tensor, n_classes: int, strategy: str | None = None, tap_z: torch.Tensor | None = None
    ) -> None:
        self.module = plan.module
        n = a.shape[0]
        K, S = layer_dims(self.module, a)
        self.n_classes, self.d_out, self.S = n_classes, out_features(self.module), S
        self.bias = self.module.bias is not None
        costs = contraction_costs(n, n_classes, S, K, self.d_out, self.bias)
        plan.strategy = self.strategy = strategy or min(costs, key=costs.get)
        materialise = self.strategy == "materialise"
        self.input, self.ones_row = a, materialise and self.bias
        rows = K + int(self.ones_row)
        # materialise: contract each b_c as it arrives when the patches are thin (re-reading them C times
        # costs less than copying the b_c), else buffer the b_c and contract them in one GEMM
        self.immediate = materialise and rows <= _IMMEDIATE_RATIO * self.d_out
        # (n, K[+1], S): now if every class needs them, else when result() contracts (shared buffer)
        self.a = layer_patches(self.module, a, self.ones_row) if self.immediate or S == 1 else None
        # a ReLU tap writes b_c into slot c of a class-major buffer laid out like z (see .relu_tap; taps
        # are made only on z of a tappable layout)
        self.tapped = tap_z is not None and materialise and not self.immediate and tap_z.dtype == a.dtype
        if self.immediate:
            shape = (n_classes, n, rows, self.d_out)  # G_cᵀ per class, contiguous per class
            self.buffer = workspace(self.module, "weight-grads", shape, a.dtype, a.device)
        elif self.tapped:
            self.buffer = _kept_per_class(self.module, "dfdz-classes", tap_z, a.dtype, n_classes)  # (C, *z.shape)
        elif not (self.strategy == "ghost" and S == 1):
            self.buffer = workspace(self.module, "dfdz", (n, n_classes, self.d_out, S), a.dtype, a.device)
        self.vectors: list[torch.Tensor] = []  # ghost with S = 1: the b_c themselves, stacked once in result()
        self.class_major: torch.Tensor | None = None  # ghost with S = 1, all classes at once: (C, n, d_out)
        self.count = 0

    def _per_position(self, b: torch.Tensor) -> torch.Tensor:
        """b_c as (n, S, d_out) (a view)."""
        n = b.shape[0]
        if isinstance(self.module, nn.Linear):
            return b.reshape(n, -1, self.d_out)
        return b.reshape(n, self.d_out, -1).transpose(1, 2)

    def slot(self) -> torch.Tensor:
        """Where b_c of the current class goes (a tapped layer): z's shape and strides."""
        return self.buffer[self.count]

    def add(self, b: torch.Tensor) -> None:
        if self.tapped:
            slot = self.slot()
            if not (b.data_ptr() == slot.data_ptr() and b.stride() == slot.stride()):
                slot.copy_(b)  # the tap did not run (or autograd handed back a copy): b is still exact
        elif self.immediate:
            torch.bmm(self.a, self._per_position(b), out=self.buffer[self.count])
        elif self.strategy == "ghost" and self.S == 1:
            self.vectors.append(b.reshape(b.shape[0], self.d_out))
        else:
            self.buffer[:, self.count] = self._per_position(b).transpose(1, 2)  # (n, d_out, S)
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """A vector Linear keeps bs itself (its Gram reads it as (n, C, d_out), a strided view: no stacking);
        a buffered layer takes it in one copy; the others (per-class contractions, taps) class by class."""
        if self.immediate or self.tapped:
            return False
        C, n = bs.shape[:2]
        if self.strategy == "ghost" and self.S == 1:
            self.class_major = bs.reshape(C, n, self.d_out)
        elif isinstance(self.module, nn.Linear):  # (C, n, S, d_out) -> (n, C, d_out, S)
            self.buffer.copy_(bs.reshape(C, n, self.S, self.d_out).permute(1, 0, 3, 2))
        else:  # (C, n, d_out, S) -> (n, C, d_out, S)
            self.buffer.copy_(bs.reshape(C, n, self.d_out, self.S).transpose(0, 1))
        return True

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        if self.immediate:
            C, n = self.buffer.shape[:2]
            F_ = self.buffer.permute(1, 0, 2, 3).reshape(n, C, -1)  # (n, C, (K+1)·d_out)
            return F_ @ F_.transpose(1, 2)
        a = self.a if self.a is not None else layer_patches(self.module, self.input, self.ones_row, owner=SHARED)
        if self.tapped:
            return self._tapped_result(a)
        if self.strategy == "materialise":
            return materialised_gram(self.buffer, a)
        if self.strategy == "ghost" and self.S == 1:  # (‖a‖² + 1)·B Bᵀ, the +1 for the bias
            F_ = self.class_major.transpose(0, 1) if self.class_major is not None else torch.stack(self.vectors, 1)  # (n, C, d_out)
            scale = (a[..., 0] ** 2).sum(-1) + float(self.bias)
            return scale[:, None, None] * (F_ @ F_.transpose(1, 2))
        out = ghost_gram(self.buffer, a.transpose(1, 2) @ a)  # Γ = (a_s·a_t), (n, S, S)
        if self.bias:
            bs = self.buffer.sum(3)  # (n, C, d_out)
            out = out + bs @ bs.transpose(1, 2)
        return out

    def _tapped_result(self, a: torch.Tensor) -> torch.Tensor:
        """The materialised contraction from the class-major buffer (C, *z.shape) the taps wrote.

        Channels-last z: the buffer is (C, n, S, d) in memory; relaid out once as (n, S, C·d) (a
        buffer shared by layers of that shape), the weight gradients of all classes are one GEMM
        â·[b_0 … b_C−1] → (n, K[+1], C·d) with no transposed operand (for a5's 28×28 layers 1.4–1.6×
        the throughput of the b·âᵀ product below, timed alone), reordered to (n, C, (K+1)·d) for the Gram.
        Contiguous z: relaid out as (n, C, d, S) and contracted as the untapped buffer.
        """
        C, n, d, S = self.buffer.shape[0], self.buffer.shape[1], self.d_out, self.S
        if not _is_channels_last(self.buffer[0]):
            by_sample = workspace(SHARED, "dfdz-samples", (n, C, d, S), a.dtype, a.device)
            by_sample.copy_(self.buffer.reshape(C, n, d, S).transpose(0, 1))
            return materialised_gram(by_sample, a)
        per_position = workspace(SHARED, "dfdz-positions", (n, S, C, d), a.dtype, a.device)
        per_position.copy_(self.buffer.movedim(2, -1).reshape(C, n, S, d).permute(1, 2, 0, 3))
        Gt = torch.bmm(a, per_position.view(n, S, C * d))  # (n, K[+1], C·d): the G_cᵀ side by side
        F_ = Gt.view(n, -1, C, d).transpose(1, 2).reshape(n, C, -1)  # (n, C, (K+1)·d)
        return F_ @ F_.transpose(1, 2)


class _NormGram(ClassSink):
    """One normalisation layer's contribution (BatchNorm on running statistics, LayerNorm, GroupNorm).

    z = x̂ ⊙ γ + β elementwise, with x̂ the normalised input (a function of the input alone, per
    sample: running statistics, or statistics over the sample's own features). So
    ∂f_c/∂γ = Σ_positions b_c ⊙ x̂ and ∂f_c/∂β = Σ_positions b_c, each class contracted as it arrives
    into G (C, n, |γ| + |β|), and A[c, c'] = ⟨G_c, G_c'⟩. BatchNorm/GroupNorm: γ per channel (dim 1),
    positions = the spatial dims; LayerNorm: γ over the normalised trailing dims, positions = the rest.
    """

    strategy = "elementwise"

    def __init__(self, plan: LayerPlan, a: torch.Tensor, n_classes: int) -> None:
        plan.strategy = self.strategy
        m = self.module = plan.module
        if isinstance(m, nn.LayerNorm):
            self.xhat = F.layer_norm(a, m.normalized_shape, None, None, m.eps)
            self.reduce = tuple(range(1, a.dim() - len(m.normalized_shape)))  # leading positions
        else:
            if isinstance(m, nn.GroupNorm):
                self.xhat = F.group_norm(a, m.num_groups, None, None, m.eps)
            else:
                self.xhat = F.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
            self.reduce = tuple(range(2, a.dim()))  # spatial positions
        self.has = (m.weight is not None, m.bias is not None)
        size = m.weight.numel() if m.weight is not None else m.bias.numel()
        self.buffer = torch.empty(n_classes, a.shape[0], size * sum(self.has), dtype=a.dtype, device=a.device)
        self.n_classes, self.count = n_classes, 0

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return (t.sum(self.reduce) if self.reduce else t).reshape(t.shape[0], -1)

    def add(self, b: torch.Tensor) -> None:
        parts = ([self._sum(b * self.xhat)] if self.has[0] else []) + ([self._sum(b)] if self.has[1] else [])
        torch.cat(parts, 1, out=self.buffer[self.count])
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """The same sums as :meth:`add`, with the class dimension in front."""
        C, n = bs.shape[:2]
        reduce = tuple(r + 1 for r in self.reduce)

        def summed(t: torch.Tensor) -> torch.Tensor:
            return (t.sum(reduce) if reduce else t).reshape(C, n, -1)

        parts = ([summed(bs * self.xhat)] if self.has[0] else []) + ([summed(bs)] if self.has[1] else [])
        torch.cat(parts, 2, out=self.buffer)
        return True

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        F_ = self.buffer.transpose(0, 1)  # (n, C, |γ| + |β|)
        return F_ @ F_.transpose(1, 2)


class _EmbeddingGram(ClassSink):
    """An Embedding's contribution: a Linear over token positions whose inputs are one-hot vectors.

    ∂f_c/∂E = Σ_t e_{tok_t} b_{c,t}ᵀ, so A[c, c'] = Σ_{t,t'} [tok_t = tok_t'] (b_{c,t}·b_{c',t'}): the
    ghost form with Γ the token-equality matrix (positions holding ``padding_idx`` get no gradient
    and are left out). The (vocabulary × dim) gradient is never formed.
    """

    strategy = "ghost"

    def __init__(self, plan: LayerPlan, tokens: torch.Tensor, n_classes: int) -> None:
        plan.strategy = self.strategy
        m = self.module = plan.module
        n = tokens.shape[0]
        tok = tokens.reshape(n, -1)
        same = tok[:, :, None] == tok[:, None, :]
        if m.padding_idx is not None:
            keep = tok != m.padding_idx
            same &= keep[:, :, None] & keep[:, None, :]
        self.gamma = same.to(m.weight.dtype)  # (n, L, L)
        self.buffer = workspace(m, "dfdz", (n, n_classes, m.embedding_dim, tok.shape[1]), m.weight.dtype, m.weight.device)
        self.n_classes, self.count = n_classes, 0

    def add(self, b: torch.Tensor) -> None:
        n = b.shape[0]
        self.buffer[:, self.count] = b.reshape(n, -1, self.buffer.shape[2]).transpose(1, 2)  # (n, dim, L)
        self.count += 1

    def _take_all(self, bs: torch.Tensor) -> bool:
        """bs (C, n, *tokens.shape[1:], dim) in one copy into the buffer (n, C, dim, L)."""
        C, n = bs.shape[:2]
        self.buffer.copy_(bs.reshape(C, n, -1, self.buffer.shape[2]).permute(1, 0, 3, 2))
        return True

    def result(self) -> torch.Tensor:
        assert self.count == self.n_classes, "every class must be added once"
        return ghost_gram(self.buffer, self.gamma)


def _sink(plan: LayerPlan, a: torch.Tensor, n_classes: int, tap_z: torch.Tensor | None = None):
    """The accumulator for one fast layer's contribution; ``tap_z``: its output z, when a ReLU tap may write b_c."""
    if isinstance(plan.module, nn.Embedding):
        return _EmbeddingGram(plan, a, n_classes)
    if isinstance(plan.module, _NORM_TYPES):
        return _NormGram(plan, a, n_classes)
    if getattr(plan.module, "groups", 1) > 1:
        return GroupedConvGram(plan, a, n_classes)
    return _LayerGram(plan, a, n_classes, tap_z=tap_z)


def _layer_contribution(plan: LayerPlan, a: torch.Tensor, Bm: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
    """A contribution (batch, C, C) of one layer from its input a and Bm = ∂f/∂z of shape (batch, C, *z.shape[1:]).

    ``strategy`` forces ``"ghost"`` or ``"materialise"`` (tests); by default the cheaper one is used.
    """
    acc = _LayerGram(plan, a, Bm.shape[1], strategy)
    for c in range(Bm.shape[1]):
        acc.add(Bm[:, c])
    return acc.result()


def _one_pass(out: torch.Tensor, zs: list[torch.Tensor], fast: list[LayerPlan], sinks: list, graph: GraphUses) -> bool:
    """Whether :func:`_stream_logit_jacobians` runs one backward pass for all C classes, or C passes.

    All C at once (one vmapped backward) saves C − 1 walks of the graph, i.e. autograd's and the
    kernels' fixed cost per node, which dominates on small layers; one at a time keeps each pass's
    tensors C× smaller. Measured on the 2-core CPU, in-process against each other (benchmarks/README.md):

    - a backward that runs a convolution's backward: one class per pass (the vmapped convolution
      backward works on a C× larger batch and took 1.2–1.7× as long on the paper's CNNs);
    - a ReLU tap writing into a layer's buffer (:mod:`.relu_tap`): one class per pass (slot c per pass);
    - otherwise all C at once while one class's ∂f/∂z over all layers is at most ``_PASS_BYTES``
      (4 MiB): SNet (the convolution contracted at its pool's output) 0.75–0.88× the time of one class
      per pass at batch 64–256 (0.4–1.6 MB per class), CNet k = 1 0.90× at batch 64 and 128 (1.6 and
      3.2 MB), the MLPs 0.66–0.73× at batch 64; above it, fresh C-fold tensors cost more than the walks
      save (CNet k = 1 at batch 256, 6.4 MB: 1.20×; an MLP of width 1024 at batch 2048, 8.5 MB: 1.14×).

    On a GPU (no page faults, launch-bound) as measured there in the sixth session: all C at once
    unless the model has a convolution layer.
    """
    if out.device.type != "cpu":
        return not any(isinstance(p.module, (nn.Conv1d, nn.Conv2d)) for p in fast)
    if any(getattr(s, "tapped", False) for s in sinks):
        return False
    per_class = sum(z.numel() * z.element_size() for z in zs)
    return per_class <= _PASS_BYTES and not _backward_runs_convolution(out, zs, graph)


def _stream_logit_jacobians(
    out: torch.Tensor, zs: list[torch.Tensor], n_classes: int, sinks: list, batched: bool, keep_graph: bool = False
) -> None:
    """Feed b_c = ∂f_c/∂z (shape (n, *z.shape[1:])) of every layer to ``sinks[i].add`` for c = 0…C−1.

    ``batched``: one backward of the C one-hot cotangents at once (``is_grads_batched``, a vmap over
    the cotangents), whose (C, n, ...) result goes to ``sink.add_classes`` (no
    per-class slicing and restacking: mlp256 0.81×, SNet 0.95× the per-class hand-over, in-process);
    otherwise C backward passes, each batched over the samples. See
    :func:`_one_pass` for the choice. The batched form falls back to the C passes for graphs whose
    backward cannot be vmapped (exact either way).
    """
    n = out.shape[0]
    if batched:
        eye = torch.eye(n_classes, dtype=out.dtype, device=out.device).unsqueeze(1).expand(n_classes, n, n_classes)
        try:
            # (the graph is kept: a node without a batching rule may raise after others have run)
            grads = torch.autograd.grad(out, zs, grad_outputs=eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            grads = None  # not vmappable: the loop below is exact too
        if grads is not None:
            for sink, g, z in zip(sinks, grads, zs):
                sink.add_classes(torch.zeros(n_classes, *z.shape, dtype=z.dtype, device=z.device) if g is None else g)
            return
    for c in range(n_classes):
        # (a one-hot grad_outputs tensor instead of the sum raised the peak memory by ~40 MB on SNet)
        last = not keep_graph and c == n_classes - 1
        grads = torch.autograd.grad(out[:, c].sum(), zs, retain_graph=not last, allow_unused=True)
        for sink, g, z in zip(sinks, grads, zs):
            sink.add(torch.zeros_like(z) if g is None else g)


#: fast layers whose output a later in-place op overwrote (BatchNorm or Conv → ReLU(inplace=True), a
#: residual ``out += identity``): from then on the capture hook hands the model a copy of the output,
#: so the layer's own z stays intact for the backward passes. Learned on the first call, which is
#: still exact (that layer goes through the generic path once).
_COPY_OUTPUT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()

#: models whose forward failed on channels-last convolution outputs (a ``.view`` of one, say): the
#: standalone call retried them in their own layout and keeps doing so
_NO_CHANNELS_LAST: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class ForwardCapture:
    """Hooks on the fast layers that record (input, output) of one forward; use as a context manager.

    ``with ForwardCapture(model, named_params) as cap: out = model(x)`` then ``cap.structural_matrix(out, x)``.
    The forward's graph is kept (backward passes use ``retain_graph``), so a training step can still
    call ``loss.backward()`` on the same output afterwards. With ``channels_last`` the hooks hand the
    model its Conv2d outputs in channels-last (:func:`_to_channels_last`) and record those copies as z.
    """

    def __init__(
        self, model: nn.Module, named_params: list[tuple[str, torch.Tensor]], channels_last: bool = False, relu_taps: bool = False
    ) -> None:
        self.model, self.named_params = model, named_params
        self.plans, self.rest = plan_layers(model, named_params)
        # hand the model its Conv2d outputs in channels-last (see _to_channels_last)
        self.channels_last = channels_last and any(type(p.module) is nn.Conv2d for p in self.plans)
        self.captured: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self.pools: list[tuple[torch.Tensor, int]] = []  # (output, version) of every MaxPool2d call
        convs = any(type(p.module) is nn.Conv2d for p in self.plans)
        self._pool_modules = [m for m in model.modules() if type(m) is nn.MaxPool2d] if convs else []
        # ReLU modules that may tap a convolution's output (see .relu_tap); the C-pass backward runs only with convolutions
        tappable = any(_tappable_conv(p.module) for p in self.plans)
        self._relu_modules = [m for m in model.modules() if type(m) is nn.ReLU and not m.inplace] if relu_taps and tappable else []
        self.taps: dict[int, list[ReluTap]] = {}  # conv module id -> the taps on its output in this forward
        self._z_nodes: dict[int, tuple[nn.Module, object]] = {}  # id of a recorded conv output's graph node -> (module, the node, kept alive)
        self._handles: list = []

    def __enter__(self) -> "ForwardCapture":
        self.captured = {id(p.module): [] for p in self.plans}
        self.pools = []
        self.taps, self._z_nodes = {}, {}

        def hook(module, args, output):
            replaced = None
            if self.channels_last and type(module) is nn.Conv2d and _to_channels_last(output):
                # z is now the channels-last copy: the layers after run in that format, and the
                # backward passes stop at z, before the copy's own backward
                output = replaced = output.contiguous(memory_format=torch.channels_last)
            # the version counter tells later whether an in-place op (ReLU(inplace=True)) overwrote z
            self.captured[id(module)].append((args[0].detach(), output, output._version))
            if module in _COPY_OUTPUT:
                return output.clone()  # the model continues on a copy; z keeps its value and its graph
            if self._relu_modules and _tappable_conv(module) and output.grad_fn is not None:
                self._z_nodes[id(output.grad_fn)] = (module, output.grad_fn)
            return replaced

        def relu_hook(module, args, output):
            t = args[0] if args else None
            if not (isinstance(t, torch.Tensor) and isinstance(output, torch.Tensor) and t.grad_fn is not None):
                return None
            entry, through = self._z_nodes.get(id(t.grad_fn)), None  # relu(z)
            if entry is None and type(t.grad_fn).__name__ == "AddBackward0" and getattr(t.grad_fn, "_saved_alpha", 1) == 1:
                # relu(z + y) (a residual block): ∂f/∂z is the ReLU's backward when z feeds only the sum
                for node, _ in t.grad_fn.next_functions:
                    if node is not None and id(node) in self._z_nodes:
                        entry, through = self._z_nodes[id(node)], t.grad_fn
                        break
            if entry is None:
                return None
            conv = entry[0]
            z = self.captured[id(conv)][-1][1]
            if (through is None and t is not z) or z.shape != t.shape or not _tappable_layout(z):
                return None
            r, tap = tapped_relu(t, output)
            tap.through = through  # the sum node between z and the ReLU, or None
            self.taps.setdefault(id(conv), []).append(tap)
            return r

        def pool_hook(module, args, output):
            if isinstance(output, torch.Tensor):  # not with return_indices=True
                self.pools.append((output, output._version))

        self._handles = [p.module.register_forward_hook(hook) for p in self.plans]
        self._handles += [m.register_forward_hook(pool_hook) for m in self._pool_modules]
        self._handles += [m.register_forward_hook(relu_hook) for m in self._relu_modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def structural_matrix(
        self, out: torch.Tensor, inputs: torch.Tensor, *, n_classes: int, groups: dict | None = None,
        rows: slice | None = None, total: torch.Tensor | None = None, keep_graph: bool = False,
    ) -> torch.Tensor:
        """A for the captured forward (``out`` its logits, ``inputs`` its inputs, for the generic path).

        ``keep_graph`` leaves the forward's graph usable for a later ``backward`` (training reuse).
        """
        parts, slow_names = self.fast_parts(out, n_classes, keep_graph)
        return self.add_parts(parts, slow_names, out, inputs, n_classes=n_classes, groups=groups, rows=rows, total=total)

    def fast_parts(self, out: torch.Tensor, n_classes: int, keep_graph: bool = False) -> tuple[list, list[str]]:
        """The fast layers' contributions [(module path, (n, C, C))] and the parameter names left to the generic path.

        Writes no result, so that a caller may retry after an error (the forward is consumed either way).
        """
        try:
            by_name = dict(self.named_params)
            graph = _graph_uses(out)
            fast, slow_names = [], list(self.rest)
            for plan in self.plans:
                calls = self.captured[id(plan.module)]
                uses = [graph.leaves.get(id(by_name[name]), 0) for name in plan.params]
                single = len(calls) == 1 and calls[0][1].requires_grad
                overwritten = single and calls[0][1]._version != calls[0][2]
                if overwritten:  # exact through the generic path this time; from the next call on, z is kept
                    _COPY_OUTPUT.add(plan.module)
                intact = single and not overwritten
                if intact and all(u == 1 for u in uses):
                    fast.append(plan)
                else:  # reused module, weight used elsewhere, output modified in place, or off the graph: generic path
                    plan.strategy = "func"
                    slow_names.extend(plan.params)
            if not fast:
                return [], slow_names
            zs, sinks = [], []
            for plan in fast:
                a, z, _ = self.captured[id(plan.module)][0]
                pooled = self._foldable_pool(plan, a, z, n_classes, graph)
                if pooled is not None:  # contract at the pool's output: the backward passes stop there
                    zs.append(pooled[0])
                    sinks.append(PooledConvGram(plan, a, z, pooled, n_classes))
                else:
                    zs.append(z)
                    # a tap writes b_c when it is the only one on z and z feeds only the ReLU (or only a sum that
                    # feeds only the ReLU): then the ReLU's backward is ∂f/∂z
                    taps = self.taps.get(id(plan.module), [])
                    tap = taps[0] if len(taps) == 1 and graph.consumers.get(id(z.grad_fn), 0) == 1 else None
                    if tap is not None and tap.through is not None and graph.consumers.get(id(tap.through), 0) != 1:
                        tap = None
                    sink = _sink(plan, a, n_classes, tap_z=z if tap is not None else None)
                    if tap is not None and getattr(sink, "tapped", False):
                        tap.slot = sink.slot
                    sinks.append(sink)
            _stream_logit_jacobians(out, zs, n_classes, sinks, _one_pass(out, zs, fast, sinks, graph), keep_graph)
            return [(plan.name, sink.result()) for plan, sink in zip(fast, sinks)], slow_names
        finally:
            self.captured = {id(p.module): [] for p in self.plans}
            self.pools = []
            self.taps, self._z_nodes = {}, {}

    def add_parts(
        self, parts: list, slow_names: list[str], out: torch.Tensor, inputs: torch.Tensor, *, n_classes: int,
        groups: dict | None = None, rows: slice | None = None, total: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """total[rows] += the fast parts and the generic path's share for ``slow_names`` (groups alike)."""
        n = out.shape[0]
        rows = rows or slice(0, n)
        if total is None:
            total = torch.zeros(n, n_classes, n_classes, dtype=self.named_params[0][1].dtype, device=out.device)
        n_all = total.shape[0]
        for name, part in parts:
            total[rows] += part
            add_group(groups, name, rows, part, n_all)
        if slow_names:
            keep = set(slow_names)
            sub: dict[str, torch.Tensor] | None = {} if groups is not None else None
            part = structural_matrix_jacobian(
                self.model, inputs, [(nm, p) for nm, p in self.named_params if nm in keep], n_classes=n_classes, groups=sub
            )
            total[rows] += part
            for name, value in (sub or {}).items():
                add_group(groups, name, rows, value, n_all)
        return total

    def _foldable_pool(self, plan: LayerPlan, a: torch.Tensor, z: torch.Tensor, n_classes: int, graph: GraphUses):
        """(p, indices, relu) when the Conv2d ``plan`` feeds only [ReLU →] MaxPool2d and folding it pays; else None.

        Pays: the gathered patches are no larger than the ∂f/∂z buffer the layer would otherwise
        keep, and the folded contraction takes at most twice the multiply-adds of the layer's
        cheapest unfolded form: the multiply-adds alone undersell the fold, which also skips C
        backward passes of the pool and the ReLU over n·d·S values (memory-bound work: on the
        ResNet stem, whose folded form has 1.1× the multiply-adds of the unfolded one, the fold
        saves 4–5 % of the whole call; benchmarks/README.md). On the CPU only: on an H100, where
        these models are launch-bound, it measured 0.81–1.19× the unfolded time (exact there too).
        """
        if not (_FOLD_POOLS and self.pools and type(plan.module) is nn.Conv2d and plan.module.groups == 1 and z.device.type == "cpu"):
            return None
        pooled = pooled_output(z, self.pools, graph.consumers)
        if pooled is None:
            return None
        n, d = z.shape[:2]
        K, S = layer_dims(plan.module, a)
        K1, S_pooled = K + int(plan.module.bias is not None), pooled[0].shape[2] * pooled[0].shape[3]
        unfolded = min(contraction_costs(n, n_classes, S, K, d, plan.module.bias is not None).values())
        fits = d * K1 * S_pooled <= n_classes * d * S
        return pooled if fits and pooled_cost(n, n_classes, S_pooled, K1, d) <= 2 * unfolded else None



def structural_matrix_gram(
    model: nn.Module,
    inputs: torch.Tensor,
    named_params: list[tuple[str, torch.Tensor]],
    *,
    n_classes: int | None = None,
    chunk_size: int | None = None,
    groups: dict[str, torch.Tensor] | None = None,
    logits: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """A (batch, C, C) by per-layer Gram contractions, the rest through torch.func.

    Args:
        model: maps (batch, ...) to (batch, C); called in the current (eval) mode.
        inputs: (batch, ...).
        named_params: θ as (name, tensor) pairs.
        n_classes: C, or None to read it from the logits.
        chunk_size: samples per chunk (bounds the memory of activations and B's).
        groups: if a dict, receives {module path: (batch, C, C)} with A = Σ of the groups.
        logits: if a list, receives the detached logits of each chunk's forward.

    On the CPU the forward runs on channels-last Conv2d outputs (see :func:`_to_channels_last`);
    if it raises a RuntimeError that way, it is rerun in the model's own layout, which the model
    keeps for later calls (logged at INFO on ``optmech.structure``).
    """
    n = inputs.shape[0]
    chunk = n if chunk_size is None else chunk_size
    total = None
    cpu = inputs.device.type == "cpu"
    capture = ForwardCapture(
        model, named_params, channels_last=_CHANNELS_LAST and model not in _NO_CHANNELS_LAST, relu_taps=_RELU_TAPS and cpu
    )
    for start in range(0, n, chunk):
        x = inputs[start : start + chunk]
        while True:
            try:
                with capture, torch.enable_grad():
                    out = check_outputs(model(x), x.shape[0])
                if total is None:  # C from the first chunk's logits: no separate forward to find it
                    n_classes = out.shape[1] if n_classes is None else n_classes
                    total = torch.zeros(n, n_classes, n_classes, dtype=named_params[0][1].dtype, device=inputs.device)
                elif out.shape[1] != n_classes:
                    raise ValueError(
                        f"model output: expected {n_classes} logits per sample in every chunk, got {out.shape[1]} for "
                        f"samples {start}…{start + x.shape[0] - 1}. The number of classes must not depend on the input."
                    )
                parts, slow_names = capture.fast_parts(out, n_classes)
                break
            except RuntimeError as err:
                if not capture.channels_last:
                    raise
                # e.g. a forward that calls .view() on a convolution's output: run it as given from now on
                _NO_CHANNELS_LAST.add(model)
                capture.channels_last = False
                log.info("gram: %s does not run on channels-last convolution outputs (%s); using its own layout", type(model).__name__, err)
        capture.add_parts(parts, slow_names, out, x, n_classes=n_classes, groups=groups, rows=slice(start, start + chunk), total=total)
        if logits is not None:
            logits.append(out.detach())
        del out
    return total
