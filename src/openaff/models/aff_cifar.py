"""The small-image (CIFAR-style) families of the paper's studies, with any fusion type.

* ``{fusion}_cifar_resnet{6b+2}``: pre-activation ResNet-b, widths 64/128/256, r = 4, no ReLU
  after the fusion (e.g. ``aff_cifar_resnet32`` is b = 5).
* ``{fusion}_cifar_resnext{9b+2}_32x4d``: ResNeXt-b-32x4d, stage widths 64/128/256 (output x4),
  r = 16, ReLU after the fusion (e.g. ``aff_cifar_resnext38_32x4d`` is b = 4).

``{fusion}`` is ``aff`` or ``iaff``; without a prefix (``cifar_resnet32``) the blocks add, which is
the plain baseline. Every registered name accepts ``fusion=``, ``b=``, ``width_mult=``,
``in_chans=``, ``num_classes=`` and ``r=`` to build any other member of the family, e.g.
``timm.create_model("aff_cifar_resnet32", in_chans=1, num_classes=10)`` for Fashion-MNIST.

The pre-activation ResNet's input BatchNorm has no scale and no shift (the authors' ``scale=False,
center=False``): ``nn.BatchNorm2d(in_chans, affine=False)``, running statistics only, no parameters. Weight
files of earlier versions hold its fixed ``input_norm.weight`` (1) and ``input_norm.bias`` (0): loading drops
them (:func:`drop_fixed_input_affine`). MXNet applies the stored beta of a ``center=False`` BatchNorm without
training it; a file whose beta is not 0 (the project's random-weight test files) needs ``input_shift=True``,
the input BatchNorm with that shift kept (and its scale fixed at 1), as frozen parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..errors import CheckpointError
from ._common import ClassifierMixin, block_fusion, build_model, check_image_batch, init_weights, make_stages
from .aff_resnet import FusionBottleneck

__all__ = ["AFFCifarPreActResNet", "AFFCifarResNeXt", "PreActBlock", "drop_fixed_input_affine"]


class PreActBlock(nn.Module):
    """Pre-activation basic block: ``fuse(conv(relu(bn(conv(relu(bn(x)))))), shortcut)``, no ReLU after.

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of the first 3x3 convolution.
        downsample: shortcut projection (AvgPool -> Conv1x1, no BN), or None for the identity.
        fusion: fusion type name.
        r: MS-CAM channel reduction.
        drop_path: stochastic-depth rate of this block.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 fusion: str = "aff", r: int = 4, drop_path: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.downsample = downsample
        self.fusion = block_fusion(fusion, planes, r)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shortcut takes the block's raw input, not the pre-activated one (authors' code).
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.act1(self.bn1(x)))
        out = self.conv2(self.act2(self.bn2(out)))
        fused = self.fusion(out, shortcut)
        if self.drop_path is not None:
            fused = shortcut + self.drop_path(fused - shortcut)  # a dropped block is the identity
        return fused


def _widths(width_mult: float) -> tuple[int, int, int]:
    return tuple(max(int(round(w * width_mult)), 1) for w in (64, 128, 256))


def _fusions(fusion: str, fusion_stages: Sequence[int]) -> list[str]:
    bad = [s for s in fusion_stages if s not in (1, 2, 3)]
    if bad:
        raise ValueError(f"fusion_stages must be among 1-3, got {tuple(fusion_stages)}")
    return [fusion if i + 1 in fusion_stages else "add" for i in range(3)]


