"""One backward pass for all C classes, or C passes (structure/passes.py, ``one_pass``), against the oracle.

The choice only changes the speed: both must give A to 1e-10 in float64. The single vmapped pass is
taken where no convolution backward runs, no ReLU tap writes and one class's ∂f/∂z is small; these
tests check that each condition is seen, and the graph walk that decides the first. In the single
pass every layer's sink takes the (C, n, ...) gradient whole (``add_classes``): the last tests check
each sink kind against C ``add`` calls.
"""

import pytest
import torch
from helpers import RTOL, accumulator, by_class_and_at_once, per_class_gradients, rel_err, unusual_models
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.models import build
from optmech.structure import EngineOptions, layer_gram
from optmech.structure import graph as graph_facts


def _conv_tanh(channels=3):
    """The only convolution comes first: the passes stop at its output."""
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(channels * 64, 6), nn.Tanh(), nn.Linear(6, 4))


def _conv_relu():
    """A ReLU (not in place) on the first convolution: its tap writes b_c, one class per pass."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 64, 4))


class _ReluSharedZ(nn.Module):
    """z feeds the ReLU and a second branch: the tap is made but stands aside, and runs inside the vmapped pass."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Linear(3 * 64 + 3, 4)

    def forward(self, x):
        z = self.conv(x)
        return self.head(torch.cat([self.act(z).flatten(1), z.mean((2, 3))], 1))


def _two_convs():
    """The second convolution's input gradient is on the way to the first's output."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 64, 4))


class _Sequence(nn.Module):
    """Rows of the image as 8 tokens: a Linear over positions (buffered, S = 8) and a vector head."""

    def __init__(self):
        super().__init__()
        self.tokens, self.head = nn.Linear(8, 3), nn.Linear(24, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.tokens(x.flatten(1, 2))).flatten(1))  # tokens: (n, 8, 8) -> (n, 8, 3)


CASES = {
    # name: (model builder, input shape, one pass on the CPU at batch 5 in float64)
    "snet": (lambda: build("snet", depth=2, skip=True, input_shape=(1, 8, 8), n_classes=4), (1, 8, 8), True),  # conv folded at its pool
    "mlp": (lambda: build("mlp", depth=2, skip=False, input_shape=(1, 8, 8), n_classes=4), (1, 8, 8), True),
    "conv_first": (_conv_tanh, (1, 8, 8), True),
    "conv_relu_tap": (_conv_relu, (1, 8, 8), False),
    "conv_relu_shared_z": (_ReluSharedZ, (1, 8, 8), True),
    "two_convs": (_two_convs, (1, 8, 8), False),
    "cnet2": (lambda: build("cnn", depth=2, skip=True, input_shape=(1, 8, 8), n_classes=4), (1, 8, 8), False),
    "sequence": (_Sequence, (1, 8, 8), True),  # a Linear over positions: its buffer filled in one copy
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_choice_and_exactness(name, passes):
    make, shape, one_pass = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(5, *shape, dtype=torch.float64)
    A = structural_matrix(model, x, method="gram").A
    assert passes == [one_pass]
    A_ref, _ = structural_oracle(model, x)
    assert rel_err(A, A_ref) < RTOL[torch.float64]


@pytest.mark.parametrize("name", ["snet", "mlp", "conv_first", "sequence"])
def test_one_pass_equals_c_passes(name, passes):
    make, shape, _ = CASES[name]
    torch.manual_seed(1)
    model = make().double().eval()
    x = torch.randn(7, *shape, dtype=torch.float64)
    A_one = structural_matrix(model, x, method="gram").A
    A_many = structural_matrix(model, x, method="gram", options=EngineOptions(pass_bytes=0)).A  # "too large": C passes
    assert passes == [True, False]
    assert rel_err(A_one, A_many) < 1e-12


def test_large_gradients_take_c_passes(passes):
    """One class's ∂f/∂z over all layers above ``pass_bytes``: C passes (a C-fold fresh tensor costs more)."""
    torch.manual_seed(2)
    model = _conv_tanh(channels=4).eval()
    x = torch.randn(6, 1, 8, 8)
    per_class = 6 * (4 * 64 + 6) * 4  # bytes of the conv's and the hidden Linear's outputs, float32 (the logits layer reads none)
    structural_matrix(model, x, method="gram", options=EngineOptions(pass_bytes=per_class))
    structural_matrix(model, x, method="gram", options=EngineOptions(pass_bytes=per_class - 1))
    assert passes == [True, False]


