"""torch.hub entry points: every model open-aff registers with timm, from a clone of this repository.

    model = torch.hub.load("/path/to/clone", "aff_resnet50", source="local")
    model = torch.hub.load("/path/to/clone", "iaff_cifar_resnet32", source="local", in_chans=1, num_classes=10)

The names are those of ``openaff models`` and the segmenters of ``openaff segment models``.

Each entry point is ``timm.create_model(NAME, **kwargs)`` with freshly initialised weights. No weights are
hosted: the authors' are converted from their MXNet files (``openaff convert FILE -o DIR``) and loaded with
``timm.create_model("local-dir:DIR", pretrained=True)``, so ``pretrained=True`` is refused with that advice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

dependencies = ["torch", "torchvision", "timm", "safetensors", "numpy", "yaml"]

if "openaff" not in sys.modules:  # the clone's own package (src layout), ahead of any installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import timm  # noqa: E402
from torch import nn  # noqa: E402

import openaff  # noqa: E402, F401  (registers the models with timm)
from openaff.catalog import list_openaff_models  # noqa: E402
from openaff.segmentation import SEGMENTERS  # noqa: E402


def _entry_point(name: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"no pretrained weights of {name} are hosted; convert the authors' MXNet file with "
                             "`openaff convert FILE -o DIR` and load timm.create_model(\"local-dir:DIR\", "
                             "pretrained=True)")
        return timm.create_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"``timm.create_model({name!r}, **kwargs)`` (open-aff), freshly initialised.\n\n"
                     "Args:\n    pretrained: must be False (no weights are hosted).\n"
                     "    **kwargs: timm.create_model keywords, e.g. num_classes, in_chans.")
    return entry


for _name in [*list_openaff_models(), *SEGMENTERS]:
    globals()[_name] = _entry_point(_name)
del _name
