"""Parameters the forward uses directly (structure/rules/direct.py): a class token or a learned query expanded, a
positional embedding added, a layer scale or temperature multiplied. Exact against the float64 oracle;
on the fast path when their one use is one of those patterns, on the generic path (still exact) when not."""

import pytest
import torch
from helpers import RTOL, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.structure.rules import direct


class TinyViT(nn.Module):
    """Patch convolution, a class token (expand + cat), a positional embedding (add), an encoder layer with
    ``nn.MultiheadAttention``, a layer scale (mul), LayerNorm, the class token's row to a Linear head."""

    def __init__(self, dim: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (8 // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.5)
        self.block = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat((self.cls.expand(h.shape[0], -1, -1), h), dim=1)
        assert self.pos.shape[1] == h.shape[1] and self.pos.dim() == 3  # metadata reads are not uses
        h = h + self.pos
        h = self.block(h) * self.scale
        return self.head(self.norm(h)[:, 0])


class Temperature(nn.Module):
    """Logits divided by a learned temperature written as a product with a scalar parameter, applied last."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.t = nn.Linear(4, 3), nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return self.fc(x) * self.t


class SequenceFirstPositions(nn.Module):
    """A positional embedding (L, 1, E) added to sequence-first activations (L, n, E): the samples lie along
    the second dimension of the add's result (found by the backward check, as for sequence-first layers)."""

    def __init__(self, L: int) -> None:
        super().__init__()
        self.fc, self.pos, self.head = nn.Linear(3, 4), nn.Parameter(torch.randn(L, 1, 4)), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3)
        return self.head(torch.tanh(self.fc(x.transpose(0, 1)) + self.pos).mean(0))


class ExpandedTwice(nn.Module):
    """The expanded class token concatenated and also added: ∂f/∂(expanded) gathers both."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.cls = nn.Linear(4, 4), nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x):  # (n, L, 4)
        e = self.cls.expand(x.shape[0], -1, -1)
        h = torch.cat((e, torch.tanh(self.fc(x))), dim=1)
        return (h.mean(1) + e[:, 0]).tanh()


class AttentionPooling(nn.Module):
    """A learned query expanded over the batch attends to the tokens (cross-attention, key is value): the
    query parameter and the attention layer both on the fast path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.query = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 1, 4))
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3)
        h = torch.tanh(self.fc(x))
        return self.head(self.att(self.query.expand(x.shape[0], -1, -1), h, h, need_weights=False)[0][:, 0])


class PlainAttention(nn.Module):
    """Multi-head self-attention written with Linear layers and matmuls (no nn.MultiheadAttention), pre-norm."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.norm = heads, nn.LayerNorm(dim)
        self.to_qkv, self.to_out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        n, L, d = x.shape
        q, k, v = (t.reshape(n, L, self.heads, -1).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(n, L, d))


class SlicedPositionsViT(nn.Module):
    """A ViT written the way many research codebases write it: the class token reshaped and expanded (as
    ``einops.repeat`` does), concatenated, then ``x += pos[:, :(L + 1)]`` (a slice of a longer positional
    embedding, added in place), a residual pre-norm attention block, the class token's row to the head."""

    def __init__(self, dim: int = 8, max_tokens: int = 9) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls_token = nn.Parameter(torch.randn(dim) * 0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, max_tokens, dim) * 0.5)
        self.attn, self.norm, self.head = PlainAttention(dim), nn.LayerNorm(dim), nn.Linear(dim, 3)

    def forward(self, x):  # (n, L, 4), L + 1 ≤ max_tokens
        h = self.embed(x)
        n, L, d = h.shape
        h = torch.cat((self.cls_token.reshape(1, 1, d).expand(n, -1, -1), h), dim=1)
        h += self.pos_embedding[:, : L + 1]
        h = h + self.attn(h)
        return self.head(self.norm(h)[:, 0])


