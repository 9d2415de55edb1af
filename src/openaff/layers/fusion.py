"""Feature fusion modules and the factory that maps a short name to one.

Every module has the signature ``fuse(x, y)`` with the authors' argument order:

* ``x``: the output of the residual branch (in general: the input with the larger receptive
  field, e.g. the upsampled high-level map of an FPN);
* ``y``: the shortcut / identity (the input with the smaller receptive field).

The paper writes its equations with the identity as ``X`` and the residual as ``Y``; the
authors' block code passes the residual first. The two differ only in which input receives
``w`` and which ``1 - w``; we follow the code, so converted weights compute what they did.

The zoo is the paper's study as the authors' study code computed it (AFF.md section 4b; each
class's docstring names the paper's version where it differs): ``add``, ``concat``, ``ms_gau``,
``ms_se``, ``ms_sa`` (Table 4 with ``aff``, ``iaff``), ``aff_global_global``, ``aff_local_local``
(Table 3), ``half_aff``, ``concat_aff``, ``recursive_aff`` (Table 6). All their attentions are one
:class:`~openaff.layers.mscam.MSCAM` with options.

Scenarios: every built-in type takes ``scenario=`` (:data:`FUSION_SCENARIOS`, through
``create_fusion(name, channels, r, scenario=...)``), the authors' version for that place of fusion.
``"short-skip"`` (default) and ``"long-skip"`` build the same modules; ``"same-layer"`` (two parallel
convolutions, ``x`` the dilated one) gives AFF/iAFF the single-layer attention, no factor 2 and the
weight on ``y``, and Concat no BatchNorm; the other types are the same in every scenario.

Rank, inputs, widths (``create_fusion``'s own arguments, beside ``channels`` and ``r``; docs/own-network.md):

* ``dims=1, 2, 3``: every built-in type for ``B x C x L``, ``B x C x H x W`` (default) or ``B x C x D x H x W``
  inputs, with convolutions, BatchNorms and pooling of that rank (the same weight names);
* ``inputs=k``: ``fuse(x1, ..., xk)`` for ``aff`` and ``iaff`` (:mod:`openaff.layers.fusion_multi`; ``k = 2`` is
  the two-input module itself);
* ``in_channels=(C1, C2, ...)`` and/or ``resize="nearest"|"bilinear"``: inputs of other widths and sizes are
  projected (Conv1x1-BN) to ``channels`` and resized to the finest map first
  (:class:`openaff.layers.fusion_aligned.AlignedFusion`, the authors' recipe).

Adding a fusion type takes a class with ``__init__(self, channels, r)`` (and keyword options,
``scenario`` among them to be usable in every model family) and ``forward(x, y)`` decorated with
``@register_fusion("name")``; every model family picks it up by name.

Speed and memory: AFF and iAFF blend with the fused ops of :mod:`openaff.layers.fused_ops`
(``2·lerp(y, x, sigmoid(L + G))`` in one buffer; the backward pass keeps ``x``, ``y`` and the two
logits instead of the four full-size intermediates autograd keeps for the formula written out).
With ``recompute = True`` (see :func:`openaff.layers.fused_ops.set_fusion_recompute`) a module in
training mode keeps only its inputs and runs its MS-CAMs again in the backward pass.

Scripting, tracing and export: under ``torch.jit.script``, FX symbolic tracing and ``torch.jit.trace``
(the legacy ONNX exporter) every module computes its ``formula``: the fast path's arithmetic with ordinary
ops (``w = sigmoid(L + G)``, then :func:`~openaff.layers.fused_ops.weighted_blend`, ``scale · lerp(y, x, w)``),
see :mod:`openaff.layers.tracing`. Under FX the MS-CAM branches (and their on-the-fly BatchNorm folding) are
leaves of the graph and the blend a leaf function, so a traced fusion gives the eager module's bits in
evaluation and in training, and its attention weight is a node of the graph (``<fusion>.sigmoid``). TorchScript
and ``torch.jit.trace`` run the branches unfolded: the same numbers up to rounding. ``torch.compile`` and
``torch.export`` keep the fast path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import check_int
from .fused_ops import attention_blend, fusion_recompute, recompute_context, weighted_blend
from .fusion_aligned import AlignedFusion
from .mscam import CONTEXT_BATCH_NORMS, CONVS, MSCAM, check_dims, shape_name
from .tracing import is_traced

# A leaf of FX graphs: the graph calls it, and it casts to the inputs' common dtype when the graph runs.
torch.fx.wrap("weighted_blend")

__all__ = [
    "AFF",
    "IAFF",
    "MSGAU",
    "MSSA",
    "MSSE",
    "NormedAddFusion",
    "FUSION_SCENARIOS",
    "AFFGlobalGlobal",
    "AFFLocalLocal",
    "AddFusion",
    "ConcatAFF",
    "ConcatFusion",
    "HalfAFF",
    "RecursiveAFF",
    "check_scenario",
    "create_fusion",
    "fusion_names",
    "fusion_options",
    "register_fusion",
]

# The paper's three places of fusion (Table 4's column groups); every built-in fusion takes `scenario=`.
FUSION_SCENARIOS = ("short-skip", "same-layer", "long-skip")

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


def _lookup(name: str) -> type[nn.Module]:
    cls = _FUSIONS.get(_canonical(name)) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown fusion type {name!r}; choose one of {', '.join(fusion_names())}")
    return cls


# create_fusion's own arguments, not options of a type.
_CORE_ARGUMENTS = ("channels", "r", "dims", "inputs")
# k-input forms (fusion type name -> class taking `inputs=`), filled by openaff.layers.fusion_multi.
MULTI_INPUT: dict[str, type[nn.Module]] = {}


def fusion_options(name: str) -> list[str]:
    """The keyword options of fusion type ``name`` beside ``channels``, ``r`` and ``dims`` (e.g. ``["scenario"]``)."""
    params = list(inspect.signature(_lookup(name).__init__).parameters.values())[1:]  # without self
    return [p.name for p in params if p.name not in _CORE_ARGUMENTS
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _takes(cls: type[nn.Module], arg: str) -> bool:
    params = inspect.signature(cls.__init__).parameters
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def create_fusion(name: str, channels: int, r: int = 4, *, dims: int = 2, inputs: int | None = None,
                  in_channels: tuple[int, ...] | None = None, resize: str | None = None, **options: Any) -> nn.Module:
    """Build a fusion module from its short name.

    Args:
        name: one of :func:`fusion_names` (``"add"``, ``"aff"``, ``"iaff"``, ...), case-insensitive.
        channels: channels of the inputs (and of the output).
        r: channel reduction of the MS-CAMs inside (ignored by fusions without a bottleneck).
        dims: spatial rank of the inputs: 1 (``B x C x L``), 2 (``B x C x H x W``, default) or 3
            (``B x C x D x H x W``).
        inputs: number of inputs ``k`` (default 2, or ``len(in_channels)``); ``k > 2`` builds the type's
            k-input form (``aff``, ``iaff``: :mod:`openaff.layers.fusion_multi`).
        in_channels: channels of each input when they differ from ``channels``: those inputs are projected by
            Conv1x1-BN first (:class:`~openaff.layers.fusion_aligned.AlignedFusion`).
        resize: ``"nearest"`` or ``"bilinear"``: inputs of different sizes are resized to the finest one (with
            ``in_channels`` the default is ``"nearest"``).
        options: the type's keyword options (:func:`fusion_options`); every built-in type takes
            ``scenario`` (one of :data:`FUSION_SCENARIOS`, default ``"short-skip"``), which selects the
            authors' version of the module for that place of fusion.

    Raises:
        ValueError: an unknown name, an option the type does not have, a bad option value, or a rank or number
            of inputs the type has no form for.
    """
    cls = _lookup(name)
    key = _canonical(name)
    check_dims(dims, f"fusion type {key!r}")
    if in_channels is not None:
        in_channels = tuple(in_channels)
        if inputs is not None and inputs != len(in_channels):
            raise ValueError(f"fusion type {key!r}: inputs={inputs} but {len(in_channels)} in_channels given")
    k = inputs if inputs is not None else (len(in_channels) if in_channels is not None else 2)
    check_int(k, f"fusion type {key!r}: inputs must be an integer >= 2", lo=2, error=ValueError)
    if k > 2:
        if key not in MULTI_INPUT:
            raise ValueError(f"fusion type {key!r} has no form for {k} inputs; use "
                             f"{' or '.join(map(repr, MULTI_INPUT))} (create_fusion('aff', C, r, inputs={k})) "
                             "or fuse pairwise")
        cls = MULTI_INPUT[key]
        options["inputs"] = k
    params = inspect.signature(cls.__init__).parameters.values()
    if options and not any(p.kind is p.VAR_KEYWORD for p in params):  # a **kwargs class checks its own
        known = fusion_options(name) + (["inputs"] if k > 2 else [])
        bad = [k for k in options if k not in known]
        if bad:
            raise ValueError(f"fusion type {_canonical(name)!r} has no option {bad[0]!r}; its options: "
                             f"{', '.join(known) or 'none'}")
    if dims != 2:
        if not _takes(cls, "dims"):
            raise ValueError(f"fusion type {key!r} has no {dims}-D form (its class takes no dims=); use a built-in "
                             "type or give the class a dims argument")
        options["dims"] = dims
    fusion = cls(channels, r, **options)
    if in_channels is None and resize is None:
        return fusion
    return AlignedFusion(fusion, channels, in_channels or (channels,) * k, resize=resize or "nearest", dims=dims)


def check_scenario(scenario: str, fusion: str = "fusion") -> str:
    """``scenario`` in its canonical spelling (``"short-skip"``, ...), or a ValueError naming it.

    Args:
        scenario: one of :data:`FUSION_SCENARIOS` (``_`` for ``-`` and any case accepted).
        fusion: the fusion type, for the message.
    """
    key = scenario.lower().replace("_", "-") if isinstance(scenario, str) else None
    if key not in FUSION_SCENARIOS:
        raise ValueError(f"{fusion}: unknown scenario {scenario!r}; choose one of {', '.join(FUSION_SCENARIOS)}")
    return key


def _check_pair(x: torch.Tensor, y: torch.Tensor, channels: int, ndim: int = 4) -> None:
    # One shape read on the good path: this runs in every fusion of every eager forward pass.
    shape = x.shape
    if shape != y.shape or len(shape) != ndim or shape[1] != channels:
        bad_inputs((x, y), channels, ndim - 2)


_RANK_HINT = {3: "dims=1", 4: "dims=2", 5: "dims=3"}


def bad_inputs(xs: tuple[torch.Tensor, ...], channels: int, dims: int) -> None:
    """Raise the one-line ValueError for fusion inputs that do not fit (shape, rank, channels), naming what to use.

    Args:
        xs: the inputs.
        channels: the channels the module was built for.
        dims: the spatial rank it was built for.
    """
    shapes = [tuple(t.shape) for t in xs]
    ranks = {len(s) for s in shapes}
    if len(ranks) == 1 and len(shapes[0]) != dims + 2:
        hint = _RANK_HINT.get(len(shapes[0]))
        raise ValueError(f"fusion expects {shape_name(dims, channels)} inputs, got {shapes[0]}"
                         + (f"; build it with create_fusion(..., {hint})" if hint else ""))
    if len(set(shapes)) > 1:
        widths = ", ".join(str(s[1]) if len(s) > 1 else "?" for s in shapes)
        raise ValueError(f"fusion inputs must have the same shape, got {' and '.join(map(str, shapes))}; for maps of "
                         f"different channels or sizes use create_fusion(name, {channels}, r, in_channels=({widths}), "
                         "resize='nearest')")
    raise ValueError(f"fusion expects {shape_name(dims, channels)} inputs, got {shapes[0]}; for inputs of another "
                     f"width use create_fusion(name, {channels}, r, in_channels=(...))")


def _blend(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # x·w + y·(1 − w) as y + w·(x − y): one product fewer, and the gradient with respect to w is
    # g·(x − y), formed from the difference as in the fused path. The Table 6 variants blend so in
    # eager PyTorch too; AFF, iAFF and recursive AFF use weighted_blend, their fused blend's arithmetic.
    return y + w * (x - y)


class _AttentionFusion(nn.Module):
    """Shared forward of the MS-CAM fusions: input checks, then ``_fuse`` directly or recomputed.

    ``recompute`` (default :func:`openaff.layers.fused_ops.fusion_recompute`) makes a module in
    training mode keep only its inputs for the backward pass and run ``_fuse`` again there.
    TorchScript, FX symbolic tracing and ``torch.jit.trace`` (legacy ONNX export) get
    :meth:`formula` instead: the same arithmetic from ordinary ops (FX: the same bits), no checks in Python.

    Args:
        channels: channels of both inputs.
        r: channel reduction of the MS-CAMs.
        scenario: one of :data:`FUSION_SCENARIOS` (stored canonical as ``self.scenario``).
        mscams: attribute names of the MS-CAMs to build.
        dims: spatial rank of the inputs (1, 2 or 3).
        mscam_options: keyword options of every :class:`MSCAM` built.
    """

    def __init__(self, channels: int, r: int = 4, scenario: str = "short-skip", mscams: tuple[str, ...] = ("mscam",),
                 dims: int = 2, **mscam_options: Any) -> None:
        super().__init__()
        self.channels = channels
        self.scenario = check_scenario(scenario, type(self).__name__)
        self.dims = check_dims(dims, type(self).__name__)
        self._ndim = dims + 2
        self.recompute = fusion_recompute()
        for name in mscams:  # attribute names are weight names: the authors' files depend on them
            self.add_module(name, MSCAM(channels, r, dims=dims, **mscam_options))

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The fusion's equation with ordinary ops, in the fast path's order (no fused kernels, no checks)."""
        return self._fuse(x, y)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # TorchScript resolves is_scripting() statically and never compiles the else branch.
        if torch.jit.is_scripting() or is_traced(x):
            return self.formula(x, y)
        else:
            _check_pair(x, y, self.channels, self._ndim)
            if self.recompute and self.training and torch.is_grad_enabled():
                return self._recomputed(x, y)
            return self._fuse(x, y)

    @torch.jit.unused
    def _recomputed(self, *xs: torch.Tensor) -> torch.Tensor:
        """``_fuse(*xs)`` keeping only the inputs for the backward pass, which runs it again."""
        if torch.compiler.is_compiling():
            # The compiled graph is functional: the BatchNorm buffer updates happen once, in the
            # forward graph, whatever the partitioner recomputes, so no marker is needed (or allowed).
            return checkpoint(self._fuse, *xs, use_reentrant=False, preserve_rng_state=False)
        return checkpoint(self._fuse, *xs, use_reentrant=False, preserve_rng_state=False,
                          context_fn=recompute_context)


