"""When the fusion layers compute their written-out formulas instead of the fused fast path.

The fast path (fused blend, an autograd Function, BatchNorm folded on the fly, in-place ops, input
checks in Python) is for eager PyTorch, ``torch.compile`` and ``torch.export``. Three tools record
a model's operations in other ways and get the plain formulas (``sigmoid(L + G)``,
``2·x·w + 2·y·(1 − w)``, ...), made of ordinary ops that each of them understands:

* TorchScript (``torch.jit.script``): tested with ``torch.jit.is_scripting()`` at the call site,
  which the TorchScript compiler resolves statically, so it never compiles the eager branch;
* FX symbolic tracing (``torch.fx.symbolic_trace``, timm's and torchvision's feature extraction);
* ``torch.jit.trace``, which the legacy (TorchScript-based) ONNX exporter uses.
"""

import torch
from torch.fx import _symbolic_trace

__all__ = ["is_tracing"]

# Read directly: this runs in every fusion of every eager forward pass, so no wrapper calls.
_jit_tracing = torch._C._is_tracing
_fx_state = getattr(_symbolic_trace, "_is_fx_tracing_tls", None)  # FX's thread-local flag, where it exists


def _fx_symbolic_tracing() -> bool:
    # The flag is also set while torch.export traces, whose graphs keep the fast path.
    return _symbolic_trace.is_fx_tracing() and not torch.compiler.is_compiling()


# TorchScript compiles both sides of `torch.jit.is_scripting() or is_tracing()` but never runs the
# right one: `unused` compiles it as a stub (and needs real annotations: no postponed ones here).
# torch.compile evaluates it once while tracing (False there) instead of tracing through it.
@torch.jit.unused
@torch.compiler.assume_constant_result
def is_tracing() -> bool:
    """True while FX symbolically traces or ``torch.jit`` traces the model (not for TorchScript:
    callers test ``torch.jit.is_scripting()`` first, which TorchScript needs to see literally)."""
    if _jit_tracing():
        return True
    if _fx_state is None:
        return _fx_symbolic_tracing()
    return getattr(_fx_state, "flag", False) and not torch.compiler.is_compiling()