def drop_fixed_input_affine(state_dict: dict[str, Any], prefix: str = "") -> None:
    """Remove an earlier version's fixed scale and shift of the input BatchNorm from ``state_dict``, in place.

    ``{prefix}input_norm.weight`` must be 1 and ``{prefix}input_norm.bias`` 0 everywhere (what every model of
    ours held, frozen); anything else is a CheckpointError naming the tensor and what to do.

    Args:
        state_dict: a state dict of a pre-activation ResNet (or one with no such keys: unchanged).
        prefix: the model's prefix in ``state_dict`` (e.g. ``"module."``).
    """
    weight, bias = state_dict.get(f"{prefix}input_norm.weight"), state_dict.get(f"{prefix}input_norm.bias")
    if weight is not None and not bool((weight == 1).all()):
        raise CheckpointError(f"{prefix}input_norm.weight is not 1 everywhere ({weight.flatten()[:4].tolist()}), but "
                              "the input BatchNorm has no scale (the authors' scale=False): not weights of this model")
    if bias is not None and not bool((bias == 0).all()):
        raise CheckpointError(f"{prefix}input_norm.bias is not 0 everywhere ({bias.flatten()[:4].tolist()}): a "
                              "shifting input BatchNorm; build the model with input_shift=True")
    state_dict.pop(f"{prefix}input_norm.weight", None)
    state_dict.pop(f"{prefix}input_norm.bias", None)


def _drop_fixed_input_affine(model: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    # load_state_dict's pre-hook: every loading path (timm's pretrained=True, resume, EMA) reads older files.
    if not model.input_norm.affine:
        drop_fixed_input_affine(state_dict, prefix)


class AFFCifarPreActResNet(ClassifierMixin, nn.Module):
    """Pre-activation ResNet-(6b+2) for small images, with a fusion in every block.

    Input BN without scale and shift (the authors' ``scale=False, center=False``: running statistics only, no
    parameters), Conv3x3, three stages of ``b`` blocks, BN-ReLU, global pool, classifier.

    Args:
        b: blocks per stage (depth 6b + 2).
        num_classes: classifier outputs.
        in_chans: input image channels.
        width_mult: scales the stage widths 64/128/256.
        fusion: fusion type name of the fusing stages.
        fusion_stages: 1-based stages whose blocks fuse; the others add.
        r: MS-CAM channel reduction.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        global_pool: timm pooling type of the head.
        input_shift: the input BN applies a fixed shift (``input_norm.bias``, frozen, and a scale frozen at 1):
            for converted MXNet files whose beta is not 0.
    """

    stage_names = ("layer1", "layer2", "layer3")
    # What a variant of this network replaces (the same-layer family: aff_inception.py).
    block_cls: type[nn.Module] = PreActBlock

    def _make_stem(self, in_chans: int, width: int, fusion: str, r: int) -> nn.Module:
        return nn.Conv2d(in_chans, width, 3, padding=1, bias=False)

    def __init__(self, b: int = 5, num_classes: int = 100, in_chans: int = 3, width_mult: float = 1.0,
                 fusion: str = "aff", fusion_stages: Sequence[int] = (1, 2, 3), r: int = 4,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg",
                 input_shift: bool = False) -> None:
        super().__init__()
        if b < 1:
            raise ValueError(f"b (blocks per stage) must be >= 1, got {b}")
        if not isinstance(input_shift, bool):
            raise ValueError(f"input_shift must be True or False, got {input_shift!r}")
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        widths = _widths(width_mult)
        # Modules are registered in forward order: timm's features_only wrapper runs them in this order.
        self.input_norm = nn.BatchNorm2d(in_chans, affine=input_shift)
        self.conv1 = self._make_stem(in_chans, widths[0], fusion, r)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="conv1")]
        stages, info = make_stages(self.block_cls, (b, b, b), widths[0], widths, (1, 2, 2), 1,
                                   _fusions(fusion, fusion_stages), r, drop_path_rate, downsample_norm=False)
        for name, stage in zip(self.stage_names, stages, strict=True):
            self.add_module(name, stage)
        self.feature_info += info
        self.bn_final = nn.BatchNorm2d(widths[-1])
        self.act_final = nn.ReLU(inplace=True)
        # The last feature is the pre-activated map the classifier sees.
        self.feature_info[-1] = dict(num_chs=widths[-1], reduction=4, module="act_final")
        self._init_head(widths[-1], num_classes, global_pool)
        init_weights(self)
        if input_shift:
            self.input_norm.weight.requires_grad_(False)
            self.input_norm.bias.requires_grad_(False)
        self.register_load_state_dict_pre_hook(_drop_fixed_input_affine)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^input_norm|conv1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans)
        x = self.conv1(self.input_norm(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = self._checkpoint_stages(x)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return self.act_final(self.bn_final(x))


class AFFCifarResNeXt(ClassifierMixin, nn.Module):
    """ResNeXt-(9b+2)-32x4d for small images: Conv3x3-BN-ReLU stem, three bottleneck stages.

    Args:
        b: blocks per stage (depth 9b + 2).
        num_classes: classifier outputs.
        in_chans: input image channels.
        width_mult: scales the stage widths 64/128/256 (and so the group widths).
        cardinality: groups of the 3x3 convolutions.
        base_width: channels per group in stage 1 (4 for 32x4d).
        fusion: fusion type name of the fusing stages.
        fusion_stages: 1-based stages whose blocks fuse; the others add.
        r: MS-CAM channel reduction.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly to this rate over the blocks.
        global_pool: timm pooling type of the head.
        zero_init_last: initialise the last BN of every block with gamma = 0.
    """

    stage_names = ("layer1", "layer2", "layer3")

    def __init__(self, b: int = 4, num_classes: int = 100, in_chans: int = 3, width_mult: float = 1.0,
                 cardinality: int = 32, base_width: int = 4, fusion: str = "aff",
                 fusion_stages: Sequence[int] = (1, 2, 3), r: int = 16, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg", zero_init_last: bool = False) -> None:
        super().__init__()
        if b < 1:
            raise ValueError(f"b (blocks per stage) must be >= 1, got {b}")
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        widths = _widths(width_mult)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="act1")]
        stages, info = make_stages(FusionBottleneck, (b, b, b), widths[0], widths, (1, 2, 2), 1,
                                   _fusions(fusion, fusion_stages), r, drop_path_rate,
                                   cardinality=cardinality, base_width=base_width)
        for name, stage in zip(self.stage_names, stages, strict=True):
            self.add_module(name, stage)
        self.feature_info += info
        self._init_head(info[-1]["num_chs"], num_classes, global_pool)
        init_weights(self)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, FusionBottleneck):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            check_image_batch(x, self.in_chans)
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._checkpoint_stages(x)
        return self.layer3(self.layer2(self.layer1(x)))


