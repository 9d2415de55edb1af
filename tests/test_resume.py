"""Nothing lost, nothing silent: finished runs are never replaced, resume rules, divergence, Ctrl-C, output folders."""

from __future__ import annotations

import csv
import math
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _file_utils import read_only_folder
from _train_utils import env, wait_for_step, write_fashion_mnist

from openaff.cli import main
from openaff.files import load_weights
from openaff.training import ConfigError, NonFiniteLossError, make_config
from openaff.training.checkpoint import load_checkpoint
from openaff.training.train import fresh_run_folder, train

TINY = ["--model", "aff_cifar_resnet8", "--model-kwargs", "width_mult=0.125", "--threads", "1", "--workers", "0",
        "--no-progress", "--amp", "none", "--limit-train", "128", "--limit-val", "64", "--batch-size", "32",
        "--lr", "0.05", "--epochs", "1"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64)


def _args(data: Path, *more: str) -> list[str]:
    return ["train", "--data", "fashion-mnist", "--data-dir", str(data), *TINY, *more]


@pytest.fixture(scope="module")
def finished(fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run (tests copy it before touching it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(_args(fmnist, "--output", str(out))) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _cosine_mean(peak: float, total: int, updates: range) -> float:
    """The mean rate of ``updates`` (0-based) on a cosine from ``peak`` to 0 over ``total`` updates, no warm-up."""
    return sum(peak * (1 + math.cos(math.pi * t / total)) / 2 for t in updates) / len(updates)


def test_metrics_lr_is_the_mean_rate_the_epoch_trained_with(finished: Path) -> None:
    # A 1-epoch cosine run ends at lr 0; the column must not say the epoch trained at 0 (it was 0.05 -> 0.0073).
    rows = list(csv.DictReader((finished / "metrics.csv").open()))
    assert len(rows) == 1 and "lr" not in rows[0]
    lr_mean = float(rows[0]["lr_mean"])
    assert lr_mean == pytest.approx(_cosine_mean(0.05, 4, range(4)), rel=1e-5)  # 0.03125 for 4 updates
    assert load_checkpoint(finished / "last.pt")["optimizer"]["param_groups"][0]["lr"] == 0  # what it logged before


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("openaff train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _params(run: Path) -> dict[str, torch.Tensor]:
    """The learnable weights in ``run/last.pt`` (not BN statistics, not the frozen input BN)."""
    import timm

    ckpt = load_checkpoint(run / "last.pt")
    net = timm.create_model(ckpt["config"]["model"], num_classes=10, in_chans=1, **ckpt["config"]["model_kwargs"])
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    return {k: v for k, v in ckpt["model"].items() if k in names}


def test_a_run_in_the_output_folder_is_refused_unless_overwrite(fmnist: Path, finished: Path, tmp_path: Path,
                                                                capsys) -> None:
    run = _copy(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(_args(fmnist, "--output", str(run), "--epochs", "2")) == 2
    err = _one_error_line(capsys)
    assert f"--resume {run}" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # not one byte changed
    assert main(_args(fmnist, "--output", str(run), "--epochs", "2", "--overwrite")) == 0
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2  # the new run's files
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--overwrite"]) == 2
    assert "--overwrite" in _one_error_line(capsys)


def test_without_output_every_run_gets_a_fresh_folder(fmnist: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(_args(fmnist)) == 0
    assert main(_args(fmnist)) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2, runs
    for run in runs:
        assert re.fullmatch(r"aff_cifar_resnet8-fashion-mnist-\d{8}-\d{6}(-2)?", run.name), run.name
        assert (run / "model.safetensors").is_file()
        # config.yaml tells where the run is (the folder is a recipe that resumes there)
        assert Path(yaml.safe_load((run / "config.yaml").read_text())["output"]).resolve() == run.resolve()
    # Two runs started in the same second: the folder name is claimed atomically, the next one gets -2, -3.
    made = [fresh_run_folder(tmp_path / "r", "m-d", stamp="20250101-000000") for _ in range(3)]
    assert [p.name for p in made] == ["m-d-20250101-000000", "m-d-20250101-000000-2", "m-d-20250101-000000-3"]


def test_resume_with_more_epochs_trains_them_at_the_longer_schedules_lr(finished: Path, tmp_path: Path,
                                                                       capsys) -> None:
    run = _copy(finished, tmp_path)
    after_one = _params(run)
    capsys.readouterr()
    # Before: the restored 1-epoch scheduler kept lr 0, and no learnable weight moved.
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    # 4 steps per epoch, cosine without warm-up: the 3-epoch schedule at update 4 is 0.05 * (1 + cos(pi / 3)) / 2.
    assert "epochs 1 -> 3: the learning rate now follows the 3-epoch schedule from update 4 on (0 -> 0.0375)" in out
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    # lr_mean: the mean of the rates epoch 2's updates 4..7 trained with, on the 3-epoch (12-update) cosine.
    assert float(rows[1]["lr_mean"]) == pytest.approx(_cosine_mean(0.05, 12, range(4, 8)), rel=1e-5)
    after_three = _params(run)
    moved = [k for k in after_one if not torch.equal(after_one[k], after_three[k])]
    assert len(moved) == len(after_one), "some learnable weights did not change in the extra epochs"
    # config.yaml and the checkpoint tell the truth: 3 epochs now.
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    assert load_checkpoint(run / "last.pt")["config"]["epochs"] == 3


@pytest.mark.parametrize(("flags", "named"), [
    (["--lr", "0.5"], "--lr"), (["--batch-size", "16"], "--batch-size"), (["--model", "aff_cifar_resnet14"], "--model"),
    (["--limit-train", "64"], "--limit-train"), (["--seed", "3"], "--seed"), (["--amp", "bf16"], "--amp"),
    (["--output", "elsewhere"], "--output"), (["--epochs", "1"], "--epochs N (N > 1)"),
    (["--recipe", "fashion-mnist-cpu"], "--recipe"),
])
def test_resume_refuses_what_would_not_continue_exactly(finished: Path, flags: list[str], named: str,
                                                         capsys) -> None:
    before = (finished / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(finished), *flags]) == 2
    assert named in _one_error_line(capsys)
    assert (finished / "config.yaml").read_bytes() == before


def test_resume_allows_run_time_settings_and_the_api_checks_too(finished: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    # Repeating the run's own values is no change; run-time settings may change.
    assert main(["train", "--resume", str(finished), "--print-config", "--lr", "0.05", "--threads", "2",
                 "--workers", "0", "--epochs", "4"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["epochs"], cfg["threads"], cfg["lr"]) == (4, 2, 0.05)
    given = make_config({**load_checkpoint(finished / "last.pt")["config"], "lr": 0.1, "epochs": 2})
    with pytest.raises(ConfigError, match="--lr cannot change when resuming"):
        train(given, resume=finished)
    with pytest.raises(ConfigError, match="has already trained 1 epochs|has finished its 1 epochs"):
        train(resume=finished)


@pytest.mark.parametrize("flags", [["--lr", "1e5"], ["--lr", "1e6", "--checkpoint-every", "1"]])
def test_a_diverged_run_stops_with_status_2_and_keeps_no_non_finite_file(fmnist: Path, tmp_path: Path, flags,
                                                                         capsys) -> None:
    """Huge lr with gradient clipping: the training loss stays finite while BN running_vars overflow.

    Before, the first run exited 0 with inf running_var in best.safetensors and last.pt; the
    second (checkpoints every step) wrote them into last.pt.
    """
    out = tmp_path / "div"
    capsys.readouterr()
    assert main(_args(fmnist, "--grad-clip", "1", *flags, "--output", str(out))) == 2
    err = _one_error_line(capsys)
    assert "NaN/inf" in err and "running_var" in err and "Lower --lr" in err
    for name in ("last.pt", "model.safetensors"):
        if (out / name).exists():
            tensors = load_checkpoint(out / name)["model"] if name == "last.pt" else load_weights(out / name)[0]
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
            assert not bad, f"{name} holds non-finite {bad[:3]}"
    assert ("last good checkpoint" in err) == (out / "last.pt").exists()
    assert not (out / "metrics.csv").exists()  # no diverged epoch is recorded (nor kept as the best)


def test_a_nan_validation_loss_never_becomes_the_best(fmnist: Path, tmp_path: Path, monkeypatch) -> None:
    from openaff.training.tasks import CLASSIFY

    real = CLASSIFY.evaluate

    def nan_but_perfect(*args, **kwargs) -> dict:  # the worst case: a top-1 that beats every earlier epoch
        return {**real(*args, **kwargs), "val_loss": float("nan"), "val_top1": 100.0}

    monkeypatch.setattr(CLASSIFY, "evaluate", nan_but_perfect)  # the task's evaluation, as the engine calls it
    cfg = make_config(data_dir=str(fmnist), model_kwargs=dict(width_mult=0.125), limit_train=128, limit_val=64,
                      batch_size=32, epochs=1, lr=0.05, output=str(tmp_path / "run"), progress=False, workers=0,
                      threads=1)
    with pytest.raises(NonFiniteLossError, match="validation loss became NaN/inf at the end of epoch 0"):
        train(cfg)
    assert not (tmp_path / "run" / "model.safetensors").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    folder = read_only_folder(tmp_path)
    # The data folder does not exist either: the output is checked first, before any data is read.
    assert main(["train", "--data-dir", str(tmp_path / "no-data"), *TINY, "--output", str(folder)]) == 2
    err = _one_error_line(capsys)
    assert f"cannot write to the output folder {folder}" in err
    assert main(["train", "--data-dir", str(tmp_path / "no-data"), *TINY, "--output", str(folder / "sub")]) == 2
    assert f"{folder / 'sub'}" in _one_error_line(capsys)


def test_ctrl_c_prints_one_line_with_the_resume_command_that_works(fmnist: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--data", "fashion-mnist", "--data-dir", str(fmnist), *TINY, "--limit-train", "256",
            "--batch-size", "16", "--epochs", "2", "--checkpoint-every", "1", "--output", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "openaff", *args], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, run / "last.pt", 3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("openaff train: interrupted; continue from the last checkpoint (epoch ")
    cmd = shlex.split(err.split(" with: ", 1)[1])
    assert cmd == ["openaff", "train", "--resume", str(run)]
    stopped = load_checkpoint(run / "last.pt")
    assert main(cmd[1:]) == 0  # the console script's entry point, in this process
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # The interrupted epoch's lr_mean covers its updates before and after the resume (16 per epoch, 32 in all),
    # exactly what an unbroken run logs.
    assert stopped["step"] > 0, "the last checkpoint is not inside an epoch"
    assert [float(r["lr_mean"]) for r in rows] == pytest.approx([_cosine_mean(0.05, 32, range(0, 16)),
                                                                 _cosine_mean(0.05, 32, range(16, 32))], rel=1e-5)
