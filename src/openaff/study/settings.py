"""A study's settings: the base configuration from a recipe and the command line, the fusion types, depths and
seeds, and the facts of its models."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..data.datasets import DATASET_STATS, resolve_source
from ..layers import fusion_names
from ..training.config import TrainConfig, make_config
from ..training.tasks import task_for_model
from .paper import TABLE_FUSIONS
from .runs import IGNORED_FIELDS, config_differences, yaml_data
from .scenarios import DATA_CHOICES, Scenario, StudyError, split_fusion_spec

OVERRIDES = ("epochs", "limit_train", "limit_val", "width_mult")  # study-level: part of every run's numbers


def parse_data(spec: str) -> tuple[str, str | None]:
    """``"cifar100:DIR"`` -> ``("cifar100", "DIR")``; ``"fashion-mnist"`` -> ``("fashion-mnist", None)``."""
    kind, sep, folder = spec.partition(":")
    if kind not in DATA_CHOICES or (sep and not folder):
        raise StudyError(f"--data must be fashion-mnist, fashion-mnist-scenes, cifar10:DIR or cifar100:DIR "
                         f"(fashion-mnist:DIR for another copy), got {spec!r}")
    if kind.startswith("cifar") and not folder:
        raise StudyError(f"--data {kind} needs the folder of the CIFAR python batches: --data {kind}:DIR")
    return kind, (os.path.expanduser(folder) if folder else None)


@dataclass
class StudySettings:
    """What a study is: its grid and the base configuration every run shares (stored in study.json)."""

    scenario: str
    family: str
    fusions: list[str]
    depths: list[int]
    seeds: int
    table: int | None
    recipe: str
    base: dict  # the base TrainConfig as YAML data, without model, seed and output


def _parse_list(text: str | Sequence, what: str, cast: Callable) -> list:
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    if not items or any(s == "" for s in items):
        raise StudyError(f"--{what} must be a comma-separated list, got {text!r}")
    out = []
    for s in items:
        try:
            value = cast(s)
        except (TypeError, ValueError):
            raise StudyError(f"--{what}: {s!r} is not valid (expected integers >= 1, e.g. 1,2,3,4)") from None
        out.append(value)
    return list(dict.fromkeys(out))


def _depth(text: Any) -> int:
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise ValueError(text)
    value = int(text)
    if value < 1 or value > 100:
        raise ValueError(text)
    return value


def _fusions(fusions: str | Sequence[str] | None, table: int | None) -> list[str]:
    if fusions is not None and table is not None:
        raise StudyError("give --fusions or --table (which selects a paper table's rows), not both")
    if table is not None:
        if table not in TABLE_FUSIONS:
            raise StudyError(f"--table must be one of {', '.join(map(str, TABLE_FUSIONS))} (the paper's tables of "
                             f"fusion types), got {table!r}")
        names = list(TABLE_FUSIONS[table])
    elif fusions is None:
        names = list(TABLE_FUSIONS[4])
    else:
        names = _parse_list(fusions, "fusions", str)
    valid = fusion_names()
    bad = [n for n in names if split_fusion_spec(n)[0] not in valid]
    if bad:
        where = f"Table {table}'s " if table is not None else ""
        raise StudyError(f"unknown fusion type(s) {', '.join(bad)} in {where}--fusions; this openaff has "
                         f"{', '.join(valid)}")
    return names


def _base_config(scn: Scenario, recipe: str, data: str | None, cifar100_labels: str | None, overrides: dict,
                 threads: int | None) -> TrainConfig:
    values: dict[str, Any] = {}
    if data is not None:
        kind, folder = parse_data(data)
        values.update(data=kind, data_dir=folder)
        if kind == "cifar100":
            values["cifar100_labels"] = "coarse"  # the paper's 20 superclasses (AFF.md section 4)
    if cifar100_labels is not None:
        values["cifar100_labels"] = cifar100_labels
    for key in ("epochs", "limit_train", "limit_val"):
        if overrides.get(key) is not None:
            values[key] = overrides[key]
    if threads is not None:
        values["threads"] = threads
    if data is not None and values["data"] != make_config(recipe).data:
        # The recipe's input size belongs to its own data set (study-cpu: 48 px scenes), not to another one.
        values["img_size"] = None
    base = make_config(recipe, **values)
    if overrides.get("width_mult") is not None:
        base = make_config({**asdict(base), "model_kwargs": {**base.model_kwargs,
                                                             "width_mult": overrides["width_mult"]}})
    if base.data not in scn.data_kinds:
        where = f"recipe {recipe} has data" if data is None else "not"
        raise StudyError(f"scenario {scn.name} trains on {', '.join(scn.data_kinds)}; {where} {base.data!r}")
    if base.data.startswith("cifar") and base.data_dir is None:
        raise StudyError(f"--data {base.data} needs the folder of the CIFAR python batches: --data {base.data}:DIR")
    return base


def _base_data(base: TrainConfig) -> dict:
    data = yaml_data(base)
    for key in ("model", "seed", *IGNORED_FIELDS):
        data.pop(key, None)
    return data


def _data_facts(cfg: TrainConfig) -> tuple[int, int, int]:
    """``(num_classes, in_chans, img_size)`` of the study's data, which is loaded (validation split) to check it.

    Loaded as training will load it: a segmenter's masks have one class more (background) than the
    scenes' labels, and its parameter count depends on that.
    """
    kind, _ = resolve_source(cfg.data, cfg.data_dir)
    mean, std = DATASET_STATS[kind]
    data = task_for_model(cfg.model).load_data(cfg, kind, False, mean, std)
    return data.num_classes, data.in_chans, data.img_size


@functools.cache
def _model_facts(model: str, kwargs_json: str, num_classes: int, in_chans: int, size: int) -> tuple[int, float]:
    """Trainable parameters and GMACs (multiply-adds, as ``openaff models``) at the data's input size; no memory."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = timm.create_model(model, num_classes=num_classes, in_chans=in_chans, **json.loads(kwargs_json))
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.empty(1, in_chans, size, size, device="meta"))
    return sum(p.numel() for p in net.parameters() if p.requires_grad), counter.get_total_flops() / 2e9


