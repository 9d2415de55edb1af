"""Semantic segmentation with attentional feature fusion: AFF-FPN models, data, metrics, pictures.

::

    import openaff.segmentation as seg
    model = seg.create_segmenter("aff_fpn", encoder="aff_resnet50", num_classes=21)   # any timm encoder
    small = seg.create_segmenter("aff_fpn_cifar_resnet20", num_classes=11, in_chans=1)  # the paper's small model

``import openaff`` registers the segmenters with timm (``timm.create_model("aff_fpn_cifar_resnet20")``),
so a trained run folder loads with ``timm.create_model("local-dir:RUN", pretrained=True)`` like any model. Training,
resuming, DDP and evaluation are the classification engine's (``openaff train`` with a segmentation
model; ``openaff segment`` for pictures). Modules: ``fpn`` (the models), ``data`` (scenes masks, VOC
folders, joint augmentation), ``metrics`` (confusion matrix, mIoU), ``predict`` (overlays, grids),
``task`` (segmentation as a task of the training engine), ``cli``.
"""

from .fpn import SEGMENTERS, FPNMerge, FusionFPN, create_segmenter, is_segmenter
from .metrics import IGNORE_INDEX, confusion_matrix, scores
from .task import SEGMENT  # registers the segmentation task with the training engine

__all__ = ["IGNORE_INDEX", "SEGMENT", "SEGMENTERS", "FPNMerge", "FusionFPN", "confusion_matrix", "create_segmenter",
           "is_segmenter", "scores"]
