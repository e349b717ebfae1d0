"""``nn.MultiheadAttention`` on ``gram``'s fast path (structure/rules/attention.py) and layers whose samples are
not along their first dimension (structure/samples.py): exact against the float64 oracle, with the
generic path unused where the fast path covers the model and used (still exact) where it does not."""

import pytest
import torch
from helpers import RTOL, rel_err
from oracles import structural_oracle
from torch import nn

from optmech import structural_matrix
from optmech.structure import EngineOptions, ForwardCapture, GenericPathWarning, probing, trainable_parameters
from optmech.structure.rules import attention


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


class CrossAttention(nn.Module):
    """Queries from one projection, keys and values (``key is value``) from another, over another number of
    positions (the first ``queries`` rows), batch-first: the in-projection as an E → E and an E → 2E block."""

    def __init__(self, queries: int = 3) -> None:
        super().__init__()
        self.q, self.kv, self.att, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)
        self.queries = queries

    def forward(self, x):
        kv = self.kv(x)
        return self.head(self.att(self.q(x[:, : self.queries]), kv, kv, need_weights=False)[0].mean(1))


class ThreeInputs(nn.Module):
    """query, key and value all different tensors, sequence-first, a bool (L_q, L_k) mask and a key-padding
    mask; with ``kdim``/``vdim`` the weights are three separate parameters (q/k/v_proj_weight)."""

    def __init__(self, separate: bool = False, bias: bool = True) -> None:
        super().__init__()
        kdim, vdim = (5, 2) if separate else (None, None)
        self.q, self.k, self.v = nn.Linear(3, 4), nn.Linear(3, kdim or 4), nn.Linear(3, vdim or 4)
        self.att, self.head = nn.MultiheadAttention(4, 2, kdim=kdim, vdim=vdim, bias=bias), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3): queries from the first 3 positions, keys and values from all
        h = x.transpose(0, 1)
        Lq, Lk = 3, h.shape[0]
        mask = torch.zeros(Lq, Lk, dtype=torch.bool)
        mask[0, -1] = True
        pad = x[:, :, 0] > 1.0  # some keys of some samples, from their own data
        pad[:, 1] = False
        y = self.att(self.q(h[:Lq]), torch.tanh(self.k(h)), self.v(h), attn_mask=mask, key_padding_mask=pad)[0]
        return self.head(y.mean(0))


