"""open-aff: Attentional Feature Fusion (Dai et al., WACV 2021) in PyTorch.

Importing the package registers its models with timm, the segmenters (AFF-FPN) too::

    import openaff, timm
    model = timm.create_model("aff_resnet50")
    fpn = timm.create_model("aff_fpn", encoder="aff_resnet50", num_classes=21)

The jobs of the command line are functions here too: ``openaff.train``, ``openaff.evaluate``,
``openaff.load_pretrained`` (imported on first use, so that ``import openaff`` stays light).
"""

from importlib import import_module
from typing import Any

from . import models
from .layers import (
    AFF,
    FUSION_SCENARIOS,
    IAFF,
    MSCAM,
    MSGAU,
    MSSA,
    MSSE,
    AddFusion,
    AFFGlobalGlobal,
    AFFLocalLocal,
    AlignedFusion,
    ConcatAFF,
    ConcatFusion,
    ContextSyncBatchNorm,
    HalfAFF,
    MSCAMAttention,
    MultiInputAFF,
    MultiInputIAFF,
    RecursiveAFF,
    convert_sync_batchnorm,
    create_fusion,
    fusion_names,
    fusion_options,
    register_fusion,
)
from .necks import FusionFeaturePyramidNetwork, FusionFPNBackbone  # torchvision detection necks
from .segmentation import create_segmenter  # registers fpn, aff_fpn, aff_fpn_cifar_resnet20, ... with timm

__version__ = "0.1.0"

# name -> module that defines it; loaded by __getattr__ on first access.
_LAZY = {"train": "openaff.training.train", "evaluate": "openaff.training.evaluate",
         "load_pretrained": "openaff.hub", "save_pretrained": "openaff.hub"}

__all__ = ["AFF", "IAFF", "MSCAM", "MSGAU", "MSSA", "MSSE", "FUSION_SCENARIOS", "AFFGlobalGlobal", "AFFLocalLocal",
           "AddFusion", "AlignedFusion", "ConcatAFF", "ConcatFusion", "ContextSyncBatchNorm", "FusionFPNBackbone",
           "FusionFeaturePyramidNetwork", "HalfAFF",
           "MSCAMAttention", "MultiInputAFF", "MultiInputIAFF", "RecursiveAFF", "convert_sync_batchnorm",
           "create_fusion", "create_segmenter", "evaluate", "fusion_names", "fusion_options", "load_pretrained",
           "models", "register_fusion", "save_pretrained", "train"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'openaff' has no attribute {name!r}")
