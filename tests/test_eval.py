"""``openaff eval`` / ``evaluate()``: our safetensors, plain state dicts, timm-style checkpoints, bad input."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
from _cifar_utils import official_cifar10
from _mxnet_fixtures import COMPACT
from _train_utils import TINY, write_fashion_mnist, write_image_folder

from openaff.cli import main
from openaff.data.datasets import load_cifar, load_fashion_mnist
from openaff.files import load_weights, save_weights
from openaff.training import CheckpointError, ConfigError, make_config
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


def _weights(out: Path) -> Path:
    """The weight file of a training run folder (timm's hub layout, or best.safetensors of earlier versions)."""
    return next(p for p in (out / "model.safetensors", out / "best.safetensors") if p.is_file())


def _val_top1(out: Path) -> float:
    return float(list(csv.DictReader((out / "metrics.csv").open()))[-1]["val_top1"])


def test_eval_cli_on_training_output(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out, data = run
    rc = main(["eval", "--weights", str(_weights(out)), "--data-dir", str(data), "--json",
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
    sd, _ = load_weights(_weights(out))
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
    err = fails("--weights", str(_weights(out)), "--data", str(folder / "val"))  # class folders only
    assert "take 1-channel images" in err and "has 3-channel images" in err
    assert "does not exist" in fails("--weights", str(tmp_path / "nope.safetensors"))
    sd, _ = load_weights(_weights(out))
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


# --- issue 10 ---------------------------------------------------------------------------------------------

FIXTURE = COMPACT / "aff_cifar_resnet_b1_c1_k10.params"  # in the project: a clean clone has no ../shared


def _direct(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std) -> tuple[float, float]:
    """(top-1 %, mean cross-entropy) of ``net`` on uint8 ``images`` normalised with ``mean``/``std``."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = net.eval()((images.float() / 255 - m) / s)
    top1 = (logits.argmax(1) == labels).float().mean().item() * 100
    return top1, torch.nn.functional.cross_entropy(logits, labels).item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, Path]:
    """The authors' 10-class CIFAR AFF-ResNet fixture converted to safetensors, and a tiny official CIFAR-10."""
    from openaff.mxnet import convert_params

    out = tmp_path_factory.mktemp("converted")
    net, _ = convert_params(FIXTURE, out / "converted.safetensors")
    return out / "converted.safetensors", net, official_cifar10(out / "cifar", n_test=24, n_train=1)


def _fails(capsys, *args: str) -> str:
    assert main(["eval", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openaff eval: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "weights_only=False" not in err
    return err


def test_eval_converted_mxnet_file(converted, tmp_path: Path, capsys) -> None:
    weights, net, data = converted
    images = torch.from_numpy(pickle.loads((data / "cifar-10-batches-py/test_batch").read_bytes(),  # noqa: S301
                                           encoding="bytes")[b"data"].reshape(-1, 3, 32, 32))
    labels = load_cifar(data, "cifar10", "test").labels
    results = []
    for extra in ([], ["--model-kwargs", "in_chans=3"], ["--model-kwargs", "num_classes=10"]):
        rc = main(["eval", "--weights", str(weights), "--data", "cifar10", "--data-dir", str(data), "--no-progress",
                   "--json", str(tmp_path / "r.json"), *extra])
        assert rc == 0, capsys.readouterr().err
        results.append(json.loads((tmp_path / "r.json").read_text()))
    res = results[0]
    assert res["model"] == "aff_cifar_resnet8" and res["images"] == 24 and res["img_size"] == 32
    top1, loss = _direct(net, images, labels, res["mean"], res["std"])
    assert res["top1"] == pytest.approx(top1, abs=1e-3) and res["loss"] == pytest.approx(loss, rel=1e-4)
    assert all(r["top1"] == res["top1"] and r["loss"] == res["loss"] for r in results)
    assert "evaluating aff_cifar_resnet8" in capsys.readouterr().out
    # The Python API, with in_chans repeated.
    again = evaluate(weights, data="cifar10", data_dir=str(data), model_kwargs=dict(in_chans=3), progress=False)
    assert again["top1"] == res["top1"]
    # Contradictions are one line each.
    assert "num_classes" in _fails(capsys, "--weights", str(weights), "--data-dir", str(data),
                                   "--model-kwargs", "num_classes=5")
    assert "in_chans" in _fails(capsys, "--weights", str(weights), "--data-dir", str(data),
                                "--model-kwargs", "in_chans=1")
    fm = write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=8)
    assert "3-channel" in _fails(capsys, "--weights", str(weights), "--data-dir", str(fm))
    folder = write_image_folder(tmp_path / "three", classes=3, per_class=1, splits=("val",))
    err = _fails(capsys, "--weights", str(weights), "--data", str(folder))
    assert "classify 10 classes" in err and "has 3" in err


def _save_trained_like(path: Path, *, in_chans: int, num_classes: int, img_size: int, mean, std, data: str,
                       **extra) -> torch.nn.Module:
    """Weights with the metadata ``openaff train`` records, without the minutes of training."""
    torch.manual_seed(1)
    net = timm.create_model("aff_cifar_resnet8", width_mult=0.125, in_chans=in_chans, num_classes=num_classes)
    with torch.no_grad():  # a classifier that is not all zeros, so that the normalisation shows in the loss
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_weights(path, net.state_dict(), dict(model="aff_cifar_resnet8", model_kwargs=dict(width_mult=0.125),
                                              num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                                              mean=list(mean), std=list(std), data=data, **extra))
    return net.eval()


def test_eval_uses_the_recorded_normalisation_and_data(tmp_path: Path, capsys) -> None:
    fm = write_fashion_mnist(tmp_path / "fm", n_train=8, n_test=40)
    net = _save_trained_like(tmp_path / "w.safetensors", in_chans=1, num_classes=10, img_size=28, mean=(0.5,),
                             std=(0.25,), data="fashion-mnist")
    assert main(["eval", "--weights", str(tmp_path / "w.safetensors"), "--data-dir", str(fm), "--no-progress",
                 "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    val = load_fashion_mnist(fm, "test")
    top1, loss = _direct(net, val.images, val.labels, (0.5,), (0.25,))
    _, loss_data_stats = _direct(net, val.images, val.labels, (0.2860,), (0.3530,))
    assert abs(loss - loss_data_stats) > 1e-3  # the test can tell the two normalisations apart
    assert res["loss"] == pytest.approx(loss, rel=1e-4) and res["top1"] == pytest.approx(top1, abs=1e-3)
    assert (res["data"], res["mean"], res["std"]) == ("fashion-mnist", [0.5], [0.25])
    out = capsys.readouterr().out
    assert "mean (0.5), std (0.25) (from the weights)" in out, out


def test_eval_uses_the_recorded_input_size(tmp_path: Path, capsys) -> None:
    # A CIFAR-10 model (trained at 32 px) evaluated on a folder of 40 px images of 10 classes.
    folder = write_image_folder(tmp_path / "imgs", classes=10, per_class=1, splits=("val",)) / "val"
    weights = tmp_path / "w.safetensors"
    _save_trained_like(weights, in_chans=3, num_classes=10, img_size=32, mean=(0.49, 0.48, 0.45),
                       std=(0.25, 0.24, 0.26), data="cifar10")
    rc = main(["eval", "--weights", str(weights), "--data", str(folder), "--no-progress", "--json",
               str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["img_size"] == 32 and "32x32 px (from the weights)" in captured.out, captured.out
    # The data set differs from the recorded one: said in one line, not refused.
    assert captured.err.count("\n") == 1 and "note: the weights were trained on cifar10" in captured.err
    same = evaluate(weights, data=str(folder), img_size=32, progress=False, log=lambda line: None)
    assert same["loss"] == res["loss"]
    lines: list[str] = []
    bigger = evaluate(weights, data=str(folder), img_size=64, progress=False, log=lines.append)
    assert bigger["img_size"] == 64 and bigger["loss"] != res["loss"]
    assert "note: evaluating at 64 px as asked; the weights were trained at 32 px" in lines
    assert "64x64 px (given)" in lines[0]
    # The recorded 32 px on the in-memory data set of another size cannot be applied: said, not hidden.
    with pytest.warns(UserWarning, match="trained at 32 px; fashion-mnist images are 28 px"):
        _save_trained_like(tmp_path / "g.safetensors", in_chans=1, num_classes=10, img_size=32, mean=(0.5,),
                           std=(0.25,), data="fashion-mnist")
        evaluate(tmp_path / "g.safetensors", data_dir=str(write_fashion_mnist(tmp_path / "fm", 8, 8)),
                 progress=False)


def test_eval_accepts_folders_as_weights(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from openaff import hub

    out, data = run
    direct = evaluate(_weights(out), data_dir=str(data), progress=False)
    assert evaluate(out, data_dir=str(data), progress=False)["top1"] == direct["top1"]  # the run's folder
    sd, meta = load_weights(_weights(out))
    net = timm.create_model(meta["model"], **{**meta["model_kwargs"], "num_classes": 10, "in_chans": 1})
    net.load_state_dict(sd)
    folder = hub.save_pretrained(net, tmp_path / "hub", architecture=meta["model"], model_args=meta["model_kwargs"],
                                 input_size=(1, 28, 28), mean=meta["mean"], std=meta["std"],
                                 metadata=dict(data="fashion-mnist"))
    for source in (folder, f"local-dir:{folder}"):
        res = evaluate(source, data_dir=str(data), progress=False)
        assert (res["top1"], res["loss"]) == (direct["top1"], direct["loss"]) and res["data"] == "fashion-mnist"
    older = tmp_path / "older_run"  # the run folder of earlier versions: best.safetensors, no config.json
    older.mkdir()
    (older / "best.safetensors").write_bytes(_weights(out).read_bytes())
    assert evaluate(older, data_dir=str(data), progress=False)["top1"] == direct["top1"]
    (tmp_path / "empty").mkdir()
    assert "is a directory" in _fails(capsys, "--weights", str(tmp_path / "empty"), "--data-dir", str(data))


def test_eval_misleading_messages(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out, data = run
    err = _fails(capsys, "--weights", str(FIXTURE))
    assert "MXNet file" in err and "openaff convert" in err
    last = tmp_path / "last.pt"
    last.write_bytes(b"")
    assert "is empty" in _fails(capsys, "--weights", str(last), *TINY)
    last.write_bytes(bytes(range(256)) * 16)
    assert "not a PyTorch checkpoint" in _fails(capsys, "--weights", str(last), *TINY)


def test_eval_json_path_is_checked_before_any_work(run: tuple[Path, Path], tmp_path: Path, capsys,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import openaff.training.evaluate as ev

    out, data = run

    def no_work(*args, **kwargs):
        raise AssertionError("evaluated before the --json path was checked")

    monkeypatch.setattr(ev, "evaluate", no_work)
    base = ["--weights", str(_weights(out)), "--data-dir", str(data), "--json"]
    assert "is a directory" in _fails(capsys, *base, str(tmp_path))
    assert "does not exist" in _fails(capsys, *base, str(tmp_path / "no" / "r.json"))


def test_eval_limit_must_be_positive(run: tuple[Path, Path], capsys) -> None:
    out, data = run
    for bad in (-5, 0):
        with pytest.raises(ConfigError, match=f"limit must be a positive number of images, got {bad}"):
            evaluate(_weights(out), data_dir=str(data), limit=bad, progress=False)
    assert "limit" in _fails(capsys, "--weights", str(_weights(out)), "--data-dir", str(data),
                             "--limit", "-3")
    assert evaluate(_weights(out), data_dir=str(data), limit=10, progress=False)["images"] == 10
