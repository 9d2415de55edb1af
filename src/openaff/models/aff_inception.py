"""The same-layer (Inception-style) family of the paper's fusion study, with any fusion type.

``{fusion}_cifar_inception_resnet{6b+2}`` is the pre-activation ResNet-b of
:mod:`openaff.models.aff_cifar` (input BN without parameters, stem conv, three stages of ``b`` blocks, widths
64/128/256 x ``width_mult``, strides 1/2/2, BN-ReLU-pool-classifier, AvgPool+Conv1x1 shortcut where the
shape changes, no ReLU after a block) in which every 3x3 convolution, the stem's included, is a
:class:`DilatedPairCell`: two parallel 3x3 convolutions with the same stride, dilation 1 (``X``, the
smaller receptive field) and dilation 2 (``Y``), each with a bias and a BatchNorm and no ReLU, whose
outputs are fused as ``fuse(Y, X)``. The blocks' own residuals stay plain additions: the fusion sits in
the layer, not on the skip connection (AFF.md §4b, "Same layer").

The fusions are the authors' same-layer versions (``create_fusion(..., scenario="same-layer")``): e.g.
AFF is ``X·w + Y·(1 − w)`` with a single-layer attention ``w = σ(L1 + G1)(X + Y)`` and no factor 2; for
``add`` the cell drops its two BatchNorms (``X + Y`` of the bare convolutions), as the authors' code does.

``{fusion}`` is ``aff`` or ``iaff``; without a prefix (``cifar_inception_resnet8``) the cells add.
Registered depths 8, 14, 20, 26 (b = 1-4, the paper's Table 4); every name accepts ``fusion=`` (any
name of :func:`openaff.layers.fusion_names`), ``b=``, ``width_mult=``, ``r=``, ``in_chans=`` and
``num_classes=``. ``width_mult`` means what it means for ``cifar_resnet``: 1.0 is the authors'
``channel_times`` 4 (64/128/256), 0.25 their ``channel_times`` 1 (16/32/64).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..errors import check_int, check_number
from ..layers import AddFusion
from ..layers.fusion import fusion_options
from ._common import block_fusion, build_model
from .aff_cifar import AFFCifarPreActResNet

__all__ = ["AFFCifarInceptionResNet", "DilatedPairCell", "InceptionPreActBlock"]


class DilatedPairCell(nn.Module):
    """Two parallel 3x3 convolutions, dilation 1 and 2, fused: ``fuse(bn_d2(conv_d2(x)), bn_d1(conv_d1(x)))``.

    Both convolutions have the same stride, ``padding = dilation`` (so their outputs have the same size
    for any input size) and a bias; neither is followed by a ReLU. The dilated branch (the input of larger
    receptive field) is the fusion's first argument, as the residual branch is in the short-skip blocks.
    With the ``add`` fusion the BatchNorms are identities (the authors' same-layer Add is ``X + Y`` of the
    convolutions); ``add_bn`` keeps them (the control).

    Args:
        in_chs: input channels.
        out_chs: output channels (of both branches and of the fusion).
        stride: stride of both convolutions.
        fusion: fusion type name (any of :func:`openaff.layers.fusion_names`).
        r: channel reduction of the fusion's attention, where it has one.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, fusion: str = "aff", r: int = 4) -> None:
        super().__init__()
        self.conv_d1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, dilation=1, bias=True)
        self.conv_d2 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=2, dilation=2, bias=True)
        # The authors' same-layer version of the type; a user's type without scenarios is used as it is.
        options = {"scenario": "same-layer"} if "scenario" in fusion_options(fusion) else {}
        self.fusion = block_fusion(fusion, out_chs, r, **options)
        plain = isinstance(self.fusion, AddFusion) and self.fusion.drops_branch_norms
        self.bn_d1 = nn.Identity() if plain else nn.BatchNorm2d(out_chs)
        self.bn_d2 = nn.Identity() if plain else nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        near = self.bn_d1(self.conv_d1(x))
        wide = self.bn_d2(self.conv_d2(x))
        return self.fusion(wide, near)


