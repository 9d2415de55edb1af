"""MS-CAM: the multi-scale channel attention module of Attentional Feature Fusion.

``M(X) = sigmoid(L(X) + G(X))`` where ``L`` (local context, every pixel) and ``G`` (global
context, after global average pooling) are each ``Conv1x1(C->C/r, bias) -> BN -> ReLU ->
Conv1x1(C/r->C, bias) -> BN`` with their own weights. The global term is ``B x C x 1 x 1`` and
broadcasts over ``H x W``.

The ``nn.Sequential`` indices of the two branches follow the authors' Gluon code
(``local_att.0/1/3/4``, ``global_att.1/2/4/5``) so that their weight files map one to one.

Speed: the fusion modules call :meth:`MSCAM.logits` and blend with the fused ops of
:mod:`openaff.layers.fused_ops`, so the sigmoid and the blend never materialise term by term;
:func:`openaff.inference.fuse_for_inference` folds the branches' BatchNorms into their convolutions.
Every op keeps the input's memory format (channels_last stays channels_last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fused_ops import attention_weight, is_recomputing

__all__ = ["MSCAM", "ContextBatchNorm2d"]


class ContextBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that stays defined when a training batch holds one value per channel.

    The global branch of MS-CAM normalises a ``B x C x 1 x 1`` tensor, so a training batch of
    one gives a single value per channel and batch statistics do not exist (PyTorch raises
    "Expected more than 1 value per channel"). In that case this layer normalises with its
    running statistics, exactly as in evaluation, and leaves them unchanged; gradients still
    flow to the input, gamma and beta. With two or more values per channel it is a plain
    ``nn.BatchNorm2d``.

    When a fusion module recomputes its forward pass for the backward pass (see
    :func:`openaff.layers.fused_ops.set_fusion_recompute`), the recomputation normalises with the
    same batch statistics but leaves the running statistics alone: they were updated once, in the
    forward pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if self.training and self.track_running_stats and not torch.compiler.is_compiling() and is_recomputing():
            # Throw-away copies: the same kernel (and saved tensors, which checkpoint checks) as the
            # forward pass, without a second update of the real running statistics.
            return F.batch_norm(x, self.running_mean.clone(), self.running_var.clone(), self.weight, self.bias,
                                True, self.momentum if self.momentum is not None else 0.0, self.eps)
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

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two branches before the sigmoid: ``(L(x), G(x))``, ``B x C x H x W`` and ``B x C x 1 x 1``.

        ``M(x) = sigmoid(L(x) + G(x))``; the fusion modules fuse that sum and sigmoid into their blend.
        """
        glob = self._global_eval(x) if not (torch.is_grad_enabled() or self.global_att.training) else None
        return self.local_att(x), self.global_att(x) if glob is None else glob

    def _global_eval(self, x: torch.Tensor) -> torch.Tensor | None:
        """The global branch in evaluation without autograd, on ``B x C`` matrices; None if not applicable.

        The branch works on a ``B x C x 1 x 1`` map, where a 1x1 convolution is a matrix product:
        ``F.linear`` skips the convolution set-up, which costs more than the arithmetic here. The
        same modules, parameters and statistics; skipped when a hook watches the branch.
        """
        mods = list(self.global_att)
        if any(m._forward_hooks or m._forward_pre_hooks for m in [self.global_att, *mods]):
            return None
        if not (isinstance(mods[0], nn.AdaptiveAvgPool2d) and mods[0].output_size in (1, (1, 1))):
            return None
        p = x.mean((2, 3))
        for m in mods[1:]:
            if type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.padding == (0, 0) and m.groups == 1:
                p = F.linear(p, m.weight.flatten(1), m.bias)
            elif isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                p = F.batch_norm(p, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            elif isinstance(m, nn.ReLU):
                p = torch.relu_(p)
            elif not isinstance(m, nn.Identity):
                return None
        return p[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attention_weight(*self.logits(x))
