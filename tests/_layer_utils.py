"""Helpers shared by the layer tests."""

import torch


def randomize(module: torch.nn.Module) -> None:
    """Random BN statistics and affine parameters, random conv weights and biases, so a wrong branch,
    index or folding shows up (a fresh module's BNs are identities)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
                m.bias.uniform_(-0.2, 0.2)
