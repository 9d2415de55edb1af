"""Where the networks look: Grad-CAM grids (the paper's Figure 6), MS-CAM attention maps, a localisation score.

``openaff cam`` draws one grid PNG: a row per image, a column per model, each panel the class
activation map (``pytorch-grad-cam``: ``--method gradcam``, ``gradcam++``, ``layercam``, ...) over
the image the model sees, captioned with the class the map explains (by default the predicted one)
and its softmax score; a wrong prediction is captioned in red with the true class, when it is known.

* Models: our registered names, any timm name (random weights unless ``--weights``), a training
  run's folder or ``local-dir:DIR`` (timm's hub layout), or one of our ``.safetensors`` files (from
  ``openaff train`` or ``openaff convert``). The model's own ``pretrained_cfg`` (or the run's
  recorded one) gives the input size, resize/centre-crop and mean/std; class names come from the
  weights' metadata (ImageNet-sized classifiers without names get timm's ImageNet names).
* The target layer: the last entry of the model's ``feature_info`` (the last stage's output: ``layer4``
  of the ResNets, ``layer3`` of the small-image ResNeXts, ``act_final`` of the pre-activation ResNets,
  whose last stage is followed by its BN-ReLU), else the last convolution; ``--target-layer PATH``
  (a module path such as ``layer3.0``) overrides it.
* Images: files, folders of them, ``--data fashion-mnist-scenes --indices 0,1,2`` (validation scenes
  with their class and box, drawn on the panels) or ``--data photos`` (scikit-image's astronaut,
  chelsea and coffee). Scenes are resized to the model's input size whole (no crop), so the box stays.

``openaff cam --study DIR`` scores every finished run of an ``openaff study`` folder on
``fashion-mnist-scenes`` (the validation scenes the study validated on, at its canvas size): the
fraction of the Grad-CAM energy (the map's sum) of the true class inside the item's box and the
pointing-game hit rate (the map's maximum inside the box), per run and per fusion type (mean ± std
over seeds), beside the share of the canvas the boxes cover (what a uniform map scores on both). It
writes ``localisation.md``, ``localisation.csv`` (one row per run), ``localisation.json`` and
``grid.png`` (Figure-6 style: one row per scene, one column per fusion type, seed 0).

``openaff attention MODEL IMAGE`` draws, for one model and image, the MS-CAM weights ``w`` of every
fusion block (mean over channels) and the contributions of its two branches (the local branch's
logits mean over channels as a map, the global branch's per-channel logits), one row per block,
grouped by stage. The maps are read with forward hooks on the MS-CAMs' branches; the model is not
changed.

Python: :func:`gradcam_grid`, :func:`attention_maps`, :func:`localisation_score`, :func:`score_models`,
:func:`score_study`, with :func:`load_model`, :func:`load_images`, :func:`scene_samples` and
:func:`photo_samples` to build their inputs.

Examples::

    openaff cam resnet50d seresnet50 aff_resnet50 --data photos -o cam.png
    openaff cam runs/demo --data fashion-mnist-scenes --indices 0-7 --method gradcam++ -o scenes.png
    openaff cam --study results/study-cpu/short-skip -o results/cam/short-skip
    openaff attention runs/demo --data fashion-mnist-scenes --indices 3 -o attention.png
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from .training.errors import CheckpointError, ConfigError, CorruptImageError, DataError, OpenAFFError, run_command

__all__ = ["IMAGE_SUFFIXES", "METHODS", "PHOTOS", "AttentionMap", "AttentionResult", "CamError", "CamGrid",
           "CamModel", "Localisation", "Sample", "StudyScore", "add_parser", "attention_maps", "compute_cams",
           "default_target_layer", "gradcam_grid", "load_images", "load_model", "localisation_score",
           "photo_samples", "scene_samples", "score_models", "score_study"]

# --method -> pytorch_grad_cam class name (the ones that need nothing beyond a model and a layer).
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM",
           "gradcamelementwise": "GradCAMElementWise"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PHOTOS = ("astronaut", "chelsea", "coffee")  # scikit-image's sample photos (--data photos)
DATA_CHOICES = ("fashion-mnist-scenes", "photos")
# ITU-R BT.709 luma weights (as skimage.color.rgb2gray): an RGB mean/std for a one-channel model.
_LUMA = (0.2125, 0.7154, 0.0721)


class CamError(OpenAFFError):
    """A model without what the command needs (no MS-CAM), or an output that cannot be written."""


# --- models ----------------------------------------------------------------------------------------------------

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


def _per_channel(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:  # timm keeps the RGB statistics of a model built with in_chans=1
        return (sum(w * v for w, v in zip(_LUMA, values, strict=True)),)
    raise ConfigError(f"the model's {what} has {len(values)} values but its input has {channels} channels")


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


def _unknown_model(name: str) -> ConfigError:
    return ConfigError(f"unknown model {name!r} (`openaff models` lists ours; any timm name works; or give a run "
                       "folder or a .safetensors file)")


def load_model(model: str | Path | nn.Module | CamModel, weights: str | Path | None = None, *,
               model_kwargs: dict | None = None, img_size: int | None = None, target_layer: str | None = None,
               label: str | None = None) -> CamModel:
    """Build (or wrap) a model for CAMs: its weights, preprocessing, class names and target layer.

    Args:
        model: a timm name (random weights unless ``weights``), a weight source (a run or hub folder,
            ``local-dir:DIR``, one of our ``.safetensors`` files), an ``nn.Module`` (its ``pretrained_cfg``
            is used) or a :class:`CamModel` (``img_size``, ``target_layer`` and ``label`` override its own).
        weights: a weight source for the named model (see :func:`openaff.hub.load_pretrained`).
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
        text = str(model)
        if text.startswith("local-dir:") or (not timm.is_model(text) and Path(text).exists()):
            if weights is not None:
                raise ConfigError(f"{text} is a weight source already; drop its --weights (or give a model name)")
            weights, name = text, None
        elif not timm.is_model(text):
            if Path(text).suffix in (".safetensors", ".pt", ".pth", ".bin") or "/" in text:
                raise CheckpointError(f"weight source {text} does not exist")
            raise _unknown_model(text)
        else:
            name = text
        if weights is None:
            try:
                net = timm.create_model(name, **kwargs)
            except (TypeError, ValueError, RuntimeError, AssertionError) as err:
                msg = " ".join(str(err).split())
                raise ConfigError(f"model {name} with model_kwargs {kwargs}: {msg}") from None
        else:
            from .hub import load_pretrained

            net, info = load_pretrained(weights, model=name, model_kwargs=kwargs or None)
            name = info.get("architecture") or name
            source = str(weights)
        net.eval()
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    size = tuple(info.get("input_size") or cfg.get("input_size") or (3, 224, 224))
    chans = int(kwargs.get("in_chans") or _in_chans(net) or size[0])
    h, w = (int(img_size), int(img_size)) if img_size is not None else (int(size[-2]), int(size[-1]))
    mean = _per_channel(info.get("mean") or cfg.get("mean") or (0.0,), chans, "mean")
    std = _per_channel(info.get("std") or cfg.get("std") or (1.0,), chans, "std")
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


