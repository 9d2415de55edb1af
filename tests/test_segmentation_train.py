"""Segmentation on the training engine: outputs, openaff eval and predict, exact resume after SIGKILL,
DDP on gloo (the confusion matrix all-reduced), VOC folders through loader workers, the study's long skip."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from _seg_utils import write_voc
from _train_utils import ONE_STEP_BOUND, ddp_vs_single, env, train_kill_resume, write_fashion_mnist

from openaff import load_pretrained
from openaff.cli import main
from openaff.segmentation.predict import predict
from openaff.training import make_config
from openaff.training.history import SEGMENT_COLUMNS
from openaff.training.train import train

TINY = ["--model", "aff_fpn_cifar_resnet8", "--model-kwargs", "width_mult=0.25", "--data", "fashion-mnist-scenes",
        "--img-size", "32", "--threads", "1", "--workers", "0", "--no-progress", "--amp", "none"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "seconds")}
            for r in csv.DictReader((path / "metrics.csv").open())]


def test_train_writes_segmentation_metrics_and_eval_predict_agree(fmnist: Path, tmp_path: Path, capsys) -> None:
    cfg = make_config(model="aff_fpn_cifar_resnet8", model_kwargs=dict(width_mult=0.25), data="fashion-mnist-scenes",
                      data_dir=str(fmnist), img_size=32, limit_train=64, limit_val=32, batch_size=16, epochs=2,
                      opt="adagrad", lr=0.05, sched="poly", decay_rate=0.9, output=str(tmp_path / "run"),
                      progress=False, threads=1, workers=0)
    assert cfg.task == "segment" and make_config().task == "classify"
    result = train(cfg)
    out = tmp_path / "run"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    # the standard columns, then the scores by item side (32 px canvas: sides 14-22 in 4 bins)
    assert list(rows[0]) == [*SEGMENT_COLUMNS, *(f"val_{k}_s{lo}_{hi}" for lo, hi in ((14, 16), (17, 18), (19, 20),
                                                                                      (21, 22))
                                                 for k in ("fg_iou", "item_acc", "scene_acc"))] and len(rows) == 2
    assert result.metric == "val_miou" and result.best_score == pytest.approx(max(float(r["val_miou"]) for r in rows),
                                                                        rel=1e-5)
    iou = list(csv.DictReader((out / "class_iou.csv").open()))
    assert list(iou[0]) == ["epoch", "background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                            "Shirt", "Sneaker", "Bag", "Ankle boot"]
    text = capsys.readouterr().out
    assert "mIoU" in text and "| background |" in text
    # The printed "load with" line, run as printed in a fresh interpreter, rebuilds the segmenter.
    line = next(ln for ln in text.splitlines() if ln.startswith("  load with: ")).split(": ", 1)[1]
    code = f"import timm, openaff\nmodel = {line}\nprint(type(model).__name__, model.num_classes, model.in_chans)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["FusionFPN", "11", "1"], run.stderr[-2000:]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the hub folder rebuilds the best model; openaff eval gets the best epoch's numbers again
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.num_classes == 11 and model.in_chans == 1
    best = rows[result.best_epoch]
    rc = main(["eval", "--weights", str(out), "--no-progress", "--threads", "1", "--limit", "32", "--json",
               str(tmp_path / "e.json")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["task"] == "segment" and res["images"] == 32 and res["top1"] is None
    assert res["miou"] == pytest.approx(float(best["val_miou"]), abs=1e-3)
    assert res["pixel_acc"] == pytest.approx(float(best["val_pixel_acc"]), abs=1e-3)
    cm = torch.tensor(res["confusion"])
    assert cm.shape == (11, 11) and cm.sum() == 32 * 32 * 32  # every pixel of the scenes is labelled
    pics = predict(out, tmp_path / "pics", n=6, threads=1)
    assert pics["images"] == 6 and len(list((tmp_path / "pics" / "overlays").glob("*.png"))) == 6
    assert Path(pics["grid"]).read_bytes()[:4] == b"\x89PNG" and 0 <= pics["miou"] <= 100
    assert pics["title"].startswith("aff_fpn_cifar_resnet8 (fusion aff): 6 images, mIoU ")


def test_sigkill_and_resume_is_bit_identical(fmnist: Path, tmp_path: Path) -> None:
    """Batched scale-crop-flip of scenes and masks, EMA, label smoothing: killed mid-run, resumed, same bits."""
    args = [*TINY, "--data-dir", str(fmnist), "--limit-train", "96", "--limit-val", "16", "--batch-size", "8",
            "--epochs", "2", "--deterministic", "--checkpoint-every", "1", "--aug", "scale-crop-flip",
            "--ema-decay", "0.9", "--label-smoothing", "0.1", "--lr", "0.05", "--warmup-epochs", "0.5"]
    a, b, _ = train_kill_resume(args, tmp_path, total=2 * 96 // 8, first=3, last=6)
    run = tmp_path / "killed"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), "resumed weights differ"
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert _rows(tmp_path / "full") == _rows(run)
    assert (tmp_path / "full" / "class_iou.csv").read_text() == (run / "class_iou.csv").read_text()




def test_ddp_two_processes_match_one(fmnist: Path, tmp_path: Path) -> None:
    """torchrun, 2 gloo processes with SyncBN == 1 process with the same global batch; validation summed exactly."""
    args = [*TINY, "--data-dir", str(fmnist), "--limit-train", "16", "--limit-val", "24", "--batch-size", "16",
            "--epochs", "1", "--aug", "none", "--sync-bn", "--lr", "0.02"]
    rel = ddp_vs_single(args, tmp_path, dict(model_name="aff_fpn_cifar_resnet8", num_classes=11,
                                                     in_chans=1, width_mult=0.25))
    assert rel < ONE_STEP_BOUND
    ra, rb = _rows(tmp_path / "single")[0], _rows(tmp_path / "ddp")[0]
    assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-4)
    assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-3)
    assert float(ra["val_miou"]) == pytest.approx(float(rb["val_miou"]), abs=0.2)
    # The 2-process run evaluates its own weights over both shards: the same as one process evaluating them.
    rc = main(["eval", "--weights", str(tmp_path / "ddp"), "--no-progress", "--threads", "1", "--batch-size", "8",
               "--limit", "24", "--json", str(tmp_path / "e.json")])
    res = json.loads((tmp_path / "e.json").read_text())
    ddp_best = _rows(tmp_path / "ddp")[0]
    assert rc == 0 and res["images"] == 24
    # (abs 0.05: other batch compositions may flip a near-tie pixel; half the images would be far off)
    assert res["miou"] == pytest.approx(float(ddp_best["val_miou"]), abs=0.05)
    assert res["pixel_acc"] == pytest.approx(float(ddp_best["val_pixel_acc"]), abs=0.05)


def test_ddp_loss_is_the_global_pixel_mean_when_processes_hold_different_labelled_pixels(tmp_path: Path) -> None:
    """VOC images of eight sizes padded with ignore (255) to the crop: the two processes' batches hold
    different numbers of labelled pixels, and the 2-process step must still be the one-process step
    (a per-process mean of the loss, averaged by DDP, weighs the pixels of the smaller images more)."""
    root = write_voc(tmp_path / "voc", n_train=16, n_val=2, size=(32, 32),
                     train_sizes=[(32, 32), (14, 10), (30, 24), (12, 18), (32, 20), (16, 16), (28, 31), (10, 12)])
    args = ["--model", "fpn_cifar_resnet8", "--model-kwargs", "width_mult=0.25", "--data", "voc", "--data-dir",
            str(root), "--img-size", "32", "--threads", "1", "--workers", "0", "--no-progress", "--amp", "none",
            "--batch-size", "16", "--epochs", "1", "--aug", "none", "--sync-bn", "--lr", "0.05"]
    rel = ddp_vs_single(args, tmp_path, dict(model_name="fpn_cifar_resnet8", num_classes=3, in_chans=3,
                                                     width_mult=0.25))
    assert rel < ONE_STEP_BOUND


def test_voc_folder_trains_through_loader_workers_and_evaluates_whole_images(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", n_train=8, n_val=3, val_sizes=[(40, 30), (35, 27), (22, 41)])
    cfg = make_config(model="fpn_cifar_resnet8", model_kwargs=dict(width_mult=0.25), data=str(root), img_size=24,
                      batch_size=4, epochs=2, lr=0.05, aug="scale-crop-flip", workers=2, output=str(tmp_path / "r"),
                      progress=False, threads=1)
    result = train(cfg)
    assert result.final["class_iou"] and len(result.final["class_iou"]) == 3
    meta = json.loads((tmp_path / "r" / "config.json").read_text())
    assert meta["pretrained_cfg"]["label_names"] == ["background", "thing1", "thing2"]
    assert meta["metadata"]["data"] == "voc" and meta["metadata"]["task"] == "segment"
    rc = main(["eval", "--weights", str(tmp_path / "r"), "--no-progress", "--threads", "1", "--json",
               str(tmp_path / "e.json")])
    res = json.loads((tmp_path / "e.json").read_text())
    # whole images of three sizes, padding never counted: 30*40 + 27*35 + 41*22 pixels minus the 255 borders
    assert rc == 0 and res["images"] == 3 and res["img_size"] == "any"
    from openaff.segmentation.data import VOCSegmentation

    val = VOCSegmentation(root, "val")
    labelled = sum(int((val[i][1] != 255).sum()) for i in range(3))
    assert sum(map(sum, res["confusion"])) == labelled
    assert res["miou"] == pytest.approx(float(result.history[result.best_epoch]["val_miou"]), abs=1e-3)


def test_study_long_skip_trains_fpn_cells_and_reports_miou(fmnist: Path, tmp_path: Path) -> None:

    from openaff.study import run_study

    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump(dict(model="fpn_cifar_resnet8", model_kwargs=dict(width_mult=0.25),
                                          data="fashion-mnist-scenes", img_size=32, epochs=1, batch_size=16, lr=0.05,
                                          workers=0)))
    res = run_study(tmp_path / "s", scenario="long-skip", fusions="add,aff", depths="1", seeds=1,
                    data=f"fashion-mnist-scenes:{fmnist}", recipe=str(recipe), limit_train=32, limit_val=16,
                    threads=1, progress=False)
    assert {r.status for r in res.runs} == {"finished"}
    for r in res.runs:
        cfg = yaml.safe_load((Path(r.folder) / "config.yaml").read_text())
        assert cfg["model"] == "fpn_cifar_resnet8" and cfg["model_kwargs"]["fusion"] == r.fusion
        rows = list(csv.DictReader((Path(r.folder) / "metrics.csv").open()))
        assert r.best == pytest.approx(max(float(x["val_miou"]) for x in rows))
        # The table's parameters are the trained model's: 11 mask classes (background + 10), not 10.
        trained = load_pretrained(f"local-dir:{r.folder}")[0]
        fresh = timm.create_model(cfg["model"], num_classes=trained.num_classes, in_chans=1, **cfg["model_kwargs"])
        assert trained.num_classes == 11 and r.params == sum(p.numel() for p in fresh.parameters() if p.requires_grad)
    table = res.table.read_text()
    assert "mIoU (%)" in table and "FPN-ResNet-8" in table
    assert "| add | 89.5 |" in table and "| aff | 92.4 |" in table  # the paper's long-skip column beside
