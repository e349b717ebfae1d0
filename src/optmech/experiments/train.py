"""One training run of the paper's setup with the probe on a schedule; read it top to bottom.

    optmech train --model a --depth 1 --dataset mnist5k --out runs/a1

Each record is measured *before* its step, on the current weights, for a fixed set of held-out
probe samples (and optionally the current batch); the held-out loss and accuracy are measured every
``eval_every`` steps and after the last one (``evals.parquet``). ``steps`` trains a fixed number of
steps, passing over the training set as often as needed. Rows go to Parquet parts every
``records_per_part`` records, each part followed by a checkpoint, so ``resume=True`` continues a
killed run and yields the same rows as an uninterrupted one (CPU, same seed). ``device`` puts the
model, the batches and the probe on a GPU; the initial weights are drawn on the CPU first, so
they are the same on every device (GPU kernels need not be bitwise reproducible, so neither
need a resumed GPU run's rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch

from .. import data as datasets
from ..losses import NonFiniteLogitsError, get_loss
from ..metrics import EXTRAS, NonFiniteStructureError
from ..models import FAMILIES, build, build_paper, n_params, paper_spec
from ..probe import Probe, mode_dependent_modules
from ..records import (
    RecordWriter,
    fixed_probe_medians,
    load_checkpoint,
    read_json,
    read_records,
    save_checkpoint,
    step_aggregates,
    write_json_atomic,
    write_parquet_atomic,
)
from .config import TrainConfig

__all__ = ["train", "evaluate", "RunResult", "RunDirError"]

#: columns of a run's evals.parquet: held-out loss and accuracy along training
_EVAL_COLUMNS = ["step", "heldout_loss", "heldout_accuracy", "n_images", "train_loss"]


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, differs, or is not a run)."""


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    records_path: Path
    summary: dict


