"""Conv2d → [ReLU] → MaxPool2d contracted at the pool's output (structure/pooled.py), against the oracle.

The fold must be exact where it applies, and must not apply where the chain is not exactly that
(other consumers of z or of relu(z), in-place ops, other activations, indices returned, functional pools).
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import RTOL, captured_gram, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.models import build
from optmech.structure import EngineOptions


class ConvPool(nn.Module):
    """conv → act → pool → head, with switches for everything the fold must check."""

    def __init__(self, act="relu", pool=None, bias=True, extra_use=None, channels=3, in_ch=2):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, channels, 3, padding=1, bias=bias)
        self.act = {"relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "leaky": nn.LeakyReLU(0.1), None: nn.Identity()}[act]
        self.pool = pool if pool is not None else nn.MaxPool2d(2)
        self.extra_use = extra_use
        self.head = nn.LazyLinear(10)

    def forward(self, x):
        z = self.conv(x)
        h = self.act(z)
        p = self.pool(h)
        if isinstance(p, tuple):  # return_indices=True
            p = p[0]
        feats = p.flatten(1)
        if self.extra_use == "z":  # z also feeds the head directly
            feats = torch.cat([feats, z.mean((2, 3))], 1)
        elif self.extra_use == "relu":
            feats = torch.cat([feats, h.amax((2, 3))], 1)
        return self.head(feats)


def _strategies(model, x, fold: bool = True):
    """{layer: contraction form} of one gram call (and its result), with the forward run the way the engine runs it."""
    route, _, A = captured_gram(model, x, EngineOptions.training_step().replace(fold_pools=fold))
    return {name.rsplit(".", 1)[0]: r.form for name, r in route.items()}, A


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    model = ConvPool(**kw).double()
    model(torch.zeros(1, kw.get("in_ch", 2), 8, 8, dtype=torch.float64))  # materialise the lazy head
    return model


X = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"bias": False},
        {"act": None},  # conv → pool: no mask
        {"pool": nn.MaxPool2d(3, stride=2, padding=1)},  # overlapping windows: one position may win twice
        {"pool": nn.MaxPool2d(2, stride=2, ceil_mode=True)},
        {"pool": nn.MaxPool2d(2, dilation=2)},
    ],
    ids=["relu", "no-bias", "no-relu", "overlapping", "ceil", "dilated"],
)
def test_fold_applies_and_matches_the_oracle(kw):
    model = _model(**kw)
    A_ref, _ = structural_oracle(model, X)
    strategies, A = _strategies(model, X)
    assert strategies["conv"] == "pooled"
    assert rel_err(A, A_ref) < RTOL[torch.float64]


@pytest.mark.parametrize("family", ["snet", "resnet"])  # SNet: ReLU → MaxPool(2); ResNet stem: ReLU → MaxPool(3, stride 1)
def test_fold_and_unfolded_paths_agree_on_the_paper_models(family):
    for skip in (False, True):
        model = build(family, depth=2, skip=skip, seed=0, dtype=torch.float64)
        x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        strategies, folded = _strategies(model, x)
        assert "pooled" in strategies.values()
        A_ref, _ = structural_oracle(model, x[:2])
        assert rel_err(folded[:2], A_ref) < RTOL[torch.float64]
        strategies, unfolded = _strategies(model, x, fold=False)
        assert "pooled" not in strategies.values()
        assert rel_err(folded, unfolded) < 1e-12


@pytest.mark.parametrize(
    "kw",
    [
        {"extra_use": "z"},  # ∂f/∂z has a second path
        {"extra_use": "relu"},  # so has ∂f/∂relu(z)
        {"act": "leaky"},  # not a 0/1 mask
        {"pool": nn.MaxPool2d(2, return_indices=True)},  # the module's output is a tuple
        {"pool": nn.AvgPool2d(2)},
    ],
    ids=["z-used-twice", "relu-used-twice", "leaky-relu", "return-indices", "avg-pool"],
)
def test_fold_does_not_apply_when_the_chain_is_not_exactly_conv_relu_maxpool(kw):
    model = _model(**kw)
    A_ref, _ = structural_oracle(model, X)
    strategies, A = _strategies(model, X)
    assert strategies["conv"] != "pooled"
    assert rel_err(A, A_ref) < RTOL[torch.float64]
    assert rel_err(structural_matrix(model, X, method="gram").A, A_ref) < RTOL[torch.float64]


def test_fold_is_not_fooled_by_in_place_relu_a_functional_pool_or_an_overwritten_pool_output():
    model = _model(act="relu_inplace")
    A_ref, _ = structural_oracle(model, X)
    for _ in range(2):  # first call: z overwritten, generic path; then a copy of z feeds the ReLU
        strategies, A = _strategies(model, X)
        assert strategies["conv"] != "pooled" and rel_err(A, A_ref) < RTOL[torch.float64]

    class Functional(ConvPool):
        def forward(self, x):
            return self.head(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))

    class OverwrittenPool(ConvPool):
        def forward(self, x):
            return self.head(torch.relu_(self.pool(torch.relu(self.conv(x)))).flatten(1) * 2)

    for cls in (Functional, OverwrittenPool):
        torch.manual_seed(0)
        model = cls().double()
        model(X[:1])
        strategies, A = _strategies(model, X)
        assert strategies["conv"] != "pooled"  # no MaxPool2d module to capture p from / p changed after capture
        assert rel_err(A, structural_oracle(model, X)[0]) < RTOL[torch.float64]


def test_fold_is_skipped_when_the_gathered_patches_would_outgrow_the_buffer_it_replaces():
    """(K + 1)·S' = 91·16 gathered values per channel against C·S = 10·64 of ∂f/∂z: too big, unfolded."""
    model = _model(in_ch=10)
    x = torch.randn(3, 10, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    strategies, A = _strategies(model, x)
    assert strategies["conv"] != "pooled"
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
