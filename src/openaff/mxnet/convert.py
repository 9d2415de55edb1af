"""Map the authors' MXNet/Gluon weights onto our models and write them as safetensors.

The authors' four model families name their weights differently (AFF.md section 6):

* ImageNet ResNet (``conv1.*``, ``bn1.*``, ``layerS.B.{conv,bn}N``, ``downsample``, ``fc``) — our names,
  except BatchNorm's ``gamma``/``beta`` and the fusion's ``attention`` module;
* ImageNet ResNeXt (``features.N``: stem layers, then one entry per stage, ``body.I``, ``output``);
* small-image ResNeXt (``features.0/1`` stem, ``features.3-5`` stages);
* small-image pre-activation ResNet (``features.0`` input BN, ``features.1`` conv, ``features.2-4``
  stages, ``features.5`` final BN, ``resfwd.I`` block bodies).

The pre-activation ResNet's input BN is the authors' ``BatchNorm(scale=False, center=False)``; ours has no
parameters. Its gamma must be 1 (a ConversionError otherwise) and is dropped; MXNet applies its beta without
training it, so a beta of 0 (the authors' files) is dropped and any other (random-weight test files) converts
to ``input_shift=True``, the input BN that keeps that shift.

Each family is a short list of regular-expression rewrites. A conversion succeeds only when every key
of the file lands in exactly one tensor of the model with the same shape and every tensor of the model
is filled; anything else raises :class:`ConversionError` listing the offending names.

From the names and shapes alone the converter infers the family, the fusion type, the depth (blocks per
stage), the width (the authors' ``channel_times``), the classes, the input channels, the MS-CAM
reduction ``r`` and the stages that fuse (the authors' ``start_layer``: earlier stages add).
The result is written in timm's hub folder layout (:func:`openaff.hub.save_pretrained`) or, for a
``-o FILE.safetensors``, as one safetensors file whose header records the model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from .. import __version__, hub
from ..errors import CheckpointError, run_command
from ..files import save_weights
from ..model_card import write_conversion_card
from ..models.aff_cifar import RESNET_DEPTHS, RESNEXT_DEPTHS
from .ndarray import MXNetFormatError, load_params

__all__ = ["ConversionError", "MXNetModelSpec", "check_fit", "check_output", "convert_params", "infer_model",
           "load_lines", "map_names", "to_state_dict", "with_input_shift"]


class ConversionError(CheckpointError, ValueError):
    """The weights do not fit the model (names with no place, places with no weights, wrong shapes), or the
    source or output cannot be used; one line that names the problem."""


_BN = [(r"\.gamma$", ".weight"), (r"\.beta$", ".bias")]
_BODY = [(r"\.body\.0\.", ".conv1."), (r"\.body\.1\.", ".bn1."), (r"\.body\.3\.", ".conv2."),
         (r"\.body\.4\.", ".bn2."), (r"\.body\.6\.", ".conv3."), (r"\.body\.7\.", ".bn3.")]
_ATT_AFF = [(r"\.attention\.(local|global)_att\.", r".fusion.mscam.\1_att.")]
_ATT_IAFF = [(r"\.attention\.(local|global)_att\.", r".fusion.mscam1.\1_att."),
             (r"\.attention\.(local|global)_att2\.", r".fusion.mscam2.\1_att.")]

# Family -> rewrites applied in order to every (normalised) key.
_RULES: dict[str, list[tuple[str, str]]] = {
    "resnet": [(r"^output\.", "fc.")],
    "resnext": [
        (r"^features\.([0-6])\.", r"conv1.\1."), (r"^features\.7\.", "bn1."),
        (r"^features\.10\.0\.downsample\.([01])\.", lambda m: f"layer1.0.downsample.{int(m[1]) + 1}."),
        (r"^features\.1([0-3])\.", lambda m: f"layer{int(m[1]) + 1}."), *_BODY, (r"^output\.", "fc."),
    ],
    "cifar_resnext": [
        (r"^features\.0\.", "conv1."), (r"^features\.1\.", "bn1."),
        (r"^features\.([3-5])\.", lambda m: f"layer{int(m[1]) - 2}."), *_BODY, (r"^output\.", "fc."),
    ],
    "cifar_resnet": [
        (r"^features\.0\.", "input_norm."), (r"^features\.1\.", "conv1."), (r"^features\.5\.", "bn_final."),
        (r"^features\.([2-4])\.", lambda m: f"layer{int(m[1]) - 1}."),
        (r"\.resfwd\.0\.", ".bn1."), (r"\.resfwd\.2\.", ".conv1."), (r"\.resfwd\.3\.", ".bn2."),
        (r"\.resfwd\.5\.", ".conv2."), (r"^output\.", "fc."),
    ],
}


@dataclass
class MXNetModelSpec:
    """What a key set says about the authors' model: our model name and the arguments to build it."""

    family: str
    fusion: str
    name: str
    kwargs: dict = field(default_factory=dict)

    def describe(self) -> str:
        """``name (k=v, ...)`` as the command prints it."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name} ({args})" if args else self.name


def _family(keys: list[str]) -> str:
    if any(k.startswith("layer") for k in keys):
        return "resnet"
    if any(".resfwd." in k for k in keys):
        return "cifar_resnet"
    if any(".body." in k for k in keys):
        return "resnext" if "features.7.gamma" in keys else "cifar_resnext"
    raise ConversionError("the file's names match none of the authors' AFF models (no 'layerN', 'resfwd' or "
                          f"'body' blocks); first names: {keys[:5]}")


def _fusion(keys: list[str]) -> str:
    if any(".attention.local_att2." in k for k in keys):
        return "iaff"
    return "aff" if any(".attention.local_att." in k for k in keys) else "add"


def map_names(keys: list[str], family: str, fusion: str) -> dict[str, str]:
    """Our state-dict name for each of the authors' (normalised) names."""
    rules = _RULES[family] + _BN + (_ATT_IAFF if fusion == "iaff" else _ATT_AFF)
    out = {}
    for key in keys:
        name = key
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        out[key] = name
    return out


