"""Export a model to ONNX, torch.export (``.pt2``) or TorchScript, checked against eager PyTorch (``openaff export``).

The exported file is written next to ``-o OUT`` under a temporary name, loaded back and run on

* random inputs at the export batch size and at batch 1 (the batch dimension is dynamic: the
  exported model takes any batch size, and this checks that it does), and
* three real photographs (scikit-image's ``astronaut``, ``chelsea``, ``coffee``), resized and
  centre-cropped to the model's input size, converted to its channels (grey for one channel) and
  normalised with its mean/std: real images exercise the activations trained weights see;

and compared with the eager PyTorch model in float32 (the unfolded one, so that folding is checked
too). Only when the largest absolute difference is within ``--atol`` (default 1e-4) is the file
renamed to ``OUT``; otherwise the command fails and writes nothing.

Formats:

* ``onnx``: ``torch.export`` then the dynamo ONNX exporter (opset 18 or newer, default the
  exporter's own), or for ``--opset 17`` the legacy ``torch.jit.trace``-based exporter (which records
  the fusions' plain formulas); run with onnxruntime (``pip install open-aff[onnx]``);
* ``pt2``: ``torch.export.export`` + ``torch.export.save``, run from ``torch.export.load``;
* ``torchscript``: ``torch.jit.script``, or ``torch.jit.trace`` where scripting fails (traced at
  the export input size), run from ``torch.jit.load``.

The model is a timm name (random weights unless ``--weights``) or ``local-dir:DIR`` (a hub folder,
weights included). ``--weights`` takes a hub folder, ``local-dir:DIR`` or one of our safetensors
files. Each file carries the model name, its arguments, input size, mean and std (ONNX metadata
properties, an ``openaff.json`` extra file for ``.pt2`` and TorchScript).

Example: ``openaff export local-dir:runs/demo --format onnx --fold-bn -o demo.onnx`` (a training run's folder).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, OpenAFFError, one_line, run_command
from .files import check_output_file, current_umask, write_output_file
from .folding import fuse_for_inference
from .hub import resolve_model
from .photos import LUMA, PHOTOS, per_channel, photo
from .training.config import parse_model_kwargs

__all__ = ["FORMATS", "ExportError", "ExportResult", "add_parser", "export_model", "real_images", "summary"]

FORMATS = ("onnx", "pt2", "torchscript")
MIN_OPSET = 17
# torch's dynamo exporter translates to opset 18+ and cannot convert our graphs down to 17.
_DYNAMO_MIN_OPSET = 18
_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(OpenAFFError):
    """An export that fails, or whose result differs from eager PyTorch by more than the tolerance."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured (errors are max absolute differences, float32)."""

    path: str
    format: str
    model: str
    model_kwargs: dict
    input_size: tuple[int, int, int]
    batch: int
    folded_batchnorms: int
    method: str  # onnx: "dynamo" or "legacy"; pt2: "torch.export"; torchscript: "script" or "trace"
    opset: int | None
    export_s: float
    check_s: float
    atol: float
    errors: dict[str, float] = field(default_factory=dict)
    fallback_reason: str | None = None
    weights: str | None = None  # None: random weights (or the module's own)

    @property
    def max_abs_error(self) -> float:
        return max(self.errors.values())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporters warn about their own deprecations and internals; the parity check is what
    # tells the user whether the file is right.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)}"


def _require_onnx() -> None:
    missing = []
    for name in _ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install open-aff[onnx]")


def _data_config(net: nn.Module, info: dict, model_kwargs: dict) -> dict:
    """Input size, mean and std: those the weights record, else the model's pretrained_cfg."""
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    input_size = info.get("input_size") or tuple(cfg.get("input_size") or (3, 224, 224))
    if "in_chans" in model_kwargs:
        input_size = (int(model_kwargs["in_chans"]), *input_size[1:])
    return {"input_size": tuple(input_size), "mean": tuple(info.get("mean") or cfg.get("mean") or (0.0,)),
            "std": tuple(info.get("std") or cfg.get("std") or (1.0,))}


def _load(model: str, weights: str | None, model_kwargs: dict) -> tuple[nn.Module, str, dict, dict, str | None]:
    """The model in eval mode, its name, its create_model kwargs, its data config and its weight source."""
    net, info = resolve_model(model, weights, model_kwargs=model_kwargs)
    kwargs = dict(info["model_args"] or model_kwargs)
    random = info["source"] is None
    return net, info["architecture"], kwargs, _data_config(net, info, model_kwargs if random else {}), info["source"]