# --- images ----------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    """One image for the maps.

    Attributes:
        image: ``H x W x C`` uint8 pixels (C = 1 or 3).
        name: the row title.
        label: the true class (index or name), when known.
        box: the object's ``(x0, y0, x1, y1)`` box in ``image``'s pixels (exclusive ends), when known;
            an image with a box is resized whole to the model's input (no crop), so the box follows.
    """

    image: np.ndarray
    name: str
    label: int | str | None = None
    box: tuple[int, int, int, int] | None = None


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            grey = img.mode in ("1", "L", "I", "I;16", "F")
            arr = np.asarray(img.convert("L" if grey else "RGB"))
    except UnidentifiedImageError:
        raise CorruptImageError(f"cannot read image {path}: not an image file") from None
    except (OSError, ValueError) as err:
        raise CorruptImageError(f"cannot read image {path}: {' '.join(str(err).split())}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_images(paths: str | Path | Sequence[str | Path], labels: Sequence[int | str | None] | None = None
                ) -> list[Sample]:
    """Image files, and the image files of folders (sorted by name), as :class:`Sample`s.

    Args:
        paths: files or folders.
        labels: the true class of each image (index or name; None: unknown), in order.

    Raises:
        DataError: a path that does not exist, a folder without images, labels that do not match.
        CorruptImageError: a file that is not a readable image.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"image folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"image path {p} does not exist")
    if labels is not None and len(labels) != len(files):
        raise DataError(f"{len(labels)} labels for {len(files)} images")
    return [Sample(_read_image(f), f.stem, None if labels is None else labels[i]) for i, f in enumerate(files)]


def photo_samples(names: Sequence[str] = PHOTOS) -> list[Sample]:
    """scikit-image's sample photos (default: astronaut, chelsea, coffee), without labels.

    Args:
        names: ``skimage.data`` image names.
    """
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("--data photos needs scikit-image: pip install open-aff[cam]") from None
    out = []
    for name in names:
        fn = getattr(skimage.data, str(name), None)
        if not callable(fn) or str(name).startswith("_"):
            raise DataError(f"unknown photo {name!r}: scikit-image's are e.g. {', '.join(PHOTOS)}")
        arr = np.asarray(fn())
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
            raise DataError(f"skimage.data.{name} is not an 8-bit grey or colour photo")
        out.append(Sample(np.ascontiguousarray(arr[:, :, :3]), str(name)))
    return out


def scene_samples(indices: Sequence[int], *, canvas: int = 64, split: str = "val", seed: int = 0,
                  data_dir: str | Path | None = None) -> list[Sample]:
    """``fashion-mnist-scenes`` scenes with their class and box (see :mod:`openaff.training.scenes`).

    Args:
        indices: scene indices of the split.
        canvas: the canvas side (the study's ``img_size``; 64 by default).
        split: ``val`` (the scenes a training run validates on) or ``train``.
        seed: the scene set's seed (training uses 0).
        data_dir: the Fashion-MNIST folder (default: the Debian package's).

    Raises:
        DataError: no Fashion-MNIST data, or an index out of range.
        ConfigError: a bad canvas, split or seed.
    """
    from .training.datasets import FASHION_MNIST_DIR
    from .training.scenes import FASHION_MNIST_CLASSES, FashionMNISTScenes

    scenes = FashionMNISTScenes(data_dir if data_dir is not None else FASHION_MNIST_DIR, split, canvas, seed)
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < len(scenes)]
    if bad:
        raise DataError(f"scene index {bad[0]} is out of range: the {split} split has {len(scenes)} scenes "
                        f"(0-{len(scenes) - 1})")
    out = []
    for start in range(0, len(idx), 512):
        s = scenes.batch(idx[start:start + 512])
        for k, i in enumerate(idx[start:start + 512]):
            label = int(s["label"][k])
            out.append(Sample(s["image"][k].permute(1, 2, 0).numpy().copy(), f"scene {i}", label,
                              tuple(int(v) for v in s["box"][k].tolist())))
            out[-1].name = f"scene {i} ({FASHION_MNIST_CLASSES[label]})"
    return out


