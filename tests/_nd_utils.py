"""Helpers of the issue-21 layer tests: random weights in any rank, N-d modules as their 2-D equivalents."""

import torch
from torch import nn


def randomize_nd(module: nn.Module) -> None:
    """Random BN statistics and affine parameters, random conv weights and biases, in every rank."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, nn.modules.conv._ConvNd):
                m.weight.normal_(0, 0.3)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)


def as_2d_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a 1-D or 3-D module with its 1x1 convolution weights as 2-D ``O x I x 1 x 1`` ones."""
    return {k: v.reshape(*v.shape[:2], 1, 1) if k.endswith("weight") and v.dim() in (3, 5) else v.clone()
            for k, v in module.state_dict().items()}


def as_2d_input(x: torch.Tensor) -> torch.Tensor:
    """``B x C x L`` as ``B x C x L x 1``, ``B x C x D x H x W`` as ``B x C x D x (H·W)``: every MS-CAM op is
    pointwise or global over the positions, so a module of another rank computes what the 2-D one does on this."""
    if x.dim() == 3:
        return x.unsqueeze(-1)
    if x.dim() == 5:
        return x.flatten(3)
    return x
