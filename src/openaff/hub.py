"""Weights in timm's hub folder layout, and one reader and one resolver for every kind of weight source we write.

:func:`read_source` reads what a weight source holds (a model folder, a training run folder, a
weight file); :func:`load_pretrained` builds the model it holds; :func:`resolve_model` turns what a
command is given (a timm name and/or a weight source) into a model: ``openaff export`` and
``openaff cam`` call it, ``openaff eval`` reads its weights with :func:`read_source` and builds the
model for the data set it evaluates on.

A folder written by :func:`save_pretrained` holds ``config.json`` (timm's layout: ``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``) and ``model.safetensors``, so that::

    timm.create_model("local-dir:DIR", pretrained=True)

rebuilds the exact model, classifier included, with no other argument (after ``import openaff``).
The layout is written by hand rather than with ``timm.models._hub.save_config_for_hf``: that
function's signature and fields changed between the timm versions we support, and the file it
writes is plain JSON that every version since ``local-dir:`` support reads the same way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import CheckpointError, ConfigError, one_line
from .files import atomic_write, file_format, load_weights, save_weights

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "WeightSource", "is_hub_dir", "load_line", "load_pretrained", "read_source",
           "resolve_model", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Runtime-only arguments: they do not change the architecture, and timm leaves them out of exports too.
_RUNTIME_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "pretrained", "pretrained_cfg",
                 "pretrained_cfg_overlay", "pretrained_model_args", "checkpoint_path", "device", "dtype")
# pretrained_cfg fields that point at where weights came from; a saved folder is its own source.
_SOURCE_FIELDS = ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "tag")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# The weights of a training run folder without config.json: model.safetensors, or best.safetensors of earlier versions.
_RUN_WEIGHTS = (WEIGHTS_NAME, "best.safetensors")


def is_hub_dir(directory: str | Path) -> bool:
    """Whether ``directory`` is a folder in timm's hub layout (holds a ``config.json``)."""
    return (Path(directory) / CONFIG_NAME).is_file()


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be JSON-serialisable, got {value!r}") from None


def _check_rebuilds(model: nn.Module, architecture: str, model_args: dict) -> None:
    """Raise ConfigError unless ``architecture(**model_args)`` has exactly ``model``'s tensors."""
    try:
        with torch.device("meta"):
            twin = timm.create_model(architecture, **model_args)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"unknown architecture {architecture!r} (not a timm model; import openaff first?)") \
                from None
        raise ConfigError(f"cannot build {architecture} with model_args {model_args}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build {architecture} with model_args {model_args}: {err}") from None
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    if ours != theirs:
        raise ConfigError(f"{architecture} with model_args {model_args} is not the model being saved: "
                          f"{_diff(theirs, ours)}")


