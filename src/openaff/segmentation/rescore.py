"""Re-score a segmentation study's runs from their saved weights: the item found apart from the item named, by size.

::

    openaff segment rescore results/segment-cpu --limit 2000 --threads 2

Every run folder under ``STUDY/runs/`` (``model.safetensors`` + ``config.json``) is evaluated again on
``fashion-mnist-scenes`` at the canvas it was trained on, on the first ``--limit`` scenes of the
``--split`` (default ``test``: Fashion-MNIST's 10,000 test items; the runs of ``results/segment-cpu*``
were validated on the first 2,000 of exactly these scenes, when val and test were the same scenes),
with the scores of :mod:`openaff.segmentation.object_scores` beside mIoU: foreground IoU, item-class
accuracy, scene accuracy, and the same by bins of the pasted item's side. No weights change.

Per fusion type: mean ± sample std over the seeds; per contrast (each type against ``--baseline``,
default ``add``), the paired differences over the seeds that both have (same seed: same
initialisation draw, data order and augmentation), their mean, 95 % t interval and paired t-test p
(``scipy.stats.ttest_rel``), and the smallest difference such a test would detect at that spread:
``(t[0.975, n-1] + t[0.8, n-1]) * sd / sqrt(n)`` (two-sided 5 %, power about 80 %, the usual
t-approximation). Writes ``OUT/rescore.csv`` (one row per run), ``OUT/rescore.json`` and
``OUT/rescore.md`` (the tables, the command, the machine, the wall time).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.datasets import FASHION_MNIST_DIR
from ..data.loader import EvalSampler, make_loader
from ..data.scenes import FashionMNISTScenes
from ..errors import ConfigError, DataError
from ..files import atomic_write
from ..hub import load_pretrained
from ..machine import cpu_name
from ..stats import paired_contrast
from ..training.distributed import DistInfo
from ..training.run_folder import CONFIG_FILE, read_run_config, read_run_metrics
from .data import SceneMasks, SegmentationPipeline, seg_collate
from .object_scores import size_columns
from .task import SEGMENT

__all__ = ["MEASURES", "paired_contrast", "rescore", "score_run"]

# (key of score_run's result, label in the tables)
MEASURES = (("miou", "mIoU"), ("fg_iou", "foreground IoU"), ("item_acc", "item-class acc."),
            ("scene_acc", "scene acc."), ("pixel_acc", "pixel acc."))
_BIN_MEASURES = (("fg_iou", "foreground IoU"), ("item_acc", "item-class acc."), ("scene_acc", "scene acc."))


@torch.no_grad()
def score_run(folder: str | Path, *, split: str = "test", limit: int | None = None, batch_size: int = 250,
              amp: str = "none", data_dir: str | None = None) -> dict:
    """The scores of one segmentation run's weights on fashion-mnist-scenes.

    Args:
        folder: a run (or model) folder of a segmenter trained on fashion-mnist-scenes.
        split: the scenes' split (``test`` or ``val``).
        limit: the first N scenes (None: all).
        batch_size: scenes per batch.
        amp: ``none`` (float32) or ``bf16``.
        data_dir: the Fashion-MNIST directory (default: the recorded one if it exists, else the default).

    Returns:
        ``miou``, ``pixel_acc``, ``mean_acc``, ``fg_iou``, ``item_acc``, ``scene_acc`` (%), ``by_size`` and
        ``images`` (as :meth:`openaff.segmentation.task.SegmentationTask.evaluate`), ``architecture``,
        ``fusion``, ``epoch`` (the saved weights') and ``miou_recorded`` (the saved epoch's mIoU in
        ``metrics.csv``, None without it).
    """
    folder = Path(folder)
    net, info = load_pretrained(folder)
    if not getattr(net, "is_segmenter", False):
        raise ConfigError(f"{folder} holds {info['architecture']}, a classifier; rescore needs segmentation runs")
    meta = info.get("metadata") or {}
    if meta.get("data") not in (None, "fashion-mnist-scenes"):
        raise DataError(f"{folder} was trained on {meta['data']}; rescore scores fashion-mnist-scenes runs (the "
                        "item sides are known only there)")
    recorded = meta.get("data_dir")
    root = data_dir or (recorded if recorded and Path(recorded).is_dir() else FASHION_MNIST_DIR)
    canvas = int((info.get("input_size") or [0, 0, 64])[-1])
    scenes = SceneMasks(FashionMNISTScenes(root, split, canvas)).subset(limit)
    dev = torch.device("cpu")
    loader = make_loader(scenes, EvalSampler(len(scenes), batch_size), 0, False, collate_fn=seg_collate)
    pipe = SegmentationPipeline(dev, info["mean"], info["std"])
    res = SEGMENT.evaluate(net.to(dev), loader, pipe, DistInfo(device=dev), amp=amp, progress=False,
                           num_classes=net.num_classes)
    epoch = meta.get("epoch")
    rows = read_run_metrics(folder)
    miou_recorded = next((r["val_miou"] for r in rows if r.get("epoch") == epoch and r.get("val_miou") is not None),
                         None)
    out = {k.removeprefix("val_"): v for k, v in res.items() if k.startswith("val_") and k != "val_loss"}
    return dict(**out, by_size=res["by_size"], images=res["images"], architecture=info["architecture"],
                fusion=(info.get("model_args") or {}).get("fusion", getattr(net, "fusion", None)), epoch=epoch,
                miou_recorded=miou_recorded)


def _seed_of(folder: Path) -> int | None:
    if (folder / CONFIG_FILE).is_file():
        seed = read_run_config(folder).get("seed")
        if isinstance(seed, int):
            return seed
    tail = folder.name.rsplit("-s", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def rescore(study: str | Path, output: str | Path | None = None, *, split: str = "test", limit: int | None = None,
            baseline: str = "add", batch_size: int = 250, amp: str = "none", threads: int | None = None,
            command: str = "", log: Callable[[str], None] = print) -> dict:
    """Score every run of ``study/runs`` again and write ``rescore.{csv,json,md}`` into ``output`` (default: study).

    Args:
        study: the study folder (its ``runs/*/`` hold the weights).
        output: where the three files go.
        split: the scenes' split.
        limit: the first N scenes.
        baseline: the fusion type every other is contrasted with.
        batch_size: scenes per batch.
        amp: ``none`` or ``bf16``.
        threads: CPU threads.
        command: the command line, for the report.
        log: called with one line per scored run.

    Returns:
        ``runs`` (one mapping per run), ``groups`` (per fusion type: per measure mean, std, n), ``contrasts``
        and ``seconds``.
    """
    study = Path(study)
    folders = sorted(p for p in (study / "runs").glob("*") if (p / "config.json").is_file())
    if not folders:
        raise DataError(f"{study}/runs holds no run folders with weights (config.json + model.safetensors)")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    runs = []
    for folder in folders:
        t1 = time.perf_counter()
        r = score_run(folder, split=split, limit=limit, batch_size=batch_size, amp=amp)
        r.update(run=folder.name, seed=_seed_of(folder), seconds=time.perf_counter() - t1)
        runs.append(r)
        log(f"{folder.name}: mIoU {r['miou']:.2f} (recorded {_num(r['miou_recorded'])}), foreground IoU "
            f"{r['fg_iou']:.2f}, item-class acc. {r['item_acc']:.2f}, scene acc. {r['scene_acc']:.2f} "
            f"({r['images']} scenes, {r['seconds']:.0f} s)")
    seconds = time.perf_counter() - t0
    result = _summarise(runs, baseline)
    result.update(runs=runs, seconds=seconds, split=split, limit=limit, amp=amp, command=command,
                  machine=_machine(), threads=torch.get_num_threads())
    out = Path(output) if output is not None else study
    out.mkdir(parents=True, exist_ok=True)

    atomic_write(out / "rescore.json", lambda f: f.write((json.dumps(result, indent=1, default=_jsonable) + "\n")
                                                         .encode()))
    atomic_write(out / "rescore.csv", lambda f: f.write(_csv(runs).encode()))
    atomic_write(out / "rescore.md", lambda f: f.write(rescore_markdown(result).encode()))
    return result


def _jsonable(v: object) -> object:
    return list(v) if isinstance(v, tuple) else str(v)


def _values(run: dict) -> dict[str, float]:
    """A run's scalar measures, the by-size ones as ``fg_iou_s14_18`` columns."""
    vals = {k: run[k] for k, _ in MEASURES}
    vals.update(size_columns(run["by_size"], prefix=""))
    return vals


def _summarise(runs: list[dict], baseline: str) -> dict:
    fusions = list(dict.fromkeys(r["fusion"] for r in runs))
    groups = {}
    for f in fusions:
        mine = [_values(r) for r in runs if r["fusion"] == f]
        groups[f] = {k: dict(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else None, n=len(v))
                     for k in mine[0] for v in [[m[k] for m in mine if not math.isnan(m[k])]] if v}
    contrasts = {}
    if baseline in fusions:
        base = {r["seed"]: _values(r) for r in runs if r["fusion"] == baseline}
        for f in fusions:
            if f == baseline:
                continue
            other = {r["seed"]: _values(r) for r in runs if r["fusion"] == f}
            seeds = sorted(set(base) & set(other))
            contrasts[f"{f}-{baseline}"] = {k: paired_contrast([other[s][k] for s in seeds],
                                                               [base[s][k] for s in seeds])
                                             for k in base[seeds[0]]} if seeds else {}
    bins = [tuple(b["sides"]) for b in runs[0]["by_size"]]
    return dict(fusions=fusions, baseline=baseline, groups=groups, contrasts=contrasts, bins=bins)


def _csv(runs: list[dict]) -> str:
    buf = io.StringIO()
    head = ["run", "fusion", "seed", "epoch", "images", "miou_recorded", *(k for k, _ in MEASURES), "mean_acc"]
    extra = list(size_columns(runs[0]["by_size"], prefix=""))
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*head, *extra, "seconds"])
    for r in runs:
        vals = {**r, **size_columns(r["by_size"], prefix="")}
        writer.writerow([_cell(vals.get(k)) for k in [*head, *extra, "seconds"]])
    return buf.getvalue()


def _cell(v: object) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _num(v: float | None, digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}"


def _mean_std(g: dict | None) -> str:
    if not g:
        return "—"
    return _num(g["mean"]) + (f" ± {_num(g['std'])}" if g["std"] is not None else "")


def _contrast_cell(c: dict | None) -> str:
    if not c or c["mean"] is None:
        return "—"
    if c["lo"] is None:
        return f"{c['mean']:+.2f} (n = {c['n']}, no interval)"
    return f"{c['mean']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}], p = {c['p']:.2f}, MDD ≈ {c['mdd']:.1f}"


def rescore_markdown(result: dict) -> str:
    """The tables of ``rescore.md``."""
    fusions, groups, runs = result["fusions"], result["groups"], result["runs"]
    scenes = runs[0]["images"]
    out = ["# Re-scored from the saved weights: the item found apart from the item named", "",
           f"`{result['command']}`" if result["command"] else "", "",
           f"{len(runs)} runs, each on the first {scenes:,} `{result['split']}` scenes of fashion-mnist-scenes at its "
           f"canvas; {'float32' if result['amp'] == 'none' else result['amp']}, {result['threads']} thread(s); "
           f"{result['machine']}; wall time {result['seconds']:.0f} s.", "",
           "Foreground IoU: class-agnostic IoU of item pixels (any class) against background. Item-class "
           "accuracy: of the item pixels predicted as an item, the share given the right class. Scene accuracy: "
           "the majority class of each scene's predicted item pixels against its label (no predicted item "
           "pixel: wrong). Mean ± sample std over the seeds (n per type below).", "",
           "| fusion | n | " + " | ".join(f"{label} (%)" for _, label in MEASURES) + " |",
           "|---|---:|" + "---:|" * len(MEASURES)]
    for f in fusions:
        n = groups[f]["miou"]["n"]
        out.append(f"| {f} | {n} | " + " | ".join(_mean_std(groups[f].get(k)) for k, _ in MEASURES) + " |")
    out += ["", "Per run (mIoU recorded at training beside the re-scored one):", "",
            "| run | seed | epoch | mIoU recorded | " + " | ".join(label for _, label in MEASURES) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(MEASURES)]
    for r in runs:
        epoch = "—" if r["epoch"] is None else r["epoch"] + 1
        out.append(f"| {r['run']} | {r['seed']} | {epoch} | {_num(r['miou_recorded'])} | "
                   + " | ".join(_num(r[k]) for k, _ in MEASURES) + " |")
    bins = [tuple(b) for b in result["bins"]]
    if bins:
        counts = [b["scenes"] for b in runs[0]["by_size"]]
        out += ["", "## By item side (the pasted item's side in pixels)", "",
                "Scenes per bin: " + ", ".join(f"{lo}-{hi} px: {n:,}" for (lo, hi), n in zip(bins, counts, strict=True))
                + ". Mean ± sample std over the seeds.", ""]
        for key, label in _BIN_MEASURES:
            out += [f"**{label} (%)**", "", "| fusion | " + " | ".join(f"{lo}-{hi} px" for lo, hi in bins) + " |",
                    "|---|" + "---:|" * len(bins)]
            for f in fusions:
                out.append(f"| {f} | " + " | ".join(_mean_std(groups[f].get(f"{key}_s{lo}_{hi}")) for lo, hi in bins)
                           + " |")
            out.append("")
    if result["contrasts"]:
        out += ["## Paired differences over seeds", "",
                "Mean difference (points) [95 % t interval], paired t-test p, and MDD: the smallest difference a "
                "two-sided 5 % paired t-test would detect with about 80 % power at this spread of the "
                "differences, `(t[0.975, n-1] + t[0.8, n-1]) · sd / √n`. An interval that contains 0 does not "
                "tell the two apart.", ""]
        keys = [k for k, _ in MEASURES] + [f"{k}_s{lo}_{hi}" for k, _ in _BIN_MEASURES for lo, hi in bins]
        labels = dict(MEASURES)
        labels.update({f"{k}_s{lo}_{hi}": f"{lab}, {lo}-{hi} px" for k, lab in _BIN_MEASURES for lo, hi in bins})
        names = list(result["contrasts"])
        out += ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for k in keys:
            out.append(f"| {labels[k]} | " + " | ".join(_contrast_cell(result["contrasts"][c].get(k)) for c in names)
                       + " |")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"
