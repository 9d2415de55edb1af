"""MS-CAM: the multi-scale channel attention module of Attentional Feature Fusion.

``M(X) = sigmoid(L(X) + G(X))`` where ``L`` (local context, every pixel) and ``G`` (global
context, after global average pooling) are each ``Conv1x1(C->C/r, bias) -> BN -> ReLU ->
Conv1x1(C/r->C, bias) -> BN`` with their own weights. The global term is ``B x C x 1 x 1`` and
broadcasts over ``H x W``.

The ``nn.Sequential`` indices of the two branches follow the authors' Gluon code
(``local_att.0/1/3/4``, ``global_att.1/2/4/5``) so that their weight files map one to one.

Options build every attention of the paper's study (AFF.md section 4b) from this one class: the
branch kinds (two global or two local branches), single-layer ``Conv1x1(C->C)-BN`` branches (the
study code's MS-GAU/SE/SA and same-layer AFF), the half branches of Half-AFF and a concatenating
combination (Half-AFF, Concat-AFF); :meth:`MSCAM.logits` gives the branch outputs before the
sigmoid (recursive AFF).

Speed: the fusion modules call :meth:`MSCAM.logits` and blend with the fused ops of
:mod:`openaff.layers.fused_ops`, so the sigmoid and the blend never materialise term by term. Each branch
is a :class:`ContextBranch`, which in evaluation without autograd folds its BatchNorms into its
convolutions on the fly; :func:`openaff.folding.fuse_for_inference` folds them once and for all.
Every op keeps the input's memory format (channels_last stays channels_last). Scripted and traced
models compute :meth:`MSCAM.formula` instead, with the same ops (see :mod:`openaff.layers.tracing`): under
FX the branches are leaves of the graph, so a traced MS-CAM gives the eager one's bits.

Rank: ``dims=1, 2, 3`` builds the same module with ``Conv1d/2d/3d``, :class:`ContextBatchNorm1d/2d/3d` and
global pooling of that rank, for ``B x C x L`` (audio, sequences), ``B x C x H x W`` (the default) and
``B x C x D x H x W`` (volumes) inputs. ``out_channels`` gives attention maps of another width than the
input (``(k - 1) x C`` for the k-input soft selection of :mod:`openaff.layers.fusion_multi`).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import check_int
from .bn_fold import bn_scale_shift
from .channels_last_norm import channels_last_batch_norm, use_channels_last_batch_norm
from .fused_ops import attention_weight, is_recomputing
from .tracing import fx_leaf, is_traced, is_tracing

__all__ = ["BRANCH_KINDS", "COMBINES", "DIMS", "LAYER_FORMS", "MSCAM", "ContextBatchNorm1d", "ContextBatchNorm2d",
           "ContextBatchNorm3d", "ContextBranch", "GlobalAvgPool1d", "GlobalAvgPool2d", "GlobalAvgPool3d",
           "check_dims", "context_batch_norm"]

# Spatial ranks the layers are built for: B x C x L, B x C x H x W, B x C x D x H x W.
DIMS = (1, 2, 3)
_SHAPES = {1: "B x {} x L", 2: "B x {} x H x W", 3: "B x {} x D x H x W"}


def check_dims(dims: int, what: str = "MSCAM") -> int:
    """``dims`` if it is 1, 2 or 3, else a ValueError naming it.

    Args:
        dims: spatial rank of the inputs.
        what: the module, for the message.
    """
    if dims not in DIMS or isinstance(dims, bool):
        raise ValueError(f"{what}: dims must be 1 (B x C x L), 2 (B x C x H x W) or 3 (B x C x D x H x W), "
                         f"got {dims!r}")
    return dims


def shape_name(dims: int, channels: int | str = "C") -> str:
    """``"B x 64 x H x W"`` for ``dims=2`` (the inputs' layout, for error messages)."""
    return _SHAPES[dims].format(channels)


def context_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                       num_batches_tracked: torch.Tensor | None, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, training: bool, momentum: float | None,
                       eps: float) -> torch.Tensor:
    """``nn.BatchNorm{1,2,3}d``'s computation, with running statistics in a training batch of one value per channel.

    Args:
        x: ``B x C x ...`` input (any rank).
        running_mean: running mean, updated in training when given (None: batch statistics only).
        running_var: running variance, as ``running_mean``.
        num_batches_tracked: counter incremented by a training pass that updates the statistics, or None.
        weight: affine scale, or None.
        bias: affine shift, or None.
        training: normalise with batch statistics (and update the running ones).
        momentum: running-average factor; None for a cumulative average.
        eps: added to the variance.
    """
    if training and x.numel() == x.shape[1]:  # one value per channel, in any rank
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    factor = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    return F.batch_norm(x, running_mean, running_var, weight, bias, training or running_mean is None, factor, eps)


