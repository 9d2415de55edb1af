"""openaff export: ONNX (onnxruntime), torch.export (.pt2) and TorchScript files that match eager PyTorch.

Exports are slow (the dynamo ONNX exporter takes 5-10 s for even the smallest model on a shared
2-core machine, the legacy exporter and torch.export 1-3 s), so the default run exports each family
once with ONNX (the legacy exporter, opset 17; folded and unfolded alternate so that each fusion type
is seen both ways), the dynamo exporter on one ImageNet family and, through the command line, on one
small-image family; pt2 on an ImageNet and a small-image family, TorchScript scripted on two
families and traced on two. ``-m slow`` runs the full sweep: every
family folded and unfolded with the dynamo exporter, pt2 and TorchScript.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from openaff import export as export_mod
from openaff.cli import main
from openaff.errors import ConfigError
from openaff.export import ExportError, export_model, real_images

# TorchScript is deprecated in torch >= 2.9 but still what `--format torchscript` is for.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

IMAGENET = dict(layers=(1, 1, 1, 1))
SMALL = dict(width_mult=0.25)
# family -> (model name, create_model kwargs, input size)
FAMILIES = {
    "aff_resnet": ("aff_resnet50", IMAGENET, (3, 64, 64)),
    "iaff_resnet": ("iaff_resnet50", IMAGENET, (3, 64, 64)),
    "aff_resnext": ("aff_resnext50_32x4d", IMAGENET, (3, 64, 64)),
    "iaff_resnext": ("iaff_resnext50_32x4d", IMAGENET, (3, 64, 64)),
    "aff_cifar_resnet": ("aff_cifar_resnet8", SMALL, (3, 32, 32)),
    "iaff_cifar_resnet": ("iaff_cifar_resnet8", SMALL, (3, 32, 32)),
    "aff_cifar_resnext": ("aff_cifar_resnext11_32x4d", SMALL, (3, 32, 32)),
    "iaff_cifar_resnext": ("iaff_cifar_resnext11_32x4d", SMALL, (3, 32, 32)),
}
# The default run's one legacy ONNX export per family: folded or not, so that AFF and iAFF, pre-act
# and post-act blocks, are each exported both ways.
LEGACY_FOLD = {"aff_resnet": True, "iaff_resnet": False, "aff_resnext": False, "iaff_resnext": True,
               "aff_cifar_resnet": True, "iaff_cifar_resnet": False, "aff_cifar_resnext": False,
               "iaff_cifar_resnext": True}
TOL = 1e-4


def _model(family: str) -> nn.Module:
    """The family's small model with trained-looking BatchNorms, in eval mode.

    Random affine parameters and running statistics measured on data: a fresh model's BNs are
    near-identities with zero-gamma last BNs, which would hide a wrong folding or a dropped branch.
    """
    name, kwargs, size = FAMILIES[family]
    model = timm.create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                if m.affine and m.weight.requires_grad:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
        model.train()
        model(torch.randn(6, *size))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.clamp_(min=0.1)
    model.eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": size}
    return model


def _ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_error(path: Path, model: nn.Module, size: tuple[int, int, int], batch: int = 4) -> float:
    """Our own onnxruntime run at a batch size export_model did not check, against eager PyTorch."""
    sess = _ort_session(path)
    x = torch.randn(batch, *size)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


def _assert_dynamic_batch(path: Path) -> None:
    import onnx

    proto = onnx.load(str(path))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        assert dim.dim_param and not dim.HasField("dim_value"), value


def _check(res, fmt: str, folded: bool) -> None:
    assert res.format == fmt
    assert set(res.errors) == {f"random batch {res.batch}", "random batch 1",
                               "real images (astronaut, chelsea, coffee)"}
    assert res.max_abs_error <= TOL, res.errors
    assert (res.folded_batchnorms > 0) == folded
    assert Path(res.path).is_file()
    assert not [p for p in Path(res.path).parent.iterdir() if p.name.startswith(".")], "temporary file left"


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_every_family_legacy_opset17(family: str, tmp_path: Path) -> None:
    # export_model's own onnxruntime check (two batch sizes, real images) is trusted here: the dynamo
    # and command-line tests compare it with an independent run.
    model = _model(family)
    res = export_model(model, tmp_path / "m.onnx", opset=17, fold_bn=LEGACY_FOLD[family])
    _check(res, "onnx", LEGACY_FOLD[family])
    assert (res.method, res.opset) == ("legacy", 17)
    _assert_dynamic_batch(tmp_path / "m.onnx")
    print(f"ONNX legacy {family} {'folded' if LEGACY_FOLD[family] else 'unfolded'}: {res.max_abs_error:.2g}, "
          f"export {res.export_s:.1f} s")


def test_onnx_dynamo_imagenet_folded(tmp_path: Path) -> None:
    model = _model("iaff_resnext")
    out = tmp_path / "m.onnx"
    res = export_model(model, out, fold_bn=True, batch=3)
    _check(res, "onnx", folded=True)
    assert res.method == "dynamo" and res.opset >= 18
    _assert_dynamic_batch(out)
    err = _ort_error(out, model, (3, 64, 64), batch=5)
    assert err <= TOL
    print(f"ONNX dynamo iaff_resnext folded: {res.max_abs_error:.2g} (own check {err:.2g}), "
          f"export {res.export_s:.1f} s")
    # Folding changed the exported graph, not the model passed in.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("folded", [False, True], ids=["unfolded", "folded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_dynamo_every_family(family: str, folded: bool, tmp_path: Path) -> None:
    model = _model(family)
    res = export_model(model, tmp_path / "m.onnx", fold_bn=folded)
    _check(res, "onnx", folded)
    _assert_dynamic_batch(tmp_path / "m.onnx")
    err = _ort_error(tmp_path / "m.onnx", model, FAMILIES[family][2])
    assert err <= TOL
    print(f"ONNX {family} {'folded' if folded else 'unfolded'}: {res.max_abs_error:.2g} (own check {err:.2g}), "
          f"export {res.export_s:.1f} s")


def _pt2(family: str, tmp_path: Path) -> None:
    model = _model(family)
    out = tmp_path / "m.pt2"
    res = export_model(model, out, format="pt2")
    _check(res, "pt2", folded=False)
    # One load (torch.export.load takes seconds): the program and the metadata we put next to it.
    extra = {"openaff.json": ""}
    loaded = torch.export.load(out, extra_files=extra)
    assert json.loads(extra["openaff.json"])["input_size"] == list(FAMILIES[family][2])
    x = torch.randn(5, *FAMILIES[family][2])
    with torch.no_grad():
        err = (loaded.module()(x) - model(x)).abs().max().item()
    assert err <= 1e-5
    print(f"pt2 {family}: {res.max_abs_error:.2g} (own check {err:.2g}), export {res.export_s:.1f} s")


def test_pt2_round_trip(tmp_path: Path) -> None:
    # test_cli_local_dir_model_pt2 does a small-image family.
    _pt2("aff_resnext", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pt2_round_trip_every_family(family: str, tmp_path: Path) -> None:
    _pt2(family, tmp_path)


def _torchscript(family: str, tmp_path: Path, method: str) -> None:
    model = _model(family)
    out = tmp_path / "m.pt"
    res = export_model(model, out, format="torchscript", fold_bn=True, torchscript_method=method)
    _check(res, "torchscript", folded=True)
    if method != "auto":
        assert res.method == method, res.fallback_reason
    loaded = torch.jit.load(str(out))
    x = torch.randn(4, *FAMILIES[family][2])
    with torch.no_grad():
        err = (loaded(x) - model(x)).abs().max().item()
    assert err <= TOL
    print(f"torchscript {family} ({res.method}): {res.max_abs_error:.2g} (own check {err:.2g}), "
          f"export {res.export_s:.1f} s" + (f"; script failed: {res.fallback_reason}" if res.fallback_reason else ""))


def test_torchscript_traced(tmp_path: Path) -> None:
    # test_parity_failure_is_an_error_and_writes_nothing traces a small-image family.
    _torchscript("iaff_resnet", tmp_path, "trace")


@pytest.mark.parametrize("family", ["aff_resnext", "iaff_cifar_resnet"])
def test_torchscript_scripted(family: str, tmp_path: Path) -> None:
    # torch.jit.script itself, no fallback: the models are scriptable (issue 11).
    _torchscript(family, tmp_path, "script")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_torchscript_every_family(family: str, tmp_path: Path) -> None:
    _torchscript(family, tmp_path, "auto")


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A grey 10-class AFF-ResNet in timm's hub folder layout, as `openaff train` writes it."""
    from openaff.hub import save_pretrained

    torch.manual_seed(1)
    model = timm.create_model("aff_cifar_resnet8", width_mult=0.25, in_chans=1, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.affine and m.weight.requires_grad:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    out = tmp_path_factory.mktemp("hub") / "fmnist"
    save_pretrained(model, out, architecture="aff_cifar_resnet8", model_args={"width_mult": 0.25},
                    input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,))
    return out, model


