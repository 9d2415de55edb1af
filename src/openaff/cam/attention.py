"""MS-CAM attention maps (``openaff attention``): the fusion weights ``w`` of every fusion block and its two
branches' contributions for one image (:func:`attention_maps`), read with forward hooks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers.mscam import MSCAM
from .gradcam import _save, _show
from .images import Sample, _as_samples, _preprocess
from .models import CamError, CamModel, _resolve_class, load_model

__all__ = ["AttentionMap", "AttentionResult", "attention_maps"]


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
