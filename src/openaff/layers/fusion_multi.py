"""More than two inputs: ``fuse(x1, ..., xk)`` for AFF and iAFF, a soft selection over k inputs (ours).

The paper and the authors' code fuse two inputs. This is our generalisation, in the SK-Net manner: one
MS-CAM of the inputs' sum gives ``k - 1`` logit maps (its last convolutions are ``(k - 1) x C`` wide),
the last input's logit is 0, and a softmax over the k inputs, at every position and channel, gives the
weights:

    s = L(x1 + ... + xk) + G(x1 + ... + xk)           (B x (k-1)C x ..., read as k - 1 maps s_1 .. s_{k-1})
    p = softmax_i(s_1, ..., s_{k-1}, 0)               (over the k inputs)
    AFF:  out = k · (p_1·x1 + ... + p_k·xk)
    iAFF: z = p·x (no factor) with p from M1(x1 + ... + xk); out = p'·x with p' from M2(z)

The factor k is AFF's factor 2 for k inputs: the weights sum to k, like a plain ``x1 + ... + xk``. For
``k = 2`` this is exactly today's AFF and iAFF: ``softmax(s, 0) = (sigmoid(s), 1 - sigmoid(s))``, the MS-CAMs
are the two-input ones (same weight names and shapes), and ``out = 2·x·w + 2·y·(1 − w)`` (tested). In the
same-layer scenario the two-input modules give the weight to ``y`` and have no factor 2; here the first input
is then the one with logit 0 and the factor is 1, so ``k = 2`` is that module too.

Other fusion types have no k-input form: ``create_fusion(name, C, r, inputs=k)`` says so in one line.
TorchScript cannot compile a ``forward(*inputs)``; FX (the same bits as eager), ``torch.jit.trace``,
``torch.compile`` and ``torch.export`` work as for the two-input modules.
"""

from __future__ import annotations

import functools
import operator

import torch

from ..errors import check_int
from .fusion import MULTI_INPUT, _AttentionFusion, bad_inputs, check_scenario
from .tracing import is_traced

__all__ = ["MultiInputAFF", "MultiInputIAFF", "soft_select"]


def soft_select(logits: torch.Tensor, inputs: tuple[torch.Tensor, ...], scale: float = 1.0,
                reference_first: bool = False) -> torch.Tensor:
    """``scale · Σ_i p_i·x_i`` with ``p = softmax`` over the k inputs of ``(s_1, ..., s_{k-1}, 0)``.

    Args:
        logits: ``B x (k-1)C x ...`` maps (``s_i`` is channels ``(i-1)C .. iC``), or broadcastable to that.
        inputs: the k inputs, each ``B x C x ...``.
        scale: factor of the result (k for AFF, 1 for iAFF).
        reference_first: the first input has logit 0 instead of the last (the same-layer scenario).
    """
    k = len(inputs)
    s = logits.unflatten(1, (k - 1, inputs[0].shape[1]))
    zero = torch.zeros_like(s[:, :1])
    p = torch.softmax(torch.cat([zero, s] if reference_first else [s, zero], 1), 1)
    out = (p * torch.stack(inputs, 1)).sum(1)
    return out * scale if scale != 1.0 else out


class _MultiInputSoftSelection(_AttentionFusion):
    """The k-input AFF / iAFF: MS-CAMs with ``(k - 1) x C`` attention channels and a softmax over the inputs.

    Args:
        channels: channels of every input.
        r: channel reduction of the MS-CAM(s).
        inputs: the number of inputs k (at least 2; 2 is the two-input module's computation).
        scenario: one of :data:`~openaff.layers.fusion.FUSION_SCENARIOS`.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    _mscams: tuple[str, ...] = ("mscam",)

    def __init__(self, channels: int, r: int = 4, *, inputs: int = 3, scenario: str = "short-skip",
                 dims: int = 2) -> None:
        check_int(inputs, f"{self.fusion_name}: inputs must be an integer >= 2", lo=2, error=ValueError)
        same = check_scenario(scenario, self.fusion_name) == "same-layer"
        super().__init__(channels, r, scenario, self._mscams, dims, branches=("local", "global"),
                         layers="single" if same else "bottleneck", out_channels=(inputs - 1) * channels)
        self.inputs = inputs
        self.same_layer = same

    def _select(self, logits: tuple[torch.Tensor, torch.Tensor], xs: tuple[torch.Tensor, ...],
                scale: float) -> torch.Tensor:
        return soft_select(logits[0] + logits[1], xs, scale, self.same_layer)

    def formula(self, *xs: torch.Tensor) -> torch.Tensor:
        """:meth:`_fuse` itself: ordinary ops throughout (under FX the MS-CAM branches are leaves), no checks."""
        return self._fuse(*xs)

    def _fuse(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if xs and is_traced(xs[0]):
            return self.formula(*xs)
        if len(xs) != self.inputs:
            raise ValueError(f"{type(self).__name__} was built for {self.inputs} inputs, got {len(xs)}; build it with "
                             f"create_fusion({self.fusion_name!r}, {self.channels}, r, inputs={len(xs)})")
        shape = xs[0].shape
        if len(shape) != self._ndim or shape[1] != self.channels or any(t.shape != shape for t in xs[1:]):
            bad_inputs(xs, self.channels, self.dims)
        if self.recompute and self.training and torch.is_grad_enabled():
            return self._recomputed(*xs)
        return self._fuse(*xs)


class MultiInputAFF(_MultiInputSoftSelection):
    """AFF over k inputs (ours): ``out = k · Σ_i softmax_i(s_1, ..., s_{k-1}, 0)·x_i``, ``s = L + G`` of ``Σ x_i``.

    Built by ``create_fusion("aff", C, r, inputs=k)``; see :mod:`openaff.layers.fusion_multi` for the formula.
    With ``inputs=2`` it loads a two-input :class:`~openaff.layers.fusion.AFF`'s state_dict and gives its
    outputs. Same layer: the first input has logit 0 and there is no factor k (as the two-input module).
    Weights: ``mscam.*`` as AFF's, the last convolution of each branch ``(k - 1)·C`` wide.
    """

    fusion_name = "aff"

    def _fuse(self, *xs: torch.Tensor) -> torch.Tensor:
        total = functools.reduce(operator.add, xs)
        return self._select(self.mscam.logits(total), xs, 1.0 if self.same_layer else float(len(xs)))


class MultiInputIAFF(_MultiInputSoftSelection):
    """iAFF over k inputs (ours): ``z = Σ_i p_i·x_i`` with ``p`` from ``M1(Σ x_i)``; ``out = Σ_i p'_i·x_i``, ``p'``
    from ``M2(z)``; each ``p`` a softmax over the inputs of ``(s_1, ..., s_{k-1}, 0)``, no factor.

    Built by ``create_fusion("iaff", C, r, inputs=k)``; ``inputs=2`` is :class:`~openaff.layers.fusion.IAFF`
    (same state_dict, same outputs). Weights: ``mscam1.*``, ``mscam2.*``.
    """

    fusion_name = "iaff"
    _mscams = ("mscam1", "mscam2")

    def _fuse(self, *xs: torch.Tensor) -> torch.Tensor:
        total = functools.reduce(operator.add, xs)
        z = self._select(self.mscam1.logits(total), xs, 1.0)
        return self._select(self.mscam2.logits(z), xs, 1.0)


MULTI_INPUT.update(aff=MultiInputAFF, iaff=MultiInputIAFF)
