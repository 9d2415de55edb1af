"""Map the authors' MXNet/Gluon weights onto our models and write them as safetensors.

The authors' four model families name their weights differently (AFF.md section 6):

* ImageNet ResNet (``conv1.*``, ``bn1.*``, ``layerS.B.{conv,bn}N``, ``downsample``, ``fc``) — our names,
  except BatchNorm's ``gamma``/``beta`` and the fusion's ``attention`` module;
* ImageNet ResNeXt (``features.N``: stem layers, then one entry per stage, ``body.I``, ``output``);
* small-image ResNeXt (``features.0/1`` stem, ``features.3-5`` stages);
* small-image pre-activation ResNet (``features.0`` input BN, ``features.1`` conv, ``features.2-4``
  stages, ``features.5`` final BN, ``resfwd.I`` block bodies).

Each family is a short list of regular-expression rewrites. A conversion succeeds only when every key
of the file lands in exactly one tensor of the model with the same shape and every tensor of the model
is filled; anything else raises :class:`ConversionError` listing the offending names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from torch import nn

from .ndarray import MXNetFormatError, load_params

__all__ = ["ConversionError", "MXNetModelSpec", "check_fit", "convert_params", "infer_model", "map_names",
           "to_state_dict"]


class ConversionError(ValueError):
    """The weights do not fit the model: names that have no place, places with no weights, wrong shapes."""


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


def infer_model(arrays: Mapping[str, np.ndarray]) -> MXNetModelSpec:
    """Work out which of our models holds the authors' weights ``arrays`` (normalised names).

    Only the arrays' ``.shape`` is read, so a mapping of names to shape holders will do.
    """
    keys = list(arrays)
    family, fusion = _family(keys), _fusion(keys)
    prefix = "" if fusion == "add" else f"{fusion}_"
    head = arrays.get("fc.weight", arrays.get("output.weight"))
    kwargs: dict = {"num_classes": int(head.shape[0])} if head is not None else {}
    att = next((arrays[k] for k in keys if k.endswith("attention.local_att.0.weight")), None)
    if att is not None:
        kwargs["r"] = int(att.shape[1] // att.shape[0])
    if family in ("resnet", "resnext"):
        layers = _blocks_per_stage(keys, re.compile(r"^(?:layer|features\.1)(\d)\.(\d+)\."))
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(tuple(layers))
        first = arrays["conv1.0.weight" if family == "resnet" else "features.0.weight"]
        kwargs["in_chans"] = int(first.shape[1])
        base = "resnet" if family == "resnet" else "resnext"
        if depth is None:
            kwargs["layers"] = tuple(layers)
            depth = 50
        if fusion == "add":  # timm's own resnet50d / resnext50d are the no-fusion models
            kwargs["fusion"] = "add"
            prefix = "aff_"
        name = f"{prefix}{base}{depth}" + ("_32x4d" if family == "resnext" else "")
        return MXNetModelSpec(family, fusion, name, kwargs)
    stages = _blocks_per_stage(keys, re.compile(r"^features\.(\d)\.(\d+)\."))
    if len(set(stages)) != 1:
        raise ConversionError(f"small-image model with unequal stages {stages}; the authors' models repeat b blocks")
    b = stages[0]
    first = arrays["features.1.weight" if family == "cifar_resnet" else "features.0.weight"]
    kwargs.update(b=b, in_chans=int(first.shape[1]), width_mult=first.shape[0] / 64)
    if kwargs["width_mult"] == 1.0:
        del kwargs["width_mult"]
    if family == "cifar_resnet":
        return MXNetModelSpec(family, fusion, f"{prefix}cifar_resnet{6 * b + 2}", kwargs)
    return MXNetModelSpec(family, fusion, f"{prefix}cifar_resnext{9 * b + 2}_32x4d", kwargs)


def check_fit(shapes: Mapping[str, tuple[int, ...]], model: nn.Module, spec: MXNetModelSpec) -> dict[str, str]:
    """Map the authors' names to ours and check the fit; returns the map or raises ConversionError.

    Args:
        shapes: the authors' (normalised) names and their shapes.
        model: the model that receives them (may live on the meta device).
        spec: what :func:`infer_model` found (family and fusion type decide the rules).
    """
    names = map_names(list(shapes), spec.family, spec.fusion)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    unknown = sorted(k for k, ours in names.items() if ours not in target)
    wrong = sorted(f"{k} {tuple(shapes[k])} -> {ours} {target[ours]}"
                   for k, ours in names.items() if ours in target and tuple(shapes[k]) != target[ours])
    missing = sorted(set(target) - set(names.values()))
    if unknown or wrong or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} names of the file have no place in the model: {', '.join(unknown[:20])}")
        if wrong:
            parts.append(f"{len(wrong)} shapes differ: {'; '.join(wrong[:20])}")
        if missing:
            parts.append(f"{len(missing)} model tensors get no weights: {', '.join(missing[:20])}")
        raise ConversionError(f"weights do not fit {spec.name}: " + " | ".join(parts))
    return names


def to_state_dict(arrays: Mapping[str, np.ndarray], model: nn.Module, spec: MXNetModelSpec) -> dict[str, torch.Tensor]:
    """The authors' arrays as a complete state dict for ``model``; raises ConversionError on any misfit."""
    names = check_fit({k: a.shape for k, a in arrays.items()}, model, spec)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    state = {ours: torch.from_numpy(np.ascontiguousarray(arrays[k])).to(dtypes[ours]) for k, ours in names.items()}
    if spec.family == "cifar_resnet":
        # The input BN was built with scale=False: MXNet fixes gamma to 1 whatever the file holds.
        state["input_norm.weight"] = torch.ones_like(state["input_norm.weight"])
    return state


