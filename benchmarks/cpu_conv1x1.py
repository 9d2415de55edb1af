"""The MS-CAM's local branch in evaluation on the CPU: 1x1 convolutions (oneDNN) against batched products.

``Conv1x1(C -> C/r) -> ReLU -> Conv1x1(C/r -> C)`` with BatchNorm folded (what ``openaff.layers.mscam``
runs in evaluation), batch 8, fp32, at the four stage shapes of an ImageNet ResNet-50, in NCHW and
channels_last; median of 30 calls after 5 warm-up calls, in one process. On an NCHW input oneDNN
reorders to its blocked layout around every convolution; the products work on the tensor as it is.

    python benchmarks/cpu_conv1x1.py                 # about 1 minute on the 2-core VM
    python benchmarks/cpu_conv1x1.py --threads 1 --out /tmp/x

Writes ``OUT/cpu-conv1x1.json`` and ``OUT/cpu-conv1x1.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]  # (channels, side) of the four stages


def _median_ms(fn, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=16, help="channel reduction of the bottleneck")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from openaff.layers.mscam import _conv1x1_eval  # what the models run

    rows = []
    for c, side in SHAPES:
        inter = c // args.r
        w1, b1, w2, b2 = torch.randn(inter, c), torch.randn(inter), torch.randn(c, inter), torch.randn(c)
        for fmt in ("nchw", "channels_last"):
            x = torch.randn(args.batch, c, side, side)
            if fmt == "channels_last":
                x = x.to(memory_format=torch.channels_last)

            def conv(x=x, w1=w1, b1=b1, w2=w2, b2=b2):
                return F.conv2d(F.conv2d(x, w1[:, :, None, None], b1).relu_(), w2[:, :, None, None], b2)

            def ours(x=x, w1=w1, b1=b1, w2=w2, b2=b2):
                return _conv1x1_eval(_conv1x1_eval(x, w1, b1).relu_(), w2, b2)

            with torch.no_grad():
                torch.testing.assert_close(ours(), conv(), rtol=1e-4, atol=1e-3)
                rows.append(dict(channels=c, side=side, format=fmt, conv_ms=_median_ms(conv, args.calls, 5),
                                 openaff_ms=_median_ms(ours, args.calls, 5)))
    lines = [f"**MS-CAM local branch in evaluation, CPU** (batch {args.batch}, fp32, r = {args.r}, {args.threads} "
             f"threads; median of {args.calls} calls). torch {torch.__version__}, {platform.machine()}, "
             f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.", "", "`python benchmarks/cpu_conv1x1.py`", "",
             "| C | H = W | format | F.conv2d ms | `_conv1x1_eval` ms | ratio |", "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['channels']} | {r['side']} | {r['format']} | {r['conv_ms']:.2f} | {r['openaff_ms']:.2f} "
                     f"| {r['openaff_ms'] / r['conv_ms']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-conv1x1.md").write_text(text)
    (args.out / "cpu-conv1x1.json").write_text(json.dumps(dict(settings=vars(args) | {"out": str(args.out)},
                                                               torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