def _cfg(**kwargs) -> dict:
    # CIFAR-100 statistics; 32x32 inputs are used as they are (no resize, no crop).
    return dict(url="", num_classes=100, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
                interpolation="bilinear", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                first_conv="conv1", classifier="fc", license="apache-2.0", paper_ids="arXiv:2009.14082", **kwargs)


_PREFIX = {"add": "", "aff": "aff_", "iaff": "iaff_"}
RESNET_DEPTHS = (8, 14, 20, 32, 56)  # b = 1, 2, 3, 5, 9
RESNEXT_DEPTHS = (11, 20, 29, 38, 47)  # b = 1, 2, 3, 4, 5


def _variants() -> list[tuple[str, type[nn.Module], dict, str]]:
    out = []
    for fusion, prefix in _PREFIX.items():
        for depth in RESNET_DEPTHS:
            b = (depth - 2) // 6
            out.append((f"{prefix}cifar_resnet{depth}", AFFCifarPreActResNet, dict(b=b, fusion=fusion),
                        f"Pre-activation ResNet-{depth} (b={b}) for small images, fusion {fusion!r}, r=4."))
        for depth in RESNEXT_DEPTHS:
            b = (depth - 2) // 9
            out.append((f"{prefix}cifar_resnext{depth}_32x4d", AFFCifarResNeXt, dict(b=b, fusion=fusion),
                        f"ResNeXt-{depth}-32x4d (b={b}) for small images, fusion {fusion!r}, r=16."))
    return out


_VARIANTS = _variants()
# timm reads `default_cfgs` when an entry point is registered, so it must exist first.
default_cfgs = generate_default_cfgs({name: _cfg() for name, *_ in _VARIANTS})


def _register(name: str, cls: type[nn.Module], defaults: dict, doc: str) -> None:
    # The families have 30 members that differ only in numbers, so the entry points are made in a
    # loop rather than written out; each is an ordinary timm entry point.
    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        return build_model(cls, name, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **{**defaults, **kwargs})

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    entry.__module__ = __name__
    globals()[name] = register_model(entry)


for _variant in _VARIANTS:
    _register(*_variant)