def _imagenet_metadata() -> dict[str, str]:
    info = timm.data.ImageNetInfo()
    return {"label_names": json.dumps(info.label_names()),
            "label_descriptions": json.dumps([info.index_to_description(i) for i in range(info.num_classes())])}


def convert_params(src: str | Path, out: str | Path | None = None, model: str | None = None,
                   **model_kwargs) -> tuple[nn.Module, MXNetModelSpec]:
    """Convert an authors' MXNet ``.params`` file into one of our models (and a safetensors file).

    Args:
        src: the MXNet weight file (``save_parameters`` or older ``save_params`` naming).
        out: where to write the safetensors weights, or None to write nothing.
        model: our model name; inferred from the file's names when None.
        **model_kwargs: extra arguments for ``timm.create_model`` (override the inferred ones).

    Returns:
        The model in eval mode with the weights loaded, and what was inferred from the file.
    """
    from safetensors.torch import save_file

    arrays = load_params(src)
    spec = infer_model(arrays)
    if model is not None and model != spec.name:
        spec = MXNetModelSpec(spec.family, spec.fusion, model, spec.kwargs)
    kwargs = {**spec.kwargs, **model_kwargs}
    try:
        net = timm.create_model(spec.name, **kwargs)
    except RuntimeError as e:
        raise ConversionError(f"cannot build model {spec.name!r}: {e}") from None
    state = to_state_dict(arrays, net, spec)
    net.load_state_dict(state, strict=False)  # num_batches_tracked stays; everything else checked above
    net.eval()
    if out is not None:
        metadata = {"format": "pt", "model": spec.name, "model_kwargs": json.dumps(kwargs),
                    "source": Path(src).name, "source_sha256": hashlib.sha256(Path(src).read_bytes()).hexdigest()}
        if spec.family in ("resnet", "resnext") and kwargs.get("num_classes", 1000) == 1000:
            metadata.update(_imagenet_metadata())
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out), metadata=metadata)
    return net, spec


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert the authors' MXNet .params weights to safetensors",
                              description=convert_params.__doc__.splitlines()[0])
    p.add_argument("src", help="MXNet .params file")
    p.add_argument("-o", "--output", required=True, help="safetensors file to write")
    p.add_argument("--model", help="our model name (default: inferred from the file)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if not Path(args.src).is_file():
        raise SystemExit(f"openaff convert: error: no such file: {args.src}")
    try:
        _, spec = convert_params(args.src, args.output, args.model)
    except (MXNetFormatError, ConversionError) as e:
        raise SystemExit(f"openaff convert: error: {e}") from None
    how = "given" if args.model else "inferred from the file's names"
    extra = "".join(f", {k}={v}" for k, v in spec.kwargs.items())
    print(f"model: {spec.name} ({how}{extra})")
    print(f"wrote {args.output}")
    print(f"load with: timm.create_model({spec.name!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={str(args.output)!r}){extra})")
    return 0
