"""Pilot of the GPU study protocol: every cell of the ``study-gpu`` grid timed on this device, the full grid projected.

The grid is the paper's Table 4 setting: scenarios short-skip and same-layer, the seven fusion types, b = 1..4,
trained with the authors' recipe (``study-gpu``: batch 128, bf16, channels_last, Nesterov SGD, mixup). Each
cell is trained by ``openaff study`` itself (one study folder per scenario, the depths added one at a time)
for 2 epochs of ``--steps`` steps and ``--val-steps`` validation batches; the second epoch is the one timed
(the first pays for cuDNN's autotuning and the caches). A cell's projected cost per run is

    epochs x (train_images / img_per_s + val_images x eval_s_per_image) + 2 x test_images x eval_s_per_image

(the test split scored at the selected and at the final epoch), summed over the grid and multiplied by the
seeds. The data are **synthetic CIFAR-100-format batches made on the spot** (tests/_train_utils.write_cifar:
random 32x32x3 images with a class band, 100 fine / 20 coarse labels), because the device has no CIFAR-100:
the steps are real steps on the real shapes; the accuracies mean nothing.

    OUT=/tmp/pilot bash benchmarks/gpu_study_pilot.sh          # on one GPU, under 5 minutes
    python benchmarks/gpu_study_pilot.py --device cpu --steps 2 --val-steps 1 --batch 8 --width-mult 0.125 \\
        --scenarios short-skip --fusions add,aff --depths 1 --out /tmp/pilot   # the CPU smoke test

When the time budget (``--budget``) runs out, the depths not reached are extrapolated from the measured ones
(linear in b per scenario and fusion type) and marked so. Writes ``OUT/gpu-study-pilot.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE4 = "add,concat,ms_gau,ms_se,ms_sa,aff,iaff"


def _rows(folder: Path) -> list[dict]:
    with (folder / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def project(img_per_s: float, epoch_s: float, train_timed: int, val_timed: int, epochs: int, train_images: int,
            val_images: int, test_images: int) -> dict:
    """A run's projected seconds from its timed epoch (``train_timed`` images trained, ``val_timed`` scored).

    Args:
        img_per_s: training images per second of the timed epoch.
        epoch_s: the timed epoch's seconds (training and validation).
        train_timed: training images of the timed epoch.
        val_timed: validation images of the timed epoch.
        epochs: epochs of the full run.
        train_images: training images of an epoch of the full run.
        val_images: validation images scored after every epoch.
        test_images: test images, scored twice (selected and final epoch).
    """
    train_s = train_timed / img_per_s
    eval_per_image = max(epoch_s - train_s, 0.0) / val_timed
    epoch = train_images / img_per_s + val_images * eval_per_image
    return dict(img_per_s=img_per_s, eval_s_per_image=eval_per_image, epoch_s=epoch,
                run_s=epochs * epoch + 2 * test_images * eval_per_image)


def _extrapolate(measured: dict[int, float], b: int) -> float:
    """Seconds at depth ``b`` from those measured at other depths: the line through them (through 0 if one)."""
    bs = sorted(measured)
    if len(bs) == 1:
        return measured[bs[0]] * b / bs[0]
    (b0, b1) = (bs[0], bs[-1])
    slope = (measured[b1] - measured[b0]) / (b1 - b0)
    return measured[b1] + slope * (b - b1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="where the JSON and the table go")
    p.add_argument("--work", default=None, help="where the data and the study folders go (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--scenarios", default="short-skip,same-layer")
    p.add_argument("--fusions", default=TABLE4)
    p.add_argument("--depths", default="1,2,3,4")
    p.add_argument("--steps", type=int, default=30, help="training steps of each timed epoch")
    p.add_argument("--val-steps", type=int, default=10, help="validation batches of each timed epoch")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's, 128)")
    p.add_argument("--width-mult", type=float, default=None, help="model width (default: the recipe's, full)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the timing; later depths are "
                   "extrapolated")
    p.add_argument("--epochs", type=int, default=400, help="epochs of a full run (the paper's 400)")
    p.add_argument("--seeds", default="3,5", help="seeds per cell the totals are given for")
    p.add_argument("--train-images", type=int, default=45_000, help="training images of a full epoch (CIFAR-100's "
                   "50,000 less a 5,000 validation split)")
    p.add_argument("--val-images", type=int, default=5_000, help="validation images scored after every epoch")
    p.add_argument("--test-images", type=int, default=10_000, help="test images, scored at two epochs")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    sys.path.insert(0, str(ROOT / "tests"))  # the CIFAR-format writer of the tests (not part of the package)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="gpu-study-pilot-") as tmp:
        return _pilot(args, out, Path(args.work) if args.work else Path(tmp), t_start)


def _pilot(args: argparse.Namespace, out: Path, work: Path, t_start: float) -> int:
    import torch
    from _train_utils import write_cifar

    from openaff.study import run_study
    from openaff.training.config import make_config, to_yaml

    base = make_config("study-gpu")
    batch = args.batch or base.batch_size
    limit_train, limit_val = args.steps * batch, args.val_steps * batch
    data_dir = work / "cifar-100-python"
    if not (data_dir / "train").is_file():
        # room for a validation split carved from the training side (5,000) and for the timed images
        write_cifar(data_dir, "cifar100", n_train=limit_train + 5_000, n_test=max(limit_val, 1_000))
    # study-gpu as it is, except: this device, the batch, and mixup on in both timed epochs (a full run has it
    # on in 380 of 400 epochs; the recipe switches it off for the last 20).
    recipe = work / "study-gpu-pilot.yaml"
    cfg = make_config("study-gpu", device=args.device, batch_size=batch, mixup_off_epochs=0)
    recipe.write_text(to_yaml(cfg))
    scenarios = args.scenarios.split(",")
    depths = [int(b) for b in args.depths.split(",")]
    fusions = args.fusions.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]

    groups = [(s, b) for b in depths for s in scenarios]  # depth-major: a short budget still sees every scenario
    timed: dict[tuple[str, int], float] = {}
    cells: list[dict] = []
    for scenario, b in groups:
        spent = time.perf_counter() - t_start
        same = [t * b / b0 for (s0, b0), t in timed.items() if s0 == scenario]
        guess = max(same) if same else 0.0
        if same and spent + guess > args.budget:  # the smallest depth of a scenario is always timed
            print(f"pilot: {scenario} b = {b} not timed ({spent:.0f} s spent of {args.budget:.0f}; it would take "
                  f"about {guess:.0f} s): extrapolated", flush=True)
            continue
        t0 = time.perf_counter()
        result = run_study(work / "studies" / scenario, scenario=scenario, fusions=fusions, depths=[b], seeds=1,
                           data=f"cifar100:{data_dir}", recipe=str(recipe), epochs=2, limit_train=limit_train,
                           limit_val=limit_val, width_mult=args.width_mult, progress=False)
        timed[scenario, b] = time.perf_counter() - t0
        print(f"pilot: {scenario} b = {b}: {len(fusions)} cells in {timed[scenario, b]:.1f} s", flush=True)
        for r in result.runs:
            if r.depth != b:
                continue
            last = _rows(Path(r.folder))[-1]
            cell = dict(scenario=scenario, fusion=r.fusion, depth=b, params=r.params, gmacs=r.gmacs,
                        extrapolated=False, step_ms=1000 * batch / float(last["img_per_s"]),
                        timed_epoch_s=float(last["seconds"]))
            cell.update(project(float(last["img_per_s"]), float(last["seconds"]), limit_train, limit_val,
                                args.epochs, args.train_images, args.val_images, args.test_images))
            cells.append(cell)
    for scenario in scenarios:
        for fusion in fusions:
            measured = {c["depth"]: c["run_s"] for c in cells if (c["scenario"], c["fusion"]) == (scenario, fusion)}
            for b in depths:
                if b not in measured and measured:
                    cells.append(dict(scenario=scenario, fusion=fusion, depth=b, extrapolated=True,
                                      run_s=_extrapolate(measured, b)))
    missing = [(s, f, b) for s in scenarios for f in fusions for b in depths
               if not any((c["scenario"], c["fusion"], c["depth"]) == (s, f, b) for c in cells)]
    cells.sort(key=lambda c: (scenarios.index(c["scenario"]), fusions.index(c["fusion"]), c["depth"]))
    per_seed = sum(c["run_s"] for c in cells) / 3600
    totals = {str(n): n * per_seed for n in seeds}
    by_scenario = {s: sum(c["run_s"] for c in cells if c["scenario"] == s) / 3600 for s in scenarios}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or platform.machine()
    doc = dict(what="gpu study pilot: study-gpu grid timed, full grid projected", date=datetime.now(UTC).isoformat(),
               device=device, torch=torch.__version__, python=platform.python_version(),
               data="synthetic CIFAR-100-format batches (random 32x32x3 images, 20 coarse labels): timings only",
               command=" ".join(sys.argv), settings=dict(vars(args), batch=batch, limit_train=limit_train,
                                                         limit_val=limit_val, recipe="study-gpu"),
               cells=cells, missing=[list(m) for m in missing], gpu_hours_per_seed=per_seed,
               gpu_hours_by_scenario_per_seed=by_scenario, gpu_hours=totals,
               pilot_seconds=time.perf_counter() - t_start)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-study-pilot.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# GPU study pilot on {device}", "",
             f"`{doc['command']}`; {doc['data']}. Timed: epoch 2 of 2, {args.steps} steps of batch {batch} and "
             f"{args.val_steps} validation batches. Projected: {args.epochs} epochs of {args.train_images:,} "
             f"training and {args.val_images:,} validation images, {args.test_images:,} test images twice.", "",
             "| scenario | fusion | b | params | ms/step | s/epoch | h/run |", "|---|---|---:|---:|---:|---:|---:|"]
    for c in cells:
        if c["extrapolated"]:
            lines.append(f"| {c['scenario']} | {c['fusion']} | {c['depth']} | — | — | — | "
                         f"{c['run_s'] / 3600:.2f} (extrapolated) |")
        else:
            lines.append(f"| {c['scenario']} | {c['fusion']} | {c['depth']} | {c['params']:,} | {c['step_ms']:.1f} | "
                         f"{c['epoch_s']:.1f} | {c['run_s'] / 3600:.2f} |")
    unit = "GPU" if args.device == "cuda" else "CPU"
    lines += ["", f"{unit}-hours of the full grid: {per_seed:.1f} per seed ("
              + ", ".join(f"{s} {h:.1f}" for s, h in by_scenario.items()) + "); "
              + ", ".join(f"**{h:.1f} with {n} seeds**" for n, h in totals.items())
              + f". Pilot wall time {doc['pilot_seconds']:.0f} s."]
    if missing:
        lines.append(f"Not timed and not extrapolated (no depth of theirs measured): {missing}")
    (out / "gpu-study-pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
