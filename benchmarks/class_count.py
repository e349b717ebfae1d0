"""How the structural matrix and the probe scale with the number of classes C, against a training step and the
exact cost floor, measured side by side.

    .venv/bin/python benchmarks/class_count.py                       # MLP and CNN, C = 10, 100, 1000; a few minutes
    .venv/bin/python benchmarks/class_count.py --classes 10 100 --no-memory

Models: an MLP 784 → 256 → 256 → C (ReLU) and SNet's CNN (Conv(1→8) → ReLU → MaxPool(2) → … → Linear(·, C);
``optmech.models.build("snet", depth=1, n_classes=C)``); with ``--models wide``, the MLP at width 1024, whose logits
layer is as wide as C = 1000 or wider (no factors of A: the probe's dense C × C eigensolver). Batch 64, float32, one
process, interleaved round by round in a new shuffled order every round (seeded). Per model and C:

- **step**: a training step (forward, cross-entropy, backward, SGD with lr 0);
- **floor**: the exact cost floor of A = J Jᵀ, the cheaper of two schedules, each the work every exact method
  must do, run by torch's fastest kernels for it and timed in the same rounds:

  - (C) one forward and the C activation backward passes to the outputs of the layers before the logits layer,
    seeded at that layer's input h with ∂f_c/∂h = W[c] (the faster of one vmapped pass and C passes, timed
    together with the forward), and every layer's cheapest contraction (``structure/contract.py``): its
    C²-term, the Gram F Fᵀ of an (n, C, features) operand, timed as one batched GEMM into kept memory
    (random operands of the layer's shapes), its other terms priced at the throughput of a 2048² float32
    GEMM of the same round; the logits layer's (‖a‖² + 1)·I is O(n·d);
  - (d) when h is narrower than C (d < C): d passes seeded with the rows of R (W = QR), the contractions'
    Grams at (n, d, features), and Q M Qᵀ (``structure/head.py``): the batched GEMM P = Q M and the
    2-D GEMM (n·C, d)·(d, C).

  The GEMM that writes A (the largest layer's Gram; P Qᵀ) is timed writing into fresh memory, as every call
  that returns A must (at C = 1000 its page faults cost about as much as its arithmetic); the others into
  kept memory. **× ideal**: the same floor with every contraction priced at the 2048² GEMM rate and the GEMM
  that writes A no faster than writing A's B·C² floats into fresh memory (``torch.ones``): what a BLAS at its
  large-matrix speed on these shapes would give (torch's batched GEMMs of a few hundred rows run at about
  half of it on this CPU);
- **hand** (the MLPs, C ≤ their width): A for that one model written by hand (:func:`hand_written`: its forward
  with hooks, one vmapped pass, (‖a‖² + 1)·B Bᵀ per layer; no checks, no route report): the floor's work with
  the small operations of the C-linear terms paid, so that gram's distance from it is the engine's own;
- **gram**: ``structural_matrix(model, x, method="gram")``;
- **probe**: ``Probe(model).measure(x, y)`` with the default columns (no extras).

It prints medians and their ratios to the step, to the floor (with the range of the per-round ratios, each
against the floor of its own round: how far one round moves on this machine), to the ideal floor and to
``gram``, and (``--no-memory`` to skip) the growth of the peak resident set during one call in a fresh process,
next to the size of A itself (B·C² floats).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
    if name in ("mlp", "wide"):
        width = 256 if name == "mlp" else 1024
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                                   torch.nn.ReLU(), torch.nn.Linear(width, C))
    return build("snet", depth=1, n_classes=C, seed=0)


@dataclasses.dataclass
class Schedule:
    """One schedule of the exact cost floor (see the module's docstring)."""

    seeds: int  # backward cotangents: C, or d
    one_pass: Callable[[], None]  # forward + one vmapped backward of the seeds
    k_passes: Callable[[], None]  # forward + one backward per seed
    grams: Callable[[], None]  # the contractions' Grams (and P = Q M) that do not write A, into kept memory
    last: Callable[[], None]  # the GEMM that writes A, into fresh memory (as every call that returns A)
    other_macs: float  # the contractions' multiply-adds outside the timed GEMMs (priced at the 2048² rate)
    gemm_macs: float  # the timed GEMMs' multiply-adds (for the ideal floor)


def gram_features(n: int, k: int, S: int, K: int, width: int, bias: bool) -> tuple[float, int]:
    """(multiply-adds, features) of a layer's cheapest contraction with k cotangents: its cost is a quadratic in k
    (``contract.contraction_costs``) whose k² coefficient is n·features, the Gram F Fᵀ of F (n, k, features)."""
    costs = contraction_costs(n, k, S, K, width, bias)
    form = min(costs, key=costs.get)
    at = [contraction_costs(n, j, S, K, width, bias)[form] for j in (1, 2, 3)]
    return costs[form], round((at[2] - 2 * at[1] + at[0]) / 2 / n)


def hooked_forward(model: torch.nn.Module, layers: list, x: torch.Tensor) -> dict:
    """{layer: (its input, its output)} from one forward of ``model`` (in its current mode) with autograd on."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.__setitem__(mod, (a[0], o))) for m in layers]
    try:
        with torch.enable_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def floor_parts(model: torch.nn.Module, x: torch.Tensor, C: int) -> dict[str, Schedule]:
    """The exact cost floor's schedules (module docstring): ``"C"``, and ``"d"`` when the logits layer's input is
    narrower than C."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    head, body = layers[-1], layers[:-1]
    n, d = x.shape[0], head.in_features
    gen = torch.Generator().manual_seed(3)

    def forward():
        return hooked_forward(model, layers, x)

    seen = forward()

    def contractions(k: int) -> tuple[float, list[tuple[float, int]]]:
        """(multiply-adds of the whole contraction, [(the Gram's multiply-adds, features) per layer])."""
        macs, grams = float(n * d), []  # (‖a‖² + 1)·I
        for m in body:
            a, z = seen[m]
            if isinstance(m, torch.nn.Linear):
                K, S, width = m.in_features, a[0].numel() // m.in_features, m.out_features
            else:
                K = m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                S, width = z.shape[2] * z.shape[3], m.out_channels
            total, features = gram_features(n, k, S, K, width, m.bias is not None)
            macs += total
            grams.append((float(n * k * k * features), features))
        return macs, grams

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

    def gram_gemms(k: int, grams: list[tuple[float, int]]) -> tuple[list, torch.Tensor]:
        """(F per layer, for F Fᵀ at (n, k, features); one kept (n, k, k) output that the Grams overwrite in turn)."""
        return [torch.randn(n, k, f, generator=gen) for _, f in grams], torch.empty(n, k, k)

    W = head.weight.detach()
    macs, grams = contractions(C)
    Fs, out = gram_gemms(C, grams)
    largest = max(range(len(grams)), key=lambda i: grams[i][0])

    def c_grams():
        for i, F in enumerate(Fs):
            if i != largest:
                torch.bmm(F, F.mT, out=out)

    schedules = {"C": Schedule(C, passes(W, True), passes(W, False), c_grams,
                               lambda: torch.bmm(Fs[largest], Fs[largest].mT),
                               macs - sum(g for g, _ in grams), sum(g for g, _ in grams))}
    if d < C:
        R = torch.linalg.qr(W.double())[1].to(W.dtype)
        Q = torch.linalg.qr(torch.randn(C, d, generator=gen))[0]
        M = torch.randn(n, d, d, generator=gen)
        P = torch.empty(n, C, d)
        dmacs, dgrams = contractions(d)
        dFs, dout = gram_gemms(d, dgrams)

        def d_grams():
            for F in dFs:
                torch.bmm(F, F.mT, out=dout)
            torch.bmm(Q.expand(n, C, d), M, out=P)

        schedules["d"] = Schedule(d, passes(R, True), passes(R, False), d_grams,
                                  lambda: torch.mm(P.view(n * C, d), Q.T),
                                  dmacs - sum(g for g, _ in dgrams), sum(g for g, _ in dgrams) + n * (C * d * d + C * C * d))
    return schedules


def hand_written(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A exactly, for one of the MLPs of :func:`make` (in eval mode, as :func:`main` holds it) with C ≤ its width,
    written by hand as directly as this model allows: the forward with hooks on the three Linear layers, one vmapped backward of the C rows of the logits
    layer's weight from its input h, and A = (‖h‖² + 1)·I + Σ_l (‖a_l‖² + 1)·B_l B_lᵀ. No input, graph or
    finiteness checks, no route report, no other model: what the floor's work costs once the C-linear terms' small
    operations are paid as any implementation pays them."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def run() -> torch.Tensor:
        seen = hooked_forward(model, layers, x)
        head = layers[-1]
        h, W = seen[head][0], head.weight.detach()
        C = W.shape[0]
        grads = torch.autograd.grad(h, [seen[m][1] for m in layers[:-1]], grad_outputs=W[:, None, :].expand(C, *h.shape),
                                    is_grads_batched=True)
        A = torch.zeros(x.shape[0], C, C)
        A.diagonal(dim1=1, dim2=2).add_(torch.linalg.vector_norm(h.detach(), dim=1).square_().add_(1)[:, None])
        for m, g in zip(layers[:-1], grads):
            B = g.transpose(0, 1)  # (n, C, width)
            A.addcmul_(torch.bmm(B, B.transpose(1, 2)), torch.linalg.vector_norm(seen[m][0].detach(), dim=1).square_().add_(1)[:, None, None])
        return A
    return run


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
    parser.add_argument("--rounds", type=int, default=9, help="rounds at C = 10 (half as many at larger C, at least 5)")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    gemm_a = torch.randn(GEMM, GEMM, generator=torch.Generator().manual_seed(0))
    order = random.Random(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, float32")
    print(f"{'model':<5} {'C':>5} {'what':<6} {'median ms':>10} {'× step':>8} {'× floor':>8} {'(range)':>13} {'× ideal':>8} "
          f"{'× gram':>7} {'peak MiB':>9}")
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
                     "gram": lambda: structural_matrix(model, x, method="gram"), "probe": lambda: probe.measure(x, y),
                     "write_A": lambda: torch.ones(BATCH, C, C)}  # A's B·C² values into fresh memory
            for key, sch in schedules.items():
                for part in ("one_pass", "k_passes", "grams", "last"):
                    calls[f"{part}/{key}"] = getattr(sch, part)
            hand = hand_written(model, x) if name in ("mlp", "wide") and C <= model[-1].in_features else None
            if hand is not None:
                reference = structural_matrix(model, x, method="gram").A
                if not torch.allclose(hand(), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max())):
                    raise AssertionError("the hand-written A differs from gram's")
                calls["hand"] = hand
            for fn in calls.values():  # warm
                fn()
            rounds = max(5, args.rounds if C <= 10 else args.rounds // 2)
            times = {k: [] for k in calls}
            for _ in range(rounds):
                keys = list(calls)
                order.shuffle(keys)
                for k in keys:
                    times[k].append(timed(calls[k]))

            def floors(t: dict[str, float]) -> dict[str, tuple[float, float]]:
                """{schedule: (floor, ideal floor)} from one set of times (a round's, or the medians)."""
                rate = 2 * GEMM**3 / t["gemm"]
                got = {}
                for key, sch in schedules.items():
                    passes = min(t[f"one_pass/{key}"], t[f"k_passes/{key}"]) + 2 * sch.other_macs / rate
                    got[key] = (passes + t[f"grams/{key}"] + t[f"last/{key}"],
                                passes + max(2 * sch.gemm_macs / rate, t["write_A"]))
                return got

            med = {k: statistics.median(v) for k, v in times.items()}
            at_median = floors(med)
            best = min(at_median, key=lambda key: at_median[key][0])
            per_round = [floors({k: v[r] for k, v in times.items()})[best] for r in range(rounds)]
            A_mib = BATCH * C * C * 4 / 2**20
            for k in ("step", "hand", "gram", "probe") if hand is not None else ("step", "gram", "probe"):
                ratios = sorted(times[k][r] / per_round[r][0] for r in range(rounds))
                spread = f"{ratios[0]:.2f}–{ratios[-1]:.2f}"  # how far one round's ratio moves on this machine
                mem = "" if args.no_memory or k in ("step", "hand") else f"{peak_memory_mib(name, C, k):.0f}"
                print(f"{name:<5} {C:>5} {k:<6} {1e3 * med[k]:>10.1f} {med[k] / med['step']:>8.2f} "
                      f"{med[k] / at_median[best][0]:>8.2f} {spread:>13} {med[k] / at_median[best][1]:>8.2f} "
                      f"{med[k] / med['gram']:>7.2f} {mem:>9}", flush=True)
            rate = 2 * GEMM**3 / med["gemm"]
            for key, sch in schedules.items():
                passes_ms = 1e3 * min(med[f"one_pass/{key}"], med[f"k_passes/{key}"])
                grams_ms, last_ms = 1e3 * med[f"grams/{key}"], 1e3 * med[f"last/{key}"]
                what = "Grams" if key == "C" else "d × d Grams and Q M"
                print(f"{'':<5} {'':>5} {'floor' if key == best else 'other'} = forward + {sch.seeds} passes {passes_ms:.1f} ms "
                      f"+ other contraction terms {sch.other_macs / 1e9:.2f} GMAC at {rate / 1e9:.0f} GFLOP/s + {what} "
                      f"{grams_ms:.1f} ms + the GEMM that writes A into fresh memory {last_ms:.1f} ms: "
                      f"{1e3 * at_median[key][0]:.1f} ms; ideal {1e3 * at_median[key][1]:.1f} ms "
                      f"({sch.gemm_macs / 1e9:.2f} GMAC of GEMMs at {rate / 1e9:.0f} GFLOP/s, no faster than writing A)")
            print(f"{'':<5} {'':>5} A itself {A_mib:.1f} MiB, written into fresh memory in {1e3 * med['write_A']:.1f} ms; "
                  f"{rounds} rounds", flush=True)


if __name__ == "__main__":
    main()
