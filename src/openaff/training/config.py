"""Training configuration: one flat dataclass, filled from a YAML recipe and then from flags.

A recipe is a YAML mapping of :class:`TrainConfig` fields, loaded by name from the package's
``recipes/`` folder (``fashion-mnist-cpu``) or from a path. Every field is also a command-line
flag (``lr_base`` -> ``--lr-base``, booleans as ``--amp-flag/--no-amp-flag`` pairs); a flag
overrides the recipe, the recipe overrides the defaults below. The resolved configuration is
written to ``config.yaml`` in the output folder, which is itself a valid recipe.

Every value is checked in one place, :meth:`TrainConfig.__post_init__`, against the field's type
(the annotation) and range (the field's metadata: ``ge``/``gt``/``le``/``lt`` bounds, ``choices``,
or a ``check`` that asks timm), whether it comes from a recipe, a mapping, keyword arguments or a
flag. Integers must be integers (``epochs: 1.5`` is refused, not rounded), booleans must be YAML
booleans (``channels_last: "no"`` is refused), numbers must be finite, and for an optional field
``none``/``null`` means unset. A wrong value raises one :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import Field, asdict, dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, is_integer, is_number
from .schedules import SCHEDULES
from .tasks import task_for_model

__all__ = ["TrainConfig", "add_config_arguments", "config_from_args", "load_recipe", "make_config", "parse_kv",
           "parse_model_kwargs", "recipe_names", "to_yaml"]


def _f(default: Any, help: str, **kwargs) -> Any:  # noqa: A002  (mirrors argparse)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, **kwargs))
    return field(default=default, metadata=dict(help=help, **kwargs))


class _FieldError(ConfigError):
    """A wrong value of one field; ``detail`` is the message without the field's name (for flags)."""

    def __init__(self, name: str, detail: str, key: str | None = None) -> None:
        self.name, self.detail, self.key = name, detail, key
        super().__init__(f"{name}.{key} {detail}" if key else f"{name} {detail}")


# --- checks that ask the libraries (each returns the complaint, or None when the value is fine) ---

def _close(word: str, names: list[str]) -> str:
    near = difflib.get_close_matches(word, names, n=3)
    return f"; did you mean {' or '.join(near)}?" if near else ""


def _check_model(name: str) -> str | None:
    import timm

    # hf-hub:..., local-dir:... are resolved by timm.create_model itself.
    if ":" in name or timm.is_model(name):
        return None
    return f"must be a timm model name (openaff models, timm.list_models()), got {name!r}" + \
        _close(name, timm.list_models())


def _opt_name(opt: str) -> str:
    # timm: "lookahead_<name>" wraps <name> in Lookahead; names are case-insensitive.
    parts = opt.lower().split("_")
    return parts[1] if len(parts) == 2 and parts[0] == "lookahead" else opt.lower()


def _check_opt(opt: str) -> str | None:
    from timm.optim import list_optimizers

    names = list_optimizers()
    if _opt_name(opt) in names:
        return None
    return (f"must be a timm optimizer (timm.optim.list_optimizers(), optionally lookahead_NAME), got {opt!r}"
            + _close(opt.lower(), names))


def _check_sched(sched: str) -> str | None:
    if sched in SCHEDULES:  # timm's names the trainer can step per update (not plateau, none)
        return None
    why = "; plateau steps once per epoch on a metric, the trainer per update" if sched == "plateau" else \
        "; for a fixed learning rate use constant" if sched == "none" else _close(sched, list(SCHEDULES))
    return f"must be a timm scheduler that steps per update ({', '.join(SCHEDULES)}), got {sched!r}{why}"


def _check_auto_augment(spec: str) -> str | None:
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    # The dispatch of timm's create_transform (and of our in-memory pipeline): build it once to parse it.
    build = rand_augment_transform if spec.startswith("rand") else \
        augment_and_mix_transform if spec.startswith("augmix") else auto_augment_transform
    try:
        build(spec, dict(translate_const=100, img_mean=(124, 116, 104)))
    except (AssertionError, ValueError, KeyError, IndexError, TypeError):
        return (f"must be a timm AutoAugment spec (original, originalr, v0, v0r, 3a, with -mstdX), RandAugment "
                f"(rand-m9-mstd0.5) or AugMix (augmix-m5-w4-d2), got {spec!r}")
    return None