class InceptionPreActBlock(nn.Module):
    """Pre-activation basic block with cells for convolutions: ``shortcut + cell2(relu(bn2(cell1(relu(bn1(x))))))``.

    No ReLU after the addition. The shortcut takes the block's raw input (the authors' pre-activation
    block), projected by AvgPool -> Conv1x1 (no BN) where the stride or width changes.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first cell.
        downsample: shortcut projection, or None for the identity.
        fusion: fusion type name of both cells.
        r: channel reduction of the cells' attention.
        drop_path: stochastic-depth rate of this block.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 fusion: str = "aff", r: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = DilatedPairCell(inplanes, planes, stride, fusion, r)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = DilatedPairCell(planes, planes, 1, fusion, r)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(self.act2(self.bn2(out)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut


def _check_args(b: object, width_mult: object, r: object, in_chans: object, num_classes: object) -> None:
    # The registered names take these from users (model_kwargs, the study's grid): one line each.
    check_int(b, "b (blocks per stage) must be an integer >= 1", error=ValueError)
    check_number(width_mult, "width_mult must be a number > 0", gt=0, error=ValueError)
    check_int(r, "r (attention channel reduction) must be an integer >= 1", error=ValueError)
    check_int(in_chans, "in_chans must be an integer >= 1", error=ValueError)
    check_int(num_classes, "num_classes must be an integer >= 0", lo=0, error=ValueError)


class AFFCifarInceptionResNet(AFFCifarPreActResNet):
    """Pre-activation Inception-ResNet-(6b+2) for small images: every 3x3 conv a fused dilation-1/2 pair.

    The pre-activation ResNet-b of :class:`~openaff.models.aff_cifar.AFFCifarPreActResNet` with a
    :class:`DilatedPairCell` stem and :class:`InceptionPreActBlock` blocks: ``1 + 2·3·b`` fusions in all.

    Args:
        b: blocks per stage (depth 6b + 2).
        num_classes: classifier outputs.
        in_chans: input image channels.
        width_mult: scales the stage widths 64/128/256.
        fusion: fusion type name of every cell.
        r: channel reduction of the cells' attention (same-layer AFF/iAFF have none; bottleneck types use it).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        global_pool: timm pooling type of the head.
        input_shift: the input BN applies a fixed shift (see :class:`~openaff.models.aff_cifar.AFFCifarPreActResNet`).
    """

    block_cls = InceptionPreActBlock

    def _make_stem(self, in_chans: int, width: int, fusion: str, r: int) -> nn.Module:
        return DilatedPairCell(in_chans, width, 1, fusion, r)

    def __init__(self, b: int = 1, num_classes: int = 100, in_chans: int = 3, width_mult: float = 1.0,
                 fusion: str = "aff", r: int = 4, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str = "avg", input_shift: bool = False) -> None:
        _check_args(b, width_mult, r, in_chans, num_classes)
        super().__init__(b=b, num_classes=num_classes, in_chans=in_chans, width_mult=width_mult, fusion=fusion,
                         fusion_stages=(1, 2, 3), r=r, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         global_pool=global_pool, input_shift=input_shift)


def _cfg(**kwargs) -> dict:
    # CIFAR-100 statistics, 32x32 inputs as they are. Both convolutions of the stem cell see the image:
    # timm adapts each of them when pretrained weights are loaded with another in_chans.
    return dict(url="", num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                interpolation="bilinear", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                first_conv=("conv1.conv_d1", "conv1.conv_d2"), classifier="fc", license="apache-2.0",
                paper_ids="arXiv:2009.14082", **kwargs)


_PREFIX = {"add": "", "aff": "aff_", "iaff": "iaff_"}
DEPTHS = (8, 14, 20, 26)  # b = 1, 2, 3, 4: the columns of the paper's Table 4


def _variants() -> list[tuple[str, dict, str]]:
    out = []
    for fusion, prefix in _PREFIX.items():
        for depth in DEPTHS:
            b = (depth - 2) // 6
            out.append((f"{prefix}cifar_inception_resnet{depth}", dict(b=b, fusion=fusion),
                        f"Pre-activation Inception-ResNet-{depth} (b={b}) for small images: every 3x3 conv a "
                        f"dilation-1/2 pair fused by {fusion!r} (same-layer version)."))
    return out


_VARIANTS = _variants()
# timm reads `default_cfgs` when an entry point is registered, so it must exist first.
default_cfgs = generate_default_cfgs({name: _cfg() for name, *_ in _VARIANTS})


def _register(name: str, defaults: dict, doc: str) -> None:
    # Twelve members that differ only in numbers: entry points made in a loop, as in aff_cifar.
    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        return build_model(AFFCifarInceptionResNet, name, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)),
                           **{**defaults, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    entry.__module__ = __name__
    globals()[name] = register_model(entry)


for _variant in _VARIANTS:
    _register(*_variant)
