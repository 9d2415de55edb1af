"""AFF-ResNet and AFF-ResNeXt for ImageNet (the models with the authors' released weights).

ResNet-D backbone ("V1b" bottleneck, stride on the 3x3 conv, deep 3x3 stem, average-pool
downsampling shortcut) in which ``out + shortcut`` becomes ``fuse(out, shortcut)``, followed by
ReLU. The paper's models fuse in stages 3 and 4 only, with r = 16, and initialise the last BN of
every block with gamma = 0; stages 1-2 keep plain addition.

Other layouts are one call away, e.g. an AFF-ResNet-18 that fuses everywhere::

    timm.create_model("aff_resnet50", block="basic", layers=(2, 2, 2, 2), fusion_stages=(1, 2, 3, 4))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerType, get_act_layer, get_norm_layer
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._common import ClassifierMixin, block_fusion, build_model, check_image_batch, init_weights, make_stages

__all__ = ["AFFResNet", "FusionBasicBlock", "FusionBottleneck"]


class FusionBottleneck(nn.Module):
    """ResNet-D bottleneck whose residual and shortcut meet in a fusion module.

    Args:
        inplanes: input channels.
        planes: bottleneck channels before ``expansion``.
        stride: stride of the 3x3 convolution.
        downsample: shortcut projection, or None for the identity.
        cardinality: groups of the 3x3 convolution (32 for ResNeXt-32x4d).
        base_width: channels per group for ``planes == 64``.
        fusion: fusion type name (see :func:`openaff.layers.fusion_names`).
        r: MS-CAM channel reduction.
        drop_path: stochastic-depth rate of this block.
        dilation: dilation of the 3x3 convolution (of a stage that gave up its stride, ``output_stride``).
        first_dilation: dilation of the 3x3 convolution of a stage's first block (the previous
            stage's; default ``dilation``). The bottleneck has one 3x3 convolution, so it uses this
            one (as timm's).
        norm_layer: norm layer class after each convolution (not the fusion's own).
        act_layer: activation class (called with ``inplace=True``).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 cardinality: int = 1, base_width: int = 64, fusion: str = "aff", r: int = 16,
                 drop_path: float = 0.0, dilation: int = 1, first_dilation: int | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] = nn.ReLU) -> None:
        super().__init__()
        width = int(planes * (base_width / 64)) * cardinality
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=first_dilation, dilation=first_dilation,
                               groups=cardinality, bias=False)
        self.bn2 = norm_layer(width)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.downsample = downsample
        self.fusion = block_fusion(fusion, outplanes, r)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None
        self.act3 = act_layer(inplace=True)

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:  # a norm layer without affine weight has none
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        out = self.fusion(x, shortcut)
        if self.drop_path is not None:
            # Stochastic depth drops the block's contribution, so a dropped block is the identity
            # for every fusion type (zeroing x before an AFF would not be).
            out = shortcut + self.drop_path(out - shortcut)
        return self.act3(out)