def _blocks_per_stage(keys: list[str], stage_of: re.Pattern) -> list[int]:
    blocks: dict[int, set[int]] = {}
    for k in keys:
        m = stage_of.match(k)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    return [len(blocks[s]) for s in sorted(blocks)]


# The stages that fuse in the registered models: ImageNet from stage 3 (the authors' start_layer=3),
# small-image models in every stage. A file that differs gets an explicit fusion_stages.
_DEFAULT_FUSION_STAGES = {"resnet": (3, 4), "resnext": (3, 4), "cifar_resnet": (1, 2, 3), "cifar_resnext": (1, 2, 3)}
_DEPTH_ARGS = ("b", "layers")  # what a registered name itself fixes


def _fusion_stages(keys: list[str], family: str, fusion: str) -> tuple[int, ...]:
    """1-based stages whose blocks hold a fusion module's weights (our names, after mapping)."""
    ours = map_names(keys, family, fusion).values()
    return tuple(sorted({int(m[1]) for n in ours if (m := re.match(r"^layer(\d+)\.\d+\.fusion\.", n))}))


def infer_model(arrays: Mapping[str, np.ndarray]) -> MXNetModelSpec:
    """Work out which of our models holds the authors' weights ``arrays`` (normalised names).

    Only the arrays' ``.shape`` is read, so a mapping of names to shape holders will do.
    """
    keys = list(arrays)
    family, fusion = _family(keys), _fusion(keys)
    prefix = "" if fusion == "add" else f"{fusion}_"
    kwargs: dict = {}
    if family in ("resnet", "resnext"):
        layers = _blocks_per_stage(keys, re.compile(r"^(?:layer|features\.1)(\d)\.(\d+)\."))
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(tuple(layers))
        base = "resnet" if family == "resnet" else "resnext"
        if depth is None:
            kwargs["layers"] = tuple(layers)
            depth = 50
        if fusion == "add":  # timm's own resnet50d / resnext50d are the no-fusion models
            kwargs["fusion"] = "add"
            prefix = "aff_"
        name = f"{prefix}{base}{depth}" + ("_32x4d" if family == "resnext" else "")
        first = arrays["conv1.0.weight" if family == "resnet" else "features.0.weight"]
    else:
        stages = _blocks_per_stage(keys, re.compile(r"^features\.(\d)\.(\d+)\."))
        if len(stages) != 3 or len(set(stages)) != 1:
            raise ConversionError(f"small-image model with stages of {stages} blocks; the authors' models have "
                                  "three stages of b blocks each")
        b = stages[0]
        first = arrays["features.1.weight" if family == "cifar_resnet" else "features.0.weight"]
        depth, registered = (6 * b + 2, RESNET_DEPTHS) if family == "cifar_resnet" else (9 * b + 2, RESNEXT_DEPTHS)
        if depth not in registered:
            # No registered name for this depth: the family's shallowest name with an explicit b.
            kwargs["b"] = b
            depth = registered[0]
        name = f"{prefix}cifar_resnet{depth}" if family == "cifar_resnet" else f"{prefix}cifar_resnext{depth}_32x4d"
        width = first.shape[0] / 64
        if width != 1.0:
            kwargs["width_mult"] = width
    head = arrays.get("fc.weight", arrays.get("output.weight"))
    if head is not None:
        kwargs["num_classes"] = int(head.shape[0])
    kwargs["in_chans"] = int(first.shape[1])
    att = next((arrays[k] for k in keys if k.endswith("attention.local_att.0.weight")), None)
    if att is not None:
        kwargs["r"] = int(att.shape[1] // att.shape[0])
    if fusion != "add":
        stages = _fusion_stages(keys, family, fusion)
        if stages != _DEFAULT_FUSION_STAGES[family]:
            kwargs["fusion_stages"] = stages
    return MXNetModelSpec(family, fusion, name, kwargs)


def check_fit(shapes: Mapping[str, tuple[int, ...]], model: nn.Module, spec: MXNetModelSpec,
              listed: int = 20) -> dict[str, str]:
    """Map the authors' names to ours and check the fit; returns the map or raises ConversionError.

    Args:
        shapes: the authors' (normalised) names and their shapes.
        model: the model that receives them (may live on the meta device).
        spec: what :func:`infer_model` found (family and fusion type decide the rules).
        listed: how many offending names of each kind the message lists.
    """
    names = map_names(list(shapes), spec.family, spec.fusion)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    # The input BN's fixed gamma and beta have no place in a model whose input BN has no parameters.
    names = {k: ours for k, ours in names.items()
             if not (spec.family == "cifar_resnet" and ours in _FIXED_INPUT_AFFINE and ours not in target)}
    unknown = sorted(k for k, ours in names.items() if ours not in target)
    wrong = sorted(f"{k} {tuple(shapes[k])} -> {ours} {target[ours]}"
                   for k, ours in names.items() if ours in target and tuple(shapes[k]) != target[ours])
    missing = sorted(set(target) - set(names.values()))
    if unknown or wrong or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} names of the file have no place in the model: "
                         f"{', '.join(unknown[:listed])}")
        if wrong:
            parts.append(f"{len(wrong)} shapes differ: {'; '.join(wrong[:listed])}")
        if missing:
            parts.append(f"{len(missing)} model tensors get no weights: {', '.join(missing[:listed])}")
        raise ConversionError(f"weights do not fit {spec.name}: " + " | ".join(parts))
    return names


