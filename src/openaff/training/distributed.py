"""Process-group set-up for ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs) and SyncBN on both.

``torchrun --nproc_per_node=N -m openaff train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous address; without them training runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..layers.mscam import _ContextBatchNorm
from ..layers.sync_batchnorm import convert_sync_batchnorm as convert_context_sync_batchnorm
from ..layers.sync_batchnorm import synchronised_batch_norm

__all__ = ["CpuSyncBatchNorm", "DistInfo", "all_reduce_sum", "cleanup", "convert_sync_batchnorm", "setup"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Pick the device and, under torchrun, join the process group.

    Args:
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device, local) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the batches of all processes, for gloo/CPU.

    ``nn.SyncBatchNorm`` runs only on accelerators. This version all-reduces the per-channel
    count, sum and centred sum of squares with a differentiable all-reduce
    (:func:`openaff.layers.sync_batchnorm.synchronised_batch_norm`), so gradients flow through the
    statistics across processes as they do in ``nn.SyncBatchNorm``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        return synchronised_batch_norm(self, x)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """The MS-CAMs' BatchNorms to :class:`~openaff.layers.ContextSyncBatchNorm` (batch-of-one training and the
    folding kept: :func:`openaff.layers.convert_sync_batchnorm`), the others to ``nn.SyncBatchNorm`` on accelerators
    and :class:`CpuSyncBatchNorm` on the CPU (weights and statistics kept)."""
    if device.type != "cpu":
        return convert_context_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, _ContextBatchNorm):
            setattr(model, name, convert_context_sync_batchnorm(child))
        elif isinstance(child, nn.BatchNorm2d) and not isinstance(child, CpuSyncBatchNorm):
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            setattr(model, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return model
