"""Check `openaff bench` JSON files against the targets of issue #5 and print a markdown verdict.

Usage: python benchmarks/summarize.py RESULT.json [RESULT.json ...]

Each target names the file kind it needs (mode, device type, compile) and the setup the issue defines
it for (CPU_SETUP, GPU_SETUP: AMP, batch, input size...); files of another setup, e.g. a smoke test,
are ignored, and a target whose numbers are not in the given files is listed as "not measured".
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# The setup each target is defined for (issue #5); runs with another setup (a smoke test at batch 2,
# bf16 on a CPU) are not evidence for or against it.
GPU_SETUP = dict(amp="bf16", channels_last=True, batch=256, input_size=[3, 224, 224])
CPU_SETUP = dict(amp="off", batch=8, input_size=[3, 224, 224], threads=2)

# (description, mode, device type, compiled, model, field, op, threshold)
TARGETS = [
    ("AFF-ResNet-50 training img/s vs resnet50d, compiled", "train", "cuda", True, "aff_resnet50",
     "throughput_ratio", ">=", 0.90),
    ("AFF-ResNet-50 training img/s vs resnet50d, eager", "train", "cuda", False, "aff_resnet50",
     "throughput_ratio", ">=", 0.85),
    ("iAFF-ResNeXt-50 training img/s vs resnext50d_32x4d, compiled", "train", "cuda", True, "iaff_resnext50_32x4d",
     "throughput_ratio", ">=", 0.85),
    ("AFF-ResNet-50 peak training memory vs resnet50d, eager", "train", "cuda", False, "aff_resnet50",
     "peak_mem_ratio", "<=", 1.10),
    ("AFF-ResNet-50 peak training memory vs resnet50d, compiled", "train", "cuda", True, "aff_resnet50",
     "peak_mem_ratio", "<=", 1.10),
    ("AFF-ResNet-50 inference time vs resnet50d, CPU, median of all rounds", "infer", "cpu", False, "aff_resnet50",
     "time_ratio", "<=", 1.06),
    ("AFF-ResNet-50 inference time vs resnet50d, CPU, median of per-round ratios", "infer", "cpu", False,
     "aff_resnet50", "time_ratio_paired", "<=", 1.06),
    ("AFF-ResNet-50 inference time vs resnet50d, CPU, median of undisturbed rounds", "infer", "cpu", False,
     "aff_resnet50", "time_ratio_quiet", "<=", 1.06),
    ("AFF-ResNet-50 inference time vs resnet50d, CPU, compiled, median of per-round ratios", "infer", "cpu", True,
     "aff_resnet50", "time_ratio_paired", "<=", 1.06),
    ("iAFF-ResNeXt-50 inference time vs resnext50d_32x4d, CPU, within its FLOPs ratio", "infer", "cpu", False,
     "iaff_resnext50_32x4d", "time_ratio_paired", "<=", 1.36),
    # The add-twin is resnet50d built from our blocks (identical outputs): any gap is our code's overhead.
    ("add-twin aff_resnet50:add vs resnet50d, CPU, median of per-round ratios", "infer", "cpu", False,
     "aff_resnet50:add", "time_ratio_paired", "<=", 1.03),
]


def _setup(meta: dict) -> str:
    """What besides the model sets the numbers apart: memory format and, on the CPU, the allocator."""
    parts = ["channels_last" if meta.get("channels_last") else "NCHW"]
    if meta.get("cpu_alloc"):
        parts.append(f"alloc {meta['cpu_alloc']}")
    return ", ".join(parts)


def _matches(meta: dict, setup: dict) -> bool:
    threads = meta.get("machine", {}).get("threads")
    return all((threads if k == "threads" else meta.get(k)) == v for k, v in setup.items())


def _rows(docs: list[dict], mode: str, device: str, compiled: bool, model: str) -> list[dict]:
    out = []
    for doc in docs:
        meta = doc["meta"]
        if meta["mode"] != mode or not meta["device"].startswith(device):
            continue
        if not _matches(meta, CPU_SETUP if device == "cpu" else GPU_SETUP):
            continue
        for r in doc["results"]:
            name, *suffixes = r["model"].split("+")
            # Like for like only: a folded model against the folded baseline, an unfolded one against the
            # unfolded baseline (files of older versions compared folded AFF with unfolded resnet50d).
            like = ("fold" in suffixes) == ("fold" in (r.get("baseline") or "").split("+")[1:])
            # "+naive" is the straightforward "before", shown in the tables but not a candidate here.
            if (r["compiled"] == compiled and name == model and "naive" not in suffixes and r["error"] is None
                    and like):
                out.append({**r, "setup": _setup(meta)})
    return out


def summarize(paths: list[str]) -> str:
    """One row per target and model variant: the median over the files that measured it, and the range.

    A machine's speed can shift between processes (memory placement), not only within one, so a
    target measured in several runs (one file each) is judged on the median of the runs.
    """
    docs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["| target | variant | setup | value (median of runs) | runs: min–max | vs | met |",
             "|---|---|---|---:|---|---|---|"]
    for desc, mode, device, compiled, model, fld, op, thr in TARGETS:
        groups: dict[tuple[str, str, str], list[float]] = {}
        for r in _rows(docs, mode, device, compiled, model):
            if r.get(fld) is not None:
                groups.setdefault((r["model"], r["setup"], r["baseline"]), []).append(r[fld])
        if not groups:
            lines.append(f"| {desc} ({op} {thr}) | – | | not measured | | | |")
        for (variant, setup, baseline), vals in groups.items():
            v = statistics.median(vals)
            met = "yes" if (v >= thr if op == ">=" else v <= thr) else "**no**"
            spread = f"{len(vals)}: {min(vals):.3f}–{max(vals):.3f}" if len(vals) > 1 else "1"
            lines.append(f"| {desc} ({op} {thr}) | `{variant}` | {setup} | {v:.3f} | {spread} | `{baseline}` | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(summarize(sys.argv[1:]))
