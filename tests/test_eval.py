"""``openaff eval`` / ``evaluate()``: our safetensors, plain state dicts, timm-style checkpoints, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from _train_utils import TINY, write_fashion_mnist, write_image_folder

from openaff.cli import main
from openaff.training import CheckpointError, ConfigError, make_config
from openaff.training.checkpoint import load_weights
from openaff.training.evaluate import evaluate
from openaff.training.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained for one epoch on a fake Fashion-MNIST: (output folder, data folder)."""
    data = write_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=256, n_test=96)
    out = tmp_path_factory.mktemp("run")
    train(make_config(data_dir=str(data), model_kwargs=dict(width_mult=0.125), epochs=1, batch_size=32,
                      output=str(out), progress=False, lr=0.05, threads=1))
    return out, data


def _val_top1(out: Path) -> float:
    return float(list(csv.DictReader((out / "metrics.csv").open()))[-1]["val_top1"])


def test_eval_cli_on_training_output(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out, data = run
    rc = main(["eval", "--weights", str(out / "best.safetensors"), "--data-dir", str(data), "--json",
               str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 96 and res["model"] == "aff_cifar_resnet8"  # model and settings from the file
    assert res["top1"] == pytest.approx(_val_top1(out), abs=1e-3) and 0 <= res["top1"] <= res["top5"] <= 100
    assert "top-1" in printed and "top-5" in printed


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "state_dict_ema", "ddp_prefix", "last.pt"])
def test_eval_accepts_checkpoint_layouts(run: tuple[Path, Path], tmp_path: Path, layout: str) -> None:
    out, data = run
    sd, _ = load_weights(out / "best.safetensors")
    path = tmp_path / "w.pth"
    blob = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
            "state_dict_ema": {"state_dict_ema": sd}, "ddp_prefix": {f"module.{k}": v for k, v in sd.items()}}
    if layout == "last.pt":
        path = out / "last.pt"
    else:
        torch.save(blob[layout], path)
    res = evaluate(path, "aff_cifar_resnet8", data_dir=str(data), model_kwargs=dict(width_mult=0.125),
                   progress=False)
    assert res["top1"] == pytest.approx(_val_top1(out), abs=1e-3)


def test_eval_bad_input(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out, data = run

    def fails(*args: str) -> str:
        assert main(["eval", "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("openaff eval: error: ") and err.count("\n") == 1, err
        return err

    folder = write_image_folder(tmp_path / "three", classes=3, per_class=2, splits=("val",))
    err = fails("--weights", str(out / "best.safetensors"), "--data", str(folder / "val"))  # class folders only
    assert "classify 10 classes" in err and "has 3" in err
    assert "does not exist" in fails("--weights", str(tmp_path / "nope.safetensors"))
    sd, _ = load_weights(out / "best.safetensors")
    torch.save(sd, tmp_path / "plain.pt")
    assert "--model" in fails("--weights", str(tmp_path / "plain.pt"), "--data-dir", str(data))
    assert "do not fit" in fails("--weights", str(tmp_path / "plain.pt"), "--data-dir", str(data),
                                 "--model", "aff_cifar_resnet8", "--model-kwargs", "width_mult=0.25")
    # Only tensors and plain containers are loaded: a pickled object is refused, not executed.
    torch.save({"state_dict": sd, "extra": ConfigError("x")}, tmp_path / "unsafe.pt")
    assert "weights-only" in fails("--weights", str(tmp_path / "unsafe.pt"), "--data-dir", str(data),
                                   *TINY)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    assert "cannot read" in fails("--weights", str(tmp_path / "junk.safetensors"))
    with pytest.raises(CheckpointError):
        load_weights(tmp_path / "junk.safetensors")
