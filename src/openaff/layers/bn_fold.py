"""The per-channel affine map of an evaluation-mode BatchNorm after a convolution, for folding.

``BN(conv(x) + b) = scale · conv(x) + shift``: the one formula behind both the on-the-fly folding
of the MS-CAM branches (:mod:`openaff.layers.mscam`) and :func:`openaff.folding.fold_conv_bn`.
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
    # Written out rather than through a cast helper: the MS-CAMs fold on the fly in every
    # evaluation pass, where each Python call counts.
    mean, var, weight, bias = bn.running_mean, bn.running_var, bn.weight, bn.bias
    if dtype is not None:
        mean, var = mean.to(dtype), var.to(dtype)
        weight = None if weight is None else weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        conv_bias = None if conv_bias is None else conv_bias.to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if weight is not None:
        scale = weight * scale
    shift = (-mean if conv_bias is None else conv_bias - mean) * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift
