"""Training-step time of the small AFF models in two source trees of open-aff: did a change slow the 2-D path?

Each round runs one ``cpu_train_small.py --one`` process per tree (the order alternating between rounds, so a
slow spell of a shared machine hits both alike), in one setting (autocast, memory format); within a process
the models take turns step by step. Reported per model: the median step time in each tree, their ratio
(after / before), and each tree's ratio to the plain-addition twin measured in the same process (like for
like: the same process, format and autocast).

    python benchmarks/before_after.py --before /tmp/before/src --after src --rounds 3 \\
        --out benchmarks/results/issue21-before-after

Writes ``OUT/before-after.json`` and ``OUT/before-after.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import run_meta, write_report  # noqa: E402
from cpu_train_small import PAIRS  # noqa: E402  (the models and their add twins)


def _one(src: Path, amp: str, channels_last: bool, steps: int, threads: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(HERE / "cpu_train_small.py"), "--one", amp, "1" if channels_last else "0",
           "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd="/").stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the src/ folder of the tree before the change")
    p.add_argument("--after", type=Path, required=True, help="the src/ folder of the tree after it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="bf16", choices=("bf16", "off"))
    p.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--out", type=Path, default=HERE / "results" / "before-after")
    args = p.parse_args(argv)
    trees = {"before": args.before, "after": args.after}
    times: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    twin_ratios: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
    for r in range(args.rounds):
        for tree in (("before", "after") if r % 2 == 0 else ("after", "before")):
            got = _one(trees[tree], args.amp, not args.nchw, args.steps, args.threads)
            med = {n: statistics.median(v) for n, v in got.items()}
            for name, v in got.items():
                times[tree].setdefault(name, []).extend(v)
            for model, twin in PAIRS:
                twin_ratios[tree].setdefault(model, []).append(med[model] / med[twin])
            print(f"round {r + 1} {tree}: " + ", ".join(f"{n} {1000 * m:.0f} ms" for n, m in med.items()), flush=True)
    rows = []
    for name in times["before"]:
        b, a = statistics.median(times["before"][name]) * 1000, statistics.median(times["after"][name]) * 1000
        row = {"model": name, "before_ms": round(b, 1), "after_ms": round(a, 1), "after_over_before": round(a / b, 3)}
        if name in twin_ratios["before"]:
            row["vs_twin_before"] = round(statistics.median(twin_ratios["before"][name]), 3)
            row["vs_twin_after"] = round(statistics.median(twin_ratios["after"][name]), 3)
        rows.append(row)
    layout = "NCHW" if args.nchw else "channels_last"
    meta = run_meta("before_after.py", argv, args.threads, setting=f"{args.amp}, {layout}",
                    rounds=args.rounds, steps=args.steps, before=str(args.before), after=str(args.after))
    lines = [f"**Training step before / after** ({meta['setting']}, batch 128, 1x48x48, width_mult 0.25, "
             f"{args.threads} threads; median over {args.rounds} rounds x {args.steps} steps, the trees alternating). "
             f"{meta['date']}, {meta['machine']}.", "", f"`{meta['command']}`", "",
             "| model | before ms | after ms | after / before | vs add twin, before | vs add twin, after |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['before_ms']} | {r['after_ms']} | {r['after_over_before']} | "
                     f"{r.get('vs_twin_before', '')} | {r.get('vs_twin_after', '')} |")
    write_report(args.out, "before-after", meta, rows, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