class _ContextBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any rank) that stays defined when a training batch holds one value per channel.

    The global branch of MS-CAM normalises a ``B x C x 1 x 1`` tensor, so a training batch of
    one gives a single value per channel and batch statistics do not exist (PyTorch raises
    "Expected more than 1 value per channel"). In that case this layer normalises with its
    running statistics, exactly as in evaluation, and leaves them unchanged; gradients still
    flow to the input, gamma and beta. With two or more values per channel it is a plain
    ``nn.BatchNorm{1,2,3}d`` (the same ``F.batch_norm`` call).

    Scriptable, and one ``call_module`` node for every FX tracer, as PyTorch's own BatchNorm is:
    the traced graph then follows ``train()`` / ``eval()`` and tests the batch size when it runs.

    When a fusion module recomputes its forward pass for the backward pass (see
    :func:`openaff.layers.fused_ops.set_fusion_recompute`), the recomputation normalises with the
    same batch statistics but leaves the running statistics alone: they were updated once, in the
    forward pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.training and self.track_running_stats
        if not torch.jit.is_scripting():  # a separate `if`: TorchScript then skips the block statically
            # A leaf of every FX graph, which then calls this forward in whatever mode the module is in.
            node = fx_leaf(self, x)
            if node is not None:
                return node
            if (self.training and use_channels_last_batch_norm(x) and not torch.compiler.is_compiling()
                    and not is_tracing()):
                return self._channels_last_forward(x, stats)
            if stats and not torch.compiler.is_compiling() and is_recomputing():
                # Throw-away copies: the same kernel (and saved tensors, which checkpoint checks) as the
                # forward pass, without a second update of the real running statistics.
                return context_batch_norm(x, self.running_mean.clone(), self.running_var.clone(), None,
                                          self.weight, self.bias, True,
                                          0.0 if self.momentum is None else self.momentum, self.eps)
        return context_batch_norm(x, self.running_mean if stats or not self.training else None,
                                  self.running_var if stats or not self.training else None,
                                  self.num_batches_tracked if stats else None,
                                  self.weight, self.bias, self.training, self.momentum, self.eps)

    @torch.jit.unused
    def _channels_last_forward(self, x: torch.Tensor, stats: bool) -> torch.Tensor:
        """Training on a channels_last input with few channels (the MS-CAM's local bottleneck): see
        :mod:`openaff.layers.channels_last_norm`. The same statistics rules as :func:`context_batch_norm`."""
        if x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        factor = 0.0 if self.momentum is None else self.momentum
        if stats and is_recomputing():
            stats = False  # updated once, in the forward pass
        elif stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return channels_last_batch_norm(x, self.running_mean if stats else None, self.running_var if stats else None,
                                        self.weight, self.bias, factor, self.eps)


