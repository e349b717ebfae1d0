"""The forward of ``gram``, as a loop over the rules of :mod:`.rules`: claim, record, check, accumulate.

:class:`ForwardCapture` serves the standalone call (:mod:`.gram`) and the probe's training-step capture.

1. **Claim** (at construction): each module of the model is offered to the rules in registry order; the first
   whose ``matches`` accepts it claims its parameters when all are in θ and no other module claimed them. The
   parameters left are offered to the direct rule (``EngineOptions.direct``); the rest go generic.
2. **Record** (``with capture: out = model(x)``): each rule's hooks record (input, output) of its layers.
3. **Check** (:meth:`ForwardCapture.fast_parts`): each rule tells, for each layer, which dimensions of z may
   hold the samples, or why the layer goes generic; one backward pass settles layers whose samples may lie
   along another dimension (:mod:`.samples`); a claim whose layers must go together (``whole``) does.
4. **Accumulate**: each rule builds its layers' accumulators; the C backward passes (:mod:`.passes`) feed them
   b_c = ∂f_c/∂z; their results are the layers' shares. :meth:`ForwardCapture.add_parts` adds the generic
   ``torch.func`` path's share for the parameters left.

Every parameter's path is returned as a :class:`.route.Route`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch
from torch import nn

from ._context import add_group, outside_stacklevel
from .accumulator import GradientScaled, SamplesMoved
from .cache import SHARED, ModelCache, model_cache
from .graph import graph_uses
from .head import ThroughHead, head_basis
from .jacobian import structural_matrix_jacobian
from .options import EngineOptions
from .passes import one_pass, stream_logit_jacobians
from .route import GenericPathWarning, Route
from .rules import DIRECT, AccumulatorContext, Claim, Layer, Record, rule_for
from .samples import sample_dims

__all__ = ["ForwardCapture", "GenericPathWarning", "claim_parameters"]

log = logging.getLogger("optmech.structure")

#: the reason of a parameter that no rule claimed
UNCLAIMED = "no rule claims it (no rule for its module's type)"
#: reasons that resolve themselves on the next call (logged at INFO, not warned)
_TRANSIENT = ("fast from the next call on",)


def claim_parameters(model: nn.Module, named_params: list[tuple[str, torch.Tensor]], options: EngineOptions,
                     capture: ForwardCapture) -> tuple[list[Claim], list[str], dict[str, str]]:
    """(the claims of the module rules and of the direct rule, the θ names no module rule claimed, {name: why} for
    those of a module a rule handles but could not take)."""
    wanted = {id(p): n for n, p in named_params}
    claimed: set[str] = set()
    refused: dict[str, str] = {}
    claims: list[Claim] = []
    for path, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:
            continue
        own = rule.parameters(module)
        names = [wanted[id(p)] for p in own if id(p) in wanted]
        if rule.recomputes and not options.recompute:
            refused.update((n, f"its {type(module).__name__} is recomputed only in a standalone call") for n in names)
            continue
        if not own or len(names) < len(own):  # a frozen parameter: the generic path takes the partial module
            refused.update((n, f"its {type(module).__name__} has frozen parameters too (a rule takes a module whole)") for n in names)
            continue
        if any(n in claimed for n in names):  # the same parameter in two modules: tied, left to the generic path
            refused.update((n, "it is shared with another module (tied weights)") for n in names if n not in claimed)
            continue
        claimed.update(names)
        claims += rule.claims(path, module, names, capture)
    rest = [n for n, _ in named_params if n not in claimed]
    watch = [n for n in rest if n not in refused]
    if options.direct and watch:
        claims.append(DIRECT.claim_rest(watch))
    return claims, rest, refused


class ForwardCapture:
    """The rules' hooks on one model; use as a context manager around a forward.

    ``with ForwardCapture(model, named_params, options) as cap: out = model(x)`` then ``cap.structural_matrix(out, x, ...)``.
    The forward's graph is kept (backward passes use ``retain_graph``), so a training step can still call
    ``loss.backward()`` on the same output afterwards (``EngineOptions.training_step()`` then: nothing the
    step computes is changed).

    Attributes:
        claims: the rules' claims; ``unclaimed``: θ names no module rule claimed (the direct rule may take some).
    """

    def __init__(self, model: nn.Module, named_params: list[tuple[str, torch.Tensor]], options: EngineOptions,
                 cache: ModelCache | None = None) -> None:
        self.model, self.named_params, self.options = model, named_params, options
        self.cache = model_cache(model) if cache is None else cache
        self.by_name = dict(named_params)
        self.claims, self.unclaimed, self.refused = claim_parameters(model, named_params, options, self)
        convs = any(type(layer.module) is nn.Conv2d for claim in self.claims for layer in claim.layers)
        # hand the model its Conv2d outputs in channels-last (EngineOptions.channels_last)
        self.channels_last = options.channels_last and convs and not self.cache.own_layout
        self.records: dict[int, list[Record]] = {}  # id(layer) -> what its hooks recorded in this forward
        self.scratch: dict[str, object] = {}  # the rules' notes on this forward, by rule name
        #: the samples in the forward about to run, when the caller knows it (the standalone call sets it)
        self.batch_size: int | None = None
        self._handles: list = []

    def record(self, layer: Layer, record: Record) -> None:
        """Called by the rules' hooks: one call of ``layer`` in the forward."""
        self.records.setdefault(id(layer), []).append(record)

    def _forget_forward(self) -> None:
        """Drop what the hooks recorded of a forward (before the next one, and once its parts are computed)."""
        self.records, self.scratch = {}, {}
        for claim in self.claims:
            claim.made.clear()

    def __enter__(self) -> ForwardCapture:
        self._forget_forward()
        by_rule: dict[int, tuple] = {}
        for claim in self.claims:
            by_rule.setdefault(id(claim.rule), (claim.rule, []))[1].append(claim)
        for rule, claims in by_rule.values():
            self._handles += rule.install(self, claims)
        return self

    def __exit__(self, *exc) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles = []

    def structural_matrix(
        self, out: torch.Tensor, inputs: torch.Tensor, *, n_classes: int, groups: dict | None = None,
        rows: slice | None = None, total: torch.Tensor | None = None, keep_graph: bool = False,
        factors: dict | None = None, dense: bool = True,
    ) -> tuple[torch.Tensor | None, dict[str, Route]]:
        """(A, routes) for the captured forward (``out`` its logits, ``inputs`` its inputs, for the generic path).

        ``keep_graph`` leaves the forward's graph usable for a later ``backward`` (training reuse); ``factors`` and
        ``dense`` as in :meth:`add_parts` (A is None when left to the factors).
        """
        parts, generic, routes = self.fast_parts(out, n_classes, keep_graph, dense)
        total = self.add_parts(parts, generic, out, inputs, n_classes=n_classes, groups=groups, rows=rows, total=total,
                               factors=factors, dense=dense)
        return total, routes

    def fast_parts(self, out: torch.Tensor, n_classes: int, keep_graph: bool = False,
                   dense: bool = True) -> tuple[list, list[str], dict[str, Route]]:
        """([(group name, accumulator)] of the fast layers, the θ names left to the generic path, {name: Route}).

        Writes no result, so that a caller may retry after an error (the forward is consumed either way). ``dense``:
        whether A will be formed (:meth:`add_parts`), which decides when a narrow logits layer's factors pay.
        """
        try:
            n = out.shape[0]
            graph = graph_uses(out)
            reasons: dict[str, str] = {}
            for claim in self.claims:
                claim.rule.after_forward(self, claim)
            verdicts: list[tuple[Claim, Layer, list[int] | str]] = []
            for claim in self.claims:
                for layer in claim.all_layers():
                    verdicts.append((claim, layer, layer.rule.check(layer, self.records.get(id(layer), []), graph, n, self)))
            # layers whose samples may lie along another dimension than the first: one backward pass tells, for all
            unsure = [i for i, (_, _, v) in enumerate(verdicts) if not isinstance(v, str) and v != [0]]
            if unsure:
                zs = [self.records[id(verdicts[i][1])][0].z for i in unsure]
                for i, dim in zip(unsure, sample_dims(out, zs, [verdicts[i][2] for i in unsure])):
                    claim, layer, _ = verdicts[i]
                    verdicts[i] = (claim, layer, [dim] if dim is not None else
                                   "which dimension of its layer's output (or of its use's result) holds the samples could not be told")
            fast: list[tuple[Layer, int]] = []
            for claim in self.claims:
                mine = [(layer, v) for c, layer, v in verdicts if c is claim]
                refused = [v for _, v in mine if isinstance(v, str)]
                if claim.whole and (refused or not mine):  # its layers go fast together or not at all
                    reason = refused[0] if refused else "its module did not run exactly once, or its call was not recomputed"
                    reasons.update((name, reason) for name in claim.params)
                    continue
                for layer, v in mine:
                    if isinstance(v, str):
                        reasons.update((name, v) for name in layer.params)
                    else:
                        fast.append((layer, v[0]))
                covered = {name for layer, _ in mine for name in layer.params}
                reasons.update((name, UNCLAIMED) for name in claim.params if name not in covered and name not in reasons)
            taken = {name for layer, _ in fast for name in layer.params}
            for name in self.unclaimed:
                if name not in taken:
                    reasons.setdefault(name, self.refused.get(name, UNCLAIMED))
            generic = [name for name, _ in self.named_params if name in reasons]
            self._report(reasons)
            ctx = AccumulatorContext(n_classes, self, graph, out)
            accumulators: list = [None] * len(fast)
            # the layers at the logits first: a Linear there may start the others' passes at its input h (its seed),
            # and when h is narrower than C the others run on d cotangents and contract d × d shares (.head)
            at_logits = [i for i, (layer, _) in enumerate(fast) if self.records[id(layer)][0].z is out]
            for i in at_logits:
                accumulators[i] = self._accumulator(*fast[i], ctx)
            seed = self._seed([accumulators[i] for i in at_logits], graph)
            head = None
            if seed is not None and self.options.factor_head:
                width = sum(self.records[id(layer)][0].z.numel() for i, (layer, _) in enumerate(fast) if i not in at_logits)
                head = head_basis(seed[1], n_classes, dense, width // max(n, 1), self.cache)
            ctx_below = ctx if head is None else AccumulatorContext(head.rank, self, graph, out)
            for i, (layer, dim) in enumerate(fast):
                if accumulators[i] is None:
                    acc = self._accumulator(layer, dim, ctx_below)
                    accumulators[i] = acc if head is None else ThroughHead(acc, head, n_classes)
            names = [layer.name for layer, _ in fast]
            routes = {name: Route(name, None, "generic", reason) for name, reason in reasons.items()}
            for (layer, _), acc in zip(fast, accumulators):
                routes.update((name, Route(name, layer.rule.name, acc.form)) for name in layer.params)
            routes = {name: routes[name] for name, _ in self.named_params}
            streamed = [acc.inner if isinstance(acc, ThroughHead) else acc for acc in accumulators if acc.reads_gradient]
            if streamed:
                zs = [acc.target for acc in streamed]
                gpu = all(layer.rule.gpu_one_pass for (layer, _), acc in zip(fast, accumulators) if acc.reads_gradient)
                batched = one_pass(out, zs, gpu, streamed, graph, self.options.pass_bytes)
                if head is None:
                    stream_logit_jacobians(out, zs, n_classes, streamed, batched, keep_graph, seed=seed)
                else:  # the cotangents R[j] at h: ∂(h Rᵀ)_j/∂z
                    stream_logit_jacobians(out, zs, head.rank, streamed, batched, keep_graph, seed=(seed[0], head.R))
            return list(zip(names, accumulators)), generic, routes
        finally:
            self._forget_forward()

    def _accumulator(self, layer: Layer, dim: int, ctx: AccumulatorContext):
        """The accumulator of a fast layer whose samples lie along dimension ``dim`` of its output."""
        record = self.records[id(layer)][0]
        record.sample_dim = dim
        moved = dim != 0 and layer.rule.moves_samples
        acc = layer.rule.accumulator(layer, dataclasses.replace(record, a=record.a.movedim(dim, 0)) if moved else record, ctx)
        if acc.target is None and acc.reads_gradient:
            acc.target = record.z
        if moved:  # samples along another dimension (a sequence-first layout): the accumulator reads them first
            acc = SamplesMoved(acc, dim)
        if record.scale is not None:  # b_c ⊙ m (GRU's hh)
            acc = GradientScaled(acc, record.scale)
        return acc

    @staticmethod
    def _seed(accumulators: list, graph) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(h, W) when the logits are a Linear layer's output f = h Wᵀ + b on the fast path (a closed form) and h
        feeds only that layer: every other layer's output lies upstream of h, so the passes start at h with the
        cotangents ∂f_c/∂h = W[c] (no C × C work at the logits). None otherwise (start at the logits)."""
        seeds = [acc.seed for acc in accumulators if acc.seed is not None]
        if len(seeds) != 1:
            return None
        h, W = seeds[0]
        return (h, W) if graph.consumers.get(id(h.grad_fn), 0) == 1 else None

    def _report(self, reasons: dict[str, str]) -> None:
        """Warn (:class:`GenericPathWarning`), once per model and set of reasons, which parameters go generic and why;
        reasons that resolve themselves on the next call are logged at INFO."""
        lasting = {name: r for name, r in reasons.items() if not any(t in r for t in _TRANSIENT)}
        for kind, said in (("info", reasons), ("warn", lasting)):
            key = frozenset(said.items()) | {kind}
            if not said or key in self.cache.warned:
                continue
            self.cache.warned.add(key)
            by_reason: dict[str, list[str]] = {}
            for name, reason in said.items():
                by_reason.setdefault(reason, []).append(name)
            listed = "; ".join(f"{', '.join(names[:6])}{' …' if len(names) > 6 else ''} ({reason})" for reason, names in by_reason.items())
            text = (f"gram: {len(said)} parameter tensors of {type(self.model).__name__} go through the generic torch.func "
                    f"path (exact, slower): {listed}")
            if kind == "warn":
                warnings.warn(text, GenericPathWarning, stacklevel=outside_stacklevel())
            else:
                log.info(text)

    def add_parts(
        self, parts: list, generic: list[str], out: torch.Tensor, inputs: torch.Tensor, *, n_classes: int,
        groups: dict | None = None, rows: slice | None = None, total: torch.Tensor | None = None,
        factors: dict | None = None, dense: bool = True, n_all: int | None = None,
    ) -> torch.Tensor | None:
        """total[rows] = the sum of the fast parts [(group name, accumulator)] and of the generic path's share for
        ``generic`` (groups: += each); returns total, allocated (n_all, C, C) when None and rows are to be written.

        The layers below a narrow logits layer (:class:`.head.ThroughHead`) add their d × d shares M^(l) first and
        are expanded to C × C once. ``factors``, if a dict, receives ``scale`` (n_all,), ``core`` (n_all, d, d) and
        ``basis`` (C, d) of A = s·I + Q M Qᵀ (:class:`.head.LowRankHead`) for these rows, and ``"invalid"`` (True)
        when some rows' A is not of that form (a parameter on the generic path, no narrow logits layer). With
        ``dense=False`` rows of that form are not written to ``total`` (their slice is appended to
        ``factors["skipped"]``): the caller forms them from the factors if it needs them.
        """
        n = out.shape[0]
        rows = rows or slice(0, n)
        n_all = n_all or (n if total is None else total.shape[0])
        dtype = self.named_params[0][1].dtype
        core, head, scale, plain = None, None, None, []
        for name, acc in parts:
            if not isinstance(acc, ThroughHead):
                plain.append((name, acc))
                if acc.seed is not None:
                    scale = acc.scale
                continue
            head = acc.head
            if core is None:
                core = torch.zeros(n, head.rank, head.rank, dtype=dtype, device=out.device)
            if groups is None:
                acc.core(core)
            else:
                share = acc.core()
                core += share
                add_group(groups, name, rows, head.expand(share), n_all)
        factored = not generic and core is not None and scale is not None and len(plain) == 1
        if factors is not None:
            self._factors(factors, factored, head, core, scale, rows, n_all)
            if factored and not dense:
                factors.setdefault("skipped", []).append(rows)
                if groups is not None:  # the logits layer's own group
                    add_group(groups, plain[0][0], rows, plain[0][1].result(), n_all)
                return total
        if total is None:  # uninitialised: every chunk writes its own rows first
            total = torch.empty(n_all, n_classes, n_classes, dtype=dtype, device=out.device)
        if core is not None:  # Q M Qᵀ written over the rows (no zero fill of B·C² values first)
            work = self.cache.workspace.get(SHARED, "head-product", (n, n_classes, head.rank), dtype, out.device)
            head.expand(core, out=total[rows], work=work)
        else:
            total[rows].zero_()
        for name, acc in plain:
            if groups is None:
                acc.add_into(total[rows])
            else:
                part = acc.result()
                total[rows] += part
                add_group(groups, name, rows, part, n_all)
        if generic:
            keep = set(generic)
            sub: dict[str, torch.Tensor] | None = {} if groups is not None else None
            part = structural_matrix_jacobian(
                self.model, inputs, [(nm, p) for nm, p in self.named_params if nm in keep], n_classes=n_classes,
                groups=sub, cache=self.cache,
            )
            total[rows] += part
            for name, value in (sub or {}).items():
                add_group(groups, name, rows, value, n_all)
        return total

    @staticmethod
    def _factors(factors: dict, factored: bool, head, core, scale, rows: slice, n_all: int) -> None:
        """Write this chunk's :class:`.head.LowRankHead` factors into ``factors`` (see :meth:`add_parts`)."""
        if not factored:
            factors["invalid"] = True
            return
        if "core" not in factors and core.shape[0] == n_all:  # the whole batch in one chunk: no copy
            factors.update(core=core, scale=scale, basis=head.Q64)
            return
        if "core" not in factors:
            factors["core"] = torch.zeros(n_all, *core.shape[1:], dtype=core.dtype, device=core.device)
            factors["scale"] = torch.zeros(n_all, dtype=scale.dtype, device=scale.device)
            factors["basis"] = head.Q64
        factors["core"][rows] = core
        factors["scale"][rows] = scale