_FIXED_INPUT_AFFINE = ("input_norm.weight", "input_norm.bias")


def _input_shift(arrays: Mapping[str, np.ndarray], spec: MXNetModelSpec) -> bool:
    """Whether the pre-activation ResNet's input BN (``features.0``) has a beta other than 0, its gamma checked to
    be 1 (False for the other families)."""
    if spec.family != "cifar_resnet":
        return False
    gamma, beta = arrays.get("features.0.gamma"), arrays.get("features.0.beta")
    if gamma is not None and not np.all(gamma == 1):
        raise ConversionError("features.0.gamma, the fixed scale of the input BatchNorm (the authors' scale=False), "
                              f"is not 1 everywhere ({np.ravel(gamma)[:4].tolist()}): not a file of the authors' model")
    return beta is not None and bool(np.any(beta != 0))


def with_input_shift(arrays: Mapping[str, np.ndarray], spec: MXNetModelSpec) -> MXNetModelSpec:
    """``spec`` with ``input_shift=True`` when the file's input BN has a beta other than 0 (values are read).

    MXNet applies the beta of a ``center=False`` BatchNorm without training it: the authors' files hold 0 there,
    the project's random-weight test files do not.
    """
    if _input_shift(arrays, spec):
        return MXNetModelSpec(spec.family, spec.fusion, spec.name, {**spec.kwargs, "input_shift": True})
    return spec


