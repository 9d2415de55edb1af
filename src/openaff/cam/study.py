"""``openaff cam --study DIR``: the localisation score of every finished run of an ``openaff study`` folder
(:func:`score_study`), its table (:func:`study_markdown`) and files."""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..training.errors import ConfigError, DataError
from .gradcam import _cam_class, _save, gradcam_grid
from .images import scene_samples
from .localisation import _score_one, localisation_score
from .models import CamError, load_model

__all__ = ["StudyScore", "score_study", "study_markdown"]


@dataclass
class StudyScore:
    """What :func:`score_study` measured and wrote.

    Attributes:
        runs: one row per scored run (fusion, b, seed, energy, pointing, top1, val_top1, ...).
        groups: one row per (fusion, b): means and standard deviations over seeds.
        skipped: run folders left out, with the reason.
        settings: how the scores were made (method, scenes, canvas, layer, command).
        paths: the files written (``md``, ``csv``, ``json``, ``grid``).
    """

    runs: list[dict]
    groups: list[dict]
    skipped: list[str]
    settings: dict
    paths: dict[str, Path] = field(default_factory=dict)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a run configuration")
    return data


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


def _fusion_of(cfg: dict) -> str:
    fusion = (cfg.get("model_kwargs") or {}).get("fusion")
    if fusion:
        return str(fusion)
    name = str(cfg.get("model", ""))
    for prefix in ("iaff_", "aff_"):
        if name.startswith(prefix):
            return prefix[:-1]
    return "add"


def _study_runs(study: Path) -> tuple[list[dict], list[str], list[str]]:
    """The finished runs of a study folder, the skipped ones (with reasons), and the study's fusion order."""
    if not study.is_dir():
        raise DataError(f"study folder {study} does not exist")
    runs_dir = study / "runs"
    if not runs_dir.is_dir():
        raise DataError(f"{study} is not a study folder: it has no runs/ (see openaff study)")
    order: list[str] = []
    meta = study / "study.json"
    if meta.is_file():
        try:
            order = list(json.loads(meta.read_text()).get("settings", {}).get("fusions") or [])
        except (OSError, ValueError, AttributeError):
            order = []
    runs, skipped = [], []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        cfg_path = folder / "config.yaml"
        if not cfg_path.is_file():
            skipped.append(f"{folder.name}: no config.yaml (not started)")
            continue
        cfg = _read_yaml(cfg_path)
        rows = _metrics(folder)
        epochs = int(cfg.get("epochs") or 0)
        if len(rows) < epochs:
            skipped.append(f"{folder.name}: unfinished ({len(rows)} of {epochs} epochs)")
            continue
        if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
            skipped.append(f"{folder.name}: no config.json + model.safetensors")
            continue
        if cfg.get("data") != "fashion-mnist-scenes":
            raise ConfigError(f"{folder} was trained on {cfg.get('data')!r}; the localisation score needs "
                              "fashion-mnist-scenes (the scenes' boxes)")
        val = [float(r["val_top1"]) for r in rows if r.get("val_top1") not in (None, "")]
        runs.append(dict(run=folder.name, folder=folder, fusion=_fusion_of(cfg),
                         b=int((cfg.get("model_kwargs") or {}).get("b") or 0) or None, seed=int(cfg.get("seed") or 0),
                         model=str(cfg.get("model")), canvas=int(cfg.get("img_size") or 64),
                         data_dir=cfg.get("data_dir"), val_top1=max(val) / 100 if val else None))
    return runs, skipped, order


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _pm(mean: float | None, std: float | None, bold: bool = False) -> str:
    """A fraction as ``mean ± std`` in percent (``–`` when unknown)."""
    if mean is None:
        return "–"
    text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    return f"**{text}**" if bold else text


