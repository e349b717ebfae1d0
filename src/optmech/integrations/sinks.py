"""Where measurements go besides the run directory: TensorBoard, Weights & Biases, MLflow, Parquet.

One small interface, :class:`Sink`: ``sink.log(step, measurement)`` and ``sink.close()``. Every sink writes the same
summary of a measurement (:func:`summary_scalars`): per column of :data:`SUMMARIZED`, the median and the quartiles
over the batch's samples (``optmech/U/median``, ``optmech/U/q25``, ``optmech/U/q75``), the fraction of samples where
Theorem 3 holds and where A_x is rank deficient; sinks that draw distributions also get the per-sample values of
:data:`HISTOGRAMS`. Infinite values (U, G of a rank-deficient A_x) are left out of medians and histograms and
counted by ``rank_deficient_fraction``.

The packages are optional extras, imported when a sink is made: ``pip install optmech[tensorboard]``,
``optmech[wandb]``, ``optmech[mlflow]``. :func:`open_sink` reads the CLI's ``--log KIND:TARGET``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from ..metrics import Measurement

__all__ = ["Sink", "SUMMARIZED", "HISTOGRAMS", "summary_scalars", "histogram_values", "TensorBoardSink", "WandbSink",
           "MLflowSink", "ParquetSink", "open_sink", "SINK_KINDS"]

#: columns summarised by median and quartiles over a measurement's samples
SUMMARIZED = ("log_fitting_error", "log_gradient_norm", "U", "L", "G", "lower", "upper", "lambda_min", "lambda_max", "loss")

#: columns whose per-sample values go to histograms (TensorBoard, W&B); log_fitting_error is log₂ E_f
HISTOGRAMS = ("U", "L", "G", "log_fitting_error")


def _frame(m: Measurement | pd.DataFrame) -> pd.DataFrame:
    if isinstance(m, Measurement):
        return m.to_frame()
    if isinstance(m, pd.DataFrame):
        return m
    raise TypeError(f"measurement: expected an optmech Measurement or its to_frame() DataFrame, got {type(m).__name__} instead.")


def summary_scalars(m: Measurement | pd.DataFrame, prefix: str = "optmech") -> dict[str, float]:
    """{tag: value}: ``{prefix}/{column}/median|q25|q75`` over the finite values of each :data:`SUMMARIZED` column
    (NaN where none is finite), ``{prefix}/bound_holds_fraction``, ``{prefix}/rank_deficient_fraction`` and
    ``{prefix}/samples``."""
    frame = _frame(m)
    out: dict[str, float] = {}
    for column in SUMMARIZED:
        if column not in frame:
            continue
        values = frame[column].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75]) if len(values) else (math.nan,) * 3
        out[f"{prefix}/{column}/median"] = float(median)
        out[f"{prefix}/{column}/q25"] = float(q25)
        out[f"{prefix}/{column}/q75"] = float(q75)
    out[f"{prefix}/bound_holds_fraction"] = float(frame["bound_holds"].mean())
    out[f"{prefix}/rank_deficient_fraction"] = float(frame["rank_deficient"].mean())
    out[f"{prefix}/samples"] = float(len(frame))
    return out


def histogram_values(m: Measurement | pd.DataFrame) -> dict[str, np.ndarray]:
    """{column: finite per-sample values} for each of :data:`HISTOGRAMS` (an empty array where none is finite)."""
    frame = _frame(m)
    out = {}
    for column in HISTOGRAMS:
        values = frame[column].to_numpy(dtype=np.float64)
        out[column] = values[np.isfinite(values)]
    return out


class Sink(Protocol):
    """Receives measurements: ``log(step, measurement, prefix)`` any number of times, then ``close()``."""

    def log(self, step: int, measurement: Measurement | pd.DataFrame, prefix: str = "optmech") -> None: ...

    def close(self) -> None: ...


def _missing(package: str, extra: str) -> ImportError:
    return ImportError(f"{package} is not installed: `pip install optmech[{extra}]` (or `pip install {package}`) to use this sink.")


class TensorBoardSink:
    """Scalars (:func:`summary_scalars`) and histograms (:data:`HISTOGRAMS`) through ``torch.utils.tensorboard``.

    Args:
        log_dir: the event-file folder (``tensorboard --logdir`` it), or ``writer``: a ``SummaryWriter`` already open
            (Lightning's ``TensorBoardLogger.experiment``); a writer given is flushed, not closed, by :meth:`close`.
    """

    def __init__(self, log_dir: str | Path | None = None, *, writer=None) -> None:
        if writer is None:
            if log_dir is None:
                raise ValueError("log_dir: expected a folder for TensorBoard's event files (or writer=...), got None.")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise _missing("tensorboard", "tensorboard") from err
            writer, self._owned = SummaryWriter(log_dir=str(log_dir)), True
        else:
            self._owned = False
        self.writer = writer

    def log(self, step: int, measurement: Measurement | pd.DataFrame, prefix: str = "optmech") -> None:
        for tag, value in summary_scalars(measurement, prefix).items():
            self.writer.add_scalar(tag, value, step)
        self.log_histograms(step, measurement, prefix)

    def log_histograms(self, step: int, measurement: Measurement | pd.DataFrame, prefix: str = "optmech") -> None:
        """The per-sample values of :data:`HISTOGRAMS` only (a logger that already writes the scalars)."""
        for column, values in histogram_values(measurement).items():
            if len(values):
                self.writer.add_histogram(f"{prefix}/{column}", values, step)

    def close(self) -> None:
        self.writer.flush()
        if self._owned:
            self.writer.close()


class WandbSink:
    """Scalars and histograms to a Weights & Biases run (``wandb.init(**init)`` unless ``run`` is given; offline
    with ``mode="offline"`` or ``WANDB_MODE=offline``)."""

    def __init__(self, run=None, **init) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _missing("wandb", "wandb") from err
        self._wandb = wandb
        self._owned = run is None
        self.run = wandb.init(**init) if run is None else run

    def log(self, step: int, measurement: Measurement | pd.DataFrame, prefix: str = "optmech") -> None:
        data: dict = dict(summary_scalars(measurement, prefix))
        for column, values in histogram_values(measurement).items():
            if len(values):
                data[f"{prefix}/{column}"] = self._wandb.Histogram(values)
        self.run.log(data, step=step)

    def close(self) -> None:
        if self._owned:
            self.run.finish()


class MLflowSink:
    """Scalars to an MLflow run (``mlflow.start_run`` on ``tracking_uri``, e.g. ``sqlite:///mlflow.db``, unless a run is
    active). MLflow has no histograms; metric names use ``.`` for ``/`` only where MLflow refuses a character."""

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None) -> None:
        try:
            import mlflow
        except ImportError as err:
            raise _missing("mlflow", "mlflow") from err
        self._mlflow = mlflow
        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)
        if experiment is not None:
            mlflow.set_experiment(experiment)
        self._owned = mlflow.active_run() is None
        self.run = mlflow.start_run(run_name=run_name) if self._owned else mlflow.active_run()

    def log(self, step: int, measurement: Measurement | pd.DataFrame, prefix: str = "optmech") -> None:
        values = {tag: value for tag, value in summary_scalars(measurement, prefix).items() if math.isfinite(value)}
        self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self._owned:
            self._mlflow.end_run()


class ParquetSink:
    """Every per-sample row with its ``step``, in one Parquet file written atomically at each :meth:`log` (for
    runs that write no run directory of their own; ``optmech train`` already records every row)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.frames: list[pd.DataFrame] = []

    def log(self, step: int, measurement: Measurement | pd.DataFrame, prefix: str = "optmech") -> None:
        from ..records import write_parquet_atomic

        frame = _frame(measurement).copy()
        frame.insert(0, "step", step)
        frame.insert(1, "prefix", prefix)
        self.frames.append(frame)
        write_parquet_atomic(pd.concat(self.frames, ignore_index=True), self.path)

    def close(self) -> None:
        pass


#: ``--log`` kinds and what their target is
SINK_KINDS = {"tensorboard": "a folder for event files", "wandb": "a project name (offline when WANDB_MODE=offline)",
              "mlflow": "a tracking URI, e.g. sqlite:///mlflow.db", "parquet": "a .parquet file"}


def open_sink(spec: str) -> Sink:
    """A sink from ``KIND:TARGET`` (``tensorboard:runs/tb``, ``wandb:my-project``, ``mlflow:sqlite:///mlflow.db``,
    ``parquet:probe.parquet``)."""
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in SINK_KINDS:
        kinds = ", ".join(f"{k}:<{v}>" for k, v in SINK_KINDS.items())
        raise ValueError(f"log: expected KIND:TARGET with KIND one of {kinds}; got {spec!r} instead.")
    if kind == "tensorboard":
        return TensorBoardSink(target)
    if kind == "wandb":
        return WandbSink(project=target)
    if kind == "mlflow":
        return MLflowSink(tracking_uri=target)
    return ParquetSink(target)
