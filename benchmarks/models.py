"""The models the benchmarks time: the paper's a–d at k = 1 and 5, MLPs, and extra architectures (grouped
convolutions, attention, parameters used directly, an LSTM). Only torch and ``optmech.models``: any revision of
optmech can build them (benchmarks/compare_revisions.py times two revisions on the same models)."""

from __future__ import annotations

import math

import torch

from optmech.models import build_paper
from optmech.models.families import MLP

BATCH, N_CLASSES = 64, 10
MODELS = ["a1", "a5", "b1", "b5", "c1", "c5", "d1", "d5", "mlp256", "mlp1024"]
EXTRA_MODELS = ["sep", "tfm", "vit", "pool", "lstm"]  # timed on request (--models sep tfm vit pool lstm), not by default


def separable_cnn() -> torch.nn.Module:
    """A MobileNet-style depthwise-separable CNN (not one of the paper's models; grouped convolutions):
    Conv(1→16) → ReLU, then three blocks of depthwise Conv3×3 (groups = channels) → ReLU → pointwise
    Conv1×1 → ReLU (16→32; 32→64 and 64→64 with stride 2 in the depthwise conv), global average pool,
    Linear(64→10)."""
    def block(c_in: int, c_out: int, stride: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in), torch.nn.ReLU(),
                torch.nn.Conv2d(c_in, c_out, 1), torch.nn.ReLU()]

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), *block(16, 32, 1), *block(32, 64, 2), *block(64, 64, 2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, N_CLASSES),
    )


class RowTransformer(torch.nn.Module):
    """A small transformer over the image's rows (not one of the paper's models; ``nn.MultiheadAttention``):
    the 28 rows as 28 tokens of 28 pixels, Linear(28→64) plus fixed sinusoidal positions, two
    ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 128, batch-first, no dropout), mean over
    the tokens, Linear(64→10)."""

    def __init__(self, dim: int = 64, rows: int = 28) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(rows, dim)
        position = torch.arange(rows)[:, None] * torch.exp(torch.arange(0, dim, 2) * (-math.log(1e4) / dim))
        self.register_buffer("position", torch.cat([position.sin(), position.cos()], 1))
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(dim, N_CLASSES)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x.flatten(1, 2)) + self.position).mean(1))


class SmallViT(torch.nn.Module):
    """A small vision transformer (not one of the paper's models; parameters used directly): 4×4 patches by a
    strided Conv2d(1→64), a class token (expanded and concatenated), a learned positional embedding (added),
    two ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 128, pre-norm, batch-first, no dropout), a final
    LayerNorm, the class token's row to Linear(64→10)."""

    def __init__(self, dim: int = 64, patch: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = torch.nn.Parameter(torch.randn(1, (28 // patch) ** 2 + 1, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, N_CLASSES)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat((self.cls.expand(h.shape[0], -1, -1), h), dim=1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


class AttentionPoolingTransformer(RowTransformer):
    """``tfm`` with an attention-pooling head in place of the mean (not one of the paper's models;
    cross-attention): a learned query, expanded over the batch, attends to the encoded rows
    (``nn.MultiheadAttention``, 4 heads, key is value), then Linear(64→10)."""

    def __init__(self, dim: int = 64, rows: int = 28) -> None:
        super().__init__(dim, rows)
        self.query = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = torch.nn.MultiheadAttention(dim, 4, batch_first=True)

    def forward(self, x):
        h = self.encoder(self.embed(x.flatten(1, 2)) + self.position)
        return self.head(self.pool(self.query.expand(h.shape[0], -1, -1), h, h, need_weights=False)[0][:, 0])


class RowLSTM(torch.nn.Module):
    """A recurrent classifier over the image's rows (not one of the paper's models; ``nn.LSTM``): the 28 rows
    as 28 steps of 28 pixels, a two-layer LSTM of width 64 (batch-first), the last step's output, Linear(64→10)."""

    def __init__(self, hidden: int = 64, rows: int = 28) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(rows, hidden, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(hidden, N_CLASSES)

    def forward(self, x):
        return self.head(self.lstm(x.flatten(1, 2))[0][:, -1])


def make_model(name: str) -> torch.nn.Module:
    if name == "sep":
        return separable_cnn()
    if name == "vit":
        return SmallViT()
    if name == "tfm":
        return RowTransformer()
    if name == "pool":
        return AttentionPoolingTransformer()
    if name == "lstm":
        return RowLSTM()
    if name.startswith("mlp"):
        return MLP(1, False, (1, 28, 28), N_CLASSES, width=int(name[3:]))
    return build_paper(name[0], depth=int(name[1:]), seed=0)


