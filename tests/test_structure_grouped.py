"""Grouped convolutions (``groups`` > 1, depthwise included) on the fast path (structure/grouped.py), against the oracle.

A grouped convolution is g convolutions of its own, contracted as a batch of n·g; these tests check
both contraction forms, both ways the classes arrive (one pass, C passes), every group layout
(depthwise with a channel multiplier, two groups, Conv1d), and that no path meant for ungrouped
convolutions (the pool fold, the ReLU taps, the per-class products) takes one.
"""

import pytest
import torch
from helpers import RTOL, by_class_and_at_once, per_class_gradients, rel_err
from torch import nn

from optmech import structural_matrix
from optmech.structure import EngineOptions, ForwardCapture, grouped, probing, trainable_parameters
from optmech.structure.cache import Workspace


def _separable():
    """Depthwise (×2 channels, bias) → ReLU → MaxPool, then a strided dilated two-group conv without bias, a
    pointwise conv, a head: the grouped convs sit behind convolution backwards (C passes)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False), nn.Tanh(),
        nn.Conv2d(6, 6, 1), nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    ).double(), torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _grouped_first():
    """A grouped Conv1d first (no convolution backward on the way: the one vmapped pass) and a depthwise Conv2d."""
    torch.manual_seed(2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(6, 9, 3, padding=1, groups=3)
            self.depthwise = nn.Conv2d(3, 3, 3, groups=3)
            self.head = nn.Linear(9 * 7 + 3 * 4 * 4, 4)

        def forward(self, x):
            seq, img = x[:, :42].reshape(-1, 6, 7), x[:, 42:].reshape(-1, 3, 6, 6)
            return self.head(torch.cat([torch.tanh(self.conv1d(seq)).flatten(1), torch.tanh(self.depthwise(img)).flatten(1)], 1))

    return Net().double(), torch.randn(4, 42 + 108, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _grouped_pooled():
    """Grouped conv → ReLU → MaxPool2d(4), shaped so that the pool fold would take an ungrouped conv of these
    shapes (its gathered patches fit, its cost is within bounds): the fold must leave the grouped one alone."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(16, 5))
    return model.double(), torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


CASES = {"separable": _separable, "grouped_first": _grouped_first, "grouped_pooled": _grouped_pooled}


@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_convolutions_match_the_oracle_in_both_forms(case, strategy):
    model, x = CASES[case]()
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    reference, ref_parts = _r.A, _r.per_layer
    _r = structural_matrix(model, x, method="gram", per_layer=True, options=EngineOptions(contraction=strategy))
    A, parts, ran = _r.A, _r.per_layer, _r.method
    assert ran == "gram"
    assert rel_err(A, reference) < RTOL[torch.float64]
    for name, part in parts.items():
        assert rel_err(part, ref_parts[name]) < RTOL[torch.float64], name


def test_grouped_convolutions_are_fast_layers_and_take_no_ungrouped_path(passes):
    """Every grouped conv is contracted as a batch of its groups (not the pool fold, a ReLU tap or the generic path),
    whichever pass form."""
    for case, one_pass in (("separable", False), ("grouped_first", True), ("grouped_pooled", True)):
        passes.clear()
        model, x = CASES[case]()
        route = structural_matrix(model, x, method="gram").route
        grouped_names = {name for name, m in model.named_modules() if getattr(m, "groups", 1) > 1}
        assert grouped_names
        for name in grouped_names:
            assert route[f"{name}.weight"].rule == "conv" and route[f"{name}.weight"].form in ("ghost", "materialise")
        assert passes == [one_pass]


def test_all_classes_at_once_equals_class_by_class():
    for case in CASES:
        layers, C = per_class_gradients(*CASES[case]())
        for layer, a, bs in layers:
            if getattr(layer.module, "groups", 1) == 1:
                continue
            for strategy in ("ghost", "materialise"):
                expected, at_once = by_class_and_at_once(lambda: grouped.GroupedConvGram(layer.module, a, C, Workspace(), strategy), bs)
                assert rel_err(at_once, expected) < 1e-13, (case, layer.name, strategy)


def test_depthwise_separable_network_in_float32_and_channels_last_inputs():
    """float32 (the benchmark's dtype) within its tolerance, with the input already in channels-last."""
    model, x = _separable()
    reference = structural_matrix(model, x, method="loop").A
    A = structural_matrix(model.float(), x.float().contiguous(memory_format=torch.channels_last), method="gram").A
    assert rel_err(A.double(), reference) < RTOL[torch.float32]


def test_relu_taps_only_on_ungrouped_convolutions():
    """A tap writes into a ∂f/∂z buffer only an ungrouped conv's sink has: a grouped conv's ReLU is not tapped."""
    model, x = _separable()
    capture = ForwardCapture(model, trainable_parameters(model), EngineOptions.training_step().replace(relu_taps=True))
    with probing(model), capture, torch.enable_grad():
        model(x)
        taps = capture.scratch["conv"].taps
    assert {name for name, m in model.named_modules() if id(m) in taps} == {"0"}  # not "2", the depthwise conv