@register_fusion("add")
class AddFusion(nn.Module):
    """Plain addition ``x + y`` (the authors' ``DirectAddFuse``) in every scenario; no parameters.

    In the same-layer scenario the authors' cell also drops its branch BatchNorms for Add: that is the
    model's business (:mod:`openaff.models.aff_inception`), not this module's.

    Args:
        channels: channels of ``x`` and ``y``.
        r: unused.
        scenario: one of :data:`FUSION_SCENARIOS`; the same module in all.
        dims: spatial rank of the inputs (any rank adds alike; stored for the record).
    """

    def __init__(self, channels: int, r: int = 4, *, scenario: str = "short-skip", dims: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.scenario = check_scenario(scenario, "add")
        self.dims = check_dims(dims, "add")
        # Set by a block whose x is its own temporary (its last BN or conv output): y is then added into
        # x's memory, as timm's blocks do (`x += shortcut`), instead of into a fresh tensor, which cost
        # the add-twin of AFF-ResNet-50 several per cent against resnet50d on the CPU.
        self.inplace = False

    # The authors' same-layer cell has no branch BatchNorms for Add (read by the cell).
    drops_branch_norms = True

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return x.add_(y)
        return x + y


@register_fusion("add_bn")
class NormedAddFusion(AddFusion):
    """``x + y`` that keeps a same-layer cell's branch BatchNorms: the control for Add's missing BNs.

    Every other same-layer type normalises both branches before fusing; the authors' Add does not
    (AFF.md 4b), so Add against them mixes attention with normalisation. This type is ours, not the
    paper's; outside the same-layer cell it is plain Add.
    """

    drops_branch_norms = False


class _SoftSelection(_AttentionFusion):
    """AFF and iAFF: the bottleneck MS-CAM(s) in the skip scenarios, the single-layer one in the same layer."""

    _branches = ("local", "global")
    _mscams: tuple[str, ...] = ("mscam",)

    def __init__(self, channels: int, r: int = 4, *, scenario: str = "short-skip", dims: int = 2) -> None:
        same = check_scenario(scenario, self.fusion_name) == "same-layer"
        super().__init__(channels, r, scenario, self._mscams, dims, branches=self._branches,
                         layers="single" if same else "bottleneck")
        self.same_layer = same


@register_fusion("aff")
class AFF(_SoftSelection):
    """Attentional feature fusion (the authors' ``ASKCFuse``).

    Short and long skip (AFF.md section 1): ``w = M(x + y)`` with the bottleneck MS-CAM;
    ``out = 2·x·w + 2·y·(1 − w)``. The factor 2 is in the authors' code, not in the paper's
    equation: it keeps the two weights summing to 2, like plain ``x + y``, and their trained
    weights depend on it.

    Same layer (section 4b; ``x`` the dilated branch ``Y``, ``y`` the other ``X``): the single-layer
    attention ``w = sigmoid(L1 + G1)(x + y)`` and ``out = y·w + x·(1 − w)``, no factor 2. The weight goes
    to ``y`` here, to ``x`` in the skip scenarios: both as in the authors' code.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction of the MS-CAM (unused by the single-layer attention of the same layer).
        scenario: one of :data:`FUSION_SCENARIOS`.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.same_layer:
            return attention_blend(y, x, *self.mscam.logits(x + y), inplace=True)
        # 2·x·w + 2·y·(1 − w) = 2·lerp(y, x, w), with w = sigmoid(L + G) fused into the blend.
        return attention_blend(x, y, *self.mscam.logits(x + y), scale=2.0, inplace=True)

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``w = M(x + y)``; ``2·x·w + 2·y·(1 − w)`` (same layer: ``y·w + x·(1 − w)``), written out."""
        w = self.mscam.formula(x + y)
        if self.same_layer:
            return weighted_blend(y, x, w)
        return weighted_blend(x, y, w, 2.0)


@register_fusion("aff_global_global")
class AFFGlobalGlobal(AFF):
    """AFF whose MS-CAM has two global branches (paper Table 3, "Global + Global").

    Short/long skip: both branches ``Gr`` (bottleneck after global pooling, own weights), factor 2, as
    the authors' code. Same layer: the code's version is not in AFF.md; this is the same-layer AFF
    with two single-layer global branches (``G1 + G1'``), no factor 2. The paper: the same parameter
    count as AFF. Weights: ``mscam.global_att``, ``mscam.global_att2``.
    """

    _branches = ("global", "global")


@register_fusion("aff_local_local")
class AFFLocalLocal(AFF):
    """AFF whose MS-CAM has two local branches (paper Table 3, "Local + Local").

    Short/long skip: both branches ``Lr`` (pointwise bottleneck, own weights), factor 2, as the authors'
    code. Same layer: the code's version is not in AFF.md; this is the same-layer AFF with two
    single-layer local branches (``L1 + L1'``), no factor 2. Weights: ``mscam.local_att``,
    ``mscam.local_att2``.
    """

    _branches = ("local", "local")


@register_fusion("iaff")
class IAFF(_SoftSelection):
    """Iterative attentional feature fusion (the authors' ``ResGlobLocaforGlobLocaChaFuse``).

    Short and long skip: ``w1 = M1(x + y)``; ``z = x·w1 + y·(1 − w1)``; ``w2 = M2(z)``;
    ``out = x·w2 + y·(1 − w2)``, with two independent bottleneck MS-CAMs and no factor 2.

    Same layer (section 4b): two stages of the same-layer AFF, each with its own single-layer
    attention: ``w1 = sigmoid(L1 + G1)(x + y)``; ``z = y·w1 + x·(1 − w1)``; ``w2 = sigmoid(L1' + G1')(z)``;
    ``out = y·w2 + x·(1 − w2)``.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction of both MS-CAMs (unused by the same layer's single-layer attention).
        scenario: one of :data:`FUSION_SCENARIOS`.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    _mscams = ("mscam1", "mscam2")

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.same_layer:
            x, y = y, x  # the weights go to the undilated input
        z = attention_blend(x, y, *self.mscam1.logits(x + y), inplace=True)
        return attention_blend(x, y, *self.mscam2.logits(z), inplace=True)

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``w1 = M1(x + y)``; ``z = x·w1 + y·(1 − w1)``; ``w2 = M2(z)``; ``x·w2 + y·(1 − w2)``, written out
        (same layer: ``x`` and ``y`` exchanged)."""
        if self.same_layer:
            x, y = y, x
        z = weighted_blend(x, y, self.mscam1.formula(x + y))
        return weighted_blend(x, y, self.mscam2.formula(z))


@register_fusion("concat")
class ConcatFusion(nn.Module):
    """Concatenation (paper Table 1): ``Conv1x1(2C -> C, bias)`` of ``cat[x, y]``, as the authors' code.

    Short and long skip: ``BN(cat[x, y])`` first (the authors' code); same layer: no BatchNorm. The paper
    writes ``Conv1x1([X, Y])`` without one (``norm=False``). Weights: ``proj.0`` (the BN) and ``proj.1`` (the
    conv), or ``proj.0`` (the conv) without the BN.

    Args:
        channels: channels of ``x`` and ``y`` (and of the output).
        r: unused.
        scenario: one of :data:`FUSION_SCENARIOS`.
        norm: BatchNorm on the concatenation or not; None: the authors' choice for ``scenario``.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    def __init__(self, channels: int, r: int = 4, *, scenario: str = "short-skip", norm: bool | None = None,
                 dims: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.scenario = check_scenario(scenario, "concat")
        self.dims = check_dims(dims, "concat")
        self._ndim = dims + 2
        if norm is None:
            norm = self.scenario != "same-layer"
        elif not isinstance(norm, bool):
            raise ValueError(f"concat: norm must be True, False or None, got {norm!r}")
        layers: list[nn.Module] = [CONTEXT_BATCH_NORMS[dims](2 * channels)] if norm else []
        self.proj = nn.Sequential(*layers, CONVS[dims](2 * channels, channels, 1, bias=True))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not is_traced(x):
            _check_pair(x, y, self.channels, self._ndim)
        return self.proj(torch.cat([x, y], dim=1))


class _ModulationFusion(_AttentionFusion):
    """MS-SE / MS-GAU / MS-SA: one attention, the study code's single-layer ``sigmoid(L1 + G1)`` by default."""

    def __init__(self, channels: int, r: int = 4, *, scenario: str = "short-skip", bottleneck: bool = False,
                 dims: int = 2) -> None:
        if not isinstance(bottleneck, bool):
            raise ValueError(f"{self.fusion_name}: bottleneck must be True or False, got {bottleneck!r}")
        super().__init__(channels, r, scenario, dims=dims, layers="bottleneck" if bottleneck else "single")


@register_fusion("ms_se")
class MSSE(_ModulationFusion):
    """Refinement, SENet-like (MS-SE): ``y + M(x)·x`` (AFF.md 4b: ``X + M(Y)·Y``), in every scenario.

    ``M`` is the authors' code's single-layer attention ``sigmoid(L1 + G1)`` (``Conv1x1(C->C)-BN``
    branches, no ``r``). The paper's version, a bottleneck MS-CAM with r = 2: ``bottleneck=True, r=2``.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction, with ``bottleneck=True`` only.
        scenario: one of :data:`FUSION_SCENARIOS`; the same module in all (the authors' code).
        bottleneck: the paper's bottleneck MS-CAM instead of the single-layer attention.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(y, self.mscam(x), x)


@register_fusion("ms_gau")
class MSGAU(_ModulationFusion):
    """Modulation, GAU-like (MS-GAU): ``M(x)·y + x`` (AFF.md 4b: ``M(Y)·X + Y``), in every scenario.

    ``M`` is the authors' code's single-layer attention ``sigmoid(L1 + G1)``. The paper's version, a
    bottleneck MS-CAM with r = 2: ``bottleneck=True, r=2``.

    Arguments as :class:`MSSE`.
    """

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, self.mscam(x), y)


@register_fusion("ms_sa")
class MSSA(_ModulationFusion):
    """Modulation, fully context-aware (MS-SA): ``M(x + y)·y + x`` (AFF.md 4b: ``M(Y + X)·X + Y``).

    ``M`` is the authors' code's single-layer attention ``sigmoid(L1 + G1)``, in every scenario. The
    paper's version, a bottleneck MS-CAM with r = 2: ``bottleneck=True, r=2``.

    Arguments as :class:`MSSE`.
    """

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, self.mscam(x + y), y)


class _ShortSkipVariant(_AttentionFusion):
    """The Table 6 variants: short skip in the authors' code; other scenarios build the same module."""

    def __init__(self, channels: int, r: int = 4, *, scenario: str = "short-skip", dims: int = 2) -> None:
        super().__init__(channels, r, scenario, dims=dims, **self._mscam_options())

    @staticmethod
    def _mscam_options() -> dict[str, Any]:
        raise NotImplementedError

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 2 * _blend(x, y, self.mscam(x + y))


@register_fusion("half_aff")
class HalfAFF(_ShortSkipVariant):
    """Half-AFF (paper Table 6): AFF whose attention concatenates half branches.

    ``w = sigmoid(BN(Conv1x1(2C/r -> C)(cat[l, g])))`` with ``l = ReLU(BN(Conv1x1(C -> C/r)(x + y)))`` and
    ``g`` the same after global pooling (own weights, broadcast over ``H x W``); ``out = 2·x·w + 2·y·(1 − w)``
    (AFF.md 4b, the authors' code). The paper's text only says "weight only one input". Table 6 is
    short skip only: every scenario builds this module.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction of the halves.
        scenario: one of :data:`FUSION_SCENARIOS`.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    @staticmethod
    def _mscam_options() -> dict[str, Any]:
        return dict(layers="half", combine="concat")


@register_fusion("concat_aff")
class ConcatAFF(_ShortSkipVariant):
    """Concat-AFF (paper Table 6): AFF whose attention concatenates its two full branches.

    ``w = sigmoid(BN(Conv1x1(2C -> C)(cat[ReLU(Lr(x + y)), ReLU(Gr(x + y))])))``, ``Gr`` broadcast over
    ``H x W``; ``out = 2·x·w + 2·y·(1 − w)`` (AFF.md 4b, the authors' code; the paper: "concatenation as the
    initial integration"). Table 6 is short skip only: every scenario builds this module.

    Arguments as :class:`HalfAFF` (``r``: the channel reduction of both bottleneck branches).
    """

    @staticmethod
    def _mscam_options() -> dict[str, Any]:
        return dict(layers="bottleneck", combine="concat")


@register_fusion("recursive_aff")
class RecursiveAFF(_AttentionFusion):
    """Recursive AFF (paper Table 6): a second MS-CAM selects between the first one's two branches.

    ``l, g = Lr(x + y), Gr(x + y)`` (the first MS-CAM's logits); ``w2 = M2(l + g)``;
    ``w = sigmoid(l·w2 + g·(1 − w2))``; ``out = x·w + y·(1 − w)``, no factor 2 (AFF.md 4b, the authors'
    code; the paper: "apply AFF recursively as the initial integration"). Table 6 is short skip only:
    every scenario builds this module.

    Args:
        channels: channels of ``x`` and ``y``.
        r: channel reduction of both MS-CAMs.
        scenario: one of :data:`FUSION_SCENARIOS`.
        dims: spatial rank of the inputs (1, 2 or 3).
    """

    def __init__(self, channels: int, r: int = 4, *, scenario: str = "short-skip", dims: int = 2) -> None:
        super().__init__(channels, r, scenario, ("mscam1", "mscam2"), dims)

    def _fuse(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loc, glob = self.mscam1.logits(x + y)
        w2 = self.mscam2(loc + glob)
        # sigmoid(l·w2 + g·(1 − w2)) = sigmoid(w2·(l − g) + g): the fused blend's two logits.
        return attention_blend(x, y, w2 * (loc - glob), glob, inplace=True)

    def formula(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``l, g = Lr(x + y), Gr(x + y)``; ``w2 = M2(l + g)``; ``w = sigmoid(l·w2 + g·(1 − w2))``;
        ``x·w + y·(1 − w)``, written out (the sigmoid's argument as the fast path forms it, ``w2·(l − g) + g``)."""
        loc, glob = self.mscam1.branch_logits(x + y)
        w2 = self.mscam2.formula(loc + glob)
        return weighted_blend(x, y, torch.sigmoid(w2 * (loc - glob) + glob))
