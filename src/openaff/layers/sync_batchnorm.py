"""SyncBatchNorm that keeps the MS-CAM's rules: :func:`convert_sync_batchnorm` and :class:`ContextSyncBatchNorm`.

``nn.SyncBatchNorm.convert_sync_batchnorm`` replaces every BatchNorm, the MS-CAMs'
:class:`~openaff.layers.mscam.ContextBatchNorm2d` included, by a plain ``nn.SyncBatchNorm``: training on one
value per channel (a process's batch of one in the global branch, outside a process group or in one of
size 1) raises again, a recomputing fusion updates the running statistics twice, and the statistics are only
synchronised on accelerators (PyTorch's kernel; gloo on the CPU raises). :func:`convert_sync_batchnorm` is a
drop-in replacement that turns the ``ContextBatchNorm1d/2d/3d`` into :class:`ContextSyncBatchNorm` and every
other BatchNorm into ``nn.SyncBatchNorm`` as PyTorch's does::

    model = openaff.convert_sync_batchnorm(model)     # before DistributedDataParallel(model)

:class:`ContextSyncBatchNorm` is not an ``nn.SyncBatchNorm`` subclass (PyTorch's DDP refuses those in CPU
modules: "SyncBatchNorm layers only work with GPU modules"); its training statistics
cover the batches of all processes of its group on any device (two differentiable all-reduces of ``C``
values: the MS-CAMs' BatchNorms are narrow, so this costs little next to PyTorch's kernel, which exists only
for accelerators); without a process group, or in a group of one, it is a ``ContextBatchNorm``. In evaluation
it uses the running statistics, and the MS-CAM folds it into its convolutions on the fly as any BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx
from torch import nn

from .fused_ops import is_recomputing
from .mscam import _ContextBatchNorm

__all__ = ["ContextSyncBatchNorm", "convert_sync_batchnorm", "synchronised_batch_norm"]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce: the gradient of a sum over processes is the sum of the gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def synchronised_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor,
                            group: dist.ProcessGroup | None = None, update_stats: bool = True) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` (any rank) with the statistics of all processes' batches.

    The per-channel count and sum, then the centred sum of squares (two passes: an accurate variance), are
    all-reduced with a differentiable all-reduce, so gradients flow through the statistics across processes
    as in ``nn.SyncBatchNorm``. Statistics in float32 for 16-bit inputs (as PyTorch's kernels).

    Args:
        bn: the BatchNorm whose parameters, running statistics, momentum and eps are used.
        x: ``B x C x ...`` input.
        group: the process group (None: the default group).
        update_stats: update the running statistics and the batch counter (off for a recomputation).
    """
    acc = torch.float32 if x.element_size() < 4 else x.dtype
    xf = x.to(acc)
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    n = torch.full((1,), x.numel() // x.shape[1], dtype=acc, device=x.device)
    stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), n]), group)
    count = stats[-1]
    mean = stats[:-1] / count
    centred = xf - mean.view(shape)
    var = _AllReduceSum.apply(centred.square().sum(dims), group) / count
    if update_stats and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            factor = bn.momentum
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
                if factor is None:
                    factor = 1.0 / float(bn.num_batches_tracked)
            factor = 0.0 if factor is None else factor
            unbiased = var * count / (count - 1).clamp(min=1)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    out = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        out = out * bn.weight.to(acc).view(shape)
    if bn.bias is not None:
        out = out + bn.bias.to(acc).view(shape)
    return out.to(x.dtype)


def _group_size(group: dist.ProcessGroup | None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class ContextSyncBatchNorm(_ContextBatchNorm):
    """``nn.SyncBatchNorm`` with :class:`~openaff.layers.mscam.ContextBatchNorm2d`'s rules, on any device.

    In training inside a process group of two or more: :func:`synchronised_batch_norm` (each process has at
    least one value per channel, so the synchronised batch has two or more); a recomputation (see
    :func:`openaff.layers.set_fusion_recompute`) normalises alike without updating the running statistics a
    second time. Otherwise (evaluation, no process group, a group of one): a ``ContextBatchNorm`` of any rank,
    which trains on one value per channel with the running statistics.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        momentum: running-average factor; None for a cumulative average.
        affine: learn a scale and a shift.
        track_running_stats: keep running statistics.
        process_group: the group whose batches are synchronised (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (B x C x ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not isinstance(x, torch.fx.Proxy) and _group_size(self.process_group) > 1:
            return synchronised_batch_norm(self, x, self.process_group, update_stats=not is_recomputing())
        return super().forward(x)

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm,
                        process_group: dist.ProcessGroup | None = None) -> ContextSyncBatchNorm:
        """A ContextSyncBatchNorm sharing ``bn``'s parameters and holding its statistics and mode."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
        if bn.affine:
            with torch.no_grad():  # the same Parameter objects, as PyTorch's conversion keeps them
                new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` that keeps the MS-CAMs' BatchNorm rules.

    Every ``ContextBatchNorm1d/2d/3d`` becomes a :class:`ContextSyncBatchNorm` (batch-of-one training,
    recompute rule, CPU/gloo synchronisation, on-the-fly folding in evaluation); every other BatchNorm what
    PyTorch's conversion makes of it. Parameters and statistics are kept.

    Args:
        module: the model (changed in place where it holds BatchNorms; returned).
        process_group: the group to synchronise over (None: the default group).

    Returns:
        ``module``, or the new module when ``module`` itself is a BatchNorm.
    """
    if isinstance(module, ContextSyncBatchNorm):
        return module
    if isinstance(module, _ContextBatchNorm):
        return ContextSyncBatchNorm.from_batch_norm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in list(module.named_children()):
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
