"""The earlier home of :mod:`openaff.folding` (BatchNorm folding for inference), kept so that
``openaff.inference.fuse_for_inference``, as earlier README versions wrote it, keeps working."""

from .folding import fold_conv_bn, fuse_for_inference

__all__ = ["fold_conv_bn", "fuse_for_inference"]
