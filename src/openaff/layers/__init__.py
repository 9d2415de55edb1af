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
    FUSION_SCENARIOS,
    IAFF,
    MSGAU,
    MSSA,
    MSSE,
    AddFusion,
    AFFGlobalGlobal,
    AFFLocalLocal,
    ConcatAFF,
    ConcatFusion,
    HalfAFF,
    NormedAddFusion,
    RecursiveAFF,
    create_fusion,
    fusion_names,
    fusion_options,
    register_fusion,
)
from .fusion_aligned import AlignedFusion, Projection
from .fusion_multi import MultiInputAFF, MultiInputIAFF
from .mscam import MSCAM, ContextBatchNorm1d, ContextBatchNorm2d, ContextBatchNorm3d
from .mscam_attention import MSCAMAttention
from .sync_batchnorm import ContextSyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "AFF",
    "IAFF",
    "MSCAM",
    "MSCAMAttention",
    "MSGAU",
    "MSSA",
    "MSSE",
    "FUSION_SCENARIOS",
    "AFFGlobalGlobal",
    "AFFLocalLocal",
    "AddFusion",
    "NormedAddFusion",
    "AlignedFusion",
    "ConcatAFF",
    "ConcatFusion",
    "ContextBatchNorm1d",
    "ContextBatchNorm2d",
    "ContextBatchNorm3d",
    "ContextSyncBatchNorm",
    "HalfAFF",
    "MultiInputAFF",
    "MultiInputIAFF",
    "Projection",
    "RecursiveAFF",
    "attention_blend",
    "attention_weight",
    "convert_sync_batchnorm",
    "create_fusion",
    "fusion_kernels",
    "fusion_names",
    "fusion_options",
    "fusion_recompute",
    "register_fusion",
    "set_fusion_kernels",
    "set_fusion_recompute",
]
