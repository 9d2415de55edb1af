"""The Python names the README promises exist where it says they are."""

import inspect

import pytest

import openaff
from openaff import hub, layers
from openaff.training import evaluate as evaluate_module
from openaff.training import train as train_module


def test_top_level_functions_are_the_commands_functions() -> None:
    assert openaff.train is train_module.train
    assert openaff.evaluate is evaluate_module.evaluate
    assert openaff.load_pretrained is hub.load_pretrained and openaff.save_pretrained is hub.save_pretrained
    assert list(inspect.signature(openaff.train).parameters)[:2] == ["config", "resume"]


def test_the_module_table_names_import_from_the_package() -> None:
    for name in ("AFF", "IAFF", "MSCAM", "AddFusion", "MSSE", "MSGAU", "MSSA", "ConcatFusion", "AFFGlobalGlobal",
                 "AFFLocalLocal", "HalfAFF", "ConcatAFF", "RecursiveAFF", "fusion_options", "FUSION_SCENARIOS"):
        assert getattr(openaff, name) is getattr(layers, name)
        assert name in openaff.__all__


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        openaff.nosuch  # noqa: B018


def test_segmenters_come_with_the_package() -> None:
    import timm

    from openaff.segmentation import fpn

    assert openaff.create_segmenter is fpn.create_segmenter and "create_segmenter" in openaff.__all__
    # `import openaff` registers them: a run folder's "load with" line needs nothing else.
    assert {"fpn", "aff_fpn", "iaff_fpn", "aff_fpn_cifar_resnet20"} <= set(timm.list_models("*fpn*"))