def to_state_dict(arrays: Mapping[str, np.ndarray], model: nn.Module, spec: MXNetModelSpec) -> dict[str, torch.Tensor]:
    """The authors' arrays as a complete state dict for ``model``; raises ConversionError on any misfit."""
    if _input_shift(arrays, spec) and not model.input_norm.affine:
        raise ConversionError("features.0.beta, the input BatchNorm's fixed shift, is not 0; MXNet applies it: build "
                              "the model with input_shift=True (convert_params infers it)")
    names = check_fit({k: a.shape for k, a in arrays.items()}, model, spec)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    return {ours: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(dtypes[ours]) for k, ours in names.items()}


def _imagenet_labels() -> tuple[list[str], dict[str, str]]:
    info = timm.data.ImageNetInfo()
    names = info.label_names()
    return list(names), {n: info.index_to_description(i) for i, n in enumerate(names)}


def check_source(src: str | Path) -> Path:
    """The MXNet file ``src`` as a Path, or a one-line ConversionError saying why it cannot be read."""
    path = Path(src)
    if path.is_dir():
        raise ConversionError(f"{path} is a directory, not an MXNet .params file")
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    if not os.access(path, os.R_OK):
        raise ConversionError(f"{path} is not readable (permission denied)")
    return path


def output_is_folder(out: str | Path) -> bool:
    """Whether ``out`` names a hub folder (an existing directory, or a path without ``.safetensors``)."""
    out = Path(out)
    return out.is_dir() or out.suffix != ".safetensors"


def _probe_dir(directory: Path) -> list[Path]:
    """Create ``directory`` if needed and check that files can be made in it; returns the folders created.

    A real probe rather than ``os.access``: root passes every permission check, yet cannot create
    entries in /proc or on a read-only mount.
    """
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ConversionError(f"cannot write under {directory}: {existing} is a file, not a directory")
    created = [p for p in [directory, *directory.parents] if p != existing and existing in p.parents]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        _remove_dirs(created)
        raise ConversionError(f"cannot write in {directory}: {err.strerror or err}") from None
    return created


def _remove_dirs(created: list[Path]) -> None:
    for path in created:  # deepest first; only folders this run made, and only while empty
        try:
            path.rmdir()
        except OSError:
            return


def check_output(out: str | Path) -> tuple[bool, list[Path]]:
    """Check, before any work, that ``out`` can be written; returns whether it is a hub folder and the
    folders the check created (for removal should the conversion fail).

    A folder output must be new, empty, or an earlier hub folder (``config.json``), which is replaced;
    a file output must end in ``.safetensors`` and not be a directory.
    """
    out = Path(out)
    folder = output_is_folder(out)
    if folder and not out.exists() and out.suffix in (".pt", ".pth", ".bin", ".ckpt", ".params", ".npz"):
        raise ConversionError(f"{out}: the converter writes a folder (a path without a weight-file suffix) or a "
                              ".safetensors file, not a {out.suffix} file")
    if folder:
        if out.exists() and not out.is_dir():
            raise ConversionError(f"{out} exists and is not a directory; give a new folder or a .safetensors file")
        if out.is_dir() and any(out.iterdir()) and not hub.is_hub_dir(out):
            raise ConversionError(f"{out} is a directory that holds other files and no {hub.CONFIG_NAME}; "
                                  "give a new or empty folder (or an earlier conversion's folder to replace)")
        return folder, _probe_dir(out)
    return folder, _probe_dir(out.parent)


