"""How the structural matrix and the probe scale with the number of classes C, against a training step and the
exact cost floor, measured side by side.

    .venv/bin/python benchmarks/class_count.py                       # MLP and CNN, C = 10, 100, 1000; a few minutes
    .venv/bin/python benchmarks/class_count.py --classes 10 100 --no-memory

Models: an MLP 784 → 256 → 256 → C (ReLU) and SNet's CNN (Conv(1→8) → ReLU → MaxPool(2) → … → Linear(·, C);
``optmech.models.build("snet", depth=1, n_classes=C)``); batch 64, float32, one process, interleaved round by
round. Per model and C:

- **step**: a training step (forward, cross-entropy, backward, SGD with lr 0);
- **floor**: the exact cost floor of A = J Jᵀ, the cheaper of two schedules: one forward, the C activation
  backward passes to the outputs of the layers before the logits layer, seeded at that layer's input with
  ∂f_c/∂h = W[c] (the faster of one vmapped pass and C passes, timed together with the forward), plus every
  layer's cheapest contraction (``structure/contract.py``'s multiply-adds; the logits layer's (‖a‖² + 1)·I is
  O(n·d)) priced at the throughput of a 2048² float32 GEMM timed in the same rounds; or, when the logits
  layer's input is narrower than C (d < C), the same with d passes seeded with the rows of R (W = QR), d × d
  contractions and the product Q M Qᵀ (``structure/head.py``). The GEMM that writes A (the contraction of the
  C schedule; Q M Qᵀ) is counted as no faster than writing A's B·C² floats into fresh memory
  (``torch.ones``, timed in the same rounds), which every call that returns A pays;
- **gram**: ``structural_matrix(model, x, method="gram")``;
- **probe**: ``Probe(model).measure(x, y)`` with the default columns (no extras).

It prints medians, each one's ratio to the step, to the floor and to ``gram``, and (``--no-memory`` to skip) the growth of
the peak resident set during one call in a fresh process, next to the size of A itself (B·C² floats).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch

from optmech import Probe, structural_matrix
from optmech.models import build
from optmech.structure.contract import contraction_costs

BATCH = 64
GEMM = 2048


def make(name: str, C: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                   torch.nn.ReLU(), torch.nn.Linear(256, C))
    return build("snet", depth=1, n_classes=C, seed=0)


def floor_parts(model: torch.nn.Module, x: torch.Tensor, C: int) -> dict[str, tuple]:
    """The exact cost floor's parts for each schedule: {name: (one vmapped pass, k passes, multiply-adds of the
    contractions, multiply-adds of the GEMM that writes A)}, the passes timed together with the forward.

    - ``"C"``: C passes seeded at the logits layer's input h with ∂f_c/∂h = W[c], every layer contracted C × C;
    - ``"d"`` (only when the logits layer's input is narrower than C, d < C): d passes seeded with the rows of R
      (W = QR), every layer contracted d × d, and Q M Qᵀ formed (C·d² + C²·d per sample).

    The logits layer's own (‖a‖² + 1)·I costs O(n·d) in both.
    """
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    head, body = layers[-1], layers[:-1]
    n, d = x.shape[0], head.in_features

    def forward():
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, a, o: seen.__setitem__(mod, (a[0], o))) for m in layers]
        try:
            with torch.enable_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
        return seen

    seen = forward()

    def contractions(k: int) -> float:
        macs = float(n * d)  # (‖a‖² + 1)·I
        for m in body:
            a, z = seen[m]
            if isinstance(m, torch.nn.Linear):
                K, S, width = m.in_features, a[0].numel() // m.in_features, m.out_features
            else:
                K = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                S, width = z.shape[2] * z.shape[3], m.out_channels
            macs += min(contraction_costs(n, k, S, K, width, m.bias is not None).values())
        return macs

    def passes(seeds: torch.Tensor, batched: bool):
        k = seeds.shape[0]

        def run():
            got = forward()
            h, zs = got[head][0], [got[m][1] for m in body]
            if batched:
                torch.autograd.grad(h, zs, grad_outputs=seeds[:, None, :].expand(k, *h.shape), is_grads_batched=True)
            else:
                for c in range(k):
                    torch.autograd.grad(h, zs, grad_outputs=seeds[c].expand_as(h), retain_graph=c < k - 1)
        return run

    W = head.weight.detach()
    schedules = {"C": (passes(W, True), passes(W, False), contractions(C), 0.0)}
    if d < C:
        R = torch.linalg.qr(W.double())[1].to(W.dtype)
        schedules["d"] = (passes(R, True), passes(R, False), contractions(d), float(n * (C * d * d + C * C * d)))
    return schedules


def model_head_width(model: torch.nn.Module) -> int:
    """d: the width of the logits layer's input."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_memory_mib(name: str, C: int, what: str) -> float:
    """Resident-set growth of one call (the first: workspaces included) in a fresh process (Linux /proc)."""
    call = {"gram": "structural_matrix(m, x, method='gram')", "probe": "Probe(m).measure(x, torch.zeros(x.shape[0], dtype=torch.long))"}[what]
    code = (
        "import torch;"
        "from benchmarks.class_count import make;"
        "from benchmarks.structural import _hwm_kib, _reset_hwm;"
        "from optmech import Probe, structural_matrix;"
        f"m = make({name!r}, {C}).eval(); x = torch.randn({BATCH}, 1, 28, 28); m(x); _reset_hwm(); base = _hwm_kib();"
        f"{call};"
        "print((_hwm_kib() - base) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=5, help="rounds at C = 10 (fewer at larger C, at least 2)")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    gemm_a = torch.randn(GEMM, GEMM, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, float32")
    print(f"{'model':<5} {'C':>5} {'what':<6} {'median ms':>10} {'× step':>8} {'× floor':>8} {'× gram':>7} {'peak MiB':>9}")
    for name in args.models:
        for C in args.classes:
            model = make(name, C).eval()
            x = torch.randn(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1))
            y = torch.randint(0, C, (BATCH,), generator=torch.Generator().manual_seed(2))
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            probe = Probe(model)
            schedules = floor_parts(model, x, C)

            def step():
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

            calls = {"step": step, "gemm": lambda: gemm_a @ gemm_a,
                     "gram": lambda: structural_matrix(model, x, method="gram"), "probe": lambda: probe.measure(x, y)}
            calls["write_A"] = lambda: torch.ones(BATCH, C, C)  # A's B·C² values into fresh memory, as every call returns
            for key, (one_pass, k_passes, _, _) in schedules.items():
                calls[f"one_pass/{key}"], calls[f"k_passes/{key}"] = one_pass, k_passes
            for fn in calls.values():  # warm
                fn()
            rounds = max(2, args.rounds if C <= 10 else args.rounds // 2 if C <= 100 else 2)
            times = {k: [] for k in calls}
            for _ in range(rounds):
                for k, fn in calls.items():
                    times[k].append(timed(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            rate = 2 * GEMM**3 / med["gemm"]
            def last_gemm(key: str) -> float:  # the GEMM that writes A: its arithmetic, or writing A, the slower
                macs, expand = schedules[key][2:]
                return max(2 * (expand or macs) / rate, med["write_A"])

            floors = {key: min(med[f"one_pass/{key}"], med[f"k_passes/{key}"]) + last_gemm(key)
                      + (2 * schedules[key][2] / rate if schedules[key][3] else 0.0) for key in schedules}
            best = min(floors, key=floors.get)
            floor = floors[best]
            A_mib = BATCH * C * C * 4 / 2**20
            for k in ("step", "gram", "probe"):
                mem = "" if args.no_memory or k == "step" else f"{peak_memory_mib(name, C, k):.0f}"
                print(f"{name:<5} {C:>5} {k:<6} {1e3 * med[k]:>10.1f} {med[k] / med['step']:>8.2f} {med[k] / floor:>8.2f} "
                      f"{med[k] / med['gram']:>7.2f} {mem:>9}")
            for key, (_, _, macs, expand) in schedules.items():
                k_seeds = C if key == "C" else model_head_width(model)
                passes_ms = 1e3 * min(med[f"one_pass/{key}"], med[f"k_passes/{key}"])
                what = (f"contractions {macs / 1e9:.2f} GMAC" if key == "C" else
                        f"d × d contractions {macs / 1e9:.2f} GMAC + Q M Qᵀ {expand / 1e9:.2f} GMAC")
                print(f"{'':<5} {'':>5} {'floor' if key == best else 'other'} = forward + {k_seeds} passes {passes_ms:.1f} ms + "
                      f"{what} at {rate / 1e9:.0f} GFLOP/s, the last GEMM no faster than writing A: {1e3 * floors[key]:.1f} ms")
            print(f"{'':<5} {'':>5} A itself {A_mib:.1f} MiB, written into fresh memory in {1e3 * med['write_A']:.1f} ms; "
                  f"{rounds} rounds", flush=True)


if __name__ == "__main__":
    main()