def _graph(model, x, at):
    """(logits, the outputs of the modules ``at``), from a forward with hooks."""
    outs = {}
    handles = [model[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i in at]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, [outs[i] for i in at]


def test_backward_runs_convolution_walks_only_what_autograd_runs():
    torch.manual_seed(3)
    model = _two_convs()
    x = torch.randn(2, 1, 8, 8)
    out, zs = _graph(model, x, [2, 5])  # second conv and the Linear: the first conv's backward does not run
    assert not graph_facts.backward_runs(out, zs, graph_facts.graph_uses(out), ("Convolution",))
    out, zs = _graph(model, x, [0, 5])  # first conv: the passes go through the second conv's backward
    assert graph_facts.backward_runs(out, zs, graph_facts.graph_uses(out), ("Convolution",))
    out, zs = _graph(model, x, [0])
    assert graph_facts.backward_runs(out, zs, graph_facts.graph_uses(out), ("Convolution",))
    out, zs = _graph(model, x, [5])
    assert not graph_facts.backward_runs(out, zs, graph_facts.graph_uses(out), ("Convolution",))
    # a shared node: the head reads both convolutions' outputs; z = the first's output is reached through the second too
    conv1, conv2, head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Linear(4 * 64, 3)
    z1 = conv1(x)
    z2 = conv2(torch.tanh(z1))
    out = head(torch.cat([z1, z2], 1).flatten(1))
    assert graph_facts.backward_runs(out, [z1], graph_facts.graph_uses(out), ("Convolution",))
    assert not graph_facts.backward_runs(out, [z2], graph_facts.graph_uses(out), ("Convolution",))


@pytest.mark.parametrize("immediate_ratio", [0, 10**9])
@pytest.mark.parametrize("strategy", ["ghost", "materialise"])
def test_all_classes_at_once_equals_class_by_class(strategy, immediate_ratio, monkeypatch):
    """``add_classes`` (the one-pass form: one tensor of all C) gives each layer's contribution of C ``add`` calls."""
    monkeypatch.setattr(layer_gram, "_IMMEDIATE_RATIO", immediate_ratio)  # 0: never per class; 10⁹: always
    layers, C = per_class_gradients(*unusual_models()["sequence_conv1d"])  # Conv1d, Linear over positions, vector Linear
    for layer, a, bs in layers:
        expected, at_once = by_class_and_at_once(lambda: accumulator(layer, a, C, strategy), bs)
        assert rel_err(at_once, expected) < 1e-13, layer.name


def _embedding_per_position():
    """An Embedding whose gradient differs from position to position (the unusual model averages them), with
    tokens repeated within a sample (3 ids, 5 positions), so that the token-equality Γ is not the identity."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Embedding(3, 6), nn.Flatten(), nn.Linear(30, 4)).double()
    return model, torch.randint(0, 3, (6, 5), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("name", ["layernorm_gelu", "batchnorm_eval", "embedding"])
def test_norm_and_embedding_layers_take_all_classes_at_once(name):
    layers, C = per_class_gradients(*(_embedding_per_position() if name == "embedding" else unusual_models()[name]))
    kinds = set()
    for layer, a, bs in layers:
        expected, at_once = by_class_and_at_once(lambda: accumulator(layer, a, C), bs)
        kinds.add(type(accumulator(layer, a, C)).__name__)
        assert rel_err(at_once, expected) < 1e-13, layer.name
    assert kinds >= {"layernorm_gelu": {"NormGram"}, "batchnorm_eval": {"NormGram"}, "embedding": {"EmbeddingGram"}}[name]
