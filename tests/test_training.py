"""Training end to end on the CPU: outputs, exact resume after SIGKILL, DDP on gloo, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import timm
import torch
from _train_utils import (
    ONE_STEP_BOUND,
    TINY,
    ddp_vs_single,
    openaff,
    train_kill_resume,
    write_fashion_mnist,
    write_image_folder,
)

from openaff.cli import main
from openaff.errors import NonFiniteLossError
from openaff.files import load_weights
from openaff.training import make_config
from openaff.training.checkpoint import load_checkpoint
from openaff.training.history import COLUMNS
from openaff.training.train import train


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=512, n_test=128)


def _common(data_dir: Path) -> list[str]:
    return ["--data", "fashion-mnist", "--data-dir", str(data_dir), *TINY, "--threads", "1", "--workers", "0",
            "--no-progress", "--amp", "none"]


def test_train_outputs_and_timm_loading(fmnist: Path, tmp_path: Path, capsys) -> None:
    cfg = make_config("fashion-mnist-cpu", data_dir=str(fmnist), model_kwargs=dict(width_mult=0.125), epochs=2,
                      batch_size=64, limit_train=256, output=str(tmp_path / "run"), progress=False, threads=1,
                      ema_decay=0.9)
    result = train(cfg)
    out = tmp_path / "run"
    for name in ("metrics.csv", "last.pt", "model.safetensors", "config.json", "curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert not (out / "best.safetensors").exists()  # one copy of the best weights: the hub layout's
    assert result.weights == out / "model.safetensors"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"] and set(COLUMNS) <= set(rows[0])
    assert float(rows[-1]["val_top1"]) == pytest.approx(result.final["val_top1"], abs=1e-3)
    assert float(rows[-1]["img_per_s"]) > 0 and "ema_val_top1" in rows[0]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert make_config(str(out / "config.yaml")).epochs == 2  # the resolved config is a recipe
    # The printed "load with" line, executed as printed, rebuilds the best model with nothing else given.
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  load with: "))
    scope: dict = {}
    exec(f"import timm, openaff\nmodel = {line.split(': ', 1)[1]}", scope)  # noqa: S102  (the line under test)
    loaded = scope["model"].eval()
    saved, meta = load_weights(out / "model.safetensors")
    assert meta["model"] == "aff_cifar_resnet8" and meta["num_classes"] == 10
    assert meta["data"] == "fashion-mnist" and meta["data_dir"] == str(fmnist.resolve())  # for openaff eval RUN
    best = timm.create_model("aff_cifar_resnet8", num_classes=10, in_chans=1, width_mult=0.125)
    best.load_state_dict(saved)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), best.eval()(x))
    assert loaded.pretrained_cfg["input_size"] == (1, 28, 28) and loaded.num_classes == 10
    if result.best_epoch == 1:  # with EMA on, the best weights are the EMA's
        ema = load_checkpoint(out / "last.pt")["ema"]
        assert all(torch.equal(v, ema[f"module.{k}"]) for k, v in saved.items())


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt")["model"]


def _metric_rows(run: Path) -> list[dict]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "seconds")} for r in rows]


def test_sigkill_and_resume_is_exact(fmnist: Path, tmp_path: Path) -> None:
    """Kill a run with SIGKILL mid-epoch, resume it, and get the weights of an uninterrupted run bit for bit.

    Random crop/flip, mixup (numpy RNG), drop-path (torch RNG) and EMA are all on, so the data
    order, the augmentation keys and every RNG state must be restored exactly.
    """
    args = [*_common(fmnist), "--model-kwargs", "width_mult=0.125", "drop_path_rate=0.1", "--limit-train", "256",
            "--batch-size", "16", "--epochs", "2", "--deterministic", "--checkpoint-every", "1", "--mixup", "0.2",
            "--label-smoothing", "0.1", "--ema-decay", "0.9", "--lr", "0.05", "--warmup-epochs", "0.5",
            "--limit-val", "64"]
    a, b, _ = train_kill_resume(args, tmp_path, total=2 * 256 // 16, first=4, last=12)
    run = tmp_path / "killed"
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resumed weights differ"
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert _metric_rows(tmp_path / "full") == _metric_rows(run)


def test_ddp_two_processes_match_one(fmnist: Path, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes and SyncBN == 1 process with the same global batch (no random augmentation),
    after one step, within float rounding (``ONE_STEP_BOUND``: why one step, in tests/_train_utils.py)."""
    args = [*_common(fmnist), "--limit-train", "32", "--batch-size", "32", "--epochs", "1", "--aug", "none",
            "--sync-bn", "--lr", "0.02", "--limit-val", "64"]
    rel = ddp_vs_single(args, tmp_path, dict(model_name="aff_cifar_resnet8", num_classes=10, in_chans=1,
                                             width_mult=0.125), output=False)
    assert rel < ONE_STEP_BOUND
    ra, rb = _metric_rows(tmp_path / "single")[0], _metric_rows(tmp_path / "ddp")[0]
    assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-4)
    assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-3)
    assert not list((tmp_path / "ddp").glob(".*.tmp"))  # no temporary checkpoint files left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fmnist: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nan"
    cfg = make_config(data_dir=str(fmnist), model_kwargs=dict(width_mult=0.125), limit_train=128, batch_size=32,
                      epochs=2, lr=1e38, output=str(out), checkpoint_every=1, progress=False, workers=0, threads=1)
    with pytest.raises(NonFiniteLossError, match="NaN/inf.*(last good checkpoint|no checkpoint)"):
        train(cfg)
    if (out / "last.pt").exists():
        assert all(torch.isfinite(v).all() for v in load_checkpoint(out / "last.pt")["model"].values())
    rc = main(["train", *_common(fmnist), "--limit-train", "128", "--batch-size", "32", "--lr", "1e38",
               "--output", str(tmp_path / "nan2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("openaff train: error: the ") and "NaN/inf" in err
    assert "Traceback" not in err


def test_bad_data_gives_one_line_errors(fmnist: Path, tmp_path: Path, capsys) -> None:
    def run(*args: str) -> str:
        try:
            rc = main(["train", *TINY, "--no-progress", "--workers", "0", "--output", str(tmp_path / "o"), *args])
        except SystemExit as exc:  # a flag value refused by argparse itself
            rc = exc.code
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("openaff train: error: ") and err.count("\n") == 1, err
        return err

    assert "does not exist" in run("--data", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "is empty" in run("--data", str(tmp_path / "empty"))
    assert "does not exist" in run("--data-dir", str(tmp_path / "missing"))
    err = run("--data-dir", str(fmnist), "--model", "nope")
    assert "model" in err and "'nope'" in err
    assert "fusion" in run("--data-dir", str(fmnist), "--model-kwargs", "fusion=bogus")
    assert "fewer than one batch" in run("--data-dir", str(fmnist), "--limit-train", "8")


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    """A real process, with loader workers: the error crosses the worker boundary and still reads as one line.

    The broken file is in val/, which is read whole (training drops the last partial batch).
    """
    root = write_image_folder(tmp_path / "imgs", classes=2, per_class=4, size=24)
    (root / "val" / "class_1" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    common = ["train", *TINY, "--data", str(root), "--img-size", "24", "--batch-size", "4", "--epochs", "1",
              "--workers", "2", "--no-progress", "--threads", "1"]
    res = openaff(*common, "--output", str(tmp_path / "out"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "openaff train: error: cannot read image" in res.stderr and "zz_broken.jpg" in res.stderr
    res = openaff(*common, "--skip-corrupt", "--output", str(tmp_path / "out2"))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "out2" / "metrics.csv").open()))
    assert rows[0]["skipped"] == "1" and "1 unreadable images skipped" in res.stderr + res.stdout


@pytest.mark.parametrize("cpu_alloc", ["retain", "system"])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(cpu_alloc: str, monkeypatch) -> None:
    import openaff.training.train as train_mod

    calls = []
    monkeypatch.setattr("openaff.cpu_memory.retain_freed_memory", lambda: calls.append(1) or True)
    dist = train_mod._setup_runtime(make_config(device="cpu", cpu_alloc=cpu_alloc))
    assert dist.device.type == "cpu"
    assert len(calls) == (cpu_alloc == "retain")
