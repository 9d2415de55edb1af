"""timm's hub folder layout: save, rebuild with no other argument, load every kind of source, clear errors."""

import json
import os

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import openaff  # noqa: F401  (registers the models with timm)
from openaff import hub
from openaff.errors import CheckpointError, ConfigError
from openaff.files import save_weights

LABELS = [f"class{i}" for i in range(10)]
GREY = dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,))


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights and BatchNorm statistics, so that a wrongly loaded tensor changes the outputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=g) if name.endswith("running_var") else \
                    torch.randn(t.shape, generator=g) * 0.2
                t.copy_(noise + (0.5 if name.endswith("running_var") else 0.0))
    return model.eval()


def _small(name="aff_cifar_resnet8", **kwargs):
    kwargs = {"width_mult": 0.25, "in_chans": 1, "num_classes": 10, **kwargs}
    return _randomize(timm.create_model(name, **kwargs)), kwargs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An iAFF ResNet-8 at width x0.25, grey input, 10 classes, fusion in stages 2-3 only, saved."""
    model, kwargs = _small("iaff_cifar_resnet8", fusion_stages=(2, 3))
    directory = tmp_path_factory.mktemp("hub") / "model"
    out = hub.save_pretrained(model, directory, architecture="iaff_cifar_resnet8", model_args=kwargs,
                              label_names=LABELS, metadata=dict(source="unit test", val_top1=12.5), **GREY)
    return model, out


def _x(chans=1, size=28):
    return torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(2))


def test_local_dir_rebuilds_the_exact_model(saved):
    model, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    assert type(loaded) is type(model)
    assert loaded.num_classes == 10 and loaded.in_chans == 1
    assert loaded.conv1.out_channels == 16  # width x0.25 came back from model_args
    assert type(loaded.layer1[0].fusion).__name__ == "AddFusion" and type(loaded.layer2[0].fusion).__name__ == "IAFF"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # the classifier too: timm did not drop it
    with torch.no_grad():
        assert torch.equal(loaded(_x()), model(_x()))


def test_config_and_header_describe_the_model(saved):
    _, directory = saved
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["architecture"] == "iaff_cifar_resnet8" and cfg["num_classes"] == 10 and cfg["num_features"] == 64
    assert cfg["model_args"] == dict(width_mult=0.25, in_chans=1, num_classes=10, fusion_stages=[2, 3])
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [1, 28, 28] and pc["mean"] == [0.286] and pc["std"] == [0.353]
    assert pc["num_classes"] == 10 and pc["classifier"] == "fc" and pc["label_names"] == LABELS
    assert not {"url", "file", "hf_hub_id", "source"} & set(pc)
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True)
    data = timm.data.resolve_data_config(model=loaded)
    assert data["input_size"] == (1, 28, 28) and tuple(data["mean"]) == (0.286,) and tuple(data["std"]) == (0.353,)
    assert loaded.pretrained_cfg["label_names"] == LABELS
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        header = {k: json.loads(v) for k, v in f.metadata().items()}
    assert header["model"] == "iaff_cifar_resnet8" and header["model_kwargs"] == cfg["model_args"]
    assert (header["num_classes"], header["in_chans"], header["input_size"]) == (10, 1, [1, 28, 28])
    assert header["mean"] == [0.286] and header["std"] == [0.353] and header["source"] == "unit test"


def test_load_line_executes_to_the_same_model(saved):
    model, directory = saved
    line = hub.load_line(directory)
    assert line == f'timm.create_model("local-dir:{os.path.abspath(directory)}", pretrained=True)'
    scope = {"timm": timm}
    exec(f"net = {line}", scope)
    with torch.no_grad():
        assert torch.equal(scope["net"].eval()(_x()), model(_x()))


def test_load_line_quotes_odd_paths(tmp_path):
    odd = tmp_path / 'a "quoted" \\ dir'
    calls = []
    fake_timm = type("T", (), {"create_model": staticmethod(lambda *a, **k: calls.append((a, k)))})
    exec(hub.load_line(odd), {"timm": fake_timm})
    assert calls == [((f"local-dir:{odd}",), {"pretrained": True})]


def test_load_pretrained_from_each_source(saved, tmp_path):
    model, directory = saved
    with torch.no_grad():
        want = model(_x())
    plain_st, plain_pt = tmp_path / "plain.safetensors", tmp_path / "plain.pt"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain_st))
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, plain_pt)
    kwargs = dict(width_mult=0.25, in_chans=1, num_classes=10, fusion_stages=(2, 3))
    sources = [
        (f"local-dir:{directory}", {}),
        (directory, {}),
        (str(directory), {}),
        (directory / "model.safetensors", {}),  # our header names the model
        (plain_st, dict(model="iaff_cifar_resnet8", model_kwargs=kwargs)),
        (plain_pt, dict(model="iaff_cifar_resnet8", model_kwargs=kwargs)),
    ]
    for source, extra in sources:
        net, info = hub.load_pretrained(source, **extra)
        assert not net.training, source
        with torch.no_grad():
            assert torch.equal(net(_x()), want), source
        assert info["architecture"] == "iaff_cifar_resnet8"
        assert info["model_args"]["width_mult"] == 0.25 and info["model_args"]["num_classes"] == 10
        if not str(source).startswith(str(tmp_path / "plain")):
            assert info["input_size"] == (1, 28, 28) and info["mean"] == (0.286,) and info["std"] == (0.353,)
            assert info["label_names"] == LABELS
            assert info["metadata"]["source"] == "unit test"


def test_load_pretrained_reads_a_training_header(tmp_path):
    """best.safetensors of ``openaff train``: model kwargs without num_classes/in_chans, img_size not input_size."""
    model, _ = _small()
    path = tmp_path / "best.safetensors"
    save_weights(path, model.state_dict(), dict(model="aff_cifar_resnet8", model_kwargs=dict(width_mult=0.25),
                                                num_classes=10, in_chans=1, img_size=28, mean=[0.5], std=[0.25]))
    net, info = hub.load_pretrained(path)
    with torch.no_grad():
        assert torch.equal(net(_x()), model(_x()))
    assert info["input_size"] == (1, 28, 28) and info["mean"] == (0.5,)
    assert net.pretrained_cfg["num_classes"] == 10


def test_ema_weights_are_chosen_on_request(tmp_path):
    model, kwargs = _small()
    other, _ = _small()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    path = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "model_ema": other.state_dict()}, path)
    net, _ = hub.load_pretrained(path, model="aff_cifar_resnet8", model_kwargs=kwargs, use_ema=True)
    assert torch.equal(net.fc.weight, other.fc.weight)
    net, _ = hub.load_pretrained(path, model="aff_cifar_resnet8", model_kwargs=kwargs)
    assert torch.equal(net.fc.weight, model.fc.weight)


def test_imagenet_layout_keeps_the_evaluation_transform(tmp_path):
    model = _randomize(timm.create_model("aff_resnet50", block="basic", layers=(1, 1, 1, 1), num_classes=1000))
    out = hub.save_pretrained(model, tmp_path / "in", architecture="aff_resnet50",
                              model_args=dict(block="basic", layers=(1, 1, 1, 1)), input_size=(3, 224, 224),
                              mean=timm.data.IMAGENET_DEFAULT_MEAN, std=timm.data.IMAGENET_DEFAULT_STD,
                              crop_pct=0.875, interpolation="bicubic")
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data = timm.data.resolve_data_config(model=loaded)
    assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic" and data["input_size"] == (3, 224, 224)
    x = _x(3, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _write(path, data: str | bytes):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


BAD_SOURCES = {
    "missing": (lambda d: d / "nowhere", CheckpointError, "does not exist"),
    "folder without config": (lambda d: d, CheckpointError, "has no config.json"),
    "config not json": (lambda d: _write(d / "config.json", "{not json").parent, CheckpointError, "cannot read"),
    "unknown architecture": (
        lambda d: _write(d / "config.json", '{"architecture": "nosuch_net", "pretrained_cfg": {}}').parent,
        ConfigError, "unknown architecture 'nosuch_net'"),
    "no weights": (
        lambda d: _write(d / "config.json", '{"architecture": "aff_cifar_resnet8", "pretrained_cfg": {}}').parent,
        CheckpointError, "holds no weights"),
    "mxnet file": (lambda d: _write(d / "w.params", b"x"), CheckpointError, "not a weight file"),
    "broken safetensors": (lambda d: _write(d / "b.safetensors", b"\0" * 20), CheckpointError,
                           "cannot read safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_give_one_line(tmp_path, case):
    make, exc, expect = BAD_SOURCES[case]
    with pytest.raises(exc) as err:
        hub.load_pretrained(make(tmp_path))
    assert expect in _one_line(err)


def test_weights_for_another_model_name_the_mismatch(saved, tmp_path):
    _, directory = saved
    with pytest.raises(CheckpointError) as err:
        hub.load_pretrained(directory / "model.safetensors", model_kwargs=dict(fusion_stages=(1, 2, 3)))
    msg = _one_line(err)
    assert "do not fit iaff_cifar_resnet8" in msg and "layer1.0.fusion.mscam1" in msg
    with pytest.raises(CheckpointError) as err:
        hub.load_pretrained(directory, model_kwargs=dict(num_classes=5))
    assert "fc.weight (10, 64) vs (5, 64)" in _one_line(err)


def test_model_name_is_required_or_must_agree(saved, tmp_path):
    model, directory = saved
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain))
    with pytest.raises(ConfigError) as err:
        hub.load_pretrained(plain)
    assert "does not say which model" in _one_line(err)
    for source in (directory, directory / "model.safetensors"):
        with pytest.raises(ConfigError) as err:
            hub.load_pretrained(source, model="aff_cifar_resnet8")
        assert "holds iaff_cifar_resnet8, not aff_cifar_resnet8" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        hub.load_pretrained(plain, model="iaff_cifar_resnet8", model_kwargs=dict(nosuch=1))
    assert "nosuch" in _one_line(err)


def test_save_refuses_args_that_do_not_rebuild_the_model(tmp_path):
    model, kwargs = _small()
    cases = [
        (dict(model_args=dict(in_chans=1, num_classes=10)), "is not the model being saved"),  # width lost
        (dict(model_args={**kwargs, "num_classes": 5}), "num_classes=5 disagrees"),
        (dict(model_args=kwargs, architecture="nosuch_net"), "unknown architecture"),
        (dict(model_args=kwargs, input_size=(3, 28, 28)), "in_chans=1"),
        (dict(model_args=kwargs, label_names=["a", "b"]), "2 label names for a model with 10 classes"),
        (dict(model_args=kwargs, mean=(0.5, 0.5, 0.5)), "one value per input channel"),
        (dict(model_args={**kwargs, "act": torch.nn.ReLU}), "JSON-serialisable"),
    ]
    for change, expect in cases:
        args = dict(architecture="aff_cifar_resnet8", **GREY) | change
        with pytest.raises(ConfigError) as err:
            hub.save_pretrained(model, tmp_path / "x", **args)
        assert expect in _one_line(err), change
        assert not (tmp_path / "x" / "config.json").exists()


def test_save_into_an_unwritable_place_is_one_line(tmp_path):
    model, kwargs = _small()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as err:
        hub.save_pretrained(model, blocker / "sub", architecture="aff_cifar_resnet8", model_args=kwargs, **GREY)
    assert "cannot write" in _one_line(err)


def test_drop_rates_are_not_architecture(tmp_path):
    model, kwargs = _small(drop_path_rate=0.1, drop_rate=0.2)
    out = hub.save_pretrained(model, tmp_path / "d", architecture="aff_cifar_resnet8", model_args=kwargs, **GREY)
    args = json.loads((out / "config.json").read_text())["model_args"]
    assert "drop_path_rate" not in args and "drop_rate" not in args
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():  # not bitwise: with drop path the block computes shortcut + (fused - shortcut)
        torch.testing.assert_close(loaded(_x()), model(_x()), rtol=1e-5, atol=1e-6)


def test_one_resolver_for_names_and_every_kind_of_source(saved, tmp_path):
    model, directory = saved
    x = _x()
    older = tmp_path / "older_run"  # a training run folder of earlier versions: best.safetensors, no config.json
    older.mkdir()
    (older / "best.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    for source in (directory, f"local-dir:{directory}", directory / "model.safetensors", older):
        net, info = hub.resolve_model(str(source))
        assert info["source"] == str(source) and info["architecture"] == "iaff_cifar_resnet8"
        assert info["input_size"] == (1, 28, 28) and info["label_names"] == LABELS
        with torch.no_grad():
            assert torch.equal(net(x), model(x)), source
        same, _ = hub.resolve_model("iaff_cifar_resnet8", source)  # the name and its weights: the same model
        with torch.no_grad():
            assert torch.equal(same(x), model(x)), source
    src = hub.read_source(directory)
    assert src.weights == directory / "model.safetensors" and src.config["architecture"] == "iaff_cifar_resnet8"
    assert src.record()["model_kwargs"]["fusion_stages"] == [2, 3] and src.record()["input_size"] == [1, 28, 28]
    assert src.metadata["val_top1"] == 12.5  # config.json's metadata over the header's

    net, info = hub.resolve_model("aff_cifar_resnet8", model_kwargs=dict(width_mult=0.25))  # random weights
    assert info["source"] is None and info["model_args"] == dict(width_mult=0.25) and not net.training
    with pytest.raises(ConfigError) as err:
        hub.resolve_model(str(directory), directory)
    assert "is a weight source already" in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        hub.resolve_model(str(tmp_path / "no" / "run"))
    assert f"weight source {tmp_path / 'no' / 'run'} does not exist" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        hub.resolve_model("no_such_net")
    assert "unknown model 'no_such_net'" in _one_line(err)
    with pytest.raises(ConfigError) as err:
        hub.resolve_model("aff_cifar_resnet8", model_kwargs=dict(nosuch=1))
    assert "model aff_cifar_resnet8 with model_kwargs {'nosuch': 1}" in _one_line(err)
