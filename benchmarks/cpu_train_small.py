"""Training-step time of the small attention models against their plain-addition twins on the CPU.

The study, segmentation and CAM work train these models here, so this is the CPU figure that
matters for them. One process per setting (autocast x memory format); within it the models take
turns step by step (paired rounds), so a slow spell of a shared machine hits all of them alike.

    python benchmarks/cpu_train_small.py                  # about 3 minutes on the 2-core VM
    python benchmarks/cpu_train_small.py --steps 20 --out /tmp/x

Writes ``OUT/cpu-train.json`` and ``OUT/cpu-train.md`` (default ``benchmarks/results``): per
setting and model, the median step time and its ratio to the add twin, and per model the ratio
of the fastest settings (the issue's criterion: each model in its own fastest setting).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# (model, its plain-addition twin): the same network with `x + y` in every fusion. `name:fusion` is the
# registered model built with another fusion type.
PAIRS = [
    ("aff_cifar_resnet8", "cifar_resnet8"),
    ("iaff_cifar_resnet8", "cifar_resnet8"),
    ("cifar_resnet8:ms_se", "cifar_resnet8"),
    ("aff_cifar_inception_resnet8", "cifar_inception_resnet8"),
]
SETTINGS = [("bf16", True), ("bf16", False), ("off", True), ("off", False)]


def _measure(models: list[str], amp: str, channels_last: bool, steps: int, warmup: int, threads: int,
             batch: int, size: int, width: float) -> dict[str, list[float]]:
    import timm
    import torch

    import openaff  # noqa: F401  (registers the models)
    from openaff.cpu_memory import retain_freed_memory

    retain_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    runs = {}
    for name in models:
        arch, _, fusion = name.partition(":")
        extra = {"fusion": fusion} if fusion else {}
        m = timm.create_model(arch, in_chans=1, num_classes=10, width_mult=width, **extra).to(memory_format=fmt)
        runs[name] = (m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True))

    def step(m, opt):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for m, opt in runs.values():
        for _ in range(warmup):
            step(m, opt)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(steps):
        for name, (m, opt) in runs.items():
            t0 = time.perf_counter()
            step(m, opt)
            times[name].append(time.perf_counter() - t0)
    return times


def _profile(models: list[str], amp: str, channels_last: bool, steps: int, threads: int, batch: int, size: int,
             width: float, rows: int) -> str:
    """Where a step's time goes: self CPU time per step by op and input shapes (torch.profiler), per model."""
    import timm
    import torch
    from torch.profiler import ProfilerActivity, profile

    import openaff  # noqa: F401
    from openaff.cpu_memory import retain_freed_memory

    retain_freed_memory()
    torch.set_num_threads(threads)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 1, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    out = []
    for name in models:
        arch, _, fusion = name.partition(":")
        m = timm.create_model(arch, in_chans=1, num_classes=10, width_mult=width,
                              **({"fusion": fusion} if fusion else {})).to(memory_format=fmt)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True)

        def step(m=m, opt=opt):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
        events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
        layout = "channels_last" if channels_last else "NCHW"
        out += [f"`{name}` ({amp}, {layout}): {total:.0f} ms of aten ops per step",
                "", "| op | input shapes | ms/step | calls/step |", "|---|---|---:|---:|"]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
            shapes = str(e.input_shapes)[:70].replace("|", "/")
            out.append(f"| {e.key} | {shapes} | {e.self_cpu_time_total / steps / 1e3:.1f} | {e.count / steps:.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=48, help="input side (1 channel, 10 classes)")
    p.add_argument("--width", type=float, default=0.25, help="width_mult of every model")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--profile", metavar="MODEL,TWIN", help="instead of timing: where the step time goes "
                   "(bf16, channels_last; writes OUT/cpu-train-profile.md)")
    p.add_argument("--one", nargs=2, metavar=("AMP", "CL"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    models = list(dict.fromkeys(name for pair in PAIRS for name in pair))
    if args.profile:
        text = _profile(args.profile.split(","), "bf16", True, args.steps, args.threads, args.batch, args.size,
                        args.width, rows=25)
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/cpu_train_small.py " + " ".join(argv if argv is not None else sys.argv[1:])
        (args.out / "cpu-train-profile.md").write_text(f"`{command.strip()}`\n\n{text}\n")
        print(text)
        return 0
    if args.one:
        times = _measure(models, args.one[0], args.one[1] == "1", args.steps, args.warmup, args.threads,
                         args.batch, args.size, args.width)
        print(json.dumps(times))
        return 0
    rows = []
    for amp, cl in SETTINGS:
        cmd = [sys.executable, __file__, "--one", amp, "1" if cl else "0", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--batch", str(args.batch),
               "--size", str(args.size), "--width", str(args.width)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        times = json.loads(out.strip().splitlines()[-1])
        med = {n: statistics.median(t) * 1000 for n, t in times.items()}
        for model, twin in PAIRS:
            rows.append({"model": model, "twin": twin, "amp": amp, "channels_last": cl,
                         "twin_ms": round(med[twin], 1), "model_ms": round(med[model], 1),
                         "ratio": round(med[model] / med[twin], 3)})
        print(f"{amp} channels_last={cl}: " + ", ".join(f"{n} {v:.0f} ms" for n, v in med.items()), flush=True)
    best = []
    for model, twin in PAIRS:
        mine = [r for r in rows if r["model"] == model]
        fm = min(mine, key=lambda r: r["model_ms"])
        ft = min(mine, key=lambda r: r["twin_ms"])
        best.append({"model": model, "twin": twin, "model_ms": fm["model_ms"],
                     "model_setting": f"{fm['amp']}, {'channels_last' if fm['channels_last'] else 'NCHW'}",
                     "twin_ms": ft["twin_ms"],
                     "twin_setting": f"{ft['amp']}, {'channels_last' if ft['channels_last'] else 'NCHW'}",
                     "ratio": round(fm["model_ms"] / ft["twin_ms"], 3)})
    command = "python benchmarks/cpu_train_small.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import torch

    meta = {"command": command.strip(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
            "torch": torch.__version__, "batch": args.batch, "input": f"1x{args.size}x{args.size}",
            "width_mult": args.width, "steps": args.steps}
    lines = [f"**Training step, small models vs their add twins** (SGD, batch {args.batch}, 1x{args.size}x{args.size}, "
             f"10 classes, width_mult {args.width}, {args.threads} threads; median of {args.steps} paired steps "
             f"after {args.warmup} warm-up steps, one process per setting). torch {torch.__version__}, {meta['date']}.",
             "", f"`{meta['command']}`", "",
             "| model | twin | autocast | channels_last | twin ms | model ms | ratio |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | `{r['twin']}` | {r['amp']} | {'yes' if r['channels_last'] else 'no'} | "
                     f"{r['twin_ms']} | {r['model_ms']} | {r['ratio']} |")
    lines += ["", "Each in its fastest setting:", "",
              "| model | fastest setting | ms | twin's fastest setting | ms | ratio |", "|---|---|---:|---|---:|---:|"]
    for b in best:
        lines.append(f"| `{b['model']}` | {b['model_setting']} | {b['model_ms']} | {b['twin_setting']} | "
                     f"{b['twin_ms']} | {b['ratio']} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-train.json").write_text(json.dumps({**meta, "rows": rows, "fastest": best}, indent=1) + "\n")
    (args.out / "cpu-train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
