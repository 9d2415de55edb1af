"""What each special path of ``openaff.layers`` buys today, on its target case, like for like.

Each path is switched off by patching the one function that takes it (the code then runs what it would
run without the path, the plain PyTorch ops), and the *same model object*, with the same weights and
input, is timed with the path on and off in alternating rounds of one process. So the models, their
memory placement and the machine's speed are common to both sides, and only the code path differs.
Reported per path: median step time on and off, the median over rounds of the within-round ratio
off/on (``> 1``: the path saves time), and for training cases the bytes autograd saves for the
backward pass (``saved MiB``, any device's activation memory).

    python benchmarks/special_paths.py                       # all CPU cases, about 6 minutes on the 2-core VM
    python benchmarks/special_paths.py --cases eval-nchw --rounds 4 --out /tmp/sp

Cases (one child process each, 2 threads, freed memory retained as ``openaff bench`` does):

* ``eval-nchw`` / ``eval-cl``: ``aff_resnet50`` inference, batch 8, 3x224x224, fp32, NCHW / channels_last
  (the CPU target of issue 15).
* ``eval-nchw-fusions`` / ``eval-cl-fusions``: the same, but only the model's fusion modules, each run on the
  inputs it meets in the model (where the eval paths act, without the convolutions' time and noise around them).
* ``train-small``: ``aff_cifar_resnet8`` (width 0.25) training step, SGD, batch 128, 1x48x48, bf16
  autocast, channels_last (what the study, segmentation and CAM work train here, in its fastest setting).
* ``train-r50``: ``aff_resnet50`` training step, SGD, batch 8, 3x160x160, fp32, channels_last.

Two paths measured here at commit 2f888db bought under 3 % where they act and were removed (issue 22): the
batched-product 1x1 convolutions of NCHW evaluation and the direct branch folding in ``MSCAM.logits``; their rows
are in ``results/special-paths.md``.

The CUDA paths (compiled blend kernels, recompute's time on a GPU) are measured by
``benchmarks/gpu_check.sh`` (steps ``kernels``, ``compiled-recompute``). Writes ``OUT/special-paths.json``
and ``.md`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import run_meta, write_report  # noqa: E402

EVAL = ("eval-nchw", "eval-cl", "eval-nchw-fusions", "eval-cl-fusions")

# Path name -> (where it lives, what it does, the cases it is measured on).
PATHS = {
    "fused blend": ("fused_ops.attention_blend", "AFF/iAFF blend `scale·lerp(y, x, sigmoid(L+G))` as one "
                    "autograd Function saving only its inputs, vs `2·x·w + 2·y·(1−w)` written out",
                    (*EVAL, "train-small", "train-r50")),
    "in-place eval blend": ("fused_ops.attention_blend(inplace=True)", "without autograd the blend is written "
                            "into the local logits' buffer, vs a fresh buffer", EVAL),
    "on-the-fly BN folding": ("mscam._branch_eval", "in eval without autograd each MS-CAM branch folds its BNs "
                              "into its 1x1 convs (global branch as `F.linear` on B x C), vs the modules as they are",
                              EVAL),
    "channels_last BN (< 16 ch)": ("channels_last_norm.channels_last_batch_norm", "CPU training BN of a channels_last "
                                   "tensor with few channels as a (B·H) x (W·C) matrix, vs `F.batch_norm`",
                                   ("train-small",)),
    "widened broadcast operand": ("fused_ops.broadcast_operand", "CPU channels_last, few channels, 2-byte dtype: the "
                                  "B x C x 1 x 1 logits widened over W, vs broadcast as they are", ("train-small",)),
    "channels_last pooling gradient": ("mscam._ChannelsLastGlobalMean", "training: the global pooling's gradient "
                                       "kept channels_last, vs `F.adaptive_avg_pool2d`'s NCHW gradient",
                                       ("train-small", "train-r50")),
    "recompute (opt-in)": ("fusion._AttentionFusion._recomputed", "training: each fusion keeps its two inputs and runs "
                           "its MS-CAM again in backward (off by default; on, vs the default)",
                           ("train-small", "train-r50")),
}

OPT_IN = "recompute (opt-in)"

CASES = {
    "eval-nchw": dict(model="aff_resnet50", train=False, channels_last=False, batch=8, size=224, chans=3, amp=False),
    "eval-cl": dict(model="aff_resnet50", train=False, channels_last=True, batch=8, size=224, chans=3, amp=False),
    # The same, but only the model's fusion modules, each on the inputs it meets in the model: where the eval paths
    # act, so their share of the fusions' own time is measured without the convolutions' noise around it.
    "eval-nchw-fusions": dict(model="aff_resnet50", train=False, channels_last=False, batch=8, size=224, chans=3,
                              amp=False, fusions_only=True),
    "eval-cl-fusions": dict(model="aff_resnet50", train=False, channels_last=True, batch=8, size=224, chans=3,
                            amp=False, fusions_only=True),
    "train-small": dict(model="aff_cifar_resnet8", train=True, channels_last=True, batch=128, size=48, chans=1,
                        amp=True, extra={"width_mult": 0.25, "num_classes": 10}),
    "train-r50": dict(model="aff_resnet50", train=True, channels_last=True, batch=8, size=160, chans=3, amp=False),
}


def _formula_blend(x, y, local, glob, scale: float = 1.0, *, inplace: bool = False):
    """The blend written out term by term: what a straightforward AFF/iAFF computes."""
    import torch

    w = torch.sigmoid(local + glob)
    return scale * x * w + scale * y * (1 - w)


@contextlib.contextmanager
def path_off(name: str, model):
    """Run ``model`` without the special path ``name`` (patched for the duration of the block)."""
    from unittest import mock

    import torch.nn.functional as F

    from openaff.layers import fused_ops, fusion, mscam, set_fusion_recompute

    with contextlib.ExitStack() as stack:
        if name == "fused blend":
            stack.enter_context(mock.patch.object(fusion, "attention_blend", _formula_blend))
        elif name == "in-place eval blend":
            blend = fused_ops.attention_blend
            stack.enter_context(mock.patch.object(
                fusion, "attention_blend", lambda *a, inplace=False, **k: blend(*a, inplace=False, **k)))
        elif name == "on-the-fly BN folding":
            stack.enter_context(mock.patch.object(mscam, "_branch_eval", lambda branch, x: None))
        elif name == "channels_last BN (< 16 ch)":
            stack.enter_context(mock.patch.object(mscam, "use_channels_last_batch_norm", lambda x: False))
        elif name == "widened broadcast operand":
            stack.enter_context(mock.patch.object(fused_ops, "broadcast_operand", lambda t, like: t))
        elif name == "channels_last pooling gradient":
            stack.enter_context(mock.patch.object(
                mscam._ChannelsLastGlobalMean, "apply", staticmethod(lambda x: F.adaptive_avg_pool2d(x, 1))))
        elif name == OPT_IN:
            # Opt-in: the library's default runs without it, so this variant switches it *on*.
            set_fusion_recompute(True, model)
            stack.callback(set_fusion_recompute, False, model)
        else:
            raise KeyError(name)
        yield


# Path name -> (object in openaff.layers, attribute) whose calls show the path, and which variant calls it: "with"
# (the default runs it, path_off does not) or "variant" (only path_off's variant does: the opt-in recompute).
_TAKEN = {
    "fused blend": ("fusion", "attention_blend", "with"),
    "in-place eval blend": ("fusion", "attention_blend", "with"),
    "on-the-fly BN folding": ("mscam", "_branch_eval", "with"),
    "channels_last BN (< 16 ch)": ("mscam", "channels_last_batch_norm", "with"),
    "widened broadcast operand": ("fused_ops", "broadcast_operand", "with"),
    "channels_last pooling gradient": ("mscam._ChannelsLastGlobalMean", "apply", "with"),
    OPT_IN: ("fusion", "checkpoint", "variant"),
}


def calls(name: str, model, step) -> tuple[int, int]:
    """How often ``step()`` reaches the code of path ``name`` as the library runs it and under :func:`path_off`:
    the check that a row of the table measures the path it names (see ``_TAKEN`` for which side should be 0)."""
    import importlib
    from unittest import mock

    where, attr, _ = _TAKEN[name]
    module, _, cls = where.partition(".")
    target = importlib.import_module(f"openaff.layers.{module}")
    if cls:
        target = getattr(target, cls)
    original = getattr(target, attr)
    counts = []
    for off in (False, True):
        # autospec binds like the function it replaces (a method gets its self); side_effect runs the original.
        with mock.patch.object(target, attr, autospec=True, side_effect=original) as spy:
            with path_off(name, model) if off else contextlib.nullcontext():
                step()
        hits = spy.call_args_list
        if name == "in-place eval blend":
            hits = [c for c in hits if c.kwargs.get("inplace")]
        if attr == "broadcast_operand":  # only a call that widens its operand is the path
            hits = [c for c in hits if original(*c.args).shape != c.args[0].shape]
        counts.append(len(hits))
    return counts[0], counts[1]


def build_case(spec: dict):
    """``(model, step, saved_mib)`` for a case spec (see ``CASES``): the model, one timed step, and the MiB autograd
    saves for the backward pass of one training step."""
    import timm
    import torch
    import torch.nn.functional as F

    import openaff  # noqa: F401  (registers the models)
    from openaff.layers import set_fusion_recompute

    torch.manual_seed(0)
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = timm.create_model(spec["model"], in_chans=spec["chans"], **spec.get("extra", {})).to(memory_format=fmt)
    x = torch.randn(spec["batch"], spec["chans"], spec["size"], spec["size"]).contiguous(memory_format=fmt)
    target = torch.randint(0, model.num_classes, (spec["batch"],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    set_fusion_recompute(False, model)
    model.train(spec["train"])

    fused: list = []  # (fusion module, its inputs in the model) for a fusions_only case
    if spec.get("fusions_only"):
        from openaff.layers.fusion import _AttentionFusion

        hooks = [m.register_forward_pre_hook(lambda m, a: fused.append((m, a))) for m in model.modules()
                 if isinstance(m, _AttentionFusion)]
        with torch.no_grad():
            model(x)
        for h in hooks:  # a hooked module would not fold its branches
            h.remove()

    def step() -> None:
        if not spec["train"]:
            with torch.no_grad():
                if fused:
                    for m, a in fused:
                        m(*a)
                else:
                    model(x)
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["amp"]):
            loss = F.cross_entropy(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def saved_mib() -> float:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["amp"]):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.zero_grad(set_to_none=True)
        return sum(seen.values()) / 2**20

    return model, step, saved_mib


def _measure(case: str, names: list[str], rounds: int, warmup: int, threads: int, tiny: bool = False) -> dict:
    """One case in this process: every variant timed in ``rounds`` round-robin rounds."""
    import torch

    from openaff.cpu_memory import retain_freed_memory

    retain_freed_memory()
    torch.set_num_threads(threads)
    spec = {**CASES[case], **(dict(batch=2, size=32) if tiny else {})}
    model, step, saved_mib = build_case(spec)
    reached = {n: calls(n, model, step) for n in names}
    variants = ["all on", *names]

    def run(variant: str, fn):
        if variant == "all on":
            return fn()
        with path_off(variant, model):
            return fn()

    for v in variants:
        for _ in range(warmup):
            run(v, step)
    saved = {v: run(v, saved_mib) for v in variants} if spec["train"] else {}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            run(v, step)  # settle: the first step after another variant meets the allocator in its state
            t0 = time.perf_counter()
            run(v, step)
            times[v].append(time.perf_counter() - t0)
    return {"times": times, "saved_mib": saved, "calls": reached}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--tiny", action="store_true", help="smoke test: every case at batch 2 and 32 px (not evidence)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one case
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if args.one:
        names = [n for n, (_, _, on) in PATHS.items() if args.one in on]
        print(json.dumps(_measure(args.one, names, args.rounds, args.warmup, args.threads, args.tiny)))
        return 0
    rows = []
    t_start = time.perf_counter()
    for case in cases:
        cmd = [sys.executable, __file__, "--one", case, "--rounds", str(args.rounds), "--warmup", str(args.warmup),
               "--threads", str(args.threads), *(["--tiny"] if args.tiny else [])]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        on, saved, reached = res["times"]["all on"], res["saved_mib"], res["calls"]
        for name, off in res["times"].items():
            if name == "all on":
                continue
            # An opt-in path's variant is the one *with* it; the default ("all on") runs without it.
            with_path, without = (off, on) if name == OPT_IN else (on, off)
            ratios = sorted(b / a for a, b in zip(with_path, without, strict=True))
            ratio = statistics.median(ratios)
            q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio,) * 3
            rows.append({"path": name, "case": case, "with_ms": round(statistics.median(with_path) * 1e3, 1),
                         "without_ms": round(statistics.median(without) * 1e3, 1),
                         "paired_without_over_with": round(ratio, 3),
                         "paired_iqr": [round(q1, 3), round(q3, 3)],
                         "calls_default_and_off": reached[name],
                         "saved_mib_with": saved.get(name if name == OPT_IN else "all on"),
                         "saved_mib_without": saved.get("all on" if name == OPT_IN else name)})
        print(f"{case}: {time.perf_counter() - t0:.0f} s", flush=True)
    meta = run_meta("special_paths.py", argv, args.threads, rounds=args.rounds, tiny=args.tiny,
                    wall_s=round(time.perf_counter() - t_start))
    lines = [("**Smoke test (--tiny: batch 2, 32 px), not evidence.** " if args.tiny else "")
             + f"**Special paths of `openaff.layers`, each on and off in the same process** ({meta['machine']}, "
             f"torch {meta['torch']}, {meta['date']}, commit {meta.get('commit', '?')}; median of {args.rounds} "
             "round-robin rounds; `without/with` is the median over rounds of the within-round time ratio, "
             "above 1 when the path saves time; `calls`: how often one step reached the path's code by default and "
             "without it).", "", f"`{meta['command']}`", "",
             "| path | case | with ms | without ms | without/with (IQR) | saved MiB with | saved MiB without | calls |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sw = "" if r["saved_mib_with"] is None else f"{r['saved_mib_with']:.0f}"
        so = "" if r["saved_mib_without"] is None else f"{r['saved_mib_without']:.0f}"
        lines.append(f"| {r['path']} | {r['case']} | {r['with_ms']} | {r['without_ms']} | "
                     f"{r['paired_without_over_with']:.3f} ({r['paired_iqr'][0]:.3f}–{r['paired_iqr'][1]:.3f}) | "
                     f"{sw} | {so} | {r['calls_default_and_off']} |")
    write_report(args.out, "special-paths", meta, rows, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