def score_study(study: str | Path, output: str | Path | None = None, *, limit: int = 2000,
                method: str = "gradcam", target: str = "label", tolerance: float = 0.0,
                grid_indices: Sequence[int] = (0, 1, 2, 3, 4, 5), batch_size: int = 64,
                command: str | None = None, progress: bool = True) -> StudyScore:
    """Score every finished run of an ``openaff study`` folder on ``fashion-mnist-scenes``.

    Each run (``STUDY/runs/*/``: ``config.yaml``, ``metrics.csv``, ``config.json`` + ``model.safetensors``)
    is loaded with its recorded preprocessing and scored on the first ``limit`` validation scenes at
    its canvas size (the scenes the study validated on): the mean fraction of the CAM's energy inside
    the item's box and the pointing-game hit rate. Runs are grouped by fusion type and depth (mean ±
    std over seeds). Unfinished runs are skipped (listed in ``skipped``).

    Args:
        study: the study folder.
        output: where to write ``localisation.md/.csv/.json`` and ``grid.png`` (default ``STUDY/cam``).
        limit: scenes scored per run.
        method: one of :data:`METHODS`.
        target: ``"label"`` (the map of the true class) or ``"predicted"``.
        tolerance: pointing-game tolerance in pixels.
        grid_indices: the scenes of the Figure-6-style grid (maps of the predicted class, seed 0).
        batch_size: scenes per pass.
        command: the command line recorded in the table (default: the equivalent ``openaff cam``).
        progress: print a line per run.

    Raises:
        DataError: not a study folder, no finished run, unreadable files.
        ConfigError: a study not trained on fashion-mnist-scenes, bad settings.
    """
    study = Path(study)
    out = Path(output) if output is not None else study / "cam"
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive number of scenes, got {limit!r}")
    if target not in ("label", "predicted"):
        raise ConfigError(f"the localisation target must be 'label' or 'predicted', got {target!r}")
    _cam_class(method)
    runs, skipped, order = _study_runs(study)
    if not runs:
        why = f" ({'; '.join(skipped[:3])})" if skipped else ""
        raise DataError(f"{study} has no finished run to score{why}")
    canvases = sorted({r["canvas"] for r in runs})
    if len(canvases) > 1:
        raise ConfigError(f"the runs of {study} use different canvas sizes {canvases}; score them separately")
    canvas, data_dir = canvases[0], runs[0]["data_dir"]
    scenes = scene_samples(range(limit), canvas=canvas, data_dir=data_dir)
    known = ("add", "concat", "ms_gau", "ms_se", "ms_sa", "aff", "iaff")
    rank = {f: i for i, f in enumerate([*order, *[k for k in known if k not in order]])}
    runs.sort(key=lambda r: (rank.get(r["fusion"], len(rank)), r["fusion"], r["b"] or 0, r["seed"]))
    layer = None
    for r in runs:
        cm = load_model(r["folder"], label=r["run"])
        layer = layer or cm.target_layer
        row, _, _ = _score_one(cm, scenes, method, target, tolerance, batch_size)
        r.update(energy=row["energy"], pointing=row["pointing"], top1=row["top1"], n=row["n"], empty=row["empty"],
                 layer=cm.target_layer)
        if progress:
            print(f"cam: {r['run']}: energy in box {r['energy']:.3f}, pointing {r['pointing']:.3f}, "
                  f"top-1 {r['top1']:.3f} ({row['n']} scenes)", flush=True)
    box_fraction = float(localisation_score(np.zeros((len(scenes), canvas, canvas)),
                                            [s.box for s in scenes]).box_fraction.mean())
    groups = []
    for key in dict.fromkeys((r["fusion"], r["b"]) for r in runs):
        members = [r for r in runs if (r["fusion"], r["b"]) == key]
        g = dict(fusion=key[0], b=key[1], seeds=[r["seed"] for r in members], n_runs=len(members))
        for k in ("energy", "pointing", "top1", "val_top1"):
            g[f"{k}_mean"], g[f"{k}_std"] = _mean_std([r[k] for r in members])
        groups.append(g)
    settings = dict(study=str(study), method=method, target=target, tolerance=tolerance, scenes=len(scenes),
                    split="val", canvas=canvas, target_layer=layer, box_fraction=box_fraction,
                    command=command or _study_command(study, out, limit, method, target, tolerance, grid_indices))
    result = StudyScore(runs, groups, skipped, settings)
    result.paths = _write_study(result, out, grid_indices, canvas, data_dir, method)
    return result


