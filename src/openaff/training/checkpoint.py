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
import re
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .errors import CheckpointError

__all__ = ["atomic_write", "get_rng_state", "load_checkpoint", "load_weights", "save_checkpoint", "save_weights",
           "set_rng_state"]


def _umask() -> int:
    # /proc reads the umask without setting it; os.umask() sets it while it reads, racing other threads.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: an existing file's own, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that ``path`` holds either its old or its complete new content, even after a crash.

    A temporary file in the same directory is written, flushed and fsynced, renamed over
    ``path`` with ``os.replace`` (atomic on POSIX), and the directory is fsynced so that the
    rename itself survives a power loss. The file gets the permissions a plain ``open()`` would
    give it (mkstemp's 0600 would hide runs from the other users of a shared file system).

    Args:
        path: the file to write.
        write: writes the content to the binary file object it is given.
    """
    path = Path(path)
    mode = _open_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
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
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    kind = _check_file(path, "checkpoint")
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors weight file, not a resume checkpoint (last.pt)")
    return _torch_load(path, "checkpoint")


_MXNET_LIST_MAGIC = 0x112
# Where torch's weights-only unpickler names the global it refused.
_REFUSED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _sniff(path: Path) -> str:
    """The format of ``path`` from its first bytes: empty, mxnet, safetensors, zip, pickle or unknown."""
    with path.open("rb") as f:
        head = f.read(16)
    size = path.stat().st_size
    if not head:
        return "empty"
    if len(head) >= 8 and struct.unpack_from("<Q", head)[0] == _MXNET_LIST_MAGIC:
        return "mxnet"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack_from("<Q", head)[0] <= size - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"  # torch.save's default format
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"  # torch.save's legacy format starts with a pickled magic number
    return "unknown"


def _check_file(path: Path, what: str) -> str:
    """The sniffed format of an existing ``path``; one clear error for what no loader can read."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a {what} file")
    try:
        kind = _sniff(path)
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if kind == "empty":
        raise CheckpointError(f"{what} {path} is empty (0 bytes): the program that wrote it did not finish")
    if kind == "mxnet":
        raise CheckpointError(f"{path} is an MXNet file (the authors' .params format): convert it first with "
                              f"openaff convert {path} -o WEIGHTS.safetensors")
    return kind


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` whose failures say what the file is, never to load it unsafely."""
    kind = _sniff(path)
    if kind == "unknown":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or safetensors file (unknown format; "
                              "damaged, or some other kind of file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (any unpickling error means an unusable file)
        text = str(err)
        refused = _REFUSED.search(text)
        if refused:
            raise CheckpointError(f"{path} refused: it holds the Python object {refused.group(1)}, and only "
                                  "tensors and plain values are loaded (weights-only)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        if (kind == "zip" and "PytorchStreamReader" in text) or "EOF" in text or "truncated" in text:
            raise CheckpointError(f"{what} {path} is damaged or truncated: {first.split('. ')[0]}") from None
        if "weights_only" in text or "Weights only" in text:
            # Stray bytes that happen to start like a pickle: torch's advice to unpickle fully would be wrong.
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (damaged, or some other kind of file)") \
                from None
        raise CheckpointError(f"cannot read {what} {path}: {first}") from None


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
    if not path.exists():
        raise CheckpointError(f"weight file {path} does not exist")
    kind = _check_file(path, "weight")
    metadata: dict[str, Any] = {}
    if path.suffix == ".safetensors" or kind == "safetensors":
        try:
            sd = load_file(str(path))
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
    obj = _torch_load(path, "weight file")
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = ("state_dict_ema", "model_ema", "ema", "state_dict", "model") if use_ema else \
               ("state_dict", "model", "state_dict_ema", "model_ema", "ema")
        found = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        if found is None:
            raise CheckpointError(f"{path} has no state dict (looked for {', '.join(keys)})")
        if isinstance(obj.get("config"), dict):
            # A resume checkpoint: its run configuration says what was trained on what.
            metadata = {k: obj["config"][k] for k in ("model", "model_kwargs", "data", "data_dir", "img_size")
                        if obj["config"].get(k) is not None}
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