def test_cli_onnx_from_hub_folder(hub_dir, tmp_path: Path, capsys) -> None:
    folder, model = hub_dir
    out, js = tmp_path / "fmnist.onnx", tmp_path / "export.json"
    assert main(["export", "aff_cifar_resnet8", "--weights", str(folder), "--format", "onnx", "-o", str(out),
                 "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "max abs error" in printed and "input 1x28x28" in printed and "real images" in printed, printed
    doc = json.loads(js.read_text())
    assert doc["model"] == "aff_cifar_resnet8" and doc["model_kwargs"]["num_classes"] == 10
    assert doc["method"] == "dynamo" and doc["max_abs_error"] <= TOL
    _assert_dynamic_batch(out)
    assert _ort_error(out, model, (1, 28, 28), batch=4) <= TOL  # the folder's weights, not random ones
    import onnx

    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["openaff.mean"] == [pytest.approx(0.2860)] and props["openaff.input_size"] == [1, 28, 28]


def test_cli_local_dir_model_pt2(hub_dir, tmp_path: Path, capsys) -> None:
    folder, model = hub_dir
    out = tmp_path / "fmnist.pt2"
    assert main(["export", f"local-dir:{folder}", "--format", "pt2", "--fold-bn", "-o", str(out)]) == 0
    assert "BatchNorms folded" in capsys.readouterr().out
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert (torch.export.load(out).module()(x) - model(x)).abs().max().item() <= TOL


def test_cli_torchscript_from_safetensors_file(hub_dir, tmp_path: Path, capsys) -> None:
    # One of our safetensors files: the model and its arguments come from the header.
    folder, model = hub_dir
    out = tmp_path / "fmnist.pt"
    weights = folder / "model.safetensors"
    assert main(["export", "aff_cifar_resnet8", "--weights", str(weights), "--format", "torchscript",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"weights {weights}" in printed and "TorchScript (script)" in printed, printed
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert (torch.jit.load(str(out))(x) - model(x)).abs().max().item() <= TOL


def _fails(capsys, *args: str) -> str:
    assert main(["export", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("openaff export: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_one_line(hub_dir, tmp_path: Path, capsys) -> None:
    folder, _ = hub_dir
    out = str(tmp_path / "m.onnx")
    small = ["--model-kwargs", "width_mult=0.25"]
    assert "unknown model 'no_such_net'" in _fails(capsys, "no_such_net", "-o", out)
    assert "unknown format 'tflite'" in _fails(capsys, "aff_cifar_resnet8", "--format", "tflite", "-o", out)
    assert "does not exist" in _fails(capsys, "aff_cifar_resnet8", "-o", str(tmp_path / "nowhere" / "m.onnx"))
    assert "is a directory" in _fails(capsys, "aff_cifar_resnet8", "-o", str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in _fails(capsys, "aff_cifar_resnet8", "-o", str(blocker / "m.onnx"))
    # Weights for another model: a hub folder of aff_cifar_resnet8, a plain state dict, a bare folder.
    assert "holds aff_cifar_resnet8, not iaff_cifar_resnet8" in _fails(
        capsys, "iaff_cifar_resnet8", "--weights", str(folder), "-o", out)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file(timm.create_model("aff_cifar_resnet8", width_mult=0.25).state_dict(), str(plain))
    assert "do not fit iaff_cifar_resnet8" in _fails(capsys, "iaff_cifar_resnet8", "--weights", str(plain),
                                                      *small, "-o", out)
    assert "no config.json" in _fails(capsys, "aff_cifar_resnet8", "--weights", str(tmp_path), "-o", out)
    assert "weight source" in _fails(capsys, f"local-dir:{folder}", "--weights", str(folder), "-o", out)
    assert "expected KEY=VALUE" in _fails(capsys, "aff_cifar_resnet8", "--model-kwargs", "width_mult", "-o", out)
    assert "model_kwargs" in _fails(capsys, "aff_cifar_resnet8", "--model-kwargs", "no_such_arg=1", "-o", out)
    assert "--batch must be at least 2" in _fails(capsys, "aff_cifar_resnet8", *small, "--batch", "1", "-o", out)
    assert "opset 17 or newer" in _fails(capsys, "aff_cifar_resnet8", *small, "--opset", "16", "-o", out)
    assert "dynamo exporter writes opset 18" in _fails(capsys, "aff_cifar_resnet8", *small, "--opset", "17",
                                                       "--onnx-exporter", "dynamo", "-o", out)
    assert "does not run on a 2x32x32 input" in _fails(capsys, "aff_cifar_resnet8", *small, "--input-size", "2",
                                                       "32", "32", "-o", out)
    assert not Path(out).exists()


def test_missing_onnxruntime_one_line(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    err = _fails(capsys, "aff_cifar_resnet8", "-o", str(tmp_path / "m.onnx"))
    assert "needs onnxruntime" in err and "pip install open-aff[onnx]" in err


def test_parity_failure_is_an_error_and_writes_nothing(monkeypatch, capsys, tmp_path: Path) -> None:
    real_runner = export_mod._load_runner

    def off_by_a_little(fmt: str, path: Path):
        run = real_runner(fmt, path)
        return lambda x: run(x) + 1e-3

    monkeypatch.setattr(export_mod, "_load_runner", off_by_a_little)
    out = tmp_path / "m.pt"
    err = _fails(capsys, "aff_cifar_resnet8", "--model-kwargs", "width_mult=0.25", "--format", "torchscript",
                 "--torchscript-method", "trace", "-o", str(out))
    assert "differs from eager PyTorch by 0.001" in err and "--atol 0.0001" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_python_api_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown format"):
        export_model("aff_cifar_resnet8", tmp_path / "m", format="tflite")
    with pytest.raises(ConfigError, match="unknown torchscript method"):
        export_model("aff_cifar_resnet8", tmp_path / "m", format="torchscript", torchscript_method="freeze")
    with pytest.raises(ConfigError, match="only for --format onnx"):
        export_model("aff_cifar_resnet8", tmp_path / "m", format="pt2", opset=18)
    assert issubclass(ExportError, Exception)


def test_real_images() -> None:
    rgb = real_images((3, 40, 56), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert rgb.shape == (3, 3, 40, 56) and rgb.dtype == torch.float32 and torch.isfinite(rgb).all()
    # Three different photographs, each with spread, normalised with the given mean and std.
    assert rgb.std(dim=(1, 2, 3)).min() > 0.5
    assert (rgb[0] - rgb[1]).abs().mean() > 0.1 and (rgb[1] - rgb[2]).abs().mean() > 0.1
    raw = rgb * 0.2 + torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    assert raw.min() >= -1e-3 and raw.max() <= 1 + 1e-3
    grey = real_images((1, 28, 28), (0.5,), (0.25,))
    assert grey.shape == (3, 1, 28, 28)
    # An RGB mean for a grey input (timm keeps the 3-value ImageNet mean for in_chans=1) is reduced.
    assert real_images((1, 28, 28), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).allclose(grey)
    with pytest.raises(ConfigError, match="mean has 2 values"):
        real_images((3, 8, 8), (0.5, 0.5), (1.0,))
