"""The registered models: exact sizes, timm API, batch-of-one training, layouts and bad input."""

import pytest
import timm
import torch
from _layer_utils import check_timm_head

from openaff.catalog import list_openaff_models, model_info

ALL = list_openaff_models()
IMAGENET = [n for n in ALL if "cifar" not in n]
SMALL = [n for n in ALL if "cifar" in n]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _tiny_input(name: str, batch: int = 2) -> torch.Tensor:
    # The smallest inputs that keep every stage's map larger than 1x1 (16x16 -> 4x4, 64x64 -> 2x2).
    size = 16 if "cifar" in name else 64
    return torch.randn(batch, 3, size, size)


def test_registry_has_the_papers_models():
    for name in ["aff_resnet50", "iaff_resnet50", "aff_resnext50_32x4d", "iaff_resnext50_32x4d", "aff_resnet101",
                 "iaff_resnet101", "aff_resnext101_32x4d", "iaff_resnext101_32x4d", "aff_cifar_resnet32",
                 "iaff_cifar_resnext38_32x4d", "cifar_resnet20"]:
        assert name in ALL


@pytest.mark.parametrize("name, expected", [
    ("aff_resnet50", 30_373_192),
    ("iaff_resnet50", 35_170_120),
    ("aff_resnext50_32x4d", 29_953_704),
    ("iaff_resnext50_32x4d", 34_750_632),
    ("aff_cifar_resnet32", 7_897_156),
    ("aff_cifar_resnext38_32x4d", 7_770_148),
])
def test_exact_parameter_counts(name, expected):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert _trainable(model) == expected


def test_imagenet_backbone_is_resnet50d():
    # Without fusion the ImageNet family is exactly timm's resnet50d (AFF.md: 25,576,264).
    with torch.device("meta"):
        plain = timm.create_model("aff_resnet50", fusion="add")
        ref = timm.create_model("resnet50d")
    assert _trainable(plain) == _trainable(ref) == 25_576_264


def test_fusion_only_in_stages_3_and_4():
    with torch.device("meta"):
        model = timm.create_model("aff_resnet50")
    kinds = {name: type(m.fusion).__name__ for name, m in model.named_modules() if hasattr(m, "fusion")}
    assert {k for k, v in kinds.items() if v == "AFF"} == {k for k in kinds if k.startswith(("layer3", "layer4"))}
    assert all(v == "AddFusion" for k, v in kinds.items() if k.startswith(("layer1", "layer2")))
    assert model.layer3[0].fusion.mscam.local_att[0].out_channels == 1024 // 16


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_shapes(name):
    model = timm.create_model(name, num_classes=7)
    x = _tiny_input(name).requires_grad_()
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ALL)
def test_batch_of_one_training(name):
    # Batch of one: the global branch normalises a 1x1 map holding one value per channel.
    model = timm.create_model(name).train()
    x = _tiny_input(name, batch=1).requires_grad_()
    model(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("name", ["aff_resnet50", "iaff_resnext50_32x4d"])
def test_batch_of_one_trains(name):
    """One image in training mode: the MS-CAMs' pooled branch sees one value per channel, which a plain
    BatchNorm refuses; the context BatchNorm trains on it, and every parameter gets a finite gradient."""
    model = timm.create_model(name, layers=(1, 1, 1, 1)).train()  # one block per stage: the same modules
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))  # what a plain BN does with the same input


@pytest.mark.parametrize("name", ["aff_resnet50", "iaff_resnext50_32x4d", "aff_cifar_resnet8",
                                  "iaff_cifar_resnext11_32x4d"])
def test_features_only(name):
    feats = timm.create_model(name, features_only=True)
    x = _tiny_input(name)
    outs = feats(x)
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()
    assert [x.shape[-1] // o.shape[-1] for o in outs] == feats.feature_info.reduction()
    picked = timm.create_model(name, features_only=True, out_indices=(1, 3))
    assert [o.shape[1] for o in picked(x)] == [feats.feature_info.channels()[i] for i in (1, 3)]


def test_timm_api():
    model = timm.create_model("aff_cifar_resnet8", num_classes=5, in_chans=1, drop_rate=0.2, drop_path_rate=0.1)
    x = torch.randn(2, 1, 28, 28)
    check_timm_head(model, x, (2, 256, 7, 7), 5)
    model.set_grad_checkpointing(True)
    model.train()
    model(x).sum().backward()
    cfg = timm.create_model("aff_resnet50", pretrained=False).pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("aff_resnet50"))
    transform = timm.data.create_transform(**data_cfg)
    assert "Resize(size=256" in repr(transform) and "CenterCrop(size=(224, 224))" in repr(transform)


def test_drop_path_dropped_block_is_identity():
    model = timm.create_model("aff_cifar_resnet8", drop_path_rate=1.0, num_classes=10).train()
    block = model.layer3[0]  # the last block: its drop rate is the full rate
    block.drop_path.drop_prob = 1.0
    x = torch.randn(2, 128, 8, 8)
    torch.testing.assert_close(block(x), block.downsample(x))


def test_user_chosen_layouts():
    with torch.device("meta"):
        r18 = timm.create_model("aff_resnet50", block="basic", layers=(2, 2, 2, 2), fusion_stages=(1, 2, 3, 4))
        everywhere = timm.create_model("iaff_resnet50", fusion_stages=(1, 2, 3, 4), r=4)
    assert type(r18.layer1[0].fusion).__name__ == "AFF"
    assert r18.layer4[0].conv1.kernel_size == (3, 3)
    assert everywhere.layer1[0].fusion.mscam1.local_att[0].out_channels == 256 // 4
    with pytest.raises(ValueError, match="fusion_stages"):
        timm.create_model("aff_resnet50", fusion_stages=(5,))
    with pytest.raises(ValueError, match="unknown fusion type"):
        timm.create_model("aff_resnet50", fusion="nope")


