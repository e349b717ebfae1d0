"""Command line: ``optmech train``, ``optmech reproduce``, ``optmech report`` (thin: parse, call experiments, print with rich).

Errors in what the user gave (names, values, files, run directories) are printed as one message
without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="optmech: the optimisation-mechanism bounds of Qi, Gong & Li for PyTorch models.")
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """optmech: the optimisation-mechanism bounds of Qi, Gong & Li for PyTorch models."""


def _fail(message: str, code: int = 2) -> None:
    """One message, no traceback; status 2 for bad input, 3 for an internal inconsistency (--check)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "optmech[ray]" is text
    raise typer.Exit(code=code)


def _format_validation(exc) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())) or "config"
        msg = e.get("msg", "").removeprefix("Value error, ")
        parts.append(f"--{loc.replace('_', '-')}: {msg} (got {e.get('input')!r})" if loc != "config" else msg)
    return "; ".join(parts)


@app.command()
def train(
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run directory to write."),
    model: str = typer.Option("a", help="Paper model a–d (through --mapping) or a family: mlp, snet, cnn, resnet."),
    depth: int = typer.Option(1, help="k, the number of repeated blocks."),
    skip: bool | None = typer.Option(None, "--skip/--no-skip", help="Skip connections (families only)."),
    mapping: str = typer.Option("reconstruction", help="a–d mapping: reconstruction, swapped, authors-code."),
    init: str = typer.Option("pytorch", help="pytorch, he_normal, he_uniform, xavier_normal, xavier_uniform, orthogonal."),
    dropout: float = typer.Option(0.0, help="Dropout after hidden activations."),
    dataset: str = typer.Option("mnist5k", help="mnist5k, digits (bundled); mnist, fashion-mnist, cifar10 (from --data-dir)."),
    data_dir: str | None = typer.Option(None, help="Folder with the dataset's files."),
    loss: str = typer.Option("softmax", help="softmax, sparsemax, entmax15, entmax, squared."),
    alpha: float | None = typer.Option(None, help="Tsallis α for --loss entmax."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing ε."),
    optimizer: str = typer.Option("sgd", help="sgd or adam."),
    lr: float = typer.Option(0.01, help="Learning rate."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    epochs: int = typer.Option(1, help="Epochs."),
    steps: int | None = typer.Option(None, help="Train exactly this many steps, repeating passes over the data (replaces --epochs)."),
    max_steps: int | None = typer.Option(None, help="Stop after this many steps."),
    eval_every: int = typer.Option(100, help="Held-out loss and accuracy before every n-th step and after the last."),
    seed: int = typer.Option(1, help="Seed for initialisation, data order and probe choice."),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    device: str = typer.Option("cpu", help="Where the model, the batches and the probe run: cpu, cuda, cuda:1, ..."),
    probe_every: int = typer.Option(1, help="Measure before every n-th step."),
    n_probe: int = typer.Option(16, help="Fixed probe samples."),
    probe_split: str = typer.Option("test", help="Where the fixed probe samples come from: test (held out) or train."),
    probe_train_batch: bool = typer.Option(False, help="Also measure the current training batch."),
    published_pair: bool = typer.Option(False, help="Make the authors' two probe images (held-out #0 and its same-label partner) the first probes."),
    method: str = typer.Option("auto", help="Engine method: auto, gram, jacobian, loop."),
    check: bool = typer.Option(False, help="Cross-check ‖g‖² = eᵀAe against autograd on every probe sample."),
    per_layer: bool = typer.Option(False, help="Record each module's share of A_x (layer_trace:<module> columns)."),
    records_per_part: int = typer.Option(20, help="Records per Parquet part (a checkpoint follows each)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out with the same options."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    log: list[str] = typer.Option([], "--log", help="Also send each measurement's summary to KIND:TARGET (repeatable): "
                                  "tensorboard:DIR, wandb:PROJECT, mlflow:URI, parquet:FILE (extras: optmech[tensorboard] ...)."),
) -> None:
    """Train one model with the probe on a schedule and record every measurement."""
    from pydantic import ValidationError

    from .experiments.config import TrainConfig
    from .experiments.train import train as run_training

    try:
        config = TrainConfig(
            model=model, depth=depth, skip=skip, mapping=mapping, init=init, dropout=dropout, dataset=dataset,
            data_dir=data_dir, loss=loss, alpha=alpha, label_smoothing=label_smoothing, optimizer=optimizer, lr=lr,
            momentum=momentum, batch_size=batch_size, epochs=epochs, steps=steps, max_steps=max_steps, eval_every=eval_every, seed=seed, dtype=dtype, device=device,
            probe_every=probe_every, n_probe=n_probe, probe_split=probe_split, probe_train_batch=probe_train_batch, published_pair=published_pair,
            method=method, check=check, per_layer=per_layer, records_per_part=records_per_part,
        )
    except ValidationError as exc:
        _fail(_format_validation(exc))

    from .integrations.sinks import open_sink

    sinks = []
    try:
        for spec in log:
            sinks.append(open_sink(spec))
    except (ValueError, ImportError) as exc:
        _fail(str(exc))

    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("records {task.fields[records]}"), TextColumn("Thm-3 violations {task.fields[violations]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    task = None
    plain = not quiet and not console.is_terminal  # a file or a pipe: a plain line every tenth of the run

    def on_step(info: dict) -> None:
        nonlocal task
        for probe_set, m in info.get("measurements", ()):
            for sink in sinks:
                sink.log(info["measured_step"], m, f"optmech/{probe_set}")
        if plain:
            if info["step"] % max(1, info["total"] // 10) == 0 or info["step"] == info["total"]:
                console.print(f"step {info['step']}/{info['total']}  loss {info['loss']:.4f}  records {info['records']}  "
                              f"Theorem-3 violations {info['violations']}", highlight=False)
            return
        if task is None:
            progress.start()
            task = progress.add_task("train", total=info["total"], loss=info["loss"], records=0, violations=0)
        progress.update(task, completed=info["step"], loss=info["loss"], records=info["records"], violations=info["violations"])

    from .probe import ConsistencyError

    try:
        result = run_training(config, out, resume=resume, overwrite=overwrite, on_step=on_step)
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, ConsistencyError) as exc:
        if task is not None:
            progress.stop()
        _fail(str(exc), code=3 if isinstance(exc, ConsistencyError) else 2)
    finally:
        for sink in sinks:
            sink.close()
    if task is not None:
        progress.stop()
    _print_summary(result)


def _print_summary(result) -> None:
    s = result.summary
    table = Table(title="optmech train — summary (bounds: median over the fixed probes)", show_header=False, title_justify="left")
    table.add_column("quantity", style="bold")
    table.add_column("value")
    table.add_row("steps / records / rows", f"{s['steps']} / {s['records']} / {s['rows']}")
    style = "green" if s["theorem3_violations"] == 0 else "bold red"
    table.add_row("Theorem 3 violations", f"[{style}]{s['theorem3_violations']} of {s['rows']} probe rows[/]")
    table.add_row("rank-deficient rows (U = +inf)", str(s["rank_deficient_rows"]))
    table.add_row("final training loss", f"{s['final_train_loss']:.4f}")
    table.add_row("held-out accuracy / loss", f"{100 * s['heldout_accuracy']:.2f} % / {s['heldout_loss']:.4f}")
    if s.get("diverged_at_step") is not None:
        table.add_row("diverged", f"[bold red]training loss non-finite at step {s['diverged_at_step']}[/]")
    table.add_row("engine method", str(s["engine_method"]))
    fl = s.get("first_last_medians") or {}
    if fl:
        for key, label in (("log_fitting_error", "log₂ E_f"), ("lower", "lower bound"), ("upper", "upper bound"),
                           ("U", "U"), ("L", "L"), ("G", "G")):
            table.add_row(f"{label}, first → last record", f"{fl[key][0]:.4g} → {fl[key][1]:.4g}")
    table.add_row("time training / probing / writing", f"{s['training_s']:.1f} s / {s['probing_s']:.1f} s / {s['writing_s']:.1f} s")
    console.print(table)
    console.print(f"records: [bold]{result.records_path}[/]  (run.json beside it)")


@app.command()
def reproduce(
    preset: str = typer.Option("quick", help="quick (bundled MNIST-5k, offline), paper, fashion, cifar10, or a path to a TOML file."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Reproduction directory (default runs/<preset>)."),
    data_dir: str | None = typer.Option(None, help="Folder with the dataset's files (paper: MNIST IDX; cifar10: python batches)."),
    set_: list[str] = typer.Option([], "--set", help="Override a preset key, e.g. --set seeds=[1,2] --set train.n_probe=4."),
    jobs: int = typer.Option(2, help="Parallel worker processes (local); with --executor ray on a local instance, CPUs / jobs per task."),
    device: str | None = typer.Option(None, help="Device of the training runs (cpu, cuda, ...); the same as --set train.device=..."),
    executor: str = typer.Option("local", help="Where the jobs run: local (worker processes) or ray (Ray tasks; optmech[ray])."),
    address: str | None = typer.Option(None, help="With --executor ray: the cluster (auto, or HOST:PORT); default a local Ray instance."),
    cpus_per_job: int | None = typer.Option(None, help="With --executor ray: CPUs per task and its torch threads (default: CPUs / --jobs locally, 1 on a cluster)."),
    overwrite: bool = typer.Option(False, help="Replace a reproduction made with another config."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Reproduce the paper: train, sweep and check every claim, then write claims.json and report.html.

    Re-running the same command skips finished runs and completes interrupted ones.
    On a Ray cluster (--executor ray --address auto) --out must be a path every node sees (docs/cluster.md).
    """
    from pydantic import ValidationError

    from .experiments.executors import make_executor
    from .experiments.reproduce import ReproduceError
    from .experiments.reproduce import reproduce as run_reproduction
    from .experiments.reproduce_config import PresetError, load_preset

    if jobs < 1:
        _fail(f"jobs: expected a positive number of processes, got {jobs}.")

    try:
        config = load_preset(preset, overrides=[*set_, *([f"train.device={device}"] if device else [])], data_dir=data_dir)
    except ValidationError as exc:
        _fail(f"preset {preset}: {_format_validation(exc)}")
    except PresetError as exc:
        _fail(str(exc))
    run_dir = out or Path("runs") / config.name
    try:
        runner = make_executor(executor, jobs=jobs, address=address, device=str(config.train.get("device", "cpu")), cpus_per_job=cpus_per_job)
    except (ValueError, ImportError) as exc:
        _fail(str(exc))
    if executor == "local":
        runner = None  # reproduce's default: this process for one job, else the local pool
    progress = Progress(TextColumn("[bold]reproduce[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
                        TimeElapsedColumn(), console=console, disable=quiet)

    task, job_bars = None, {}
    plain = quiet is False and not console.is_terminal  # a file or a pipe: plain lines instead of bars

    def on_event(info: dict) -> None:
        nonlocal task
        if info["event"] == "progress":
            key = info["key"]
            if plain:
                if info["step"] == info["steps"] or info["step"] % max(1, info["steps"] // 4) < max(1, info["steps"] // 100):
                    console.print(f"{key}: step {info['step']}/{info['steps']}", highlight=False)
                return
            if task is None:
                return
            if key not in job_bars:
                job_bars[key] = progress.add_task("job", total=info["steps"], last=key)
            progress.update(job_bars[key], completed=info["step"])
            return
        if task is None and not plain:
            progress.start()
            task = progress.add_task("jobs", total=info["total"], last="")
        if info["event"] in ("done", "skip"):
            if plain and info["event"] == "done":
                console.print(f"[{info['done']}/{info['total']}] done: {info['key']} ({info.get('wall_s', 0):.0f} s)", highlight=False)
            elif task is not None:
                progress.update(task, completed=info["done"], last=f"{info['event']}: {info['key']}")
                if info["key"] in job_bars:
                    progress.remove_task(job_bars.pop(info["key"]))
        elif info["event"] == "failed":
            progress.console.print(f"[bold red]failed[/] {info['key']}: {info['error']}", highlight=False)

    try:
        result = run_reproduction(config, run_dir, jobs=jobs, overwrite=overwrite, on_event=on_event, executor=runner)
    except ReproduceError as exc:
        if task is not None:
            progress.stop()
        _fail(str(exc), code=3)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if task is not None:
            progress.stop()
        kept = f" Finished jobs are kept in {run_dir}; re-run the same command to continue." if (run_dir / "reproduce.json").is_file() else ""
        _fail(f"{exc}{kept}")
    if task is not None:
        progress.stop()
    console.print(f"jobs: {len(result.ran)} run, {len(result.skipped)} already finished; {result.wall_s:.0f} s")
    _report(run_dir)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A directory written by `optmech reproduce`.")) -> None:
    """Re-check every claim and rebuild every figure and report.html from the records, without retraining."""
    try:
        _report(run_dir)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))


def _measured(claim: dict) -> str:
    """One cell: the effect against its threshold and the null's false-pass rate, or the units' summary."""
    from .report.html import units_summary

    e = claim.get("effect")
    if claim["verdict"] == "not measurable" or not e or e.get("value") is None:
        return units_summary(claim)
    rate = e.get("null_false_pass_rate")
    null = f", null {100 * rate:.0f} %" if rate is not None else ""
    return f"{e['value']:.3g} (needs {e['threshold']}{null}); {units_summary(claim)}"


def _report(run_dir: Path) -> None:
    from rich.markup import escape

    from .experiments.claims import edge_sensitivity, evaluate_claims, run_table, write_claims
    from .records import read_reproduction
    from .report.html import build_report

    rep = read_reproduction(run_dir)
    claims = evaluate_claims(rep)
    runs = run_table(rep)
    without_edge = edge_sensitivity(rep, claims, runs)
    write_claims(claims, run_dir / "claims.json", runs, without_edge)
    path = build_report(run_dir)
    table = Table(title="claims (READING.md §2, §5)", title_justify="left")
    for column in ("id", "kind", "verdict", "measured"):
        table.add_column(column)
    style = {"holds": "green", "fails": "bold red", "inconclusive": "yellow", "not measurable": "dim"}
    for c in claims:  # ids and values may hold brackets ("C6.1 [pytorch]"): not rich markup
        table.add_row(escape(c.id), c.kind, f"[{style[c.verdict]}]{c.verdict}[/]", escape(_measured(c.to_json())))
    console.print(table)
    learned = [r for r in runs.values() if r["learned"]]
    if runs:
        accs = [r["heldout_accuracy"] for r in runs.values() if r["heldout_accuracy"] is not None]
        edge = [k for k, r in runs.items() if r.get("edge")]
        console.print(f"training runs: {len(learned)} of {len(runs)} learned (final held-out accuracy {min(accs):.3f}–{max(accs):.3f}); "
                      "the others' claims are not measurable"
                      + (f"; at the edge of learning (see the report): {', '.join(edge)}" if edge else ""))
    if without_edge is not None:
        moved = without_edge["moved"]
        console.print(f"without the runs that learned late ({', '.join(without_edge['runs'])}): "
                      + (", ".join(f"{escape(cid)} {m['from']} → {m['to']}" for cid, m in moved.items()) if moved else "no verdict moves"))
    from .experiments.claims import count_verdicts, summary_line

    console.print(f"{summary_line(count_verdicts(claims))} — claims: [bold]{run_dir / 'claims.json'}[/]")
    console.print(f"report: [bold]{path}[/]")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """Entry point of the ``optmech`` console script."""
    warnings.formatwarning = _one_line_warning  # "warning: <message>", without the source line
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - interactive
        err_console.print("interrupted: finished parts and checkpoints are kept; continue with `optmech train ... --resume`, "
                          "or by re-running the same `optmech reproduce` command.")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
