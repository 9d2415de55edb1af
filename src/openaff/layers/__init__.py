"""Fusion layers: one MS-CAM implementation shared by every fusion type and model family."""

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
    "create_fusion",
    "fusion_names",
    "register_fusion",
]