def environment_versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("optmech", "torch", "numpy", "pandas", "pyarrow", "pydantic"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["torch_threads"] = torch.get_num_threads()
    return out


def _config_diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON turns tuples into lists
    return [f"{k}: {old.get(k)!r} (run) vs {new.get(k)!r} (now)" for k in keys if norm(old.get(k)) != norm(new.get(k))]


def _check_run_dir(run_dir: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> tuple[dict | None, bool]:
    """Check the directory against the request, changing nothing.

    Returns (the stored run.json when resuming, whether an existing run is to be replaced).
    """
    meta_path = run_dir / "run.json"
    if resume and overwrite:
        raise RunDirError("resume/overwrite: expected at most one of --resume and --overwrite, got both.")
    if resume:
        if not meta_path.is_file():
            raise RunDirError(f"{run_dir}: --resume expects an existing run directory with run.json, found none. Drop --resume to start it.")
        stored = read_json(meta_path)
        # a field added after the run was written counts as its default (e.g. device = "cpu")
        old = {**TrainConfig().model_dump(mode="json"), **stored.get("config", {})}
        diff = _config_diff(old, config.model_dump(mode="json"))
        if diff:
            raise RunDirError(
                f"{run_dir}: --resume expects the same config as the stored run, got differences: {'; '.join(diff)}. "
                "Repeat the original options, or start a new run with another --out."
            )
        return stored, False
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"{run_dir}: expected a new or empty run directory, got an existing one. Use --resume to continue it or --overwrite to replace it.")
        if not meta_path.is_file():
            raise RunDirError(f"{run_dir}: --overwrite only replaces optmech run directories (with run.json); this one has none. Choose another --out.")
        return None, True
    return None, False


def check_device(config: TrainConfig) -> torch.device:
    """The run's device, checked against what this torch build and machine have."""
    device = torch.device(config.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: expected an available device, got {config.device!r} but torch {torch.__version__} sees no CUDA "
                "device here. Use --device cpu, or run on a machine with a GPU and a CUDA build of torch."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: expected one of cuda:0…cuda:{torch.cuda.device_count() - 1}, got {config.device!r}. "
                "Pick an existing GPU index."
            )
    return device


def _build_model(config: TrainConfig, input_shape: tuple[int, ...], n_classes: int) -> torch.nn.Module:
    dtype = getattr(torch, config.dtype)
    kw = dict(depth=config.depth, init=config.init, dropout=config.dropout, input_shape=input_shape,
              n_classes=n_classes, seed=config.seed, dtype=dtype)
    if config.model in FAMILIES:
        return build(config.model, skip=bool(config.skip), **kw)
    return build_paper(config.model, mapping=config.mapping, **kw)


@contextlib.contextmanager
def _timer(timings: dict, key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] += time.perf_counter() - t0


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, from its own generator (resumable, RNG-independent)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _probe_indices(seed: int, targets: torch.Tensor, n_probe: int, *, published_pair: bool = False) -> torch.Tensor:
    """Fixed probe sample ids: ``n_probe`` chosen by seed, or with ``published_pair`` the authors' pair first.

    The authors' pair (READING.md §1.5) is held-out image #0 ("val") and the first later image with
    the same label ("test"; #17 in standard MNIST); the remaining ids are chosen by seed.
    """
    n_available = len(targets)
    if n_probe > n_available:
        raise ValueError(f"n_probe: expected at most {n_available} (the probe split's size), got {n_probe} instead.")
    order = torch.randperm(n_available, generator=torch.Generator().manual_seed(seed + 7919))
    if not published_pair:
        return order[:n_probe].sort().values
    same = (targets[1:] == targets[0]).nonzero().flatten()
    if not len(same):
        raise ValueError("published_pair: expected a later held-out image with the label of image #0, found none.")
    pair = torch.tensor([0, int(same[0]) + 1])
    rest = order[~torch.isin(order, pair)][: n_probe - 2].sort().values
    return torch.cat([pair, rest])


def _rows(measurement, *, step: int, epoch: int, record: int, probe_set: str, sample_ids: torch.Tensor, train_loss: float) -> pd.DataFrame:
    frame = measurement.to_frame()
    frame.insert(0, "step", step)
    frame.insert(1, "epoch", epoch)
    frame.insert(2, "record", record)
    frame.insert(3, "probe_set", probe_set)
    frame.insert(4, "sample_id", sample_ids.numpy())
    frame.insert(5, "train_loss", train_loss)
    frame["method"] = measurement.method
    return frame


def _first_last_medians(records: pd.DataFrame) -> dict:
    """Median over the fixed probe samples of a few columns at the first and the last record."""
    if not len(records):
        return {}
    med = fixed_probe_medians(records, ("log_fitting_error", "lower", "upper", "U", "L", "G"))
    return {c: [float(med[c].iloc[0]), float(med[c].iloc[-1])] for c in med.columns}


@torch.no_grad()
def evaluate(model: torch.nn.Module, criterion, inputs: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
             device: torch.device, batch: int = 250) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode on ``inputs`` (N, …) with labels ``targets`` (N,);
    the training mode is restored afterwards. Rows with non-finite logits count as wrong and make the loss NaN."""
    mode = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(targets), batch):
        y = targets[start : start + batch].to(device)
        logits = model(inputs[start : start + batch].to(device=device, dtype=dtype))
        finite = torch.isfinite(logits).all(dim=1)
        loss_sum += float(criterion(logits, y)) * len(y) if bool(finite.all()) else math.nan  # a diverged model: NaN
        correct += int(((logits.argmax(1) == y) & finite).sum())
    model.train(mode)
    n = max(1, len(targets))
    return loss_sum / n, correct / n


def _eval_ids(seed: int, n_available: int, n: int | None) -> torch.Tensor:
    """The fixed held-out subset evaluated along training (all images when ``n`` is None)."""
    if n is None or n >= n_available:
        return torch.arange(n_available)
    return torch.randperm(n_available, generator=torch.Generator().manual_seed(seed + 104_729))[:n].sort().values


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train one model with the probe on schedule and write the run directory.

    Args:
        config: the run's :class:`TrainConfig`.
        out: the run directory.
        resume: continue an interrupted run with the same config.
        overwrite: replace an existing run directory.
        on_step: called after every step with a dict (step, total, loss, records, violations, measurements: the
            step's [(probe set, Measurement)], taken before step ``measured_step`` as the records say); the CLI draws its progress bar and feeds its ``--log`` sinks from it.

    Returns:
        :class:`RunResult` with the run directory, the records folder and the summary.
    """
    run_dir = Path(out)
    stored, replace = _check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
    dtype = getattr(torch, config.dtype)
    device = check_device(config)
    started = time.time()

    # --- data, model, optimiser, probe --------------------------------------------------------
    train_set = datasets.load(config.dataset, root=config.data_dir, split="train")
    heldout = datasets.load(config.dataset, root=config.data_dir, split="test")
    probe_source = heldout if config.probe_split == "test" else train_set
    probe_ids = _probe_indices(config.seed, probe_source.targets, config.n_probe, published_pair=config.published_pair)
    x_probe = probe_source.inputs[probe_ids].to(device=device, dtype=dtype)
    y_probe = probe_source.targets[probe_ids].to(device)

    torch.manual_seed(config.seed)  # initialised on the CPU, then moved: the same initial weights on every device
    model = _build_model(config, train_set.input_shape, train_set.n_classes).to(device)
    criterion = get_loss(config.loss, **config.loss_kwargs())
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.channels_last:  # faster convolution kernels; Linear-only models are unchanged
        model = model.to(memory_format=torch.channels_last)
    probe = Probe(model, criterion, method=config.method, weights=config.weights, check=False, per_layer=config.per_layer,
                  extras=EXTRAS)
    checked = Probe(model, criterion, method=config.method, weights=config.weights, check=True, per_layer=config.per_layer,
                    extras=EXTRAS) \
        if config.check else probe

    # the training batch is measured on the training forward itself when train and eval forwards agree
    reuse_forward = not mode_dependent_modules(model)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    if config.max_steps is not None:
        if config.max_steps > total_steps:
            warnings.warn(f"max_steps: {config.max_steps} is more than the {total_steps} steps asked ({config.epochs} epoch(s) of "
                          f"{steps_per_epoch}); the run stops at {total_steps}. Use --steps {config.max_steps} to train that many "
                          "steps over repeated passes.", stacklevel=2)
        total_steps = min(total_steps, config.max_steps)

    # --- state: fresh or from the checkpoint (the old run is replaced only once data and model loaded)
    if replace:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = RecordWriter(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    step, n_records, violations = 0, 0, 0
    timings = {"training_s": 0.0, "probing_s": 0.0, "writing_s": 0.0, "evaluating_s": 0.0}
    last_loss = float("nan")
    evals: list[dict] = []  # held-out loss and accuracy along training
    diverged_at, diverged_because = None, None
    eval_ids = _eval_ids(config.seed, len(heldout), config.eval_samples)
    x_eval, y_eval = heldout.inputs[eval_ids], heldout.targets[eval_ids]

    def evaluate_now(at_step: int, full: bool = False) -> None:
        with _timer(timings, "evaluating_s"):
            xs, ys = (heldout.inputs, heldout.targets) if full else (x_eval, y_eval)
            loss_value, accuracy = evaluate(model, criterion, xs, ys, dtype, device)
        evals.append({"step": at_step, "heldout_loss": loss_value, "heldout_accuracy": accuracy, "n_images": len(ys),
                      "train_loss": last_loss})

    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step, n_records, violations = ckpt["step"], ckpt["n_records"], ckpt["violations"]
        timings, last_loss = {**timings, **ckpt["timings"]}, ckpt["last_loss"]
        evals, diverged_at, diverged_because = list(ckpt.get("evals", [])), ckpt.get("diverged_at"), ckpt.get("diverged_because")
        if diverged_at is not None:
            total_steps = step  # it ended there
    if resume:
        writer.drop_from(step)
    meta = {
        "config": config.model_dump(mode="json"),
        "status": "running",
        "seed": config.seed,
        "versions": environment_versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "model": {"family_skip": list(paper_spec(config.model, config.mapping)) if config.model not in FAMILIES
                  else [config.model, bool(config.skip)], "n_params": n_params(model)},
        "data": {"train": len(train_set), "heldout": len(heldout), "probe_split": config.probe_split,
                 "probe_ids": probe_ids.tolist(), "published_pair": probe_ids[:2].tolist() if config.published_pair else None},
        "steps": {"total": total_steps, "per_epoch": steps_per_epoch},
        "started": (stored or {}).get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
        "resumed_at_steps": (stored or {}).get("resumed_at_steps", []) + ([step] if resume else []),
    }
    write_json_atomic(run_dir / "run.json", meta)

    # --- the loop -----------------------------------------------------------------------------
    order, order_epoch = None, -1
    model.train()
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(config.seed, epoch, len(train_set)), epoch
        batch_ids = order[i * config.batch_size : (i + 1) * config.batch_size]
        x = train_set.inputs[batch_ids].to(device=device, dtype=dtype)
        y = train_set.targets[batch_ids].to(device)

        if step % config.eval_every == 0:
            evaluate_now(step)
        measurements = []
        probing_now = step % config.probe_every == 0
        on_record = checked if n_records % config.check_every == 0 else probe  # the cross-check on every n-th record
        reuse_now = probing_now and config.probe_train_batch and reuse_forward
        try:
            if probing_now:  # measure before the step, on the current weights
                with _timer(timings, "probing_s"):
                    fixed_set = "heldout" if config.probe_split == "test" else "train_fixed"
                    measurements.append((fixed_set, on_record.measure(x_probe, y_probe), probe_ids))
                    if config.probe_train_batch and not reuse_forward:  # dropout/BatchNorm: eval semantics
                        measurements.append(("train_batch", on_record.measure(x, y), batch_ids))
            with _timer(timings, "training_s"), (on_record.capture() if reuse_now else contextlib.nullcontext()) as captured:
                logits = model(x)
            if reuse_now:  # the training batch, measured on the training forward itself
                with _timer(timings, "probing_s"):
                    measurements.append(("train_batch", captured.measure(x, y, logits), batch_ids))
            with _timer(timings, "training_s"):
                loss = criterion(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last_loss = float(loss.detach())
            finite = math.isfinite(last_loss) and bool(torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all())
            what = "" if finite else f"training loss became {last_loss}" if not math.isfinite(last_loss) else "the weights became non-finite"
        except NonFiniteLogitsError:  # the weights overflowed the logits before this step
            finite, what, measurements = False, "the logits became non-finite", []
        except NonFiniteStructureError:  # the probe's J_x J_xᵀ overflowed the model's dtype
            finite, what, measurements = False, f"the structural matrix overflowed {config.dtype}", []
        if not finite and config.stop_on_divergence:
            diverged_at, diverged_because = step, what
        elif not finite:
            raise FloatingPointError(
                f"{what} at step {step}. Lower --lr or check the data; records up to step "
                f"{step - 1} are in {run_dir / 'records'}."
            )

        t0 = time.perf_counter()
        for probe_set, m, ids in measurements:
            writer.add(_rows(m, step=step, epoch=epoch, record=n_records, probe_set=probe_set, sample_ids=ids, train_loss=last_loss))
            violations += m.n_violations
        if measurements:
            n_records += 1
        step += 1
        if diverged_at is not None:
            total_steps = step  # the run ends here, recorded as diverged
        if step == total_steps:
            evaluate_now(step, full=True)  # after the last step (or the divergence), on every held-out image
        if (measurements and n_records % config.records_per_part == 0) or step == total_steps:
            writer.flush()  # the part first, then the checkpoint that says where to continue
            write_parquet_atomic(pd.DataFrame(evals, columns=_EVAL_COLUMNS), run_dir / "evals.parquet")
            save_checkpoint(ckpt_path, {
                "step": step, "n_records": n_records, "violations": violations, "timings": timings, "evals": evals,
                "diverged_at": diverged_at, "diverged_because": diverged_because,
                "last_loss": last_loss, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            })
        timings["writing_s"] += time.perf_counter() - t0
        if on_step is not None:
            on_step({"step": step, "total": total_steps, "loss": last_loss, "records": n_records, "violations": violations,
                     "measurements": [(probe_set, m) for probe_set, m, _ in measurements], "measured_step": step - 1})

    # --- summary ------------------------------------------------------------------------------
    records = read_records(run_dir)
    write_parquet_atomic(step_aggregates(records), run_dir / "steps.parquet")
    final = evals[-1]
    summary = {
        "steps": total_steps,
        "diverged_at_step": diverged_at,
        "diverged_because": diverged_because,
        "records": n_records,
        "rows": int(len(records)),
        "theorem3_violations": int((~records["bound_holds"]).sum()) if len(records) else 0,
        "rank_deficient_rows": int(records["rank_deficient"].sum()) if len(records) else 0,
        "final_train_loss": last_loss,
        "heldout_accuracy": final["heldout_accuracy"],
        "heldout_loss": final["heldout_loss"],
        "chance_accuracy": 1.0 / train_set.n_classes,
        "engine_method": str(records["method"].iloc[-1]) if len(records) else None,
        "first_last_medians": _first_last_medians(records),
        "training_s": round(timings["training_s"], 3),
        "probing_s": round(timings["probing_s"], 3),
        "writing_s": round(timings["writing_s"], 3),
        "evaluating_s": round(timings["evaluating_s"], 3),
        "wall_s_this_session": round(time.time() - started, 3),
    }
    meta.update(status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), summary=summary)
    write_json_atomic(run_dir / "run.json", meta)
    return RunResult(run_dir=run_dir, records_path=run_dir / "records", summary=summary)
