"""A pytest plugin for running timm's own ``tests/test_models.py`` on our models (``pytest -p _timm_models_plugin``).

It registers our models with timm before timm's file is collected (its ``parametrize`` lists call
``timm.list_models`` at import) and keeps the tests whose ``model_name`` is one of ours, by timm's own
selection: every test timm parametrizes over ``list_models(...)`` with its filters, for the registered names
in ``OPENAFF_TIMM_MODELS`` (comma-separated; default: all of ours), tags (``aff_resnet50.authors_in1k``)
included. timm's tests of its own models are deselected.
"""

import os

import openaff  # noqa: F401  (registers the models with timm)
from openaff.catalog import list_openaff_models


def _selected() -> set[str]:
    names = os.environ.get("OPENAFF_TIMM_MODELS")
    return set(names.split(",")) if names else set(list_openaff_models())


def pytest_configure(config) -> None:
    # timm's file marks its tests with pytest-timeout's marker, which is not among our dependencies.
    config.addinivalue_line("markers", "timeout(seconds): per-test time limit (pytest-timeout; ignored without it)")


def pytest_collection_modifyitems(config, items) -> None:
    ours = _selected()
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        (keep if isinstance(name, str) and name.split(".")[0] in ours else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
