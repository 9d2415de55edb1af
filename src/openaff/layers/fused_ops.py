"""Fused element-wise tails of the attention fusions, and the recompute switch for training memory.

An MS-CAM ends in ``w = sigmoid(L + G)`` (``L``: ``B x C x H x W`` local branch, ``G``:
``B x C x 1 x 1`` global branch) and AFF/iAFF then blend ``scale * (w * x + (1 - w) * y)``. Written
out term by term, that expression allocates six full-size tensors in the forward pass and autograd
keeps four of them (``2x``, ``w``, ``2y``, ``1 - w``) for the backward pass. Here:

* :func:`attention_weight` computes ``sigmoid(L + G)`` into one fresh buffer;
* :func:`attention_blend` computes ``scale * lerp(y, x, sigmoid(L + G))`` (``lerp(y, x, w) =
  y + w * (x - y)``, one kernel) and, when gradients are needed, goes through an autograd Function
  that saves only its inputs ``x``, ``y`` (usually alive anyway: the shortcut is the block input),
  ``L`` and ``G``, and forms ``w``, ``x - y`` and ``w * (1 - w)`` again in the backward pass.

Both are plain PyTorch ops, so they run on any device and dtype (float64 included) and
``torch.compile`` traces the Function and fuses its forward and backward into single kernels.
An eager model can get those fused kernels too: ``set_fusion_kernels("compiled")`` compiles just
the blend (forward and backward, a few element-wise kernels instead of about fifteen) on CUDA
tensors; with ``"eager"`` (the default) nothing is compiled.

:func:`recompute_context` and :func:`is_recomputing` let the fusion modules recompute their
attention in the backward pass (``torch.utils.checkpoint``) without BatchNorm updating its running
statistics a second time; see :class:`openaff.layers.mscam.ContextBatchNorm2d`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = [
    "attention_blend",
    "attention_weight",
    "broadcast_operand",
    "fusion_kernels",
    "fusion_recompute",
    "is_recomputing",
    "recompute_context",
    "set_fusion_kernels",
    "set_fusion_recompute",
    "weighted_blend",
]


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def broadcast_operand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` ready to broadcast against ``like``: a ``B x C x 1 x 1`` tensor widened to ``B x C x 1 x W``.

    For a channels_last ``like`` with few channels in a 2-byte dtype, PyTorch's CPU kernels broadcast
    a ``B x C x 1 x 1`` operand with an inner loop of only ``C`` elements, too short for a vector
    register, and fall back to a scalar loop: ``L + G`` at 16 channels in bf16 took 9.5 ms against
    1 ms without the broadcast (batch 128, 48 x 48, 2 threads). Widened over ``W`` (a small copy),
    the two operands share runs of ``W x C`` contiguous elements and the vector loop is back
    (1.2 ms). Anything else is returned as it is.

    Args:
        t: the operand that broadcasts, e.g. the global branch's ``B x C x 1 x 1`` logits.
        like: the full-size tensor it meets, ``B x C x H x W``.
    """
    if (t.dim() == 4 and like.dim() == 4 and t.shape[2] == 1 and t.shape[3] == 1 and like.shape[3] > 1
            and like.shape[1] * like.element_size() < 64 and not like.is_contiguous()
            and like.is_contiguous(memory_format=torch.channels_last)):
        return t.expand(t.shape[0], t.shape[1], 1, like.shape[3]).contiguous(memory_format=torch.channels_last)
    return t