# model_kwargs are checked lightly (timm.create_model reports the rest); the ranges of the ones we know.
_MODEL_KWARGS: dict[str, tuple[type, dict]] = {
    "width_mult": (float, dict(gt=0)),
    "drop_rate": (float, dict(ge=0, lt=1)),
    "drop_path_rate": (float, dict(ge=0, lt=1)),
    "r": (int, dict(ge=1)),
    "b": (int, dict(ge=1)),
}


def _check_model_kwargs(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise _FieldError("model_kwargs", f"must map keyword names to values, got the key {key!r}")
        if key in _MODEL_KWARGS:
            tp, bounds = _MODEL_KWARGS[key]
            ok, _ = _scalar(value, tp, bounds)
            if not ok:
                raise _FieldError("model_kwargs", f"must be {_describe(tp, bounds)}, got {value!r}", key=key)


@dataclass
class TrainConfig:
    """Everything a training run depends on (plain data: it round-trips through YAML).

    Constructing one checks every field (see the module docstring) and raises :class:`ConfigError`.
    """

    # model
    model: str = _f("aff_cifar_resnet8", "timm model name (our models are registered on import)", check=_check_model)
    model_kwargs: dict = _f({}, "extra timm.create_model keywords, e.g. width_mult=0.5 drop_path_rate=0.1")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics across processes")
    # data
    data: str = _f("fashion-mnist", "fashion-mnist | fashion-mnist-scenes | cifar10 | cifar100 | imagefolder, "
                                    "or a data directory")
    data_dir: str | None = _f(None, "where the data set lives (default for fashion-mnist and its scenes: the "
                                    "Debian package)")
    cifar100_labels: str = _f("fine", "CIFAR-100 labels: fine (100 classes) or coarse (the paper's 20)",
                              choices=("fine", "coarse"))
    limit_train: int | None = _f(None, "use only the first N training images (quick runs, tests)", ge=1)
    limit_val: int | None = _f(None, "use only the first N validation images", ge=1)
    holdout: int | None = _f(None, "training images held out for validation, the test split scored once at the "
                                   "end (default: 5000 for fashion-mnist, its scenes and CIFAR with >= 20,000 "
                                   "training images, else 0; 0: validate on the test split, the authors' protocol)",
                             ge=0)
    limit_test: int | None = _f(None, "score only the first N test images (with a holdout)", ge=1)
    skip_corrupt: bool = _f(False, "skip and count unreadable images instead of stopping")
    workers: int | None = _f(None, "data loader worker processes per process (default: 0 for in-memory data sets, "
                                   "min(8, CPU cores per process) for image folders)", ge=0)
    img_size: int | None = _f(None, "input size (default: the data set's, 224 for image folders)", ge=1)
    crop_pct: float = _f(0.875, "evaluation centre-crop fraction for image folders (224/256)", gt=0, le=1)
    aug: str = _f("crop-flip", "none | crop-flip (pad, random crop, flip; on the batch) | imagenet "
                               "(random-resized crop, flip, colour jitter; per image) | scale-crop-flip "
                               "(segmentation: random scale 0.5-2, crop, flip of image and mask together)",
                  choices=("none", "crop-flip", "imagenet", "scale-crop-flip"))
    crop_padding: int = _f(4, "zero padding of the crop-flip random crop", ge=0)
    hflip: float = _f(0.5, "horizontal flip probability", ge=0, le=1)
    auto_augment: str | None = _f(None, "timm AutoAugment/RandAugment spec, e.g. original or rand-m9-mstd0.5",
                                  check=_check_auto_augment)
    color_jitter: float = _f(0.0, "colour jitter strength (imagenet augmentation)", ge=0)
    pca_lighting: float = _f(0.0, "AlexNet-style PCA lighting noise std (imagenet augmentation)", ge=0)
    random_erasing: float = _f(0.0, "random erasing probability", ge=0, le=1)
    mixup: float = _f(0.0, "mixup alpha (0: off)", ge=0)
    cutmix: float = _f(0.0, "cutmix alpha (0: off)", ge=0)
    mixup_off_epochs: int = _f(0, "switch mixup/cutmix off for the last N epochs", ge=0)
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)
    # optimisation
    epochs: int = _f(10, "training epochs", ge=1)
    batch_size: int = _f(128, "global batch size (split evenly over the processes)", ge=1)
    opt: str = _f("sgd", "timm optimizer name (sgd is Nesterov SGD, momentum plain SGD; adamw, lamb, ...)",
                  check=_check_opt)
    lr: float | None = _f(None, "learning rate (default: lr_base * batch_size / lr_base_size)", gt=0)
    lr_base: float = _f(0.1, "learning rate for a batch of lr_base_size (linear scaling rule)", gt=0)
    lr_base_size: int = _f(256, "batch size that lr_base refers to", ge=1)
    momentum: float = _f(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _f(1e-4, "weight decay (never on BN parameters and biases)", ge=0)
    sched: str = _f("cosine", "timm scheduler: cosine | multistep | step | poly | constant ... (per step)",
                    check=_check_sched)
    warmup_epochs: float = _f(0.0, "linear warm-up epochs (from warmup_lr)", ge=0)
    warmup_lr: float = _f(0.0, "learning rate at the start of the warm-up", ge=0)
    min_lr: float = _f(0.0, "final learning rate of the decay", ge=0)
    decay_milestones: list = _f([], "multistep: epochs where the lr is multiplied by decay_rate", type=int, ge=1)
    decay_rate: float = _f(0.1, "multistep/step decay factor", gt=0)
    grad_clip: float | None = _f(None, "clip the gradient norm to this value", gt=0)
    ema_decay: float = _f(0.0, "keep an exponential moving average of the weights (e.g. 0.9998; 0: off)", ge=0, lt=1)
    # speed
    amp: str = _f("none", "mixed precision", choices=("none", "bf16", "fp16"))
    channels_last: bool = _f(False, "NHWC memory layout")
    compile: bool = _f(False, "torch.compile the model")
    threads: int | None = _f(None, "CPU threads per process (torch.set_num_threads)", ge=1)
    cpu_alloc: str = _f("retain", "CPU runs: keep freed memory in the process, no page faults (openaff.cpu_memory; "
                        "glibc) or leave malloc as the system sets it", choices=("retain", "system"))
    device: str = _f("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    # run
    seed: int = _f(0, "seed of the initial weights, the data order and the augmentation", ge=0, le=2**32 - 1)
    deterministic: bool = _f(False, "deterministic kernels (torch.use_deterministic_algorithms)")
    output: str | None = _f(None, "output folder (default: a fresh runs/<model>-<data>-<YYYYmmdd-HHMMSS>; "
                                  "one that holds a run needs --overwrite)")
    checkpoint_every: int = _f(0, "also write last.pt every N steps (0: at the end of every epoch only)", ge=0)
    progress: bool = _f(True, "tqdm progress bars on the console")
    recipe: str | None = _f(None, "the recipe this configuration started from (for the record)")

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _check_field(f, getattr(self, f.name)))
        _check_combinations(self)

    @property
    def task(self) -> str:
        """The name of the model's task (:func:`openaff.training.tasks.task_for_model`): ``segment`` for a
        segmentation model (:mod:`openaff.segmentation`), else ``classify``.

        The model decides (a segmenter cannot classify), so it is not a setting of its own.
        """
        return task_for_model(self.model).name


# --- the type and range table -------------------------------------------------------------------

@cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _field_type(f: Field) -> tuple[Any, bool]:
    """``(int, True)`` for ``int | None``; ``(annotation, False)`` otherwise."""
    tp = _hints()[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None)), True
    return tp, False


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**53 else format(v, "g")


