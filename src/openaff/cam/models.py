"""The models the maps are drawn for: :class:`CamModel` (a network with its preprocessing, class names and
target layer), :func:`load_model`, :func:`default_target_layer`, and :class:`CamError`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ConfigError, OpenAFFError, is_integer
from ..hub import resolve_model
from ..photos import per_channel

__all__ = ["CamError", "CamModel", "default_target_layer", "load_model"]


class CamError(OpenAFFError):
    """A model without what the command needs (no MS-CAM), or an output that cannot be written."""


@dataclass
class CamModel:
    """A model in eval mode with what its maps need: preprocessing, class names, target layer.

    Attributes:
        model: the network.
        name: its architecture (timm name).
        label: the column title.
        input_size: ``(C, H, W)`` it is fed.
        mean: per-channel normalisation mean (one value per input channel).
        std: per-channel normalisation std.
        crop_pct: centre-crop fraction of the evaluation transform (photos; scenes are not cropped).
        interpolation: resize interpolation.
        class_names: one name per class, or None.
        target_layer: module path of the layer whose activations the CAM weighs.
        source: the weight source, or None for the module's own (random) weights.
    """

    model: nn.Module
    name: str
    label: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    class_names: list[str] | None = None
    target_layer: str = ""
    source: str | None = None

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or len(self.class_names or ()))

    def class_name(self, k: int) -> str:
        """The name of class ``k`` (``class k`` when unnamed)."""
        if self.class_names and 0 <= k < len(self.class_names):
            return self.class_names[k]
        return f"class {k}"


def _in_chans(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def _imagenet_names() -> list[str] | None:
    try:
        from timm.data import ImageNetInfo
    except ImportError:  # pragma: no cover (timm < 0.9.8)
        return None
    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]


def default_target_layer(model: nn.Module) -> str:
    """The module path Grad-CAM weighs by default: the last stage's output.

    The last entry of timm's ``feature_info`` (ours and timm's CNNs: ``layer4`` of the ResNets, ``layer3``
    of the small-image ResNeXts, ``act_final`` of the pre-activation families), else the last ``Conv2d``.

    Args:
        model: the network.

    Raises:
        ConfigError: no feature info and no convolution to fall back on.
    """
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        path = str(info[-1]["module"])
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            pass
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"cannot choose a target layer for {type(model).__name__} (no feature_info, no "
                          "convolution); pass --target-layer PATH")
    return convs[-1]


def _check_layer(model: nn.Module, path: str, label: str) -> str:
    try:
        model.get_submodule(path)
    except AttributeError:
        top = ", ".join(n for n, _ in list(model.named_children())[:8])
        raise ConfigError(f"{label} has no module {path!r} (its top-level modules: {top})") from None
    return path


def load_model(model: str | Path | nn.Module | CamModel, weights: str | Path | None = None, *,
               model_kwargs: dict | None = None, img_size: int | None = None, target_layer: str | None = None,
               label: str | None = None) -> CamModel:
    """Build (or wrap) a model for CAMs: its weights, preprocessing, class names and target layer.

    Args:
        model: a timm name (random weights unless ``weights``), a weight source (a run or hub folder,
            ``local-dir:DIR``, one of our ``.safetensors`` files), an ``nn.Module`` (its ``pretrained_cfg``
            is used) or a :class:`CamModel` (``img_size``, ``target_layer`` and ``label`` override its own).
        weights: a weight source for the named model (see :func:`openaff.hub.resolve_model`).
        model_kwargs: ``timm.create_model`` keywords (e.g. ``width_mult=0.25``, ``in_chans=1``).
        img_size: feed ``img_size x img_size`` images instead of the model's input size.
        target_layer: module path of the CAM's layer (default: :func:`default_target_layer`).
        label: the column title (default: the run folder's or file's name, else the model name).

    Raises:
        ConfigError: an unknown model, bad arguments, a weights file of another model, a bad layer.
        CheckpointError: a missing or unreadable weight source, or weights that do not fit.
    """
    if isinstance(model, CamModel):
        cm = CamModel(**{**model.__dict__})
        if img_size is not None:
            cm.input_size = (cm.input_size[0], int(img_size), int(img_size))
        if label is not None:
            cm.label = label
        if target_layer is not None:
            cm.target_layer = _check_layer(cm.model, target_layer, cm.label)
        return cm
    kwargs = dict(model_kwargs or {})
    info: dict = {}
    source = None
    if isinstance(model, nn.Module):
        net, name = model.eval(), type(model).__name__
        name = str((getattr(net, "pretrained_cfg", None) or {}).get("architecture") or name)
    else:
        net, info = resolve_model(model, weights, model_kwargs=kwargs)
        name, source = info["architecture"], info["source"]
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    size = tuple(info.get("input_size") or cfg.get("input_size") or (3, 224, 224))
    chans = int(kwargs.get("in_chans") or _in_chans(net) or size[0])
    h, w = (int(img_size), int(img_size)) if img_size is not None else (int(size[-2]), int(size[-1]))
    mean = per_channel(info.get("mean") or cfg.get("mean") or (0.0,), chans, "mean")
    std = per_channel(info.get("std") or cfg.get("std") or (1.0,), chans, "std")
    names = info.get("label_names") or cfg.get("label_names")
    num_classes = int(getattr(net, "num_classes", 0) or 0)
    if isinstance(names, str):
        names = None
    if names is not None and len(names) != num_classes:
        names = None
    if names is None and num_classes == 1000:
        names = _imagenet_names()
    if label is None:
        if source is not None:
            p = Path(source.removeprefix("local-dir:"))
            label = p.name if p.is_dir() else p.stem
        else:
            label = str(name)
    layer = _check_layer(net, target_layer, label) if target_layer else default_target_layer(net)
    return CamModel(net, str(name), label, (chans, h, w), mean, std, float(cfg.get("crop_pct") or 1.0),
                    str(cfg.get("interpolation") or "bilinear"), list(names) if names else None, layer, source)


def _resolve_class(target: int | str, cm: CamModel, what: str = "class") -> int:
    """A class index of ``cm`` from an index or a class name."""
    n = cm.num_classes
    if is_integer(target):
        k = int(target)
    elif isinstance(target, str) and target.lstrip("-").isdigit():
        k = int(target)
    elif isinstance(target, str) and cm.class_names and target in cm.class_names:
        return cm.class_names.index(target)
    else:
        named = f"; its classes: {', '.join(cm.class_names[:10])}{', ...' if len(cm.class_names) > 10 else ''}" \
            if cm.class_names else " (it has no class names: give an index)"
        raise ConfigError(f"unknown {what} {target!r} for {cm.label}{named}")
    if not 0 <= k < n:
        raise ConfigError(f"unknown {what} index {k}: {cm.label} has {n} classes (0-{n - 1})")
    return k
