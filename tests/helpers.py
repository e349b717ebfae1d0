"""Tolerances (one place, by dtype; DESIGN §4.2) and the unusual models every engine must handle."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from optmech.models import FAMILIES, build

#: relative tolerances by dtype (neural-tangents' convention); the issue asks 1e-10 in float64.
RTOL = {torch.float64: 1e-10, torch.float32: 5e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float((a - b).abs().max() / scale)


class LayerNormGELU(nn.Module):
    def __init__(self, d_in: int = 12, width: int = 16, n_classes: int = 5) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d_in, width), nn.LayerNorm(width), nn.Linear(width, n_classes)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x.flatten(1)))))


class BatchNormNet(nn.Module):
    """Conv + BatchNorm2d + BatchNorm1d; run a few train-mode batches first so stats are not trivial."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc, self.bn1 = nn.Linear(3 * 6 * 6, 8), nn.BatchNorm1d(8)
        self.out = nn.Linear(8, n_classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.out(torch.tanh(self.bn1(self.fc(h))))


class TiedWeights(nn.Module):
    """One weight matrix used three times: encoder W, decoder Wᵀ, and a shared block applied twice."""

    def __init__(self, d: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.enc = nn.Linear(d, hidden)
        self.shared = nn.Linear(hidden, hidden)
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return F.linear(h, self.enc.weight.t(), self.bias)  # logits (batch, d)


class UnusedAndFrozen(nn.Module):
    def __init__(self, d_in: int = 7, n_classes: int = 3) -> None:
        super().__init__()
        self.used = nn.Linear(d_in, n_classes)
        self.unused = nn.Linear(d_in, 4)  # never called: zero Jacobian columns
        self.frozen = nn.Linear(d_in, d_in)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.used(torch.sin(self.frozen(x)))


class EmbeddingModel(nn.Module):
    """Integer inputs (batch, tokens) -> embeddings -> mean -> logits; custom forward with a residual add."""

    def __init__(self, vocab: int = 11, dim: int = 6, n_classes: int = 4) -> None:
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Linear(dim, n_classes)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        return self.head(h + torch.tanh(self.mix(h)))


class SequenceFirstTransformer(nn.Module):
    """Tokens (batch, L) -> embedding -> a sequence-first ``nn.TransformerEncoderLayer`` (its Linear and
    LayerNorm layers see (L, batch, E); built with L = batch, so that the first dimension's size alone
    cannot tell the samples apart) with the padding token masked -> mean over positions -> logits."""

    def __init__(self, vocab: int = 9, dim: int = 8, heads: int = 2, n_classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1)  # eval semantics: no dropout
        self.head = nn.Linear(dim, n_classes)

    def forward(self, tokens):
        h = self.layer(self.emb(tokens).transpose(0, 1), src_key_padding_mask=tokens == 0)
        return self.head(h.mean(0))


class SequenceConv1d(nn.Module):
    """Conv1d with stride and dilation, then a Linear applied at every position (sequence input)."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=1)
        self.per_position = nn.Linear(4, 5)
        self.head = nn.Linear(5, n_classes, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (batch, positions, 4)
        return self.head(torch.tanh(self.per_position(h)).mean(1))


class GroupedAndPartlyFrozen(nn.Module):
    """A grouped conv (fast path), a reflect-padded conv (not on the fast path), a Linear whose bias
    is frozen, a module called twice."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.fc.bias.requires_grad_(False)
        self.twice = nn.Linear(6, 6)
        self.out = nn.Linear(6, n_classes)

    def forward(self, x):
        h = torch.tanh(self.fc(torch.tanh(self.reflect(torch.relu(self.conv(x)))).flatten(1)))
        return self.out(torch.tanh(self.twice(torch.tanh(self.twice(h)))))


class InplaceReLU(nn.Module):
    """Conv and Linear outputs overwritten by ReLU(inplace=True), as in torchvision's ResNets."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(1, 3, 3), nn.Linear(3 * 4 * 4, 5), nn.Linear(5, n_classes)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.out(self.act(self.fc(self.act(self.conv(x)).flatten(1))))


class Parametrized(nn.Module):
    """Weights through ``torch.nn.utils.parametrizations``: spectral norm on a Conv2d, weight norm on a Linear,
    an orthogonal square Linear (the trainable tensors are the parametrizations' originals)."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        P = nn.utils.parametrizations
        self.conv = P.spectral_norm(nn.Conv2d(1, 3, 3))
        self.fc = P.weight_norm(nn.Linear(3 * 4 * 4, 5))
        self.square = P.orthogonal(nn.Linear(5, 5))
        self.out = nn.Linear(5, n_classes)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.square(torch.tanh(self.fc(h)))))


class RecurrentClassifier(nn.Module):
    """(n, L, 3) -> a two-layer bidirectional LSTM -> a sequence-first GRU -> the last step -> logits."""

    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(8, 4)
        self.head = nn.Linear(4, n_classes)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h.transpose(0, 1))
        return self.head(h[-1])


