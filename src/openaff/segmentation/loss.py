"""The segmentation loss: cross-entropy per labelled pixel of the *global* batch, also under DDP.

``nn.CrossEntropyLoss(ignore_index=255)`` divides by the labelled pixels of its own batch. Under DDP
every process does that with its own count and DDP then averages the gradients over processes, so
a process whose images hold fewer labelled pixels (VOC borders, padding of smaller images) weighs
each of its pixels more: the result is not the mean over the global batch that one process would
compute. This loss divides the summed cross-entropy by the labelled pixels of all processes
(all-reduced, no gradient) and multiplies by the number of processes, which DDP's averaging
removes again; in a single process it is the plain mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .metrics import IGNORE_INDEX

__all__ = ["PixelCrossEntropy"]


class PixelCrossEntropy(nn.Module):
    """Mean cross-entropy over the labelled pixels of the whole (all-process) batch.

    Args:
        ignore_index: target value that counts nowhere (VOC's 255).
        label_smoothing: as in :class:`torch.nn.CrossEntropyLoss`.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum",
                                label_smoothing=self.label_smoothing)
        count = (target != self.ignore_index).sum().to(total.dtype)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            count = count.detach().clone()
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return total / count.clamp(min=1)
