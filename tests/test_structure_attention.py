"""``nn.MultiheadAttention`` on ``gram``'s fast path (structure/attention.py) and layers whose samples are
not along their first dimension (structure/samples.py): exact against the float64 oracle, with the
generic path unused where the fast path covers the model and used (still exact) where it does not."""

import pytest
import torch
from torch import nn

from helpers import RTOL, rel_err
from oracles import structural_oracle
from optmech import structural_matrix
from optmech.structure import attention, capture, passes as backward_passes
from optmech.structure._context import probing, trainable_parameters


class Encoder(nn.Module):
    """Tokens -> embedding -> two ``nn.TransformerEncoderLayer`` (either layout) with the padding masked -> mean -> logits."""

    def __init__(self, batch_first: bool, causal: bool = False, bias: bool = True, vocab: int = 9, dim: int = 8) -> None:
        super().__init__()
        self.batch_first, self.causal = batch_first, causal
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.1, batch_first=batch_first, bias=bias) for _ in range(2)
        )
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h if self.batch_first else h.transpose(0, 1)
        L = tokens.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool).triu(1) if self.causal else None  # bool, like the padding mask
        for layer in self.layers:
            h = layer(h, src_mask=mask, src_key_padding_mask=tokens == 0, is_causal=self.causal)
        return self.head(h.mean(1 if self.batch_first else 0))


class DirectAttention(nn.Module):
    """An ``nn.MultiheadAttention`` called directly (need_weights at its default, True), sequence-first, with
    a float causal mask given as ``attn_mask`` and a float key-padding mask."""

    def __init__(self, dim: int = 6, use_weights: bool = False) -> None:
        super().__init__()
        self.inp, self.att, self.head = nn.Linear(3, dim), nn.MultiheadAttention(dim, 3), nn.Linear(dim, 4)
        self.use_weights = use_weights

    def forward(self, x):  # (n, L, 3)
        h = torch.tanh(self.inp(x)).transpose(0, 1)
        L, n = h.shape[:2]
        causal = torch.zeros(L, L, dtype=h.dtype).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        last = torch.where(x[:, -1:, 0] > 0, float("-inf"), 0.0)  # the last key of some samples, from their own data
        pad = torch.cat([torch.zeros(n, L - 1, dtype=h.dtype), last], 1)
        y, weights = self.att(h, h, h, attn_mask=causal, key_padding_mask=pad)
        out = y.mean(0)
        return self.head(out + weights.sum((1, 2))[:, None] if self.use_weights else out)


def tokens(n: int, L: int, seed: int = 0) -> torch.Tensor:
    t = torch.randint(1, 9, (n, L), generator=torch.Generator().manual_seed(seed))
    t[1, L - 2 :] = 0
    return t


CASES = {
    "batch-first": lambda: (Encoder(batch_first=True), tokens(5, 6)),
    "sequence-first": lambda: (Encoder(batch_first=False), tokens(5, 6)),
    "sequence-first, L = n": lambda: (Encoder(batch_first=False), tokens(6, 6)),
    "causal, no biases": lambda: (Encoder(batch_first=True, causal=True, bias=False), tokens(4, 5)),
    "direct call, masks": lambda: (DirectAttention(), torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_models_are_exact_and_take_no_generic_path(case, generic):
    torch.manual_seed(0)
    model, x = CASES[case]()
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    A_ref = structural_oracle(model, x)[0]
    _, groups_ref = structural_matrix(model, x, method="loop", per_layer=True)
    for _ in range(2):  # kept buffers and stand-ins on the second call
        A, groups = structural_matrix(model, x, method="gram", per_layer=True)
        assert rel_err(A, A_ref) < RTOL[torch.float64], f"{case}: {rel_err(A, A_ref):.2e}"
    assert generic == []
    assert any(name.endswith("self_attn") or name.endswith("att") for name in groups)
    for name, part in groups.items():  # the projections are grouped as the oracle groups them
        assert rel_err(part, groups_ref[name]) < RTOL[torch.float64], name


def test_float32_agrees_with_the_float64_oracle():
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    A = structural_matrix(model.eval(), x, method="gram")
    A_ref = structural_oracle(model.double(), x)[0]
    assert rel_err(A.double(), A_ref) < 1e-4


class CrossAttention(nn.Module):
    """Queries from one projection, keys and values from another: not covered (query is not key)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.att, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        kv = self.kv(x)
        return self.head(self.att(self.q(x), kv, kv, need_weights=False)[0].mean(1))


class BiasKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(3, 1, add_bias_kv=True, batch_first=True), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.att(x, x, x)[0].mean(1))


@pytest.mark.parametrize(
    "make, generic_names",
    [
        (CrossAttention, {"att.in_proj_weight", "att.in_proj_bias", "att.out_proj.weight", "att.out_proj.bias"}),
        (BiasKV, {"att.in_proj_weight", "att.in_proj_bias", "att.bias_k", "att.bias_v", "att.out_proj.weight", "att.out_proj.bias"}),
        # the model reads the attention weights: in_proj has a second path to the logits; out_proj has not
        (lambda: DirectAttention(use_weights=True), {"att.in_proj_weight", "att.in_proj_bias"}),
    ],
)
def test_uncovered_attention_goes_to_the_generic_path_and_stays_exact(make, generic_names, generic):
    torch.manual_seed(2)
    model = make().double().eval()
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    A = structural_matrix(model, x, method="gram")
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert len(generic) == 1 and set(generic[0]) == generic_names


def test_a_recomputation_that_does_not_match_the_module_is_not_used(monkeypatch, generic):
    """The hook checks its output against the module's: one that ignores the padding mask is refused."""
    original = attention.self_attention

    def no_padding_mask(module, x, key_padding_mask=None, attn_mask=None, is_causal=False, need_weights=False):
        return original(module, x, None, attn_mask, is_causal, need_weights)

    monkeypatch.setattr(attention, "self_attention", no_padding_mask)
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    model = model.double().eval()
    A = structural_matrix(model, x, method="gram")
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert len(generic) == 1 and {name.rsplit(".", 2)[-2] for name in generic[0]} == {"self_attn", "out_proj"}


def test_the_training_step_capture_leaves_attention_as_the_model_runs_it():
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    model = model.double().eval()
    cap = capture.ForwardCapture(model, trainable_parameters(model))  # as the probe's training-step capture
    assert cap.attention == [] and any("in_proj_weight" in name for name in cap.rest)
    with probing(model):
        with cap, torch.enable_grad():
            out = model(x)
        assert torch.equal(out, model(x))  # bit for bit: no recomputed attention in the model's graph
        A = cap.structural_matrix(out, x, n_classes=out.shape[1])
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]


class SequenceFirstLinear(nn.Module):
    """A Linear and a LayerNorm that see (L, n, ·): their first dimension is the sequence, not the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3)
        h = self.norm(torch.tanh(self.lin(x.transpose(0, 1))))
        return self.head(h.mean(0))


class SequenceFirstEmbedding(nn.Module):
    """Tokens (n, L) read sequence-first: the Embedding sees (L, n)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(6, 4), nn.Linear(4, 2)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens.t())).mean(0))


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("n, L", [(4, 4), (4, 5), (4, 1)])
@pytest.mark.parametrize("make", [SequenceFirstLinear, SequenceFirstEmbedding])
def test_layers_whose_samples_are_not_the_first_dimension(make, n, L, one_pass, monkeypatch, generic):
    """L = n used to be read as samples first (6 % off); L ≠ n raised. Now the samples' dimension is found,
    in both backward forms (one pass for all classes hands the accumulators all C at once)."""
    if not one_pass:
        monkeypatch.setattr(backward_passes, "_PASS_BYTES", 0)
    torch.manual_seed(4)
    model = make().double().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 6, (n, L), generator=g) if make is SequenceFirstEmbedding else torch.randn(n, L, 3, generator=g, dtype=torch.float64)
    A = structural_matrix(model, x, method="gram")
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert generic == []


