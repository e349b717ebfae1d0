"""The training run: Theorem 3 on every record, records and checkpoints, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from optmech import read_records
from optmech.experiments import TrainConfig, train
from optmech.experiments.train import RunDirError
from optmech.metrics import COLUMNS


@pytest.mark.parametrize("letter", ["a", "b", "c", "d"])
def test_theorem3_on_every_record_of_each_paper_model(tmp_path, letter):
    """k = 1, float64, with the autograd cross-check (eᵀAe vs ‖∇θ d‖² to 1e-8) on every probe sample."""
    cfg = TrainConfig(model=letter, depth=1, dataset="digits", max_steps=6, n_probe=4, dtype="float64", check=True, records_per_part=4)
    result = train(cfg, tmp_path / letter)
    rows = read_records(result.run_dir)
    assert len(rows) == 6 * 4 and rows["bound_holds"].all()
    assert result.summary["theorem3_violations"] == 0
    rel = (rows["gradient_norm_autograd"] - rows["gradient_norm"]).abs() / rows["gradient_norm"]
    assert (rel < 1e-8).all()
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["model"] == letter and meta["versions"]["torch"]
    assert {"training_s", "probing_s", "heldout_accuracy"} <= set(meta["summary"])


def test_records_layout_and_schedule(tmp_path):
    cfg = TrainConfig(model="snet", depth=1, dataset="digits", max_steps=7, probe_every=2, n_probe=3,
                      probe_train_batch=True, batch_size=32, records_per_part=2)
    result = train(cfg, tmp_path / "run")
    rows = read_records(result.run_dir)
    assert sorted(rows["step"].unique()) == [0, 2, 4, 6]
    assert set(rows["probe_set"]) == {"heldout", "train_batch"}
    assert (rows[rows.probe_set == "heldout"].groupby("step").size() == 3).all()
    assert (rows[rows.probe_set == "train_batch"].groupby("step").size() == 32).all()
    assert set(COLUMNS) <= set(rows.columns) and {"train_loss", "sample_id", "record", "epoch"} <= set(rows.columns)
    parts = sorted(p.name for p in (result.run_dir / "records").iterdir())
    assert parts == ["part-00000000-00000002.parquet", "part-00000004-00000006.parquet"]
    # the same fixed probe samples at every record
    held = rows[rows.probe_set == "heldout"]
    assert held.groupby("step")["sample_id"].apply(tuple).nunique() == 1
    # per-step aggregates, recomputable from the rows
    steps = pd.read_parquet(result.run_dir / "steps.parquet")
    assert len(steps) == 8 and set(steps["probe_set"]) == {"heldout", "train_batch"}
    first = steps[(steps.step == 2) & (steps.probe_set == "heldout")].iloc[0]
    at2 = held[held.step == 2]
    assert first["n_samples"] == 3 and first["violations"] == 0
    assert np.isclose(first["G_median"], at2["G"].median()) and np.isclose(first["U_q75"], at2["U"].quantile(0.75))


def _cli(*args, env=None):
    return [sys.executable, "-m", "optmech.cli", "train", *args]


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_rows(tmp_path):
    common = ["--model", "c", "--dataset", "digits", "--n-probe", "4", "--records-per-part", "3",
              "--batch-size", "16", "--max-steps", "40", "--dropout", "0.2", "--eval-every", "7", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli("--out", str(tmp_path / "full"), *common), check=True, env=env, capture_output=True)

    victim = tmp_path / "killed"
    # the event: the child's own plain progress line for step 20 (printed after the step's records are written)
    loud = [a for a in common if a != "--quiet"]
    proc = subprocess.Popen(_cli("--out", str(victim), *loud), env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("step 20/40"):
            break
    else:
        pytest.fail("the run ended before printing step 20")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(list((victim / "records").glob("part-*.parquet"))) >= 3
    assert json.loads((victim / "run.json").read_text())["status"] == "running", "the run finished before it was killed"
    killed_rows = len(read_records(victim))
    assert 0 < killed_rows < 40 * 4

    subprocess.run(_cli("--out", str(victim), *common, "--resume"), check=True, env=env, capture_output=True)
    full, resumed = read_records(tmp_path / "full"), read_records(victim)
    pd.testing.assert_frame_equal(full, resumed)
    evals = [pd.read_parquet(d / "evals.parquet") for d in (tmp_path / "full", victim)]
    pd.testing.assert_frame_equal(*evals)  # the held-out curve too: no evaluation lost or repeated
    assert evals[0]["step"].tolist() == [0, 7, 14, 21, 28, 35, 40]
    meta = json.loads((victim / "run.json").read_text())
    assert meta["status"] == "complete" and len(meta["resumed_at_steps"]) == 1


def test_steps_pass_over_the_data_repeatedly_and_record_held_out_curves(tmp_path):
    cfg = TrainConfig(model="mlp", depth=1, dataset="digits", steps=50, eval_every=20, eval_samples=100, n_probe=2, probe_every=23)
    result = train(cfg, tmp_path / "r")
    meta = json.loads((result.run_dir / "run.json").read_text())
    assert meta["steps"] == {"total": 50, "per_epoch": 23} and result.summary["steps"] == 50
    rows = read_records(result.run_dir)
    assert rows["step"].unique().tolist() == [0, 23, 46] and rows["epoch"].unique().tolist() == [0, 1, 2]  # 23 per pass
    evals = pd.read_parquet(result.run_dir / "evals.parquet")
    assert evals["step"].tolist() == [0, 20, 40, 50] and evals["n_images"].tolist() == [100, 100, 100, 359]
    assert result.summary["heldout_accuracy"] == evals["heldout_accuracy"].iloc[-1] > 0.3  # the final one on all 359
    assert result.summary["chance_accuracy"] == 0.1 and result.summary["heldout_loss"] == evals["heldout_loss"].iloc[-1]
    with pytest.raises(ValueError, match="either steps"):
        TrainConfig(steps=10, epochs=2)
    capped = TrainConfig(model="mlp", depth=0, dataset="digits", max_steps=40, n_probe=2, probe_every=20)
    with pytest.warns(UserWarning, match=r"max_steps: 40 is more than the 23 steps asked .* Use --steps 40"):
        assert train(capped, tmp_path / "capped").summary["steps"] == 23


def test_divergence_ends_the_run_when_asked(tmp_path):
    cfg = TrainConfig(model="mlp", depth=1, dataset="digits", steps=30, lr=1e6, momentum=0.0, n_probe=2)
    with pytest.raises(FloatingPointError, match="became non-finite|training loss became"):
        train(cfg, tmp_path / "raise")
    result = train(cfg.model_copy(update={"stop_on_divergence": True}), tmp_path / "stop")
    at = result.summary["diverged_at_step"]
    assert at is not None and result.summary["steps"] == at + 1 < 30
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "complete"


def test_an_overflowing_structural_matrix_ends_the_run_with_its_reason(tmp_path, monkeypatch):
    import importlib

    from optmech.metrics import NonFiniteStructureError

    train_module = importlib.import_module("optmech.experiments.train")

    measure = train_module.Probe.measure

    def overflow_at_step_4(self, x, y, **kw):
        overflow_at_step_4.calls += 1
        if overflow_at_step_4.calls == 5:
            raise NonFiniteStructureError("A: expected finite structural matrices")
        return measure(self, x, y, **kw)

    overflow_at_step_4.calls = 0
    monkeypatch.setattr(train_module.Probe, "measure", overflow_at_step_4)
    cfg = TrainConfig(model="mlp", depth=1, dataset="digits", steps=30, n_probe=2, stop_on_divergence=True)
    s = train(cfg, tmp_path / "r").summary
    assert (s["diverged_at_step"], s["diverged_because"], s["steps"]) == (4, "the structural matrix overflowed float32", 5)


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = TrainConfig(model="mlp", depth=0, dataset="digits", max_steps=2, n_probe=2)
    train(cfg, tmp_path / "r")
    with pytest.raises(RunDirError, match=r"lr: 0.01 \(run\) vs 0.5 \(now\)"):
        train(cfg.model_copy(update={"lr": 0.5}), tmp_path / "r", resume=True)
    with pytest.raises(RunDirError, match="Use --resume to continue it or --overwrite"):
        train(cfg, tmp_path / "r")
    with pytest.raises(RunDirError, match="--resume expects an existing run directory"):
        train(cfg, tmp_path / "nothing", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="only replaces optmech run directories"):
        train(cfg, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "thesis.tex").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model="z"), "unknown model 'z'"),
        (dict(dataset="imagenet"), "unknown dataset"),
        (dict(loss="hinge"), "unknown loss"),
        (dict(method="magic"), "unknown engine method"),
        (dict(model="a", skip=True), "fixes skip"),
        (dict(loss="entmax"), "needs alpha"),
        (dict(lr=-1), "greater than 0"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(device="gpu0"), "expected 'cpu', 'cuda' or 'cuda:<index>'"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_per_layer_columns_are_recorded(tmp_path):
    cfg = TrainConfig(model="d", depth=1, dataset="digits", max_steps=2, n_probe=2, per_layer=True)
    rows = read_records(train(cfg, tmp_path / "r").run_dir)
    assert "layer_trace:head" in rows.columns and (rows["layer_trace:head"] > 0).all()


def test_training_batch_probe_reuses_the_forward_and_matches_eval_measure(tmp_path):
    """Without dropout the train-batch rows come from the training forward; they equal a separate eval measure."""
    cfg = TrainConfig(model="c", depth=1, dataset="digits", max_steps=2, n_probe=2, probe_train_batch=True, batch_size=8, dtype="float64")
    rows = read_records(train(cfg, tmp_path / "reuse").run_dir)
    assert rows[rows.probe_set == "train_batch"]["bound_holds"].all()
    # the same batch measured with Probe.measure on the same initial weights
    from optmech import Probe
    from optmech.data import load
    from optmech.experiments.train import _build_model, _epoch_order

    data = load("digits")
    model = _build_model(cfg, data.input_shape, 10)
    ids = _epoch_order(cfg.seed, 0, len(data))[:8]
    expected = Probe(model).measure(data.inputs[ids].double(), data.targets[ids]).to_frame()
    got = rows[(rows.probe_set == "train_batch") & (rows.step == 0)].reset_index(drop=True)
    for col in ("gradient_norm", "lambda_min", "lambda_max", "fitting_error"):
        assert ((got[col] - expected[col]).abs() <= 1e-10 * expected[col].abs()).all(), col
    # with dropout the train-mode forward differs: the batch is measured separately with eval semantics
    dropped = read_records(train(cfg.model_copy(update={"dropout": 0.3}), tmp_path / "dropout").run_dir)
    assert len(dropped[dropped.probe_set == "train_batch"]) == 2 * 8 and dropped["bound_holds"].all()


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path):
    cfg = TrainConfig(model="mlp", depth=0, dataset="digits", max_steps=1, n_probe=2)
    train(cfg, tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        train(cfg.model_copy(update={"dataset": "mnist", "data_dir": str(tmp_path / "missing")}), tmp_path / "r", overwrite=True)
    assert (tmp_path / "r" / "run.json").is_file() and len(read_records(tmp_path / "r")) == 2


def test_device_is_normalised_and_an_absent_gpu_is_a_clear_error(tmp_path):
    assert TrainConfig(device="cuda:0").device == "cuda:0" and TrainConfig().device == "cpu"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: tests/test_cuda.py trains on it")
    cfg = TrainConfig(model="mlp", depth=0, dataset="digits", max_steps=1, n_probe=2, device="cuda")
    with pytest.raises(ValueError, match="device: expected an available device, got 'cuda'.*--device cpu"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists(), "nothing written before the device is known to work"


def test_a_run_written_before_a_config_field_existed_resumes_when_the_field_is_at_its_default(tmp_path):
    cfg = TrainConfig(model="mlp", depth=0, dataset="digits", max_steps=2, n_probe=2)
    train(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    del meta["config"]["device"]  # as written by a version without the field
    (tmp_path / "run" / "run.json").write_text(json.dumps(meta))
    assert train(cfg, tmp_path / "run", resume=True).summary["steps"] == 2
    with pytest.raises(RunDirError, match="device: 'cpu' \\(run\\) vs 'cuda' \\(now\\)"):
        train(cfg.model_copy(update={"device": "cuda"}), tmp_path / "run", resume=True)
