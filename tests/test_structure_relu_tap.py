"""ReLU taps (structure/relu_tap.py): a conv's ReLU backward written straight into its ∂f/∂z buffer.

The taps must write where they may (conv → ReLU, conv → sum → ReLU), stand aside where the ReLU's
backward is not ∂f/∂z (z or the sum also feeds something else), keep ``gram`` exact in both
layouts, and never enter the training-step capture.
"""

import pytest
import torch
from helpers import RTOL, captured_gram, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.models import build_paper
from optmech.structure import EngineOptions
from optmech.structure.relu_tap import is_tap_node
from optmech.structure.rules import conv as conv_rule


@pytest.fixture
def taps(monkeypatch):
    """Every tap made during the test."""
    made = []
    original = conv_rule.tapped_relu

    def spy(t, r):
        out, tap = original(t, r)
        made.append(tap)
        return out, tap

    monkeypatch.setattr(conv_rule, "tapped_relu", spy)
    return made


def paper_model(name: str, dtype=torch.float64):
    model = build_paper(name[0], depth=int(name[1:]), seed=0).to(dtype).eval()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(5), dtype=dtype)
    return model, x


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name", ["a1", "b1"])
def test_taps_write_the_buffers_and_gram_stays_exact(name, channels_last, taps):
    """a: conv → ReLU in every block; b: also conv → (+ shortcut) → ReLU. Both layouts of the buffer."""
    options = EngineOptions(channels_last=channels_last)
    model, x = paper_model(name)
    A_ref, _ = structural_oracle(model, x)
    for _ in range(2):  # kept buffers on the second call
        taps.clear()
        A = structural_matrix(model, x, method="gram", options=options).A
        assert rel_err(A, A_ref) < RTOL[torch.float64], f"{name}: {rel_err(A, A_ref):.2e}"
        writing = [t for t in taps if t.writes]
        assert writing and all(t.writes == 10 for t in writing), "a tap writes once per class"
        if name == "b1":
            assert any(t.through is not None for t in writing), "the residual sum's ReLU is tapped too"
    taps.clear()
    assert rel_err(structural_matrix(model, x, method="gram", options=options.replace(relu_taps=False)).A, A) < 1e-12
    assert not taps


def test_float32_with_and_without_taps_agree():
    model, x = paper_model("b1", torch.float32)
    with_taps = structural_matrix(model, x, method="gram").A
    without = structural_matrix(model, x, method="gram", options=EngineOptions(relu_taps=False)).A
    assert rel_err(with_taps.double(), without.double()) < 1e-5


class SharedOutputs(nn.Module):
    """z feeds the ReLU and a second branch; in another block the sum z + y feeds the ReLU and the head."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 12 * 12, 5)

    def forward(self, x):
        z = self.conv1(x)
        h = self.act(z)
        if self.which == "z":
            h = h + 0.5 * z  # z's gradient is not the ReLU's backward alone
            return self.fc(self.conv2(h).flatten(1))
        s = self.conv2(h) + h
        return self.fc((self.act(s) + 0.25 * s).flatten(1))  # the sum feeds the ReLU and the head


@pytest.mark.parametrize("which", ["z", "sum"])
def test_no_tap_writes_where_the_relus_backward_is_not_the_layers_gradient(which, taps):
    model = SharedOutputs(which).double().eval()
    x = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    A = structural_matrix(model, x, method="gram").A
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    # "z": conv1's output feeds its ReLU and the branch; "sum": conv1 → ReLU is fine, conv2 + h feeds two
    shared = taps if which == "z" else [t for t in taps if t.through is not None]
    assert shared, "the ReLU on the layer's output (or on the sum) was tapped in the forward"
    assert not any(t.writes for t in shared), "and the tap stood aside in the backward passes"
    assert all(t.writes == 5 for t in taps if t not in shared)


class Conv1dNet(nn.Module):
    """Conv1d → ReLU with patches thick enough for the buffered contraction: the contiguous buffer layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv1d(4, 4, 5), nn.ReLU(), nn.Linear(4 * 60, 6)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_a_conv1d_tap_writes_its_contiguous_buffer(taps):
    model = Conv1dNet().double().eval()
    x = torch.randn(5, 4, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    A = structural_matrix(model, x, method="gram").A
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert [t.writes for t in taps] == [6]


def test_the_training_capture_leaves_the_relus_alone(taps):
    model, x = paper_model("b1")
    _, out, A = captured_gram(model, x)
    assert not taps
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        assert not is_tap_node(node)
        stack.extend(n for n, _ in node.next_functions)
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]


class InplaceAfterRelu(nn.Module):
    """Modifies the ReLU's output in place: ReLU's backward needs it, so autograd must refuse, tap or not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = self.act(self.conv(x))
        h.mul_(2.0)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("enabled", [True, False])
def test_an_output_modified_in_place_is_refused_as_without_the_tap(enabled):
    model = InplaceAfterRelu().double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        structural_matrix(model, x, method="gram", options=EngineOptions(relu_taps=enabled))