def _diff(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    """The first few names and shapes in which two state dicts differ, in one line."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shapes = [f"{k} {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {', '.join(missing[:5])}")
    if extra:
        parts.append(f"{len(extra)} unexpected: {', '.join(extra[:5])}")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ: {'; '.join(shapes[:5])}")
    return " | ".join(parts)


def save_pretrained(model: nn.Module, directory: str | Path, *, architecture: str, model_args: dict,
                    input_size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
                    crop_pct: float | None = None, interpolation: str | None = None,
                    label_names: list[str] | None = None, metadata: dict | None = None) -> Path:
    """Write ``model`` into ``directory`` in timm's hub layout (``config.json`` + ``model.safetensors``).

    Args:
        model: the model whose state dict is saved (any device; it is not modified).
        directory: the folder to write (created if needed; existing files of the layout are replaced).
        architecture: the registered timm name that builds it, e.g. ``"aff_cifar_resnet8"``.
        model_args: the ``timm.create_model`` keywords that rebuild it; ``num_classes`` and ``in_chans``
            are added from the model when absent. Drop rates are left out (they do not change the weights).
        input_size: ``(C, H, W)`` the model expects.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        crop_pct: centre-crop fraction of the evaluation transform (default: the model's pretrained_cfg).
        interpolation: resize interpolation (default: the model's pretrained_cfg).
        label_names: one name per class, when known.
        metadata: extra JSON-serialisable values for the safetensors header (e.g. source file, accuracy).

    Returns:
        The folder.

    Raises:
        ConfigError: ``model_args`` do not rebuild the model, or sizes/labels disagree with it.
    """
    directory = Path(directory)
    args = {k: v for k, v in _jsonable(dict(model_args), "model_args").items() if k not in _RUNTIME_ARGS}
    for key in ("num_classes", "in_chans"):
        have = getattr(model, key, None)
        if have is None:
            continue
        if key in args and args[key] != have:
            raise ConfigError(f"model_args {key}={args[key]} disagrees with the model, which has {key}={have}")
        args[key] = int(have)
    num_classes = int(args.get("num_classes", getattr(model, "num_classes", 0)))
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ConfigError(f"input_size must be (channels, height, width), got {input_size}")
    if "in_chans" in args and input_size[0] != args["in_chans"]:
        raise ConfigError(f"input_size {input_size} has {input_size[0]} channels but the model takes "
                          f"in_chans={args['in_chans']}")
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != input_size[0] or len(std) != input_size[0]:
        raise ConfigError(f"mean {mean} and std {std} need one value per input channel ({input_size[0]})")
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(label_names) != num_classes:
            raise ConfigError(f"{len(label_names)} label names for a model with {num_classes} classes")
    _check_rebuilds(model, architecture, args)

    base = {k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items()
            if k not in _SOURCE_FIELDS and v is not None and k not in ("label_names", "label_descriptions")}
    pretrained_cfg = _jsonable(base, "pretrained_cfg")
    pretrained_cfg.update(architecture=architecture, input_size=list(input_size), mean=list(mean), std=list(std),
                          num_classes=num_classes, classifier=pretrained_cfg.get("classifier", "fc"))
    if crop_pct is not None:
        pretrained_cfg["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        pretrained_cfg["interpolation"] = str(interpolation)
    if tuple(input_size[1:]) != tuple((base.get("input_size") or input_size)[1:]):
        pretrained_cfg.pop("pool_size", None)  # the registered one belongs to the registered input size
    if label_names is not None:
        pretrained_cfg["label_names"] = label_names
    config: dict[str, Any] = {"architecture": architecture, "num_classes": num_classes,
                              "num_features": int(getattr(model, "num_features", 0)) or None}
    pool = getattr(getattr(model, "global_pool", None), "pool_type", None)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    if label_names is not None:
        config["label_names"] = label_names
    config.update(model_args=args, pretrained_cfg=pretrained_cfg)
    extra = _jsonable(dict(metadata or {}), "metadata")
    if extra:
        config["metadata"] = extra

    header = {**extra, "model": architecture, "model_kwargs": args, "num_classes": num_classes,
              "in_chans": input_size[0], "input_size": list(input_size), "mean": list(mean), "std": list(std),
              "crop_pct": pretrained_cfg.get("crop_pct"), "interpolation": pretrained_cfg.get("interpolation")}
    if label_names is not None:
        header["label_names"] = label_names
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory / WEIGHTS_NAME, model.state_dict(), {k: v for k, v in header.items() if v is not None})
        text = json.dumps(config, indent=2) + "\n"
        atomic_write(directory / CONFIG_NAME, lambda f: f.write(text.encode()))
    except OSError as err:
        raise CheckpointError(f"cannot write {directory}: {err.strerror or err}") from None
    return directory


def load_line(directory: str | Path) -> str:
    """The one line that loads a folder written by :func:`save_pretrained` (absolute path, valid Python)."""
    # json.dumps gives a double-quoted literal whose escapes Python reads the same way.
    return f"timm.create_model({json.dumps('local-dir:' + os.path.abspath(directory))}, pretrained=True)"


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model folder: it has no {CONFIG_NAME}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise CheckpointError(f"{path} does not name an architecture")
    if not isinstance(cfg.get("model_args", {}), dict) or not isinstance(cfg.get("pretrained_cfg", {}), dict):
        raise CheckpointError(f"{path}: model_args and pretrained_cfg must be JSON objects")
    return cfg


def _weights_in(directory: Path) -> Path:
    preferred = [directory / n for n in (WEIGHTS_NAME, "pytorch_model.bin", "pytorch_model.pth", "model.pth")]
    found = next((p for p in preferred if p.is_file()), None)
    if found is None:
        found = next((p for ext in (".safetensors", ".pth", ".bin") for p in sorted(directory.glob(f"*{ext}"))), None)
    if found is None:
        raise CheckpointError(f"model folder {directory} holds no weights ({WEIGHTS_NAME})")
    return found


def _known(name: str) -> str:
    if not timm.is_model(name):
        raise ConfigError(f"unknown architecture {name!r} (not a timm model; import openaff first?)")
    return name


def _build(name: str, kwargs: dict, overlay: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"unknown architecture {name!r} (not a timm model; import openaff first?)") from None
        raise ConfigError(f"cannot build {name} with {kwargs}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build {name} with {kwargs}: {' '.join(str(err).split())}") from None


def _load_strict(net: nn.Module, sd: dict[str, torch.Tensor], source: str, name: str) -> None:
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != found:
        try:  # an earlier layout that the model's load_state_dict pre-hooks upgrade, or a misfit
            net.load_state_dict(sd, strict=True)
            return
        except RuntimeError:
            raise CheckpointError(f"the weights in {source} do not fit {name}: {_diff(expected, found)}") from None
    net.load_state_dict(sd, strict=True)


def _input_size(meta: dict, in_chans: int | None) -> tuple[int, ...] | None:
    if meta.get("input_size"):
        return tuple(int(v) for v in meta["input_size"])
    size = meta.get("img_size")
    if size is None or in_chans is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (int(in_chans), *(int(s) for s in size))


@dataclass
class WeightSource:
    """What a weight source holds, read without building a model.

    Attributes:
        path: the folder or file named (``local-dir:`` taken off).
        weights: the weight file read (``path`` itself, or the one in the folder).
        state_dict: its tensors (DDP and ``torch.compile`` prefixes taken off).
        metadata: what the weights record (our safetensors header, a checkpoint's run configuration),
            with a model folder's ``config.json`` ``metadata`` over it.
        config: a model folder's ``config.json`` (timm's hub layout), else None.
    """

    path: Path
    weights: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    config: dict | None = None

    def record(self) -> dict[str, Any]:
        """What the source says about its model, in the safetensors header's terms (``model``,
        ``model_kwargs``, ``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``, ``label_names``,
        ``data``, ...): the header for a weight file, ``config.json`` for a model folder."""
        if self.config is None:
            return dict(self.metadata)
        cfg = self.config
        pcfg = cfg.get("pretrained_cfg", {})
        out = {**self.metadata, "model": cfg["architecture"], "model_kwargs": dict(cfg.get("model_args", {}))}
        size = pcfg.get("input_size")
        if size and "in_chans" in out["model_kwargs"]:
            size = [out["model_kwargs"]["in_chans"], *size[1:]]
        labels = cfg.get("label_names", pcfg.get("label_names"))
        for key, value in (("input_size", size), ("mean", pcfg.get("mean")), ("std", pcfg.get("std")),
                           ("label_names", labels)):
            if value:
                out[key] = list(value)
        for key in ("crop_pct", "interpolation"):
            if pcfg.get(key) is not None:
                out.setdefault(key, pcfg[key])
        return out


def read_source(source: str | Path, use_ema: bool = False) -> WeightSource:
    """Read a weight source: a model folder, a training run folder or a weight file.

    Args:
        source: ``local-dir:DIR`` or a folder with ``config.json`` (timm's hub layout); a training run folder
            without one (its ``model.safetensors`` or ``best.safetensors``); one of our ``.safetensors`` files
            (the model recorded in its header); a ``.pt``/``.pth``/``.bin`` state dict or a checkpoint holding
            one (timm's, our ``last.pt``).
        use_ema: prefer the EMA weights of a training checkpoint that has both.

    Raises:
        CheckpointError: a missing or unreadable source, a folder without weights, a file that is no weight file.
        ConfigError: a model folder of an architecture timm does not know.
    """
    text = str(source)
    path = Path(text.removeprefix("local-dir:"))
    if not path.exists():
        raise CheckpointError(f"weight source {path} does not exist")
    cfg = None
    if path.is_dir():
        if is_hub_dir(path):
            cfg = _read_config(path)
            _known(cfg["architecture"])  # before the weights: no one can use them without it
            weights = _weights_in(path)
        else:
            weights = next((path / n for n in _RUN_WEIGHTS if (path / n).is_file()), None)
            if weights is None:
                raise CheckpointError(f"{path} is a directory, not a model folder: it has no {CONFIG_NAME} (nor the "
                                      f"{' or '.join(_RUN_WEIGHTS)} of a training run)")
    else:
        weights = path
        if path.suffix not in _WEIGHT_SUFFIXES and file_format(path, "weight") == "unknown":
            raise CheckpointError(f"{path} is not a weight file (expected a folder or "
                                  f"{', '.join(_WEIGHT_SUFFIXES)}); MXNet .params files go through openaff convert")
    sd, meta = load_weights(weights, use_ema=use_ema)
    if cfg is not None:
        meta = {**meta, **cfg.get("metadata", {})}
    return WeightSource(path, weights, sd, meta, cfg)


def load_pretrained(source: str | Path, *, model: str | None = None, model_kwargs: dict | None = None,
                    use_ema: bool = False) -> tuple[nn.Module, dict]:
    """Build the model a weight source holds and load its weights strictly.

    Args:
        source: what :func:`read_source` reads: ``local-dir:DIR``, a model folder with ``config.json``, a
            training run folder, one of our ``.safetensors`` files (the model recorded in its header), or a
            plain ``.safetensors``/``.pt``/``.pth`` state dict.
        model: the timm model name; required for a plain state dict, must agree with a recorded one.
        model_kwargs: ``timm.create_model`` keywords added to (and overriding) the recorded ones.
        use_ema: prefer the EMA weights of a training checkpoint that has both.

    Returns:
        The model in eval mode, and ``architecture``, ``model_args``, ``input_size``, ``mean``, ``std``,
        ``label_names``, ``metadata``.

    Raises:
        CheckpointError: missing or unreadable source, folder without config.json, weights that do not fit.
        ConfigError: no or unknown model name, arguments the model does not take.
    """
    src = read_source(source, use_ema)
    path, sd = src.path, src.state_dict
    extra = dict(model_kwargs or {})
    if src.config is not None:
        cfg = src.config
        name = cfg["architecture"]
        if model is not None and model != name:
            raise ConfigError(f"{path} holds {name}, not {model}")
        args = {**cfg.get("model_args", {}), **extra}
        pcfg = dict(cfg["pretrained_cfg"])
        if "label_names" in cfg:
            pcfg["label_names"] = cfg["label_names"]
        overlay = {k: pcfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes",
                                        "label_names", "classifier") if k in pcfg}
        if "in_chans" in args and "input_size" in overlay:
            overlay["input_size"] = [args["in_chans"], *overlay["input_size"][1:]]
    else:
        meta = src.metadata
        recorded = meta.get("model")
        if model is not None and recorded and model != recorded:
            raise ConfigError(f"{path} holds {recorded}, not {model}")
        name = model or recorded
        if not name:
            raise ConfigError(f"{path} does not say which model it holds; pass model=NAME")
        _known(name)
        args = dict(meta.get("model_kwargs") or {}) if recorded else {}
        for key in ("num_classes", "in_chans"):
            if isinstance(meta.get(key), int):
                args.setdefault(key, meta[key])
        args.update(extra)
        overlay = {}
        size = _input_size(meta, args.get("in_chans"))
        if size is not None:
            overlay["input_size"] = size
        for key in ("mean", "std", "crop_pct", "interpolation", "label_names"):
            if meta.get(key) is not None:
                overlay[key] = meta[key]
        if "num_classes" in args:
            overlay["num_classes"] = args["num_classes"]
    net = _build(name, args, overlay)
    _load_strict(net, sd, str(src.weights), name)
    net.eval()
    pc = dict(getattr(net, "pretrained_cfg", None) or {})
    labels = pc.get("label_names")
    if isinstance(labels, str):  # older headers stored the list JSON-encoded twice
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError:
            labels = None
    info = dict(architecture=name, model_args=args, input_size=tuple(pc.get("input_size") or ()) or None,
                mean=tuple(pc["mean"]) if pc.get("mean") else None, std=tuple(pc["std"]) if pc.get("std") else None,
                label_names=list(labels) if labels else None, metadata=src.metadata)
    if info["input_size"] and not all(isinstance(v, int) and v > 0 for v in info["input_size"]):
        raise CheckpointError(f"{path} records an invalid input size {info['input_size']}")
    if info["mean"] and not all(math.isfinite(v) for v in info["mean"]):
        raise CheckpointError(f"{path} records an invalid mean {info['mean']}")
    return net, info


def resolve_model(model: str | Path, weights: str | Path | None = None, *,
                  model_kwargs: dict | None = None) -> tuple[nn.Module, dict]:
    """The model a command is given: a timm name (random weights unless ``weights``) or a weight source.

    Args:
        model: a timm model name, or a weight source (``local-dir:DIR``, a model or training run folder, a
            weight file; see :func:`read_source`), which then needs no ``weights``.
        weights: a weight source for the named model.
        model_kwargs: ``timm.create_model`` keywords (added to the recorded ones).

    Returns:
        The model in eval mode, and what :func:`load_pretrained` says of it (``architecture``, ``model_args``,
        ``input_size``, ``mean``, ``std``, ``label_names``, ``metadata``; None where random weights record
        nothing) with ``source``: the weight source, or None.

    Raises:
        ConfigError: an unknown model, arguments it does not take, a weight source given weights too.
        CheckpointError: a weight source that does not exist or cannot be read, or weights that do not fit.
    """
    text = str(model)
    kwargs = dict(model_kwargs or {})
    if text.startswith("local-dir:") or (not timm.is_model(text) and Path(text).exists()):
        if weights is not None:
            raise ConfigError(f"{text} is a weight source already; drop --weights (or give a model name)")
        weights, name = text, None
    elif not timm.is_model(text):
        if Path(text).suffix in _WEIGHT_SUFFIXES or "/" in text:
            raise CheckpointError(f"weight source {text} does not exist")
        raise ConfigError(f"unknown model {text!r} (`openaff models` lists ours; any timm name works; or give a run "
                          "folder or a .safetensors file)")
    else:
        name = text
    if weights is not None:
        net, info = load_pretrained(weights, model=name, model_kwargs=kwargs or None)
        return net, {**info, "source": str(weights)}
    try:
        net = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:
        raise ConfigError(f"model {name} with model_kwargs {kwargs}: {one_line(err)}") from None
    return net.eval(), dict(architecture=name, model_args=kwargs, input_size=None, mean=None, std=None,
                            label_names=None, metadata={}, source=None)
