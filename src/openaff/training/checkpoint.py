"""Resume checkpoints (``last.pt``) and the RNG states that make a resumed run exact.

``last.pt`` holds everything needed to resume (model, optimizer, scheduler, scaler, EMA, epoch,
step within the epoch, the metrics so far and every rank's RNG states) and is read with
``torch.load(weights_only=True)``: only tensors and plain Python values are stored. Atomic writes
and weight files are :mod:`openaff.files`'.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from ..files import atomic_write, file_format, load_torch_file

__all__ = ["get_rng_state", "load_checkpoint", "save_checkpoint", "set_rng_state"]


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically ``torch.save`` a resume state."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load a resume state written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    kind = file_format(path, "checkpoint")
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors weight file, not a resume checkpoint (last.pt)")
    return load_torch_file(path, "checkpoint")


def get_rng_state() -> dict:
    """This process's RNG states as tensors and plain values (safe for ``weights_only`` loading)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(torch=torch.get_rng_state(), python=random.getstate(),
                 numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos,
                            has_gauss=has_gauss, gauss=gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`get_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
