"""What the three model families share: input checks, the classifier head and timm's model API.

Every model is scriptable (``torch.jit.script``) and FX-traceable: code that only eager PyTorch
runs (input checks, gradient checkpointing) sits behind ``torch.jit.is_scripting()``, and under FX
the fusion layers record the fast path's arithmetic with its folding branches as leaves, so a traced
model gives the eager one's bits (:mod:`openaff.layers.tracing`).

No postponed annotations here: ``forward`` below is what FX traces, and the graph's placeholders take
its annotations, which TorchScript must read as types when a traced graph is scripted.
"""

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..layers.fusion import AddFusion, create_fusion
from ..layers.tracing import is_traced, is_tracing


def block_fusion(name: str, channels: int, r: int, **options) -> nn.Module:
    """``create_fusion`` for a block whose residual input is its own temporary: Add adds into it in place.

    Args:
        name: fusion type name.
        channels: channels of both inputs.
        r: channel reduction of the fusion's attention.
        options: keyword options of the fusion type.
    """
    fusion = create_fusion(name, channels, r, **options)
    if isinstance(fusion, AddFusion):
        fusion.inplace = True  # what timm's blocks do (`x += shortcut`): no fresh full-size tensor
    return fusion


def check_image_batch(x: torch.Tensor, in_chans: int) -> None:
    """Raise a ValueError naming the problem when ``x`` is not a ``B x in_chans x H x W`` batch.

    Nothing is checked while FX or ``torch.jit`` traces (the shapes are symbolic, and a check would
    freeze the example's shape into the graph); TorchScript callers skip the call
    (``if not torch.jit.is_scripting()``).
    """
    # Two attribute reads on the good path: this runs in every eager forward pass.
    if isinstance(x, torch.Tensor):
        if x.ndim == 4 and not is_tracing() and x.shape[1] == in_chans:
            return
    if is_traced(x):
        return
    _bad_image_batch(x, in_chans)


def _bad_image_batch(x: object, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.dim() != 4:
        hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"expected a 4-D image batch B x {in_chans} x H x W, got shape {tuple(x.shape)}{hint}")
    raise ValueError(
        f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
        f"build the model with in_chans={x.shape[1]} or convert the images"
    )


