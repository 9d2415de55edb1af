"""The authors' MXNet weights in our models: exact outputs, printed load lines that work, complete name maps,
clear errors. The compact fixtures (in the project) always run; the large ones need ../shared."""

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
from _mxnet_fixtures import CIFAR, COMPACT, COMPACT_FILES, IMAGENET, SHARED, SHARED_FILES, needs_shared
from safetensors import safe_open

import openaff
from openaff.cli import main
from openaff.errors import CheckpointError
from openaff.mxnet import load_params, save_ndarray_list
from openaff.mxnet.convert import ConversionError, check_fit, convert_params, infer_model, to_state_dict

AFF8 = COMPACT / "aff_cifar_resnet_b1_c1_k10.params"
IAFF14 = COMPACT / "iaff_cifar_resnet_b2_c1_k10_s2.params"
# The fixtures' random weights include the input BN's beta, which MXNet applies (AFF8's outputs move by 34 % without
# it): they convert to input_shift=True. The authors' own files hold 0 there and convert without it.
SHIFT = dict(input_shift=True)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_outputs(net: torch.nn.Module, io_file: Path) -> tuple[float, float]:
    """Relative L2 errors (float64 vs output64, float32 vs output); asserts the fixtures' tolerances."""
    io = np.load(io_file)
    x = torch.from_numpy(io["input"])
    net = net.eval()
    with torch.no_grad():
        out32 = net.float()(x).numpy()
        out64 = net.double()(x.double()).numpy()
    net.float()
    err64, err32 = _rel(out64, io["output64"]), _rel(out32, io["output"])
    assert err64 < 1e-9, err64
    assert err32 < 1e-3, err32
    return err64, err32


def _convert_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(rc: int, err: str) -> str:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openaff convert: error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Compact fixtures (always)


def test_compact_fixtures_are_in_the_project():
    for stem in COMPACT_FILES:
        for suffix in (".params", ".io.npz", ".keys.json"):
            assert (COMPACT / f"{stem}{suffix}").is_file(), stem + suffix


@pytest.mark.parametrize("stem", list(COMPACT_FILES))
def test_compact_conversion_infers_everything_and_matches_mxnet(stem):
    name, kwargs = COMPACT_FILES[stem]
    net, spec = convert_params(COMPACT / f"{stem}.params")
    assert (spec.name, spec.kwargs) == (name, {**kwargs, **SHIFT})
    assert net.num_classes == 10 and net.conv1.out_channels == 16
    _check_outputs(net, COMPACT / f"{stem}.io.npz")


def test_start_layer_2_adds_in_stage_1():
    net, _ = convert_params(IAFF14)
    kinds = [type(stage[0].fusion).__name__ for stage in (net.layer1, net.layer2, net.layer3)]
    assert kinds == ["AddFusion", "IAFF", "IAFF"]


def test_fusion_from_stage_3_only_is_inferred(tmp_path):
    arrays = {k: v for k, v in load_params(IAFF14).items() if not k.startswith("features.3.")
              or ".attention." not in k}
    save_ndarray_list(tmp_path / "s3.params", arrays)
    net, spec = convert_params(tmp_path / "s3.params")
    assert spec.kwargs["fusion_stages"] == (3,)
    assert type(net.layer2[1].fusion).__name__ == "AddFusion"


@pytest.mark.parametrize("stem", list(COMPACT_FILES))
@pytest.mark.parametrize("output", ["folder", "file"])
def test_every_printed_load_line_gives_the_mxnet_outputs(stem, output, tmp_path, capsys):
    out = tmp_path / ("converted" if output == "folder" else "converted.safetensors")
    rc, stdout, stderr = _convert_cli(capsys, COMPACT / f"{stem}.params", "-o", out)
    assert rc == 0, stderr
    lines = [line.split("load with: ", 1)[1] for line in stdout.splitlines() if line.startswith("load with: ")]
    assert len(lines) == (1 if output == "folder" else 2), stdout
    for line in lines:
        scope = {"timm": timm, "openaff": openaff}
        exec(f"net = {line}", scope)
        _check_outputs(scope["net"], COMPACT / f"{stem}.io.npz")
    if output == "folder":
        assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
        assert lines == [f'timm.create_model("local-dir:{out}", pretrained=True)']


def test_folder_records_the_model_for_timm(tmp_path, capsys):
    rc, _, stderr = _convert_cli(capsys, IAFF14, "-o", tmp_path / "m")
    assert rc == 0, stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architecture"] == "iaff_cifar_resnet14" and cfg["num_classes"] == 10
    assert cfg["model_args"] == dict(width_mult=0.25, num_classes=10, in_chans=3, r=4, fusion_stages=[2, 3], **SHIFT)
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["num_classes"] == 10
    assert cfg["metadata"]["source"] == IAFF14.name and len(cfg["metadata"]["source_sha256"]) == 64