@pytest.mark.parametrize("name", ["aff_resnet50", "iaff_cifar_resnext11_32x4d", "iaff_cifar_resnet8"])
def test_channels_last_matches_contiguous(name):
    model = timm.create_model(name).eval()
    x = _tiny_input(name)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("aff_resnet51")
    model = timm.create_model("aff_cifar_resnet8")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D image batch"):
        model(torch.randn(10))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.randn(3, 32, 32))


def test_small_models_take_grey_images():
    model = timm.create_model("iaff_cifar_resnext11_32x4d", in_chans=1, num_classes=10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_model_info_counts_multiply_adds():
    info = model_info("aff_resnet50")
    assert info.params == 30_373_192
    # resnet50d is 4.33 G multiply-adds with the same counter; the MS-CAMs of stages 3-4 add 0.23 G.
    assert 4.5 < info.gmacs < 4.6


@pytest.mark.parametrize("training", [False, True])
def test_add_fusion_is_bit_identical_to_resnet50d(training):
    # With fusion="add" the ImageNet family is timm's resnet50d: same state dict, same bits out.
    torch.manual_seed(0)
    ref = timm.create_model("resnet50d").train(training)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    ours = timm.create_model("aff_resnet50", fusion="add").train(training)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


# --- the pre-activation ResNet's input BN: no parameters; earlier versions' files still load ---------------------

def _earlier_layout(model: torch.nn.Module, weight: float = 1.0, bias: float = 0.0) -> dict[str, torch.Tensor]:
    """``model``'s state dict as earlier versions wrote it: the input BN's frozen weight (1) and bias (0) included."""
    sd = model.state_dict()
    c = model.input_norm.num_features
    return {**sd, "input_norm.weight": torch.full((c,), weight), "input_norm.bias": torch.full((c,), bias)}


def _calibrated(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, width_mult=0.25, **kwargs)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 16, 16) * 2 + 1)  # running statistics away from 0 and 1
    return model.eval()


@pytest.mark.parametrize("name", ["aff_cifar_resnet8", "cifar_inception_resnet8"])
def test_input_bn_holds_no_parameters(name):
    model = timm.create_model(name, width_mult=0.25)
    assert not model.input_norm.affine and not list(model.input_norm.parameters())
    assert [n for n, _ in model.input_norm.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    model.train()(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # timm's test_model_backward


def test_earlier_weight_files_load(tmp_path):
    from openaff import hub
    from openaff.files import save_weights

    model = _calibrated("aff_cifar_resnet8")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    old = _earlier_layout(model)
    # load_state_dict (resume, evaluation, train.py), also under a wrapper's prefix (EMA, DDP: "module.")
    fresh = timm.create_model("aff_cifar_resnet8", width_mult=0.25).eval()
    fresh.load_state_dict(old)
    wrapped = torch.nn.Sequential(timm.create_model("aff_cifar_resnet8", width_mult=0.25)).eval()
    wrapped.load_state_dict({f"0.{k}": v for k, v in old.items()})
    # a model folder (timm's local-dir:, openaff.hub.load_pretrained) and a plain safetensors file
    cfg = model.pretrained_cfg
    hub.save_pretrained(model, tmp_path / "run", architecture="aff_cifar_resnet8", model_args=dict(width_mult=0.25),
                        input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"])
    save_weights(tmp_path / "run" / hub.WEIGHTS_NAME, old, {})
    save_weights(tmp_path / "old.safetensors", old, {})
    loaded = [fresh, wrapped, timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval(),
              hub.load_pretrained(tmp_path / "run")[0],
              hub.load_pretrained(tmp_path / "old.safetensors", model="aff_cifar_resnet8",
                                  model_kwargs=dict(width_mult=0.25))[0]]
    with torch.no_grad():
        for net in loaded:
            assert torch.equal(net(x), want)


@pytest.mark.parametrize("weight, bias, message", [
    (0.5, 0.0, "input_norm.weight is not 1 everywhere ([0.5, 0.5, 0.5]), but the input BatchNorm has no scale"),
    (1.0, 0.1, "input_norm.bias is not 0 everywhere ([0.1"),
])
def test_earlier_files_with_a_scale_or_shift_are_refused(weight, bias, message, tmp_path):
    from openaff import hub
    from openaff.errors import CheckpointError
    from openaff.files import save_weights

    model = _calibrated("aff_cifar_resnet8")
    old = _earlier_layout(model, weight, bias)
    with pytest.raises(CheckpointError) as err:
        timm.create_model("aff_cifar_resnet8", width_mult=0.25).load_state_dict(old)
    assert message in str(err.value) and "\n" not in str(err.value)
    save_weights(tmp_path / "old.safetensors", old, {})
    with pytest.raises(CheckpointError, match="input_norm"):
        hub.load_pretrained(tmp_path / "old.safetensors", model="aff_cifar_resnet8", model_kwargs=dict(width_mult=0.25))
    if bias:  # the shift a converted MXNet file may hold: input_shift=True keeps it, as MXNet applies it
        assert "build the model with input_shift=True" in str(err.value)
        shifted = timm.create_model("aff_cifar_resnet8", width_mult=0.25, input_shift=True).eval()
        shifted.load_state_dict(old)
        assert torch.equal(shifted.input_norm.bias, old["input_norm.bias"])
        assert not shifted.input_norm.weight.requires_grad and not shifted.input_norm.bias.requires_grad