def real_images(input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """scikit-image's astronaut, chelsea and coffee as a normalised ``3 x C x H x W`` float32 batch.

    Each is resized (shorter side first, antialiased) and centre-cropped to ``H x W``; one channel
    means grey (``skimage.color.rgb2gray``'s weights), more than three repeat the grey image.

    Args:
        input_size: ``(C, H, W)`` of the model.
        mean: per-channel mean (one value, or one per channel).
        std: per-channel standard deviation.
    """
    try:
        photos = [photo(name) for name in PHOTOS]
    except ImportError:
        raise ExportError("the real-image parity check needs scikit-image: pip install scikit-image") from None
    from torchvision.transforms.v2 import functional as TF

    c, h, w = input_size
    batch = []
    for arr in photos:
        img = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        scale = max(h / img.shape[1], w / img.shape[2])
        size = [max(h, round(img.shape[1] * scale)), max(w, round(img.shape[2] * scale))]
        img = TF.center_crop(TF.resize(img, size, antialias=True), [h, w])
        if c != 3:
            grey = (img * torch.tensor(LUMA).view(3, 1, 1)).sum(0, keepdim=True)
            img = grey.expand(c, h, w)
        batch.append(img)
    x = torch.stack(batch)
    mean_t, std_t = (torch.tensor(per_channel(v, c, k)).view(1, -1, 1, 1) for v, k in ((mean, "mean"), (std, "std")))
    return ((x - mean_t) / std_t).contiguous()


def _torch_export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _save_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None, meta: dict,
               exporter: str) -> int:
    import onnx

    if exporter == "dynamo":
        program = torch.onnx.export(_torch_export(model, example), (example,), dynamo=True, opset_version=opset,
                                    input_names=["input"], output_names=["logits"], verbose=False)
        program.save(path, external_data=False)
    else:
        # torch.jit.trace underneath: the fusions record their plain formulas (openaff.layers.tracing).
        with torch.no_grad():
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset or MIN_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"openaff.{key}", json.dumps(value)
    onnx.save(proto, str(path))
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _save_pt2(model: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    torch.export.save(_torch_export(model, example), path, extra_files={"openaff.json": json.dumps(meta)})


def _save_torchscript(model: nn.Module, example: torch.Tensor, path: Path, meta: dict,
                      method: str) -> tuple[str, str | None]:
    reason = None
    module = None
    if method in ("auto", "script"):
        try:
            module = torch.jit.script(model)
        except Exception as err:
            if method == "script":
                raise
            reason = _first_line(err)
    if module is None:
        with torch.no_grad():
            module = torch.jit.trace(model, (example,))
    torch.jit.save(module, str(path), _extra_files={"openaff.json": json.dumps(meta)})
    return ("script" if reason is None and method != "trace" else "trace"), reason


def _load_runner(fmt: str, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that runs the exported file at ``path`` on a float32 batch."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        # As many threads as torch uses (the eager side of the comparison), not one per core.
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "pt2":
        module = torch.export.load(path).module()
    else:
        module = torch.jit.load(str(path), map_location="cpu")
    return lambda x: module(x)


def _check(run: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module,
           inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    errors = {}
    with torch.no_grad():
        for label, x in inputs.items():
            got, want = run(x), reference(x)
            if got.shape != want.shape:
                raise ExportError(f"{label}: the exported model gives shape {tuple(got.shape)}, "
                                  f"eager PyTorch {tuple(want.shape)}")
            err = (got.float() - want.float()).abs().max().item()
            errors[label] = err if math.isfinite(err) else math.inf
    return errors


def export_model(model: str | nn.Module, out: str | Path, *, format: str = "onnx", weights: str | None = None,
                 model_kwargs: dict | None = None, fold_bn: bool = False,
                 input_size: tuple[int, int, int] | None = None, batch: int = 2, opset: int | None = None,
                 atol: float = 1e-4, onnx_exporter: str = "auto", torchscript_method: str = "auto",
                 seed: int = 0) -> ExportResult:
    """Export ``model`` to ``out`` and check it against eager PyTorch; the Python API of ``openaff export``.

    Args:
        model: a timm model name, ``local-dir:DIR`` (a hub folder), or a module (put in eval mode; its
            ``pretrained_cfg`` gives the input size, mean and std).
        out: the file to write (written only if the parity check passes).
        format: ``onnx``, ``pt2`` or ``torchscript``.
        weights: a hub folder, ``local-dir:DIR`` or one of our safetensors files (default: random weights).
        model_kwargs: extra ``timm.create_model`` keywords (e.g. ``width_mult=0.25``, ``in_chans=1``).
        fold_bn: fold BatchNorms into the convolutions first (:func:`openaff.folding.fuse_for_inference`).
        input_size: ``(C, H, W)`` (default: the model's pretrained_cfg, or the weights' config).
        batch: batch size of the example the model is exported with (>= 2: torch.export fixes a
            dimension of size 1); the batch dimension of the file stays dynamic.
        opset: ONNX opset (>= 17; default: the exporter's).
        onnx_exporter: ``dynamo`` (torch.export based, opset >= 18), ``legacy`` (torch.jit.trace based)
            or ``auto``: dynamo, legacy for opset 17.
        atol: largest max-absolute difference to eager PyTorch (float32) accepted.
        torchscript_method: ``auto`` (script, trace where scripting fails), ``script`` or ``trace``.
        seed: seed of the random check inputs.

    Returns:
        An :class:`ExportResult` with the timings and the errors per check input.

    Raises:
        ConfigError: a bad argument (unknown model or format, unwritable ``out``, ...).
        CheckpointError: weights that are missing, unreadable or for another model.
        ExportError: the export fails, or the exported model differs by more than ``atol``.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if onnx_exporter not in ("auto", "dynamo", "legacy"):
        raise ConfigError(f"unknown ONNX exporter {onnx_exporter!r}; choose auto, dynamo or legacy")
    if onnx_exporter == "auto":
        onnx_exporter = "legacy" if opset is not None and opset < _DYNAMO_MIN_OPSET else "dynamo"
    if format == "onnx" and onnx_exporter == "dynamo" and opset is not None and opset < _DYNAMO_MIN_OPSET:
        raise ConfigError(f"--opset {opset}: the dynamo exporter writes opset {_DYNAMO_MIN_OPSET} or newer; "
                          "use --onnx-exporter legacy (auto picks it)")
    if torchscript_method not in ("auto", "script", "trace"):
        raise ConfigError(f"unknown torchscript method {torchscript_method!r}; choose auto, script or trace")
    if batch < 2:
        raise ConfigError(f"--batch must be at least 2 (got {batch}): torch.export fixes a batch dimension of "
                          "size 1; the exported file takes any batch size either way")
    if opset is not None and (format != "onnx" or opset < MIN_OPSET):
        raise ConfigError(f"--opset {opset}: " + ("only for --format onnx" if format != "onnx"
                                                  else f"ONNX export needs opset {MIN_OPSET} or newer"))
    if not atol >= 0:
        raise ConfigError(f"--atol must be >= 0, got {atol}")
    if input_size is not None and (len(input_size) != 3 or min(input_size) < 1):
        raise ConfigError(f"--input-size takes C H W (three positive integers), got {tuple(input_size)}")
    out = Path(out)
    check_output_file(out, "-o")
    if format == "onnx":
        _require_onnx()
    model_kwargs = dict(model_kwargs or {})

    if isinstance(model, nn.Module):
        if weights is not None:
            raise ConfigError("weights are for a model given by name; load them into the module instead")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        net, name, kwargs = model.eval(), cfg.get("architecture") or type(model).__name__, model_kwargs
        data = _data_config(net, {}, {})
        source = None
    else:
        net, name, kwargs, data, source = _load(model, weights, model_kwargs)
    size = tuple(int(v) for v in (input_size or data["input_size"]))
    # Exported and checked in float32 on the CPU, whatever the weights were saved in (a caller's
    # module on another device or dtype is copied, not moved).
    if any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
           for t in (*net.parameters(), *net.buffers())):
        net = copy.deepcopy(net).to("cpu", torch.float32)

    gen = torch.Generator().manual_seed(seed)
    inputs = {f"random batch {batch}": torch.randn(batch, *size, generator=gen),
              "random batch 1": torch.randn(1, *size, generator=gen)}
    with torch.no_grad():
        try:
            net(inputs["random batch 1"])
        except Exception as err:
            raise ConfigError(f"{name} does not run on a {'x'.join(map(str, size))} input: {_first_line(err)}") \
                from None
    inputs[f"real images ({', '.join(PHOTOS)})"] = real_images(size, data["mean"], data["std"])

    exported = net
    folded = 0
    if fold_bn:
        exported = fuse_for_inference(net, inplace=False)
        folded = exported.folded_batchnorms
    meta = {"model": name, "model_kwargs": kwargs, "input_size": list(size), "mean": list(data["mean"]),
            "std": list(data["std"]), "folded_batchnorms": folded}

    # torch.export.load wants a name ending in .pt2.
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=f".tmp{_SUFFIX[format]}")
    os.close(fd)
    tmp = Path(tmp_name)
    method = {"onnx": onnx_exporter, "pt2": "torch.export", "torchscript": torchscript_method}[format]
    reason, opset_used = None, None
    try:
        t0 = time.perf_counter()
        try:
            with _quiet():
                if format == "onnx":
                    opset_used = _save_onnx(exported, inputs[f"random batch {batch}"], tmp, opset, meta,
                                            method)
                elif format == "pt2":
                    _save_pt2(exported, inputs[f"random batch {batch}"], tmp, meta)
                else:
                    method, reason = _save_torchscript(exported, inputs[f"random batch {batch}"], tmp, meta,
                                                       torchscript_method)
        except OpenAFFError:
            raise
        except Exception as err:
            raise ExportError(f"{format} export of {name} failed: {_first_line(err)}") from None
        t1 = time.perf_counter()
        try:
            with _quiet():
                errors = _check(_load_runner(format, tmp), net, inputs)
        except OpenAFFError:
            raise
        except Exception as err:
            raise ExportError(f"the exported {format} file of {name} does not run: {_first_line(err)}") from None
        t2 = time.perf_counter()
        worst = max(errors, key=errors.get)
        if not errors[worst] <= atol:
            raise ExportError(f"{format} export of {name} differs from eager PyTorch by {errors[worst]:.3g} "
                              f"(max abs, {worst}) > --atol {atol:g}; nothing written to {out}")
        # mkstemp makes the file private; the output gets the mode open() would give it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path=str(out), format=format, model=name, model_kwargs=kwargs, input_size=size, batch=batch,
                        folded_batchnorms=folded, method=method, opset=opset_used, export_s=t1 - t0,
                        check_s=t2 - t1, atol=atol, errors=errors, fallback_reason=reason, weights=source)


def summary(res: ExportResult) -> str:
    """The lines ``openaff export`` prints for ``res``."""
    what = {"onnx": f"ONNX opset {res.opset} ({res.method} exporter)", "pt2": "torch.export .pt2",
            "torchscript": f"TorchScript ({res.method})"}[res.format]
    folded = f", {res.folded_batchnorms} BatchNorms folded" if res.folded_batchnorms else ""
    weights = f"weights {res.weights}" if res.weights else "random weights"
    size = "x".join(map(str, res.input_size))
    lines = [f"wrote {res.path}: {res.model} ({weights}) as {what}, input {size} with a dynamic batch "
             f"dimension{folded} (export {res.export_s:.1f} s, check {res.check_s:.1f} s)"]
    if res.fallback_reason:
        lines.append(f"note: torch.jit.script failed ({res.fallback_reason}); traced instead, at this input size")
    checks = ", ".join(f"{k} {v:.2g}" for k, v in res.errors.items())
    lines.append(f"parity with eager PyTorch (float32, max abs error): {checks}; max {res.max_abs_error:.2g} "
                 f"<= {res.atol:g}")
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to ONNX, torch.export (.pt2) or TorchScript, "
                                             "checked against eager PyTorch",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="timm model name, or local-dir:DIR (a hub folder with weights)")
    p.add_argument("--weights", help="hub folder, local-dir:DIR or one of our safetensors files "
                                     "(default: random weights)")
    # Not argparse choices: a bad value is reported on one line like every other error.
    p.add_argument("--format", default="onnx", help=f"{' | '.join(FORMATS)} (default onnx)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the file to write")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorms into the convolutions first")
    p.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"),
                   help="input size (default: the model's pretrained_cfg or the weights' config)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the export example (>= 2; the exported "
                                                        "batch dimension is dynamic)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (>= {MIN_OPSET}; default: the exporter's)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest max-abs difference to eager PyTorch accepted")
    p.add_argument("--onnx-exporter", default="auto",
                   help="auto (dynamo; legacy for --opset 17) | dynamo (torch.export based) | legacy (jit.trace based)")
    p.add_argument("--torchscript-method", default="auto", help="auto (script, trace if that fails) | script | trace")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model keywords, e.g. width_mult=0.25 in_chans=1 num_classes=10")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=lambda args: run_command("openaff export", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    model_kwargs = parse_model_kwargs(args.model_kwargs)
    if args.json:  # before minutes of exporting
        check_output_file(args.json, "--json", example="export.json")
    res = export_model(args.model, args.output, format=args.format, weights=args.weights,
                       model_kwargs=model_kwargs, fold_bn=args.fold_bn,
                       input_size=tuple(args.input_size) if args.input_size else None, batch=args.batch,
                       opset=args.opset, atol=args.atol, onnx_exporter=args.onnx_exporter,
                       torchscript_method=args.torchscript_method)
    print(summary(res), flush=True)
    if args.json:
        doc: dict[str, Any] = {**asdict(res), "max_abs_error": res.max_abs_error}
        write_output_file(args.json, json.dumps(doc, indent=1) + "\n", "--json")
    return 0
