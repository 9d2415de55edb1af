"""Where the fusion sits and which models realise it: the study's scenarios, as data (same-layer, short-skip,
long-skip)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError


class StudyError(ConfigError):
    """A bad study setting, a run folder that does not belong to the study, or a run that failed."""


DATA_CHOICES = ("fashion-mnist", "fashion-mnist-scenes", "cifar10", "cifar100")  # what --data names


@dataclass(frozen=True)
class Family:
    """A model family of a scenario: ``pattern.format(depth=mult * b + add)`` names its members.

    Every member accepts ``fusion=`` and ``b=``, so a b without a registered name uses another member
    with ``b=`` (the family's docstrings say so).
    """

    pattern: str
    mult: int
    add: int
    label: str  # e.g. "ResNet-{depth}"

    def depth(self, b: int) -> int:
        return self.mult * b + self.add

    def members(self) -> list[str]:
        import timm

        return timm.list_models(self.pattern.format(depth="*"))


@dataclass(frozen=True)
class Scenario:
    """Where the fusion sits, which models realise it, and which metrics.csv column measures it.

    Args:
        name: the ``--scenario`` name (and the paper's column group in :data:`PAPER`).
        title: a few words for tables and plots.
        metric: the metrics.csv column whose best value over the epochs is reported.
        metric_label: how the metric is named in tables (with its unit).
        families: ``--family`` name -> model family; the first is the default.
        train: the function that trains one run's :class:`TrainConfig` (default: ``openaff train``'s); it is
            called as ``train(cfg, overwrite=...)`` or ``train(cfg, resume=folder)`` and writes the run
            folder, metrics.csv with the ``metric`` column included.
        data_kinds: the data sets it trains on.
    """

    name: str
    title: str
    metric: str = "val_top1"
    metric_label: str = "top-1 (%)"
    families: dict[str, Family] = field(default_factory=dict)
    train: Callable | None = None
    data_kinds: tuple[str, ...] = DATA_CHOICES

    def family(self, name: str | None) -> tuple[str, Family]:
        if not self.families:
            raise StudyError(f"scenario {self.name} has no model family")
        key = name or next(iter(self.families))
        if key not in self.families:
            raise StudyError(f"scenario {self.name} has no model family {key!r}; choose one of "
                             f"{', '.join(self.families)}")
        return key, self.families[key]

    def model(self, fusion: str, b: int, family: str | None = None) -> tuple[str, dict]:
        """``(timm model name, model_kwargs)`` of the cell ``(fusion, b)``."""
        key, fam = self.family(family)
        members = fam.members()
        if not members:
            raise StudyError(f"scenario {self.name}: model family not available (no timm model "
                             f"{fam.pattern.format(depth='*')} is registered in this version of openaff)")
        name = fam.pattern.format(depth=fam.depth(b))
        base, r = split_fusion_spec(fusion)
        return (name if name in members else members[0]), dict(fusion=base, b=b, **({"r": r} if r else {}))


def split_fusion_spec(spec: str) -> tuple[str, int | None]:
    """``"aff@r2"`` -> ``("aff", 2)``: a fusion type at another channel reduction (a budget control, e.g. AFF's
    one bottleneck MS-CAM at r = 2 has the attention parameters of MS-GAU's single layer or iAFF's two at r = 4);
    ``"aff"`` -> ``("aff", None)`` (the model's default r)."""
    base, at, r = spec.partition("@r")
    if not at:
        return spec, None
    if not r.isdigit() or int(r) < 1:
        raise StudyError(f"fusion {spec!r}: write a reduction as NAME@rK with K a positive integer, e.g. aff@r2")
    return base, int(r)


SCENARIOS: dict[str, Scenario] = {}


def register_scenario(scenario: Scenario) -> Scenario:
    """Add (or replace) a scenario of ``openaff study``; returns it."""
    SCENARIOS[scenario.name] = scenario
    return scenario


register_scenario(Scenario("same-layer", "same layer (Inception-style cells)", families={
    "resnet": Family("cifar_inception_resnet{depth}", 6, 2, "Inception-ResNet-{depth}")}))


register_scenario(Scenario("short-skip", "short skip (ResNet blocks)", families={
    "resnet": Family("cifar_resnet{depth}", 6, 2, "ResNet-{depth}"),
    "resnext": Family("cifar_resnext{depth}_32x4d", 9, 2, "ResNeXt-{depth}-32x4d")}))


# The fusion in every top-down merge of the FPN (the encoder's blocks add), through the same training engine.
register_scenario(Scenario("long-skip", "long skip (FPN top-down merges)", metric="val_miou", metric_label="mIoU (%)",
                           families={"resnet": Family("fpn_cifar_resnet{depth}", 6, 2, "FPN-ResNet-{depth}")},
                           data_kinds=("fashion-mnist-scenes",)))
