"""Speed and memory of our models against the timm networks a user would pick instead (``openaff bench``).

All models run in one process on the same input: training steps (forward, cross-entropy, backward,
SGD step) or inference, eager or ``torch.compile``, with an AMP dtype and channels_last if asked.
Each model is warmed up (compilation happens there), then timed in ``--repeats`` rounds of
``--iters`` steps; the rounds go round-robin over the models, starting at a different model each
round, so that a slow spell of a shared machine hits all models alike. CUDA steps are timed with
CUDA events, CPU steps with ``perf_counter``. Reported: the median (and min, max) time per step,
images/s, the ratios to ``--baseline`` (same compile setting), CUDA peak memory of one training
or inference step, and, in training, the bytes autograd saves for the backward pass (eager only;
on the CPU that is the useful memory figure).

Model names are timm names (``openaff`` registers its own), ``name:fusion`` for one of ours with another
fusion type (``aff_resnet50:add``, the add-twin: timm's ``resnet50d`` built from our blocks), with
optional suffixes:

* ``+fold``: fold BatchNorm into the convolutions before inference. Our models use
  :func:`openaff.folding.fuse_for_inference`; timm models ``torch.fx.experimental.optimization.fuse``.
* ``+recompute`` / ``+norecompute``: our fusions recompute their MS-CAMs in the backward pass, or not
  (:func:`openaff.layers.set_fusion_recompute`); without a suffix the library default holds.
* ``+naive``: our AFF/iAFF modules compute the formulas term by term, as a straightforward
  implementation would (``w = sigmoid(L + G)``, ``2·x·w + 2·y·(1 − w)``): the "before" of the
  optimisations, same weights and numbers.

Example: ``openaff bench --device cpu --mode infer --batch 8 --threads 2 --models aff_resnet50+fold,resnet50d``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .catalog import list_openaff_models
from .cpu_memory import apply_cpu_alloc, minor_page_faults
from .errors import ConfigError, run_alone, run_command
from .files import check_output_file, write_output_file
from .folding import fuse_for_inference
from .layers import AFF, IAFF, fusion_kernels, fusion_names, fusion_recompute, set_fusion_kernels, set_fusion_recompute
from .machine import cpu_name

__all__ = ["BenchResult", "BenchSettings", "add_parser", "main", "markdown_table", "run_bench"]

# Without --models: our two headline models and the timm networks a user would pick instead; in
# inference also folded variants (ours with fuse_for_inference, the baselines with torch.fx's fuse).
DEFAULT_MODELS = {
    "train": ("aff_resnet50", "iaff_resnext50_32x4d", "resnet50d", "resnext50d_32x4d", "seresnet50", "skresnet50",
              "resnet50"),
    "infer": ("aff_resnet50+fold", "aff_resnet50", "iaff_resnext50_32x4d+fold", "resnet50d", "resnet50d+fold",
              "resnext50d_32x4d", "resnext50d_32x4d+fold", "seresnet50", "skresnet50", "resnet50"),
}
# Without --pair: each ResNeXt of ours is compared with timm's ResNeXt-50-D.
DEFAULT_PAIRS = ("aff_resnext50_32x4d=resnext50d_32x4d", "iaff_resnext50_32x4d=resnext50d_32x4d")
_SUFFIXES = ("fold", "recompute", "norecompute", "naive")


@dataclass
class BenchResult:
    model: str
    compiled: bool
    ms_median: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    images_per_s: float | None = None
    baseline: str | None = None
    time_ratio: float | None = None
    throughput_ratio: float | None = None
    peak_mem_mib: float | None = None
    peak_mem_ratio: float | None = None
    saved_mib: float | None = None
    saved_ratio: float | None = None
    warmup_s: float | None = None
    params: int | None = None
    gmacs: float | None = None
    notes: str = ""
    error: str | None = None
    ms_quiet_median: float | None = None
    quiet_samples: int | None = None
    time_ratio_quiet: float | None = None
    time_ratio_paired: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    samples_others_cpu: list[float] = field(default_factory=list)
    faults_per_step: float | None = None


def _parse_pairs(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        model, sep, base = pair.partition("=")
        if not sep or not model or not base:
            raise ConfigError(f"--pair wants MODEL=BASELINE (timm names), got {pair!r}")
        out[model.strip()] = base.strip()
    return out


def _parse_spec(spec: str) -> tuple[str, set[str]]:
    name, *suffixes = spec.strip().split("+")
    bad = [s for s in suffixes if s not in _SUFFIXES]
    if bad:
        raise ConfigError(f"unknown model suffix {'+'.join(bad)!r} in {spec!r}; known: {', '.join(_SUFFIXES)}")
    return name, set(suffixes)


def _create_kwargs(name: str) -> tuple[str, dict]:
    """``"aff_resnet50:add"`` -> ``("aff_resnet50", {"fusion": "add"})``: one of our models with another fusion
    type (e.g. the add-twin of AFF-ResNet-50, which is timm's resnet50d with our block code)."""
    arch, sep, fusion = name.partition(":")
    if sep and not fusion:
        raise ConfigError(f"{name!r}: give a fusion type after ':', e.g. aff_resnet50:add")
    return arch, ({"fusion": fusion} if sep else {})


def _naive_aff(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    m = self.mscam
    s = x + y
    w = torch.sigmoid(m.local_att(s) + m.global_att(s))
    return 2 * x * w + 2 * y * (1 - w)


def _naive_iaff(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    m1, m2 = self.mscam1, self.mscam2
    s = x + y
    w1 = torch.sigmoid(m1.local_att(s) + m1.global_att(s))
    z = x * w1 + y * (1 - w1)
    w2 = torch.sigmoid(m2.local_att(z) + m2.global_att(z))
    return x * w2 + y * (1 - w2)


def _make_naive(model: nn.Module) -> int:
    """Give every AFF/iAFF module of ``model`` the term-by-term forward; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) in (AFF, IAFF):
            m.forward = types.MethodType(_naive_aff if type(m) is AFF else _naive_iaff, m)
            n += 1
    return n


def _is_ours(model: nn.Module) -> bool:
    return type(model).__module__.startswith("openaff.")


def _gmacs(name: str, input_size: tuple[int, int, int], num_classes: int) -> float | None:
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            arch, kwargs = _create_kwargs(name)
            model = timm.create_model(arch, num_classes=num_classes, in_chans=input_size[0], **kwargs).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, *input_size, device="meta"))
        return counter.get_total_flops() / 2e9
    except Exception:  # FLOPs are informative only; a model the counter cannot run still gets timed
        return None


def _fold(model: nn.Module) -> tuple[nn.Module, str]:
    if _is_ours(model):
        return fuse_for_inference(model), "openaff.folding.fuse_for_inference"
    from torch.fx.experimental.optimization import fuse as fx_fuse

    return fx_fuse(model), "torch.fx.experimental.optimization.fuse"


def _state_bytes(model: nn.Module, opt: torch.optim.Optimizer | None) -> int:
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if opt is not None:
        for state in opt.state.values():
            n += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return n


class _Entry:
    """One model under test: its module, optional optimizer, and a ``step()`` closure."""

    def __init__(self, spec: str, settings: BenchSettings, compiled: bool, device: torch.device,
                 x: torch.Tensor, target: torch.Tensor) -> None:
        import timm

        name, suffixes = _parse_spec(spec)
        self.label = spec
        self.result = BenchResult(model=spec, compiled=compiled)
        notes = []
        arch, kwargs = _create_kwargs(name)
        model = timm.create_model(arch, num_classes=settings.num_classes, in_chans=x.shape[1], **kwargs)
        self.result.params = sum(p.numel() for p in model.parameters())
        self.result.gmacs = _gmacs(name, tuple(x.shape[1:]), settings.num_classes)
        if "naive" in suffixes:
            notes.append(f"straightforward formulas in {_make_naive(model)} fusion modules")
        if "recompute" in suffixes or "norecompute" in suffixes:
            set_fusion_recompute("recompute" in suffixes, model)
        model.to(device)
        if settings.channels_last:
            model.to(memory_format=torch.channels_last)
        train = settings.mode == "train"
        model.train(train)
        if "fold" in suffixes:
            if train:
                raise ConfigError("+fold is for --mode infer (a folded model has no BatchNorm to train)")
            model, how = _fold(model)
            notes.append(f"BN folded ({how})")
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if train else None
        fwd = torch.compile(model, mode=settings.compile_mode) if compiled else model
        amp = _amp_dtype(settings.amp)
        autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext
        scaler = torch.amp.GradScaler(device.type) if (train and amp is torch.float16) else None
        self.result.notes = "; ".join(notes)

        if train:
            opt = self.opt

            def step() -> None:
                with autocast():
                    loss = F.cross_entropy(fwd(x), target)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            def step() -> None:
                with torch.inference_mode(), autocast():
                    fwd(x)

        self.step: Callable[[], None] = step
        self.autocast = autocast
        self.fwd = fwd
        self.x, self.target = x, target

    def saved_bytes(self) -> int:
        """Bytes autograd saves for the backward pass in one training forward (distinct storages)."""
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
            loss = F.cross_entropy(self.model(self.x), self.target)
        loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return sum(seen.values())


def _amp_dtype(name: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _time_steps(entry: _Entry, iters: int, device: torch.device) -> tuple[float, float | None, float | None]:
    """Seconds per step over ``iters`` steps, the share of the machine's CPUs other processes used
    meanwhile, and this process's minor page faults per step (CPU runs).

    On a shared machine a concurrent job can slow a CPU run several-fold (the OpenMP threads wait
    for each other at every op); the second number lets the report single out undisturbed rounds.
    The third shows what the allocator costs (see :mod:`openaff.cpu_memory`).
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        for _ in range(iters):
            entry.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters, None, None
    faults0 = minor_page_faults()
    busy0, own0, t0 = _busy_seconds(), time.process_time(), time.perf_counter()
    for _ in range(iters):
        entry.step()
    wall, own, busy1 = time.perf_counter() - t0, time.process_time() - own0, _busy_seconds()
    faults = (minor_page_faults() - faults0) / iters
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(busy1 - busy0 - own, 0.0) / (wall * (os.cpu_count() or 1))
    return wall / iters, others, faults


def _peak_mem(entry: _Entry, device: torch.device) -> float | None:
    """CUDA memory of one step as if the model were alone: its resident state plus the step's peak."""
    if device.type != "cuda":
        return None
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    entry.step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base + _state_bytes(entry.model, entry.opt)) / 2**20


def _machine(device: torch.device, threads: int) -> dict:
    import timm

    info = dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                platform=platform.platform(), cpu=cpu_name(), cpu_count=os.cpu_count(), threads=threads,
                mkldnn=torch.backends.mkldnn.is_available())
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        with contextlib.suppress(ImportError):
            import triton

            info["triton"] = triton.__version__
    return info


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _check_device(spec: str) -> None:
    if spec == "auto":
        return
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                              "use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"--device {spec}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")


_COMPILE = {"off": (False,), "on": (True,), "both": (False, True)}


@dataclass
class BenchSettings:
    """What ``openaff bench`` measures: its Python API; the command line builds one from its flags.

    Attributes:
        models: model specs (timm names, ``name:fusion``, ``+fold``/``+recompute``/``+norecompute``/``+naive``);
            None: :data:`DEFAULT_MODELS` of the mode (and :data:`DEFAULT_PAIRS` unless ``pairs`` are given).
        baseline: the model the ratios refer to (added if missing).
        pairs: ``MODEL=BASELINE``: another baseline for one model (its name without suffixes).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        batch: images per step.
        img_size: input side.
        in_chans: input channels.
        num_classes: classifier outputs.
        mode: ``train`` (forward, cross-entropy, backward, SGD step) or ``infer``.
        compile: ``off``, ``on`` or ``both`` (eager and ``torch.compile``).
        compile_mode: ``torch.compile`` mode, e.g. ``max-autotune-no-cudagraphs``.
        amp: autocast dtype: ``bf16``, ``fp16`` or ``off``.
        channels_last: channels_last model and input.
        cpu_alloc: CPU runs: ``retain`` keeps freed memory in the process (:mod:`openaff.cpu_memory`), ``system``
            leaves malloc as it is.
        threads: ``torch.set_num_threads`` (0: leave as is).
        fusion_kernels: blend kernels of our fusions in eager models (``eager``, ``compiled``; None: the default).
        warmup: untimed steps per model (compilation happens here).
        repeats: timed rounds; the median is reported.
        iters: steps per timed round.
        settle: untimed steps of a model before each of its timed rounds (None: 1 on the CPU, 0 on GPUs).
        seed: seed of the input batch and the models' initialisation.
        time_limit: seconds: past this, build no more models and start no more rounds (None: no limit).
        quiet_cpu: CPU runs: a round counts as undisturbed when other processes used at most this share of the
            machine's CPUs meanwhile.
    """

    models: Sequence[str] | None = None
    baseline: str = "resnet50d"
    pairs: Sequence[str] | None = None
    device: str = "auto"
    batch: int = 8
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    mode: str = "infer"
    compile: str = "off"
    compile_mode: str | None = None
    amp: str = "off"
    channels_last: bool = False
    cpu_alloc: str = "retain"
    threads: int = 0
    fusion_kernels: str | None = None
    warmup: int = 3
    repeats: int = 10
    iters: int = 2
    settle: int | None = None
    seed: int = 0
    time_limit: float | None = None
    quiet_cpu: float = 0.05

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        """The settings of parsed ``openaff bench`` flags (``--models`` is comma-separated, ``--pair`` repeated)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in ("models", "pairs")}
        models = None if args.models is None else tuple(s.strip() for s in args.models.split(",") if s.strip())
        return cls(models=models, pairs=None if args.pair is None else tuple(args.pair), **values)

    def resolved(self) -> BenchSettings:
        """These settings with the default models (and their pairs) filled in."""
        if self.models is not None:
            return replace(self, models=tuple(self.models), pairs=None if self.pairs is None else tuple(self.pairs))
        return replace(self, models=DEFAULT_MODELS[self.mode],
                       pairs=tuple(DEFAULT_PAIRS if self.pairs is None else self.pairs))

    def check(self) -> None:
        """Refuse bad settings before any model is built (:class:`ConfigError`, one line).

        Counts, ranges, choices, the device, the pairs and every model name with its suffixes; a model that
        fails while it runs (out of memory, a compiler error) is reported in the results instead.
        """
        import timm  # our models are registered: importing openaff.bench ran openaff/__init__.py

        minimum = {"--batch": (self.batch, 1), "--repeats": (self.repeats, 1), "--iters": (self.iters, 1),
                   "--warmup": (self.warmup, 0), "--img-size": (self.img_size, 1), "--in-chans": (self.in_chans, 1),
                   "--num-classes": (self.num_classes, 1), "--threads": (self.threads, 0)}
        if self.settle is not None:
            minimum["--settle"] = (self.settle, 0)
        for flag, (value, low) in minimum.items():
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}" + (" (0: leave as is)" if flag == "--threads"
                                                                               else ""))
        for flag, value, allowed in (("--mode", self.mode, ("train", "infer")), ("--compile", self.compile, _COMPILE),
                                     ("--amp", self.amp, ("bf16", "fp16", "off")),
                                     ("--cpu-alloc", self.cpu_alloc, ("retain", "system")),
                                     ("--fusion-kernels", self.fusion_kernels, (None, "eager", "compiled"))):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(str(v) for v in allowed if v)}, got {value!r}")
        if self.time_limit is not None and not (math.isfinite(self.time_limit) and self.time_limit > 0):
            raise ConfigError(f"--time-limit must be > 0 seconds, got {self.time_limit}")
        if not 0 <= self.quiet_cpu <= 1:
            raise ConfigError(f"--quiet-cpu must be a share of the CPUs in [0, 1], got {self.quiet_cpu}")
        _check_device(self.device)
        pairs = _parse_pairs(self.pairs)
        specs = [s.strip() for s in self.models or () if s.strip()]
        for spec in [*specs, self.baseline, *pairs, *pairs.values()]:
            name, suffixes = _parse_spec(spec)
            arch, kwargs = _create_kwargs(name)
            if not timm.is_model(arch):
                raise ConfigError(f"unknown model {arch!r} (see openaff models or timm.list_models())")
            if kwargs:
                if arch not in list_openaff_models():
                    raise ConfigError(f"{name!r}: ':fusion' is for openaff's models, not {arch!r}")
                if kwargs["fusion"] not in fusion_names():
                    known = ", ".join(fusion_names())
                    raise ConfigError(f"{name!r}: unknown fusion type {kwargs['fusion']!r}; known: {known}")
            if "fold" in suffixes and self.mode == "train":
                raise ConfigError(f"{spec}: +fold is for --mode infer (a folded model has no BatchNorm to train)")

    def command_line(self, json_path: Path | None = None) -> str:
        """One ``openaff bench`` command that reproduces the run (with ``--json json_path`` when given)."""
        s = self.resolved()
        parts = ["openaff", "bench", "--models", ",".join(m.strip() for m in s.models if m.strip()),
                 "--baseline", s.baseline, *[a for p in (s.pairs or []) for a in ("--pair", p)],
                 "--device", s.device, "--batch", str(s.batch),
                 "--img-size", str(s.img_size), "--mode", s.mode, "--amp", s.amp,
                 "--compile", s.compile]
        if s.compile_mode:
            parts += ["--compile-mode", s.compile_mode]
        parts.append("--channels-last" if s.channels_last else "--no-channels-last")
        if s.threads:
            parts += ["--threads", str(s.threads)]
        if s.cpu_alloc != "retain":
            parts += ["--cpu-alloc", s.cpu_alloc]
        if s.fusion_kernels:
            parts += ["--fusion-kernels", s.fusion_kernels]
        if s.in_chans != 3 or s.num_classes != 1000:
            parts += ["--in-chans", str(s.in_chans), "--num-classes", str(s.num_classes)]
        parts += ["--warmup", str(s.warmup), "--repeats", str(s.repeats), "--iters", str(s.iters)]
        if s.settle is not None:
            parts += ["--settle", str(s.settle)]
        if s.quiet_cpu != 0.05:
            parts += ["--quiet-cpu", str(s.quiet_cpu)]
        if s.time_limit:
            parts += ["--time-limit", str(s.time_limit)]
        if json_path:
            parts += ["--json", str(json_path)]
        return " ".join(shlex.quote(p) for p in parts)


def run_bench(settings: BenchSettings | None = None, /, *, command: str | None = None, **changes: Any) -> dict:
    """Run a benchmark; the Python API of ``openaff bench``. Returns the JSON document it writes.

    Args:
        settings: what to measure (default: :class:`BenchSettings`'s defaults).
        command: the command line recorded in ``meta`` (default: :meth:`BenchSettings.command_line`).
        **changes: fields of :class:`BenchSettings` that override ``settings``'s, e.g. ``models=["aff_resnet50"]``.

    Raises:
        ConfigError: a bad setting (see :meth:`BenchSettings.check`), before any work.
    """
    try:
        settings = replace(settings or BenchSettings(), **changes).resolved()
    except TypeError as err:
        raise ConfigError(f"run_bench: {err}") from None
    settings.check()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(settings.device if settings.device != "auto" else auto)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # Before any model exists: what the allocator does to a CPU step is part of the setup, recorded in meta.
    cpu_alloc = apply_cpu_alloc(settings.cpu_alloc, device.type)
    if settings.fusion_kernels:
        set_fusion_kernels(settings.fusion_kernels)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(settings.seed)
    specs = [s.strip() for s in settings.models if s.strip()]
    for base in [settings.baseline, *_parse_pairs(settings.pairs).values()]:
        if base not in specs:
            specs.append(base)
        # Like for like: a folded model is compared with the folded baseline, so that one is measured too.
        if any("fold" in _parse_spec(s)[1] for s in specs) and "fold" not in _parse_spec(base)[1] \
                and f"{base}+fold" not in specs:
            specs.append(f"{base}+fold")
    compile_flags = _COMPILE[settings.compile]

    size = settings.img_size
    x = torch.randn(settings.batch, settings.in_chans, size, size, device=device)
    if settings.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, settings.num_classes, (settings.batch,), device=device)

    entries: list[_Entry] = []
    failed: list[BenchResult] = []
    load_before = _loadavg()
    # --time-limit: stop building models / starting rounds once it has passed, and report what was
    # measured (a time-out from outside would lose the whole run).
    deadline = time.perf_counter() + settings.time_limit if settings.time_limit else math.inf
    for compiled in compile_flags:
        for spec in specs:
            if time.perf_counter() > deadline:
                failed.append(BenchResult(model=spec, compiled=compiled, error="not run: --time-limit reached"))
                continue
            try:
                entry = _Entry(spec, settings, compiled, device, x, target)
                t0 = time.perf_counter()
                for _ in range(settings.warmup):
                    entry.step()
                _sync(device)
                entry.result.warmup_s = round(time.perf_counter() - t0, 2)
                entry.result.peak_mem_mib = _peak_mem(entry, device)
                if settings.mode == "train" and not compiled:
                    entry.result.saved_mib = entry.saved_bytes() / 2**20
                entries.append(entry)
            except Exception as e:  # one model failing must not lose the others' numbers
                res = BenchResult(model=spec, compiled=compiled, error=f"{type(e).__name__}: {e}")
                print(f"openaff bench: {spec} (compiled={compiled}) failed:\n{traceback.format_exc()}",
                      file=sys.stderr)
                failed.append(res)
            gc.collect()

    samples: dict[int, list[tuple[float, float | None, float | None]]] = {i: [] for i in range(len(entries))}
    # A model's first step after another model's meets the allocator in the other's state (on the CPU
    # a fresh large tensor page-faults); an untimed step first measures the model as a user runs it.
    settle = settings.settle if settings.settle is not None else (1 if device.type == "cpu" else 0)
    rounds = 0
    for r in range(settings.repeats):
        if r > 0 and time.perf_counter() > deadline:
            print(f"openaff bench: --time-limit reached after {r} of {settings.repeats} rounds", file=sys.stderr)
            break
        rounds += 1
        order = list(range(len(entries)))
        order = order[r % max(len(order), 1):] + order[:r % max(len(order), 1)]
        for i in order:
            try:
                for _ in range(settle):
                    entries[i].step()
                samples[i].append(_time_steps(entries[i], settings.iters, device))
            except Exception as e:
                entries[i].result.error = f"{type(e).__name__}: {e}"
    load_after = _loadavg()

    results = []
    for i, entry in enumerate(entries):
        res = entry.result
        s = [t for t, _, _ in samples[i]]
        if s and res.error is None:
            res.samples_ms = [round(v * 1e3, 3) for v in s]
            res.samples_others_cpu = [None if o is None else round(o, 3) for _, o, _ in samples[i]]
            faults = [f for _, _, f in samples[i] if f is not None]
            res.faults_per_step = statistics.median(faults) if faults else None
            res.ms_median = statistics.median(s) * 1e3
            res.ms_min, res.ms_max = min(s) * 1e3, max(s) * 1e3
            res.images_per_s = settings.batch / (res.ms_median / 1e3)
            quiet = [t for t, o, _ in samples[i] if o is not None and o <= settings.quiet_cpu]
            if device.type == "cpu" and samples[i][0][1] is not None:
                res.quiet_samples = len(quiet)
                res.ms_quiet_median = statistics.median(quiet) * 1e3 if quiet else None
        results.append(res)
    results += failed
    pairs = _parse_pairs(settings.pairs)
    for res in results:
        name, suffixes = _parse_spec(res.model)
        base_name = pairs.get(name, settings.baseline) if res.error is None else settings.baseline
        if "fold" in suffixes and "fold" not in _parse_spec(base_name)[1]:
            base_name = f"{base_name}+fold"  # like for like: folded against folded
        base = next((b for b in results if b.model == base_name and b.compiled == res.compiled
                     and b.error is None), None)
        if base is None or res.error is not None:
            continue
        res.baseline = base_name
        res.time_ratio = _ratio(res.ms_median, base.ms_median)
        res.time_ratio_quiet = _ratio(res.ms_quiet_median, base.ms_quiet_median)
        # Rounds run the models back to back, so a round's ratio sees one state of the machine:
        # the median of per-round ratios is robust to slow drifts that move all models together.
        pairs_r = [a / b for a, b in zip(res.samples_ms, base.samples_ms, strict=False) if b]
        res.time_ratio_paired = statistics.median(pairs_r) if pairs_r else None
        res.throughput_ratio = _ratio(base.ms_median, res.ms_median)
        res.peak_mem_ratio = _ratio(res.peak_mem_mib, base.peak_mem_mib)
        res.saved_ratio = _ratio(res.saved_mib, base.saved_mib)

    meta = dict(
        command=command or settings.command_line(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=str(device),
        machine=_machine(device, torch.get_num_threads()),
        mode=settings.mode, batch=settings.batch, input_size=[settings.in_chans, size, size], amp=settings.amp,
        channels_last=settings.channels_last, cpu_alloc=cpu_alloc,
        compile=settings.compile, compile_mode=settings.compile_mode,
        warmup=settings.warmup, repeats=settings.repeats, repeats_done=rounds, iters=settings.iters, settle=settle,
        baseline=settings.baseline,
        quiet_cpu=settings.quiet_cpu,
        fusion_recompute_default=fusion_recompute(), fusion_kernels=fusion_kernels(),
        loadavg_before=load_before, loadavg_after=load_after,
    )
    doc = dict(meta=meta, results=[asdict(r) for r in results])
    doc["markdown"] = markdown_table(doc)
    return doc


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


_ALLOC_WORDS = {"retain": "freed memory kept in the process (openaff.cpu_memory)",
                "system": "malloc as the system sets it (freed memory returned, fresh pages fault)"}


def markdown_table(doc: dict) -> str:
    """The results of :func:`run_bench` as a markdown section (setup lines, then one row per model)."""
    m = doc["meta"]
    mach = m["machine"]
    hw = mach.get("gpu") or f"{mach['cpu']}, {mach['threads']} threads"
    layout = "channels_last" if m["channels_last"] else "NCHW"
    lines = [
        f"**{m['mode']}**, {m['device']} ({hw}), amp {m['amp']}, {layout}, batch {m['batch']}, "
        f"input {'x'.join(map(str, m['input_size']))}, compile {m['compile']}; "
        f"median of {m.get('repeats_done', m['repeats'])} rounds x {m['iters']} steps "
        f"after {m['warmup']} warm-up steps "
        f"({m['settle']} untimed step(s) before each round)"
        + (f"; CPU allocator: {_ALLOC_WORDS.get(m['cpu_alloc'], m['cpu_alloc'])}." if m.get("cpu_alloc") else "."),
        "",
        f"torch {mach['torch']}, timm {mach['timm']}, python {mach['python']}"
        + (f", CUDA {mach['cuda']}, cuDNN {mach['cudnn']}" if "cuda" in mach else "")
        + f"; {m['date']}; load average before/after {m['loadavg_before']} / {m['loadavg_after']}.",
        "",
        f"`{m['command']}`",
        "",
    ]
    quiet = any(r.get("quiet_samples") is not None for r in doc["results"])
    head = ["model", "compiled", "ms/step", "min–max", "img/s", "vs", "time ×", "img/s ×", "paired time ×"]
    head += ["quiet ms (rounds)", "quiet time ×"] if quiet else []
    faults = any(r.get("faults_per_step") is not None for r in doc["results"])
    head += ["faults/step"] if faults else []
    head += ["peak MiB", "mem ×", "saved MiB", "saved ×", "GMACs", "notes"]
    lines += ["time ×: ratio of the medians; paired time ×: median over rounds of the ratio within a round "
              "(the models of a round run back to back, so it cancels drifts of the machine's speed).", ""]
    if quiet:
        lines += [f"Quiet: the rounds during which other processes used at most {m['quiet_cpu']:.0%} of the "
                  "machine's CPUs (a shared machine; a concurrent job slows every OpenMP op several-fold).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in ("model", "compiled", "vs", "notes")
                                                          else "---:" for h in head) + "|"]
    for r in doc["results"]:
        if r["error"]:
            err = r["error"][:160].replace("|", "/").replace("\n", " ")
            cells = [f"`{r['model']}`", "yes" if r["compiled"] else "no", "failed"] + [""] * (len(head) - 4) + [err]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [f"`{r['model']}`", "yes" if r["compiled"] else "no", _fmt(r["ms_median"], ".1f"),
                 f"{_fmt(r['ms_min'], '.1f')}–{_fmt(r['ms_max'], '.1f')}", _fmt(r["images_per_s"], ".1f"),
                 f"`{r['baseline']}`" if r["baseline"] else "–", _fmt(r["time_ratio"], ".3f"),
                 _fmt(r["throughput_ratio"], ".3f"), _fmt(r["time_ratio_paired"], ".3f")]
        if quiet:
            cells += [f"{_fmt(r['ms_quiet_median'], '.1f')} ({r['quiet_samples']})", _fmt(r["time_ratio_quiet"], ".3f")]
        if faults:
            cells.append(_fmt(r.get("faults_per_step"), ".0f"))
        cells += [_fmt(r["peak_mem_mib"], ".0f"), _fmt(r["peak_mem_ratio"], ".3f"), _fmt(r["saved_mib"], ".0f"),
                  _fmt(r["saved_ratio"], ".3f"), _fmt(r["gmacs"], ".2f"), r["notes"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="time our models against timm baselines (train/infer, eager/compiled)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma-separated timm names with optional +fold/+recompute/+norecompute suffixes "
                        "(default: see DEFAULT_MODELS in openaff/bench.py)")
    p.add_argument("--baseline", default="resnet50d", help="the model the ratios refer to (added if missing)")
    p.add_argument("--pair", action="append", default=None, metavar="MODEL=BASELINE",
                   help="another baseline for one model (its name without suffixes), e.g. "
                        "iaff_resnext50_32x4d=resnext50d_32x4d; repeatable (default with the default models: "
                        "our ResNeXts vs resnext50d_32x4d)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--mode", choices=("train", "infer"), default="infer")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="torch.compile the models (bare --compile means on; 'both' times eager and compiled)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off", help="autocast dtype")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last model and input")
    p.add_argument("--cpu-alloc", choices=("retain", "system"), default="retain",
                   help="CPU runs: 'retain' keeps freed memory in the process so that steps do not page-fault "
                        "(openaff.cpu_memory; glibc), 'system' leaves malloc as it is")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--fusion-kernels", choices=("eager", "compiled"), default=None,
                   help="blend kernels of our fusions in eager models (see openaff.layers.set_fusion_kernels)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation happens here)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds; the median is reported")
    p.add_argument("--iters", type=int, default=2, help="steps per timed round")
    p.add_argument("--settle", type=int, default=None,
                   help="untimed steps of a model before each of its timed rounds (default: 1 on the CPU, 0 on GPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: past this, build no more models and start no more rounds; report what was measured")
    p.add_argument("--quiet-cpu", type=float, default=0.05,
                   help="CPU runs: a round counts as undisturbed when other processes used at most this share "
                        "of the machine's CPUs meanwhile (reported as the 'quiet' median)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (and a .md next to it)")
    p.add_argument("--markdown", type=Path, default=None, help="markdown path (default: the --json path as .md)")
    p.set_defaults(func=lambda args: run_command("openaff bench", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    """Exit status 0; 2 for a bad argument (nothing run); 1 when some models failed (the others are reported)."""
    md_path = args.markdown or (args.json.with_suffix(".md") if args.json else None)
    for flag, path in (("--json", args.json), ("--markdown", md_path)):
        if path is not None:
            check_output_file(path, flag, example="bench.json", make_parents=True)
    settings = BenchSettings.from_args(args)
    doc = run_bench(settings, command=settings.command_line(args.json))
    print(doc["markdown"])
    # Checked before the run; should the place have changed meanwhile, the table is printed above.
    for flag, path, text in (("--json", args.json, json.dumps(doc, indent=1) + "\n"),
                             ("--markdown", md_path, doc["markdown"])):
        if path is not None:
            write_output_file(path, text, flag)
    failed = [r for r in doc["results"] if r["error"]]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``openaff bench`` without the ``openaff`` front end (``python -m openaff.bench ...``)."""
    return run_alone("bench", add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
