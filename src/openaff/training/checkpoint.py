"""Atomic checkpoints, weight files and the RNG states that make a resumed run exact.

``last.pt`` holds everything needed to resume (model, optimizer, scheduler, scaler, EMA, epoch,
step within the epoch, the metrics so far and every rank's RNG states) and is read with
``torch.load(weights_only=True)``: only tensors and plain Python values are stored. Weight files
are read with safetensors or ``weights_only=True``, never with a full unpickler.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import CheckpointError

__all__ = ["atomic_write", "get_rng_state", "load_checkpoint", "load_weights", "save_checkpoint", "save_weights",
           "set_rng_state"]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that ``path`` holds either its old or its complete new content, even after a crash.

    A temporary file in the same directory is written, flushed and fsynced, renamed over
    ``path`` with ``os.replace`` (atomic on POSIX), and the directory is fsynced so that the
    rename itself survives a power loss.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomically ``torch.save`` a resume state."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load a resume state written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling error means an unusable file)
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Atomically write weights as safetensors, with ``metadata`` (JSON-encoded values) in the header."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    blob = save(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()})
    atomic_write(path, lambda f: f.write(blob))


def _strip(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers prefix every key.
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_weights(path: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model state dict and its metadata from a safetensors file or a PyTorch/timm checkpoint.

    Args:
        path: ``.safetensors``, or a ``.pt``/``.pth``/``.bin`` holding a state dict or a dict with
            one under ``state_dict``, ``model``, ``state_dict_ema`` or ``model_ema`` (timm, ours).
        use_ema: prefer the EMA weights of a checkpoint that has both.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weight file {path} does not exist")
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                raw = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read safetensors file {path}: {err}") from None
        for k, v in raw.items():
            try:
                metadata[k] = json.loads(v)
            except json.JSONDecodeError:
                metadata[k] = v
        return _strip(sd), metadata
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint: {err}") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ("state_dict_ema", "model_ema", "ema", "state_dict", "model") if use_ema else \
               ("state_dict", "model", "state_dict_ema", "model_ema", "ema")
        found = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if found is None:
            raise CheckpointError(f"{path} has no state dict (looked for {', '.join(keys)})")
        if isinstance(obj.get("config"), dict):
            metadata = {k: obj["config"].get(k) for k in ("model", "model_kwargs")}
        obj = obj[found]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return _strip(obj), metadata


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
