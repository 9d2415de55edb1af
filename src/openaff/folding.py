"""Inference-time folding of BatchNorm into the convolutions before it (:func:`fuse_for_inference`).

In evaluation mode a BatchNorm is a per-channel affine map, so ``BN(conv(x))`` equals one
convolution with scaled weights and a new bias. Folding saves a full read and write of every
normalised activation (and the MS-CAMs' two BatchNorms each); outputs stay equal up to rounding.

Only a BatchNorm that directly follows a convolution is folded:

* inside an ``nn.Sequential``: a ``Conv2d`` immediately followed by a ``BatchNorm2d`` (the
  MS-CAM branches, the ResNet-D stems, the downsampling shortcuts), and a ``BatchNorm2d``
  immediately followed by an unpadded 1x1 ``Conv2d`` (the short-skip Concat fusion);
* in the blocks and stems of the model families, the attribute pairs of :data:`FOLD_PAIRS`
  (e.g. ``conv1 -> bn1`` of a bottleneck). The pre-activation blocks of ``AFFCifarPreActResNet``
  normalise *before* their convolutions; only their middle BN (``conv1 -> bn2``) follows a
  convolution directly, so that is the only one folded there; a BN before a padded convolution
  cannot be folded into it exactly (the zero padding would become a non-zero constant).

A folded BatchNorm is replaced by ``nn.Identity`` (its state_dict keys disappear). The folded
model is for inference only: training it would train a network without those BatchNorms, so
:func:`fuse_for_inference` refuses a model in training mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layers.bn_fold import bn_scale_shift
from .models import AFFCifarPreActResNet, AFFCifarResNeXt, AFFResNet, FusionBasicBlock, FusionBottleneck, PreActBlock

__all__ = ["FOLD_PAIRS", "fold_bn_conv", "fold_conv_bn", "fuse_for_inference"]

# (conv attribute, bn attribute) pairs where the BN's input is exactly the conv's output. A conv
# attribute naming an nn.Sequential means its last module (the ResNet-D deep stem).
FOLD_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    FusionBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    FusionBasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    PreActBlock: (("conv1", "bn2"),),
    AFFResNet: (("conv1", "bn1"),),
    AFFCifarResNeXt: (("conv1", "bn1"),),
    AFFCifarPreActResNet: (),
}


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold an evaluation-mode ``bn`` into the ``conv`` it follows, in place (``conv`` gains a bias).

    The arithmetic is done in float64 and rounded once to the weights' dtype.

    Args:
        conv: the convolution whose output ``bn`` normalises.
        bn: the BatchNorm, with running statistics.
    """
    w = conv.weight
    scale, new_bias = bn_scale_shift(bn, conv.bias, torch.float64)
    # Keep the weight's memory format (channels_last stays channels_last).
    w.copy_(w.double() * scale.view(-1, *([1] * (w.dim() - 1))))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.dtype), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _foldable_into_next(bn: nn.Module, conv: nn.Module) -> bool:
    # A BN before an unpadded 1x1 convolution is an affine map of the conv's input: exact to fold.
    return (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_mean is not None
            and type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1 and conv.in_channels == bn.num_features)


@torch.no_grad()
def fold_bn_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
    """Fold an evaluation-mode ``bn`` into the unpadded 1x1 ``conv`` that follows it, in place.

    ``conv(scale·x + shift) = (W·diag(scale)) x + (b + W·shift)``; float64 arithmetic, rounded once.

    Args:
        bn: the BatchNorm, with running statistics.
        conv: the 1x1 convolution (no padding, one group) that reads ``bn``'s output.
    """
    scale, shift = bn_scale_shift(bn, None, torch.float64)
    w = conv.weight
    bias = w.double().flatten(1) @ shift
    if conv.bias is not None:
        bias = bias + conv.bias.double()
    w.copy_(w.double() * scale.view(1, -1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=w.requires_grad)
    else:
        conv.bias.copy_(bias)


def _identity() -> nn.Identity:
    # In evaluation mode like the rest of the folded model (a new module starts in training mode).
    return nn.Identity().eval()


def _fold_sequential(seq: nn.Sequential) -> int:
    n = 0
    names = list(seq._modules)
    for prev, name in zip(names, names[1:], strict=False):
        first, second = seq._modules[prev], seq._modules[name]
        if _foldable(first, second):
            fold_conv_bn(first, second)
            seq._modules[name] = _identity()
            n += 1
        elif _foldable_into_next(first, second):
            fold_bn_conv(first, second)
            seq._modules[prev] = _identity()
            n += 1
    return n


def _fold_pairs(module: nn.Module, pairs: tuple[tuple[str, str], ...]) -> int:
    n = 0
    for conv_name, bn_name in pairs:
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if isinstance(conv, nn.Sequential) and len(conv):
            conv = conv[-1]
        if conv is not None and bn is not None and _foldable(conv, bn):
            fold_conv_bn(conv, bn)
            setattr(module, bn_name, _identity())
            n += 1
    return n


def fuse_for_inference(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Fold every BatchNorm that follows a convolution into it, for fast evaluation.

    Works on the models of this package (and on any module made of ``nn.Sequential`` conv -> BN
    runs, e.g. a bare :class:`~openaff.layers.MSCAM` or fusion module). Evaluation-mode outputs
    are unchanged up to rounding (relative error ~1e-7 in float32, ~1e-15 in float64). Calling it
    again finds nothing left to fold.

    Args:
        model: a model in evaluation mode (``model.eval()``).
        inplace: modify ``model`` itself; False folds a deep copy and leaves ``model`` untouched.

    Returns:
        The folded model, in evaluation mode, with ``model.folded_batchnorms`` set to the number of
        BatchNorms folded by this call.

    Raises:
        RuntimeError: if ``model`` (or any submodule) is in training mode: folding freezes the
            running statistics, and training the folded network would train a different one.
    """
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "fuse_for_inference needs a model in evaluation mode (call model.eval() first); "
            f"in training mode: {', '.join(training[:3])}{' ...' if len(training) > 3 else ''}"
        )
    if not inplace:
        model = copy.deepcopy(model)
    n = 0
    for m in list(model.modules()):
        if isinstance(m, nn.Sequential):
            n += _fold_sequential(m)
        for cls, pairs in FOLD_PAIRS.items():
            if type(m) is cls:
                n += _fold_pairs(m, pairs)
    model.folded_batchnorms = n
    return model
