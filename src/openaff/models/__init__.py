"""The paper's models, registered with timm on import (``timm.create_model("aff_resnet50")``)."""

from .aff_cifar import AFFCifarPreActResNet, AFFCifarResNeXt, PreActBlock
from .aff_inception import AFFCifarInceptionResNet as AFFCifarInceptionResNet  # registers the same-layer family
from .aff_resnet import AFFResNet, FusionBasicBlock, FusionBottleneck

__all__ = ["AFFCifarPreActResNet", "AFFCifarResNeXt", "AFFResNet", "FusionBasicBlock", "FusionBottleneck",
           "PreActBlock"]
