"""``openaff study``: the paper's fusion study as a grid of ordinary training runs, and its tables.

Every cell of the grid (fusion type × depth b × seed) is one ``openaff train`` run with its own run
folder, ``OUT/runs/<fusion>-b<b>-s<seed>`` (config.yaml, model.safetensors + config.json, metrics.csv,
last.pt), trained from one base recipe with only the model (scenario, fusion, b) and the seed
changed. The study is aggregated into ``OUT/table.md`` (fusion × depth: mean ± std over seeds of the
best validation metric over all epochs, as the authors reported; final-epoch metric; parameters;
the paper's number beside), ``OUT/study.json`` and ``OUT/results.csv`` (every run) and
``OUT/study.png`` (metric against depth and against parameters).

Examples::

    openaff study --scenario short-skip --fusions add,aff,iaff --depths 1 --seeds 3 --jobs 2
    openaff study --table 3 --data cifar100:~/data/cifar-100-python --recipe study-gpu
    openaff study --summarize runs/study-short-skip-fashion-mnist-20260101-120000

Rerunning the same command (with ``--output OUT``) continues a study: finished runs are read, an
interrupted one is resumed exactly from its last.pt, missing ones are trained. More fusion types,
depths or seeds may be added to a study; its base configuration (recipe, data, overrides) may not
change, and a run folder whose configuration differs from what the study asks is refused.
``--jobs N`` trains N runs at a time, each a single-threaded ``python -m openaff train`` process
(on a 2-core CPU two 1-thread processes beat one 2-thread one); the numbers are the same as with
``--jobs 1`` at the same thread count. Ctrl-C stops every run at its last checkpoint (exit 130).

A scenario (:data:`SCENARIOS`, :func:`register_scenario`) maps (fusion, b) to a timm model and
names the metrics.csv column it reads: ``same-layer`` (Inception-style cells,
``cifar_inception_resnet{6b+2}``) and ``short-skip`` (``cifar_resnet{6b+2}``, or
``cifar_resnext{9b+2}_32x4d`` with ``--family resnext``) read ``val_top1``; ``long-skip``
(``fpn_cifar_resnet{6b+2}``: the fusion in every top-down merge of the FPN, the encoder's blocks add;
a segmentation recipe, e.g. ``--recipe segment-cpu``) reads ``val_miou``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, OpenAFFError, one_line, run_command
from .files import atomic_write
from .stats import contrast_table, parse_contrasts
from .training.config import TrainConfig, make_config, to_yaml
from .training.datasets import DATASET_STATS, resolve_source
from .training.history import write_csv
from .training.resume import RESUMABLE, load_resume_checkpoint
from .training.run_folder import CONFIG_FILE, read_run_config, read_run_metrics
from .training.tasks import task_for_model
from .training.train import RUN_FILES, fresh_run_folder, train

__all__ = ["PAPER", "SCENARIOS", "TABLE_FUSIONS", "Family", "RunRecord", "Scenario", "StudyError", "StudyResult",
           "add_parser", "paper_number", "register_scenario", "run_study", "summarize"]


class StudyError(ConfigError):
    """A bad study setting, a run folder that does not belong to the study, or a run that failed."""


DATA_CHOICES = ("fashion-mnist", "fashion-mnist-scenes", "cifar10", "cifar100")  # what --data names


# --- the paper's tables (AFF.md section 4): top-1 on CIFAR-100 with the 20 coarse labels; long skip: mIoU ----

TABLE_FUSIONS: dict[int, tuple[str, ...]] = {
    3: ("aff_global_global", "aff_local_local", "aff"),
    4: ("add", "concat", "ms_gau", "ms_se", "ms_sa", "aff", "iaff"),
    6: ("half_aff", "concat_aff", "aff", "recursive_aff", "iaff"),
}
_T4_AFF = {"same-layer": (.756, .784, .794, .801), "short-skip": (.763, .804, .816, .826),
           "long-skip": (.924, .935, .939, .944)}
# table -> scenario -> fusion -> values for b = 1, 2, ... (None: not reported)
PAPER: dict[int, dict[str, dict[str, tuple[float | None, ...]]]] = {
    4: {
        "same-layer": {"add": (.720, .753, .771, .782), "concat": (.725, .749, .772, .779),
                       "ms_gau": (.751, .774, .788, .795), "ms_se": (.752, .780, .790, .798),
                       "ms_sa": (.756, .779, .790, .798), "aff": _T4_AFF["same-layer"],
                       "iaff": (.774, .801, .808, .814)},
        "short-skip": {"add": (.740, .786, .797, .808), "concat": (.742, .782, .793, .798),
                       "ms_gau": (.766, .803, .815, .819), "ms_se": (.765, .799, .814, .820),
                       "ms_sa": (.761, .801, .814, .822), "aff": _T4_AFF["short-skip"],
                       "iaff": (.772, .807, .822, None)},
        "long-skip": {"add": (.895, .920, .925, .928), "concat": (.897, .909, .925, .939),
                      "ms_gau": (.917, .926, .937, .941), "ms_se": (.915, .929, .940, .940),
                      "ms_sa": (.920, .932, .938, .941), "aff": _T4_AFF["long-skip"],
                      "iaff": (.927, .938, .945, .953)},
    },
    3: {  # Global+Local is the AFF row of Table 4
        "same-layer": {"aff_global_global": (.735, .766, .775, .789), "aff_local_local": (.746, .771, .785, .787),
                       "aff": _T4_AFF["same-layer"]},
        "short-skip": {"aff_global_global": (.754, .796, .811, .821), "aff_local_local": (.754, .794, .808, .814),
                       "aff": _T4_AFF["short-skip"]},
        "long-skip": {"aff_global_global": (.911, .923, .936, .939), "aff_local_local": (.895, .919, .921, .924),
                      "aff": _T4_AFF["long-skip"]},
    },
    6: {"short-skip": {"half_aff": (.759, .798, .813), "concat_aff": (.765, .792, .817), "aff": (.764, .799, .816),
                       "recursive_aff": (.764, .797, .812), "iaff": (.772, .807, .822)}},
}


def paper_number(fusion: str, scenario: str, b: int, table: int | None = None) -> tuple[float | None, int | None]:
    """The paper's value for a cell, as a fraction, and the table it is from (``(None, None)`` if none).

    Args:
        fusion: fusion type name.
        scenario: scenario name (the paper's column group).
        b: blocks per stage.
        table: the table to look in first; then Tables 4, 3 and 6 (Table 6's AFF row differs from Table 4's).
    """
    for t in dict.fromkeys([table, 4, 3, 6]):
        values = PAPER.get(t, {}).get(scenario, {}).get(fusion) if t is not None else None
        if values is not None:
            return (values[b - 1] if 1 <= b <= len(values) else None), t
    return None, None


# --- scenarios ------------------------------------------------------------------------------------------------

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


# --- settings -------------------------------------------------------------------------------------------------

OVERRIDES = ("epochs", "limit_train", "limit_val", "width_mult")  # study-level: part of every run's numbers
# Differences between a run folder's config.yaml and the study's that do not change the numbers.
_IGNORED = {"output", "recipe", *RESUMABLE}


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


@dataclass
class Cell:
    fusion: str
    depth: int
    seed: int
    cfg: TrainConfig
    params: int | None = None
    gmacs: float | None = None

    @property
    def name(self) -> str:
        return f"{self.fusion}-b{self.depth}-s{self.seed}"

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output)


@dataclass
class RunRecord:
    """One run of a study, as study.json and results.csv list it (metric values in the metric's unit, e.g. %)."""

    fusion: str
    depth: int
    seed: int
    folder: str
    status: str  # finished | unfinished | missing
    epochs: int | None = None
    best: float | None = None
    best_epoch: int | None = None
    final: float | None = None
    params: int | None = None
    gmacs: float | None = None
    seconds: float | None = None
    # From the run's test.json (a held-out validation split chose the epoch): the test split's metric with the
    # selected weights, with the final weights, and with the selected weights by pasted item side ("14-18": %).
    test: float | None = None
    test_final: float | None = None
    test_by_size: dict | None = None


@dataclass
class StudyResult:
    """What :func:`run_study` and :func:`summarize` return."""

    output: Path
    settings: StudySettings
    runs: list[RunRecord]
    cells: list[dict]
    trained: list[str] = field(default_factory=list)  # the runs this call trained or resumed
    contrasts: list[dict] = field(default_factory=list)  # paired over seeds (openaff.stats.contrast_table)
    size_contrasts: dict = field(default_factory=dict)  # side bin -> the same contrasts within it
    contrast_metric: str = ""  # what the contrasts compare

    @property
    def table(self) -> Path:
        return self.output / "table.md"


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
    from .layers import fusion_names

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


def _yaml_data(cfg: TrainConfig) -> dict:
    return yaml.safe_load(to_yaml(cfg))


def _base_data(base: TrainConfig) -> dict:
    data = _yaml_data(base)
    for key in ("model", "seed", *_IGNORED):
        data.pop(key, None)
    return data


def _data_facts(cfg: TrainConfig) -> tuple[int, int, int]:
    """``(num_classes, in_chans, img_size)`` of the study's data, which is loaded (validation split) to check it.

    Loaded as training will load it: a segmenter's masks have one class more (background) than the
    scenes' labels, and its parameter count depends on that.
    """
    mean, std = DATASET_STATS[resolve_source(cfg.data, cfg.data_dir)[0]]
    data = task_for_model(cfg.model).load_data(cfg, False, mean, std)
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


# --- run folders -----------------------------------------------------------------------------------------------

def _differences(old: dict, new: dict, ignore: set[str]) -> list[str]:
    return [k for k in dict.fromkeys([*new, *old]) if k not in ignore and old.get(k) != new.get(k)]


def _check_cell_config(cell: Cell) -> None:
    """Refuse a run folder that holds another configuration than the one the study asks for it."""
    if not (cell.folder / CONFIG_FILE).is_file():
        held = [n for n in RUN_FILES if (cell.folder / n).exists()]
        if held:
            raise StudyError(f"{cell.folder} holds {', '.join(held)} but no config.yaml: not a run of this study; "
                             "move it away")
        return
    old, new = read_run_config(cell.folder), _yaml_data(cell.cfg)
    diff = _differences(old, new, _IGNORED)
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more setting(s))" if len(diff) > 1 else ""
        raise StudyError(f"{cell.folder} was trained with {k}={old.get(k)!r}, this study asks for {new.get(k)!r}"
                         f"{more}; give another --output, or delete that run folder to train it anew")


def _cell_state(cell: Cell) -> str:
    """``finished``, ``resume`` (last.pt of an unfinished run), ``restart`` (files, nothing to resume) or ``new``."""
    if not cell.folder.is_dir() or not any(cell.folder.iterdir()):
        return "new"
    _check_cell_config(cell)
    if len(read_run_metrics(cell.folder)) >= cell.cfg.epochs:
        return "finished"
    if (cell.folder / "last.pt").is_file():
        ckpt = load_resume_checkpoint(cell.folder)
        if ckpt["epoch"] >= cell.cfg.epochs:
            # Killed between writing last.pt and metrics.csv of the last epoch: the rows are in the checkpoint.
            write_csv(ckpt["history"], cell.folder / "metrics.csv")
            return "finished"
        return "resume"
    return "restart" if any((cell.folder / n).exists() for n in RUN_FILES) else "new"


def _record(fusion: str, depth: int, seed: int, folder: Path, metric: str, epochs: int | None,
            facts: tuple[int, float] | None) -> RunRecord:
    rec = RunRecord(fusion, depth, seed, str(folder), "missing", epochs)
    if facts is not None:
        rec.params, rec.gmacs = facts
    rows = [r for r in read_run_metrics(folder) if isinstance(r.get(metric), float)]
    if not rows:
        rec.status = "unfinished" if folder.is_dir() and any(folder.iterdir()) else "missing"
        return rec
    best = max(rows, key=lambda r: r[metric])  # the first epoch of the highest value
    rec.best, rec.best_epoch, rec.final = best[metric], best["epoch"], rows[-1][metric]
    rec.seconds = sum(r.get("seconds") or 0.0 for r in rows)
    rec.status = "finished" if epochs is not None and len(rows) >= epochs else "unfinished"
    test = _read_test(folder) if rec.status == "finished" else None
    if test is not None:
        key = metric.replace("val_", "test_", 1)
        rec.test, rec.test_final = test["selected"].get(key), test["final"].get(key)
        by_size = test["selected"].get("by_size") or []
        rec.test_by_size = {f"{b['sides'][0]}-{b['sides'][1]}": b.get("top1", b.get("scene_acc"))
                            for b in by_size} or None
    return rec


def _read_test(folder: Path) -> dict | None:
    path = folder / "test.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StudyError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("selected"), dict) or \
            not isinstance(data.get("final"), dict):
        raise StudyError(f"{path} is not a run's test scores")
    return data


# The paper's claims, as contrasts a - b over seeds: AFF/iAFF against Add and against the strongest other
# attention (MS-GAU), iAFF against AFF, and the controls (AFF at a matched budget; Add with the branch BNs).
DEFAULT_CONTRASTS = (("aff", "add"), ("iaff", "add"), ("iaff", "aff"), ("aff", "ms_gau"), ("iaff", "ms_gau"),
                     ("aff@r2", "aff"), ("aff@r2", "ms_gau"), ("add_bn", "add"), ("aff", "add_bn"),
                     ("concat", "add"))


def resolve_contrasts(text: str | None, fusions: Sequence[str]) -> list[tuple[str, str]]:
    """The study's contrasts: ``--contrasts A-B,...`` checked against the grid, or the defaults the grid allows."""
    from .layers import fusion_names

    if text is None:
        return [(a, b) for a, b in DEFAULT_CONTRASTS if a in fusions and b in fusions]
    known = fusion_names()
    for item in (t.strip() for t in text.split(",")):
        for name in item.split("-"):
            if name and name not in fusions and split_fusion_spec(name)[0] not in known:
                raise StudyError(f"--contrasts {item}: unknown fusion type {name!r}")
    try:
        return parse_contrasts(text, list(fusions))
    except ValueError as err:
        raise StudyError(f"--contrasts: {err}") from None


# --- running ---------------------------------------------------------------------------------------------------

def _say(progress: bool) -> Callable[[str], None]:
    if progress:
        from tqdm import tqdm

        return lambda s: tqdm.write(s, file=sys.stdout)
    return lambda s: print(s, flush=True)


def _done_line(cell: Cell, metric: str) -> str:
    rec = _record(cell.fusion, cell.depth, cell.seed, cell.folder, metric, cell.cfg.epochs, None)
    if rec.best is None:
        return f"{cell.name}: no {metric} recorded"
    return (f"{cell.name}: best {metric} {rec.best:.2f} (epoch {rec.best_epoch + 1}), final {rec.final:.2f}, "
            f"{rec.seconds:.0f} s")


def _train_in_process(cell: Cell, state: str, log: Path, trainer: Callable) -> None:
    with log.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {state} {cell.name}", flush=True)
        try:
            if state == "resume":
                trainer(cell.cfg, resume=cell.folder)
            else:
                trainer(cell.cfg, overwrite=state == "restart")
        except OpenAFFError as err:
            print(f"openaff train: error: {one_line(err)}", flush=True)
            raise StudyError(f"run {cell.name} failed: {one_line(err)} (log: {log})") from None


def _child_env(threads: int | None) -> dict[str, str]:
    import openaff

    src = str(Path(openaff.__file__).resolve().parents[1])  # the children import this very openaff
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


@functools.cache
def _prctl() -> Callable | None:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the study dies (Linux), else None.

    A SIGKILLed study must not leave its runs training on: they would race the restarted study's.
    The function is looked up here, in the parent: between fork and exec the child may not import.
    """
    prctl = _prctl() if sys.platform == "linux" else None
    if prctl is None:
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(cell: Cell, state: str, log: Path) -> subprocess.Popen:
    threads = cell.cfg.threads or 1
    cmd = [sys.executable, "-m", "openaff", "train", "--no-progress", "--threads", str(threads)]
    if state == "resume":
        cmd += ["--resume", str(cell.folder)]
    else:
        recipe = log.with_suffix(".yaml")
        atomic_write(recipe, lambda f: f.write(to_yaml(cell.cfg).encode()))
        cmd += ["--recipe", str(recipe)] + (["--overwrite"] if state == "restart" else [])
    out = log.open("ab")
    out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {state} {cell.name}: {shlex.join(cmd)}\n".encode())
    out.flush()
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=_child_env(threads), preexec_fn=_die_with_parent())
    finally:
        out.close()


def _child_error(cell: Cell, rc: int, log: Path) -> StudyError:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("openaff train: error: ")]
    if errors:
        return StudyError(f"run {cell.name} failed: {errors[-1].removeprefix('openaff train: error: ')} (log: {log})")
    return StudyError(f"run {cell.name} failed with exit status {rc} (log: {log})")


def _stop_children(running: dict[subprocess.Popen, Cell], grace: float = 120.0) -> None:
    """SIGINT every run (it stops at its last checkpoint), wait for them, kill those that do not stop."""
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_parallel(todo: list[tuple[Cell, str]], jobs: int, logs: Path, on_done: Callable[[Cell], None]) -> None:
    queue = list(todo)
    running: dict[subprocess.Popen, Cell] = {}
    failure: StudyError | None = None
    try:
        while queue or running:
            while queue and len(running) < jobs and failure is None:
                cell, state = queue.pop(0)
                running[_spawn(cell, state, logs / f"{cell.name}.log")] = cell
            if not running:
                break
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                cell = running.pop(proc)
                if proc.returncode == 0:
                    on_done(cell)
                elif proc.returncode == 130:
                    raise KeyboardInterrupt  # a run was interrupted from outside: stop the study the same way
                elif failure is None:
                    failure = _child_error(cell, proc.returncode, logs / f"{cell.name}.log")
            if failure is not None and not running:
                raise failure
    except BaseException:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the runs
        try:
            _stop_children(running)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise


@contextlib.contextmanager
def _lock(folder: Path):
    import fcntl  # POSIX; imported here so that `openaff` itself loads everywhere

    path = folder / ".study.lock"
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise StudyError(f"{folder} is in use by another openaff study (pid {pid})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _command_line(s: StudySettings, data: str, output: Path, overrides: dict, cifar100_labels: str | None,
                  runtime: dict) -> str:
    parts = ["openaff", "study", "--scenario", s.scenario]
    if s.family != next(iter(SCENARIOS[s.scenario].families)):
        parts += ["--family", s.family]
    parts += (["--table", str(s.table)] if s.table is not None else ["--fusions", ",".join(s.fusions)])
    parts += ["--depths", ",".join(map(str, s.depths)), "--seeds", str(s.seeds), "--data", data,
              "--recipe", s.recipe]
    for key in OVERRIDES:
        if overrides.get(key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(overrides[key])]
    if cifar100_labels is not None:
        parts += ["--cifar100-labels", cifar100_labels]
    for key, value in runtime.items():  # not part of the numbers, but the way to continue as it ran
        if value is not None:
            parts += [f"--{key}", str(value)]
    return shlex.join([*parts, "--output", str(output)])


def _merge(old: list, new: list) -> list:
    return list(dict.fromkeys([*old, *new]))


def run_study(output: str | Path | None = None, *, scenario: str = "short-skip", fusions: str | Sequence[str] | None
              = None, table: int | None = None, depths: str | Sequence[int] = (1, 2, 3, 4), seeds: int = 3,
              data: str | None = None, recipe: str = "study-cpu", family: str | None = None,
              epochs: int | None = None, limit_train: int | None = None, limit_val: int | None = None,
              width_mult: float | None = None, threads: int | None = None, cifar100_labels: str | None = None,
              jobs: int = 1, progress: bool = True, launcher: str | None = None,
              launcher_config: str | dict | None = None, contrasts: str | None = None) -> StudyResult:
    """Train the study's missing runs and aggregate all of them; the Python API of ``openaff study``.

    Args:
        output: the study folder (default: a fresh ``runs/study-<scenario>-<data>-<time>``); an existing one continues.
        scenario: a name of :data:`SCENARIOS` (``same-layer``, ``short-skip``).
        fusions: fusion type names (comma-separated or a list; default: the seven of the paper's Table 4).
        table: 3, 4 or 6: the fusion types of that paper table (instead of ``fusions``).
        depths: blocks per stage b (comma-separated or a list).
        seeds: the runs of a cell use seeds 0 .. seeds-1.
        data: ``fashion-mnist``, ``fashion-mnist-scenes``, ``cifar10:DIR`` or ``cifar100:DIR`` (coarse labels);
            default: the recipe's.
        recipe: the base training recipe (a shipped name or a YAML path).
        family: the scenario's model family (short-skip: ``resnet`` or ``resnext``).
        epochs: overrides the recipe's.
        limit_train: train on the first N images only.
        limit_val: validate on the first N images only.
        width_mult: the models' width multiplier (overrides the recipe's model_kwargs).
        threads: CPU threads per run (default with ``jobs`` > 1: 1; with 1 job: the recipe's).
        cifar100_labels: ``coarse`` (default for cifar100, as the paper) or ``fine``.
        jobs: runs trained at a time, each in its own process (1: one after the other in this process).
        launcher: ``local`` (default: this process, or its pool with ``jobs`` > 1), ``slurm`` or
            ``submitit-local``: each run a submitit job (:mod:`openaff.study_launcher`).
        launcher_config: the launcher's options, a YAML file, ``KEY=VALUE,...`` or a dict.
        progress: a progress bar over the grid.

    Raises:
        StudyError: a bad setting (before anything trains), a run folder that belongs to another
            configuration, or a run that failed (the others keep their results).
        KeyboardInterrupt: Ctrl-C; its note gives the command that continues the study.
    """
    scn = SCENARIOS.get(scenario)
    if scn is None:
        raise StudyError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    family_name, fam = scn.family(family)
    names = _fusions(fusions, table)
    pairs = resolve_contrasts(contrasts, names)  # bad contrasts stop before anything trains
    depth_list = _parse_list(depths, "depths", _depth)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise StudyError(f"--seeds must be an integer >= 1 (the runs use seeds 0 .. N-1), got {seeds!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"--jobs must be an integer >= 1, got {jobs!r}")
    from .study_launcher import make_launcher

    runner = make_launcher(launcher, launcher_config, jobs)
    if threads is None and jobs > 1:
        threads = 1  # separate single-threaded processes: the fastest use of a small CPU
    overrides = dict(epochs=epochs, limit_train=limit_train, limit_val=limit_val, width_mult=width_mult)
    base = _base_config(scn, recipe, data, cifar100_labels, overrides, threads)
    base = replace(base, progress=False)  # one bar over the grid instead
    facts = _data_facts(base)
    settings = StudySettings(scenario, family_name, names, depth_list, seeds, table, recipe, _base_data(base))
    data_spec = base.data + (f":{base.data_dir}" if base.data_dir else "")
    models = {}  # every model is built (on the meta device) before any folder is made: bad settings stop here
    for b in depth_list:
        for fusion in names:
            model, kwargs = scn.model(fusion, b, family_name)
            kwargs = {**base.model_kwargs, **kwargs}
            models[fusion, b] = model, kwargs, _facts_of(model, kwargs, *facts)

    if output is None:
        out = fresh_run_folder("runs", f"study-{scenario}-{base.data}")
    else:
        out = Path(output)
        if out.exists() and not out.is_dir():
            raise StudyError(f"--output {out} is a file, not a folder")
    settings = _adopt(out, settings)
    cells = []
    for seed in range(seeds):  # seed-major: a partial study has every cell once before any twice
        for b in depth_list:
            for fusion in names:
                model, kwargs, (params, gmacs) = models[fusion, b]
                cell_dir = out / "runs" / f"{fusion}-b{b}-s{seed}"
                try:
                    cfg = make_config({**asdict(base), "model": model, "model_kwargs": kwargs, "seed": seed,
                                       "output": str(cell_dir)})
                except ConfigError as err:
                    raise StudyError(f"run {fusion}-b{b}-s{seed}: {one_line(err)}") from None
                cells.append(Cell(fusion, b, seed, cfg, params, gmacs))
    command = _command_line(settings, data_spec, out, overrides, cifar100_labels,
                            dict(threads=base.threads, jobs=jobs if jobs > 1 else None,
                                 launcher=runner and runner.name, **{"launcher-config": runner and runner.given}))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with _lock(out):
        return _execute(out, scn, settings, cells, command, jobs, progress, runner, pairs)


def _execute(out: Path, scn: Scenario, settings: StudySettings, cells: list[Cell], command: str, jobs: int,
             progress: bool, runner: Any = None, pairs: list[tuple[str, str]] | None = None) -> StudyResult:
    """Train what the study folder lacks (under its lock), keeping the tables up to date after every run."""
    states = {c.name: _cell_state(c) for c in cells}  # refuses foreign folders before anything trains
    planned = {(c.fusion, c.depth, c.seed): (c.params, c.gmacs) for c in cells}
    todo = [(c, states[c.name]) for c in cells if states[c.name] != "finished"]
    say = _say(progress)
    trained: list[str] = []

    def write(plot: bool = False) -> StudyResult:
        result = _aggregate(out, settings, planned, command, pairs)
        _write_outputs(result, command, plot=plot)
        return replace(result, trained=list(trained))

    def on_done(cell: Cell) -> None:
        trained.append(cell.name)
        bar.update(1)
        say(_done_line(cell, scn.metric))
        write()

    write()
    bar = _bar(len(cells), len(cells) - len(todo), progress)
    try:
        if runner is not None:  # a study_launcher.Launcher: each run a submitit job
            from .study_launcher import run_cells

            run_cells(runner, todo, out, on_done)
        elif jobs == 1:
            for cell, state in todo:
                bar.set_postfix_str(cell.name, refresh=True)
                _train_in_process(cell, state, out / "logs" / f"{cell.name}.log", scn.train or train)
                on_done(cell)
        else:
            _run_parallel(todo, jobs, out / "logs", on_done)
    except KeyboardInterrupt:
        bar.close()
        write()
        stop = KeyboardInterrupt()
        stop.add_note(f"interrupted after {len(cells) - len(todo) + len(trained)} of {len(cells)} runs; "
                      f"continue with: {command}")
        raise stop from None
    except StudyError:
        bar.close()
        write()
        raise
    bar.close()
    result = write(plot=True)
    say(f"study: {sum(r.status == 'finished' for r in result.runs)} of {len(result.runs)} runs finished in {out}"
        f" ({len(trained)} trained now)\n  table: {out / 'table.md'}\n  runs:  {out / 'study.json'}, "
        f"{out / 'results.csv'}\n  plot:  {out / 'study.png'}")
    return result


def _bar(total: int, done: int, progress: bool):  # noqa: ANN202  (tqdm)
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="run", desc="study", disable=not progress, dynamic_ncols=True)


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
    diff = _differences(old.base, settings.base, set())
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


# --- aggregation ---------------------------------------------------------------------------------------------

def _facts_from_folder(folder: Path) -> tuple[int, float] | None:
    """Parameters and GMACs from a run's config.json (timm's hub layout) and config.yaml."""
    try:
        hub = json.loads((folder / "config.json").read_text())
        cfg = read_run_config(folder)
        size = hub["pretrained_cfg"]["input_size"]
        return _model_facts(cfg["model"], json.dumps(cfg.get("model_kwargs") or {}, sort_keys=True),
                            int(hub["num_classes"]), int(size[0]), int(size[-1]))
    except (OSError, ValueError, KeyError, TypeError, IndexError, OpenAFFError, RuntimeError):
        return None


def _aggregate(out: Path, settings: StudySettings, planned: dict | None, command: str,
               contrasts: list[tuple[str, str]] | None = None) -> StudyResult:
    scn = SCENARIOS.get(settings.scenario)
    metric = scn.metric if scn is not None else "val_top1"
    epochs = settings.base.get("epochs")
    runs: list[RunRecord] = []
    keys = [(f, b, s) for s in range(settings.seeds) for b in settings.depths for f in settings.fusions]
    for f, b, s in keys:
        folder = out / "runs" / f"{f}-b{b}-s{s}"
        facts = (planned or {}).get((f, b, s)) or _facts_from_folder(folder)
        runs.append(_record(f, b, s, folder, metric, epochs, facts))
    runs.sort(key=lambda r: (settings.fusions.index(r.fusion), settings.depths.index(r.depth), r.seed))
    cells = []
    for f in settings.fusions:
        for b in settings.depths:
            group = [r for r in runs if r.fusion == f and r.depth == b]
            done = [r for r in group if r.status == "finished"]
            paper, source = paper_number(f, settings.scenario, b, settings.table)
            params = next((r.params for r in group if r.params is not None), None)
            gmacs = next((r.gmacs for r in group if r.gmacs is not None), None)
            cells.append(dict(fusion=f, depth=b, n=len(done), planned=len(group), params=params, gmacs=gmacs,
                              best_mean=_mean([r.best for r in done]), best_std=_std([r.best for r in done]),
                              final_mean=_mean([r.final for r in done]), final_std=_std([r.final for r in done]),
                              test_mean=_mean(tests := [r.test for r in done if r.test is not None]),
                              test_std=_std(tests),
                              test_final_mean=_mean(finals := [r.test_final for r in done if r.test_final is not None]),
                              test_final_std=_std(finals), n_test=len(tests),
                              paper=paper, paper_table=source))
    result = StudyResult(out, settings, runs, cells)
    _add_contrasts(result, contrasts if contrasts is not None else resolve_contrasts(None, settings.fusions))
    return result


def _add_contrasts(result: StudyResult, pairs: list[tuple[str, str]]) -> None:
    """Paired contrasts at the first depth: on the test split where every run has one, else on the best
    validation value (older studies); and the same contrasts within each item-side bin of the test split."""
    b = result.settings.depths[0]
    done = [r for r in result.runs if r.status == "finished" and r.depth == b]
    use_test = bool(done) and all(r.test is not None for r in done)
    result.contrast_metric = "test at the selected epoch" if use_test else "best validation over the epochs"
    values: dict[str, dict[int, float]] = {}
    for r in done:
        values.setdefault(r.fusion, {})[r.seed] = r.test if use_test else r.best
    result.contrasts = contrast_table(values, pairs) if pairs else []
    bins = sorted({k for r in done for k in (r.test_by_size or {})}, key=lambda k: int(k.split("-")[0]))
    result.size_contrasts = {}
    for k in bins if use_test else []:
        per = {}
        for r in done:
            if r.test_by_size and r.test_by_size.get(k) is not None:
                per.setdefault(r.fusion, {})[r.seed] = r.test_by_size[k]
        result.size_contrasts[k] = contrast_table(per, pairs)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None  # sample std (n - 1), as error bars are


def _fmt(mean: float | None, std: float | None, n: int, planned: int, bold: bool = False) -> str:
    if mean is None:
        return "—"
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    text = f"**{text}**" if bold else text
    return text + (f" ({n}/{planned})" if n < planned else "")


def _grid(result: StudyResult, value: Callable[[dict, bool], str], best_key: str | None) -> list[str]:
    s = result.settings
    scn = SCENARIOS.get(s.scenario)
    fam = scn.families.get(s.family) if scn is not None else None
    head = [f"b = {b}" + (f" ({fam.label.format(depth=fam.depth(b))})" if fam else "") for b in s.depths]
    lines = ["| fusion | " + " | ".join(head) + " |", "|---|" + "---:|" * len(s.depths)]
    top = {}
    if best_key:
        for b in s.depths:
            means = [c[best_key] for c in result.cells if c["depth"] == b and c[best_key] is not None]
            top[b] = max(means) if means else None
    for f in s.fusions:
        row = [c for c in result.cells if c["fusion"] == f]
        lines.append(f"| {f} | " + " | ".join(
            value(c, best_key is not None and c[best_key] is not None and c[best_key] == top[c["depth"]])
            for c in row) + " |")
    return lines


def study_markdown(result: StudyResult, command: str) -> str:
    """The tables of table.md."""
    s = result.settings
    scn = SCENARIOS.get(s.scenario)
    title, label = (scn.title, scn.metric_label) if scn else (s.scenario, "metric")
    metric = scn.metric if scn else "val_top1"
    b = s.base
    done = sum(r.status == "finished" for r in result.runs)
    size = next((f"{c['params']:,}" for c in result.cells if c["params"]), None)
    lr = b.get("lr") if b.get("lr") is not None else f"{b.get('lr_base')} per {b.get('lr_base_size')} images"
    kwargs = ", ".join(f"{k} {v}" for k, v in (b.get("model_kwargs") or {}).items())
    images = ", ".join(f"{what} limited to {b[key]} images" for key, what in
                       (("limit_train", "training"), ("limit_val", "validation")) if b.get(key))
    budget = ", ".join(x for x in (f"epochs {b.get('epochs')}", f"batch {b.get('batch_size')}", f"lr {lr}", kwargs,
                                   images) if x)
    data = b.get("data") + (f" ({b.get('cifar100_labels')} labels)" if b.get("data") == "cifar100" else "")
    out = [f"# Study: {title} on {data}", "",
           f"`{command}`", "",
           f"{done} of {len(result.runs)} runs finished; seeds 0-{s.seeds - 1}; recipe {s.recipe} ({budget}).", ""]
    if any(c.get("n_test") for c in result.cells):
        out += [f"## Test {label}, epoch chosen on held-out validation", "",
                "Mean ± sample std over the seeds of the test split's value with the weights of the epoch that the "
                "held-out validation images chose (each run's test.json; the test split chose nothing).", ""]
        out += _grid(result, lambda c, bold: _fmt(c["test_mean"], c["test_std"], c["n_test"], c["planned"], bold),
                     "test_mean")
        out += ["", f"## Test {label}, final epoch", ""]
        out += _grid(result, lambda c, bold: _fmt(c["test_final_mean"], c["test_final_std"], c["n_test"],
                                                  c["planned"]), None)
        out += _size_lines(result)
    out += _contrast_lines(result)
    out += [f"## Best validation {label} over all epochs", "",
           f"Mean ± sample std over the seeds of each run's best `{metric}` over its epochs (what the authors "
           "reported); the best mean of each column in bold; (n/N): only n of N seeds finished.", ""]
    out += _grid(result, lambda c, bold: _fmt(c["best_mean"], c["best_std"], c["n"], c["planned"], bold), "best_mean")
    out += ["", f"## Final-epoch validation {label}", "", "Mean ± sample std over the seeds of the last epoch's value.",
            ""]
    out += _grid(result, lambda c, bold: _fmt(c["final_mean"], c["final_std"], c["n"], c["planned"]), None)
    out += ["", "## Parameters and GMACs", "",
            "Trainable parameters / multiply-adds (10^9) per image at the data's input size.", ""]
    out += _grid(result, lambda c, bold: "—" if c["params"] is None else f"{c['params']:,} / {c['gmacs']:.3g}", None)
    tables = sorted({c["paper_table"] for c in result.cells if c["paper_table"] is not None})
    what = ("mIoU (%) on the authors' StopSign set (a COCO subset), 300 epochs" if s.scenario == "long-skip" else
            "Top-1 (%) on **CIFAR-100 with its 20 coarse labels**, full-width models trained 400 epochs")
    if tables:
        out += ["", "## The paper's numbers (not comparable in absolute terms)", "",
                f"{what}; AFF.md Table {', '.join(map(str, tables))}, {s.scenario} column. Other data and another "
                f"budget than the runs above ({size or '?'} parameters at b = {s.depths[0]} for {s.fusions[0]}): "
                "compare the ordering of the fusion types, not the values.", ""]
        out += _grid(result, lambda c, bold: "—" if c["paper"] is None else
                     f"{100 * c['paper']:.1f}" + (f" (T{c['paper_table']})" if len(tables) > 1 else ""), None)
    return "\n".join(out) + "\n"


def _size_lines(result: StudyResult) -> list[str]:
    b = result.settings.depths[0]
    done = [r for r in result.runs if r.status == "finished" and r.depth == b and r.test_by_size]
    bins = sorted({k for r in done for k in r.test_by_size}, key=lambda k: int(k.split("-")[0]))
    if not bins:
        return []
    lines = ["", f"## Test by pasted item side (b = {b}, selected epoch)", "",
             "Mean ± sample std over the seeds, per bin of the item's side in pixels.", "",
             "| fusion | " + " | ".join(f"{k} px" for k in bins) + " |", "|---|" + "---:|" * len(bins)]
    for f in result.settings.fusions:
        cells = []
        for k in bins:
            vals = [r.test_by_size[k] for r in done if r.fusion == f and r.test_by_size.get(k) is not None]
            cells.append(_fmt(_mean(vals), _std(vals), len(vals), len(vals)))
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return lines


def _contrast_row(c: dict) -> str:
    def num(v: float | None, fmt: str = "+.2f") -> str:
        return "—" if v is None else format(v, fmt)

    supported = c["p_holm"] is not None and c["p_holm"] < 0.05
    ci = "—" if c["lo"] is None else f"[{c['lo']:+.2f}, {c['hi']:+.2f}]"
    return (f"| {c['a']} − {c['b']} | {c['n']} | {num(c['mean'])} | {ci} | {num(c['p'], '.3g')} | "
            f"{num(c['p_holm'], '.3g')} | {num(c['mdd'], '.2f')} | {'**yes**' if supported else 'no'} |")


def _contrast_lines(result: StudyResult) -> list[str]:
    if not result.contrasts:
        return [""]
    head = ["| contrast | seeds | mean | 95 % interval | p | p (Holm) | min. detectable | supported |",
            "|---|---:|---:|---|---:|---:|---:|---|"]
    lines = ["", f"## Paired contrasts over seeds ({result.contrast_metric}, b = {result.settings.depths[0]})", "",
             "Differences a − b in points, seed by seed (the same seed: the same data order and augmentation); "
             "95 % t interval; p of the paired t-test and Holm-corrected over the contrasts listed; the minimum "
             "detectable difference is the smallest one this many seeds would find at 80 % power and this spread. "
             "Only a Holm p below 0.05 counts as supported; everything else is undecided, not 'equal'.", "",
             *head, *map(_contrast_row, result.contrasts)]
    for k, rows in result.size_contrasts.items():
        lines += ["", f"Items of {k} px (Holm within the bin):", "", *head, *map(_contrast_row, rows)]
    return lines + [""]


def _write_outputs(result: StudyResult, command: str, plot: bool) -> None:
    out = result.output
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(settings=asdict(result.settings), command=command, metric=_metric(result),
               runs=[asdict(r) for r in result.runs], cells=result.cells, contrast_metric=result.contrast_metric,
               contrasts=result.contrasts, size_contrasts=result.size_contrasts)
    atomic_write(out / "study.json", lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))
    buf = io.StringIO()
    names = ["scenario", *RunRecord.__dataclass_fields__]
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in result.runs:
        writer.writerow({"scenario": result.settings.scenario, **{
            k: "" if v is None else json.dumps(v) if isinstance(v, dict) else v for k, v in asdict(r).items()}})
    atomic_write(out / "results.csv", lambda f: f.write(buf.getvalue().encode()))
    atomic_write(out / "table.md", lambda f: f.write(study_markdown(result, command).encode()))
    if plot:
        plot_study(result, out / "study.png")


def _metric(result: StudyResult) -> str:
    scn = SCENARIOS.get(result.settings.scenario)
    return scn.metric if scn else "val_top1"


def plot_study(result: StudyResult, path: str | Path) -> None:
    """Best metric (mean ± std over seeds) against depth b and against parameters, one line per fusion type."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    s = result.settings
    scn = SCENARIOS.get(s.scenario)
    label = scn.metric_label if scn else "metric"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.25 / max(1, len(s.fusions))
    for i, f in enumerate(s.fusions):
        cells = [c for c in result.cells if c["fusion"] == f and c["best_mean"] is not None]
        if not cells:
            continue
        err = [c["best_std"] or 0.0 for c in cells]
        ys = [c["best_mean"] for c in cells]
        xs = [c["depth"] + (i - (len(s.fusions) - 1) / 2) * width for c in cells]  # side by side, not on top
        ax1.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f)
        if all(c["params"] for c in cells):
            ax2.errorbar([c["params"] for c in cells], ys, yerr=err, marker="o", capsize=3, label=f)
    ax1.set(xlabel="blocks per stage b", ylabel=f"best validation {label}", title="against depth")
    ax1.set_xticks(s.depths)
    ax1.set_xlim(min(s.depths) - 0.5, max(s.depths) + 0.5)
    ax2.set(xlabel="trainable parameters", ylabel=f"best validation {label}", title="against parameters")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{scn.title if scn else s.scenario} on {s.base.get('data')}: mean ± std over {s.seeds} seed(s)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def summarize(output: str | Path, progress: bool = True, contrasts: str | None = None) -> StudyResult:
    """Re-aggregate the study in ``output`` (table.md, study.json, results.csv, study.png) without training.

    Args:
        output: a study folder written by :func:`run_study`.
        progress: print where the files are.
    """
    out = Path(output)
    if not out.is_dir():
        raise StudyError(f"--summarize {out}: no such folder")
    settings = _load_settings(out)
    try:
        command = json.loads((out / "study.json").read_text()).get("command", "")
    except (OSError, json.JSONDecodeError):
        command = ""
    result = _aggregate(out, settings, None, command, resolve_contrasts(contrasts, settings.fusions))
    _write_outputs(result, command, plot=True)
    if progress:
        print(f"study: {sum(r.status == 'finished' for r in result.runs)} of {len(result.runs)} runs finished in "
              f"{out}\n  table: {out / 'table.md'}\n  plot:  {out / 'study.png'}")
    return result


