"""Fusion layers: one MS-CAM implementation shared by every fusion type and model family."""

from .fused_ops import (
    attention_blend,
    attention_weight,
    fusion_kernels,
    fusion_recompute,
    set_fusion_kernels,
    set_fusion_recompute,
)
from .fusion import (
    AFF,
    IAFF,
    MSGAU,
    MSSA,
    MSSE,
    AddFusion,
    ConcatFusion,
    create_fusion,
    fusion_names,
    register_fusion,
)
from .mscam import MSCAM, ContextBatchNorm2d

__all__ = [
    "AFF",
    "IAFF",
    "MSCAM",
    "MSGAU",
    "MSSA",
    "MSSE",
    "AddFusion",
    "ConcatFusion",
    "ContextBatchNorm2d",
    "attention_blend",
    "attention_weight",
    "create_fusion",
    "fusion_kernels",
    "fusion_names",
    "fusion_recompute",
    "register_fusion",
    "set_fusion_kernels",
    "set_fusion_recompute",
]