def _as_samples(images: Any) -> list[Sample]:
    if isinstance(images, (str, Path, Sample, np.ndarray)):
        images = [images]
    out: list[Sample] = []
    for i, item in enumerate(images):
        if isinstance(item, Sample):
            out.append(item)
        elif isinstance(item, (str, Path)):
            out += load_images([item])
        elif isinstance(item, np.ndarray) or hasattr(item, "convert"):  # a PIL image
            arr = np.asarray(item.convert("RGB") if hasattr(item, "convert") else item)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if arr.ndim != 3 or arr.shape[2] not in (1, 3):
                raise DataError(f"image {i} has shape {arr.shape}; expected H x W, H x W x 1 or H x W x 3")
            if arr.dtype != np.uint8:
                arr = (np.clip(arr.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
            out.append(Sample(np.ascontiguousarray(arr), f"image {i}"))
        else:
            raise DataError(f"image {i} is a {type(item).__name__}; expected a path, a Sample, an array or a PIL image")
    if not out:
        raise DataError("no images given")
    return out


def _preprocess(sample: Sample, cm: CamModel) -> tuple[np.ndarray, torch.Tensor, tuple[float, ...] | None]:
    """``(display H x W x C in [0, 1], normalised 1 x C x H x W input, box in input pixels or None)``."""
    from PIL import Image

    c, h, w = cm.input_size
    arr = sample.image
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    img = img.convert("L" if c != 3 else "RGB")
    box = None
    if sample.box is not None:
        # Whole image to the input size: the box's coordinates scale with it.
        src_w, src_h = img.size
        if (src_w, src_h) != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        x0, y0, x1, y1 = sample.box
        box = (x0 * w / src_w, y0 * h / src_h, x1 * w / src_w, y1 * h / src_h)
        t = torch.from_numpy(np.asarray(img).copy())
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    else:
        from timm.data import create_transform

        tf = create_transform(input_size=(3, h, w), crop_pct=cm.crop_pct, interpolation=cm.interpolation,
                              is_training=False, normalize=False)
        t = tf(img)
        t = t[None] if t.ndim == 2 else t
    x = t.float() / 255.0
    if x.shape[0] != c:
        x = x.expand(c, h, w)
    display = x.permute(1, 2, 0).numpy().copy()
    mean = torch.tensor(cm.mean).view(-1, 1, 1)
    std = torch.tensor(cm.std).view(-1, 1, 1)
    return display, ((x - mean) / std)[None].contiguous(), box


# --- CAMs ------------------------------------------------------------------------------------------------------

def _cam_class(method: str) -> type:
    key = method.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        import pytorch_grad_cam
    except ImportError:
        raise ConfigError("CAMs need pytorch-grad-cam: pip install open-aff[cam]") from None
    return getattr(pytorch_grad_cam, METHODS[key])


def _resolve_class(target: int | str, cm: CamModel, what: str = "class") -> int:
    """A class index of ``cm`` from an index or a class name."""
    n = cm.num_classes
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
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


def compute_cams(cm: CamModel, inputs: torch.Tensor, targets: Sequence[int] | None = None, *,
                 method: str = "gradcam", batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Class activation maps of a batch, and the model's softmax probabilities.

    Args:
        cm: the model (see :func:`load_model`).
        inputs: ``B x C x H x W`` normalised images.
        targets: the class each map explains (default: the predicted one).
        method: one of :data:`METHODS`.
        batch_size: images per pass.

    Returns:
        ``B x H x W`` float32 maps, each scaled to [0, 1] by pytorch-grad-cam (all zero where the
        method finds no positive evidence), and ``B x num_classes`` probabilities.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = _cam_class(method)
    if targets is not None and len(targets) != len(inputs):
        raise ConfigError(f"{len(targets)} target classes for {len(inputs)} images")
    device = next(cm.model.parameters()).device
    layer = cm.model.get_submodule(cm.target_layer)
    # The maps need gradients at the target layer only: freeze the weights and start the graph at the
    # layer's output (a copy; registered before the CAM's own hooks, which then see it). The backward
    # pass runs through the head alone, not the whole network with every weight's gradient.
    trainable = [p for p in cm.model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    cut = layer.register_forward_hook(
        lambda _m, _i, out: out.detach().clone().requires_grad_(True) if isinstance(out, torch.Tensor) else None)
    cam = cls(model=cm.model, target_layers=[layer])
    maps, probs = [], []
    try:
        with torch.enable_grad():
            for start in range(0, len(inputs), batch_size):
                x = inputs[start:start + batch_size].to(device)
                tg = None if targets is None else [ClassifierOutputTarget(int(k))
                                                    for k in targets[start:start + batch_size]]
                maps.append(np.asarray(cam(input_tensor=x, targets=tg), dtype=np.float32))
                probs.append(torch.softmax(cam.outputs.detach().float(), 1).cpu().numpy())
    finally:
        # Not `with cam:` — its __exit__ prints and swallows IndexErrors.
        cam.activations_and_grads.release()
        cut.remove()
        for p in trainable:
            p.requires_grad_(True)
    return np.concatenate(maps), np.concatenate(probs)


@dataclass
class CamGrid:
    """What :func:`gradcam_grid` computed and drew. Per-panel arrays are ``images x models``.

    Attributes:
        samples: the images (rows).
        labels: the models' column titles.
        cams: ``cams[i][j]``, the map of image i under model j (``H x W`` of that model's input, [0, 1]).
        displays: ``displays[i][j]``, the image as model j sees it (``H x W x C`` in [0, 1]).
        targets: the class each map explains.
        predicted: the predicted class.
        scores: the softmax probability of ``targets``.
        correct: whether the prediction equals the true label (None where the label is unknown).
        figure: the matplotlib figure.
        path: the PNG written, or None.
    """

    samples: list[Sample]
    labels: list[str]
    cams: list[list[np.ndarray]]
    displays: list[list[np.ndarray]]
    targets: np.ndarray
    predicted: np.ndarray
    scores: np.ndarray
    correct: list[list[bool | None]]
    figure: Any = None
    path: Path | None = None


def _targets_for(samples: list[Sample], cm: CamModel, target: int | str | Sequence | None) -> list[int] | None:
    if target is None or target == "predicted":
        return None
    if target == "label":
        missing = [s.name for s in samples if s.label is None]
        if missing:
            raise ConfigError(f"target 'label' needs the true class of every image; {missing[0]} has none "
                              "(give labels, or target the predicted class)")
        return [_resolve_class(s.label, cm, "label") for s in samples]
    if isinstance(target, (list, tuple)):
        if len(target) != len(samples):
            raise ConfigError(f"{len(target)} target classes for {len(samples)} images")
        return [_resolve_class(t, cm) for t in target]
    return [_resolve_class(target, cm)] * len(samples)


def gradcam_grid(models: Any, images: Any, *, weights: Sequence[str | Path | None] | None = None,
                 output: str | Path | None = None, method: str = "gradcam",
                 target: int | str | Sequence[int | str] | None = "predicted", model_kwargs: dict | None = None,
                 img_size: int | None = None, target_layer: str | None = None, titles: Sequence[str] | None = None,
                 alpha: float = 0.5, title: str | None = None) -> CamGrid:
    """A grid of class activation maps: a row per image, a column per model (the paper's Figure 6).

    Args:
        models: a model or a list of them (names, weight sources, modules or :class:`CamModel`; see
            :func:`load_model`).
        images: paths (files, folders), :class:`Sample`s, ``H x W [x C]`` arrays or PIL images; see also
            :func:`scene_samples` and :func:`photo_samples`.
        weights: one weight source (or None) per model.
        output: the PNG to write (None: only build the figure).
        method: one of :data:`METHODS`.
        target: the class each map explains: ``"predicted"`` (default), ``"label"`` (the true class), a
            class index or name for all images, or one per image.
        model_kwargs: ``timm.create_model`` keywords for the models built by name.
        img_size: input size for every model (default: each model's own).
        target_layer: module path of the CAM's layer for every model (default: per family).
        titles: column titles (default: the models' names).
        alpha: opacity of the heatmap over the image.
        title: the figure's title.

    Raises:
        ConfigError: unknown models, methods, classes or layers, weights of another model.
        DataError: unreadable or missing images.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ConfigError("no models given")
    if weights is not None and len(weights) != len(models):
        raise ConfigError(f"{len(weights)} weight sources for {len(models)} models (use None for random weights)")
    if titles is not None and len(titles) != len(models):
        raise ConfigError(f"{len(titles)} titles for {len(models)} models")
    cms = [load_model(m, None if weights is None or weights[j] in (None, "none") else weights[j],
                      model_kwargs=model_kwargs, img_size=img_size, target_layer=target_layer,
                      label=None if titles is None else titles[j]) for j, m in enumerate(models)]
    samples = _as_samples(images)
    n_i, n_m = len(samples), len(cms)
    cams = [[None] * n_m for _ in range(n_i)]
    displays = [[None] * n_m for _ in range(n_i)]
    targets = np.zeros((n_i, n_m), dtype=np.int64)
    predicted = np.zeros((n_i, n_m), dtype=np.int64)
    scores = np.zeros((n_i, n_m), dtype=np.float64)
    correct: list[list[bool | None]] = [[None] * n_m for _ in range(n_i)]
    boxes: list[list[tuple | None]] = [[None] * n_m for _ in range(n_i)]
    for j, cm in enumerate(cms):
        tg = _targets_for(samples, cm, target)
        prep = [_preprocess(s, cm) for s in samples]
        maps, probs = compute_cams(cm, torch.cat([p[1] for p in prep]), tg, method=method)
        pred = probs.argmax(1)
        chosen = pred if tg is None else np.asarray(tg)
        for i, s in enumerate(samples):
            cams[i][j], displays[i][j], boxes[i][j] = maps[i], prep[i][0], prep[i][2]
            targets[i, j], predicted[i, j], scores[i, j] = chosen[i], pred[i], probs[i, chosen[i]]
            if s.label is not None:
                correct[i][j] = bool(pred[i] == _resolve_class(s.label, cm, "label"))
    grid = CamGrid(samples, [cm.label for cm in cms], cams, displays, targets, predicted, scores, correct)
    what = {"predicted": "the predicted class", None: "the predicted class", "label": "the true class"}.get(
        target if isinstance(target, str) or target is None else "", "the given class")
    marks = "; red: a wrong prediction" if any(c is False for row in correct for c in row) else ""
    grid.figure = _grid_figure(grid, cms, boxes, alpha, title or f"{method} of {what}{marks}")
    if output is not None:
        grid.path = _save(grid.figure, output)
    return grid


def _save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    except OSError as err:
        raise CamError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def _show(ax: Any, display: np.ndarray) -> None:
    if display.shape[2] == 1:
        ax.imshow(display[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(display, 0, 1), interpolation="bilinear")


def _box(ax: Any, box: tuple[float, ...] | None, color: str = "lime") -> None:
    if box is not None:
        from matplotlib.patches import Rectangle

        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.2, ec=color))


def _grid_figure(grid: CamGrid, cms: list[CamModel], boxes: list[list[tuple | None]], alpha: float, title: str
                 ) -> Any:
    from matplotlib.figure import Figure

    n_i, n_m = len(grid.samples), len(cms)
    fig = Figure(figsize=(2.3 * n_m + 0.6, 2.35 * n_i + 0.6), layout="constrained")
    axes = fig.subplots(n_i, n_m, squeeze=False)
    for i, s in enumerate(grid.samples):
        for j, cm in enumerate(cms):
            ax = axes[i][j]
            _show(ax, grid.displays[i][j])
            ax.imshow(grid.cams[i][j], cmap="jet", alpha=alpha, vmin=0, vmax=1, interpolation="bilinear")
            _box(ax, boxes[i][j], "white")
            ax.set_xticks([])
            ax.set_yticks([])
            caption = f"{cm.class_name(int(grid.targets[i, j]))} {grid.scores[i, j]:.2f}"
            color = "black"
            if grid.correct[i][j] is False:
                true = cm.class_name(_resolve_class(s.label, cm, "label"))
                if grid.targets[i, j] == grid.predicted[i, j]:
                    caption += f"\nwrong (true: {true})"
                else:
                    caption += f"\npredicted {cm.class_name(int(grid.predicted[i, j]))}: wrong"
                color = "red"
            elif grid.correct[i][j] and grid.targets[i, j] != grid.predicted[i, j]:
                caption += f"\npredicted {cm.class_name(int(grid.predicted[i, j]))}"
            head = f"{cm.label}\n" if i == 0 else ""
            ax.set_title(head + caption, fontsize=8, color=color, pad=2)
            if j == 0:
                ax.set_ylabel(s.name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


# --- the localisation score ------------------------------------------------------------------------------------

@dataclass
class Localisation:
    """Per-image localisation of maps against boxes (see :func:`localisation_score`).

    Attributes:
        energy: the fraction of each map's sum inside its box (0 for an all-zero map).
        hit: whether each map's maximum lies in its box (grown by the tolerance); False for an all-zero map.
        box_fraction: the share of the image each box covers (what a uniform map scores on both).
        empty: whether the map is all zero.
    """

    energy: np.ndarray
    hit: np.ndarray
    box_fraction: np.ndarray
    empty: np.ndarray

    @property
    def energy_mean(self) -> float:
        return float(self.energy.mean()) if len(self.energy) else math.nan

    @property
    def pointing(self) -> float:
        return float(self.hit.mean()) if len(self.hit) else math.nan


def localisation_score(cams: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor | Sequence,
                       tolerance: float = 0.0) -> Localisation:
    """The energy-in-box fraction and the pointing-game hits of maps against object boxes.

    Energy (Score-CAM's energy-based pointing game): ``sum(map inside box) / sum(map)``. Pointing game
    (Zhang et al.): whether the map's maximum (the first one, in row-major order) lies inside the box
    grown by ``tolerance`` pixels. A box ``(x0, y0, x1, y1)`` holds pixels ``x0 <= x < x1``, ``y0 <= y < y1``
    (fractional edges, as after a resize, count the pixels whose centre ``x + 0.5`` is inside).

    Args:
        cams: ``B x H x W`` non-negative maps.
        boxes: ``B x 4`` boxes in the maps' pixels.
        tolerance: pointing-game tolerance in pixels.
    """
    cams = np.asarray(cams.detach().cpu() if isinstance(cams, torch.Tensor) else cams, dtype=np.float64)
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    if cams.ndim != 3 or boxes.shape != (len(cams), 4):
        raise ValueError(f"expected B x H x W maps and B x 4 boxes, got {cams.shape} and {boxes.shape}")
    if (cams < 0).any():
        raise ValueError("maps must be non-negative")
    b, h, w = cams.shape
    cx, cy = np.arange(w)[None, :] + 0.5, np.arange(h)[None, :] + 0.5

    def inside(grow: float) -> np.ndarray:
        x_in = (cx >= boxes[:, :1] - grow) & (cx < boxes[:, 2:3] + grow)  # B x W
        y_in = (cy >= boxes[:, 1:2] - grow) & (cy < boxes[:, 3:4] + grow)  # B x H
        return y_in[:, :, None] & x_in[:, None, :]

    mask = inside(0.0)
    total = cams.reshape(b, -1).sum(1)
    empty = total <= 0
    energy = np.where(empty, 0.0, (cams * mask).reshape(b, -1).sum(1) / np.where(empty, 1.0, total))
    peak = cams.reshape(b, -1).argmax(1)
    grown = inside(float(tolerance)).reshape(b, -1)
    hit = grown[np.arange(b), peak] & ~empty
    return Localisation(energy, hit, mask.reshape(b, -1).mean(1), empty)


def _score_one(cm: CamModel, samples: list[Sample], method: str, target: str, tolerance: float,
               batch_size: int) -> tuple[dict, Localisation, np.ndarray]:
    prep = [_preprocess(s, cm) for s in samples]
    x = torch.cat([p[1] for p in prep])
    labels = np.asarray([_resolve_class(s.label, cm, "label") for s in samples])
    tg = labels.tolist() if target == "label" else None
    maps, probs = compute_cams(cm, x, tg, method=method, batch_size=batch_size)
    loc = localisation_score(maps, [p[2] for p in prep], tolerance)
    row = dict(model=cm.label, architecture=cm.name, n=len(samples), energy=loc.energy_mean, pointing=loc.pointing,
               top1=float((probs.argmax(1) == labels).mean()), box_fraction=float(loc.box_fraction.mean()),
               empty=int(loc.empty.sum()))
    return row, loc, maps


def score_models(models: Any, samples: Sequence[Sample], *, weights: Sequence[str | Path | None] | None = None,
                 method: str = "gradcam", target: str = "label", tolerance: float = 0.0,
                 model_kwargs: dict | None = None, batch_size: int = 64) -> list[dict]:
    """The localisation score of each model on images with boxes (e.g. :func:`scene_samples`).

    Args:
        models: a model or a list (see :func:`load_model`).
        samples: images with ``label`` and ``box``.
        weights: one weight source (or None) per model.
        method: one of :data:`METHODS`.
        target: ``"label"`` (the map of the true class, the pointing game's rule) or ``"predicted"``.
        tolerance: pointing-game tolerance in pixels.
        model_kwargs: ``timm.create_model`` keywords for models built by name.
        batch_size: images per pass.

    Returns:
        One row per model: ``model``, ``n``, ``energy`` (mean fraction in the box), ``pointing`` (hit
        rate), ``top1`` (accuracy on these images), ``box_fraction`` (the uniform map's score), ``empty``.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    samples = list(samples)
    if target not in ("label", "predicted"):
        raise ConfigError(f"the localisation target must be 'label' or 'predicted', got {target!r}")
    lacking = [s.name for s in samples if s.box is None or s.label is None]
    if lacking or not samples:
        raise DataError(f"the localisation score needs images with a box and a label; {lacking[0]} has none"
                        if lacking else "no images to score")
    rows = []
    for j, m in enumerate(models):
        cm = load_model(m, None if weights is None else weights[j], model_kwargs=model_kwargs)
        rows.append(_score_one(cm, samples, method, target, tolerance, batch_size)[0])
    return rows


# --- the study -------------------------------------------------------------------------------------------------

@dataclass
class StudyScore:
    """What :func:`score_study` measured and wrote.

    Attributes:
        runs: one row per scored run (fusion, b, seed, energy, pointing, top1, val_top1, ...).
        groups: one row per (fusion, b): means and standard deviations over seeds.
        skipped: run folders left out, with the reason.
        settings: how the scores were made (method, scenes, canvas, layer, command).
        paths: the files written (``md``, ``csv``, ``json``, ``grid``).
    """

    runs: list[dict]
    groups: list[dict]
    skipped: list[str]
    settings: dict
    paths: dict[str, Path] = field(default_factory=dict)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a run configuration")
    return data


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


def _fusion_of(cfg: dict) -> str:
    fusion = (cfg.get("model_kwargs") or {}).get("fusion")
    if fusion:
        return str(fusion)
    name = str(cfg.get("model", ""))
    for prefix in ("iaff_", "aff_"):
        if name.startswith(prefix):
            return prefix[:-1]
    return "add"


def _study_runs(study: Path) -> tuple[list[dict], list[str], list[str]]:
    """The finished runs of a study folder, the skipped ones (with reasons), and the study's fusion order."""
    if not study.is_dir():
        raise DataError(f"study folder {study} does not exist")
    runs_dir = study / "runs"
    if not runs_dir.is_dir():
        raise DataError(f"{study} is not a study folder: it has no runs/ (see openaff study)")
    order: list[str] = []
    meta = study / "study.json"
    if meta.is_file():
        try:
            order = list(json.loads(meta.read_text()).get("settings", {}).get("fusions") or [])
        except (OSError, ValueError, AttributeError):
            order = []
    runs, skipped = [], []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        cfg_path = folder / "config.yaml"
        if not cfg_path.is_file():
            skipped.append(f"{folder.name}: no config.yaml (not started)")
            continue
        cfg = _read_yaml(cfg_path)
        rows = _metrics(folder)
        epochs = int(cfg.get("epochs") or 0)
        if len(rows) < epochs:
            skipped.append(f"{folder.name}: unfinished ({len(rows)} of {epochs} epochs)")
            continue
        if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
            skipped.append(f"{folder.name}: no config.json + model.safetensors")
            continue
        if cfg.get("data") != "fashion-mnist-scenes":
            raise ConfigError(f"{folder} was trained on {cfg.get('data')!r}; the localisation score needs "
                              "fashion-mnist-scenes (the scenes' boxes)")
        val = [float(r["val_top1"]) for r in rows if r.get("val_top1") not in (None, "")]
        runs.append(dict(run=folder.name, folder=folder, fusion=_fusion_of(cfg),
                         b=int((cfg.get("model_kwargs") or {}).get("b") or 0) or None, seed=int(cfg.get("seed") or 0),
                         model=str(cfg.get("model")), canvas=int(cfg.get("img_size") or 64),
                         data_dir=cfg.get("data_dir"), val_top1=max(val) / 100 if val else None))
    return runs, skipped, order


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _pm(mean: float | None, std: float | None, bold: bool = False) -> str:
    """A fraction as ``mean ± std`` in percent (``–`` when unknown)."""
    if mean is None:
        return "–"
    text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    return f"**{text}**" if bold else text


def score_study(study: str | Path, output: str | Path | None = None, *, limit: int = 2000,
                method: str = "gradcam", target: str = "label", tolerance: float = 0.0,
                grid_indices: Sequence[int] = (0, 1, 2, 3, 4, 5), batch_size: int = 64,
                command: str | None = None, progress: bool = True) -> StudyScore:
    """Score every finished run of an ``openaff study`` folder on ``fashion-mnist-scenes``.

    Each run (``STUDY/runs/*/``: ``config.yaml``, ``metrics.csv``, ``config.json`` + ``model.safetensors``)
    is loaded with its recorded preprocessing and scored on the first ``limit`` validation scenes at
    its canvas size (the scenes the study validated on): the mean fraction of the CAM's energy inside
    the item's box and the pointing-game hit rate. Runs are grouped by fusion type and depth (mean ±
    std over seeds). Unfinished runs are skipped (listed in ``skipped``).

    Args:
        study: the study folder.
        output: where to write ``localisation.md/.csv/.json`` and ``grid.png`` (default ``STUDY/cam``).
        limit: scenes scored per run.
        method: one of :data:`METHODS`.
        target: ``"label"`` (the map of the true class) or ``"predicted"``.
        tolerance: pointing-game tolerance in pixels.
        grid_indices: the scenes of the Figure-6-style grid (maps of the predicted class, seed 0).
        batch_size: scenes per pass.
        command: the command line recorded in the table (default: the equivalent ``openaff cam``).
        progress: print a line per run.

    Raises:
        DataError: not a study folder, no finished run, unreadable files.
        ConfigError: a study not trained on fashion-mnist-scenes, bad settings.
    """
    study = Path(study)
    out = Path(output) if output is not None else study / "cam"
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive number of scenes, got {limit!r}")
    if target not in ("label", "predicted"):
        raise ConfigError(f"the localisation target must be 'label' or 'predicted', got {target!r}")
    _cam_class(method)
    runs, skipped, order = _study_runs(study)
    if not runs:
        why = f" ({'; '.join(skipped[:3])})" if skipped else ""
        raise DataError(f"{study} has no finished run to score{why}")
    canvases = sorted({r["canvas"] for r in runs})
    if len(canvases) > 1:
        raise ConfigError(f"the runs of {study} use different canvas sizes {canvases}; score them separately")
    canvas, data_dir = canvases[0], runs[0]["data_dir"]
    scenes = scene_samples(range(limit), canvas=canvas, data_dir=data_dir)
    known = ("add", "concat", "ms_gau", "ms_se", "ms_sa", "aff", "iaff")
    rank = {f: i for i, f in enumerate([*order, *[k for k in known if k not in order]])}
    runs.sort(key=lambda r: (rank.get(r["fusion"], len(rank)), r["fusion"], r["b"] or 0, r["seed"]))
    layer = None
    for r in runs:
        cm = load_model(r["folder"], label=r["run"])
        layer = layer or cm.target_layer
        row, _, _ = _score_one(cm, scenes, method, target, tolerance, batch_size)
        r.update(energy=row["energy"], pointing=row["pointing"], top1=row["top1"], n=row["n"], empty=row["empty"],
                 layer=cm.target_layer)
        if progress:
            print(f"cam: {r['run']}: energy in box {r['energy']:.3f}, pointing {r['pointing']:.3f}, "
                  f"top-1 {r['top1']:.3f} ({row['n']} scenes)", flush=True)
    box_fraction = float(localisation_score(np.zeros((len(scenes), canvas, canvas)),
                                            [s.box for s in scenes]).box_fraction.mean())
    groups = []
    for key in dict.fromkeys((r["fusion"], r["b"]) for r in runs):
        members = [r for r in runs if (r["fusion"], r["b"]) == key]
        g = dict(fusion=key[0], b=key[1], seeds=[r["seed"] for r in members], n_runs=len(members))
        for k in ("energy", "pointing", "top1", "val_top1"):
            g[f"{k}_mean"], g[f"{k}_std"] = _mean_std([r[k] for r in members])
        groups.append(g)
    settings = dict(study=str(study), method=method, target=target, tolerance=tolerance, scenes=len(scenes),
                    split="val", canvas=canvas, target_layer=layer, box_fraction=box_fraction,
                    command=command or _study_command(study, out, limit, method, target, tolerance, grid_indices))
    result = StudyScore(runs, groups, skipped, settings)
    result.paths = _write_study(result, out, grid_indices, canvas, data_dir, method)
    return result


def _study_command(study: Path, out: Path, limit: int, method: str, target: str, tolerance: float,
                   grid: Sequence[int]) -> str:
    parts = ["openaff", "cam", "--study", str(study), "-o", str(out)]
    if limit != 2000:
        parts += ["--limit", str(limit)]
    if method != "gradcam":
        parts += ["--method", method]
    if target != "label":
        parts += ["--target-class", target]
    if tolerance:
        parts += ["--tolerance", f"{tolerance:g}"]
    if list(grid) != [0, 1, 2, 3, 4, 5]:
        parts += ["--grid-indices", ",".join(map(str, grid))]
    return shlex.join(parts)


def study_markdown(result: StudyScore) -> str:
    """The localisation table of :func:`score_study` in markdown."""
    s = result.settings
    best_e = max((g["energy_mean"] for g in result.groups if g["energy_mean"] is not None), default=None)
    best_p = max((g["pointing_mean"] for g in result.groups if g["pointing_mean"] is not None), default=None)
    tol = f" (grown by {s['tolerance']:g} px)" if s["tolerance"] else ""
    lines = [f"# Where the models look: localisation on fashion-mnist-scenes ({Path(s['study']).name})", "",
             f"`{s['command']}`", "",
             f"{s['method']} of the {'true' if s['target'] == 'label' else 'predicted'} class at `{s['target_layer']}`,"
             f" the first {s['scenes']} validation scenes ({s['canvas']}×{s['canvas']}). *Energy in box*: the share of "
             "the map's sum inside the item's box; *pointing*: the map's maximum inside the box"
             f"{tol}. In %, mean ± std over seeds; "
             f"a uniform map scores {100 * s['box_fraction']:.1f} % on both (the boxes' mean share of the canvas). "
             "Top-1: on the scored scenes; val top-1: the study's best epoch.", "",
             "| fusion | b | runs | energy in box | pointing | top-1 | val top-1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for g in result.groups:
        lines.append(f"| {g['fusion']} | {g['b'] if g['b'] is not None else '–'} | {g['n_runs']} | "
                     f"{_pm(g['energy_mean'], g['energy_std'], bold=g['energy_mean'] == best_e)} | "
                     f"{_pm(g['pointing_mean'], g['pointing_std'], bold=g['pointing_mean'] == best_p)} | "
                     f"{_pm(g['top1_mean'], g['top1_std'])} | {_pm(g['val_top1_mean'], g['val_top1_std'])} |")
    lines.append(f"| uniform map | | | {100 * s['box_fraction']:.1f} | {100 * s['box_fraction']:.1f} | | |")
    if result.skipped:
        lines += ["", f"Not scored: {'; '.join(result.skipped)}."]
    return "\n".join(lines) + "\n"


_CSV_FIELDS = ("run", "fusion", "b", "seed", "model", "n", "energy", "pointing", "top1", "val_top1", "empty", "layer")


def _write_study(result: StudyScore, out: Path, grid_indices: Sequence[int], canvas: int, data_dir: Any,
                 method: str) -> dict[str, Path]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in result.runs:
        writer.writerow({k: (f"{r[k]:.6f}" if isinstance(r.get(k), float) else r.get(k)) for k in _CSV_FIELDS})
    runs = [{k: v for k, v in r.items() if k != "folder"} for r in result.runs]
    doc = dict(settings=result.settings, groups=result.groups, runs=runs, skipped=result.skipped)
    paths = dict(md=out / "localisation.md", csv=out / "localisation.csv", json=out / "localisation.json",
                 grid=out / "grid.png")
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths["md"].write_text(study_markdown(result))
        paths["csv"].write_text(buf.getvalue())
        paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    except OSError as err:
        raise CamError(f"cannot write {out}: {err.strerror or err}") from None
    # Figure 6's layout: one column per fusion type (its lowest seed), maps of the predicted class.
    columns = {}
    for r in result.runs:
        columns.setdefault((r["fusion"], r["b"]), r)
    samples = scene_samples(list(grid_indices), canvas=canvas, data_dir=data_dir)
    titles = [f"{r['fusion']}" + (f" b{r['b']}" if len({k[1] for k in columns}) > 1 else "") + f" s{r['seed']}"
              for r in columns.values()]
    grid = gradcam_grid([str(r["folder"]) for r in columns.values()], samples, method=method, titles=titles,
                        title=f"{Path(result.settings['study']).name}: {method} of the predicted class "
                              "(box: the item; red: wrong)")
    _save(grid.figure, paths["grid"])
    return paths


# --- MS-CAM attention maps -------------------------------------------------------------------------------------

@dataclass
class AttentionMap:
    """The MS-CAM weights of one fusion block for one image (batch element 0).

    Attributes:
        name: module path of the MS-CAM (e.g. ``layer2.0.fusion.mscam``).
        stage: the top-level module it sits in (e.g. ``layer2``).
        channels: its channels C.
        weight: ``H x W``: the fusion weight ``w`` (in (0, 1)) averaged over channels.
        logit: ``H x W``: the pre-sigmoid total averaged over channels (``L + G`` for the adding MS-CAMs).
        branches: branch name (``local_att``, ``global_att``, ...) -> its output averaged over channels:
            ``H x W`` for a local branch, ``1 x 1`` for a global one.
        kinds: branch name -> ``"local"`` or ``"global"``.
        channel_logits: branch name -> its ``C`` per-channel outputs averaged over pixels.
        local_share: ``mean|L| / (mean|L| + mean|G|)`` for a local + global MS-CAM, else None.
    """

    name: str
    stage: str
    channels: int
    weight: np.ndarray
    logit: np.ndarray
    branches: dict[str, np.ndarray]
    kinds: dict[str, str]
    channel_logits: dict[str, np.ndarray]
    local_share: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclass
class AttentionResult:
    """What :func:`attention_maps` computed: the maps in forward order, the image, the figure."""

    maps: list[AttentionMap]
    display: np.ndarray
    model: str
    predicted: int
    score: float
    figure: Any = None
    path: Path | None = None


def _mscams(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers.mscam import MSCAM

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MSCAM)]


def attention_maps(model: Any, image: Any, *, weights: str | Path | None = None, output: str | Path | None = None,
                   model_kwargs: dict | None = None, img_size: int | None = None) -> AttentionResult:
    """The MS-CAM weights of every fusion block of ``model`` for one image, and their figure.

    Forward hooks on each MS-CAM's branches record their outputs (the fusions call the branches
    also where they fuse the sigmoid into the blend); ``w = sigmoid(A + B)``, or the concatenating
    MS-CAM's ``sigmoid(fuse_att(...))``, is formed from them. The model's output is unchanged.

    Args:
        model: a model (see :func:`load_model`) with at least one MS-CAM fusion (AFF, iAFF, MS-SE, ...).
        image: a path, :class:`Sample`, array or PIL image (the first image if several).
        weights: a weight source for a model given by name.
        output: the PNG to write (None: only build the figure).
        model_kwargs: ``timm.create_model`` keywords for a model built by name.
        img_size: input size (default: the model's own).

    Raises:
        CamError: the model has no MS-CAM (e.g. ``fusion="add"``).
    """
    cm = load_model(model, weights, model_kwargs=model_kwargs, img_size=img_size)
    found = _mscams(cm.model)
    if not found:
        raise CamError(f"{cm.label} has no MS-CAM fusion blocks (plain addition or concatenation): nothing to draw")
    sample = _as_samples(image)[0]
    display, x, _ = _preprocess(sample, cm)
    records: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in found}
    first_call: list[str] = []
    handles = []

    def hook(key: str, branch: str):  # noqa: ANN202
        def record(_m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            rec = records[key]
            if branch in rec:  # called again in the same pass (never by our fusions): keep the first call
                return
            if not rec:
                first_call.append(key)
                rec["_input_shape"] = torch.tensor(inputs[0].shape)
            # The fusions blend in place into the logits' buffers: keep a copy.
            rec[branch] = out.detach()[:1].float().clone()
        return record

    for name, m in found:
        for child, sub in m.named_children():
            if child == "fuse_att":  # the concatenating MS-CAM's projection: w = sigmoid(its output)
                handles.append(sub.register_forward_hook(hook(name, "_fuse")))
            elif child.endswith(("_att", "_att2")):
                handles.append(sub.register_forward_hook(hook(name, child)))
    try:
        with torch.no_grad():
            probs = torch.softmax(cm.model(x.to(next(cm.model.parameters()).device)).float(), 1)[0].cpu()
    finally:
        for h in handles:
            h.remove()
    maps = []
    for name in first_call:
        m = cm.model.get_submodule(name)
        rec = records[name]
        h, w = (int(v) for v in rec.pop("_input_shape")[2:])
        fused = rec.pop("_fuse", None)
        branch_names = [n for n in rec]
        kinds = {n: n.split("_att")[0] for n in branch_names}
        z = fused if fused is not None else rec[branch_names[0]] + rec[branch_names[1]]
        z = z.expand(1, z.shape[1], h, w)[0]
        share = None
        if sorted(kinds.values()) == ["global", "local"] and fused is None:
            loc = next(rec[n] for n in branch_names if kinds[n] == "local").abs().mean()
            glo = next(rec[n] for n in branch_names if kinds[n] == "global").abs().mean()
            share = float(loc / (loc + glo)) if float(loc + glo) > 0 else None
        maps.append(AttentionMap(
            name=name, stage=name.split(".")[0], channels=int(z.shape[0]),
            weight=torch.sigmoid(z).mean(0).numpy(), logit=z.mean(0).numpy(),
            branches={n: rec[n][0].mean(0).numpy() for n in branch_names}, kinds=kinds,
            channel_logits={n: rec[n][0].mean((1, 2)).numpy() for n in branch_names}, local_share=share))
    pred = int(probs.argmax())
    result = AttentionResult(maps, display, cm.label, pred, float(probs[pred]))
    result.figure = _attention_figure(result, cm, sample)
    if output is not None:
        result.path = _save(result.figure, output)
    return result


def _attention_figure(result: AttentionResult, cm: CamModel, sample: Sample) -> Any:
    from matplotlib.figure import Figure

    rows = len(result.maps)
    fig = Figure(figsize=(11.0, 2.2 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    stage = None
    for i, am in enumerate(result.maps):
        ax = axes[i][0]
        _show(ax, result.display)
        up = torch.nn.functional.interpolate(torch.from_numpy(am.weight)[None, None], size=result.display.shape[:2],
                                             mode="bilinear", align_corners=False)[0, 0].numpy()
        lo, hi = float(am.weight.min()), float(am.weight.max())
        # Each block's own range: w sits near 0.5 in most blocks, and a fixed [0, 1] scale would hide its pattern.
        ax.imshow(up, cmap="viridis", alpha=0.55, vmin=lo, vmax=max(hi, lo + 1e-6))
        ax.set_xticks([])
        ax.set_yticks([])
        head = "" if am.stage == stage else f"stage {am.stage}\n"
        stage = am.stage
        ax.set_ylabel(f"{head}{am.name.removeprefix(am.stage + '.')}", fontsize=7)
        ax.set_title("w over the image" if i == 0 else "", fontsize=8)
        ax = axes[i][1]
        im = ax.imshow(am.weight, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8)
        share = f"; local share {am.local_share:.2f}" if am.local_share is not None else ""
        ax.set_title(f"w, mean of {am.channels} ch, {am.size[0]}×{am.size[1]}: {lo:.2f}-{hi:.2f}{share}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        for k, (bname, bmap) in enumerate(am.branches.items()):
            ax = axes[i][2 + k]
            if bmap.shape == (1, 1):
                values = am.channel_logits[bname]
                ax.bar(np.arange(len(values)), values, width=1.0, color="tab:orange")
                ax.axhline(0, color="black", lw=0.5)
                ax.set_title(f"{bname} ({am.kinds[bname]}): per channel, mean {float(values.mean()):+.2f}",
                             fontsize=7)
                ax.tick_params(labelsize=6)
            else:
                lim = float(np.abs(bmap).max()) or 1.0
                im = ax.imshow(bmap, cmap="coolwarm", vmin=-lim, vmax=lim, interpolation="nearest")
                fig.colorbar(im, ax=ax, shrink=0.8)
                ax.set_title(f"{bname} ({am.kinds[bname]}): logits, mean over channels", fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
    truth = ""
    if sample.label is not None:
        truth = f", true {cm.class_name(_resolve_class(sample.label, cm, 'label'))}"
    fig.suptitle(f"{cm.label}: MS-CAM weights w = sigmoid(local + global) of every fusion block; {sample.name}: "
                 f"predicted {cm.class_name(result.predicted)} {result.score:.2f}{truth}", fontsize=9)
    return fig


# --- the commands ----------------------------------------------------------------------------------------------

def _indices(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep and lo:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"--indices: expected integers or ranges such as 0,3,5-7, got {part!r}") from None
    if not out:
        raise ConfigError("--indices: no index given")
    return out


def _model_kwargs(items: list[str]) -> dict:
    from .training.config import parse_kv

    try:
        return dict(parse_kv(t) for t in items)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"--model-kwargs: {err}") from None


def _samples_from_args(args: argparse.Namespace, canvas: int | None) -> list[Sample]:
    given = [bool(args.images), args.data is not None]
    if sum(given) != 1:
        raise ConfigError("give the images: image files/folders, or --data fashion-mnist-scenes|photos")
    if args.images:
        labels = None
        if args.labels:
            labels = [t.strip() for t in args.labels.split(",")]
            labels = [int(t) if t.lstrip("-").isdigit() else t for t in labels]
        return load_images(args.images, labels)
    if args.labels:
        raise ConfigError("--labels is for image files; the scenes know theirs and the photos have none")
    if args.data == "photos":
        names = [t.strip() for t in args.indices.split(",")] if args.indices else list(PHOTOS)
        if names and all(n.isdigit() for n in names):
            names = [PHOTOS[int(n)] if int(n) < len(PHOTOS) else n for n in names]
        return photo_samples(names)
    return scene_samples(_indices(args.indices or "0-3"), canvas=canvas or 64, split=args.split,
                         data_dir=args.data_dir)


def _target_arg(text: str | None) -> int | str:
    if text is None:
        return "predicted"
    return int(text) if text.lstrip("-").isdigit() else text


def _run_cam(args: argparse.Namespace) -> int:
    if args.study is not None:
        if args.models or args.images or args.data or args.weights:
            raise ConfigError("--study scores the study's own runs on its scenes; drop the models and images")
        target = _target_arg(args.target_class)
        if target not in ("label", "predicted") and args.target_class is not None:
            raise ConfigError("--study: --target-class must be label or predicted")
        grid = _indices(args.grid_indices) if args.grid_indices else [0, 1, 2, 3, 4, 5]
        result = score_study(args.study, args.output, limit=args.limit, method=args.method,
                             target="label" if args.target_class is None else target, tolerance=args.tolerance,
                             grid_indices=grid)
        print(study_markdown(result), end="")
        print(f"wrote {', '.join(str(p) for p in result.paths.values())}")
        return 0
    if not args.models:
        raise ConfigError("give at least one MODEL (a timm name, a run folder or a .safetensors file), or --study DIR")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise ConfigError(f"--weights: {len(args.weights)} sources for {len(args.models)} models "
                          "(one per model, 'none' for random weights)")
    kwargs = _model_kwargs(args.model_kwargs)
    titles = [t.strip() for t in args.titles.split(",")] if args.titles else None
    cms = [load_model(m, None if args.weights is None or args.weights[j] == "none" else args.weights[j],
                      model_kwargs=kwargs, img_size=args.img_size, target_layer=args.target_layer,
                      label=None if titles is None or j >= len(titles) else titles[j])
           for j, m in enumerate(args.models)]
    if titles is not None and len(titles) != len(cms):
        raise ConfigError(f"--titles: {len(titles)} titles for {len(cms)} models")
    samples = _samples_from_args(args, cms[0].input_size[1])
    grid = gradcam_grid(cms, samples, output=args.output, method=args.method, target=_target_arg(args.target_class))
    for i, s in enumerate(grid.samples):
        for j, cm in enumerate(cms):
            mark = {True: "", False: "  WRONG", None: ""}[grid.correct[i][j]]
            print(f"{s.name}\t{cm.label}\t{cm.class_name(int(grid.targets[i, j]))} {grid.scores[i, j]:.3f}{mark}")
    print(f"wrote {grid.path} ({len(grid.samples)} x {len(cms)} panels, {args.method} at "
          f"{', '.join(dict.fromkeys(cm.target_layer for cm in cms))})")
    return 0


def _run_attention(args: argparse.Namespace) -> int:
    kwargs = _model_kwargs(args.model_kwargs)
    cm = load_model(args.model, None if args.weights in (None, "none") else args.weights, model_kwargs=kwargs,
                    img_size=args.img_size)
    args.images = [args.image] if args.image else []
    samples = _samples_from_args(args, cm.input_size[1])
    if len(samples) != 1:
        raise ConfigError(f"openaff attention draws one image; {len(samples)} given (pick one with --indices)")
    result = attention_maps(cm, samples[0], output=args.output)
    for am in result.maps:
        share = f", local share {am.local_share:.2f}" if am.local_share is not None else ""
        print(f"{am.name}\t{am.size[0]}x{am.size[1]}\tw mean {float(am.weight.mean()):.3f} "
              f"(min {float(am.weight.min()):.3f}, max {float(am.weight.max()):.3f}){share}")
    print(f"wrote {result.path} ({len(result.maps)} MS-CAMs; predicted {cm.class_name(result.predicted)} "
          f"{result.score:.2f})")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATA_CHOICES, default=None,
                   help="built-in images: fashion-mnist-scenes (validation scenes with class and box) or photos "
                        "(scikit-image's astronaut, chelsea, coffee)")
    p.add_argument("--indices", default=None, help="scene indices, e.g. 0,1,2 or 0-7 (default 0-3; scenes are made "
                   "at the first model's input size); photo names for --data photos")
    p.add_argument("--split", choices=("val", "train"), default="val", help="scenes' split (default val)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the Fashion-MNIST idx files of the scenes (default: the Debian package's folder)")
    p.add_argument("--labels", default=None, help="true classes of the image files, comma-separated (index or name)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="timm.create_model arguments for models given by name, e.g. width_mult=0.25 in_chans=1")
    p.add_argument("--img-size", type=_positive_int, default=None, help="input side (default: the model's)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``openaff cam`` and ``openaff attention`` (those not added yet: both COMMANDS entries name this module)."""
    if "cam" not in subparsers.choices:
        _add_cam(subparsers)
    if "attention" not in subparsers.choices:
        _add_attention(subparsers)


def _add_cam(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cam", help="Grad-CAM grids (the paper's Figure 6) and a localisation score",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="timm model names, run folders, local-dir:DIR or .safetensors files (one grid column each)")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH", help="image files or folders (one row each)")
    _add_common(p)
    p.add_argument("--weights", nargs="+", default=None, metavar="W",
                   help="one weight source per MODEL ('none': random weights)")
    p.add_argument("--method", default="gradcam", help=f"CAM method: {' | '.join(METHODS)} (default gradcam)")
    p.add_argument("--target-layer", default=None, metavar="PATH",
                   help="module path of the CAM's layer (default: the last stage's output, per family)")
    p.add_argument("--target-class", default=None, metavar="K",
                   help="the class each map explains: predicted (default), label (the true class), an index or a name")
    p.add_argument("--titles", default=None, help="column titles, comma-separated")
    p.add_argument("--study", metavar="DIR", default=None,
                   help="score every finished run of an openaff study folder (localisation table + grid)")
    p.add_argument("--limit", type=_positive_int, default=2000, help="--study: scenes scored per run (default 2000)")
    p.add_argument("--tolerance", type=float, default=0.0, help="--study: pointing-game tolerance in pixels")
    p.add_argument("--grid-indices", default=None, help="--study: the grid's scenes (default 0-5)")
    p.add_argument("-o", "--output", default=None,
                   help="the grid PNG (default cam.png); with --study the folder (default DIR/cam)")
    p.set_defaults(func=lambda args: run_command("openaff cam", lambda: _run_cam(_default_out(args, "cam.png"))))


def _add_attention(subparsers: argparse._SubParsersAction) -> None:
    a = subparsers.add_parser("attention", help="MS-CAM attention maps of every fusion block for one image",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model", metavar="MODEL", help="timm model name, run folder, local-dir:DIR or .safetensors file")
    a.add_argument("image", nargs="?", default=None, metavar="IMAGE", help="an image file (or use --data)")
    _add_common(a)
    a.add_argument("--weights", default=None, metavar="W", help="weight source for a MODEL given by name")
    a.add_argument("-o", "--output", default="attention.png", help="the PNG to write (default attention.png)")
    a.set_defaults(func=lambda args: run_command("openaff attention", lambda: _run_attention(args)))


def _default_out(args: argparse.Namespace, default: str) -> argparse.Namespace:
    if args.output is None and args.study is None:
        args.output = default
    return args


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["cam", *sys.argv[1:]]))
