"""Smoke test of an installed open-aff (wheel or sdist) in a venv of its own, outside the source tree."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import timm
import torch

import openaff

assert "site-packages" in Path(openaff.__file__).parts, f"imported from the source tree: {openaff.__file__}"
assert openaff.__version__ == importlib.metadata.version("open-aff"), openaff.__version__
from openaff.training import recipe_names  # noqa: E402  (the recipes are package data)

assert "fashion-mnist-cpu" in recipe_names(), recipe_names()
assert (Path(openaff.__file__).parent / "py.typed").is_file(), "py.typed is not installed"  # PEP 561 marker
model = timm.create_model("iaff_cifar_resnet8", in_chans=1, num_classes=10, width_mult=0.25).eval()
with torch.no_grad():
    out = model(torch.randn(2, 1, 28, 28))
assert out.shape == (2, 10) and torch.isfinite(out).all()
listing = subprocess.run([Path(sys.executable).with_name("openaff"), "models"], check=True, capture_output=True,
                         text=True).stdout
assert "aff_resnet50" in listing and "30,373,192" in listing, listing[:500]
print(f"open-aff {openaff.__version__} installed from {Path(openaff.__file__).parent}: smoke test passed")
