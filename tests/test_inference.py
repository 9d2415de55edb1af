"""fuse_for_inference: BatchNorm folded into the convolution before it, outputs unchanged."""

import copy

import pytest
import timm
import torch
from torch import nn

from openaff.folding import fold_conv_bn, fuse_for_inference
from openaff.layers import create_fusion, fusion_names

CL = torch.channels_last


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random affine BN parameters and running statistics measured on data, then eval mode.

    Statistics from real activations keep the network well conditioned, so float32 rounding
    differences stay at the 1e-7 level instead of being amplified by exploding activations.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
                if m.affine and m.weight.requires_grad:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
        model.train()
        for _ in range(2):
            model(torch.randn(8, *x.shape[1:], dtype=x.dtype))
        # The global branches see one value per image: a small calibration batch can give a
        # near-zero variance, which no trained network has and which would amplify rounding.
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.clamp_(min=0.1)
    return model.eval()


SMALL = [
    ("aff_cifar_resnet8", dict(width_mult=0.25)),
    ("iaff_cifar_resnet8", dict(width_mult=0.25)),
    ("aff_cifar_resnext11_32x4d", dict(width_mult=0.25)),
    ("iaff_cifar_resnext11_32x4d", dict(width_mult=0.25)),
    ("aff_resnet50", dict(layers=(1, 1, 1, 1), fusion_stages=(1, 2, 3, 4), zero_init_last=False)),
    ("iaff_resnet50", dict(block="basic", layers=(1, 1, 1, 1), fusion_stages=(1, 2, 3, 4), r=4,
                           zero_init_last=False)),
    ("aff_resnext50_32x4d", dict(layers=(1, 1, 1, 1), zero_init_last=False)),
]
# Small inputs keep float64 (no oneDNN) fast; grouped convolutions are the slowest.
SIZES = {"aff_resnext50_32x4d": 32}


def _build(name: str, kwargs: dict, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    size = SIZES.get(name, 16 if "cifar" in name else 64)
    x = torch.randn(2, 3, size, size, dtype=dtype)
    return _calibrated(timm.create_model(name, num_classes=10, **kwargs).to(dtype), x), x


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_folded_model_matches(name, kwargs):
    torch.manual_seed(0)
    model, x = _build(name, kwargs, torch.float64)
    model32 = copy.deepcopy(model).float()
    folded = fuse_for_inference(model, inplace=False)
    assert folded is not model and folded.folded_batchnorms > 0
    folded32 = fuse_for_inference(model32, inplace=False)
    with torch.no_grad():
        want = model(x)
        # float64: the same function up to rounding.
        assert _rel(folded(x), want) < 1e-12
        # float32: against the exact (float64) outputs of the same weights, as accurate as the
        # unfolded float32 model (folding does its arithmetic in float64 and rounds once).
        err_unfolded = _rel(model32(x.float()).double(), want)
        err_folded = _rel(folded32(x.float()).double(), want)
        assert err_folded < 1e-5
        assert err_folded < 2 * err_unfolded + 1e-6


@pytest.mark.parametrize("name, kwargs", SMALL)
def test_only_valid_batchnorms_are_folded(name, kwargs):
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fuse_for_inference(model)
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert model.folded_batchnorms == n_bn - len(left)
    if "cifar_resnet" in name:
        # Pre-activation: the input BN, each block's first BN (BN -> ReLU -> conv) and the final BN
        # precede convolutions or the head; only `conv1 -> bn2` inside a block is foldable.
        assert all(n.endswith(("input_norm", "bn1", "bn_final")) for n in left)
        assert all(isinstance(b.bn2, nn.Identity) for b in model.modules() if hasattr(b, "bn2"))
    else:
        assert left == []
    # Nothing left to fold the second time.
    assert fuse_for_inference(model).folded_batchnorms == 0


def test_full_size_models_in_float64():
    # The ImageNet models of the paper, full depth, at a small input: folding is exact up to rounding.
    for name in ("aff_resnet50", "iaff_resnext50_32x4d"):
        torch.manual_seed(0)
        model, x = _build(name, dict(zero_init_last=False), torch.float64)
        folded = fuse_for_inference(copy.deepcopy(model))
        with torch.no_grad():
            assert _rel(folded(x[:2]), model(x[:2])) < 1e-9


@pytest.mark.parametrize("fusion", fusion_names())
def test_every_fusion_type_folds(fusion):
    torch.manual_seed(0)
    m = create_fusion(fusion, 16, 4).double()
    x, y = torch.randn(4, 16, 5, 5, dtype=torch.float64), torch.randn(4, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        m.train()
        m(x, y)  # batch statistics into the running statistics
    m.eval()
    folded = fuse_for_inference(m, inplace=False)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, y), m(x, y), rtol=1e-12, atol=1e-12)
    assert not any(isinstance(t, nn.BatchNorm2d) for t in folded.modules())


def test_refuses_training_mode():
    model = timm.create_model("aff_cifar_resnet8", width_mult=0.25)
    with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
        fuse_for_inference(model)
    model.eval()
    model.layer1[0].fusion.train()
    with pytest.raises(RuntimeError, match="layer1.0.fusion"):
        fuse_for_inference(model)


def test_channels_last_and_dtype_are_kept():
    model = timm.create_model("aff_resnet50", layers=(1, 1, 1, 1), num_classes=10).eval().to(memory_format=CL)
    fuse_for_inference(model)
    conv = model.layer3[0].fusion.mscam.local_att[0]
    assert conv.weight.is_contiguous(memory_format=CL) and conv.bias.dtype == torch.float32
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    with torch.no_grad():
        assert model.forward_features(x).is_contiguous(memory_format=CL)


def test_fold_conv_bn_without_affine_or_bias():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False).double(), nn.BatchNorm2d(4, affine=False).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    want = bn(conv(x))
    fold_conv_bn(conv, bn)
    torch.testing.assert_close(conv(x), want, rtol=1e-13, atol=1e-13)


def test_the_earlier_module_path_still_works():
    import openaff.folding
    import openaff.inference

    assert openaff.inference.fuse_for_inference is openaff.folding.fuse_for_inference
    assert openaff.inference.fold_conv_bn is openaff.folding.fold_conv_bn