def _bounds_text(md: typing.Mapping) -> str:
    lo = ("[", md["ge"]) if "ge" in md else ("(", md["gt"]) if "gt" in md else None
    hi = ("]", md["le"]) if "le" in md else (")", md["lt"]) if "lt" in md else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _describe(tp: Any, md: typing.Mapping, optional: bool = False) -> str:
    """What a field accepts, in words: ``an integer >= 1 or none``."""
    if tp is bool:
        text = "true or false (a YAML boolean)"
    elif md.get("choices"):
        text = "one of " + ", ".join(md["choices"])
    elif tp is int:
        text = "an integer" + _bounds_text(md)
    elif tp is float:
        text = "a finite number" + _bounds_text(md)
    elif tp is str:
        text = "a non-empty string"
    elif tp is dict:
        text = "a mapping of timm.create_model keywords"
    elif tp is list:
        text = "a list of increasing integers" + _bounds_text(md)
    else:  # pragma: no cover  (a new field of a new type)
        text = f"a {tp.__name__}"
    return text + (" or none" if optional else "")


def _bounds(md: typing.Mapping) -> dict:
    return {k: v for k, v in md.items() if k in ("ge", "gt", "le", "lt")}


def _in_bounds(v: float, md: typing.Mapping) -> bool:
    return (("ge" not in md or v >= md["ge"]) and ("gt" not in md or v > md["gt"])
            and ("le" not in md or v <= md["le"]) and ("lt" not in md or v < md["lt"]))


