"""The forward of ``gram``: hooks that record each fast layer's input and output, then the layers' contributions.

:class:`ForwardCapture` is used by the standalone call (:mod:`.gram`) and by the probe on the training
step's own forward. On the CPU its hooks may hand the model Conv2d outputs in channels-last, wrap a
convolution's ReLU in a tap (:mod:`.relu_tap`) and record the MaxPool2d outputs that a convolution
may be contracted at (:mod:`.pooled`). After the forward, :meth:`ForwardCapture.fast_parts` checks
the graph (each parameter used once, each output intact), builds the accumulators (:mod:`.sinks`),
runs the backward passes (:mod:`.passes`) and returns the fast layers' parts; :meth:`ForwardCapture.add_parts`
adds the generic path's share for the rest.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from ._context import add_group, layer_of
from .attention import attention_plans, recompute
from .recurrent import GradientScaled, recompute_recurrent, recurrent_plans
from .contract import contraction_costs
from .jacobian import structural_matrix_jacobian
from .layout import _tappable_layout, _to_channels_last
from .passes import _one_pass, _stream_logit_jacobians
from .patches import layer_dims
from .plan import GraphUses, LayerPlan, _graph_uses, plan_layers
from .pooled import PooledConvGram, pooled_cost, pooled_output
from .raw import RawParameterGram, RawUses
from .relu_tap import ReluTap, tapped_relu
from .samples import SamplesMoved, candidate_dims, sample_dims
from .sinks import _sink

__all__ = ["ForwardCapture"]

log = logging.getLogger("optmech.structure")

#: contract Conv2d → [ReLU] → MaxPool2d chains at the pool's output (:mod:`.pooled`); tests switch it off
_FOLD_POOLS = True


def _tappable_conv(module: nn.Module) -> bool:
    """A convolution whose sink a ReLU tap may write into: ungrouped (a grouped one has its own sink, :mod:`.grouped`)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1



#: fast layers whose output a later in-place op overwrote (BatchNorm or Conv → ReLU(inplace=True), a
#: residual ``out += identity``): from then on the capture hook hands the model a copy of the output,
#: so the layer's own z stays intact for the backward passes. Learned on the first call, which is
#: still exact (that layer goes through the generic path once).
_COPY_OUTPUT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


#: per model, the sets of (parameter, reason) already logged by :func:`_log_generic`
_LOGGED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _log_generic(model: nn.Module, reasons: dict[str, str]) -> None:
    """Log at INFO, once per model and set of reasons, the parameters that go to the generic path and why."""
    if not reasons:
        return
    key = frozenset(reasons.items())
    seen = _LOGGED.setdefault(model, set())
    if key in seen:
        return
    seen.add(key)
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    listed = "; ".join(f"{', '.join(names[:6])}{' …' if len(names) > 6 else ''} ({reason})" for reason, names in by_reason.items())
    log.info("gram: %d parameter tensors of %s go through the generic torch.func path (exact, slower): %s",
             len(reasons), type(model).__name__, listed)