def build_model(cls: type[nn.Module], variant: str, pretrained: bool = False, *, device: Any = None,
                dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with timm's factory keywords: parameters and buffers made on ``device``.

    Args:
        cls: the model class.
        variant: the registered name.
        pretrained: load the configuration's weights.
        device: where to create the model (e.g. ``"meta"`` for shapes only); None: the default device.
        dtype: floating-point dtype of the parameters and buffers; None: the default dtype.
        kwargs: the class's arguments and ``build_model_with_cfg``'s (``feature_cfg``, ``features_only``, ...).
    """
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(cls, variant, pretrained, **kwargs)
    return model if dtype is None else model.to(dtype=dtype)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan-out) convolutions, unit BatchNorm, zero biases, as in timm's ResNet."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ClassifierMixin:
    """timm's classifier API on top of ``forward_features``.

    The class sets ``num_classes``, ``num_features``, ``drop_rate``, ``global_pool``, ``fc``,
    ``in_chans`` and ``grad_checkpointing``, and lists its stages in ``stage_names``.
    """

    stage_names: tuple[str, ...] = ()

    def _init_head(self, num_features: int, num_classes: int, global_pool: str) -> None:
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)

    @torch.jit.unused
    def _checkpoint_stages(self, x: torch.Tensor) -> torch.Tensor:
        # One checkpoint per stage. The models' forward_features call the stages by name otherwise,
        # which TorchScript and FX need (and which skips building a list every call).
        return checkpoint_seq([getattr(self, name) for name in self.stage_names], x)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        like = next(self.parameters())  # the new head takes the model's device, dtype and mode
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        for head in (self.global_pool, self.fc):
            head.to(device=like.device, dtype=like.dtype).train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def downsample_avg(inplanes: int, outplanes: int, stride: int, norm: bool = True, dilated: bool = False,
                   norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    """ResNet-D shortcut: AvgPool(stride) -> Conv1x1 [-> norm]; the pool is an identity at stride 1.

    ``ceil_mode`` keeps the shortcut the size of the strided 3x3 convolution on odd inputs
    (7 -> 4, not 3), e.g. for 28x28 Fashion-MNIST images.

    Args:
        inplanes: input channels.
        outplanes: output channels.
        stride: the stage's stride (of the undilated network).
        norm: end with a norm layer.
        dilated: the stage trades its stride for dilation (``output_stride``): the pool keeps its
            window but moves by 1, zero-padded after (timm's ``downsample_avg``: ``AvgPool2dSame(2, 1)``),
            so the shortcut keeps the map's size and sees what the strided pool saw.
        norm_layer: the norm layer class.
    """
    if stride == 1:
        pool = nn.Identity()
    elif dilated:
        # timm's AvgPool2dSame pads by an amount it computes from the input's size at run time, which
        # plain torch.fx cannot trace; at stride 1 that amount is a constant, so pad it statically
        # (the same zeros, the same bits).
        pool = nn.Sequential(nn.ZeroPad2d(((stride - 1) // 2, stride // 2, (stride - 1) // 2, stride // 2)),
                             nn.AvgPool2d(stride, 1))
    else:
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
    layers = [pool, nn.Conv2d(inplanes, outplanes, 1, bias=False)]
    if norm:
        layers.append(norm_layer(outplanes))
    return nn.Sequential(*layers)


def make_stages(block_cls: type[nn.Module], layers: Sequence[int], inplanes: int, widths: Sequence[int],
                strides: Sequence[int], reduction: int, fusions: Sequence[str], r: int,
                drop_path_rate: float = 0.0, downsample_norm: bool = True, output_stride: int | None = None,
                **block_kwargs) -> tuple[list[nn.Sequential], list[dict]]:
    """Build residual stages whose blocks take ``(inplanes, planes, stride, downsample, fusion=, r=, drop_path=)``.

    The first block of a stage gets an average-pool shortcut when the stride or width changes;
    stochastic depth rises linearly over all blocks. Returns the stages and their feature info
    (module names ``layer1``, ``layer2``, ...).

    With ``output_stride``, a stage that would take the network's stride past it dilates instead,
    as timm's ``make_blocks``: its stride becomes 1 and its dilation the product of the strides
    given up; the first 3x3 convolution of the stage's first block keeps the previous stage's
    dilation. The blocks then also get ``dilation=`` and ``first_dilation=`` (without it, neither).

    A ``norm_layer`` of the blocks (in ``block_kwargs``) is the shortcut projections' norm too.

    Args:
        output_stride: largest reduction of the output (None: the strides as given).
    """
    stages, info = [], []
    total, idx = sum(layers), 0
    dilation = prev_dilation = 1
    norm_layer = block_kwargs.get("norm_layer", nn.BatchNorm2d)
    for stage_idx, (depth, planes, stride, fusion) in enumerate(zip(layers, widths, strides, fusions, strict=True)):
        dilated = output_stride is not None and stride > 1 and reduction >= output_stride
        if dilated:
            dilation *= stride
        else:
            reduction *= stride
        conv_stride = 1 if dilated else stride
        outplanes = planes * block_cls.expansion
        blocks = []
        for i in range(depth):
            downsample = None
            if i == 0 and (stride != 1 or inplanes != outplanes):
                downsample = downsample_avg(inplanes, outplanes, stride, norm=downsample_norm, dilated=dilated,
                                            norm_layer=norm_layer)
            if output_stride is not None:
                block_kwargs.update(dilation=dilation, first_dilation=prev_dilation)
            blocks.append(block_cls(inplanes, planes, conv_stride if i == 0 else 1, downsample, fusion=fusion, r=r,
                                    drop_path=drop_path_rate * idx / max(total - 1, 1), **block_kwargs))
            prev_dilation = dilation
            inplanes = outplanes
            idx += 1
        stages.append(nn.Sequential(*blocks))
        info.append(dict(num_chs=outplanes, reduction=reduction, module=f"layer{stage_idx + 1}"))
    return stages, info
