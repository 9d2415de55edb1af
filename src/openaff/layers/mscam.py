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
Every op keeps the input's memory format (channels_last stays channels_last). Scripted and traced
models compute :meth:`MSCAM.formula` instead (see :mod:`openaff.layers.tracing`).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .bn_fold import bn_scale_shift
from .fused_ops import attention_weight, is_recomputing
from .tracing import is_tracing

__all__ = ["MSCAM", "ContextBatchNorm2d", "context_batch_norm"]


def context_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                       num_batches_tracked: torch.Tensor | None, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, training: bool, momentum: float | None,
                       eps: float) -> torch.Tensor:
    """``nn.BatchNorm2d``'s computation, with running statistics in a training batch of one value per channel.

    Args:
        x: ``B x C x H x W`` input.
        running_mean: running mean, updated in training when given (None: batch statistics only).
        running_var: running variance, as ``running_mean``.
        num_batches_tracked: counter incremented by a training pass that updates the statistics, or None.
        weight: affine scale, or None.
        bias: affine shift, or None.
        training: normalise with batch statistics (and update the running ones).
        momentum: running-average factor; None for a cumulative average.
        eps: added to the variance.
    """
    if training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training or running_mean is None, factor, eps)


class ContextBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that stays defined when a training batch holds one value per channel.

    The global branch of MS-CAM normalises a ``B x C x 1 x 1`` tensor, so a training batch of
    one gives a single value per channel and batch statistics do not exist (PyTorch raises
    "Expected more than 1 value per channel"). In that case this layer normalises with its
    running statistics, exactly as in evaluation, and leaves them unchanged; gradients still
    flow to the input, gamma and beta. With two or more values per channel it is a plain
    ``nn.BatchNorm2d`` (the same ``F.batch_norm`` call).

    Scriptable, and one ``call_module`` node for every FX tracer, as PyTorch's own BatchNorm is:
    the traced graph then follows ``train()`` / ``eval()`` and tests the batch size when it runs.

    When a fusion module recomputes its forward pass for the backward pass (see
    :func:`openaff.layers.fused_ops.set_fusion_recompute`), the recomputation normalises with the
    same batch statistics but leaves the running statistics alone: they were updated once, in the
    forward pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.training and self.track_running_stats
        if not torch.jit.is_scripting():  # a separate `if`: TorchScript then skips the block statically
            if isinstance(x, torch.fx.Proxy):
                # Being traced through (FX only treats torch.nn's own classes as leaves): record this
                # module as a leaf, so the graph calls it, in whatever mode it is in then.
                return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
            if stats and not torch.compiler.is_compiling() and is_recomputing():
                # Throw-away copies: the same kernel (and saved tensors, which checkpoint checks) as the
                # forward pass, without a second update of the real running statistics.
                return context_batch_norm(x, self.running_mean.clone(), self.running_var.clone(), None,
                                          self.weight, self.bias, True,
                                          0.0 if self.momentum is None else self.momentum, self.eps)
        return context_batch_norm(x, self.running_mean if stats or not self.training else None,
                                  self.running_var if stats or not self.training else None,
                                  self.num_batches_tracked if stats else None,
                                  self.weight, self.bias, self.training, self.momentum, self.eps)


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


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv`` followed by ``bn`` (evaluation) as one 1x1 convolution's ``(C_out x C_in, bias)``."""
    w = conv.weight.flatten(1)
    if bn is None:
        return w, conv.bias
    scale, shift = bn_scale_shift(bn, conv.bias)
    return w * scale[:, None], shift


def _branch_eval(branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor | None:
    """A context branch in evaluation without autograd, BatchNorm folded on the fly; None if not applicable.

    Folding ``Conv1x1 -> BN`` into one convolution removes the BatchNorm's full-size pass, at the
    price of a few products on ``C x C/r`` weights, and gives an unmodified model most of what
    :func:`openaff.inference.fuse_for_inference` gives it. The pooled (global) branch works on
    ``B x C`` matrices, where a 1x1 convolution is ``F.linear`` and skips the convolution set-up
    that costs more than its arithmetic. The same modules, parameters and statistics; the rounding
    differs in the last bits. Skipped (None) for any other layout and when a hook watches the branch.
    """
    mods = list(branch._modules.values())
    for m in (branch, *mods):  # a loop, not any(generator): fewer Python calls on every pass
        if m._forward_hooks or m._forward_pre_hooks:
            return None
    pooled = isinstance(mods[0], nn.AdaptiveAvgPool2d)
    if pooled:
        if mods[0].output_size not in (1, (1, 1)):
            return None
        x, mods = x.mean((2, 3)), mods[1:]
    i = 0
    while i < len(mods):
        m = mods[i]
        if type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0) \
                and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros":
            bn = mods[i + 1] if i + 1 < len(mods) else None
            bn = bn if isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and not bn.training else None
            w, b = _folded(m, bn)
            x = F.linear(x, w, b) if pooled else F.conv2d(x, w[:, :, None, None], b)
            i += 2 if bn is not None else 1
        elif isinstance(m, nn.ReLU):
            x, i = torch.relu_(x), i + 1
        elif isinstance(m, nn.Identity):
            i += 1
        else:
            return None
    return x[:, :, None, None] if pooled else x


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
        if not torch.is_grad_enabled():
            local = None if self.local_att.training else _branch_eval(self.local_att, x)
            glob = None if self.global_att.training else _branch_eval(self.global_att, x)
            return (self.local_att(x) if local is None else local,
                    self.global_att(x) if glob is None else glob)
        return self.local_att(x), self.global_att(x)

    def formula(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(L(x) + G(x))`` written out: what scripted and traced models compute."""
        return torch.sigmoid(self.local_att(x) + self.global_att(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or is_tracing():
            return self.formula(x)
        else:
            return attention_weight(*self.logits(x))
