"""MS-CAM as an attention layer on one tensor: ``x · M(x)``, SE-style, for any network's blocks.

``MSCAMAttention(channels)`` returns ``x * sigmoid(L(x) + G(x))`` with the MS-CAM of AFF.md section 1 (local and
global bottleneck branches, ``C // r`` inner channels). It takes what timm's attention slots pass, so the class
itself is an ``attn_layer`` / ``se_layer``::

    timm.create_model("resnet50d", block_args=dict(attn_layer=MSCAMAttention))   # ResNet, Res2Net, ...
    timm.create_model("efficientnet_b0", se_layer=MSCAMAttention)                # EfficientNet / MobileNet

``rd_ratio`` (timm's name, ``1 / r``) and ``act_layer`` are accepted for those slots; the MS-CAM's bottleneck
activation is ReLU by definition, so ``act_layer`` is not used. A different ``r``:
``functools.partial(MSCAMAttention, r=4)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .mscam import MSCAM, check_dims, shape_name
from .tracing import is_traced

__all__ = ["MSCAMAttention"]


class MSCAMAttention(nn.Module):
    """``x · M(x)``: multi-scale channel attention on one input (the MS-CAM of AFF, used like SE).

    Weights: ``mscam.local_att.*``, ``mscam.global_att.*`` (as every MS-CAM). Batch-of-one training, the
    on-the-fly BatchNorm folding in evaluation, FX, TorchScript, ``torch.compile`` and ``torch.export`` are the
    MS-CAM's.

    Args:
        channels: channels of the input.
        r: channel reduction, ``C // r`` inner channels (default 16, the ImageNet models' and SE's).
        rd_ratio: timm's spelling of ``1 / r``, used when ``r`` is not given (timm's EfficientNet passes its own
            to every attention, so ``functools.partial(MSCAMAttention, r=4)`` keeps ``r = 4`` there).
        dims: spatial rank of the input (1, 2 or 3).
        act_layer: accepted for timm's slots, not used (the MS-CAM's activation is ReLU).
        device: device of the parameters (timm's factory keyword).
        dtype: dtype of the parameters (timm's factory keyword).
    """

    def __init__(self, channels: int, r: int | None = None, *, rd_ratio: float | None = None, dims: int = 2,
                 act_layer: Any = None, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        if r is None and rd_ratio is not None:
            if not rd_ratio > 0:
                raise ValueError(f"MSCAMAttention: rd_ratio must be positive, got {rd_ratio!r}")
            r = max(1, round(1 / rd_ratio))
        self.channels = channels
        self.dims = check_dims(dims, "MSCAMAttention")
        self.mscam = MSCAM(channels, 16 if r is None else r, dims=dims)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not is_traced(x):
            if x.dim() != self.dims + 2 or x.shape[1] != self.channels:
                raise ValueError(f"MSCAMAttention expects {shape_name(self.dims, self.channels)} inputs, got "
                                 f"{tuple(x.shape)}")
        return x * self.mscam(x)
