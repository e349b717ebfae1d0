"""Side-by-side timing of the structural-matrix methods against a training step and the arithmetic bound.

    .venv/bin/python benchmarks/structural.py                 # the ten default models, about 12 minutes on 2 cores
    .venv/bin/python benchmarks/structural.py --models a1 mlp1024 --rounds 3 --no-loop
    .venv-nt/bin/python benchmarks/structural.py          # with the neural-tangents column (own environment)
    python benchmarks/structural.py --device cuda --batch 64 256   # on a GPU (peak memory from the CUDA allocator)

For each model (the paper's a–d at k = 1 and k = 5 under the default mapping, and an MLP of
width 256 and 1024), batch 64, C = 10, float32, it measures in one process, interleaved round by
round in a shuffled order (seeded; a new order each round) so that machine noise, and the
slowdown of whatever follows the GEMM that prices the contraction, hit every entry alike:

- a training step (forward, cross-entropy, backward, SGD step with lr 0);
- ``gram``, ``jacobian`` and (once, it is slow) ``loop``;
- the arithmetic bound = one forward + C activation-backward passes to the layer outputs (timed
  together as one unit on a fresh graph each round: the sequence every exact method must run)
  + the cheapest per-layer Gram contraction (its multiply-adds, from the layer shapes, at the GEMM
  throughput of a 2048² matrix product timed in the same rounds). The forward and one backward
  timed alone are printed too (C × that single warm backward is a weaker bound: a repeated warm backward
  on a kept graph is not what a method runs).
  On the CPU the sequence is also timed with the Conv2d outputs in channels-last, as ``gram``
  runs the model, and ``gram``'s ratio to that bound is printed under the model.

It prints medians, each method's ratio to the training step and to the bound, the peak memory of
each method (resident-set growth measured in a fresh subprocess; on CUDA the allocator's peak
above what was allocated before the call, workspaces released first) and the largest relative
error against the float64 ``loop`` oracle on 4 samples (the oracle on the CPU, the method on the
device). On CUDA every timing synchronises the device before and after the call.

When JAX and neural-tangents import (the environment of benchmarks/neural_tangents_env.md), it adds
**nt**: neural-tangents' STRUCTURED_DERIVATIVES per-sample NTK blocks on the same weights (the model
replayed in JAX by benchmarks/jax_port.py, jitted, vmapped over single samples; compile time
reported apart; its peak memory is that of a warm call). ``--no-nt`` leaves it out.

Also a **probe** row: ``Probe(model).measure(x, y)``, everything the per-step probe does (the
structural matrix, its eigenvalues and the paper's quantities) on the same batch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks.*` from any working directory

import torch
import torch.nn.functional as F

from benchmarks.models import BATCH, EXTRA_MODELS, MODELS, N_CLASSES, make_model
from optmech import Probe, structural_matrix
from optmech.models import n_params
from optmech.structure import EngineOptions, ForwardCapture, clear_cache, probing, trainable_parameters
from optmech.structure.cache import Workspace
from optmech.structure.contract import contraction_costs
from optmech.structure.layout import to_channels_last
from optmech.structure.patches import layer_patches, out_features

GEMM_SIZE = 2048


@functools.cache
def _gemm_operand() -> torch.Tensor:
    return torch.randn(GEMM_SIZE, GEMM_SIZE, generator=torch.Generator().manual_seed(0))


@functools.cache
def _gemm_operand_on(device: str) -> torch.Tensor:
    return _gemm_operand().to(device)


def gemm(device: str = "cpu") -> None:
    """One 2048×2048 float32 matrix product (2·2048³ FLOP): the throughput that prices the contraction."""
    a = _gemm_operand_on(device)
    a @ a


def bound_parts(model, x) -> tuple[callable, callable, callable, callable, callable, float]:
    """(forward fn, one activation-backward fn, forward + C backward passes fn, the same in channels-last,
    forward + the C passes as one vmapped backward fn, cheapest contraction multiply-adds).

    A MultiheadAttention's projections are priced as Linear layers over their positions, the in-projection
    block by block as ``gram`` contracts it; the passes go to the other fast layers' outputs (the projections'
    lie inside the attention call). A recurrent module (LSTM/GRU/RNN) runs its own fused kernel: the passes
    go through it to its input, and its weights are priced as ``gram``'s Linear layers over time."""
    named = trainable_parameters(model)
    # the layers and their shapes as the standalone gram call records them (attention's blocks, recurrent steps)
    capture = ForwardCapture(model, named, EngineOptions())
    with probing(model), capture, torch.enable_grad():
        model(x)
    for claim in capture.claims:
        claim.rule.after_forward(capture, claim)
    n, macs = x.shape[0], 0.0
    for claim in capture.claims:
        for layer in claim.all_layers():
            records = capture.records.get(id(layer), [])
            if not records:
                continue
            a, z = records[0].a, records[0].z
            rule, m = claim.rule.name, layer.module
            if rule in ("linear", "attention", "recurrent"):  # Linear layers over positions (stand-ins for the projections)
                K = m.in_features
                macs += min(contraction_costs(n, N_CLASSES, a[0].numel() // K, K, m.out_features, m.bias is not None).values())
            elif rule == "conv":  # a grouped conv: g convolutions of K/g inputs and d/g outputs (structure/grouped.py)
                patches, g = layer_patches(m, a, Workspace()), m.groups
                costs = contraction_costs(n * g, N_CLASSES, patches.shape[2], patches.shape[1] // g, out_features(m) // g, m.bias is not None)
                macs += min(costs.values())
            elif rule == "norm":  # Σ_positions b_c ⊙ x̂ and Σ_positions b_c, then their Gram
                size = sum(t.numel() for t in (m.weight, getattr(m, "bias", None)) if t is not None)
                macs += N_CLASSES * z.numel() + n * N_CLASSES**2 * size
            elif rule == "direct":  # Σ over the broadcast dimensions, then the Gram of the parameter's entries
                size = capture.by_name[layer.params[0]].numel()
                macs += N_CLASSES * z.numel() + n * N_CLASSES**2 * size
            else:
                raise NotImplementedError(f"the bound has no price for rule {rule!r}")
    fast = [layer.module for c in capture.claims for layer in c.layers if c.rule.name in ("linear", "conv", "norm")]
    recurrent = [c.module for c in capture.claims if c.rule.name == "recurrent"]

    def captured_forward(channels_last=False):
        """The model's own forward (no recomputed modules), recording the fast layers' outputs and the
        recurrent modules' inputs (as leaves): the tensors the passes reach."""
        captured = {}

        def hook(module, args, output):
            if channels_last and type(module) is torch.nn.Conv2d and to_channels_last(output):
                output = output.contiguous(memory_format=torch.channels_last)  # as gram hands it on
            captured[module] = output
            return output

        def pre_hook(module, args):
            leaf = args[0].detach().requires_grad_()
            captured[module] = leaf
            return (leaf, *args[1:])

        hooks = [m.register_forward_hook(hook) for m in fast]
        hooks += [m.register_forward_pre_hook(pre_hook) for m in recurrent]
        try:
            with torch.enable_grad():
                out = model(x)
        finally:
            for h in hooks:
                h.remove()
        return out, captured

    layers = fast + recurrent
    out, captured = captured_forward()
    zs = [captured[m] for m in layers]

    def forward():
        with torch.enable_grad():
            return model(x)

    def one_backward():
        return torch.autograd.grad(out[:, 0].sum(), zs, retain_graph=True)

    def forward_and_backwards(channels_last=False):
        fresh, cap = captured_forward(channels_last)
        targets = [cap[m] for m in layers]
        for c in range(N_CLASSES):
            torch.autograd.grad(fresh[:, c].sum(), targets, retain_graph=c < N_CLASSES - 1)

    def forward_and_one_vmapped_backward():
        fresh, cap = captured_forward()
        targets = [cap[m] for m in layers]
        eye = torch.eye(N_CLASSES, dtype=fresh.dtype, device=fresh.device).unsqueeze(1).expand(N_CLASSES, *fresh.shape)
        torch.autograd.grad(fresh, targets, grad_outputs=eye, is_grads_batched=True)

    return forward, one_backward, forward_and_backwards, functools.partial(forward_and_backwards, True), forward_and_one_vmapped_backward, macs


def neural_tangents_available() -> bool:
    try:
        import jax  # noqa: F401
        import neural_tangents  # noqa: F401
    except ImportError:
        return False
    return True


def nt_runner(model: torch.nn.Module, x: torch.Tensor, dtype=None):
    """(call, compile seconds): neural-tangents' per-sample blocks for ``model`` on ``x``, jitted and warm."""
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.jax_port import to_jax
    from benchmarks.vs_neural_tangents import nt_blocks

    apply, params = to_jax(model, dtype or np.float32)
    blocks, xj = nt_blocks(apply), jnp.asarray(x.numpy())
    t = time.perf_counter()
    blocks(params, xj).block_until_ready()
    return (lambda: blocks(params, xj).block_until_ready()), time.perf_counter() - t


def rel_errors(name: str, methods: list[str], device: str = "cpu") -> dict[str, float]:
    """Max |A − A_oracle| / max |A_oracle| in float64 on 4 samples, oracle = loop on the CPU, methods on ``device``."""
    model = make_model(name).double()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = structural_matrix(model, x, method="loop").A
    scale = ref.abs().max()
    model, xd = model.to(device), x.to(device)
    out = {m: float((structural_matrix(model, xd, method=m).A.cpu() - ref).abs().max() / scale) for m in methods if m != "nt"}
    if "nt" in methods:
        import numpy as np

        call, _ = nt_runner(model, x, np.float64)
        out["nt"] = float((torch.from_numpy(np.array(call())) - ref).abs().max() / scale)
    return out


def _hwm_kib() -> int:
    """Peak resident set (VmHWM) of this process in KiB. Unlike ru_maxrss it is not inherited across exec."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _reset_hwm() -> None:
    """Reset the peak resident set to the current one (Linux ≥ 4.0: "5" to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_memory_mib(name: str, method: str, batch: int = BATCH) -> float:
    """Resident-set growth of one call, measured in a fresh process (Linux /proc).

    The first call for the torch methods (their workspaces included); for nt a warm call after
    compilation (the compiler's memory is not a per-call cost).
    """
    calls = {
        "step": "torch.nn.functional.cross_entropy(m(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()",
        "probe": "Probe(m).measure(x, torch.zeros(x.shape[0], dtype=torch.long))",
        "nt": "call()",
    }
    code = (
        "import torch;"
        "from benchmarks.structural import make_model, nt_runner, _hwm_kib, _reset_hwm;"
        "from optmech import Probe, structural_matrix;"
        f"m = make_model({name!r}); x = torch.randn({batch}, 1, 28, 28); m(x);"
        + ("call, _ = nt_runner(m, x); _reset_hwm();" if method == "nt" else "")
        + "base = _hwm_kib();"
        + calls.get(method, f"structural_matrix(m, x, method={method!r}).A") + ";"
        "print((_hwm_kib() - base) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def cuda_peak_memory_mib(fn) -> float:
    """Peak CUDA allocation of one call above what was allocated before it (the engine's workspaces released first)."""
    clear_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timed(fn, sync=None) -> float:
    """Seconds of one call of ``fn``; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after."""
    if sync:
        sync()
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS + EXTRA_MODELS)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--no-loop", action="store_true", help="skip the slow loop oracle timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    parser.add_argument("--no-nt", action="store_true", help="leave out neural-tangents even where it imports")
    parser.add_argument("--device", default="cpu", help="torch device of the models and batches (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--batch", nargs="+", type=int, default=[BATCH], help="batch sizes (each model is timed at each)")
    args = parser.parse_args()
    # the bound's one-vmapped-backward row on a transformer: torch's fallback for fused attention (measured as it is)
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build ({torch.__version__})")
    sync = torch.cuda.synchronize if cuda else None
    with_nt = not cuda and not args.no_nt and neural_tangents_available()
    if with_nt:
        import jax

        jax.config.update("jax_enable_x64", True)  # for the float64 error column; timings use float32 arrays

    torch.manual_seed(0)
    if with_nt:
        from importlib.metadata import version

        versions = f"; jax {version('jax')}, neural-tangents {version('neural-tangents')}"
    else:
        versions = "; neural-tangents not installed (nt row left out)" if not args.no_nt else ""
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    batches = ", ".join(map(str, args.batch))
    print(f"torch {torch.__version__}, {where}, batch {batches}, C = {N_CLASSES}, float32{versions}")
    per_batch = args.batch != [BATCH]  # the model column then says "model/batch"
    width = 12 if per_batch else 8
    header = f"{'model/batch' if per_batch else 'model':{width}s} {'|θ|':>9s} {'method':9s} {'median ms':>10s} {'× step':>8s} {'× bound':>8s} {'peak MiB':>9s} {'rel err f64':>12s}"
    print(header)
    print("-" * len(header))
    for name, batch in [(m, b) for m in args.models for b in args.batch]:
        model = make_model(name).eval().to(device)
        x = torch.randn(batch, 1, 28, 28).to(device)
        y = torch.randint(0, N_CLASSES, (batch,)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)

        def step():
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        twin = copy.deepcopy(model)  # the bound's graph must not see the optimiser's in-place steps
        with probing(twin):
            forward, one_backward, forward_and_backwards, cl_forward_and_backwards, vmapped_backward, macs = bound_parts(twin, x)
        probe = Probe(model)
        methods = {"gram": lambda: structural_matrix(model, x, method="gram").A,
                   "probe": lambda: probe.measure(x, y),
                   "jacobian": lambda: structural_matrix(model, x, method="jacobian").A}
        compile_s = None
        if with_nt:
            methods["nt"], compile_s = nt_runner(model, x)
        # gram hands Conv2d outputs on in channels-last on the CPU: the same sequence timed that way too
        channels_last = device.type == "cpu" and any(type(m) is torch.nn.Conv2d for m in model.modules())
        times = {k: [] for k in ["step", "forward", "one_backward", "forward_and_backwards", "vmapped_backward", "gemm", *methods]}
        if channels_last:
            times["cl_forward_and_backwards"] = []
        step()  # warm-up
        gemm(args.device)
        with probing(twin):
            forward(), one_backward(), forward_and_backwards(), vmapped_backward()
            if channels_last:
                cl_forward_and_backwards()
        for fn in methods.values():
            fn()
        # short methods get more rounds (up to 30) so that a burst of load cannot cover all of them
        rounds = min(30, max(args.rounds, math.ceil(1.0 / max(timed(step, sync), 1e-3))))
        def in_probing(fn):
            def run():
                with probing(twin):
                    fn()
            return run

        timings = {"step": step, "forward": in_probing(forward), "one_backward": in_probing(one_backward),
                   "forward_and_backwards": in_probing(forward_and_backwards), "vmapped_backward": in_probing(vmapped_backward),
                   "gemm": lambda: gemm(args.device), **methods}
        if channels_last:
            timings["cl_forward_and_backwards"] = in_probing(cl_forward_and_backwards)
        order = random.Random(0)
        by_round: list[dict[str, float]] = []  # each round's times, to pair gram with that round's bound
        for _ in range(rounds):
            by_round.append({})
            # a fresh order every round: whatever runs right after the 2048² GEMM (which fills the last-level
            # cache) runs 2–8 % slower, so no entry may hold that place every round
            keys = list(timings)
            order.shuffle(keys)
            for key in keys:
                if key in methods and len(times[key]) >= 3 and sum(times[key]) > 15.0:
                    continue  # a slow method has had its 3 rounds and 15 s: enough for a median
                times[key].append(timed(timings[key], sync))
                by_round[-1][key] = times[key][-1]
                if key == "nt":
                    time.sleep(0.2)  # let XLA's worker threads go idle before the next torch timing
        if not args.no_loop:
            times["loop"] = [timed(lambda: structural_matrix(model, x, method="loop").A, sync)]
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = 2 * GEMM_SIZE**3 / med["gemm"]
        bound = med["forward_and_backwards"] + 2 * macs / rate
        errors = rel_errors(name, [m for m in ("gram", "jacobian", "nt") if m in med], args.device)
        label = f"{f'{name}/{batch}' if per_batch else name:{width}s} {n_params(model):9d}"
        rows = [("step", med["step"]), ("bound", bound)] + [(m, med[m]) for m in ("gram", "probe", "jacobian", "nt", "loop") if m in med]
        cuda_calls = {"step": step, "loop": lambda: structural_matrix(model, x, method="loop").A, **methods}
        for method, t in rows:
            if args.no_memory or method == "bound":
                mem = ""
            elif cuda:
                mem = f"{cuda_peak_memory_mib(cuda_calls[method]):9.0f}"
            else:
                mem = f"{peak_memory_mib(name, method, batch):9.0f}"
            err = f"{errors[method]:12.1e}" if method in errors else ""
            print(f"{label} {method:9s} {1e3 * t:10.1f} {t / med['step']:8.2f} {t / bound:8.2f} {mem:>9s} {err:>12s}")
            label = " " * len(label)
        print(f"{'':{width + 11}s} bound = forward + {N_CLASSES} activation backward passes {1e3 * med['forward_and_backwards']:.1f} ms "
              f"+ contraction {macs / 1e9:.2f} GMAC ({1e3 * 2 * macs / rate:.1f} ms at {rate / 1e9:.0f} GFLOP/s)")
        print(f"{'':{width + 11}s}   timed alone: forward {1e3 * med['forward']:.1f} ms, one backward {1e3 * med['one_backward']:.1f} ms "
              f"(forward + {N_CLASSES} × backward = {1e3 * (med['forward'] + N_CLASSES * med['one_backward']):.1f} ms)")
        paired = sorted(r["gram"] / (r["forward_and_backwards"] + macs * r["gemm"] / GEMM_SIZE**3) for r in by_round if "gram" in r)
        print(f"{'':{width + 11}s}   gram against the bound of its own round: median {statistics.median(paired):.2f}, "
              f"range {paired[0]:.2f}–{paired[-1]:.2f} ({len(paired)} rounds)")
        vm_bound = med["vmapped_backward"] + 2 * macs / rate
        print(f"{'':{width + 11}s}   with the {N_CLASSES} passes as one vmapped backward (is_grads_batched): forward + backward "
              f"{1e3 * med['vmapped_backward']:.1f} ms, bound {1e3 * vm_bound:.1f} ms, gram {med['gram'] / vm_bound:.2f} × that")
        if channels_last:
            cl_bound = med["cl_forward_and_backwards"] + 2 * macs / rate
            print(f"{'':{width + 11}s}   with the Conv2d outputs in channels-last, as gram runs them: forward + {N_CLASSES} backward "
                  f"passes {1e3 * med['cl_forward_and_backwards']:.1f} ms, bound {1e3 * cl_bound:.1f} ms, gram {med['gram'] / cl_bound:.2f} × that")
        if compile_s is not None:
            print(f"{'':{width + 11}s} nt: jit compilation {compile_s:.1f} s before the first call, not counted")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