def _facts_of(model: str, kwargs: dict, num_classes: int, in_chans: int, size: int) -> tuple[int, float]:
    try:
        return _model_facts(model, json.dumps(kwargs, sort_keys=True), num_classes, in_chans, size)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise StudyError(f"model {model} with {kwargs}: {' '.join(str(err).split())}") from None


def _merge(old: list, new: list) -> list:
    return list(dict.fromkeys([*old, *new]))


def _adopt(out: Path, settings: StudySettings) -> StudySettings:
    """The settings of a study continued in ``out``: the grids merged; the base configuration must not change."""
    path = out / "study.json"
    if not path.is_file():
        if (out / "runs").is_dir() and any((out / "runs").iterdir()):
            raise StudyError(f"{out} holds runs/ but no study.json; give another --output")
        return settings
    old = _load_settings(out)
    for key in ("scenario", "family"):
        if getattr(old, key) != getattr(settings, key):
            raise StudyError(f"{out} holds a {key} {getattr(old, key)} study, not {getattr(settings, key)}; "
                             "give another --output")
    diff = config_differences(old.base, settings.base, set())
    if diff:
        k = diff[0]
        raise StudyError(f"{out} holds a study with {k}={old.base.get(k)!r}, not {settings.base.get(k)!r}; only "
                         "fusion types, depths and seeds may be added to a study: give another --output")
    return replace(settings, fusions=_merge(old.fusions, settings.fusions),
                   depths=_merge(old.depths, settings.depths), seeds=max(old.seeds, settings.seeds),
                   table=settings.table if settings.table == old.table else None)


def _load_settings(out: Path) -> StudySettings:
    path = out / "study.json"
    try:
        data = json.loads(path.read_text())
        return StudySettings(**data["settings"])
    except FileNotFoundError:
        raise StudyError(f"{out} holds no study (no study.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise StudyError(f"cannot read {path}: {' '.join(str(err).split())}") from None
