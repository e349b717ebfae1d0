"""The CLI: a real run with its summary, and clear errors without tracebacks (exit status 2)."""

import pytest
import torch
from typer.testing import CliRunner

from optmech.cli import app

runner = CliRunner()


def test_train_prints_summary_and_records_path(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--model", "d", "--dataset", "digits", "--max-steps", "3", "--n-probe", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Theorem 3 violations" in result.output and "0 of 6 probe rows" in result.output
    assert str(out / "records") in result.output.replace("\n", "")
    assert (out / "run.json").is_file()


def test_train_writes_plain_progress_lines_when_not_on_a_terminal(tmp_path):
    """Piped to a file (CliRunner's output is not a TTY): progress as plain lines, not an invisible bar."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--model", "c", "--dataset", "digits", "--steps", "30", "--n-probe", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/30" for s in (3, 6, 9, 12, 15, 18, 21, 24, 27, 30)]
    assert "held-out accuracy / loss" in result.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "z"], "--model: unknown model 'z'"),
        (["--dataset", "svhn"], "--dataset: unknown dataset 'svhn'"),
        (["--loss", "hinge"], "--loss: unknown loss 'hinge'"),
        (["--method", "gram2"], "--method: unknown engine method 'gram2'"),
        (["--dataset", "mnist"], "expected a data directory"),
        (["--dataset", "mnist", "--data-dir", "/no/such/dir"], "/no/such/dir: expected a directory"),
        (["--n-probe", "100000", "--dataset", "digits"], "n_probe: expected at most 359"),
        (["--dtype", "float16"], "--dtype"),
        (["--device", "tpu"], "--device: unknown device 'tpu'"),
    ],
)
def test_errors_are_clean(tmp_path, args, needle):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_resume_mismatch_is_clean(tmp_path):
    base = ["train", "--out", str(tmp_path / "r"), "--dataset", "digits", "--model", "mlp", "--depth", "0", "--max-steps", "2", "--n-probe", "2", "--quiet"]
    assert runner.invoke(app, base).exit_code == 0
    result = runner.invoke(app, [*base, "--lr", "0.1", "--resume"])
    assert result.exit_code == 2 and "lr: 0.01 (run) vs 0.1 (now)" in result.output.replace("\n", "")
    again = runner.invoke(app, base)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_internal_inconsistency_exits_3_without_traceback(tmp_path, monkeypatch):
    import importlib

    from optmech.probe import ConsistencyError

    train_module = importlib.import_module("optmech.experiments.train")  # the module, not the re-exported function

    def broken(*args, **kwargs):
        raise ConsistencyError("check: eᵀA_x e = 1 but autograd gives 2 on sample 0")

    monkeypatch.setattr(train_module, "train", broken)
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--quiet", "--check"])
    assert result.exit_code == 3 and "autograd gives 2" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["train", "--dataset", "digits"], ["reproduce", "--preset", "quick"]])
def test_a_missing_gpu_is_a_clean_error_before_anything_runs(tmp_path, command):
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "r"), "--quiet", "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "device: expected an available device, got 'cuda'" in result.output.replace("\n", "")
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


def test_reproduce_refuses_a_bad_train_value_before_any_job(tmp_path):
    result = runner.invoke(app, ["reproduce", "--preset", "quick", "--out", str(tmp_path / "r"), "--quiet", "--device", "tpu"])
    assert result.exit_code == 2 and "train.device" in result.output and "unknown device 'tpu'" in result.output
    assert not (tmp_path / "r").exists()


def test_a_missing_extra_is_named_as_the_pip_command(monkeypatch, tmp_path):
    import sys
    from pathlib import Path

    tiny = Path(__file__).parent / "data" / "tiny_preset.toml"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = CliRunner().invoke(app, ["reproduce", "--preset", str(tiny), "--executor", "ray", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "pip install optmech[ray]" in result.output and "Traceback" not in result.output
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = CliRunner().invoke(app, ["train", "--log", f"tensorboard:{tmp_path / 'tb'}", "--out", str(tmp_path / "t")])
    assert result.exit_code == 2 and "pip install optmech[tensorboard]" in result.output
    result = CliRunner().invoke(app, ["reproduce", "--preset", str(tiny), "--executor", "slurm", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "executor: expected one of ['local', 'ray'], got 'slurm'" in result.output
