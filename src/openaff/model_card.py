"""The model card (``README.md``) of a model folder, in the form timm's ``push_to_hf_hub`` writes.

Every folder in timm's hub layout that ``openaff convert`` and ``openaff train`` write (``config.json`` +
``model.safetensors``) gets a card, so the folder can be uploaded as it is (``openaff push DIR REPO``):
YAML front matter (``tags``, ``pipeline_tag``, ``library_name: timm``, ``license``, ``datasets``), then
``# Model card for NAME``, ``## Model Details``, ``## Model Usage`` and ``## Citation`` as in timm's
``generate_readme``. That function is private to timm and its output differs between the timm versions we
support (1.0.16 writes no ``pipeline_tag`` and knows only classification), so the body is written here in its
layout, and the front matter by ``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData` (the Hub's own
YAML rules).

The facts come from the folder itself (architecture, ``model_args``, input size, normalisation) and from the
model they rebuild: trainable parameters and GMACs of :func:`openaff.catalog.model_info` (multiply-adds of the
convolutions and linear layers at batch 1 and the folder's input size, counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device, FLOPs / 2). The writer adds what only it
knows: the run's numbers (:func:`write_run_card`) or the conversion's (:func:`write_conversion_card`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import hub
from .catalog import model_info
from .errors import CheckpointError
from .files import atomic_write

__all__ = ["CARD_NAME", "CITATION", "write_conversion_card", "write_model_card", "write_run_card"]

CARD_NAME = "README.md"
PAPER_URL = "https://arxiv.org/abs/2009.14082"
AUTHORS_REPO = "https://github.com/YimianDai/open-aff"
CITATION = """@inproceedings{dai2021attentional,
  title={Attentional Feature Fusion},
  author={Dai, Yimian and Gieseke, Fabian and Oehmcke, Stefan and Wu, Yiquan and Barnard, Kobus},
  booktitle={IEEE Winter Conference on Applications of Computer Vision (WACV)},
  year={2021},
  eprint={2009.14082},
  archivePrefix={arXiv}
}"""
# Data kinds of `openaff train` -> their Hugging Face Hub dataset names (the front matter's `datasets`).
HUB_DATASETS = {"fashion-mnist": "fashion_mnist", "cifar10": "cifar10", "cifar100": "cifar100"}
_SCORE_NAMES = {"val_top1": "top-1", "val_top5": "top-5", "val_miou": "mIoU", "val_pixel_acc": "pixel accuracy",
                "val_mean_acc": "mean class accuracy"}


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _details_markdown(details: Mapping[str, Any]) -> str:
    # timm's generate_readme layout: "- **Key:** value", lists and mappings one level down.
    lines = []
    for key, value in details.items():
        if isinstance(value, Mapping):
            lines.append(f"- **{key}:**")
            lines += [f"  - {k}: {_fmt(v)}" for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            lines.append(f"- **{key}:**")
            lines += [f"  - {_fmt(v)}" for v in value]
        else:
            lines.append(f"- **{key}:** {_fmt(value)}")
    return "\n".join(lines)


def write_model_card(directory: str | Path, *, description: str, facts: Mapping[str, Any],
                     datasets: Sequence[str] = (), data: str | None = None, license: str = "unknown",
                     license_note: str = "", pipeline_tag: str = "image-classification",
                     model_type: str = "Image classification / feature backbone") -> Path:
    """Write ``directory/README.md`` for the model folder ``directory`` (``config.json`` must be there).

    Args:
        directory: a folder in timm's hub layout.
        description: the paragraph under the title (what the weights are).
        facts: more ``Model Details`` entries (the run's or the conversion's numbers), in order.
        datasets: Hugging Face Hub dataset names for the front matter (none when not known).
        data: the ``Dataset`` entry in words (default: ``datasets`` joined).
        license: the front matter's licence identifier (``unknown`` when not known).
        license_note: what is known about the licence, in words.
        pipeline_tag: the Hugging Face Hub's task (a training run's: its task's ``pipeline_tag``).
        model_type: the ``Model Type`` entry.

    Returns:
        The card's path.

    Raises:
        CheckpointError: the folder has no readable ``config.json``, or the card cannot be written.
    """
    from huggingface_hub import ModelCardData

    directory = Path(directory)
    cfg = hub._read_config(directory)
    name, args, pcfg = cfg["architecture"], dict(cfg.get("model_args") or {}), dict(cfg["pretrained_cfg"])
    input_size = tuple(int(v) for v in pcfg["input_size"])
    info = model_info(name, input_size=input_size, **args)
    meta = ModelCardData(tags=[pipeline_tag, "timm", "openaff", "attentional-feature-fusion"],
                         pipeline_tag=pipeline_tag, library_name="timm", license=license,
                         datasets=list(datasets) or None)
    size = f"{input_size[1]} x {input_size[2]}"
    details: dict[str, Any] = {
        "Model Type": model_type,
        "Model Stats": {
            "Params (M)": f"{info.params / 1e6:.2f} ({info.params:,} trainable parameters)",
            "GMACs": f"{info.gmacs:.4g} (multiply-adds of the convolutions and linear layers at 1 x "
                     f"{' x '.join(map(str, input_size))}, torch.utils.flop_counter.FlopCounterMode, FLOPs / 2)",
            "Image size": size,
        },
        "Architecture": f"`{name}` (registered with timm by open-aff), model_args `{json.dumps(args, sort_keys=True)}`",
        "Input": f"{input_size[0]} channel{'s' if input_size[0] != 1 else ''}, {size}, mean {list(pcfg['mean'])}, "
                 f"std {list(pcfg['std'])}",
        "Classes": info.num_classes,
        "Papers": {"Attentional Feature Fusion (Dai, Gieseke, Oehmcke, Wu, Barnard, WACV 2021)": PAPER_URL},
        "Dataset": data or (", ".join(datasets) if datasets else "not recorded"),
        **facts,
        "License": f"{license}. {license_note}".strip(),
    }
    usage = ("```python\nimport timm\nimport openaff  # registers the models with timm\n\n"
             "model = timm.create_model(\"hf-hub:REPO_ID\", pretrained=True).eval()\n"
             "# or, from a copy of this folder: timm.create_model(\"local-dir:PATH\", pretrained=True)\n"
             "cfg = timm.data.resolve_data_config({}, model=model)\n"
             "transform = timm.data.create_transform(**cfg)\n```\n"
             "`REPO_ID` is the repository this folder was uploaded to (`openaff push DIR REPO_ID`). "
             "open-aff is installed from its source (see its README).")
    text = (f"---\n{meta.to_yaml()}\n---\n# Model card for {name}\n\n{description}\n\n## Model Details\n"
            f"{_details_markdown(details)}\n\n## Model Usage\n{usage}\n\n## Citation\n```bibtex\n{CITATION}\n```\n")
    path = directory / CARD_NAME
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as err:
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def write_run_card(directory: str | Path, cfg: Any, data: Any, history: Sequence[Mapping[str, Any]],
                   best_epoch: int, world_size: int = 1, *, task: Any) -> Path:
    """The card of a training run's folder (the best weights so far), rewritten after every epoch.

    Args:
        directory: the run folder (its ``config.json`` + ``model.safetensors`` are the best epoch's).
        cfg: the run's :class:`~openaff.training.config.TrainConfig`.
        data: its :class:`~openaff.training.data.DataBundle`.
        history: the rows of ``metrics.csv`` so far.
        best_epoch: the epoch (from 0) whose weights the folder holds.
        world_size: training processes.
        task: the run's :class:`~openaff.training.tasks.Task` (its metric, card scores, command, kind of model).
    """
    metric, label, scores = task.metric, task.metric_label, task.card_scores
    best = next(r for r in history if r["epoch"] == best_epoch)
    final = history[-1]
    kept = f"ema_{metric}" if cfg.ema_decay > 0 else metric  # the kept weights are the EMA's when EMA is on

    def numbers(row: Mapping[str, Any]) -> str:
        prefix = "ema_" if cfg.ema_decay > 0 else ""
        return ", ".join(f"{_SCORE_NAMES[k]} {row[prefix + k]:.2f} %" for k in scores if prefix + k in row)

    kind = data.kind
    labels = f", {cfg.cifar100_labels} labels" if kind == "cifar100" else ""
    source = Path(cfg.data_dir).name if kind == "imagefolder" and cfg.data_dir else kind
    facts = {
        "Results": {
            f"best validation {label} (these weights)": f"{best[kept]:.2f} % after epoch {best_epoch + 1}"
                                                        + (" (EMA weights)" if cfg.ema_decay > 0 else ""),
            f"epoch {best_epoch + 1}": numbers(best),
            f"last epoch ({final['epoch'] + 1} of {cfg.epochs} planned)": numbers(final),
        },
        "Training": {
            "command": f"{task.command} (recipe {cfg.recipe or 'none'}; the "
                       "run's config.yaml has every setting)",
            "schedule": f"{cfg.epochs} epochs, {cfg.sched}, warm-up {cfg.warmup_epochs:g} epochs",
            "optimizer": f"{cfg.opt}, lr {cfg.lr if cfg.lr is not None else f'{cfg.lr_base} per {cfg.lr_base_size}'}"
                         f", weight decay {cfg.weight_decay:g}, batch {cfg.batch_size} on {world_size} process(es)",
            "seed": cfg.seed,
        },
    }
    what = task.model_kind
    description = (f"An Attentional Feature Fusion {what} trained with open-aff on {source}"
                   f"{labels}: {data.train_size:,} training and {data.val_size:,} validation images, "
                   f"{data.num_classes} classes.")
    hub_name = HUB_DATASETS.get(kind)
    return write_model_card(directory, description=description, facts=facts, datasets=[hub_name] if hub_name else (),
                            pipeline_tag=task.pipeline_tag, model_type=task.model_type,
                            data=f"{source}{labels} ({data.train_size:,} train / {data.val_size:,} validation images)",
                            license_note="Weights trained with open-aff (Apache-2.0 code): their licence is set by "
                                         "whoever trained them, within the terms of the data set; edit `license` "
                                         "above before publishing.")


def write_conversion_card(directory: str | Path, *, source: str, sha256: str, arrays: int, family: str,
                          num_classes: int) -> Path:
    """The card of a folder ``openaff convert`` wrote from one of the authors' MXNet ``.params`` files.

    Args:
        directory: the converted folder.
        source: the MXNet file's name.
        sha256: its SHA-256.
        arrays: how many arrays the file holds (every one mapped onto exactly one tensor of the model).
        family: the authors' model family the names belong to (``resnet``, ``resnext``, ``cifar_resnet``, ...).
        num_classes: the classifier's size.
    """
    imagenet = family in ("resnet", "resnext") and num_classes == 1000
    facts = {
        "Original": f"{AUTHORS_REPO} (MXNet/Gluon)",
        "Conversion": {
            "source": f"`{source}` (MXNet NDArray list, the authors' {family} names)",
            "source sha256": sha256,
            "converted by": "openaff convert (no MXNet needed)",
            "match": f"all {arrays} arrays of the file mapped one to one onto the model's tensors, names and shapes "
                     "checked; the converter does not run MXNet, the project's tests compare the outputs with the "
                     "authors' MXNet models (rel. L2 error at most 2.8e-15 in float64, 2.3e-6 in float32, on "
                     "its fixtures)",
        },
    }
    data = "ImageNet-1k (the authors' training data)" if imagenet else \
        "not recorded in the file (the authors' small-image models were trained on CIFAR-10/100)"
    return write_model_card(directory, description=f"Weights of the MXNet/Gluon file `{source}` (the naming of the "
                            "authors' *Attentional Feature Fusion* models), converted to PyTorch by open-aff.",
                            facts=facts,
                            datasets=["imagenet-1k"] if imagenet else (), data=data,
                            license_note="No licence for the released weights is stated in the sources this project "
                                         f"used (the paper and the README of {AUTHORS_REPO}); ask the authors before "
                                         "redistributing them.")
