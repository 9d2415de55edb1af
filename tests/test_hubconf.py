"""hubconf.py: torch.hub.load(<clone>, NAME, source="local") builds every registered model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch

from openaff.catalog import list_openaff_models
from openaff.segmentation import SEGMENTERS

ROOT = Path(__file__).resolve().parents[1]


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_hub_load_builds_the_timm_model() -> None:
    model = torch.hub.load(str(ROOT), "aff_cifar_resnet8", source="local", num_classes=10, width_mult=0.25)
    assert _shapes(model) == _shapes(timm.create_model("aff_cifar_resnet8", num_classes=10, width_mult=0.25))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_hub_load_aff_resnet50_has_the_published_size() -> None:
    with torch.device("meta"):  # the full model's shapes, no memory
        model = torch.hub.load(str(ROOT), "aff_resnet50", source="local")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 30_373_192


def test_every_registered_model_is_an_entry_point() -> None:
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    names = [*list_openaff_models(), *SEGMENTERS]
    assert len(names) > 50 and all(callable(getattr(hubconf, n, None)) for n in names)
    assert all(importlib.util.find_spec(d) is not None for d in hubconf.dependencies)


def test_pretrained_is_refused_with_the_way_to_the_weights() -> None:
    with pytest.raises(ValueError, match="openaff convert FILE -o DIR"):
        torch.hub.load(str(ROOT), "iaff_resnet50", source="local", pretrained=True)
