"""Detection necks: torchvision's feature pyramid with a fusion module in every top-down merge.

:class:`FusionFeaturePyramidNetwork` drops into torchvision's detection models wherever
``torchvision.ops.FeaturePyramidNetwork`` goes: the same constructor arguments (and keyword-only
``fusion=`` and ``r=``), the same input and output (an ordered dict of maps, finest first), the same
module names. Only the merge differs: where torchvision adds ``lateral + up(top_down)``, this one
computes ``create_fusion(fusion, out_channels, r, scenario="long-skip")(up(top_down), lateral)``, the
long-skip scenario of the paper (AFF.md sections 3 and 4b): the upsampled higher-level map, the input
of larger receptive field, in the ``x`` slot, the lateral map in ``y``. With ``fusion="add"`` it is
torchvision's FPN exactly (its state_dict loads, its outputs come out bit for bit); with any other
fusion a torchvision FPN checkpoint loads with ``strict=False``, only the fusions' own weights missing.

:class:`FusionFPNBackbone` puts one on a timm ``features_only`` encoder (ours or timm's), giving
the backbone torchvision's ``FasterRCNN``, ``MaskRCNN``, ``RetinaNet`` or ``FCOS`` take::

    from torchvision.models.detection import FasterRCNN
    backbone = FusionFPNBackbone("aff_resnet50", out_channels=256, fusion="aff")
    model = FasterRCNN(backbone, num_classes=91)

The layout beyond the merge (nearest upsampling, the 1x1 lateral and 3x3 output convolutions,
``LastLevelMaxPool``) is torchvision's; the paper released no detector.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .layers import create_fusion, fusion_options

__all__ = ["FusionFPNBackbone", "FusionFeaturePyramidNetwork"]


class FusionFeaturePyramidNetwork(FeaturePyramidNetwork):
    """torchvision's ``FeaturePyramidNetwork`` whose top-down merges are fusion modules.

    Args:
        in_channels_list: channels of the input maps, finest first.
        out_channels: channels of every output map (and of the fusions).
        extra_blocks: torchvision's extra levels (e.g. ``LastLevelMaxPool()``), or None.
        norm_layer: norm layer of the lateral and output convolutions (torchvision's; None: none).
        fusion: fusion type of the merges (:func:`openaff.layers.fusion_names`; ``"add"`` is torchvision's FPN).
        r: channel reduction of the fusions' MS-CAMs (4, the paper's long-skip setting).
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int, extra_blocks: ExtraFPNBlock | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, *, fusion: str = "aff", r: int = 4) -> None:
        super().__init__(list(in_channels_list), out_channels, extra_blocks, norm_layer)
        # The factory's long-skip version where the type has scenarios (a user-registered type may not).
        options = {"scenario": "long-skip"} if "scenario" in fusion_options(fusion) else {}
        # fusions[i] merges the map coming down from level i + 1 into level i.
        self.fusions = nn.ModuleList(create_fusion(fusion, out_channels, r, **options)
                                     for _ in range(len(self.inner_blocks) - 1))
        self.fusion, self.r = fusion, r

    def get_result_from_fusions(self, top_down: torch.Tensor, lateral: torch.Tensor, idx: int) -> torch.Tensor:
        """``self.fusions[idx](top_down, lateral)``, written as torchvision writes its block look-ups (TorchScript
        cannot index a ModuleList with a variable)."""
        out = lateral
        for i, module in enumerate(self.fusions):
            if i == idx:
                out = module(top_down, lateral)
        return out

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps of the same names and sizes as ``x`` (plus the extra blocks'), ``out_channels`` each, finest first."""
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            inner_lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            inner_top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            # x: the higher-level map (larger receptive field), y: the lateral one (AFF.md 4b).
            last_inner = self.get_result_from_fusions(inner_top_down, inner_lateral, idx)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict([(k, v) for k, v in zip(names, results, strict=True)])


class FusionFPNBackbone(nn.Module):
    """A timm ``features_only`` encoder under a :class:`FusionFeaturePyramidNetwork`: a torchvision detection backbone.

    The output maps are named ``"0"``, ``"1"``, ... (and ``"pool"`` from ``LastLevelMaxPool``), as
    torchvision's ``BackboneWithFPN`` names them, so the detectors' default ROI pooling finds them;
    ``out_channels`` is the attribute the detectors read.

    Args:
        encoder: timm model name (``"aff_resnet50"``, ``"resnet50d"``, ...) or a ``features_only`` timm model.
        out_channels: channels of every pyramid level.
        fusion: fusion type of the pyramid's merges.
        r: channel reduction of the merges' MS-CAMs.
        out_indices: which encoder maps feed the pyramid (default: strides 4-32 of a ResNet).
        extra_blocks: torchvision's extra levels (default ``LastLevelMaxPool()``, as torchvision's ResNet backbones).
        norm_layer: norm layer of the pyramid's convolutions (None: none, as torchvision's default).
        pretrained: load the encoder's timm weights.
        encoder_kwargs: further ``timm.create_model`` keywords of the encoder (``in_chans``, ``output_stride``,
            ``norm_layer="frozenbatchnorm2d"``, ``layers``, ...), as :class:`openaff.segmentation.FusionFPN` takes them.
    """

    def __init__(self, encoder: str | nn.Module, out_channels: int = 256, fusion: str = "aff", r: int = 4,
                 out_indices: Sequence[int] = (1, 2, 3, 4), extra_blocks: ExtraFPNBlock | None = None,
                 norm_layer: Callable[..., nn.Module] | None = None, pretrained: bool = False,
                 encoder_kwargs: dict | None = None) -> None:
        super().__init__()
        if isinstance(encoder, nn.Module):
            if not hasattr(encoder, "feature_info") or not hasattr(encoder.feature_info, "channels"):
                raise ValueError("encoder must be a timm model name or a timm model built with features_only=True")
            self.body = encoder
        else:
            self.body = timm.create_model(encoder, features_only=True, out_indices=tuple(out_indices),
                                          pretrained=pretrained, **(encoder_kwargs or {}))
        self.fpn = FusionFeaturePyramidNetwork(self.body.feature_info.channels(), out_channels,
                                               LastLevelMaxPool() if extra_blocks is None else extra_blocks,
                                               norm_layer, fusion=fusion, r=r)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict([(str(i), f) for i, f in enumerate(feats)]))
