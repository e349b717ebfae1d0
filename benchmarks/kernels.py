"""Three kernel choices of the engine and the probe, each timed against its alternative side by side.

    .venv/bin/python benchmarks/kernels.py            # about a minute on 2 cores

1. **The eigensolver** (``optmech.metrics.eigvalsh``): ``torch.linalg.eigvalsh`` of 64 symmetric float64 matrices
   in one call, against the batch split across the intra-op threads, each part solved one-threaded.
2. **The scaled ∂f/∂z of a vector Linear** (``layer_gram.LayerGram``, ghost form (‖a‖² + 1)·B Bᵀ): the product
   √(‖a‖² + 1)·B left in the class-major layout of the vmapped backward pass, against it written sample-major into
   a kept buffer, each followed by the batched GEMM that adds B Bᵀ into A (64 samples, d_out = 256).
3. **A from the factors of a narrow logits layer** (``head.expand``, A = Q M Qᵀ with Q: C × d, M: (64, d, d)):
   given P = Q M, A = P Qᵀ as a batched GEMM (the engine's) against one 2-D GEMM (64·C, d)·(d, C) (A's rows are
   P's rows), A in fresh memory as every call returns it (d = 256; C = 1000, 4000).

Interleaved round by round; it prints medians and the ratio (new / old) with the spread of the per-round ratios.
It measures; it is not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from optmech.metrics import eigvalsh


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(label: str, old, new, rounds: int) -> None:
    old(), new()  # warm
    t_old, t_new, ratios = [], [], []
    for _ in range(rounds):
        a, b = timed(old), timed(new)
        t_old.append(a)
        t_new.append(b)
        ratios.append(b / a)
    ratios.sort()
    lo, hi = ratios[len(ratios) // 10], ratios[-1 - len(ratios) // 10]
    print(f"{label:<34} {1e3 * statistics.median(t_old):>9.2f} {1e3 * statistics.median(t_new):>9.2f} "
          f"{statistics.median(ratios):>7.2f} ({lo:.2f}–{hi:.2f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64; medians over {args.rounds} rounds")
    print(f"{'what':<34} {'old ms':>9} {'new ms':>9} {'new/old':>7} (10–90 %)")
    for d in (10, 100, 256, 512):
        X = torch.randn(64, d, d + 8, generator=g, dtype=torch.float64)
        S = X @ X.mT
        compare(f"eigvalsh 64 × {d}²: one call | split", lambda S=S: torch.linalg.eigvalsh(S), lambda S=S: eigvalsh(S), args.rounds)
    n, d = 64, 256
    for C in (10, 100, 1000):
        class_major = torch.randn(C, n, d, generator=g)
        scale = torch.rand(n, generator=g) + 1
        A = torch.zeros(n, C, C)
        kept = torch.empty(n, C, d)

        def in_place(class_major=class_major, scale=scale, A=A):
            F_ = class_major.transpose(0, 1) * scale.sqrt().view(-1, 1, 1)
            A.baddbmm_(F_, F_.transpose(1, 2))

        def sample_major(class_major=class_major, scale=scale, A=A, kept=kept):
            F_ = torch.mul(class_major.transpose(0, 1), scale.sqrt().view(-1, 1, 1), out=kept)
            A.baddbmm_(F_, F_.transpose(1, 2))

        compare(f"√s·B, B Bᵀ, C = {C}: class-major | kept", in_place, sample_major, args.rounds if C < 1000 else 5)
    for C in (1000, 4000):
        Q = torch.linalg.qr(torch.randn(C, d, generator=g))[0]
        X = torch.randn(n, d, d, generator=g)
        P = torch.bmm(Q.expand(n, C, d), X @ X.mT)
        compare(f"Q M Qᵀ, C = {C}: batched | 2-D", lambda P=P, Q=Q: torch.bmm(P, Q.T.expand(n, d, Q.shape[0])),
                lambda P=P, Q=Q: torch.mm(P.view(-1, d), Q.T).view(n, Q.shape[0], Q.shape[0]), 5)


if __name__ == "__main__":
    main()