class FoldedSamples(nn.Module):
    """A Linear on (n·L, 3): no dimension of size n, so its rows are not the samples'."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3)
        n, L = x.shape[:2]
        return self.head(torch.tanh(self.lin(x.reshape(n * L, 3))).reshape(n, L, 4).mean(1))


class OnlyFirstPosition(nn.Module):
    """L = n and only position 0 reaches the logits: sample 0's gradient sits at [0, 0] alone, so neither
    dimension can be told from the other."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):  # (n, n, 3)
        return self.head(torch.tanh(self.lin(x))[:, 0])


@pytest.mark.parametrize("make", [FoldedSamples, OnlyFirstPosition])
def test_layers_whose_samples_cannot_be_found_go_to_the_generic_path(make, generic):
    torch.manual_seed(6)
    model = make().double().eval()
    x = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    A = structural_matrix(model, x, method="gram")
    assert rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert generic == [["lin.weight", "lin.bias"]]


def test_attention_backward_takes_one_class_per_pass(passes):
    """The fused attention backward has no batching rule: the one vmapped pass would loop (and warn)."""
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    structural_matrix(model.eval(), x, method="gram")
    assert passes == [False]
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # no attention, no convolution: one pass
    structural_matrix(model, torch.randn(5, 3), method="gram")
    assert passes == [False, True]


def test_self_attention_steps_match_the_functional_forward():
    """The three steps against ``F.multi_head_attention_forward`` itself, float64, every mask kind."""
    torch.manual_seed(8)
    m = nn.MultiheadAttention(6, 2, batch_first=True).double().eval()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    bool_mask = torch.ones(4, 4, dtype=torch.bool).triu(1)
    kpm = torch.tensor([[False, False, False, True]] * 3)
    float_kpm = torch.zeros(3, 4, dtype=torch.float64).masked_fill(kpm, float("-inf"))
    for kw in ({}, {"attn_mask": bool_mask}, {"key_padding_mask": kpm}, {"attn_mask": bool_mask, "key_padding_mask": kpm},
               {"attn_mask": bool_mask.double() * -1e9, "key_padding_mask": float_kpm},
               {"attn_mask": torch.randn(6, 4, 4, dtype=torch.float64)}):
        expected = m(x, x, x, need_weights=False, **kw)[0]
        _, _, y = attention.self_attention(m, x, kw.get("key_padding_mask"), kw.get("attn_mask"))
        assert rel_err(y.detach(), expected.detach()) < 1e-13, kw


def test_auto_takes_gram_on_a_covered_transformer_without_timing_jacobian(monkeypatch):
    from optmech import structure
    from optmech.structure import EngineMethod

    monkeypatch.setitem(structure._METHODS, EngineMethod.JACOBIAN, lambda *a: pytest.fail("jacobian ran"))
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    A, ran = structural_matrix(model.double().eval(), x, method="auto", return_method=True)
    assert ran == "gram" and rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