def _resolve_model(arrays: Mapping[str, np.ndarray], spec: MXNetModelSpec, model: str | None,
                   model_kwargs: dict) -> MXNetModelSpec:
    """The spec to build: the inferred one, or ``model`` when it holds exactly the file's weights."""
    if model is None or model == spec.name:
        return MXNetModelSpec(spec.family, spec.fusion, spec.name, {**spec.kwargs, **model_kwargs})
    held = f"the file holds {spec.describe()}"
    if not timm.is_model(model):
        raise ConversionError(f"unknown model {model!r} (`openaff models` lists ours); {held}")
    # The given name decides depth; everything else the file says (width, classes, r, fusion stages) stays.
    kwargs = {**{k: v for k, v in spec.kwargs.items() if k not in _DEPTH_ARGS}, **model_kwargs}
    given = MXNetModelSpec(spec.family, spec.fusion, model, kwargs)
    try:
        with torch.device("meta"):
            net = timm.create_model(model, **kwargs)
        # For a wrong name the counts and the first offender of each kind say enough.
        check_fit({k: a.shape for k, a in arrays.items()}, net, given, listed=1)
    except (TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())
        if isinstance(err, ConversionError):
            detail = detail.split(": ", 1)[-1]
        raise ConversionError(f"{held}, not {model}: {detail}; leave out --model to convert it as it is") from None
    return given


def _header_metadata(src: Path, spec: MXNetModelSpec) -> dict:
    return {"source": src.name, "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
            "source_format": "mxnet", "converted_by": f"openaff {__version__}", "family": spec.family}