def _study_command(study: Path, out: Path, limit: int, method: str, target: str, tolerance: float,
                   grid: Sequence[int]) -> str:
    parts = ["openaff", "cam", "--study", str(study), "-o", str(out)]
    if limit != 2000:
        parts += ["--limit", str(limit)]
    if method != "gradcam":
        parts += ["--method", method]
    if target != "label":
        parts += ["--target-class", target]
    if tolerance:
        parts += ["--tolerance", f"{tolerance:g}"]
    if list(grid) != [0, 1, 2, 3, 4, 5]:
        parts += ["--grid-indices", ",".join(map(str, grid))]
    return shlex.join(parts)


def study_markdown(result: StudyScore) -> str:
    """The localisation table of :func:`score_study` in markdown."""
    s = result.settings
    best_e = max((g["energy_mean"] for g in result.groups if g["energy_mean"] is not None), default=None)
    best_p = max((g["pointing_mean"] for g in result.groups if g["pointing_mean"] is not None), default=None)
    tol = f" (grown by {s['tolerance']:g} px)" if s["tolerance"] else ""
    lines = [f"# Where the models look: localisation on fashion-mnist-scenes ({Path(s['study']).name})", "",
             f"`{s['command']}`", "",
             f"{s['method']} of the {'true' if s['target'] == 'label' else 'predicted'} class at `{s['target_layer']}`,"
             f" the first {s['scenes']} validation scenes ({s['canvas']}×{s['canvas']}). *Energy in box*: the share of "
             "the map's sum inside the item's box; *pointing*: the map's maximum inside the box"
             f"{tol}. In %, mean ± std over seeds; "
             f"a uniform map scores {100 * s['box_fraction']:.1f} % on both (the boxes' mean share of the canvas). "
             "Top-1: on the scored scenes; val top-1: the study's best epoch.", "",
             "| fusion | b | runs | energy in box | pointing | top-1 | val top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for g in result.groups:
        lines.append(f"| {g['fusion']} | {g['b'] if g['b'] is not None else '–'} | {g['n_runs']} | "
                     f"{_pm(g['energy_mean'], g['energy_std'], bold=g['energy_mean'] == best_e)} | "
                     f"{_pm(g['pointing_mean'], g['pointing_std'], bold=g['pointing_mean'] == best_p)} | "
                     f"{_pm(g['top1_mean'], g['top1_std'])} | {_pm(g['val_top1_mean'], g['val_top1_std'])} |")
    lines.append(f"| uniform map | | | {100 * s['box_fraction']:.1f} | {100 * s['box_fraction']:.1f} | | |")
    if result.skipped:
        lines += ["", f"Not scored: {'; '.join(result.skipped)}."]
    return "\n".join(lines) + "\n"


_CSV_FIELDS = ("run", "fusion", "b", "seed", "model", "n", "energy", "pointing", "top1", "val_top1", "empty", "layer")


def _write_study(result: StudyScore, out: Path, grid_indices: Sequence[int], canvas: int, data_dir: Any,
                 method: str) -> dict[str, Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result.runs:
        writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r.get(k), float) else r.get(k)) for k in _CSV_FIELDS})
    runs = [{k: v for k, v in r.items() if k != "folder"} for r in result.runs]
    doc = dict(settings=result.settings, groups=result.groups, runs=runs, skipped=result.skipped)
    paths = dict(md=out / "localisation.md", csv=out / "localisation.csv", json=out / "localisation.json",
                 grid=out / "grid.png")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths["md"].write_text(study_markdown(result))
        paths["csv"].write_text(buf.getvalue())
        paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as err:
        raise CamError(f"cannot write {out}: {err.strerror or err}") from None
    # Figure 6's layout: one column per fusion type (its lowest seed), maps of the predicted class.
    columns = {}
    for r in result.runs:
        columns.setdefault((r["fusion"], r["b"]), r)
    samples = scene_samples(list(grid_indices), canvas=canvas, data_dir=data_dir)
    titles = [f"{r['fusion']}" + (f" b{r['b']}" if len({k[1] for k in columns}) > 1 else "") + f" s{r['seed']}"
              for r in columns.values()]
    grid = gradcam_grid([str(r["folder"]) for r in columns.values()], samples, method=method, titles=titles,
                        title=f"{Path(result.settings['study']).name}: {method} of the predicted class "
                              "(box: the item; red: wrong)")
    _save(grid.figure, paths["grid"])
    return paths