class ForwardCapture:
    """Hooks on the fast layers that record (input, output) of one forward; use as a context manager.

    ``with ForwardCapture(model, named_params) as cap: out = model(x)`` then ``cap.structural_matrix(out, x)``.
    The forward's graph is kept (backward passes use ``retain_graph``), so a training step can still
    call ``loss.backward()`` on the same output afterwards. With ``channels_last`` the hooks hand the
    model its Conv2d outputs in channels-last (:func:`.layout._to_channels_last`) and record those copies as z.
    With ``attention`` a covered ``nn.MultiheadAttention`` call is recomputed in steps whose projections are
    recorded like Linear layers, and that output is handed on (:mod:`.attention`). ``channels_last``,
    ``relu_taps`` and ``attention`` change the graph the model builds: the standalone call only. With
    ``direct`` a torch-function mode watches the forward for parameters used directly (:mod:`.raw`); it
    changes nothing, but it sees every torch call of the forward: the standalone call only as well.
    """

    def __init__(
        self, model: nn.Module, named_params: list[tuple[str, torch.Tensor]], channels_last: bool = False, relu_taps: bool = False,
        attention: bool = False, direct: bool = False, recurrent: bool = False,
    ) -> None:
        self.model, self.named_params = model, named_params
        self.plans, self.rest = plan_layers(model, named_params)
        # MultiheadAttention's projections, recomputed by a hook where the backward passes can reach them (.attention)
        self.attention = attention_plans(model, named_params, set(self.rest)) if attention else []
        # LSTM/GRU/RNN modules, recomputed step by step by a hook: their weights are Linear layers over time (.recurrent)
        self.recurrent = recurrent_plans(model, named_params, set(self.rest)) if recurrent else []
        taken = {name for a in self.attention for name in a.params} | {name for r in self.recurrent for name in r.params}
        self.rest = [name for name in self.rest if name not in taken]
        # the parameters left: watched during the forward for direct uses the fast path knows (.raw)
        left = set(self.rest) if direct else set()
        self._raw_params = {id(p): name for name, p in named_params if name in left}
        self._raw: RawUses | None = None
        convs = any(type(p.module) is nn.Conv2d for p in self.plans)
        # hand the model its Conv2d outputs in channels-last (see _to_channels_last)
        self.channels_last = channels_last and convs
        self.captured: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self.pools: list[tuple[torch.Tensor, int]] = []  # (output, version) of every MaxPool2d call
        self._pool_modules = [m for m in model.modules() if type(m) is nn.MaxPool2d] if convs else []
        # ReLU modules that may tap a convolution's output (see .relu_tap); the C-pass backward runs only with convolutions
        tappable = any(_tappable_conv(p.module) for p in self.plans)
        self._relu_modules = [m for m in model.modules() if type(m) is nn.ReLU and not m.inplace] if relu_taps and tappable else []
        self.taps: dict[int, list[ReluTap]] = {}  # conv module id -> the taps on its output in this forward
        self._z_nodes: dict[int, tuple[nn.Module, object]] = {}  # id of a recorded conv output's graph node -> (module, the node, kept alive)
        self._handles: list = []

    def _forget_forward(self) -> None:
        """Drop what the hooks recorded of a forward (before the next one, and once its parts are computed)."""
        for a in self.attention:
            a.blocks = {}  # the in-projection's blocks as a forward's calls group them
        self.captured = {id(p.module): [] for p in self._layer_plans()}
        self.pools = []
        self.taps, self._z_nodes = {}, {}
        self.gradient_scales: dict[int, torch.Tensor] = {}  # stand-in module id -> the factor on its b_c (GRU's hh)

    def __enter__(self) -> "ForwardCapture":
        self._forget_forward()
        self._raw = RawUses(self._raw_params) if self._raw_params else None

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

        def attention_hook(module, args, kwargs, output):
            got = recompute(module, args, kwargs, output)
            if got is None:  # not covered, or not a match: the module's output stands, its parameters go generic
                return None
            blocks, (O, y), handed = got
            plan = by_module[id(module)]
            for roles, x, P in blocks:
                block = plan.block(roles, x.shape[-1])
                self.captured.setdefault(id(block.module), []).append((x.detach(), P, P._version))
            self.captured[id(plan.out_proj.module)].append((O.detach(), y, y._version))
            return handed

        def recurrent_hook(module, args, kwargs, output):
            got = recompute_recurrent(module, args, kwargs, output)
            if got is None:  # not covered, or not a match: the module's output stands, its parameters go generic
                return None
            steps, handed = got
            plan = by_recurrent[id(module)]
            for step in steps:
                stand_in = plan.parts[step.key].module
                self.captured[id(stand_in)].append((step.a, step.u, step.u._version))
                if step.scale is not None:
                    self.gradient_scales[id(stand_in)] = step.scale
            return handed

        def pool_hook(module, args, output):
            if isinstance(output, torch.Tensor):  # not with return_indices=True
                self.pools.append((output, output._version))

        self._handles = [p.module.register_forward_hook(hook) for p in self.plans]
        self._handles += [m.register_forward_hook(pool_hook) for m in self._pool_modules]
        self._handles += [m.register_forward_hook(relu_hook) for m in self._relu_modules]
        by_module = {id(a.module): a for a in self.attention}
        self._handles += [a.module.register_forward_hook(attention_hook, with_kwargs=True) for a in self.attention]
        by_recurrent = {id(r.module): r for r in self.recurrent}
        self._handles += [r.module.register_forward_hook(recurrent_hook, with_kwargs=True) for r in self.recurrent]
        if self._raw is not None:
            self._raw.__enter__()
        return self

    def _layer_plans(self) -> list[LayerPlan]:
        """The fast layers' plans, MultiheadAttention's projections (the in-projection's blocks of this forward) and
        the recurrent modules' Linear layers over time included."""
        return (self.plans + [p for a in self.attention for p in (*a.blocks.values(), a.out_proj)]
                + [p for r in self.recurrent for p in r.plans])

    def __exit__(self, *exc) -> None:
        if self._raw is not None:
            self._raw.__exit__(*exc)
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
            reasons = {name: "no fast rule for its module, or its layer is tied or partly frozen" for name in self.rest}

            def generic(plan: LayerPlan, reason: str) -> None:
                plan.strategy = "func"
                slow_names.extend(plan.params)
                reasons.update((name, reason) for name in plan.params)

            sample_dim: dict[int, int | list[int] | None] = {}  # id(plan) -> the dimension of z holding the samples
            for plan in self._layer_plans():
                calls = self.captured[id(plan.module)]
                uses = [graph.leaves.get(id(by_name[name]), 0) for name in plan.params]
                single = len(calls) == 1 and calls[0][1].requires_grad
                overwritten = single and calls[0][1]._version != calls[0][2]
                if overwritten:  # exact through the generic path this time; from the next call on, z is kept
                    _COPY_OUTPUT.add(plan.module)
                intact = single and not overwritten
                candidates = candidate_dims(plan.module, calls[0][1], out.shape[0]) if intact else []
                if intact and all(u == 1 for u in uses) and candidates:
                    fast.append(plan)
                    sample_dim[id(plan)] = 0 if candidates == [0] else candidates
                elif not single:  # a module called twice, not at all, off the graph; an attention call not covered
                    generic(plan, "its layer did not run exactly once: unused, reused, or an attention call not covered")
                elif overwritten:
                    generic(plan, "its layer's output was modified in place (fast from the next call on)")
                elif not all(u == 1 for u in uses):
                    generic(plan, "it is used outside its layer too")
                else:
                    generic(plan, "no dimension of its layer's output has the batch's size")
            raw = self._raw_uses(out, graph, by_name, reasons)  # parameters used directly (.raw): name -> (use, dims)
            # layers and direct parameters whose samples may lie along another dimension than the first
            # (.samples): one backward pass tells, for all of them
            unsure = [(plan, self.captured[id(plan.module)][0][1], sample_dim[id(plan)]) for plan in fast if sample_dim[id(plan)] != 0]
            unsure += [(name, use.out, dims) for name, (use, dims) in raw.items() if dims != [0]]
            found = sample_dims(out, [z for _, z, _ in unsure], [dims for _, _, dims in unsure]) if unsure else []
            for (key, _, _), dim in zip(unsure, found):
                if isinstance(key, str):  # a direct parameter
                    if dim is None:
                        del raw[key]
                        reasons[key] = "which dimension of the result of its use holds the samples could not be told"
                    else:
                        raw[key] = (raw[key][0], [dim])
                else:
                    sample_dim[id(key)] = dim
                    if dim is None:
                        fast.remove(key)
                        generic(key, "which dimension of its layer's output holds the samples could not be told")
            self._whole_in_projections(fast, slow_names, reasons)
            for name in raw:
                reasons.pop(name, None)
            slow_names = [name for name in dict.fromkeys(slow_names) if name not in raw]
            _log_generic(self.model, reasons)
            if not fast and not raw:
                return [], slow_names
            zs, sinks = [], []
            for plan in fast:
                a, z, _ = self.captured[id(plan.module)][0]
                dim = sample_dim[id(plan)]
                if dim:  # samples along another dimension (a sequence-first layout): the accumulator reads them first
                    zs.append(z)
                    sinks.append(self._scaled(plan, SamplesMoved(_sink(plan, a.movedim(dim, 0), n_classes), dim)))
                    continue
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
                    sinks.append(self._scaled(plan, sink))
            names = [plan.name for plan in fast]
            for name, (use, (dim,)) in raw.items():
                zs.append(use.out)
                sinks.append(RawParameterGram(use, n_classes, dim))
                names.append(layer_of(name))  # grouped as the generic path groups it
            _stream_logit_jacobians(out, zs, n_classes, sinks, _one_pass(out, zs, fast, sinks, graph), keep_graph)
            return [(name, sink.result()) for name, sink in zip(names, sinks)], slow_names
        finally:
            self._forget_forward()

    def _scaled(self, plan: LayerPlan, sink):
        """``sink``, handed b_c ⊙ m where the forward recorded a factor m on the layer's output gradient (GRU's hh, in z's layout)."""
        scale = self.gradient_scales.get(id(plan.module))
        return sink if scale is None else GradientScaled(sink, scale)

    def _whole_in_projections(self, fast: list[LayerPlan], slow_names: list[str], reasons: dict[str, str]) -> None:
        """An attention module's in-projection is fast only as a whole: its blocks share the packed weight
        (or the packed bias), so one block on the generic path takes the others there too (``fast``,
        ``slow_names`` and ``reasons`` updated in place); a module whose call was not recomputed has no block."""
        for att in self.attention:
            blocks = list(att.blocks.values())
            ids = {id(p) for p in fast}
            if blocks and all(id(p) in ids for p in blocks):
                continue
            for p in blocks:
                if id(p) in ids:
                    fast.remove(p)
                p.strategy = "func"
            reason = "its layer did not run exactly once: unused, reused, or an attention call not covered"
            if blocks:
                reason = next((reasons[n] for n in att.in_names if n in reasons), "another block of its in-projection is generic")
            slow_names.extend(att.in_names)
            reasons.update((n, reason) for n in att.in_names)

    def _raw_uses(self, out: torch.Tensor, graph: GraphUses, by_name: dict, reasons: dict[str, str]) -> dict[str, tuple]:
        """The parameters used directly whose one recorded use (.raw) the fast path can take: name -> (the use,
        the dimensions of its result that may hold the samples); the reasons of those refused are updated."""
        taken: dict[str, tuple] = {}
        if self._raw is None:
            return taken
        n = out.shape[0]
        for name, uses in self._raw.uses.items():
            use = uses[0]
            if len(uses) != 1 or name in self._raw.unknown or graph.leaves.get(id(by_name[name]), 0) != 1:
                reasons[name] = "used directly in more than one place, or in a way the fast path does not follow"
            elif any(graph.consumers.get(id(v.grad_fn), 0) != 1 for v in use.chain):
                reasons[name] = "a view of it is used elsewhere too"
            elif not (use.intact() and use.out.requires_grad):
                reasons[name] = "the result of its use was modified in place"
            elif not (dims := use.sample_dims(n)):
                reasons[name] = "no dimension of the result of its use has the batch's size with the parameter broadcast along it"
            else:
                taken[name] = (use, dims)
        return taken

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

