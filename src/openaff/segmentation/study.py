"""The long-skip column of ``openaff study``: fusion types x depth b in the FPN on the pre-activation ResNet-b, mIoU.

Importing this module replaces the study's placeholder ``long-skip`` scenario with the real one
(:func:`openaff.study.register_scenario`): each cell trains ``fpn_cifar_resnet{6b+2}`` with
``fusion=<type>`` in every top-down merge (the encoder's blocks add), through the same training
engine, and the table reports the best validation mIoU (%). Use a segmentation recipe (its data
must have masks)::

    openaff study --scenario long-skip --recipe segment-cpu --fusions add,aff --depths 1 --seeds 3 --jobs 2
"""

from __future__ import annotations

from ..study import Family, Scenario, register_scenario
from . import fpn  # noqa: F401  (registers fpn_cifar_resnet{depth} with timm: the family's members)

__all__ = ["LONG_SKIP"]

LONG_SKIP = register_scenario(Scenario(
    "long-skip", "long skip (FPN top-down merges)", metric="val_miou", metric_label="mIoU (%)",
    families={"resnet": Family("fpn_cifar_resnet{depth}", 6, 2, "FPN-ResNet-{depth}")},
    data_kinds=("fashion-mnist-scenes",)))
