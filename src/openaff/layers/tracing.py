"""How the fusion layers meet the tools that record a model's operations instead of running them.

Eager PyTorch, ``torch.compile`` and ``torch.export`` run the fast path: the fused blend (an autograd
Function), BatchNorm folded on the fly, in-place ops, input checks in Python. The other tools:

* **FX symbolic tracing** (``torch.fx.symbolic_trace``, timm's and torchvision's feature extraction,
  ``features_only=True, feature_cls="fx"``): every MS-CAM context branch (``local_att``, ``global_att``,
  ``fuse_att``) and every :class:`~openaff.layers.mscam.ContextBatchNorm2d` is one ``call_module`` node, a
  leaf for any tracer (:func:`fx_leaf`), so the graph runs the very code eager runs there (the on-the-fly
  folding in evaluation without autograd, the batch-of-one rule and the channels_last kernels in training),
  decided when the graph runs. Around them the fusions record their ``formula``: the fast path's
  arithmetic written with ordinary ops (``sigmoid(L + G)``, ``scale · lerp(y, x, w)``, in the fast path's
  order), which gives the same bits. So a traced graph's outputs equal the eager model's bit for bit, in
  evaluation and in training; the MS-CAM weights are nodes of their own (``layer4.0.fusion.sigmoid``) for
  feature extraction; the graph follows ``train()`` / ``eval()`` and scripts with ``torch.jit.script``.
  FX is recognised by its ``torch.fx.Proxy`` arguments, a public type; no private flags.
* **TorchScript** (``torch.jit.script``): tested with ``torch.jit.is_scripting()`` at the call site,
  which the TorchScript compiler resolves statically, so it never compiles the eager branch. It computes
  the same formulas with the branches unfolded: the fused blend is an autograd Function (a Python op
  TorchScript can neither compile nor save) and the folding code is not scriptable.
* ``torch.jit.trace``, which the legacy (TorchScript-based) ONNX exporter uses: the same, because the
  folded branches (weights formed from the BatchNorm statistics as the model runs) would be frozen into the
  trace as constants, and the autograd Function would leave a Python op ONNX cannot export.
"""

import torch
import torch.fx
from torch import nn

__all__ = ["fx_leaf", "is_traced", "is_tracing"]

# Read directly: this runs in every fusion of every eager forward pass, so no wrapper calls.
_jit_tracing = torch._C._is_tracing


# TorchScript compiles both sides of `torch.jit.is_scripting() or is_tracing()` but never runs the
# right one: `unused` compiles it as a stub (and needs real annotations: no postponed ones here).
# torch.compile evaluates it once while tracing (False there) instead of tracing through it.
@torch.jit.unused
@torch.compiler.assume_constant_result
def is_tracing() -> bool:
    """True while ``torch.jit.trace`` records the model (not for TorchScript: callers test
    ``torch.jit.is_scripting()`` first, which TorchScript needs to see literally)."""
    return _jit_tracing()


@torch.jit.unused
def is_traced(x: torch.Tensor) -> bool:
    """True when a fusion layer computes its written-out formula: ``x`` is an FX proxy (symbolic tracing) or
    ``torch.jit.trace`` records. Callers test ``torch.jit.is_scripting()`` first.

    Args:
        x: the layer's (first) input.
    """
    return isinstance(x, torch.fx.Proxy) or is_tracing()


def fx_leaf(module: nn.Module, *args: torch.Tensor) -> torch.Tensor | None:
    """Record ``module(*args)`` as one ``call_module`` node when an FX tracer calls it; None otherwise.

    FX treats only ``torch.nn``'s own classes as leaves and traces every other module through; with this at
    the top of its ``forward``, a module is a leaf for every tracer (plain ``symbolic_trace``, torchvision's
    and timm's feature extractors), so the graph calls its eager ``forward`` when it runs. The root of a trace
    cannot be a leaf of itself: there, and for ordinary tensors, the result is None and ``forward`` goes on.

    Args:
        module: the module being called.
        args: its inputs (positional).
    """
    proxy = next((a for a in args if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    if getattr(tracer, "root", None) is module:
        return None
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})
