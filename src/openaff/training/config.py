"""Training configuration: one flat dataclass, filled from a YAML recipe and then from flags.

A recipe is a YAML mapping of :class:`TrainConfig` fields, loaded by name from the package's
``recipes/`` folder (``fashion-mnist-cpu``) or from a path. Every field is also a command-line
flag (``lr_base`` -> ``--lr-base``, booleans as ``--amp-flag/--no-amp-flag`` pairs); a flag
overrides the recipe, the recipe overrides the defaults below. The resolved configuration is
written to ``config.yaml`` in the output folder, which is itself a valid recipe.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["TrainConfig", "add_config_arguments", "config_from_args", "load_recipe", "make_config", "parse_kv",
           "recipe_names", "to_yaml"]


def _f(default: Any, help: str, **kwargs) -> Any:  # noqa: A002  (mirrors argparse)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, **kwargs))
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class TrainConfig:
    """Everything a training run depends on (plain data: it round-trips through YAML)."""

    # model
    model: str = _f("aff_cifar_resnet8", "timm model name (our models are registered on import)")
    model_kwargs: dict = _f({}, "extra timm.create_model keywords, e.g. width_mult=0.5 drop_path_rate=0.1")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics across processes")
    # data
    data: str = _f("fashion-mnist", "fashion-mnist | cifar10 | cifar100 | imagefolder, or a data directory")
    data_dir: str | None = _f(None, "where the data set lives (default for fashion-mnist: the Debian package)")
    cifar100_labels: str = _f("fine", "CIFAR-100 labels: fine (100 classes) or coarse (the paper's 20)",
                              choices=("fine", "coarse"))
    limit_train: int | None = _f(None, "use only the first N training images (quick runs, tests)")
    limit_val: int | None = _f(None, "use only the first N validation images")
    skip_corrupt: bool = _f(False, "skip and count unreadable images instead of stopping")
    workers: int | None = _f(None, "data loader worker processes per process (default: 0 for in-memory data sets, "
                                   "min(8, CPU cores per process) for image folders)")
    img_size: int | None = _f(None, "input size (default: the data set's, 224 for image folders)")
    crop_pct: float = _f(0.875, "evaluation centre-crop fraction for image folders (224/256)")
    aug: str = _f("crop-flip", "none | crop-flip (pad, random crop, flip; on the batch) | imagenet "
                               "(random-resized crop, flip, colour jitter; per image)",
                  choices=("none", "crop-flip", "imagenet"))
    crop_padding: int = _f(4, "zero padding of the crop-flip random crop")
    hflip: float = _f(0.5, "horizontal flip probability")
    auto_augment: str | None = _f(None, "timm AutoAugment/RandAugment spec, e.g. original or rand-m9-mstd0.5")
    color_jitter: float = _f(0.0, "colour jitter strength (imagenet augmentation)")
    pca_lighting: float = _f(0.0, "AlexNet-style PCA lighting noise std (imagenet augmentation)")
    random_erasing: float = _f(0.0, "random erasing probability")
    mixup: float = _f(0.0, "mixup alpha (0: off)")
    cutmix: float = _f(0.0, "cutmix alpha (0: off)")
    mixup_off_epochs: int = _f(0, "switch mixup/cutmix off for the last N epochs")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    # optimisation
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "global batch size (split evenly over the processes)")
    opt: str = _f("sgd", "timm optimizer name (sgd is Nesterov SGD, momentum plain SGD; adamw, lamb, ...)")
    lr: float | None = _f(None, "learning rate (default: lr_base * batch_size / lr_base_size)")
    lr_base: float = _f(0.1, "learning rate for a batch of lr_base_size (linear scaling rule)")
    lr_base_size: int = _f(256, "batch size that lr_base refers to")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay (never on BN parameters and biases)")
    sched: str = _f("cosine", "timm scheduler: cosine | multistep | step | poly | constant ... (per step)")
    warmup_epochs: float = _f(0.0, "linear warm-up epochs (from warmup_lr)")
    warmup_lr: float = _f(0.0, "learning rate at the start of the warm-up")
    min_lr: float = _f(0.0, "final learning rate of the decay")
    decay_milestones: list = _f([], "multistep: epochs where the lr is multiplied by decay_rate", type=int)
    decay_rate: float = _f(0.1, "multistep/step decay factor")
    grad_clip: float | None = _f(None, "clip the gradient norm to this value")
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights (e.g. 0.9998; 0: off)")
    # speed
    amp: str = _f("none", "mixed precision", choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "NHWC memory layout")
    compile: bool = _f(False, "torch.compile the model")
    threads: int | None = _f(None, "CPU threads per process (torch.set_num_threads)")
    cpu_alloc: str = _f("retain", "CPU runs: keep freed memory in the process, no page faults (openaff.cpu_memory; "
                        "glibc) or leave malloc as the system sets it", choices=("retain", "system"))
    device: str = _f("auto", "auto | cpu | cuda")
    # run
    seed: int = _f(0, "seed of the initial weights, the data order and the augmentation")
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms)")
    output: str = _f("runs/train", "output folder")
    checkpoint_every: int = _f(0, "also write last.pt every N steps (0: at the end of every epoch only)")
    progress: bool = _f(True, "tqdm progress bars on the console")
    recipe: str | None = _f(None, "the recipe this configuration started from (for the record)")


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    folder = resources.files("openaff") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """The mapping of a recipe, from a shipped name (``fashion-mnist-cpu``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("openaff") / "recipes" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; choose one of {', '.join(recipe_names())} "
                              "or give a path to a .yaml file")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {name_or_path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {name_or_path} must be a mapping of settings")
    return data


def make_config(source: str | dict | None = None, /, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a recipe (name, path or mapping) and keyword overrides.

    Args:
        source: the starting point: a recipe name or path, a mapping of fields, or None (defaults).
        **overrides: field values that replace the recipe's.
    """
    values = load_recipe(source) if isinstance(source, str) else dict(source or {})
    if isinstance(source, str):
        values.setdefault("recipe", source)
    values.update(overrides)
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} (see openaff train --help)")
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
    for name in ("epochs", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not isinstance(cfg.model_kwargs, dict):
        raise ConfigError(f"model_kwargs must be a mapping, got {cfg.model_kwargs!r}")


def _base_type(tp: Any) -> Any:
    """``int`` for ``int | None``; the annotation itself otherwise."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def parse_kv(text: str) -> tuple[str, Any]:
    """``"width_mult=0.5"`` -> ``("width_mult", 0.5)`` (the value is read as YAML)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def _optional(tp: type) -> Any:
    # `--limit-train none` clears a recipe's value.
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else tp(text)

    parse.__name__ = tp.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field; unset flags stay out of the namespace."""
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "recipe":
            continue
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"])
        tp = _base_type(hints[f.name])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp is dict:
            kwargs.update(nargs="*", type=parse_kv, metavar="KEY=VALUE")
        elif tp is list:
            kwargs.update(nargs="*", type=f.metadata.get("type", str))
        else:
            kwargs["type"] = _optional(tp) if tp is not hints[f.name] else tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kwargs)


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """Resolve ``--recipe`` (or ``base``) and the flags that were given into a :class:`TrainConfig`."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if "model_kwargs" in overrides:
        recipe_kwargs = (base or {}).get("model_kwargs") or {}
        if getattr(args, "recipe", None):
            recipe_kwargs = load_recipe(args.recipe).get("model_kwargs") or {}
        overrides["model_kwargs"] = {**recipe_kwargs, **dict(overrides["model_kwargs"])}
    if base is not None:
        return make_config({**base, **overrides})
    return make_config(getattr(args, "recipe", None), **overrides)


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as a recipe."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
