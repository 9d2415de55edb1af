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


def check_timm_head(model, x, feature_shape: tuple[int, ...], num_classes: int) -> None:  # noqa: ANN001
    """timm's head API on ``model``: features of ``feature_shape``, pooled pre-logits, logits, a new classifier."""
    n = x.shape[0]
    feats = model.forward_features(x)
    assert feats.shape == feature_shape
    assert model.forward_head(feats, pre_logits=True).shape == (n, feature_shape[1])
    assert model.forward_head(feats).shape == (n, num_classes)
    model.reset_classifier(3)
    assert model(x).shape == (n, 3) and model.get_classifier().out_features == 3
