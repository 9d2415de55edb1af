"""The channels_last BatchNorm of ``openaff.layers.channels_last_norm`` alone, against PyTorch's two ways.

Training-mode forward + backward of the BatchNorms that ``aff_cifar_resnet8`` (width 0.25, batch 128,
1x48x48, bf16 autocast, channels_last: the ``train-small`` case of ``special_paths.py``) sends down that
path, found by running one step: ours, ``F.batch_norm`` on the channels_last tensor (PyTorch's kernel),
and a round trip through NCHW (``.contiguous()``, ``F.batch_norm``, back to channels_last).

    python benchmarks/cpu_batchnorm_cl.py               # a few seconds on the 2-core VM

Writes ``OUT/cpu-batchnorm-cl.json`` and ``.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import run_meta, write_report  # noqa: E402


def _ways(ours, mean, var, weight, bias) -> dict:  # noqa: ANN001  (tensors)
    import torch
    import torch.nn.functional as F

    return {
        "ours": lambda x: ours(x, mean, var, weight, bias, 0.1, 1e-5),
        "F.batch_norm": lambda x: F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5),
        "via NCHW": lambda x: F.batch_norm(x.contiguous(), mean, var, weight, bias, True, 0.1, 1e-5)
        .contiguous(memory_format=torch.channels_last),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)

    import special_paths
    import torch

    from openaff.cpu_memory import retain_freed_memory
    from openaff.layers import mscam
    from openaff.layers.channels_last_norm import channels_last_batch_norm

    retain_freed_memory()
    torch.set_num_threads(args.threads)
    _, step, _ = special_paths.build_case(special_paths.CASES["train-small"])
    shapes: list[tuple[tuple[int, ...], torch.dtype]] = []
    original = mscam.channels_last_batch_norm

    def spy(x, *rest):
        shapes.append((tuple(x.shape), x.dtype))
        return original(x, *rest)

    with mock.patch.object(mscam, "channels_last_batch_norm", spy):
        step()
    rows = []
    for shape, dtype in shapes:
        c = shape[1]
        weight, bias = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
        mean, var = torch.zeros(c), torch.ones(c)
        ways = _ways(channels_last_batch_norm, mean, var, weight, bias)
        x0 = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        grad = torch.ones_like(x0)
        ms = {}
        for name, fn in ways.items():
            times = []
            for _ in range(args.repeats):
                x = x0.detach().requires_grad_()
                t0 = time.perf_counter()
                fn(x).backward(grad)
                times.append(time.perf_counter() - t0)
            ms[name] = statistics.median(times[args.repeats // 6:]) * 1e3
        rows.append({"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                     **{f"{k}_ms": round(v, 2) for k, v in ms.items()}})
    meta = run_meta("cpu_batchnorm_cl.py", argv, args.threads, repeats=args.repeats)
    lines = [f"**channels_last BatchNorm, training forward + backward** ({meta['machine']}, torch {meta['torch']}, "
             f"{meta['date']}, commit {meta.get('commit', '?')}; median of the last "
             f"{args.repeats - args.repeats // 6} of {args.repeats} calls)", "",
             f"`{meta['command']}`", "", "| shape | dtype | ours ms | F.batch_norm ms | via NCHW ms |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['ours_ms']} | {r['F.batch_norm_ms']} | "
              f"{r['via NCHW_ms']} |" for r in rows]
    write_report(args.out, "cpu-batchnorm-cl", meta, rows, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
