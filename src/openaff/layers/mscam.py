"""MS-CAM: the multi-scale channel attention module of Attentional Feature Fusion.

``M(X) = sigmoid(L(X) + G(X))`` where ``L`` (local context, every pixel) and ``G`` (global
context, after global average pooling) are each ``Conv1x1(C->C/r, bias) -> BN -> ReLU ->
Conv1x1(C/r->C, bias) -> BN`` with their own weights. The global term is ``B x C x 1 x 1`` and
broadcasts over ``H x W``.

The ``nn.Sequential`` indices of the two branches follow the authors' Gluon code
(``local_att.0/1/3/4``, ``global_att.1/2/4/5``) so that their weight files map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MSCAM", "ContextBatchNorm2d"]


class ContextBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that stays defined when a training batch holds one value per channel.

    The global branch of MS-CAM normalises a ``B x C x 1 x 1`` tensor, so a training batch of
    one gives a single value per channel and batch statistics do not exist (PyTorch raises
    "Expected more than 1 value per channel"). In that case this layer normalises with its
    running statistics, exactly as in evaluation, and leaves them unchanged; gradients still
    flow to the input, gamma and beta. With two or more values per channel it is a plain
    ``nn.BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def _context_branch(channels: int, inter: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pool else []
    layers += [
        nn.Conv2d(channels, inter, 1, bias=True),
        ContextBatchNorm2d(inter),
        nn.ReLU(inplace=True),
        nn.Conv2d(inter, channels, 1, bias=True),
        ContextBatchNorm2d(channels),
    ]
    return nn.Sequential(*layers)


class MSCAM(nn.Module):
    """Multi-scale channel attention: returns the fusion weight ``M(x)`` in ``(0, 1)``.

    Args:
        channels: number of input (and output) channels ``C``.
        r: channel reduction of the bottleneck, ``C // r`` inner channels (at least 1).
    """

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        if channels < 1 or r < 1:
            raise ValueError(f"MSCAM needs channels >= 1 and r >= 1, got channels={channels}, r={r}")
        self.channels = channels
        self.r = r
        inter = max(channels // r, 1)
        self.local_att = _context_branch(channels, inter, pool=False)
        self.global_att = _context_branch(channels, inter, pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.local_att(x) + self.global_att(x))