class SlicedScale(nn.Module):
    """A per-position scale read through a transpose and a slice, multiplied (out of place)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.scale, self.head = nn.Linear(3, 4), nn.Parameter(torch.rand(4, 6) + 0.5), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3), L ≤ 6
        return self.head((torch.tanh(self.fc(x)) * self.scale.t()[: x.shape[1]]).mean(1))


@pytest.mark.parametrize("case", ["vit", "temperature", "sequence-first, L ≠ n", "sequence-first, L = n", "expanded twice",
                                  "attention pooling", "attention pooling, L = n", "sliced positions, in place",
                                  "sliced scale"])
def test_direct_uses_are_exact_and_take_no_generic_path(case):
    torch.manual_seed(0)
    if case == "sliced positions, in place":
        model, x = SlicedPositionsViT(), torch.randn(6, 3, 4)  # 4 tokens: as many as samples would leave the last
        # layers ambiguous (only the class token reaches the head; see test_structure_attention)
    elif case == "sliced scale":
        model, x = SlicedScale(), torch.randn(5, 4, 3)
    elif case == "expanded twice":
        model, x = ExpandedTwice(), torch.randn(5, 3, 4)
    elif case.startswith("attention pooling"):
        model, x = AttentionPooling(), torch.randn(5, 5 if case.endswith("L = n") else 3, 3)
    elif case == "vit":
        model, x = TinyViT(), torch.randn(8, 1, 8, 8)  # 8 samples, 5 tokens, 8 features
    elif case.startswith("sequence-first"):
        L = 5 if case.endswith("L = n") else 3
        model, x = SequenceFirstPositions(L), torch.randn(5, L, 3)
    else:
        model, x = Temperature(), torch.randn(6, 4)
    model, x = model.double().eval(), x.double()
    A_ref = structural_oracle(model, x)[0]
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    _, groups_ref = _r.A, _r.per_layer
    for _ in range(2):
        _r = structural_matrix(model, x, method="gram", per_layer=True)
        A, groups = _r.A, _r.per_layer
        assert rel_err(A, A_ref) < RTOL[torch.float64]
        assert not _r.route.generic()
    assert "direct" in _r.route.rules().values()
    for name, part in groups.items():  # the direct parameters are grouped under "(root)", as the generic path groups them
        assert rel_err(part, groups_ref[name]) < RTOL[torch.float64], name


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(torch.tanh(self.fc(x) + self.p) + self.p)


class InPlaceAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = self.fc(x) + self.p
        h.mul_(2.0)  # the add's result is changed after the add
        return torch.tanh(h)


class _Square(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(p):
        return p * p

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return 2 * p * g


class UnseenUse(nn.Module):
    """A use the torch-function mode cannot see (a custom autograd Function) besides an add it can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(self.fc(x) + self.p) * _Square.apply(self.p).sum()


class Subtracted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(self.fc(x) - self.p)


class ScaledAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.tanh(torch.add(self.fc(x), self.p, alpha=2.0))


class ExpandedOverPositions(nn.Module):
    """A parameter expanded over the positions, not the samples: no dimension of the result holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(1, 4))

    def forward(self, x):  # (n, L, 4)
        return torch.tanh(self.fc(x) + self.p.expand(x.shape[1], -1)).mean(1)


class TensorIndexed(nn.Module):
    """Positions picked with a tensor of indices (advanced indexing may repeat entries): not followed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(1, 6, 4))

    def forward(self, x):  # (n, 3, 4)
        return torch.tanh(self.fc(x) + self.p[:, torch.tensor([0, 2, 2])]).mean(1)


class ViewUsedTwice(nn.Module):
    """A slice added, and the same slice read again through a custom autograd Function (unseen)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(6, 4))

    def forward(self, x):  # (n, 4)
        v = self.p[2]
        return torch.tanh(self.fc(x) + v) * _Square.apply(v).sum()


class ScaledInPlace(nn.Module):
    """x *= scale in place: the product's gradient needs x as it was before."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        h = self.fc(x) + 1.0
        h *= self.p
        return torch.tanh(h)


class AddedIntoAView(nn.Module):
    """x[:, 1:].add_(P): the target is a view of x (the logits read x, not the view's new version)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p = nn.Linear(4, 4), nn.Parameter(torch.randn(2, 4))

    def forward(self, x):  # (n, 3, 4)
        h = self.fc(x)
        h[:, 1:].add_(self.p)
        return torch.tanh(h).mean(1)


@pytest.mark.parametrize("make, shape", [
    (Twice, (5, 4)), (InPlaceAfter, (5, 4)), (UnseenUse, (5, 4)), (Subtracted, (5, 4)), (ExpandedOverPositions, (5, 3, 4)),
    (TensorIndexed, (5, 3, 4)), (ViewUsedTwice, (5, 4)), (ScaledInPlace, (5, 4)), (AddedIntoAView, (5, 3, 4)),
    (ScaledAdd, (5, 4)),
])
def test_uses_the_fast_path_does_not_follow_go_to_the_generic_path(make, shape):
    torch.manual_seed(1)
    model = make().double().eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for _ in range(2):
        _r = structural_matrix(model, x, method="gram")
        assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
        assert "p" in _r.route.generic() and _r.route.generic()["p"]


def test_the_watch_only_runs_when_parameters_are_left(monkeypatch):
    """Models whose parameters all sit in fast layers run their forward without the torch-function mode."""
    entered = []
    original = direct.RawUses.__enter__
    monkeypatch.setattr(direct.RawUses, "__enter__", lambda self: (entered.append(1), original(self))[1])
    structural_matrix(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4), method="gram")
    assert entered == []
    structural_matrix(Temperature(), torch.randn(2, 4), method="gram")
    assert entered == [1]


def test_as_many_tokens_as_samples_leaves_only_the_ambiguous_direct_parameter_to_the_generic_path():
    """5 samples and 5 tokens: the layer scale (broadcast over samples and tokens) cannot tell them apart and
    goes generic; the positional embedding and the class token vary along the tokens, so the samples are first."""
    torch.manual_seed(0)
    model, x = TinyViT().double().eval(), torch.randn(5, 1, 8, 8, dtype=torch.float64)
    _r = structural_matrix(model, x, method="gram")
    assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert "scale" in _r.route.generic() and not {"cls", "pos"} & set(_r.route.generic())
    assert _r.route["cls"].rule == _r.route["pos"].rule == "direct"
