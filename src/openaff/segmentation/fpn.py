"""AFF-FPN: a feature pyramid decoder whose every top-down merge is a fusion module, on any timm encoder.

The long-skip scenario of the paper (AFF.md sections 3 and 4b): going down the pyramid, the
high-level map is upsampled to the low-level map's size and projected by Conv1x1(bias)-BN-ReLU to
its channels; the two are fused by ``create_fusion(name, C, r, scenario="long-skip")`` with the
high-level map in the ``x`` slot (the input of larger receptive field) and the low-level map in
``y``; a Conv3x3(bias)-BN-ReLU follows. A 1x1 classifier on the finest merged map gives the logits,
upsampled bilinearly to the input's size. The authors released no FPN network (4b): the layout
beyond the merge (which levels, the upsampling, the head) is ours, and is written down here.

* **Encoders**: any ``timm.create_model(name, features_only=True)`` model: ours
  (``aff_resnet50``, ``iaff_resnext50_32x4d``, the small-image families) and timm's own
  (``resnet50d``, ...). By default the decoder takes the last feature map of every reduction, the
  deepest four (ResNet-50: strides 4, 8, 16, 32; the small-image networks: 1, 2, 4).
* **Any input size**: the batch is zero-padded (after normalisation: the mean colour) at the
  bottom and right to a multiple of the encoder's total stride, so that every level is exactly
  half the one above, and the logits are cropped back; the output always has the input's size.
* **Registered names** (by ``import openaff``; ``timm.create_model`` builds them):
  ``fpn``, ``aff_fpn``, ``iaff_fpn`` (``encoder=`` any timm name, default ``resnet50d``; the prefix
  is the default ``fusion``), and the paper's small model, the FPN on the pre-activation ResNet-b
  (:mod:`openaff.models.aff_cifar`, plain additive blocks: the fusion under study is the
  decoder's), ``{fusion}_fpn_cifar_resnet{6b+2}`` for b = 1-4 (``fpn_cifar_resnet20`` is b = 3,
  the paper's ResNet-20-b), each taking ``fusion=``, ``b=``, ``width_mult=``, ``r=``,
  ``in_chans=`` and ``num_classes=``.

``create_segmenter("aff_fpn", encoder="aff_resnet50", num_classes=21)`` is the builder; the
output is ``B x num_classes x H x W`` logits at the input's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..errors import check_int
from ..layers import AlignedFusion, Projection, create_fusion, fusion_options
from ..models._common import check_image_batch

__all__ = ["SEGMENTERS", "FPNMerge", "FusionFPN", "create_segmenter", "fusion_share", "is_segmenter"]

# Name prefix -> the default fusion of the registered names.
_PREFIX = {"": "add", "aff_": "aff", "iaff_": "iaff"}
SMALL_DEPTHS = (8, 14, 20, 26)  # b = 1, 2, 3, 4: the long-skip column of the paper's Table 4


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    # bias=True as in the authors' long-skip code (AFF.md 4b), BN after it all the same.
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=True), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class FPNMerge(AlignedFusion):
    """One top-down step: ``smooth(fuse(project(up(high)), low))``.

    The fusion of inputs of other widths and sizes of :mod:`openaff.layers.fusion_aligned` (upsample to the
    low-level map's size first, then Conv1x1(bias)-BN-ReLU, as the authors' long-skip code), followed by a
    Conv3x3(bias)-BN-ReLU. Weights: ``project`` (the high-level map's projection), ``fuse``, ``smooth``.

    Args:
        high_chs: channels of the high-level (coarser) map.
        low_chs: channels of the low-level map, and of the output.
        fusion: fusion type name (:func:`openaff.layers.fusion_names`).
        r: MS-CAM channel reduction.
        upsample: ``bilinear`` or ``nearest``.
    """

    def __init__(self, high_chs: int, low_chs: int, fusion: str = "aff", r: int = 4,
                 upsample: str = "bilinear") -> None:
        # The factory's long-skip version where the type has scenarios (a user type may not).
        options = {"scenario": "long-skip"} if "scenario" in fusion_options(fusion) else {}
        # x: the high-level map (larger receptive field), y: the low-level one (the authors' order). A plain
        # BatchNorm2d in the projection, as this merge always had (the upsampled map has many values per channel).
        super().__init__(create_fusion(fusion, low_chs, r, **options), low_chs, (high_chs, low_chs),
                         resize=upsample, resize_first=True, relu=True, size_from=1, norm_layer=nn.BatchNorm2d)
        if high_chs == low_chs:  # AlignedFusion leaves an input of the width as it is; the merge always projects
            self.project = Projection(high_chs, low_chs, 2, relu=True, norm_layer=nn.BatchNorm2d)
        self.smooth = _conv_bn_relu(low_chs, low_chs, 3)
        self.upsample = upsample

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return self.smooth(super().forward(high, low))


def _default_levels(reductions: Sequence[int], max_levels: int = 4) -> list[int]:
    """The last feature of every reduction, the deepest ``max_levels`` of them."""
    last = {red: i for i, red in enumerate(reductions)}
    return sorted(last.values())[-max_levels:]


class FusionFPN(nn.Module):
    """FPN segmenter: a timm ``features_only`` encoder, fused top-down merges, a 1x1 classifier.

    Args:
        encoder: timm model name of the encoder (built with ``features_only=True``).
        num_classes: classes of the per-pixel output (background included).
        in_chans: input channels.
        fusion: fusion type of every top-down merge (any name of :func:`openaff.layers.fusion_names`).
        r: MS-CAM channel reduction of the merges (4, AFF.md section 3).
        levels: indices of the encoder's feature maps to merge, shallow to deep (default: the last
            map of each reduction, the deepest four).
        encoder_kwargs: extra ``timm.create_model`` keywords of the encoder (``width_mult``, ``b``,
            ``fusion`` of an AFF encoder, ``drop_path_rate``, ...).
        pretrained_encoder: load the encoder's timm weights (timm may download them; a
            ``local-dir:`` encoder reads its folder).
        upsample: ``bilinear`` (default) or ``nearest`` upsampling in the merges.
        drop_rate: dropout before the classifier.
        pad_to_stride: zero-pad inputs to a multiple of the encoder's stride (and crop the output);
            without it an input of another size is refused with a ValueError.
        inner_chs: one decoder width for every level, as Lin et al.'s FPN (256 there): a lateral
            Conv1x1(bias)-BN-ReLU brings each merged level of another width to ``inner_chs`` and every
            merge fuses at that width (None: each merge at its low level's own width, the default).
    """

    is_segmenter = True

    def __init__(self, encoder: str = "resnet50d", num_classes: int = 21, in_chans: int = 3, fusion: str = "aff",
                 r: int = 4, levels: Sequence[int] | None = None, encoder_kwargs: dict | None = None,
                 pretrained_encoder: bool = False, upsample: str = "bilinear", drop_rate: float = 0.0,
                 pad_to_stride: bool = True, inner_chs: int | None = None) -> None:
        super().__init__()
        if upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample must be bilinear or nearest, got {upsample!r}")
        check_int(num_classes, "num_classes must be a positive integer", error=ValueError)
        kwargs = dict(encoder_kwargs or {})
        try:
            self.encoder = timm.create_model(encoder, features_only=True, pretrained=pretrained_encoder,
                                             in_chans=in_chans, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"unknown encoder {encoder!r} (any timm model name with features_only support)") \
                    from None
            raise
        info = self.encoder.feature_info
        chans, reds = info.channels(), info.reduction()
        self.levels = list(levels) if levels is not None else _default_levels(reds)
        if not self.levels or sorted(set(self.levels)) != self.levels or not all(0 <= i < len(chans)
                                                                                for i in self.levels):
            raise ValueError(f"levels must be increasing indices of the encoder's {len(chans)} feature maps "
                             f"(reductions {reds}), got {levels!r}")
        self.encoder_name, self.in_chans, self.num_classes = encoder, in_chans, num_classes
        self.stride = max(reds)
        self.pad_to_stride = pad_to_stride
        used = [chans[i] for i in self.levels]
        self.reductions = [reds[i] for i in self.levels]
        self.inner_chs, self.laterals = inner_chs, None
        if inner_chs is not None:
            check_int(inner_chs, "inner_chs must be a positive number of channels", error=ValueError)
            self.laterals = nn.ModuleList(nn.Identity() if c == inner_chs else _conv_bn_relu(c, inner_chs, 1)
                                          for c in used)
            used = [inner_chs] * len(used)
        # merges[k] brings level k + 1 (already merged with everything above it) down to level k.
        self.merges = nn.ModuleList(FPNMerge(used[k + 1], used[k], fusion, r, upsample) for k in range(len(used) - 1))
        self.fusion, self.r = fusion, r
        self.drop_rate = drop_rate
        self.num_features = used[0]
        self.head = nn.Conv2d(used[0], num_classes, 1)
        for m in [*self.merges.modules(), *(self.laterals.modules() if self.laterals is not None else ()), self.head]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.encoder, "set_grad_checkpointing"):
            self.encoder.set_grad_checkpointing(enable)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = x.shape[-2:]
        s = self.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:
            if not self.pad_to_stride:
                raise ValueError(f"input {h}x{w} is not a multiple of the encoder's stride {s}; pad it (or build "
                                 "the model with pad_to_stride=True)")
            x = F.pad(x, (0, pw, 0, ph))
        return x, h, w

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The finest merged map (``num_features`` channels, at the shallowest level's reduction)."""
        feats = self.encoder(x)
        maps = [feats[i] for i in self.levels]
        if self.laterals is not None:
            maps = [lateral(m) for lateral, m in zip(self.laterals, maps, strict=True)]
        top = maps[-1]
        for k in range(len(self.merges) - 1, -1, -1):
            top = self.merges[k](top, maps[k])
        return top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_chans)
        x, h, w = self._pad(x)
        y = self.forward_features(x)
        if self.drop_rate:
            y = F.dropout(y, p=float(self.drop_rate), training=self.training)
        logits = self.head(y)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def is_segmenter(model: nn.Module | str) -> bool:
    """Whether a model (or a registered timm name, or a ``local-dir:`` folder) is a segmenter of this package."""
    if isinstance(model, nn.Module):
        return bool(getattr(model, "is_segmenter", False))
    name = str(model)
    if name.startswith("local-dir:"):
        import json
        from pathlib import Path

        try:
            name = json.loads((Path(name[len("local-dir:"):]) / "config.json").read_text())["architecture"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return name in SEGMENTERS


def _cfg(input_size: tuple[int, int, int] = (3, 512, 512)) -> dict:
    return dict(url="", num_classes=21, input_size=input_size, crop_pct=1.0, interpolation="bilinear",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classifier="head", license="apache-2.0",
                paper_ids="arXiv:2009.14082")


def _build(name: str, pretrained: bool, **kwargs: Any) -> FusionFPN:
    # The architecture is the name: no weights are published (pretrained=True would be an error of timm's).
    return build_model_with_cfg(FusionFPN, name, pretrained, **kwargs)


def _small(name: str, default_fusion: str, default_b: int, pretrained: bool, **kwargs: Any) -> FusionFPN:
    """The FPN on the pre-activation ResNet-b: ``fusion``, ``b``, ``width_mult``, ``r`` and the usual keywords."""
    enc = dict(kwargs.pop("encoder_kwargs", None) or {})
    enc["b"] = kwargs.pop("b", default_b)
    for key in ("width_mult", "drop_path_rate"):
        if key in kwargs:
            enc[key] = kwargs.pop(key)
    kwargs.setdefault("fusion", default_fusion)
    return _build(name, pretrained, encoder="cifar_resnet8", encoder_kwargs=enc, **kwargs)


SEGMENTERS: dict[str, str] = {}  # registered name -> description
_CFGS: dict[str, dict] = {}
for _prefix, _fusion in _PREFIX.items():
    SEGMENTERS[f"{_prefix}fpn"] = f"FPN with {_fusion!r} merges on any timm encoder (encoder=, default resnet50d)"
    _CFGS[f"{_prefix}fpn"] = _cfg()
    for _depth in SMALL_DEPTHS:
        SEGMENTERS[f"{_prefix}fpn_cifar_resnet{_depth}"] = (
            f"FPN with {_fusion!r} merges on the pre-activation ResNet-{_depth} (b={(_depth - 2) // 6}), r=4")
        _CFGS[f"{_prefix}fpn_cifar_resnet{_depth}"] = _cfg((3, 64, 64))
# timm reads `default_cfgs` when an entry point is registered, so it must exist first.
default_cfgs = generate_default_cfgs(_CFGS)


def _register(name: str) -> None:
    prefix = next(p for p in sorted(_PREFIX, key=len, reverse=True) if name.startswith(p))
    fusion = _PREFIX[prefix]
    small = name.rsplit("_", 1)[-1].startswith("resnet")
    if small:
        b = (int(name.rsplit("resnet", 1)[1]) - 2) // 6

        def entry(pretrained: bool = False, **kwargs: Any) -> FusionFPN:
            return _small(name, fusion, b, pretrained, **kwargs)
    else:
        def entry(pretrained: bool = False, **kwargs: Any) -> FusionFPN:
            kwargs.setdefault("fusion", fusion)
            return _build(name, pretrained, **kwargs)

    # Sixteen entry points that differ only in numbers: made in a loop, each an ordinary timm entry point.
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = SEGMENTERS[name]
    entry.__module__ = __name__
    globals()[name] = register_model(entry)


for _name in SEGMENTERS:
    _register(_name)


def fusion_share(model: FusionFPN) -> tuple[int, int, float]:
    """``(parameters, parameters of the merges' fusion modules, their share in %)`` of a segmenter (trainable ones)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fused = sum(p.numel() for m in model.merges for p in m.fuse.parameters() if p.requires_grad)
    return total, fused, round(100 * fused / total, 2)


def create_segmenter(name: str = "aff_fpn", encoder: str | None = None, num_classes: int = 21, **kwargs: Any
                     ) -> FusionFPN:
    """Build a segmenter: ``create_segmenter("aff_fpn", encoder="aff_resnet50", num_classes=21)``.

    Args:
        name: ``fpn``, ``aff_fpn``, ``iaff_fpn`` (any ``encoder``) or a registered small model such as
            ``aff_fpn_cifar_resnet20`` (see :data:`SEGMENTERS`).
        encoder: timm encoder name (the generic names only; default ``resnet50d``).
        num_classes: output classes, background included.
        **kwargs: ``fusion=`` (any fusion type), ``r=``, ``in_chans=``, ``levels=``, ``encoder_kwargs=``,
            ``upsample=``, ``drop_rate=``; the small models also ``b=`` and ``width_mult=``.

    Raises:
        ValueError: an unknown name, encoder or fusion type, or bad levels.
    """
    if name not in SEGMENTERS:
        import difflib

        near = difflib.get_close_matches(str(name), list(SEGMENTERS), n=3)
        raise ValueError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}"
                         + (f" (did you mean {' or '.join(near)}?)" if near else ""))
    if encoder is not None:
        if "cifar_resnet" in name:
            raise ValueError(f"{name} has its own encoder (the pre-activation ResNet-b); use fpn, aff_fpn or "
                             f"iaff_fpn with encoder={encoder!r}")
        kwargs["encoder"] = encoder
    return timm.create_model(name, num_classes=num_classes, **kwargs)
