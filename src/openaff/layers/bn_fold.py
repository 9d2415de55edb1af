"""The per-channel affine map of an evaluation-mode BatchNorm after a convolution, for folding.

``BN(conv(x) + b) = scale · conv(x) + shift``: the one formula behind both the on-the-fly folding
of the MS-CAM branches (:mod:`openaff.layers.mscam`) and :func:`openaff.inference.fold_conv_bn`.
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scale_shift(bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` with ``BN(z + conv_bias) = scale · z + shift`` per channel (running statistics).

    Args:
        bn: a BatchNorm with running statistics.
        conv_bias: the bias of the convolution before ``bn``, or None.
        dtype: compute in this dtype (e.g. float64 for weights folded once); default the statistics'.
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    scale = torch.rsqrt(cast(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = cast(bn.weight) * scale
    shift = -cast(bn.running_mean) if conv_bias is None else cast(conv_bias) - cast(bn.running_mean)
    shift = shift * scale
    if bn.bias is not None:
        shift = shift + cast(bn.bias)
    return scale, shift