def unusual_models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (float64 model, float64/integer inputs)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    bn = BatchNormNet().double()
    bn.train()
    for _ in range(3):
        bn(torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64) * 2 + 1)
    bn.eval()
    return {
        "layernorm_gelu": (LayerNormGELU().double(), torch.randn(4, 12, generator=g, dtype=torch.float64)),
        "batchnorm_eval": (bn, torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)),
        "tied_weights": (TiedWeights().double(), torch.randn(4, 6, generator=g, dtype=torch.float64)),
        "unused_and_frozen": (UnusedAndFrozen().double(), torch.randn(4, 7, generator=g, dtype=torch.float64)),
        "embedding": (EmbeddingModel().double(), torch.randint(0, 11, (4, 5), generator=g)),
        "sequence_conv1d": (SequenceConv1d().double(), torch.randn(4, 2, 12, generator=g, dtype=torch.float64)),
        "inplace_relu": (InplaceReLU().double(), torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)),
        "grouped_partly_frozen": (GroupedAndPartlyFrozen().double(), torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)),
        "transformer_seq_first": (SequenceFirstTransformer().double(), _tokens_with_padding(g)),
        "parametrized": (Parametrized().double(), torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)),
        "recurrent": (RecurrentClassifier().double(), torch.randn(4, 5, 3, generator=g, dtype=torch.float64)),
    }


def _tokens_with_padding(g: torch.Generator) -> torch.Tensor:
    """4 sequences of 4 tokens from 1…8, the last one or two positions of some set to the padding token 0."""
    tokens = torch.randint(1, 9, (4, 4), generator=g)
    tokens[1, 3:] = 0
    tokens[2, 2:] = 0
    return tokens


def family_cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Every model family with and without skips, depth 2, on 8×8 inputs: name -> (float64 model, inputs)."""
    cases = {}
    for family in FAMILIES:
        for skip in (False, True):
            model = build(family, depth=2, skip=skip, input_shape=(1, 8, 8), seed=3, dtype=torch.float64)
            x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
            cases[f"{family}-{'skip' if skip else 'plain'}"] = (model, x)
    return cases


def engine_cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """The models every engine method must get right: the families and the unusual models."""
    return {**family_cases(), **unusual_models()}


def captured_gram(model, x, options=None):
    """One ``gram`` call through ForwardCapture, the forward run the way the engine runs it (eval semantics, grad on),
    by default with the training-step capture's options: (its route report, its logits, A)."""
    from optmech.structure import EngineOptions, ForwardCapture, RouteReport, probing, trainable_parameters

    options = EngineOptions.training_step() if options is None else options
    capture = ForwardCapture(model, trainable_parameters(model), options)
    with probing(model):
        with capture, torch.enable_grad():
            out = model(x)
        A, routes = capture.structural_matrix(out, x, n_classes=out.shape[1])
    return RouteReport("gram", list(routes.values())), out, A


def per_class_gradients(model, x):
    """The module rules' layers with their per-class gradients, from one forward with hooks (eval semantics) and
    C backward passes.

    Returns ([(layer, layer input a, bs = ∂f/∂z of every class, shape (C, n, *z.shape[1:]))], C).
    """
    from optmech.structure import EngineOptions, ForwardCapture, probing, trainable_parameters

    capture = ForwardCapture(model, trainable_parameters(model), EngineOptions.training_step())
    layers = [layer for claim in capture.claims for layer in claim.layers]
    captured = {}
    hooks = [layer.module.register_forward_hook(lambda m, a, o: captured.__setitem__(m, (a[0].detach(), o))) for layer in layers]
    with probing(model):
        out = model(x)
    for h in hooks:
        h.remove()
    C = out.shape[1]
    found = []
    for layer in layers:
        a, z = captured[layer.module]
        bs = torch.stack([torch.autograd.grad(out[:, c].sum(), z, retain_graph=True)[0] for c in range(C)])
        found.append((layer, a, bs))
    return found, C


def accumulator(layer, a, n_classes: int, strategy: str | None = None):
    """A fresh accumulator of ``layer``'s rule for input a (its own workspace; ``strategy`` forces the contraction form)."""
    from optmech.structure import EngineOptions, ForwardCapture
    from optmech.structure.rules import AccumulatorContext, Record

    model = nn.Module()
    options = EngineOptions.training_step().replace(contraction=strategy or "auto", fold_pools=False)
    ctx = AccumulatorContext(n_classes, ForwardCapture(model, [("p", nn.Parameter(torch.zeros(1)))], options), graph=None)
    return layer.rule.accumulator(layer, Record(a, a, 0), ctx)


def by_class_and_at_once(make_sink, bs):
    """(result of C ``add`` calls, result of one ``add_classes``) of two fresh sinks from ``make_sink()`` for bs (C, n, ...).

    The first result is taken before the second sink is built: both may write the layer's kept buffer.
    """
    by_class = make_sink()
    for b in bs:
        by_class.add(b)
    expected = by_class.result()
    at_once = make_sink()
    at_once.add_classes(bs)
    return expected, at_once.result()