# --- command line --------------------------------------------------------------------------------------------

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive(cast: Callable) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = cast.__name__
    return parse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="the paper's fusion study: a grid of training runs and its tables",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=None, help="where the fusion sits: same-layer | short-skip "
                   "| long-skip (FPN, mIoU; with a segmentation recipe); default short-skip")
    p.add_argument("--family", default=None, help="model family of the scenario (short-skip: resnet, resnext)")
    p.add_argument("--fusions", default=None, help="comma-separated fusion types (default: the seven of Table 4: "
                   "add,concat,ms_gau,ms_se,ms_sa,aff,iaff)")
    p.add_argument("--table", type=_int, default=None, choices=sorted(TABLE_FUSIONS), metavar="{3,4,6}",
                   help="the fusion types of a paper table: 3 (context scale), 4 (fusion types), 6 (AFF variants)")
    p.add_argument("--depths", default=None, help="blocks per stage b, comma-separated (default 1,2,3,4)")
    p.add_argument("--seeds", type=_positive(int), default=None, help="seeds per cell: 0 .. N-1 (default 3)")
    p.add_argument("--data", default=None, help="fashion-mnist | fashion-mnist-scenes | cifar10:DIR | cifar100:DIR "
                   "(coarse labels, as the paper) (default: the recipe's)")
    p.add_argument("--cifar100-labels", choices=("coarse", "fine"), default=None,
                   help="CIFAR-100 labels (default coarse: the paper's 20 superclasses)")
    p.add_argument("--recipe", default=None, help="base training recipe, a name or a .yaml path (default study-cpu; "
                   "study-gpu follows the authors' study training)")
    p.add_argument("--epochs", type=_positive(int), default=None, help="override the recipe's epochs")
    p.add_argument("--limit-train", type=_positive(int), default=None, help="train on the first N images only")
    p.add_argument("--limit-val", type=_positive(int), default=None, help="validate on the first N images only")
    p.add_argument("--width-mult", type=_positive(float), default=None, help="model width multiplier")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="CPU threads per run (default: 1 with --jobs > 1, else the recipe's)")
    p.add_argument("--jobs", type=_positive(int), default=1, help="runs trained at a time, each its own process")
    p.add_argument("--launcher", choices=("local", "submitit-local", "slurm"), default=None,
                   help="local: this machine's process pool (default); slurm: each run a Slurm job through submitit; "
                   "submitit-local: submitit's jobs on this machine (see docs/study.md)")
    p.add_argument("--launcher-config", metavar="YAML|K=V,...", default=None,
                   help="the launcher's options: a YAML file or KEY=VALUE,... (slurm: partition, time (minutes), "
                   "gpus_per_task, cpus_per_task, mem, array_parallelism, setup, ...)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="study folder (default: runs/study-<scenario>-<data>-<time>); an existing one continues")
    p.add_argument("--contrasts", metavar="A-B,...", default=None,
                   help="paired contrasts over seeds in table.md, e.g. aff-add,iaff-aff (default: those of "
                        "aff-add, iaff-add, iaff-aff, aff-ms_gau, iaff-ms_gau, aff@r2-aff, aff@r2-ms_gau, add_bn-add, "
                        "aff-add_bn, concat-add whose types are in the grid); Holm-corrected; also with --summarize")
    p.add_argument("--summarize", metavar="DIR", default=None, help="re-aggregate the study in DIR, train nothing")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the grid")
    p.set_defaults(func=lambda args: run_command("openaff study", lambda: _run(args)))


_STUDY_FLAGS = ("scenario", "family", "fusions", "table", "depths", "seeds", "data", "cifar100_labels", "recipe",
                "epochs", "limit_train", "limit_val", "width_mult", "threads", "output", "launcher", "launcher_config")


def _run(args: argparse.Namespace) -> int:
    if args.summarize is not None:
        given = [f"--{k.replace('_', '-')}" for k in _STUDY_FLAGS if getattr(args, k) is not None]
        if given or args.jobs != 1:
            raise StudyError(f"--summarize re-aggregates a study as it was run; drop {' '.join(given) or '--jobs'}")
        summarize(args.summarize, contrasts=args.contrasts)
        return 0
    kwargs = {k: getattr(args, k) for k in _STUDY_FLAGS if getattr(args, k) is not None}
    result = run_study(**kwargs, jobs=args.jobs, progress=args.progress, contrasts=args.contrasts)
    print(study_markdown_best(result))
    return 0


def study_markdown_best(result: StudyResult) -> str:
    """The best-metric table alone (what the command prints at the end)."""
    return "\n".join(_grid(result, lambda c, bold: _fmt(c["best_mean"], c["best_std"], c["n"], c["planned"], bold),
                           "best_mean"))
