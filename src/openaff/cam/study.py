"""``openaff cam --study DIR``: the CAMs of every finished run of an ``openaff study`` folder, scored beside
baseline maps (:func:`score_study`), its tables (:func:`study_markdown`) and files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.datasets import FASHION_MNIST_DIR
from ..data.scenes import FashionMNISTScenes
from ..errors import ConfigError, DataError, check_int
from ..machine import cpu_name
from ..training.run_folder import CONFIG_FILE, read_run_config, read_run_metrics
from .baselines import BASELINES
from .faithfulness import ROAD_PERCENTILES
from .gradcam import _cam_class, _save, gradcam_grid
from .images import scene_samples
from .models import CamError, load_model
from .scoring import score_scenes, size_bins, summarise

__all__ = ["SCENE_SETS", "StudyScore", "score_study", "study_markdown"]

# The scene sets: the study's own (with clutter), and the same scenes without clutter (the item at the same place).
SCENE_SETS = {"cluttered": None, "clean": (0, 0)}
_MAPS = ("model", *BASELINES)


@dataclass
class StudyScore:
    """What :func:`score_study` measured and wrote.

    Attributes:
        runs: one row per scored run and scene set (fusion, b, seed, set, the :func:`summarise` fields).
        groups: one row per (scene set, fusion, b): means, standard deviations and, for the gains over the
            brightness map, 95 % t-intervals over seeds.
        skipped: run folders left out, with the reason.
        settings: how the scores were made (method, scenes, canvas, layer, bins, command, machine, wall time).
        paths: the files written (``md``, ``csv``, ``json``, ``grid``).
    """

    runs: list[dict]
    groups: list[dict]
    skipped: list[str]
    settings: dict
    paths: dict[str, Path] = field(default_factory=dict)


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
        if not (folder / CONFIG_FILE).is_file():
            skipped.append(f"{folder.name}: no config.yaml (not started)")
            continue
        cfg = read_run_config(folder)
        rows = read_run_metrics(folder)
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
        val = [r["val_top1"] for r in rows if isinstance(r.get("val_top1"), float)]
        runs.append(dict(run=folder.name, folder=folder, fusion=_fusion_of(cfg),
                         b=int((cfg.get("model_kwargs") or {}).get("b") or 0) or None, seed=int(cfg.get("seed") or 0),
                         model=str(cfg.get("model")), canvas=int(cfg.get("img_size") or 64),
                         data_dir=cfg.get("data_dir"), val_top1=max(val) / 100 if val else None))
    return runs, skipped, order


def _stats(values: list[float | None]) -> dict[str, float | None]:
    """Mean, standard deviation and 95 % t-interval (scipy) over seeds."""
    from scipy import stats

    v = [x for x in values if x is not None and math.isfinite(x)]
    out: dict[str, float | None] = dict(mean=statistics.fmean(v) if v else None, std=None, lo=None, hi=None)
    if len(v) > 1:
        out["std"] = statistics.stdev(v)
        half = float(stats.t.ppf(0.975, len(v) - 1)) * out["std"] / math.sqrt(len(v))
        out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out


_FIELDS = ("correct", "top1", "scored", "road_scored", "val_top1",
           *(f"{m}_{k}" for m in ("energy", "pointing", "road") for k in (*_MAPS, "gain")))
_BIN_FIELDS = ("n", "correct", "top1", "scored", "road_scored",
               *(f"{m}_{k}" for m in ("energy", "pointing", "road") for k in (*_MAPS, "gain")))


def _group(members: list[dict]) -> dict:
    first = members[0]
    g = dict(set=first["set"], fusion=first["fusion"], b=first["b"], seeds=[r["seed"] for r in members],
             n_runs=len(members), n=first["n"])
    for k in _FIELDS:
        g[k] = _stats([r.get(k) for r in members])
    g["bins"] = []
    for i, b in enumerate(first.get("bins") or []):
        gb = dict(first=b["first"], last=b["last"])
        for k in _BIN_FIELDS:
            gb[k] = _stats([r["bins"][i].get(k) for r in members])
        g["bins"].append(gb)
    return g


def _machine() -> str:
    return f"{os.cpu_count()}-core {cpu_name()}"


def score_study(study: str | Path, output: str | Path | None = None, *, limit: int = 2000, split: str = "test",
                method: str = "gradcam", sets: Sequence[str] = tuple(SCENE_SETS), road_limit: int | None = 100,
                road_percentiles: Sequence[int] = ROAD_PERCENTILES, bins: int = 4,
                centre_sigma: float | None = None, tolerance: float = 0.0,
                grid_indices: Sequence[int] = (0, 1, 2, 3, 4, 5), batch_size: int = 64,
                command: str | None = None, progress: bool = True) -> StudyScore:
    """Score the CAMs of every finished run of an ``openaff study`` folder on ``fashion-mnist-scenes``.

    Each run (``STUDY/runs/*/``: ``config.yaml``, ``metrics.csv``, ``config.json`` + ``model.safetensors``)
    is loaded with its recorded preprocessing. On the first ``limit`` scenes of ``split`` at its canvas size,
    the map of the *predicted* class is scored on the scenes the run classifies correctly (energy in box,
    pointing game, and ROAD on the first ``road_limit`` of them), beside the baseline maps (brightness, centre,
    uniform) on the same scenes, in total and by the item's pasted side. Each scene set is scored: ``cluttered``
    (the study's scenes) and ``clean`` (the same scenes without clutter, the item at the same place). Runs are
    grouped by scene set, fusion type and depth (mean ± std over seeds). Unfinished runs are skipped.

    Args:
        study: the study folder.
        output: where to write ``localisation.md/.csv/.json`` and ``grid.png`` (default ``STUDY/cam``).
        limit: scenes per set.
        split: the scenes' split: ``test`` (default; the Fashion-MNIST test items), ``val`` or ``train``.
        method: one of :data:`METHODS`.
        sets: the scene sets to score (of :data:`SCENE_SETS`).
        road_limit: correctly classified scenes per run and set that get ROAD (0: none, None: all).
        road_percentiles: ROAD's percentiles.
        bins: the number of pasted-side bins over the scenes' range of sides.
        centre_sigma: the centre prior's standard deviation in pixels (default: a quarter of the canvas).
        tolerance: pointing-game tolerance in pixels.
        grid_indices: the scenes of the Figure-6-style grid (maps of the predicted class, lowest seed).
        batch_size: scenes per pass.
        command: the command line recorded in the table (default: the equivalent ``openaff cam``).
        progress: print a line per run and set.

    Raises:
        DataError: not a study folder, no finished run, unreadable files.
        ConfigError: a study not trained on fashion-mnist-scenes, bad settings.
    """
    start = time.perf_counter()
    study = Path(study)
    out = Path(output) if output is not None else study / "cam"
    check_int(limit, "limit must be a positive number of scenes")
    sets = list(dict.fromkeys(sets))
    unknown = [s for s in sets if s not in SCENE_SETS]
    if unknown or not sets:
        raise ConfigError(f"unknown scene set {unknown[0]!r}; choose from {', '.join(SCENE_SETS)}" if unknown
                          else "no scene set to score")
    if split not in ("test", "val", "train"):
        raise ConfigError(f"the scenes' split must be test, val or train, got {split!r}")
    _cam_class(method)
    runs, skipped, order = _study_runs(study)
    if not runs:
        why = f" ({'; '.join(skipped[:3])})" if skipped else ""
        raise DataError(f"{study} has no finished run to score{why}")
    canvases = sorted({r["canvas"] for r in runs})
    if len(canvases) > 1:
        raise ConfigError(f"the runs of {study} use different canvas sizes {canvases}; score them separately")
    canvas, data_dir = canvases[0], runs[0]["data_dir"]
    sides = FashionMNISTScenes(data_dir if data_dir is not None else FASHION_MNIST_DIR, split, canvas).sides
    edges = size_bins(sides[0], sides[1], bins)
    scenes = {s: scene_samples(range(limit), canvas=canvas, split=split, data_dir=data_dir, clutter=SCENE_SETS[s])
              for s in sets}
    known = ("add", "concat", "ms_gau", "ms_se", "ms_sa", "aff", "iaff")
    rank = {f: i for i, f in enumerate([*order, *[k for k in known if k not in order]])}
    runs.sort(key=lambda r: (rank.get(r["fusion"], len(rank)), r["fusion"], r["b"] or 0, r["seed"]))
    layer, rows, caches = None, [], {s: {} for s in sets}
    for r in runs:
        cm = load_model(r["folder"], label=r["run"])
        layer = layer or cm.target_layer
        for s in sets:
            scores = score_scenes(cm, scenes[s], method=method, road_limit=road_limit,
                                  road_percentiles=road_percentiles, road_cache=caches[s], centre_sigma=centre_sigma,
                                  tolerance=tolerance, batch_size=batch_size)
            row = {**summarise(scores, bins=edges), **r, "set": s, "layer": cm.target_layer}
            rows.append(row)
            if progress:
                road = (f", ROAD {row['road_model']:.3f} vs {row['road_brightness']:.3f} ({row['road_scored']} "
                        "scenes)") if row["road_scored"] else ""
                print(f"cam: {r['run']} {s}: {row['correct']}/{row['n']} correct; energy in box "
                      f"{row['energy_model']:.3f} vs brightness {row['energy_brightness']:.3f}{road}", flush=True)
    groups = []
    for key in sorted(dict.fromkeys((r["set"], r["fusion"], r["b"]) for r in rows), key=lambda k: sets.index(k[0])):
        groups.append(_group([r for r in rows if (r["set"], r["fusion"], r["b"]) == key]))
    settings = dict(study=str(study), method=method, target="predicted", correct_only=True, split=split,
                    scenes=limit, sets={s: SCENE_SETS[s] for s in sets}, canvas=canvas, target_layer=layer,
                    sides=list(sides), bins=[list(e) for e in edges], baselines=list(BASELINES),
                    centre_sigma=centre_sigma if centre_sigma is not None else canvas / 4, tolerance=tolerance,
                    road_limit=road_limit, road_percentiles=[int(p) for p in road_percentiles],
                    command=command or _study_command(study, out, limit, split, method, sets, road_limit, bins,
                                                      tolerance, grid_indices),
                    machine=_machine())
    result = StudyScore(rows, groups, skipped, settings)
    result.paths = _write_study(result, out, grid_indices, canvas, split, data_dir, method, start)
    return result


def _study_command(study: Path, out: Path, limit: int, split: str, method: str, sets: Sequence[str],
                   road_limit: int | None, bins: int, tolerance: float, grid: Sequence[int]) -> str:
    parts = ["openaff", "cam", "--study", str(study), "-o", str(out)]
    if limit != 2000:
        parts += ["--limit", str(limit)]
    if split != "test":
        parts += ["--split", split]
    if method != "gradcam":
        parts += ["--method", method]
    if list(sets) != list(SCENE_SETS):
        parts += ["--sets", ",".join(sets)]
    if road_limit != 100:
        parts += ["--road-limit", "all" if road_limit is None else str(road_limit)]
    if bins != 4:
        parts += ["--size-bins", str(bins)]
    if tolerance:
        parts += ["--tolerance", f"{tolerance:g}"]
    if list(grid) != [0, 1, 2, 3, 4, 5]:
        parts += ["--grid-indices", ",".join(map(str, grid))]
    return shlex.join(parts)


def _pct(s: dict, bold: bool = False, ci: bool = False, signed: bool = False) -> str:
    """A fraction's ``mean ± std`` (or ``mean [lo, hi]``) in percent; ``–`` when unknown."""
    if s["mean"] is None:
        return "–"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    text = fmt.format(100 * s["mean"])
    if ci and s["lo"] is not None:
        text += f" [{100 * s['lo']:+.1f}, {100 * s['hi']:+.1f}]"
    elif s["std"] is not None:
        text += f" ± {100 * s['std']:.1f}"
    return f"**{text}**" if bold else text


def _n(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    return f"{s['mean']:.0f}" if float(s["mean"]).is_integer() or s["mean"] >= 10 else f"{s['mean']:.1f}"


_SET_TITLES = {"cluttered": "Cluttered scenes (the study's scenes)",
               "clean": "The same scenes without clutter (same items, same places)"}


def study_markdown(result: StudyScore) -> str:
    """The tables of :func:`score_study` in markdown: per scene set, localisation, ROAD, and both by item size."""
    s = result.settings
    sets = list(s["sets"])
    road_p = "/".join(map(str, s["road_percentiles"]))
    road_n = "all" if s["road_limit"] is None else f"the first {s['road_limit']}"
    tol = f" (grown by {s['tolerance']:g} px)" if s["tolerance"] else ""
    wall = s.get("wall_s")
    lines = [f"# Where the models look: CAMs on fashion-mnist-scenes ({Path(s['study']).name})", "",
             f"`{s['command']}`", "",
             f"Machine: {s['machine']}" + (f"; wall time {wall / 60:.1f} min" if wall is not None else "") + ".", "",
             f"{s['method']} of the **predicted** class at `{s['target_layer']}`, scored on the scenes each run "
             f"classifies correctly among the first {s['scenes']} `{s['split']}` scenes ({s['canvas']}×{s['canvas']}; "
             "the Fashion-MNIST test items), beside three maps that know nothing of the model, on the same scenes: "
             "*brightness* (the image minus its median, clipped at 0), *centre* (a Gaussian at the canvas centre, "
             f"σ = {s['centre_sigma']:g} px) and *uniform* (its energy in box is the box's share of the canvas). "
             "*Energy in box*: the share of the map's sum inside the item's box; *pointing*: the map's maximum "
             f"inside the box{tol}. *ROAD*: pytorch-grad-cam's ROADCombined at percentiles {road_p} (the mean of "
             "(LeRF − MoRF) / 2: the change in the predicted class's softmax probability when the least / the most "
             "relevant pixels are imputed; higher is more faithful, a random order scores about 0; ties broken at "
             f"random), on {road_n} correctly classified scenes of each run. In %, mean ± std over seeds; "
             "*model − brightness*: the per-scene difference averaged per run, then its mean and 95 % t-interval "
             "over seeds. Runs: seeds per row; correct: of the scenes, mean over seeds.", ""]
    for name in sets:
        groups = [g for g in result.groups if g["set"] == name]
        if not groups:
            continue
        lines += [f"## {_SET_TITLES.get(name, name)}", "",
                  "| fusion | b | runs | correct | energy in box: model | brightness | centre | uniform "
                  "| model − brightness | pointing: model | brightness | centre | model − brightness |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for g in groups:
            lines.append(f"| {g['fusion']} | {g['b'] if g['b'] is not None else '–'} | {g['n_runs']} | "
                         f"{_n(g['correct'])} / {g['n']} | {_pct(g['energy_model'])} | "
                         f"{_pct(g['energy_brightness'])} | "
                         f"{_pct(g['energy_centre'])} | {_pct(g['energy_uniform'])} | "
                         f"{_pct(g['energy_gain'], ci=True, signed=True)} | {_pct(g['pointing_model'])} | "
                         f"{_pct(g['pointing_brightness'])} | {_pct(g['pointing_centre'])} | "
                         f"{_pct(g['pointing_gain'], ci=True, signed=True)} |")
        if any(g["road_scored"]["mean"] for g in groups):
            lines += ["", f"ROAD ({name}):", "",
                      "| fusion | b | scenes | model | brightness | centre | uniform | model − brightness |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for g in groups:
                lines.append(f"| {g['fusion']} | {g['b'] if g['b'] is not None else '–'} | {_n(g['road_scored'])} | "
                             f"{_pct(g['road_model'], signed=True)} | {_pct(g['road_brightness'], signed=True)} | "
                             f"{_pct(g['road_centre'], signed=True)} | {_pct(g['road_uniform'], signed=True)} | "
                             f"{_pct(g['road_gain'], ci=True, signed=True)} |")
        bins = groups[0]["bins"]
        if bins:
            head = " | ".join(f"{b['first']}-{b['last']} px" for b in bins)
            rule = "|".join("---:" for _ in bins)
            for key, what in (("energy", "energy in box"), ("road", "ROAD")):
                if key == "road" and not any(b["road_scored"]["mean"] for g in groups for b in g["bins"]):
                    continue
                lines += ["", f"By the item's pasted side ({name}), {what}: model − brightness, mean ± std over "
                          "seeds (correct scenes per bin, mean over seeds, in brackets):", "",
                          f"| fusion | b | {head} |", f"|---|---:|{rule}|"]
                count = "scored" if key == "energy" else "road_scored"
                for g in groups:
                    cells = " | ".join(f"{_pct(b[f'{key}_gain'], signed=True)} ({_n(b[count])})" for b in g["bins"])
                    lines.append(f"| {g['fusion']} | {g['b'] if g['b'] is not None else '–'} | {cells} |")
                if key == "energy":
                    model = " | ".join(f"{_pct(_pool(groups, i, 'energy_model'))}" for i in range(len(bins)))
                    bright = " | ".join(f"{_pct(_pool(groups, i, 'energy_brightness'))}" for i in range(len(bins)))
                    lines += [f"| *all models' maps* | | {model} |", f"| *brightness map* | | {bright} |"]
        lines.append("")
    if result.skipped:
        lines += [f"Not scored: {'; '.join(result.skipped)}.", ""]
    return "\n".join(lines)


def _pool(groups: list[dict], i: int, key: str) -> dict:
    """The mean over the groups of bin ``i``'s ``key`` (no spread: the groups score different scenes)."""
    v = [g["bins"][i][key]["mean"] for g in groups if g["bins"][i][key]["mean"] is not None]
    return dict(mean=statistics.fmean(v) if v else None, std=None, lo=None, hi=None)


_CSV_FIELDS = ("run", "set", "fusion", "b", "seed", "model", "n", "correct", "top1", "scored", "val_top1", "empty",
               *(f"{m}_{k}" for m in ("energy", "pointing") for k in (*_MAPS, "gain")), "road_scored",
               *(f"road_{k}" for k in (*_MAPS, "gain")), "layer")
_CSV_BIN_FIELDS = ("n", "correct", "energy_model", "energy_brightness", "energy_gain", "road_scored", "road_model",
                   "road_brightness", "road_gain")


def _csv_text(rows: list[dict]) -> str:
    n_bins = max((len(r.get("bins") or []) for r in rows), default=0)
    fields = [*_CSV_FIELDS, *(f"bin{i}_{k}" for i in range(n_bins) for k in ("sides", *_CSV_BIN_FIELDS))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        flat = dict(r)
        for i, b in enumerate(r.get("bins") or []):
            flat[f"bin{i}_sides"] = f"{b['first']}-{b['last']}"
            flat.update({f"bin{i}_{k}": b.get(k) for k in _CSV_BIN_FIELDS})
        writer.writerow({k: (f"{flat[k]:.6f}" if isinstance(flat.get(k), float) else flat.get(k)) for k in fields})
    return buf.getvalue()


def _write_study(result: StudyScore, out: Path, grid_indices: Sequence[int], canvas: int, split: str, data_dir: Any,
                 method: str, start: float) -> dict[str, Path]:
    paths = dict(md=out / "localisation.md", csv=out / "localisation.csv", json=out / "localisation.json",
                 grid=out / "grid.png")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CamError(f"cannot write {out}: {err.strerror or err}") from None
    # Figure 6's layout: one column per fusion type (its lowest seed), maps of the predicted class.
    columns = {}
    for r in result.runs:
        columns.setdefault((r["fusion"], r["b"]), r)
    samples = scene_samples(list(grid_indices), canvas=canvas, split=split, data_dir=data_dir)
    titles = [f"{r['fusion']}" + (f" b{r['b']}" if len({k[1] for k in columns}) > 1 else "") + f" s{r['seed']}"
              for r in columns.values()]
    grid = gradcam_grid([str(r["folder"]) for r in columns.values()], samples, method=method, titles=titles,
                        title=f"{Path(result.settings['study']).name}: {method} of the predicted class "
                              "(box: the item; red: wrong)")
    _save(grid.figure, paths["grid"])
    result.settings["wall_s"] = round(time.perf_counter() - start, 1)
    runs = [{k: v for k, v in r.items() if k not in ("folder",)} for r in result.runs]
    doc = dict(settings=result.settings, groups=result.groups, runs=runs, skipped=result.skipped)
    try:
        paths["md"].write_text(study_markdown(result))
        paths["csv"].write_text(_csv_text(result.runs))
        paths["json"].write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    except OSError as err:
        raise CamError(f"cannot write {out}: {err.strerror or err}") from None
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