class ContextBatchNorm1d(_ContextBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (``B x C x L``) that trains on one value per channel: see :class:`ContextBatchNorm2d`."""


class ContextBatchNorm2d(_ContextBatchNorm, nn.BatchNorm2d):
    """BatchNorm2d that stays defined when a training batch holds one value per channel.

    The global branch of MS-CAM normalises a ``B x C x 1 x 1`` tensor, so a training batch of
    one gives a single value per channel and batch statistics do not exist (PyTorch raises
    "Expected more than 1 value per channel"). In that case this layer normalises with its
    running statistics, exactly as in evaluation, and leaves them unchanged; gradients still
    flow to the input, gamma and beta. With two or more values per channel it is a plain
    ``nn.BatchNorm2d``. :class:`ContextBatchNorm1d` and :class:`ContextBatchNorm3d` are the same for
    the other ranks; :func:`openaff.layers.convert_sync_batchnorm` keeps the rule under DDP.
    """


class ContextBatchNorm3d(_ContextBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (``B x C x D x H x W``) that trains on one value per channel (:class:`ContextBatchNorm2d`)."""


CONTEXT_BATCH_NORMS: dict[int, type[_ContextBatchNorm]] = {1: ContextBatchNorm1d, 2: ContextBatchNorm2d,
                                                           3: ContextBatchNorm3d}


class _ChannelsLastGlobalMean(torch.autograd.Function):
    """``x.mean((2, 3), keepdim=True)`` whose gradient keeps ``x``'s channels_last layout.

    PyTorch's pooling backward returns a contiguous (NCHW) gradient for a channels_last input, and
    autograd then adds it to the other gradients of the fusion's input (channels_last) with a
    mixed-layout kernel: 15 ms for one 128 x 16 x 48 x 48 bf16 tensor against 1 ms for matching
    layouts, the largest single cost of training a small AFF model on the CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        # sum (accumulated in float) then scale: the bf16 mean kernel is 5x slower than the sum here.
        return x.sum((2, 3), keepdim=True).div_(x.shape[2] * x.shape[3])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = ctx.shape
        g = (grad / (h * w)).expand(b, c, 1, w).contiguous(memory_format=torch.channels_last)
        return g.expand(b, c, h, w).contiguous(memory_format=torch.channels_last)


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d(1)`` (the global branch's pooling) with a layout-preserving gradient.

    The same module for weight names, scripting, tracing and :func:`_branch_eval`; in eager training on
    a channels_last input its gradient comes back channels_last (see :class:`_ChannelsLastGlobalMean`).
    """

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or is_traced(x):
            return F.adaptive_avg_pool2d(x, self.output_size)
        else:
            if (x.requires_grad and torch.is_grad_enabled() and x.dim() == 4 and not x.is_contiguous()
                    and x.is_contiguous(memory_format=torch.channels_last) and not torch.compiler.is_compiling()):
                return _ChannelsLastGlobalMean.apply(x)
            return F.adaptive_avg_pool2d(x, self.output_size)


class GlobalAvgPool1d(nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d(1)``: the global branch's pooling of ``B x C x L`` inputs."""

    def __init__(self) -> None:
        super().__init__(1)


class GlobalAvgPool3d(nn.AdaptiveAvgPool3d):
    """``nn.AdaptiveAvgPool3d(1)``: the global branch's pooling of ``B x C x D x H x W`` inputs."""

    def __init__(self) -> None:
        super().__init__(1)


CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOLS: dict[int, type[nn.Module]] = {1: GlobalAvgPool1d, 2: GlobalAvgPool2d, 3: GlobalAvgPool3d}
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_POINTWISE = {nn.Conv1d: ((1,), (0,)), nn.Conv2d: ((1, 1), (0, 0)), nn.Conv3d: ((1, 1, 1), (0, 0, 0))}
_CONV_FNS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by the rank of the input
_BatchNorm = nn.modules.batchnorm._BatchNorm  # every BatchNorm with running statistics, SyncBatchNorm included


def _context_branch(channels: int, inter: int, pool: bool, form: str = "bottleneck", relu_out: bool = False,
                    dims: int = 2, out_channels: int | None = None) -> ContextBranch:
    """One context branch: ``[GAP] -> Conv1x1 -> BN [-> ReLU -> Conv1x1 -> BN] [-> ReLU]``.

    ``form`` "bottleneck" is §1's ``C -> C/r -> C`` stack, "single" the study code's ``Conv1x1(C -> C) -> BN``,
    "half" the first half of the bottleneck (``C -> C/r``, ending in its ReLU). ``relu_out`` appends a ReLU
    (the branches of a concatenating MS-CAM). ``dims`` is the rank of the convolutions, BatchNorms and pooling;
    ``out_channels`` (default ``channels``) the width of the last convolution. The Sequential indices are the
    authors' weight names.
    """
    conv, norm = CONVS[dims], CONTEXT_BATCH_NORMS[dims]
    out = channels if out_channels is None else out_channels
    layers: list[nn.Module] = [_POOLS[dims]()] if pool else []
    if form == "single":
        layers += [conv(channels, out, 1, bias=True), norm(out)]
    else:
        layers += [conv(channels, inter, 1, bias=True), norm(inter), nn.ReLU(inplace=True)]
        if form == "bottleneck":
            layers += [conv(inter, out, 1, bias=True), norm(out)]
    if relu_out and form != "half":
        layers.append(nn.ReLU(inplace=True))
    return ContextBranch(*layers)


def _folded(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv`` followed by ``bn`` (evaluation) as one 1x1 convolution's ``(C_out x C_in, bias)``."""
    w = conv.weight.flatten(1)
    if bn is None:
        return w, conv.bias
    scale, shift = bn_scale_shift(bn, conv.bias)
    return w * scale[:, None], shift


def _conv1x1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution of ``x`` (``B x C x ...``, rank 1 to 3) with a ``C_out x C_in`` weight."""
    return _CONV_FNS[x.dim()](x, w.view(*w.shape, *(1,) * (x.dim() - 2)), b)


def _branch_eval(branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor | None:
    """A context branch in evaluation without autograd, BatchNorm folded on the fly; None if not applicable.

    Folding ``Conv1x1 -> BN`` into one convolution removes the BatchNorm's full-size pass, at the
    price of a few products on ``C x C/r`` weights, and gives an unmodified model most of what
    :func:`openaff.folding.fuse_for_inference` gives it. The pooled (global) branch works on
    ``B x C`` matrices, where a 1x1 convolution is ``F.linear`` and skips the convolution set-up
    that costs more than its arithmetic. The same modules, parameters and statistics; the rounding
    differs in the last bits. Skipped (None) for any other layout and when a hook watches the branch.
    """
    mods = list(branch._modules.values())
    for m in (branch, *mods):  # a loop, not any(generator): fewer Python calls on every pass
        if m._forward_hooks or m._forward_pre_hooks:
            return None
    pooled = isinstance(mods[0], _ADAPTIVE_POOLS)
    spatial = x.dim() - 2
    if pooled:
        if mods[0].output_size not in (1, (1,), (1, 1), (1, 1, 1)):
            return None
        x, mods = x.mean((2, 3) if spatial == 2 else tuple(range(2, 2 + spatial))), mods[1:]
    i = 0
    while i < len(mods):
        m = mods[i]
        pointwise = _POINTWISE.get(type(m))  # (ones, zeros) of the convolution's rank; None for anything else
        if pointwise is not None and m.kernel_size == pointwise[0] and m.stride == pointwise[0] \
                and m.padding == pointwise[1] and m.dilation == pointwise[0] and m.groups == 1 \
                and m.padding_mode == "zeros":
            bn = mods[i + 1] if i + 1 < len(mods) else None
            bn = bn if isinstance(bn, _BatchNorm) and bn.running_mean is not None and not bn.training else None
            w, b = _folded(m, bn)
            x = F.linear(x, w, b) if pooled else _conv1x1(x, w, b)
            i += 2 if bn is not None else 1
        elif isinstance(m, nn.ReLU):
            x, i = torch.relu_(x), i + 1
        elif isinstance(m, nn.Identity):
            i += 1
        else:
            return None
    if not pooled:
        return x
    return x[:, :, None, None] if spatial == 2 else x.view(*x.shape, *(1,) * spatial)


class ContextBranch(nn.Sequential):
    """One context branch of an MS-CAM (or its concatenating projection): an ``nn.Sequential`` that folds.

    In evaluation without autograd it runs :func:`_branch_eval`, its BatchNorms folded into its convolutions on
    the fly (the same modules, parameters and statistics; the rounding differs from the unfolded stack in the last
    bits); otherwise, and for TorchScript and ``torch.jit.trace``, the modules one after the other. Under FX it is
    one ``call_module`` node (:func:`~openaff.layers.tracing.fx_leaf`): the graph decides when it runs, as eager
    does, so a traced MS-CAM gives the eager one's bits. The indices are the authors' weight names.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # a separate `if`: TorchScript then skips the block statically
            if isinstance(x, torch.fx.Proxy):
                node = fx_leaf(self, x)
                if node is not None:
                    return node
            elif not self.training and not torch.is_grad_enabled() and not is_tracing():
                folded = _branch_eval(self, x)
                if folded is not None:
                    return folded
        for module in self:
            x = module(x)
        return x


BRANCH_KINDS = ("local", "global")
LAYER_FORMS = ("bottleneck", "single", "half")
COMBINES = ("add", "concat")


class MSCAM(nn.Module):
    """Multi-scale channel attention: returns the fusion weight ``M(x)`` in ``(0, 1)``.

    The default is AFF.md section 1's MS-CAM, ``sigmoid(L(x) + G(x))`` with bottleneck branches. The
    options build the attentions of the paper's study as the authors' study code has them (section 4b):

    * ``branches``: the kinds of the two branches, ``"local"`` (every pixel) or ``"global"`` (after global
      average pooling). ``("global", "global")`` and ``("local", "local")`` are Table 3's context ablations.
    * ``layers``: ``"bottleneck"`` (``Conv1x1(C->C/r)-BN-ReLU-Conv1x1(C/r->C)-BN``, section 1's ``Lr``/``Gr``),
      ``"single"`` (``Conv1x1(C->C)-BN``, the code's ``L1``/``G1`` of MS-GAU/SE/SA and the same-layer AFF;
      no ``r``), ``"half"`` (``Conv1x1(C->C/r)-BN-ReLU``, Half-AFF's halves; needs ``combine="concat"``).
    * ``combine``: ``"add"``, ``sigmoid(A + B)``; ``"concat"``, ``sigmoid(BN(Conv1x1(cat[A, B])))`` with
      each branch ending in a ReLU and the global one broadcast over ``H x W`` (Half-AFF, Concat-AFF).

    :meth:`forward` and :meth:`formula` give the weight; :meth:`logits` (fast) and :meth:`branch_logits`
    (written out) give the two branch outputs before the sigmoid, which the AFF family blends with
    the fused ops and recursive AFF uses as such.

    Weight names: ``local_att`` and ``global_att`` (the authors' names); two branches of one kind are
    ``local_att`` and ``local_att2`` (or ``global_att`` and ``global_att2``); the concatenating
    projection is ``fuse_att``. The names are the same in every rank.

    Args:
        channels: number of input channels ``C``.
        r: channel reduction of the bottleneck, ``C // r`` inner channels (at least 1).
        branches: kinds of the two branches, each ``"local"`` or ``"global"`` (order does not matter).
        layers: ``"bottleneck"``, ``"single"`` or ``"half"``, as above.
        combine: ``"add"`` or ``"concat"``, as above.
        dims: spatial rank of the inputs: 1 (``B x C x L``), 2 (``B x C x H x W``, default) or 3
            (``B x C x D x H x W``); convolutions, BatchNorms and pooling of that rank.
        out_channels: channels of the attention (default ``C``): the width of the last convolution of each
            branch (``combine="add"``) or of the concatenating projection.
    """

    def __init__(self, channels: int, r: int = 4, *, branches: tuple[str, str] = ("local", "global"),
                 layers: str = "bottleneck", combine: str = "add", dims: int = 2,
                 out_channels: int | None = None) -> None:
        super().__init__()
        if channels < 1 or r < 1:
            raise ValueError(f"MSCAM needs channels >= 1 and r >= 1, got channels={channels}, r={r}")
        check_dims(dims)
        if out_channels is not None:
            check_int(out_channels, "MSCAM out_channels must be a positive integer", error=ValueError)
        if isinstance(branches, str) or len(branches) != 2 or any(b not in BRANCH_KINDS for b in branches):
            raise ValueError(f"MSCAM branches must be two of {BRANCH_KINDS}, got {branches!r}")
        if layers not in LAYER_FORMS:
            raise ValueError(f"MSCAM layers must be one of {', '.join(LAYER_FORMS)}, got {layers!r}")
        if combine not in COMBINES:
            raise ValueError(f"MSCAM combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        if layers == "half" and combine != "concat":
            raise ValueError("MSCAM layers='half' ends in C/r channels and needs combine='concat'")
        self.channels = channels
        self.r = r
        kinds = tuple(sorted(branches, key=BRANCH_KINDS.index))  # a local branch first: it sets H x W
        self.branches = kinds
        self.layers = layers
        self.combine = combine
        self.dims = dims
        out = channels if out_channels is None else out_channels
        self.out_channels = out
        inter = max(channels // r, 1)
        names = (f"{kinds[0]}_att", f"{kinds[1]}_att" + ("2" if kinds[0] == kinds[1] else ""))
        branch_out = out if combine == "add" else channels  # a concatenating MS-CAM widens in its projection
        for name, kind in zip(names, kinds, strict=True):
            self.add_module(name, _context_branch(channels, inter, kind == "global", layers, combine == "concat",
                                                  dims, branch_out))
        # Read by logits() on every pass: the module dict directly, not nn.Module.__getattr__.
        self._first, self._second = names
        if combine == "concat":
            width = 2 * (inter if layers == "half" else channels)
            self.fuse_att = ContextBranch(CONVS[dims](width, out, 1, bias=True), CONTEXT_BATCH_NORMS[dims](out))

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two branch outputs before the sigmoid, e.g. ``(L(x), G(x))``: ``B x C x H x W`` or ``B x C x 1 x 1``
        (``out_channels`` instead of ``C``; other ranks alike).

        With ``combine="add"``, ``M(x) = sigmoid(sum)``; the fusion modules fuse that sum and sigmoid into
        their blend. In evaluation without autograd the branches fold their BatchNorms on the fly
        (:class:`ContextBranch`).
        """
        return self._modules[self._first](x), self._modules[self._second](x)

    def branch_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`logits` in a form TorchScript compiles (what scripted and traced models call)."""
        # hasattr on a module is resolved when TorchScript compiles, so only the branch that exists is compiled.
        if hasattr(self, "local_att2"):
            return self.local_att(x), self.local_att2(x)
        if hasattr(self, "global_att2"):
            return self.global_att(x), self.global_att2(x)
        return self.local_att(x), self.global_att(x)

    def formula(self, x: torch.Tensor) -> torch.Tensor:
        """``sigmoid(A(x) + B(x))`` (or the concatenating form) with ordinary ops: what scripted and traced models
        compute (the same numbers as :meth:`forward`; under FX the same bits, the branches being leaves)."""
        a, b = self.branch_logits(x)
        if hasattr(self, "fuse_att"):
            return torch.sigmoid(self.fuse_att(torch.cat([a, b.expand_as(a)], 1)))
        return torch.sigmoid(a + b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or is_traced(x) or self.combine != "add":
            # The concatenating form has nothing to fuse: its projection folds itself (ContextBranch).
            return self.formula(x)
        else:
            return attention_weight(*self.logits(x))
