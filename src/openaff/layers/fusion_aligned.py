"""Inputs of different widths and sizes: project to a common width, resize to the finest map, then fuse.

The authors' answer to "how do I fuse maps with different channels or sizes" is a 1x1 convolution with
BatchNorm to a common width and a resize to the finer map; :class:`AlignedFusion` is that recipe around
any fusion module (two or k inputs), and the FPN merge of :mod:`openaff.segmentation.fpn` is one::

    fuse = create_fusion("aff", 64, 4, in_channels=(128, 64), resize="bilinear")
    out = fuse(x, y)   # x: B x 128 x 8 x 8, y: B x 64 x 16 x 16 -> B x 64 x 16 x 16

* An input whose channels differ from ``channels`` gets a :class:`Projection`, ``Conv1x1(bias) -> BN``
  (``-> ReLU`` with ``relu=True``, the FPN's); the others pass as they are.
* Every input is resized to the size of the finest one (most positions; the first of equals), or of input
  ``size_from``: ``nearest`` or ``bilinear`` (``linear`` / ``trilinear`` in 1-D / 3-D), ``align_corners=False``.
  An input of that size already is not touched.
* By default an input is projected, then resized (cheaper for a coarse, wide map); ``resize_first=True``
  resizes first (the FPN's order).

Weight names: the projection of the first input is ``project``, of input ``i`` (from 2) ``project{i}``; the
fusion is ``fuse``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import is_integer
from .mscam import CONTEXT_BATCH_NORMS, CONVS, check_dims, shape_name
from .tracing import is_traced

__all__ = ["RESIZE_MODES", "AlignedFusion", "Projection"]

RESIZE_MODES = ("nearest", "bilinear")
_LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


class Projection(nn.Sequential):
    """``Conv1x1(bias) -> BN [-> ReLU]`` of rank ``dims``: an input's projection to the fusion's width.

    Indices ``0`` (conv), ``1`` (BN), ``2`` (ReLU) are the weight names. The bias before the BN follows the
    authors' long-skip code (AFF.md 4b).

    Args:
        in_channels: channels of the input.
        out_channels: channels after the projection.
        dims: spatial rank (1, 2 or 3).
        relu: end in a ReLU.
        norm_layer: the BatchNorm class (default :class:`~openaff.layers.mscam.ContextBatchNorm2d` of the rank,
            which also trains on one value per channel).
    """

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2, relu: bool = False,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        norm = norm_layer or CONTEXT_BATCH_NORMS[check_dims(dims, "Projection")]
        layers: list[nn.Module] = [CONVS[dims](in_channels, out_channels, 1, bias=True), norm(out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


@torch.fx.wrap
def _finest_size(xs: tuple[torch.Tensor, ...]) -> list[int]:
    # A leaf of FX graphs (sizes are only known when the graph runs).
    best = max(range(len(xs)), key=lambda i: (xs[i].shape[2:].numel(), -i))
    return list(xs[best].shape[2:])


@torch.fx.wrap
def _resized(t: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    if list(t.shape[2:]) == list(size):
        return t
    return F.interpolate(t, size=list(size), mode=mode, align_corners=None if mode == "nearest" else False)


class AlignedFusion(nn.Module):
    """A fusion of inputs with other channels and sizes: :class:`Projection` to ``channels``, resize, fuse.

    ``create_fusion(name, C, r, in_channels=(...), resize=...)`` builds one around ``create_fusion(name, C, r)``.

    Args:
        fusion: the fusion module (takes ``len(in_channels)`` inputs of ``channels`` channels).
        channels: the fusion's width, and the output's.
        in_channels: channels of each input.
        resize: ``"nearest"`` or ``"bilinear"`` (linear / trilinear in the other ranks).
        dims: spatial rank of the inputs (1, 2 or 3).
        resize_first: resize, then project (default: project, then resize).
        relu: the projections end in a ReLU.
        size_from: resize to the size of this input (default: the finest input's).
        norm_layer: BatchNorm class of the projections (default: the rank's ``ContextBatchNorm``).
    """

    def __init__(self, fusion: nn.Module, channels: int, in_channels: Sequence[int], *, resize: str = "nearest",
                 dims: int = 2, resize_first: bool = False, relu: bool = False, size_from: int | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        check_dims(dims, "AlignedFusion")
        in_channels = tuple(in_channels)
        if len(in_channels) < 2 or not all(is_integer(c) and c >= 1 for c in in_channels):
            raise ValueError(f"AlignedFusion: in_channels must be two or more positive integers, got {in_channels!r}")
        if resize not in (*RESIZE_MODES, "linear", "trilinear"):
            raise ValueError(f"AlignedFusion: resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        if size_from is not None and not 0 <= size_from < len(in_channels):
            raise ValueError(f"AlignedFusion: size_from must index one of the {len(in_channels)} inputs, "
                             f"got {size_from!r}")
        self.channels, self.in_channels, self.dims = channels, in_channels, dims
        self.resize, self.resize_first, self.size_from = resize, resize_first, size_from
        self._mode = "nearest" if resize == "nearest" else _LINEAR[dims]
        self._names: list[str] = []
        for i, c in enumerate(in_channels):
            name = "project" if i == 0 else f"project{i + 1}"
            if c != channels:
                self.add_module(name, Projection(c, channels, dims, relu, norm_layer))
            self._names.append(name)
        self.fuse = fusion

    def _check(self, xs: tuple[torch.Tensor, ...]) -> None:
        if len(xs) != len(self.in_channels):
            raise ValueError(f"AlignedFusion was built for {len(self.in_channels)} inputs (in_channels="
                             f"{self.in_channels}), got {len(xs)}")
        for i, (t, c) in enumerate(zip(xs, self.in_channels, strict=True)):
            if t.dim() != self.dims + 2 or t.shape[1] != c:
                raise ValueError(f"AlignedFusion input {i + 1} must be {shape_name(self.dims, c)} (in_channels="
                                 f"{self.in_channels}, dims={self.dims}), got {tuple(t.shape)}")

    def align(self, xs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """The inputs projected to ``channels`` and resized to one size (what :attr:`fuse` receives)."""
        if not (xs and is_traced(xs[0])):
            self._check(xs)
        size = _finest_size(xs) if self.size_from is None else xs[self.size_from].shape[2:]
        out = []
        for t, name in zip(xs, self._names, strict=True):
            proj = self._modules.get(name)
            if self.resize_first:
                t = _resized(t, size, self._mode)
            if proj is not None:
                t = proj(t)
            if not self.resize_first:
                t = _resized(t, size, self._mode)
            out.append(t)
        return out

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fuse(*self.align(xs))
