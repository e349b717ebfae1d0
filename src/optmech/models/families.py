"""The paper's model families (READING.md §3), each with a depth k and a skip switch.

Shapes: inputs (batch, c, h, w) with (c, h, w) in {(1, 28, 28), (3, 32, 32), (1, 8, 8)} (any
image shape with h, w ≥ 4 works); outputs logits (batch, n_classes). Parameter counts |θ| as a
function of k are given per family for MNIST shapes and checked by a test for every shape.
"""

from __future__ import annotations

import torch
from torch import nn


def _act(dropout: float) -> list[nn.Module]:
    return [nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])


class _Residual(nn.Module):
    """h ← body(h) + h (identity shortcut added after the block's activation, as in the authors' SNet)."""

    def __init__(self, body: nn.Module, skip: bool) -> None:
        super().__init__()
        self.body, self.skip = body, skip

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.body(h)
        return out + h if self.skip else out


class MLP(nn.Module):
    """The authors' LNet: 784→64, k × (64→64), 64→C, ReLU after every layer *including the logits*.

    With ``skip``, each hidden 64→64 layer becomes h ← ReLU(W h + b) + h. The ReLU on the logits
    is the authors' choice and makes dead logits give zero rows of J_x, hence λmin = 0 (READING F2):
    such samples are flagged ``rank_deficient`` by the probe.

    |θ| = (D·64 + 64) + k·4160 + (64·C + C), D = c·h·w; MNIST, C = 10: 50,890 + 4,160·k.
    """

    def __init__(self, depth: int, skip: bool, input_shape: tuple[int, ...], n_classes: int, dropout: float = 0.0, width: int = 64):
        super().__init__()
        d_in = 1
        for s in input_shape:
            d_in *= s
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), *_act(dropout))
        self.blocks = nn.Sequential(
            *[_Residual(nn.Sequential(nn.Linear(width, width), *_act(dropout)), skip) for _ in range(depth)]
        )
        self.head = nn.Sequential(nn.Linear(width, n_classes), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class SNet(nn.Module):
    """SNet as intended (READING.md §3 (B), the authors' code without its setattr bug).

    Conv(c→8, 3×3, pad 1) → ReLU → MaxPool(2) → flatten → Linear(8·(h/2)·(w/2) → 10) → ReLU →
    k × [Linear(10→10) → ReLU] (with ``skip``: h ← ReLU(W h + b) + h) → Linear(10 → C).

    |θ| = (9c·8 + 8) + (8·⌊h/2⌋·⌊w/2⌋·10 + 10) + 110·k + (10·C + C); MNIST: 15,880 + 110·k.
    """

    def __init__(self, depth: int, skip: bool, input_shape: tuple[int, int, int], n_classes: int, dropout: float = 0.0, width: int = 10):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * (h // 2) * (w // 2), width), *_act(dropout),
        )
        self.blocks = nn.Sequential(
            *[_Residual(nn.Sequential(nn.Linear(width, width), *_act(dropout)), skip) for _ in range(depth)]
        )
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.features(x)))


class CNN(nn.Module):
    """The authors' CNet: k × [Conv(→8, 3×3, pad 1) → ReLU → MaxPool(3, stride 1, pad 1)] → Linear(8·h·w → C).

    With ``skip``, every block after the first (8→8 channels) adds its input. k = 0 is a linear
    classifier on the pixels.

    |θ| = (9c·8 + 8) + (k − 1)·584 + 8·h·w·C + C for k ≥ 1, else c·h·w·C + C;
    MNIST, C = 10: 62,810 + 584·(k − 1) for k ≥ 1, and 7,850 for k = 0.
    """

    def __init__(self, depth: int, skip: bool, input_shape: tuple[int, int, int], n_classes: int, dropout: float = 0.0, channels: int = 8):
        super().__init__()
        c, h, w = input_shape
        blocks = []
        for i in range(depth):
            body = nn.Sequential(
                nn.Conv2d(c if i == 0 else channels, channels, 3, padding=1), *_act(dropout), nn.MaxPool2d(3, stride=1, padding=1)
            )
            blocks.append(_Residual(body, skip and i > 0))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear((channels if depth else c) * h * w, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class BasicBlock(nn.Module):
    """Conv3×3 (no bias) → ReLU → Conv3×3 (no bias) → [+ shortcut(x)] → ReLU, no BatchNorm.

    The shortcut (only with ``skip``) is the identity, or Conv3×3 with stride and bias when the
    shape changes. Without ``skip`` no projection is created (the authors' code creates it but never
    uses it; it would only add zero columns to J_x).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, skip: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.skip = skip
        self.shortcut: nn.Module | None = None
        if skip:
            self.shortcut = nn.Identity() if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.drop(self.act(self.conv1(x))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.drop(self.act(out))


class ResNet(nn.Module):
    """The authors' ResNet class (READING.md §3 (A)), no BatchNorm.

    Stem Conv(c→16, 3×3, pad 1, bias) → ReLU → MaxPool(3, 1, 1); k × BasicBlock(16→16);
    BasicBlock(16→32, stride 2); BasicBlock(32→64, stride 2); global average pool; Linear(64→C).

    |θ| = (9c·16 + 16) + 4,608·k + 13,824 + 55,296 + (64·C + C) [+ 4,640 + 18,496 with skip];
    MNIST, C = 10: 69,930 + 4,608·k plain, 93,066 + 4,608·k with skip.
    """

    def __init__(self, depth: int, skip: bool, input_shape: tuple[int, int, int], n_classes: int, dropout: float = 0.0):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=1, padding=1))
        self.blocks = nn.Sequential(
            *[BasicBlock(16, 16, 1, skip, dropout) for _ in range(depth)],
            BasicBlock(16, 32, 2, skip, dropout),
            BasicBlock(32, 64, 2, skip, dropout),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


def expected_n_params(family: str, depth: int, skip: bool, input_shape: tuple[int, ...], n_classes: int) -> int:
    """|θ| of a family as a closed-form function of the depth k (the formulas in the docstrings)."""
    C = n_classes
    if family == "mlp":
        d_in = 1
        for s in input_shape:
            d_in *= s
        return (d_in * 64 + 64) + depth * (64 * 64 + 64) + (64 * C + C)
    c, h, w = input_shape
    if family == "snet":
        return (9 * c * 8 + 8) + (8 * (h // 2) * (w // 2) * 10 + 10) + 110 * depth + (10 * C + C)
    if family == "cnn":
        if depth == 0:
            return c * h * w * C + C
        return (9 * c * 8 + 8) + (depth - 1) * (9 * 8 * 8 + 8) + 8 * h * w * C + C
    if family == "resnet":
        base = (9 * c * 16 + 16) + 4608 * depth + 13824 + 55296 + (64 * C + C)
        return base + (4640 + 18496 if skip else 0)
    raise ValueError(f"family: unknown model family {family!r}.")
