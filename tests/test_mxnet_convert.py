"""The authors' MXNet weights in our models: exact outputs, complete name maps, clear errors."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open

from openaff.mxnet import load_params, save_ndarray_list
from openaff.mxnet.convert import ConversionError, check_fit, convert_params, infer_model

MXNET_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mxnet"
CIFAR = MXNET_FIXTURES / "cifar"
IMAGENET = MXNET_FIXTURES / "imagenet"
FIXTURES = sorted(p.name.removesuffix(".params") for p in CIFAR.glob("*.params"))
EXPECTED_NAMES = {
    "aff_cifar_resnet_b1": "aff_cifar_resnet8",
    "iaff_cifar_resnet_b1": "iaff_cifar_resnet8",
    "aff_cifar_resnext_b1": "aff_cifar_resnext11_32x4d",
    "iaff_cifar_resnext_b1": "iaff_cifar_resnext11_32x4d",
    "iaff_cifar_resnext_b1.fp16": "iaff_cifar_resnext11_32x4d",
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_every_fixture_is_covered():
    assert set(FIXTURES) == set(EXPECTED_NAMES)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_converted_model_reproduces_mxnet(fixture, tmp_path):
    out = tmp_path / "w.safetensors"
    net, spec = convert_params(CIFAR / f"{fixture}.params", out)
    assert spec.name == EXPECTED_NAMES[fixture]
    io = np.load(CIFAR / f"{fixture}.io.npz")
    x = torch.from_numpy(io["input"])
    with torch.no_grad():
        out32 = net(x).numpy()
        out64 = net.double()(x.double()).numpy()
    assert _rel(out64, io["output64"]) < 1e-9
    assert _rel(out32, io["output"]) < 1e-3
    # The written file loads through timm's own pretrained path and computes the same.
    loaded = timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)),
                               **spec.kwargs).eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), out32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys_file", sorted(p.name for p in IMAGENET.glob("*.keys.json")))
def test_imagenet_name_map_covers_the_model_exactly(keys_file):
    shapes = {n: tuple(s) for n, s in json.loads((IMAGENET / keys_file).read_text())}
    spec = infer_model({k: SimpleNamespace(shape=s) for k, s in shapes.items()})
    assert spec.name == keys_file.removesuffix(".keys.json")
    with torch.device("meta"):
        model = timm.create_model(spec.name, **spec.kwargs)
    names = check_fit(shapes, model, spec)
    assert len(set(names.values())) == len(names) == len(shapes)


def _deepen(shapes: dict, stage_prefix: str, blocks: int) -> dict:
    """The depth-101 key listing: stage 3's last block repeated up to ``blocks`` blocks (same rule)."""
    last = max(int(m[1]) for k in shapes if (m := re.match(re.escape(stage_prefix) + r"(\d+)\.", k)))
    block = f"{stage_prefix}{last}."
    template = {k[len(block):]: s for k, s in shapes.items() if k.startswith(block)}
    deeper = dict(shapes)
    for b in range(last + 1, blocks):
        deeper.update({f"{stage_prefix}{b}.{k}": s for k, s in template.items()})
    return deeper


@pytest.mark.parametrize("model50, stage3", [
    ("aff_resnet50", "layer3."), ("iaff_resnet50", "layer3."),
    ("aff_resnext50_32x4d", "features.12."), ("iaff_resnext50_32x4d", "features.12."),
])
def test_depth_101_name_map(model50, stage3):
    shapes = {n: tuple(s) for n, s in json.loads((IMAGENET / f"{model50}.keys.json").read_text())}
    deeper = _deepen(shapes, stage3, 23)
    spec = infer_model({k: SimpleNamespace(shape=s) for k, s in deeper.items()})
    assert spec.name == model50.replace("50", "101")
    with torch.device("meta"):
        model = timm.create_model(spec.name, **spec.kwargs)
    assert len(check_fit(deeper, model, spec)) == len(deeper)


@pytest.mark.parametrize("keys_file, name", [
    ("aff_cifar_resnet_b5.keys.json", "aff_cifar_resnet32"),
    ("aff_cifar_resnext_b4.keys.json", "aff_cifar_resnext38_32x4d"),
])
def test_released_cifar_name_map(keys_file, name):
    shapes = {n: tuple(s) for n, s in json.loads((CIFAR / keys_file).read_text())}
    spec = infer_model({k: SimpleNamespace(shape=s) for k, s in shapes.items()})
    assert spec.name == name
    with torch.device("meta"):
        model = timm.create_model(spec.name, **spec.kwargs)
    assert len(check_fit(shapes, model, spec)) == len(shapes)


def test_old_save_params_names_convert_the_same(tmp_path):
    arrays = load_params(CIFAR / "aff_cifar_resnet_b1.params")
    aux = ("running_mean", "running_var")
    scoped = {("aux:" if k.endswith(aux) else "arg:") + "affresnet0_" + k: v for k, v in arrays.items()}
    save_ndarray_list(tmp_path / "old.params", scoped, version=1)
    net_old, _ = convert_params(tmp_path / "old.params")
    net_new, _ = convert_params(CIFAR / "aff_cifar_resnet_b1.params")
    for (k, a), (_, b) in zip(net_old.state_dict().items(), net_new.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_wrong_shape_lists_the_offending_keys(tmp_path):
    arrays = load_params(CIFAR / "aff_cifar_resnet_b1.params")
    arrays["features.2.0.resfwd.2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    del arrays["features.3.0.attention.global_att.4.bias"]
    save_ndarray_list(tmp_path / "bad.params", arrays)
    with pytest.raises(ConversionError) as err:
        convert_params(tmp_path / "bad.params")
    msg = str(err.value)
    assert "features.2.0.resfwd.2.weight (64, 64, 1, 1) -> layer1.0.conv1.weight (64, 64, 3, 3)" in msg
    assert "layer2.0.fusion.mscam.global_att.4.bias" in msg


def test_wrong_model_is_refused():
    with pytest.raises(ConversionError, match="no place in the model"):
        convert_params(CIFAR / "aff_cifar_resnet_b1.params", model="iaff_cifar_resnet8")


def test_cli_convert(tmp_path):
    out = tmp_path / "m.safetensors"
    run = subprocess.run([sys.executable, "-m", "openaff", "convert", str(CIFAR / "iaff_cifar_resnet_b1.params"),
                          "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "iaff_cifar_resnet8 (inferred" in run.stdout
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model"] == "iaff_cifar_resnet8"
        assert "layer3.0.fusion.mscam2.global_att.4.weight" in f.keys()
    bad = tmp_path / "bad.params"
    bad.write_bytes((CIFAR / "iaff_cifar_resnet_b1.params").read_bytes()[:1000])
    run = subprocess.run([sys.executable, "-m", "openaff", "convert", str(bad), "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "openaff convert: error:" in run.stderr and "offset" in run.stderr and "Traceback" not in run.stderr
