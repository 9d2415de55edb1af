"""Feature fusion modules and the factory that maps a short name to one.

Every module has the signature ``fuse(x, y)`` with the authors' argument order:

* ``x``: the output of the residual branch (in general: the input with the larger receptive
  field, e.g. the upsampled high-level map of an FPN);
* ``y``: the shortcut / identity (the input with the smaller receptive field).

The paper writes its equations with the identity as ``X`` and the residual as ``Y``; the
authors' block code passes the residual first. The two differ only in which input receives
``w`` and which ``1 - w``; we follow the code, so converted weights compute what they did.

Adding a fusion type takes a class with ``__init__(self, channels, r)`` and ``forward(x, y)``
decorated with ``@register_fusion("name")``; every model family picks it up by name.

Speed and memory: AFF and iAFF blend with the fused ops of :mod:`openaff.layers.fused_ops`
(``2·lerp(y, x, sigmoid(L + G))`` in one buffer; the backward pass keeps ``x``, ``y`` and the two
logits instead of the four full-size intermediates autograd keeps for the formula written out).
With ``recompute = True`` (see :func:`openaff.layers.fused_ops.set_fusion_recompute`) a module in
training mode keeps only its inputs and runs its MS-CAMs again in the backward pass.

Scripting, tracing and export: under ``torch.jit.script``, FX symbolic tracing and ``torch.jit.trace``
(the legacy ONNX exporter) every module computes its ``formula`` (the equations above with ordinary
ops; see :mod:`openaff.layers.tracing`), which gives the fast path's numbers up to rounding.
``torch.compile`` and ``torch.export`` keep the fast path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fused_ops import attention_blend, fusion_recompute, recompute_context
from .mscam import MSCAM
from .tracing import is_tracing

__all__ = [
    "AFF",
    "IAFF",
    "MSGAU",
    "MSSA",
    "MSSE",
    "AddFusion",
    "ConcatFusion",
    "create_fusion",
    "fusion_names",
    "register_fusion",
]

_FUSIONS: dict[str, type[nn.Module]] = {}


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_")


def register_fusion(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that makes a fusion module available to :func:`create_fusion` as ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        key = _canonical(name)
        if key in _FUSIONS and _FUSIONS[key] is not cls:
            raise ValueError(f"fusion type {name!r} is already registered by {_FUSIONS[key].__name__}")
        _FUSIONS[key] = cls
        cls.fusion_name = key
        return cls

    return wrap


def fusion_names() -> list[str]:
    """The names :func:`create_fusion` accepts."""
    return sorted(_FUSIONS)


def create_fusion(name: str, channels: int, r: int = 4) -> nn.Module:
    """Build a fusion module from its short name.

    Args:
        name: one of :func:`fusion_names` (``"add"``, ``"aff"``, ``"iaff"``, ...), case-insensitive.
        channels: channels of both inputs (and of the output).
        r: channel reduction of the MS-CAMs inside (ignored by fusions without attention).
    """
    cls = _FUSIONS.get(_canonical(name)) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown fusion type {name!r}; choose one of {', '.join(fusion_names())}")
    return cls(channels, r)


def _check_pair(x: torch.Tensor, y: torch.Tensor, channels: int) -> None:
    # One shape read on the good path: this runs in every fusion of every eager forward pass.
    shape = x.shape
    if shape != y.shape or len(shape) != 4 or shape[1] != channels:
        _bad_pair(x, y, channels)


def _bad_pair(x: torch.Tensor, y: torch.Tensor, channels: int) -> None:
    if x.shape != y.shape:
        raise ValueError(f"fusion inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    raise ValueError(f"fusion expects B x {channels} x H x W inputs, got {tuple(x.shape)}")


def _blend(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x·w + y·(1 − w) as y + w·(x − y): one product fewer, and the gradient with respect to w is
    # g·(x − y), formed from the difference as in the fused path.
    return y + w * (x - y)


class _AttentionFusion(nn.Module):
    """Shared forward of the MS-CAM fusions: input checks, then ``_fuse`` directly or recomputed.

    ``recompute`` (default :func:`openaff.layers.fused_ops.fusion_recompute`) makes a module in
    training mode keep only its inputs for the backward pass and run ``_fuse`` again there.
    TorchScript, FX symbolic tracing and ``torch.jit.trace`` (legacy ONNX export) get
    :meth:`formula` instead: the same numbers from ordinary ops, no checks in Python.
    """

    def __init__(self, channels: int, r: int = 4, mscams: tuple[str, ...] = ("mscam",)) -> None:
        super().__init__()
        self.channels = channels
        self.recompute = fusion_recompute()
        for name in mscams:  # attribute names are weight names: the authors' files depend on them
            self.add_module(name, MSCAM(channels, r))

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The fusion's equation written out with ordinary ops (no fused kernels, no checks)."""
        return self._fuse(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # TorchScript resolves is_scripting() statically and never compiles the else branch.
        if torch.jit.is_scripting() or is_tracing():
            return self.formula(x, y)
        else:
            _check_pair(x, y, self.channels)
            if self.recompute and self.training and torch.is_grad_enabled():
                if torch.compiler.is_compiling():
                    # The compiled graph is functional: the BatchNorm buffer updates happen once, in the
                    # forward graph, whatever the partitioner recomputes, so no marker is needed (or allowed).
                    return checkpoint(self._fuse, x, y, use_reentrant=False, preserve_rng_state=False)
                return checkpoint(self._fuse, x, y, use_reentrant=False, preserve_rng_state=False,
                                  context_fn=recompute_context)
            return self._fuse(x, y)


@register_fusion("add")
class AddFusion(nn.Module):
    """Plain addition ``x + y`` (the authors' ``DirectAddFuse``); no parameters."""

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


@register_fusion("aff")
class AFF(_AttentionFusion):
    """Attentional feature fusion (the authors' ``ASKCFuse``).

    ``w = M(x + y)``; ``out = 2·x·w + 2·y·(1 − w)``.

    The factor 2 is in the authors' code, not in the paper's equation: it keeps the two weights
    summing to 2, like plain ``x + y``, and their trained weights depend on it.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction of the MS-CAM.
    """

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # 2·x·w + 2·y·(1 − w) = 2·lerp(y, x, w), with w = sigmoid(L + G) fused into the blend.
        return attention_blend(x, y, *self.mscam.logits(x + y), scale=2.0, inplace=True)

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``w = M(x + y)``; ``2·x·w + 2·y·(1 − w)``, written out as ``2·(y + w·(x − y))``."""
        w = self.mscam.formula(x + y)
        return 2 * _blend(x, y, w)


@register_fusion("iaff")
class IAFF(_AttentionFusion):
    """Iterative attentional feature fusion (the authors' ``ResGlobLocaforGlobLocaChaFuse``).

    ``w1 = M1(x + y)``; ``z = x·w1 + y·(1 − w1)``; ``w2 = M2(z)``; ``out = x·w2 + y·(1 − w2)``,
    with two independent MS-CAMs and no factor 2.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction of both MS-CAMs.
    """

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__(channels, r, ("mscam1", "mscam2"))

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = attention_blend(x, y, *self.mscam1.logits(x + y), inplace=True)
        return attention_blend(x, y, *self.mscam2.logits(z), inplace=True)

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``w1 = M1(x + y)``; ``z = x·w1 + y·(1 − w1)``; ``w2 = M2(z)``; ``x·w2 + y·(1 − w2)``, written out."""
        z = _blend(x, y, self.mscam1.formula(x + y))
        return _blend(x, y, self.mscam2.formula(z))


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """``Conv1x1([x, y])`` back to ``channels`` (paper Table 1, "Concatenation"); conv with bias."""

    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(2 * channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not is_tracing():
            _check_pair(x, y, self.channels)
        return self.conv(torch.cat([x, y], dim=1))


@register_fusion("ms_se")
class MSSE(_AttentionFusion):
    """Refinement, SENet-like (paper's MS-SE): ``y + M(x)·x``."""

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(y, self.mscam(x), x)


@register_fusion("ms_gau")
class MSGAU(_AttentionFusion):
    """Modulation, GAU-like (paper's MS-GAU): ``M(x)·y + x``."""

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, self.mscam(x), y)


@register_fusion("ms_sa")
class MSSA(_AttentionFusion):
    """Modulation, fully context-aware (paper's MS-SA): ``M(x + y)·y + x``."""

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, self.mscam(x + y), y)