def test_safetensors_header_records_the_model(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, stdout, stderr = _convert_cli(capsys, AFF8, "-o", out)
    assert rc == 0, stderr
    assert "model: aff_cifar_resnet8 (width_mult=0.25, num_classes=10, in_chans=3, r=4, input_shift=True), inferred" \
        in stdout
    with safe_open(str(out), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        assert "layer3.0.fusion.mscam.global_att.4.weight" in f.keys()
    assert meta["model"] == "aff_cifar_resnet8" and meta["num_classes"] == 10 and meta["in_chans"] == 3
    assert meta["model_kwargs"] == dict(width_mult=0.25, num_classes=10, in_chans=3, r=4, **SHIFT)
    net, info = openaff.hub.load_pretrained(out)
    assert info["input_size"] == (3, 32, 32)


def test_converting_again_into_the_same_folder_replaces_it(tmp_path, capsys):
    out = tmp_path / "m"
    assert _convert_cli(capsys, AFF8, "-o", out)[0] == 0
    rc, _, stderr = _convert_cli(capsys, IAFF14, "-o", out)
    assert rc == 0, stderr
    assert json.loads((out / "config.json").read_text())["architecture"] == "iaff_cifar_resnet14"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert_cli(capsys, AFF8, "-o", empty)[0] == 0


def test_old_save_params_names_convert_the_same(tmp_path):
    arrays = load_params(AFF8)
    aux = ("running_mean", "running_var")
    scoped = {("aux:" if k.endswith(aux) else "arg:") + "affresnet0_" + k: v for k, v in arrays.items()}
    save_ndarray_list(tmp_path / "old.params", scoped, version=1)
    net_old, _ = convert_params(tmp_path / "old.params")
    net_new, _ = convert_params(AFF8)
    for (k, a), (_, b) in zip(net_old.state_dict().items(), net_new.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# The input BN's fixed gamma and beta (the authors' BatchNorm(scale=False, center=False))

def _with_input_bn(tmp_path: Path, gamma: float | None = None, beta: float | None = None) -> Path:
    arrays = load_params(AFF8)
    for name, value in (("features.0.gamma", gamma), ("features.0.beta", beta)):
        if value is not None:
            arrays[name] = np.full_like(arrays[name], value)
    path = tmp_path / "input_bn.params"
    save_ndarray_list(path, arrays)
    return path


def test_a_zero_beta_converts_to_an_input_bn_without_parameters(tmp_path):
    path = _with_input_bn(tmp_path, beta=0.0)
    net, spec = convert_params(path)
    assert "input_shift" not in spec.kwargs and not net.input_norm.affine
    assert not any(n.startswith("input_norm.") for n, _ in net.named_parameters())
    # The same file in the input BN that keeps its (zero) shift and unit scale: the same outputs, bit for bit.
    shifted, _ = convert_params(path, input_shift=True)
    assert shifted.input_norm.affine and torch.equal(shifted.input_norm.weight, torch.ones(3))
    x = torch.from_numpy(np.load(COMPACT / "aff_cifar_resnet_b1_c1_k10.io.npz")["input"])
    with torch.no_grad():
        assert torch.equal(net(x), shifted(x))


def test_an_input_bn_gamma_other_than_1_is_refused(tmp_path, capsys):
    rc, _, err = _convert_cli(capsys, _with_input_bn(tmp_path, gamma=0.5), "-o", tmp_path / "m")
    line = _error_line(rc, err)
    assert "features.0.gamma" in line and "scale=False" in line and "[0.5, 0.5, 0.5]" in line, line
    assert not (tmp_path / "m").exists()


def test_a_beta_the_model_has_no_place_for_is_refused():
    arrays = load_params(AFF8)
    spec = infer_model(arrays)  # the shapes alone: no input_shift
    net = timm.create_model(spec.name, **spec.kwargs)
    with pytest.raises(ConversionError, match=r"features\.0\.beta.*input_shift=True"):
        to_state_dict(arrays, net, spec)


def test_wrong_shape_lists_the_offending_keys(tmp_path):
    arrays = load_params(AFF8)
    arrays["features.2.0.resfwd.2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
    del arrays["features.3.0.attention.global_att.4.bias"]
    save_ndarray_list(tmp_path / "bad.params", arrays)
    with pytest.raises(ConversionError) as err:
        convert_params(tmp_path / "bad.params")
    msg = str(err.value)
    assert "features.2.0.resfwd.2.weight (16, 16, 1, 1) -> layer1.0.conv1.weight (16, 16, 3, 3)" in msg
    assert "layer2.0.fusion.mscam.global_att.4.bias" in msg
    assert isinstance(err.value, CheckpointError)  # the commands' one-line error convention


# --model: a given name must hold exactly the file (issue 10, item 6)

@pytest.mark.parametrize("model, expect", [
    ("aff_cifar_resnet32", "the file holds aff_cifar_resnet8 (width_mult=0.25, num_classes=10, in_chans=3, r=4, "
                           "input_shift=True), not aff_cifar_resnet32: "),
    ("iaff_cifar_resnet8", "not iaff_cifar_resnet8: "),
    ("resnet18", "not resnet18: "),
    ("aff_resnet50", "not aff_resnet50: "),
    ("aff_cifar_resnext11_32x4d", "not aff_cifar_resnext11_32x4d: "),
    ("nosuch_net", "unknown model 'nosuch_net'"),
])
def test_given_model_that_does_not_hold_the_file_is_refused(model, expect, tmp_path, capsys):
    out = tmp_path / "m"
    rc, _, stderr = _convert_cli(capsys, AFF8, "--model", model, "-o", out)
    line = _error_line(rc, stderr)
    assert expect in line and "Traceback" not in stderr and len(line) < 500, line
    assert not out.exists()


def test_given_model_that_holds_the_file_is_used(tmp_path, capsys):
    rc, stdout, stderr = _convert_cli(capsys, IAFF14, "--model", "iaff_cifar_resnet14", "-o", tmp_path / "m")
    assert rc == 0, stderr
    assert "model: iaff_cifar_resnet14 (" in stdout and ", given" in stdout


# Bad sources and outputs: one line, exit 2, checked before the work

def test_source_problems_are_one_line(tmp_path, capsys):
    rc, _, err = _convert_cli(capsys, tmp_path, "-o", tmp_path / "m")
    assert "is a directory, not an MXNet .params file" in _error_line(rc, err)
    rc, _, err = _convert_cli(capsys, tmp_path / "missing.params", "-o", tmp_path / "m")
    assert "missing.params does not exist" in _error_line(rc, err)
    bad = tmp_path / "bad.params"
    bad.write_bytes(AFF8.read_bytes()[:1000])
    rc, _, err = _convert_cli(capsys, bad, "-o", tmp_path / "m")
    assert "offset" in _error_line(rc, err)


def test_output_problems_are_found_before_the_work(tmp_path, capsys):
    # The source is damaged: an output error reported instead shows that the output was checked first.
    bad = tmp_path / "bad.params"
    bad.write_bytes(AFF8.read_bytes()[:1000])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        busy: "is a directory that holds other files and no config.json",
        a_file: "exists and is not a directory",
        a_file / "sub": "is a file, not a directory",
        a_file / "w.safetensors": "is a file, not a directory",
        tmp_path / "model.pt": "writes a folder (a path without a weight-file suffix) or a .safetensors file",
    }
    for out, expect in cases.items():
        rc, _, err = _convert_cli(capsys, bad, "-o", out)
        assert expect in _error_line(rc, err), (out, err)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert a_file.read_text() == "x" and not (tmp_path / "model.pt").exists()


def test_failed_conversion_leaves_no_new_folders(tmp_path, capsys):
    bad = tmp_path / "bad.params"
    bad.write_bytes(AFF8.read_bytes()[:1000])
    rc, _, err = _convert_cli(capsys, bad, "-o", tmp_path / "new" / "deeper" / "m")
    assert "offset" in _error_line(rc, err)
    assert not (tmp_path / "new").exists()


def test_unwritable_folder_is_refused(capsys):
    # A real probe, not os.access: /proc refuses new entries even to root, who passes every permission check.
    rc, _, err = _convert_cli(capsys, AFF8, "-o", "/proc/openaff-convert-test/m")
    assert "cannot write in /proc/openaff-convert-test/m" in _error_line(rc, err)


def test_command_exits_2_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "openaff", "convert", str(AFF8), "--model", "aff_cifar_resnet32",
                          "-o", str(tmp_path / "m")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith("openaff convert: error: the file holds aff_cifar_resnet8")
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------
# Large fixtures in ../shared (skipped with one line where that folder is absent)


@needs_shared
def test_every_shared_fixture_is_covered():
    assert {p.name.removesuffix(".params") for p in CIFAR.glob("*.params")} == set(SHARED_FILES)


@needs_shared
@pytest.mark.parametrize("stem", list(SHARED_FILES))
def test_converted_model_reproduces_mxnet(stem, tmp_path):
    out = tmp_path / "w.safetensors"
    net, spec = convert_params(CIFAR / f"{stem}.params", out)
    assert spec.name == SHARED_FILES[stem]
    _check_outputs(net, CIFAR / f"{stem}.io.npz")
    loaded, _ = openaff.hub.load_pretrained(out)
    x = torch.from_numpy(np.load(CIFAR / f"{stem}.io.npz")["input"])
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {n: tuple(s) for n, s in json.loads(path.read_text())}


def _fits(shapes: dict) -> tuple[object, dict]:
    spec = infer_model({k: SimpleNamespace(shape=s) for k, s in shapes.items()})
    with torch.device("meta"):
        model = timm.create_model(spec.name, **spec.kwargs)
    names = check_fit(shapes, model, spec)
    assert len(set(names.values())) == len(names)
    # Every name lands in the model but the fixed gamma and beta of the pre-activation ResNet's input BN (dropped).
    assert set(shapes) - set(names) == ({"features.0.gamma", "features.0.beta"} if spec.family == "cifar_resnet"
                                        else set())
    return spec, names


@needs_shared
@pytest.mark.parametrize("keys_file", ["aff_resnet50", "iaff_resnet50", "aff_resnext50_32x4d",
                                       "iaff_resnext50_32x4d"])
def test_imagenet_name_map_covers_the_model_exactly(keys_file):
    spec, _ = _fits(_shapes(IMAGENET / f"{keys_file}.keys.json"))
    assert spec.name == keys_file and "fusion_stages" not in spec.kwargs  # the registered stages 3-4


def _deepen(shapes: dict, stage_prefix: str, blocks: int) -> dict:
    """The depth-101 key listing: stage 3's last block repeated up to ``blocks`` blocks (same rule)."""
    last = max(int(m[1]) for k in shapes if (m := re.match(re.escape(stage_prefix) + r"(\d+)\.", k)))
    block = f"{stage_prefix}{last}."
    template = {k[len(block):]: s for k, s in shapes.items() if k.startswith(block)}
    deeper = dict(shapes)
    for b in range(last + 1, blocks):
        deeper.update({f"{stage_prefix}{b}.{k}": s for k, s in template.items()})
    return deeper


STAGE3 = {"aff_resnet50": "layer3.", "iaff_resnet50": "layer3.", "aff_resnext50_32x4d": "features.12.",
          "iaff_resnext50_32x4d": "features.12."}


@needs_shared
@pytest.mark.parametrize("model50", list(STAGE3))
def test_depth_101_name_map(model50):
    spec, _ = _fits(_deepen(_shapes(IMAGENET / f"{model50}.keys.json"), STAGE3[model50], 23))
    assert spec.name == model50.replace("50", "101")


@needs_shared
@pytest.mark.parametrize("model50", list(STAGE3))
def test_imagenet_fusion_from_stage_4_is_inferred(model50):
    shapes = {k: s for k, s in _shapes(IMAGENET / f"{model50}.keys.json").items()
              if not (k.startswith(STAGE3[model50]) and ".attention." in k)}
    spec, _ = _fits(shapes)
    assert spec.name == model50 and spec.kwargs["fusion_stages"] == (4,)


@needs_shared
@pytest.mark.parametrize("keys_file, name", [
    ("aff_cifar_resnet_b5.keys.json", "aff_cifar_resnet32"),
    ("aff_cifar_resnext_b4.keys.json", "aff_cifar_resnext38_32x4d"),
])
def test_released_cifar_name_map(keys_file, name):
    spec, _ = _fits(_shapes(CIFAR / keys_file))
    assert spec.name == name and spec.kwargs == dict(num_classes=100, in_chans=3, r=4 if "resnet_" in keys_file
                                                     else 16)


@needs_shared
@pytest.mark.parametrize("keys_file, stage1", [
    ("aff_cifar_resnext_b4.keys.json", "features.3."), ("aff_cifar_resnet_b5.keys.json", "features.2."),
])
def test_cifar_fusion_from_stage_2_is_inferred(keys_file, stage1):
    shapes = {k: s for k, s in _shapes(CIFAR / keys_file).items() if not (k.startswith(stage1) and ".attention." in k)}
    spec, _ = _fits(shapes)
    assert spec.kwargs["fusion_stages"] == (2, 3)


def test_shared_folder_is_resolved_from_the_project_root():
    assert SHARED == Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mxnet"
