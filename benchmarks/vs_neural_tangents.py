"""optmech's ``gram`` against neural-tangents' STRUCTURED_DERIVATIVES on the same models and weights.

    .venv-nt/bin/python benchmarks/vs_neural_tangents.py                 # the environment of neural_tangents_env.md
    .venv-nt/bin/python benchmarks/vs_neural_tangents.py --models c1 mlp256 --rounds 5
    .venv-nt/bin/python benchmarks/vs_neural_tangents.py --models mlp256 mlp1024 --rounds 21 --calls 10

For each model of benchmarks/structural.py (batch 64, C = 10, float32) it times, round by round and
interleaved (each call after a 50-ms pause, so that neither runtime's idle threads spin into the other's
call; with ``--calls N``, N calls back to back after the pause, the first not counted: each runtime with its
threads awake, as in a loop that calls it every step; the x@W.T port, at 0.1–6 s a call, still once): a PyTorch
training step, ``structural_matrix(method="gram").A``, and the per-sample NTK
blocks A_x from ``nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0,
implementation=STRUCTURED_DERIVATIVES)``, jitted (compile time reported apart), where ``apply`` is the model
replayed in JAX with the same weights (benchmarks/jax_port.py), three ways: vmapped over single samples ("nt
per-sample", neural-tangents at its best: Linear weights stored (in, out) and applied as ``x @ W``, the form its
structured rules recognise), the same with PyTorch's layout replayed as ``x @ W.T`` ("nt x@W.T port", which
hides the dense layers from those rules: shown to measure what the port's layout costs neural-tangents), and as the
diagonal of the whole (batch, batch, C, C) kernel ("nt full kernel", the usual call, which computes batch× more
blocks than needed).
It prints medians, ratios to the step and to ``gram``, and each method's max relative error against
the float64 per-sample autograd oracle (``method="loop"``) on 4 samples. It measures; it is not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 for the exactness column; timings use float32 arrays

import jax.numpy as jnp  # noqa: E402
import neural_tangents as nt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.jax_port import to_jax  # noqa: E402
from benchmarks.models import BATCH, MODELS, make_model  # noqa: E402
from optmech import structural_matrix  # noqa: E402

#: seconds of quiet before each timed call: XLA's and PyTorch's thread pools share the 2 cores, and a pool still
#: spinning after its own call slows whichever call comes next
PAUSE = 0.05


def nt_blocks(apply, full: bool = False):
    """jitted (params, x) -> (batch, C, C): neural-tangents' NTK of each sample with itself, either
    vmapped over single samples, or (``full``) from the whole (batch, batch, C, C) kernel's diagonal."""
    ntk = nt.empirical_ntk_fn(apply, trace_axes=(), vmap_axes=0, implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES)
    if full:
        return jax.jit(lambda params, x: jnp.einsum("iicd->icd", ntk(x, None, params)))
    return jax.jit(lambda params, x: jax.vmap(lambda xi: ntk(xi[None], None, params)[0, 0])(x))


def rel_errors(name: str) -> dict[str, float]:
    model = make_model(name).double().eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = structural_matrix(model, x, method="loop").A.numpy()
    gram = structural_matrix(model, x, method="gram").A.numpy()
    scale = np.abs(ref).max()
    out = {"gram": float(np.abs(gram - ref).max() / scale)}
    for key, full, linear in (("nt per-sample", False, "stored"), ("nt x@W.T port", False, "torch"), ("nt full kernel", True, "stored")):
        apply, params = to_jax(model, np.float64, linear=linear)
        ntk = np.asarray(nt_blocks(apply, full)(params, jnp.asarray(x.numpy())))
        out[key] = float(np.abs(ntk - ref).max() / scale)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=1,
                        help="calls per method and round, back to back after the pause; with more than one the first "
                             "(the one that wakes the runtime's threads) is not counted")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from importlib.metadata import version

    print(f"torch {torch.__version__}, jax {jax.__version__}, neural-tangents {version('neural-tangents')}, {torch.get_num_threads()} torch "
          f"threads, batch {BATCH}, C = 10, float32, {args.rounds} rounds of {args.calls} call(s) per method"
          f"{' (the first of each not counted)' if args.calls > 1 else ''}")
    print(f"{'model':8s} {'method':16s} {'median ms':>10s} {'× step':>8s} {'× gram':>8s} {'rel err f64':>12s}")
    print("-" * 68)
    for name in args.models:
        torch.manual_seed(0)
        model = make_model(name)
        x = torch.randn(BATCH, 1, 28, 28)
        y = torch.randint(0, 10, (BATCH,))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        apply, params = to_jax(model, np.float32)
        apply_t, params_t = to_jax(model, np.float32, linear="torch")
        blocks, full, blocks_t = nt_blocks(apply), nt_blocks(apply, full=True), nt_blocks(apply_t)
        xj = jnp.asarray(x.numpy())
        compile_s = []
        for fn, ps in ((blocks, params), (blocks_t, params_t), (full, params)):
            t0 = time.perf_counter()
            fn(ps, xj).block_until_ready()
            compile_s.append(time.perf_counter() - t0)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        runs = {
            "step": step,
            "gram": lambda: structural_matrix(model, x, method="gram").A,
            "nt per-sample": lambda: blocks(params, xj).block_until_ready(),
            "nt x@W.T port": lambda: blocks_t(params_t, xj).block_until_ready(),
            "nt full kernel": lambda: full(params, xj).block_until_ready(),
        }
        for fn in runs.values():
            fn()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                time.sleep(PAUSE)
                calls = 1 if k == "nt x@W.T port" else args.calls  # (0.1–6 s a call: one is enough)
                for call in range(calls):
                    t = time.perf_counter()
                    fn()
                    if calls == 1 or call > 0:
                        times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        errs = rel_errors(name)
        for k in runs:
            err = f"{errs[k]:.1e}" if k in errs else ""
            print(f"{name:8s} {k:16s} {1000 * med[k]:10.1f} {med[k] / med['step']:8.2f} {med[k] / med['gram']:8.2f} {err:>12s}")
        print(f"{'':8s} (neural-tangents compile {compile_s[0]:.1f} s / {compile_s[1]:.1f} s / {compile_s[2]:.1f} s, not counted)", flush=True)
        # the same model in A: gram against neural-tangents in float32 on this batch
        A_t = structural_matrix(model, x, method="gram").A.numpy()
        A_j = np.asarray(blocks(params, xj))
        print(f"{'':8s} float32 max |A_gram − A_nt| / max |A| = {np.abs(A_t - A_j).max() / np.abs(A_t).max():.1e}")


if __name__ == "__main__":
    main()