class FusionBasicBlock(nn.Module):
    """Two 3x3 convolutions whose output and shortcut meet in a fusion module (ResNet-18/34 style).

    Args: as :class:`FusionBottleneck` (``cardinality`` must be 1 and ``base_width`` 64); the first
    3x3 convolution has ``first_dilation``, the second ``dilation`` (as timm's ``BasicBlock``).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 cardinality: int = 1, base_width: int = 64, fusion: str = "aff", r: int = 16,
                 drop_path: float = 0.0, dilation: int = 1, first_dilation: int | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act_layer: Callable[..., nn.Module] = nn.ReLU) -> None:
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("the basic block supports only cardinality=1 and base_width=64")
        first_dilation = first_dilation or dilation
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=first_dilation, dilation=first_dilation,
                               bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.fusion = block_fusion(fusion, planes, r)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None
        self.act2 = act_layer(inplace=True)

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        out = self.fusion(x, shortcut)
        if self.drop_path is not None:
            out = shortcut + self.drop_path(out - shortcut)  # as FusionBottleneck
        return self.act2(out)


_BLOCKS = {"bottleneck": FusionBottleneck, "basic": FusionBasicBlock}


def _layer(what: str, layer: LayerType, resolve: Callable[[LayerType], Callable[..., nn.Module]]
           ) -> Callable[..., nn.Module]:
    # timm's resolvers fail with a bare KeyError or assert on an unknown name; say what was wrong.
    try:
        out = resolve(layer)
    except (KeyError, AssertionError, TypeError):
        out = None
    if not callable(out):
        raise ValueError(f"{what} must be a layer class or a timm layer name, got {layer!r}")
    return out


class AFFResNet(ClassifierMixin, nn.Module):
    """ResNet-D / ResNeXt-D with attentional feature fusion in chosen stages.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        block: ``"bottleneck"`` or ``"basic"``.
        num_classes: classifier outputs (0 for no classifier).
        in_chans: input image channels.
        cardinality: groups of the 3x3 convolutions.
        base_width: channels per group in stage 1.
        stem_width: width of the first two 3x3 stem convolutions; the stem outputs twice that.
        fusion: fusion type of the fusing stages.
        fusion_stages: 1-based stages whose blocks fuse with ``fusion``; the others add.
        r: MS-CAM channel reduction.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        global_pool: timm pooling type of the head.
        zero_init_last: initialise the last BN of every block with gamma = 0.
        output_stride: 32, 16 or 8: the reduction of the last map. Below 32 the last stages trade
            their stride for dilated 3x3 convolutions, as timm's ResNet (16: stage 4 dilation 2;
            8: stage 3 dilation 2, stage 4 dilation 4); the weights are the same, so a model trained
            at 32 loads (segmentation encoders: smp's DeepLabV3, DeepLabV3+, PAN).
        norm_layer: norm layer of the stem, blocks and shortcuts: a class or a timm name (``"batchnorm"``,
            ``"groupnorm"``, ``"frozenbatchnorm2d"``, ...). The fusions' MS-CAMs keep their own BatchNorm.
        act_layer: activation of the stem and blocks: a class or a timm name (``"relu"``, ``"silu"``, ...).
    """

    stage_names = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), block: str = "bottleneck", num_classes: int = 1000,
                 in_chans: int = 3, cardinality: int = 1, base_width: int = 64, stem_width: int = 32,
                 fusion: str = "aff", fusion_stages: Sequence[int] = (3, 4), r: int = 16,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
                 zero_init_last: bool = True, output_stride: int = 32, norm_layer: LayerType = nn.BatchNorm2d,
                 act_layer: LayerType = nn.ReLU) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 32, 16 or 8, got {output_stride!r}")
        norm_layer, act_layer = _layer("norm_layer", norm_layer, get_norm_layer), _layer("act_layer", act_layer,
                                                                                        get_act_layer)
        if block not in _BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {sorted(_BLOCKS)}")
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {tuple(layers)}")
        bad = [s for s in fusion_stages if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"fusion_stages must be among 1-4, got {tuple(fusion_stages)}")
        block_cls = _BLOCKS[block]
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        inplanes = stem_width * 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, stride=2, padding=1, bias=False),
            norm_layer(stem_width),
            act_layer(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, padding=1, bias=False),
            norm_layer(stem_width),
            act_layer(inplace=True),
            nn.Conv2d(stem_width, inplanes, 3, padding=1, bias=False),
        )
        self.bn1 = norm_layer(inplanes)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=inplanes, reduction=2, module="act1")]

        stages, stage_info = make_stages(
            block_cls, layers, inplanes, widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), reduction=4,
            fusions=[fusion if i + 1 in fusion_stages else "add" for i in range(4)], r=r,
            drop_path_rate=drop_path_rate, output_stride=output_stride, norm_layer=norm_layer,
            cardinality=cardinality, base_width=base_width, act_layer=act_layer)
        for name, stage in zip(self.stage_names, stages, strict=True):
            self.add_module(name, stage)
        self.feature_info += stage_info
        inplanes = stage_info[-1]["num_chs"]

        self._init_head(inplanes, num_classes, global_pool)
        init_weights(self)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^conv1|bn1|maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._checkpoint_stages(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _create(variant: str, pretrained: bool = False, **kwargs) -> AFFResNet:
    return build_model(AFFResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> dict:
    # The authors evaluated with resize 256 -> centre crop 224 (crop_pct 0.875), ImageNet mean/std.
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                interpolation="bilinear", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="conv1.0", classifier="fc", license="apache-2.0",
                paper_ids="arXiv:2009.14082", **kwargs)


def _authors_cfg(top1_err: float, top5_err: float) -> dict:
    # Weights: the authors' MXNet files converted with `openaff convert` (no public URL we may fetch).
    return _cfg(origin_url="https://github.com/YimianDai/open-aff", paper_name="Attentional Feature Fusion",
                notes=(f"ImageNet-1k val, single 224 crop of 256: top-1 error {top1_err}, top-5 error {top5_err} "
                       "(published by the authors; 240 epochs, recipe in openaff/recipes)",))


default_cfgs = generate_default_cfgs({
    "aff_resnet50.authors_in1k": _authors_cfg(20.28, 5.27),
    "iaff_resnet50.authors_in1k": _authors_cfg(20.22, 5.46),
    "aff_resnext50_32x4d.authors_in1k": _authors_cfg(20.28, 5.29),
    "iaff_resnext50_32x4d.authors_in1k": _authors_cfg(19.78, 5.19),
    "aff_resnet101": _cfg(),
    "iaff_resnet101": _cfg(),
    "aff_resnext101_32x4d": _cfg(),
    "iaff_resnext101_32x4d": _cfg(),
})

_RESNET = dict(stem_width=32)
_RESNEXT = dict(stem_width=64, cardinality=32, base_width=4)


def _args(defaults: dict, kwargs: dict) -> dict:
    # User keywords override the variant's defaults, so any variant is a starting point.
    return {**defaults, **kwargs}


@register_model
def aff_resnet50(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNet-50: ResNet-50-D, AFF (r=16) in stages 3-4; 30,373,192 parameters."""
    return _create("aff_resnet50", pretrained, **_args(dict(layers=(3, 4, 6, 3), fusion="aff", **_RESNET), kwargs))


@register_model
def iaff_resnet50(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNet-50: ResNet-50-D, iAFF (r=16) in stages 3-4; 35,170,120 parameters."""
    return _create("iaff_resnet50", pretrained, **_args(dict(layers=(3, 4, 6, 3), fusion="iaff", **_RESNET), kwargs))


@register_model
def aff_resnext50_32x4d(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNeXt-50-32x4d: 64-64-128 stem, AFF (r=16) in stages 3-4; 29,953,704 parameters."""
    return _create("aff_resnext50_32x4d", pretrained,
                   **_args(dict(layers=(3, 4, 6, 3), fusion="aff", **_RESNEXT), kwargs))


@register_model
def iaff_resnext50_32x4d(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNeXt-50-32x4d: 64-64-128 stem, iAFF (r=16) in stages 3-4; 34,750,632 parameters."""
    return _create("iaff_resnext50_32x4d", pretrained,
                   **_args(dict(layers=(3, 4, 6, 3), fusion="iaff", **_RESNEXT), kwargs))


@register_model
def aff_resnet101(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNet-101: blocks 3-4-23-3, otherwise as AFF-ResNet-50."""
    return _create("aff_resnet101", pretrained, **_args(dict(layers=(3, 4, 23, 3), fusion="aff", **_RESNET), kwargs))


@register_model
def iaff_resnet101(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNet-101: blocks 3-4-23-3, otherwise as iAFF-ResNet-50."""
    return _create("iaff_resnet101", pretrained,
                   **_args(dict(layers=(3, 4, 23, 3), fusion="iaff", **_RESNET), kwargs))


@register_model
def aff_resnext101_32x4d(pretrained: bool = False, **kwargs) -> AFFResNet:
    """AFF-ResNeXt-101-32x4d: blocks 3-4-23-3, otherwise as AFF-ResNeXt-50-32x4d."""
    return _create("aff_resnext101_32x4d", pretrained,
                   **_args(dict(layers=(3, 4, 23, 3), fusion="aff", **_RESNEXT), kwargs))


@register_model
def iaff_resnext101_32x4d(pretrained: bool = False, **kwargs) -> AFFResNet:
    """iAFF-ResNeXt-101-32x4d: blocks 3-4-23-3, otherwise as iAFF-ResNeXt-50-32x4d."""
    return _create("iaff_resnext101_32x4d", pretrained,
                   **_args(dict(layers=(3, 4, 23, 3), fusion="iaff", **_RESNEXT), kwargs))
