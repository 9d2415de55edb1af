"""Model facts: the registered models with their parameters and compute (``openaff models``).

Compute is counted with ``torch.utils.flop_counter`` on the meta device (no memory, no time):
the multiply-adds of convolutions and linear layers, the convention of the paper and of most
ResNet tables ("GFLOPs" there means 10^9 multiply-adds). BatchNorm, activations, pooling and the
element-wise fusion arithmetic are not counted.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import ConfigError, run_command

__all__ = ["ModelInfo", "list_openaff_models", "model_info", "models_table"]


@dataclass
class ModelInfo:
    name: str
    params: int
    gmacs: float
    input_size: tuple[int, int, int]
    num_classes: int


def list_openaff_models(pattern: str = "*") -> list[str]:
    """Names of the models this package registers with timm (filtered by a shell-style ``pattern``)."""
    ours = set(timm.list_models(module=["aff_resnet", "aff_cifar", "aff_inception"]))
    return [n for n in timm.list_models(pattern) if n in ours]


def model_info(name: str, input_size: tuple[int, int, int] | None = None, **kwargs) -> ModelInfo:
    """Trainable parameters and multiply-adds of one model at its default (or the given) input size.

    Args:
        name: a timm model name.
        input_size: ``(C, H, W)`` to count at (default: the model's ``pretrained_cfg``, with ``in_chans``).
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``).
    """
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    model.eval()
    cfg = model.pretrained_cfg
    if input_size is not None:
        input_size = tuple(int(v) for v in input_size)
    else:
        input_size = tuple(cfg["input_size"])
        if "in_chans" in kwargs:
            input_size = (kwargs["in_chans"], *input_size[1:])
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, *input_size, device="meta"))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelInfo(name, params, counter.get_total_flops() / 2e9, input_size, model.num_classes)


def models_table(names: list[str]) -> str:
    """A markdown table of :func:`model_info` for ``names``."""
    rows = ["| model | params | GMACs | input |", "|---|---:|---:|---|"]
    for name in names:
        info = model_info(name)
        rows.append(f"| `{name}` | {info.params:,} | {info.gmacs:.2f} | {'x'.join(map(str, info.input_size))} |")
    return "\n".join(rows)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the registered models with parameters and GMACs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'aff_*50*'")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=lambda args: run_command("openaff models", lambda: _run(args)))


def _run(args: argparse.Namespace) -> int:
    names = list_openaff_models(args.pattern)
    if not names:
        raise ConfigError(f"no model of openaff matches {args.pattern!r} (openaff models lists them all; patterns are "
                          "shell-style, e.g. 'aff_*50*')")
    if args.json:
        print(json.dumps([asdict(model_info(n)) for n in names], indent=1))
    else:
        print(models_table(names))
    return 0