def _scalar(value: Any, tp: Any, md: typing.Mapping) -> tuple[bool, Any]:
    """``(ok, normalised value)`` of an int/float/bool/str ``value`` against ``tp`` and ``md``."""
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        # bool is an int subclass (``epochs: yes``); 1.5 would be rounded somewhere downstream.
        ok = is_integer(value)
        return ok and _in_bounds(value, md), value
    if tp is float:
        ok = is_number(value) and math.isfinite(value)
        return ok and _in_bounds(value, md), float(value) if ok else value
    if tp is str:
        ok = isinstance(value, str) and value != ""
        return ok and (not md.get("choices") or value in md["choices"]), value
    raise TypeError(tp)  # pragma: no cover


def _check_field(f: Field, value: Any) -> Any:
    """``value`` normalised (ints of float fields become floats), or a :class:`_FieldError`."""
    tp, optional = _field_type(f)
    md = f.metadata
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    expected = _describe(tp, md, optional)
    if tp is dict:
        if not isinstance(value, dict):
            raise _FieldError(f.name, f"must be {expected}, got {value!r}")
        _check_model_kwargs(value)
        return dict(value)
    if tp is list:
        items = value if isinstance(value, list) else None
        if items is None or not all(_scalar(v, md.get("type", int), _bounds(md))[0] for v in items) \
                or any(a >= b for a, b in zip(items, items[1:], strict=False)):
            raise _FieldError(f.name, f"must be {expected}, got {value!r}")
        return list(items)
    ok, value = _scalar(value, tp, md)
    if not ok:
        raise _FieldError(f.name, f"must be {expected}, got {value!r}")
    if "check" in md:
        problem = md["check"](value)
        if problem:
            raise _FieldError(f.name, problem)
    return value


def _check_combinations(cfg: TrainConfig) -> None:
    """Values that are each fine but not together."""
    from timm.optim import get_optimizer_info

    info = get_optimizer_info(_opt_name(cfg.opt))
    if info.has_momentum and (info.defaults or {}).get("nesterov") and cfg.momentum == 0:
        raise _FieldError("momentum", f"must be > 0 with opt {cfg.opt} (Nesterov momentum), got 0.0; "
                                      "for SGD without momentum use opt momentum")


# --- recipes ------------------------------------------------------------------------------------

class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as the number YAML 1.2 says it is (1.1 wants ``1.0e-4``)."""


class _YAMLDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting a string that :class:`_YAMLLoader` would read as a number (``"1e5"``)."""


for _cls in (_YAMLLoader, _YAMLDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def dump_yaml(mapping: dict) -> str:
    """``mapping`` as a recipe that :func:`load_recipe` reads back as it is (keys in their order)."""
    return yaml.dump(mapping, Dumper=_YAMLDumper, sort_keys=False)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)  # noqa: S506  (a SafeLoader)