def attention_weight(local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """``sigmoid(local + glob)`` with one full-size allocation (the sigmoid runs in place).

    Args:
        local: the local-branch logits, ``B x C x H x W``.
        glob: the global-branch logits, broadcastable to ``local`` (``B x C x 1 x 1``).
    """
    # In place on the fresh sum: autograd's sigmoid_ saves only its result, like sigmoid.
    return (local + broadcast_operand(glob, local)).sigmoid_()


class _AttentionBlend(torch.autograd.Function):
    """``scale * lerp(y, x, sigmoid(local + glob))`` saving only its inputs.

    The backward pass forms ``w`` again from ``local + glob`` (one cheap element-wise op) instead of
    keeping it: the memory is the same (``local`` instead of ``w``), and because the backward pass
    is made of differentiable ops of the saved inputs, second derivatives are right too.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, local: torch.Tensor, glob: torch.Tensor,
                scale: float) -> torch.Tensor:
        # no_grad: what eager autograd already does here; torch.compile of torch 2.4 traces this
        # body with grad mode on, where lerp(out=) raises.
        with torch.no_grad():
            w = (local + broadcast_operand(glob, local)).sigmoid_()
            # Into w's memory when it is full size; two 1 x 1 logits (an all-global MS-CAM) broadcast.
            out = torch.lerp(y, x, w, out=w) if w.shape == x.shape else torch.lerp(y, x, broadcast_operand(w, x))
            if scale != 1.0:
                out.mul_(scale)
        ctx.save_for_backward(x, y, local, glob)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, local, glob = ctx.saved_tensors
        need_x, need_y, need_l, need_g, _ = ctx.needs_input_grad
        # Every line is one pass over full-size memory, which is what costs on the CPU: 7 passes
        # (8 with a scale) where the products written out took 10.
        # In place on fresh tensors: a full-size allocation costs page faults on the CPU (the sigmoid of a
        # fresh buffer took 6.5 ms, in place 3.7). Not under create_graph, where autograd needs the operands.
        create_graph = torch.is_grad_enabled()
        w = (local + broadcast_operand(glob, local)).sigmoid_()
        if w.shape != x.shape:
            w = broadcast_operand(w, x)
        g = grad_out * ctx.scale if ctx.scale != 1.0 else grad_out
        grad_x = grad_y = grad_l = grad_g = None
        if need_x or need_y:
            grad_x = g * w
            if need_y:
                grad_y = g - grad_x
        if need_l or need_g:
            # d out / d logit = scale * (x - y) * w * (1 - w): sigmoid_backward is the last two factors
            # in one kernel (and differentiable, for second derivatives).
            d = x - y
            grad_logit = torch.ops.aten.sigmoid_backward(d * g if create_graph else d.mul_(g), w)
            if need_l:
                grad_l = grad_logit.sum_to_size(local.shape)
            if need_g:
                grad_g = grad_logit.sum_to_size(glob.shape)
        return grad_x if need_x else None, grad_y, grad_l, grad_g, None


def attention_blend(x: torch.Tensor, y: torch.Tensor, local: torch.Tensor, glob: torch.Tensor,
                    scale: float = 1.0, *, inplace: bool = False) -> torch.Tensor:
    """``scale * (x * w + y * (1 - w))`` with ``w = sigmoid(local + glob)``, fused.

    Mathematically the straightforward formula; the rounding differs only in the last bits
    (``lerp`` instead of two products and a sum).

    Args:
        x: the input weighted by ``w`` (residual branch), ``B x C x H x W``.
        y: the input weighted by ``1 - w`` (shortcut), same shape as ``x``.
        local: local-branch logits, same shape as ``x``.
        glob: global-branch logits, broadcastable to ``x``.
        scale: constant factor of the result (2 for AFF, 1 for iAFF).
        inplace: when no gradient is needed, compute the result in ``local``'s memory (and return
            it): one full-size allocation fewer. For callers that own ``local`` (the fusion modules).
    """
    dtype = _common_dtype(x, y, local, glob)
    x, y, local, glob = (t if t.dtype == dtype else t.to(dtype) for t in (x, y, local, glob))
    if _needs_grad(x, y, local, glob):
        if _use_compiled(x):
            return _compiled_blend()(x, y, local, glob, float(scale))
        return _AttentionBlend.apply(x, y, local, glob, float(scale))
    # No autograd: the weight and then the result live in one buffer (lerp may write over its
    # weight: a full overlap is allowed). On the CPU every fresh full-size tensor costs page faults
    # too, so with `inplace` that buffer is `local` itself.
    if inplace and local.shape == x.shape:
        w = local.add_(broadcast_operand(glob, local)).sigmoid_()
    else:
        w = attention_weight(local, glob)
    out = torch.lerp(y, x, w, out=w) if w.shape == x.shape else torch.lerp(y, x, broadcast_operand(w, x))
    return out.mul_(scale) if scale != 1.0 else out


def weighted_blend(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * lerp(y, x, w)`` (``scale * (x * w + y * (1 - w))``) in the inputs' common dtype, with ordinary ops.

    :func:`attention_blend`'s arithmetic on a weight ``w = sigmoid(L + G)`` formed beforehand, in the same order
    (the weight, one ``lerp``, the scale), so it gives the fused blend's bits: what the fusions' ``formula``
    (FX graphs, TorchScript, ``torch.jit.trace``) computes. Scriptable, and a leaf of FX graphs.

    Args:
        x: the input weighted by ``w``.
        y: the input weighted by ``1 - w``.
        w: the weight, broadcastable to ``x``.
        scale: constant factor of the result.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), w.dtype)
    out = torch.lerp(y.to(dtype), x.to(dtype), w.to(dtype))
    if scale != 1.0:
        out = out * scale
    return out


# --- compiled blend kernels for eager models --------------------------------------------------

_KERNELS: dict = {"mode": "eager", "backend": "inductor", "devices": ("cuda",), "fn": None}


def set_fusion_kernels(mode: str, backend: str = "inductor", devices: tuple[str, ...] = ("cuda",)) -> None:
    """Choose how an eager model runs the AFF/iAFF blend when gradients are needed.

    ``"eager"`` (default): PyTorch ops. ``"compiled"``: the blend's forward and backward compiled
    once per shape with ``torch.compile(backend=backend)`` (Triton kernels on CUDA), for tensors on
    ``devices``; other tensors, and models compiled as a whole, use the eager ops.

    Args:
        mode: ``"eager"`` or ``"compiled"``.
        backend: the ``torch.compile`` backend of ``"compiled"``.
        devices: device types that use the compiled blend (tests use ``("cpu",)``).
    """
    if mode not in ("eager", "compiled"):
        raise ValueError(f"fusion kernels must be 'eager' or 'compiled', got {mode!r}")
    _KERNELS.update(mode=mode, backend=backend, devices=tuple(devices), fn=None)


def fusion_kernels() -> str:
    """The mode set by :func:`set_fusion_kernels`."""
    return _KERNELS["mode"]


def _use_compiled(x: torch.Tensor) -> bool:
    return (_KERNELS["mode"] == "compiled" and x.device.type in _KERNELS["devices"]
            and not torch.compiler.is_compiling())


def _blend(x: torch.Tensor, y: torch.Tensor, local: torch.Tensor, glob: torch.Tensor, scale: float) -> torch.Tensor:
    return _AttentionBlend.apply(x, y, local, glob, scale)


def _compiled_blend():
    if _KERNELS["fn"] is None:
        # Static shapes: a fusion module sees one shape per stage, and static kernels are the fastest.
        _KERNELS["fn"] = torch.compile(_blend, backend=_KERNELS["backend"], dynamic=False, fullgraph=True)
    return _KERNELS["fn"]


# --- recomputation in the backward pass -------------------------------------------------------

_STATE = threading.local()
_RECOMPUTE_DEFAULT = {"enabled": False}


def is_recomputing() -> bool:
    """True while a fusion module recomputes its forward pass for the backward pass (this thread)."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: marks the recomputation, not the first forward."""
    return contextlib.nullcontext(), _recomputing()


def fusion_recompute() -> bool:
    """The default of new fusion modules' ``recompute`` attribute (see :func:`set_fusion_recompute`)."""
    return _RECOMPUTE_DEFAULT["enabled"]


def set_fusion_recompute(enabled: bool, model: torch.nn.Module | None = None) -> None:
    """Trade compute for training memory in the attention fusions.

    With recomputation on, an AFF / iAFF module in training mode keeps only its two inputs for
    the backward pass and runs its MS-CAM(s) again there (about 2 % more arithmetic for an
    AFF-ResNet-50); off, it keeps the MS-CAM's activations (about three full-size tensors per
    fusion). BatchNorm running statistics are updated once either way. Under ``torch.compile``
    the region is marked for activation checkpointing, which the partitioner honours.

    Args:
        enabled: recompute or not.
        model: set the attribute on every fusion module of this model; None changes the default of
            modules built afterwards.
    """
    if model is None:
        _RECOMPUTE_DEFAULT["enabled"] = bool(enabled)
        return
    for m in model.modules():
        if hasattr(m, "recompute"):
            m.recompute = bool(enabled)
