"""Class activation maps (``pytorch-grad-cam``): :func:`compute_cams` for a batch, :func:`gradcam_grid` for the
paper's Figure 6 (a row per image, a column per model), and the figure helpers the other drawings share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .images import Sample, _as_samples, _preprocess
from .models import CamError, CamModel, _resolve_class, load_model

__all__ = ["METHODS", "CamGrid", "compute_cams", "gradcam_grid"]

# --method -> pytorch_grad_cam class name (the ones that need nothing beyond a model and a layer).
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM", "xgradcam": "XGradCAM",
           "layercam": "LayerCAM", "eigencam": "EigenCAM", "eigengradcam": "EigenGradCAM", "scorecam": "ScoreCAM",
           "gradcamelementwise": "GradCAMElementWise"}


def _cam_class(method: str) -> type:
    key = method.lower()
    if key not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        import pytorch_grad_cam
    except ImportError:
        raise ConfigError("CAMs need pytorch-grad-cam: pip install open-aff[cam]") from None
    return getattr(pytorch_grad_cam, METHODS[key])


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