def convert_params(src: str | Path, out: str | Path | None = None, model: str | None = None,
                   **model_kwargs) -> tuple[nn.Module, MXNetModelSpec]:
    """Convert an authors' MXNet ``.params`` file into one of our models (and write it).

    Args:
        src: the MXNet weight file (``save_parameters`` or older ``save_params`` naming).
        out: where to write: a folder (timm's hub layout, loadable as ``local-dir:OUT``; any path not ending
            in ``.safetensors``) or a ``.safetensors`` file; None to write nothing.
        model: our model name; inferred from the file's names when None. A given name must hold exactly the
            file's weights at its own depth (a ResNet-8 file is not an ``aff_cifar_resnet32``).
        **model_kwargs: extra arguments for ``timm.create_model`` (override the inferred ones).

    Returns:
        The model in eval mode with the weights loaded, and what it is (``spec.kwargs`` rebuild it).

    Raises:
        ConversionError: unreadable source, unusable output, or weights that do not fit (one line).
        MXNetFormatError: a damaged file (the byte offset and the problem).
    """
    src = check_source(src)
    folder, created = check_output(out) if out is not None else (False, [])
    try:
        arrays = load_params(src)
        spec = _resolve_model(arrays, with_input_shift(arrays, infer_model(arrays)), model, model_kwargs)
        try:
            net = timm.create_model(spec.name, **spec.kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ConversionError(f"cannot build model {spec.describe()}: {' '.join(str(e).split())}") from None
        state = to_state_dict(arrays, net, spec)
        net.load_state_dict(state, strict=False)  # num_batches_tracked stays; everything else checked above
        net.eval()
        if out is not None:
            _write(net, spec, src, Path(out), folder, len(arrays))
    except BaseException:
        _remove_dirs(created)
        raise
    return net, spec


def _data_cfg(net: nn.Module) -> dict:
    cfg = dict(net.pretrained_cfg)
    chans = int(net.in_chans)
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != chans:  # a grey or multi-band variant: the registered colour statistics, averaged
        mean, std = (sum(mean) / len(mean),) * chans, (sum(std) / len(std),) * chans
    return dict(input_size=(chans, *cfg["input_size"][1:]), mean=mean, std=std, crop_pct=cfg.get("crop_pct"),
                interpolation=cfg.get("interpolation"))


def _write(net: nn.Module, spec: MXNetModelSpec, src: Path, out: Path, folder: bool, arrays: int) -> None:
    data = _data_cfg(net)
    metadata = _header_metadata(src, spec)
    labels = None
    if spec.family in ("resnet", "resnext") and net.num_classes == 1000:
        labels, descriptions = _imagenet_labels()
        metadata["label_descriptions"] = descriptions
    if folder:
        hub.save_pretrained(net, out, architecture=spec.name, model_args=spec.kwargs, label_names=labels,
                            metadata=metadata, **data)
        write_conversion_card(out, source=src.name, sha256=metadata["source_sha256"], arrays=arrays,
                              family=spec.family, num_classes=int(net.num_classes))
        return
    header = {**metadata, "model": spec.name, "model_kwargs": spec.kwargs, "num_classes": int(net.num_classes),
              "in_chans": int(net.in_chans), **{k: v for k, v in data.items() if v is not None}}
    if labels is not None:
        header["label_names"] = labels
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_weights(out, net.state_dict(), header)
    except OSError as err:
        raise ConversionError(f"cannot write {out}: {err.strerror or err}") from None


def load_lines(out: str | Path, spec: MXNetModelSpec, in_chans: int = 3) -> list[str]:
    """The Python expressions (after ``import timm, openaff``) that load what :func:`convert_params` wrote."""
    if output_is_folder(out):
        return [hub.load_line(out)]
    path = os.path.abspath(out)
    # timm drops a classifier whose size differs from the pretrained cfg's, so the overlay must carry
    # the file's class count (and channel count) or the line would give a random classifier.
    overlay = {"file": path, "num_classes": spec.kwargs.get("num_classes", 1000)}
    if in_chans != 3:
        overlay["input_size"] = (in_chans, 224, 224) if spec.family in ("resnet", "resnext") else (in_chans, 32, 32)
    overlay_src = ", ".join(f"{k}={v!r}" for k, v in overlay.items())
    extra = "".join(f", {k}={v!r}" for k, v in spec.kwargs.items())
    return [f"timm.create_model({spec.name!r}, pretrained=True, pretrained_cfg_overlay=dict({overlay_src}){extra})",
            f"openaff.hub.load_pretrained({path!r})[0]"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert the authors' MXNet .params weights (timm folder or safetensors)",
                              description=convert_params.__doc__.splitlines()[0])
    p.add_argument("src", help="MXNet .params file")
    p.add_argument("-o", "--output", required=True,
                   help="a folder (timm's hub layout: config.json + model.safetensors, loadable as local-dir:FOLDER) "
                        "or a FILE.safetensors")
    p.add_argument("--model", help="our model name (default: inferred from the file); must hold exactly the file")
    p.set_defaults(func=lambda args: run_command("openaff convert", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    try:
        net, spec = convert_params(args.src, args.output, args.model)
    except MXNetFormatError as e:
        raise ConversionError(str(e)) from None
    how = "given" if args.model else "inferred from the file's names"
    print(f"model: {spec.describe()}, {how}")
    folder = output_is_folder(args.output)
    kind = "timm hub folder: config.json, model.safetensors, README.md (model card)" if folder else "safetensors"
    print(f"wrote {args.output} ({kind})")
    print("in Python, after `import timm, openaff`:")
    for line in load_lines(args.output, spec, int(net.in_chans)):
        print(f"load with: {line}")
    return 0