def recipe_names() -> list[str]:
    """Names of the recipes shipped with the package."""
    folder = resources.files("openaff") / "recipes"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict:
    """The mapping of a recipe, from a shipped name (``fashion-mnist-cpu``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"recipe file {name_or_path} {what}")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read recipe {name_or_path}: {err.strerror or err}") from None
    else:
        res = resources.files("openaff") / "recipes" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"unknown recipe {name_or_path!r}; choose one of {', '.join(recipe_names())} "
                              "or give a path to a .yaml file")
        text = res.read_text()
    try:
        data = _yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {name_or_path} is not valid YAML: {' '.join(str(err).split())}") from None
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
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(map(str, unknown))} (see openaff train --help)")
    try:
        return TrainConfig(**values)
    except _FieldError as err:
        if isinstance(source, str) and err.name not in overrides:
            raise ConfigError(f"recipe {source}: {err}") from None
        raise


# --- flags --------------------------------------------------------------------------------------

def parse_kv(text: str) -> tuple[str, Any]:
    """``"width_mult=0.5"`` -> ``("width_mult", 0.5)`` (the value is read as YAML)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, _yaml(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"the value of {key} is not valid YAML: {value!r}") from None


def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``--model-kwargs KEY=VALUE ...`` as ``timm.create_model`` keywords (values read as YAML).

    Raises:
        ConfigError: an item that is not ``KEY=VALUE`` or whose value is not YAML, naming the flag.
    """
    try:
        return dict(parse_kv(t) for t in items)
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"--model-kwargs: {err}") from None


def _from_text(text: str, tp: Any) -> Any:
    """A flag's text as the field's type where it reads as one; else the text (which the check refuses)."""
    try:
        return int(text) if tp is int else float(text) if tp is float else text
    except ValueError:
        return text


def _flag_type(f: Field, item: bool = False) -> Callable[[str], Any]:
    tp, optional = _field_type(f)

    def parse(text: str) -> Any:
        if item:  # one entry of a list flag; the order of the entries is checked with the whole list
            item_tp = f.metadata.get("type", int)
            ok, value = _scalar(_from_text(text, item_tp), item_tp, _bounds(f.metadata))
            if not ok:
                raise argparse.ArgumentTypeError(f"must be {_describe(tp, f.metadata)}, got {text!r}")
            return value
        try:
            return _check_field(f, _from_text(text, tp))
        except _FieldError as err:
            raise argparse.ArgumentTypeError(err.detail) from None

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field; unset flags stay out of the namespace.

    Each flag's value is checked by the field's own rule as it is parsed (``argument --epochs:
    must be an integer >= 1, got '1.5'``).
    """
    for f in fields(TrainConfig):
        if f.name == "recipe":
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"])
        tp, _ = _field_type(f)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tp is dict:
            kwargs.update(nargs="*", type=parse_kv, metavar="KEY=VALUE")
        elif tp is list:
            kwargs.update(nargs="*", type=_flag_type(f, item=True), metavar="N")
        else:
            kwargs["type"] = _flag_type(f)
            if "choices" in f.metadata:
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument(_flag(f.name), **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """Resolve ``--recipe`` (or ``base``) and the flags that were given into a :class:`TrainConfig`."""
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    flag_kwargs: dict = {}
    if "model_kwargs" in overrides:
        flag_kwargs = dict(overrides["model_kwargs"])
        recipe_kwargs = (base or {}).get("model_kwargs") or {}
        if getattr(args, "recipe", None):
            recipe_kwargs = load_recipe(args.recipe).get("model_kwargs") or {}
        overrides["model_kwargs"] = {**recipe_kwargs, **flag_kwargs}
    try:
        if base is not None:
            return make_config({**base, **overrides})
        return make_config(getattr(args, "recipe", None), **overrides)
    except _FieldError as err:
        # A value a flag gave (checked alone at parsing, refused here with the others): name the flag.
        if err.name in overrides and (err.name != "model_kwargs" or err.key is None or err.key in flag_kwargs):
            key = f"{err.key} " if err.key else ""
            raise ConfigError(f"argument {_flag(err.name)}: {key}{err.detail}") from None
        raise


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as a recipe."""
    return dump_yaml(asdict(cfg))