class QueryIsKey(nn.Module):
    """query is key, value another tensor: the packed weight as an E → 2E block and an E → E one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.att, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.MultiheadAttention(4, 1, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head(self.att(h, h, torch.tanh(self.b(x)), need_weights=False)[0].mean(1))


class Decoder(nn.Module):
    """A sequence-first ``nn.TransformerDecoderLayer`` (causal self-attention, then cross-attention to an
    encoded memory with its padding masked): both attention modules on the fast path."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.src, self.tgt = nn.Linear(3, dim), nn.Linear(3, dim)
        self.layer = nn.TransformerDecoderLayer(dim, 2, 16, dropout=0.0)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # (n, L, 3): the memory from all positions, the target from the first 4
        memory = torch.tanh(self.src(x)).transpose(0, 1)
        tgt = self.tgt(x[:, :4]).transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(4, dtype=x.dtype)
        pad = x[:, :, 0] > 1.5  # some memory positions of some samples, from their own data
        pad[:, 0] = False
        y = self.layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
        return self.head(y.mean(0))


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
    "cross-attention, key is value": lambda: (CrossAttention(), torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))),
    "cross-attention, L_k = n": lambda: (CrossAttention(2), torch.randn(5, 5, 3, generator=torch.Generator().manual_seed(1))),
    "three inputs, masks": lambda: (ThreeInputs(), torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))),
    "separate q/k/v weights": lambda: (ThreeInputs(separate=True), torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))),
    "separate q/k/v weights, no biases": lambda: (ThreeInputs(separate=True, bias=False), torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))),
    "query is key": lambda: (QueryIsKey(), torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1))),
    "decoder layer": lambda: (Decoder(), torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_models_are_exact_and_take_no_generic_path(case):
    torch.manual_seed(0)
    model, x = CASES[case]()
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    A_ref = structural_oracle(model, x)[0]
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    _, groups_ref = _r.A, _r.per_layer
    for _ in range(2):  # kept buffers and stand-ins on the second call
        _r = structural_matrix(model, x, method="gram", per_layer=True)
        A, groups = _r.A, _r.per_layer
        assert rel_err(A, A_ref) < RTOL[torch.float64], f"{case}: {rel_err(A, A_ref):.2e}"
        assert not _r.route.generic()
    assert "attention" in _r.route.rules().values()
    attention_paths = {path for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    assert attention_paths <= set(groups) and {f"{p}.out_proj" for p in attention_paths} <= set(groups)
    for name, part in groups.items():  # the projections are grouped as the oracle groups them
        assert rel_err(part, groups_ref[name]) < RTOL[torch.float64], name


def test_float32_agrees_with_the_float64_oracle():
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    A = structural_matrix(model.eval(), x, method="gram").A
    A_ref = structural_oracle(model.double(), x)[0]
    assert rel_err(A.double(), A_ref) < 1e-4


class BiasKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(3, 1, add_bias_kv=True, batch_first=True), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.att(x, x, x)[0].mean(1))


@pytest.mark.parametrize(
    "make, generic_names",
    [
        (BiasKV, {"att.in_proj_weight", "att.in_proj_bias", "att.bias_k", "att.bias_v", "att.out_proj.weight", "att.out_proj.bias"}),
        # the model reads the attention weights: in_proj has a second path to the logits; out_proj has not
        (lambda: DirectAttention(use_weights=True), {"att.in_proj_weight", "att.in_proj_bias"}),
    ],
)
def test_uncovered_attention_goes_to_the_generic_path_and_stays_exact(make, generic_names):
    torch.manual_seed(2)
    model = make().double().eval()
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _r = structural_matrix(model, x, method="gram")
    assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert set(_r.route.generic()) == generic_names


class OneKeyAttended(nn.Module):
    """Cross-attention (key is value, L_k = n) whose padding mask leaves only key 0: the keys-and-values
    block's gradient for sample 0 sits at position 0 alone, so its samples' dimension cannot be told."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.att, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):  # (n, L, 3)
        kv = self.kv(x)
        pad = torch.ones(x.shape[:2], dtype=torch.bool)
        pad[:, 0] = False
        return self.head(self.att(self.q(x[:, :3]), kv, kv, key_padding_mask=pad)[0].mean(1))


class ReadsInProjection(CrossAttention):
    """Cross-attention whose packed weight the model also reads outside the call (a penalty on the logits)."""

    def forward(self, x):
        return super().forward(x) + self.att.in_proj_weight.square().sum()


class ReadsQueryWeight(ThreeInputs):
    """Separate q/k/v weights, the query's also read outside the call: the q block goes generic, and with it the
    k and v blocks (they share the packed bias)."""

    def __init__(self) -> None:
        super().__init__(separate=True)

    def forward(self, x):
        return super().forward(x) + self.att.q_proj_weight.square().sum()


@pytest.mark.parametrize("make, also", [
    (ReadsInProjection, set()),
    (ReadsQueryWeight, {"att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight"}),
])
def test_an_in_projection_is_fast_only_as_a_whole(make, also):
    """Its blocks share the packed weight: when one block must go to the generic path, all do (a block
    fast and another generic would count the weight's Gram in part twice, in part not at all)."""
    torch.manual_seed(9)
    model = make().double().eval()
    x = torch.randn(5, 5, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with pytest.warns(GenericPathWarning, match="att.in_proj_bias"):
        _r = structural_matrix(model, x, method="gram", per_layer=True)
    A, groups = _r.A, _r.per_layer
    A_ref, _ = structural_oracle(model, x)
    assert rel_err(A, A_ref) < RTOL[torch.float64]
    in_projection = {name for name, _ in model.att.named_parameters(prefix="att") if "in_proj_weight" in name or "in_proj_bias" in name}
    assert set(_r.route.generic()) == in_projection | also
    _r = structural_matrix(model, x, method="loop", per_layer=True)
    _, groups_ref = _r.A, _r.per_layer
    assert rel_err(groups["att"], groups_ref["att"]) < RTOL[torch.float64]


def test_recomputed_blocks_are_read_samples_first():
    """The recompute hook hands its blocks batch-first, so their samples are dimension 0 by construction, even where
    a backward check could not tell (the kv Linear of the model, whose samples cannot be told, goes generic)."""
    torch.manual_seed(9)
    model = OneKeyAttended().double().eval()
    x = torch.randn(5, 5, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with pytest.warns(GenericPathWarning, match="kv.weight, kv.bias"):
        _r = structural_matrix(model, x, method="gram")
    assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert set(_r.route.generic()) == {"kv.weight", "kv.bias"} and _r.route["att.in_proj_weight"].rule == "attention"


def test_a_recomputation_that_does_not_match_the_module_is_not_used(monkeypatch):
    """The hook checks its output against the module's: one that ignores the padding mask is refused."""
    original = attention.attention_steps

    def no_padding_mask(module, query, key, value, key_padding_mask=None, attn_mask=None, is_causal=False, need_weights=False):
        return original(module, query, key, value, None, attn_mask, is_causal, need_weights)

    monkeypatch.setattr(attention, "attention_steps", no_padding_mask)
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    model = model.double().eval()
    _r = structural_matrix(model, x, method="gram")
    assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert {name.rsplit(".", 2)[-2] for name in _r.route.generic()} == {"self_attn", "out_proj"}


def test_the_training_step_capture_leaves_attention_as_the_model_runs_it():
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    model = model.double().eval()
    cap = ForwardCapture(model, trainable_parameters(model), EngineOptions.training_step())  # as the probe's
    assert all(c.rule.name != "attention" for c in cap.claims) and any("in_proj_weight" in name for name in cap.unclaimed)
    with probing(model):
        with cap, torch.enable_grad():
            out = model(x)
        assert torch.equal(out, model(x))  # bit for bit: no recomputed attention in the model's graph
        A, _ = cap.structural_matrix(out, x, n_classes=out.shape[1])
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
def test_layers_whose_samples_are_not_the_first_dimension(make, n, L, one_pass):
    """L = n must not be read as samples first, L ≠ n must not raise: the samples' dimension is found,
    in both backward forms (one pass for all classes hands the accumulators all C at once)."""
    options = EngineOptions(pass_bytes=EngineOptions().pass_bytes if one_pass else 0)
    torch.manual_seed(4)
    model = make().double().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 6, (n, L), generator=g) if make is SequenceFirstEmbedding else torch.randn(n, L, 3, generator=g, dtype=torch.float64)
    _r = structural_matrix(model, x, method="gram", options=options)
    assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert not _r.route.generic()


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
def test_layers_whose_samples_cannot_be_found_go_to_the_generic_path(make):
    torch.manual_seed(6)
    model = make().double().eval()
    x = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _r = structural_matrix(model, x, method="gram")
    assert rel_err(_r.A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
    assert list(_r.route.generic()) == ["lin.weight", "lin.bias"]


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
        _, _, y = attention.attention_steps(m, x, x, x, kw.get("key_padding_mask"), kw.get("attn_mask"))
        assert rel_err(y.detach(), expected.detach()) < 1e-13, kw


@pytest.mark.parametrize("kdim", [None, 5])
def test_cross_attention_steps_match_the_functional_forward(kdim):
    """Queries over 3 positions, keys and values over 4 (key is value, then three tensors), packed and separate
    weights, against the module itself, float64, every mask kind."""
    torch.manual_seed(11)
    m = nn.MultiheadAttention(6, 2, kdim=kdim, vdim=kdim, batch_first=True).double().eval()
    q, kv = torch.randn(3, 3, 6, dtype=torch.float64), torch.randn(3, 4, kdim or 6, dtype=torch.float64)
    v = torch.randn(3, 4, kdim or 6, dtype=torch.float64)
    bool_mask = torch.zeros(3, 4, dtype=torch.bool)
    bool_mask[0, 1:] = True
    kpm = torch.tensor([[False, False, True, True]] * 3)
    for key, value in ((kv, kv), (kv, v)):
        for kw in ({}, {"attn_mask": bool_mask}, {"key_padding_mask": kpm}, {"attn_mask": bool_mask, "key_padding_mask": kpm},
                   {"attn_mask": torch.randn(6, 3, 4, dtype=torch.float64)}):
            expected = m(q, key, value, need_weights=False, **kw)[0]
            blocks, _, y = attention.attention_steps(m, q, key, value, kw.get("key_padding_mask"), kw.get("attn_mask"))
            assert rel_err(y.detach(), expected.detach()) < 1e-13, kw
            assert [roles for roles, _, _ in blocks] == (["q", "kv"] if key is value and kdim is None else ["q", "k", "v"])


def test_blocks_follow_the_identity_of_the_inputs():
    a, b = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)
    runs = attention._runs
    assert [r for r, _ in runs(a, a, a, True)] == ["qkv"]
    assert [r for r, _ in runs(a, b, b, True)] == ["q", "kv"]
    assert [r for r, _ in runs(a, a, b, True)] == ["qk", "v"]
    assert [r for r, _ in runs(a, b, a, True)] == ["q", "k", "v"]  # equal values, not adjacent rows: apart
    assert [r for r, _ in runs(a, a, a, False)] == ["q", "k", "v"]  # separate weights: one block each


def test_float32_decoder_agrees_with_the_float64_oracle():
    torch.manual_seed(0)
    model, x = Decoder().eval(), torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    _r = structural_matrix(model, x, method="gram")
    A = _r.A
    assert not _r.route.generic()
    assert rel_err(A.double(), structural_oracle(model.double(), x.double())[0]) < 1e-4


def test_auto_takes_gram_on_a_covered_transformer_without_timing_jacobian(monkeypatch):
    from optmech.structure import engine

    monkeypatch.setattr(engine, "structural_matrix_jacobian", lambda *a, **k: pytest.fail("jacobian ran"))
    torch.manual_seed(0)
    model, x = Encoder(batch_first=True), tokens(5, 6)
    _r = structural_matrix(model.double().eval(), x, method="auto")
    A, ran = _r.A, _r.method
    assert ran == "gram" and rel_err(A, structural_oracle(model, x)[0]) < RTOL[torch.float64]
