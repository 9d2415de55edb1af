"""A study's report: aggregation over seeds, paired contrasts (Holm), table.md, study.json, results.csv,
study.png."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import OpenAFFError
from ..files import atomic_write
from ..layers import fusion_names
from ..stats import contrast_table, parse_contrasts
from ..training.run_folder import read_run_config
from .paper import paper_number
from .runs import RunRecord, run_record
from .scenarios import SCENARIOS, StudyError, split_fusion_spec
from .settings import StudySettings, _load_settings, _model_facts


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


# The paper's claims, as contrasts a - b over seeds: AFF/iAFF against Add and against the strongest other
# attention (MS-GAU), iAFF against AFF, and the controls (AFF at a matched budget; Add with the branch BNs).
DEFAULT_CONTRASTS = (("aff", "add"), ("iaff", "add"), ("iaff", "aff"), ("aff", "ms_gau"), ("iaff", "ms_gau"),
                     ("aff@r2", "aff"), ("aff@r2", "ms_gau"), ("add_bn", "add"), ("aff", "add_bn"),
                     ("concat", "add"))


def resolve_contrasts(text: str | None, fusions: Sequence[str]) -> list[tuple[str, str]]:
    """The study's contrasts: ``--contrasts A-B,...`` checked against the grid, or the defaults the grid allows."""
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
        runs.append(run_record(f, b, s, folder, metric, epochs, facts))
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


def study_markdown_best(result: StudyResult) -> str:
    """The best-metric table alone (what the command prints at the end)."""
    return "\n".join(_grid(result, lambda c, bold: _fmt(c["best_mean"], c["best_std"], c["n"], c["planned"], bold),
                           "best_mean"))
