"""The model card (README.md) of every model folder convert and train write: timm's layout, the folder's facts."""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pytest
import timm
import torch
from _mxnet_fixtures import COMPACT
from _train_utils import write_fashion_mnist
from huggingface_hub import ModelCard
from torch.utils.flop_counter import FlopCounterMode

import openaff
from openaff.cli import main
from openaff.mxnet import load_params
from openaff.training import make_config
from openaff.training.train import train

IAFF14 = COMPACT / "iaff_cifar_resnet_b2_c1_k10_s2.params"


def _card(folder: Path) -> tuple[dict, str]:
    """The front matter (parsed by huggingface_hub, as the Hub does) and the markdown body."""
    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text


def _detail(body: str, key: str) -> str:
    """The value of one ``- **Key:** value`` or ``  - key: value`` line of Model Details."""
    m = re.search(rf"^\s*- (?:\*\*{re.escape(key)}:\*\*|{re.escape(key)}:) (.*)$", body, re.M)
    assert m, f"no {key!r} in the card"
    return m.group(1)


def _check_model_facts(folder: Path, body: str, name: str, input_size: tuple[int, int, int]) -> torch.nn.Module:
    """Parameters and GMACs as printed agree with the model the folder rebuilds, counted here on real tensors."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert body.startswith(f"# Model card for {name}\n")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"({params:,} trainable parameters)" in _detail(body, "Params (M)")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *input_size))
    gmacs = float(_detail(body, "GMACs").split()[0])
    assert gmacs == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-3)
    assert "1 x " + " x ".join(map(str, input_size)) in _detail(body, "GMACs")
    assert _detail(body, "Image size") == f"{input_size[1]} x {input_size[2]}"
    # The citation: the paper's BibTeX; the usage block runs as printed once REPO_ID names where the folder is.
    assert "title={Attentional Feature Fusion}" in body and "eprint={2009.14082}" in body and "WACV" in body
    usage = re.search(r"## Model Usage\n```python\n(.*?)```", body, re.S).group(1)
    scope: dict = {}
    exec(usage.replace("hf-hub:REPO_ID", f"local-dir:{folder}"), scope)  # noqa: S102  (the printed snippet)
    x = torch.rand(2, *input_size)
    with torch.no_grad():
        assert torch.equal(scope["model"](x), model(x))
    assert scope["cfg"]["input_size"] == input_size
    return model


def test_converted_folder_card(tmp_path: Path, capsys) -> None:
    out = tmp_path / "iaff14"
    assert main(["convert", str(IAFF14), "-o", str(out)]) == 0
    assert "README.md (model card)" in capsys.readouterr().out
    meta, body = _card(out)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "timm"} <= set(meta["tags"])
    assert meta["license"] == "unknown" and "datasets" not in meta  # a small-image file does not say its data
    assert "No licence for the released weights is stated" in _detail(body, "License")
    _check_model_facts(out, body, "iaff_cifar_resnet14", (3, 32, 32))
    assert _detail(body, "source sha256") == hashlib.sha256(IAFF14.read_bytes()).hexdigest()
    assert IAFF14.name in _detail(body, "source")
    assert _detail(body, "match").startswith(f"all {len(load_params(IAFF14))} arrays of the file mapped one to one")


def test_imagenet_conversion_card_names_imagenet(tmp_path: Path) -> None:
    # The released ImageNet models' card, on a one-block-per-stage twin (same family, 1000 classes).
    from openaff.model_card import write_conversion_card

    net = timm.create_model("aff_resnet50", layers=(1, 1, 1, 1)).eval()
    openaff.hub.save_pretrained(net, tmp_path, architecture="aff_resnet50", model_args=dict(layers=(1, 1, 1, 1)),
                                input_size=(3, 224, 224), mean=net.pretrained_cfg["mean"],
                                std=net.pretrained_cfg["std"])
    write_conversion_card(tmp_path, source="x.params", sha256="0" * 64, arrays=len(net.state_dict()),
                          family="resnet", num_classes=1000)
    meta, body = _card(tmp_path)
    assert meta["datasets"] == ["imagenet-1k"] and _detail(body, "Dataset").startswith("ImageNet-1k")
    _check_model_facts(tmp_path, body, "aff_resnet50", (3, 224, 224))


def test_trained_folder_card(tmp_path: Path) -> None:
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=128, n_test=64)
    out = tmp_path / "run"
    cfg = make_config(data_dir=str(data), model_kwargs=dict(width_mult=0.125), limit_train=128, limit_val=64,
                      batch_size=32, epochs=1, lr=0.05, output=str(out), progress=False, workers=0, threads=1)
    result = train(cfg)
    meta, body = _card(out)
    assert meta["datasets"] == ["fashion_mnist"] and meta["license"] == "unknown"
    assert meta["pipeline_tag"] == "image-classification"
    _check_model_facts(out, body, "aff_cifar_resnet8", (1, 28, 28))
    row = next(csv.DictReader((out / "metrics.csv").open()))
    assert _detail(body, "best validation top-1 (these weights)") == f"{float(row['val_top1']):.2f} % after epoch 1"
    assert _detail(body, "last epoch (1 of 1 planned)") == \
        f"top-1 {result.final['val_top1']:.2f} %, top-5 {result.final['val_top5']:.2f} %"
    assert _detail(body, "Dataset") == "fashion-mnist (128 train / 64 validation images)"
    assert "lr 0.05" in _detail(body, "optimizer") and _detail(body, "seed") == "0"


def test_segmenter_card_says_segmentation(tmp_path: Path) -> None:
    # A segmentation run's card takes the hub's task and the model type from its task (write_run_card passes them).
    from openaff.model_card import write_model_card
    from openaff.training.tasks import task_for_model

    net = timm.create_model("aff_fpn_cifar_resnet8", num_classes=3, width_mult=0.25).eval()
    openaff.hub.save_pretrained(net, tmp_path, architecture="aff_fpn_cifar_resnet8",
                                model_args=dict(num_classes=3, width_mult=0.25), input_size=(3, 32, 32),
                                mean=(0.5,) * 3, std=(0.25,) * 3, metadata={"task": "segment"})
    task = task_for_model("aff_fpn_cifar_resnet8")
    write_model_card(tmp_path, description="x", facts={}, pipeline_tag=task.pipeline_tag, model_type=task.model_type)
    meta, body = _card(tmp_path)
    assert meta["pipeline_tag"] == "image-segmentation" and "image-segmentation" in meta["tags"]
    assert _detail(body, "Model Type") == "Semantic segmentation"
