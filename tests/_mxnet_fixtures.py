"""Where the MXNet fixtures are: the compact set inside the project, the large ones in ``../shared``.

Only paths are computed here (no file is read at import), so a clone without ``../shared`` beside it
collects every test and skips, with one line, just those that need the large fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
COMPACT = TESTS / "fixtures" / "mxnet" / "compact"
# ../shared relative to the project root (the folder that holds tests/).
SHARED = TESTS.parent.parent / "shared" / "fixtures" / "mxnet"
CIFAR = SHARED / "cifar"
IMAGENET = SHARED / "imagenet"

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"large MXNet fixtures not found at {SHARED} (../shared beside the project)")

# Compact set: file stem -> (our model, the kwargs the converter must infer).
COMPACT_FILES = {
    "aff_cifar_resnet_b1_c1_k10": ("aff_cifar_resnet8", dict(width_mult=0.25, num_classes=10, in_chans=3, r=4)),
    "aff_cifar_resnet_b1_c1_k10.fp16": ("aff_cifar_resnet8",
                                        dict(width_mult=0.25, num_classes=10, in_chans=3, r=4)),
    "iaff_cifar_resnet_b2_c1_k10_s2": ("iaff_cifar_resnet14", dict(width_mult=0.25, num_classes=10, in_chans=3, r=4,
                                                                   fusion_stages=(2, 3))),
}
# Large set in ../shared/fixtures/mxnet/cifar: file stem -> our model.
SHARED_FILES = {
    "aff_cifar_resnet_b1": "aff_cifar_resnet8",
    "iaff_cifar_resnet_b1": "iaff_cifar_resnet8",
    "aff_cifar_resnext_b1": "aff_cifar_resnext11_32x4d",
    "iaff_cifar_resnext_b1": "iaff_cifar_resnext11_32x4d",
    "iaff_cifar_resnext_b1.fp16": "iaff_cifar_resnext11_32x4d",
}
