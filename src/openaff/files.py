"""Files: atomic writes, the "can I write here?" checks, the umask, and weight files (safetensors, PyTorch).

Weight files are read with safetensors or ``torch.load(weights_only=True)``, never with a full
unpickler; what cannot be read gets one :class:`~openaff.errors.CheckpointError` line saying what
the file is (empty, MXNet, damaged, holding Python objects). Training's resume checkpoints build on
these in :mod:`openaff.training.checkpoint`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .errors import CheckpointError, ConfigError

__all__ = ["atomic_write", "check_output_file", "check_output_folder", "current_umask", "file_format",
           "load_torch_file", "load_weights", "probe_folder", "save_weights", "write_output_file"]


def current_umask() -> int:
    """The process umask, read without changing it.

    ``/proc/self/status`` says it; ``os.umask()`` can only read it by setting it, which races other
    threads creating files meanwhile, so it is the fallback only where ``/proc`` does not say.
    """
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
        return 0o666 & ~current_umask()


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


def write_output_file(path: str | Path, text: str, flag: str) -> None:
    """Write a command's output file (``--json``, ``--markdown``) atomically, creating its folder.

    Args:
        path: the file.
        text: its content.
        flag: the option that named it, for the message.

    Raises:
        ConfigError: ``cannot write <flag> <path>: <reason>``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as err:
        raise ConfigError(f"cannot write {flag} {path}: {err.strerror or err}") from None


def probe_folder(folder: str | Path) -> None:
    """Create a file in ``folder`` and remove it again: whether the folder takes new files, by a real write.

    ``os.access`` answers from the permission bits, which root passes even where it cannot write (a
    read-only mount, /proc, /sys); only a write tells.

    Raises:
        OSError: the folder does not take new files (or does not exist).
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".openaff-write-test.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)


def check_output_folder(folder: str | Path, what: str = "the output folder") -> None:
    """Create ``folder`` (and its parents) if needed and check by a real write that files can be made in it.

    Args:
        folder: the folder a command writes into.
        what: how the messages name it.

    Raises:
        ConfigError: ``cannot write to <what> <folder>: <reason>``.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe_folder(folder)
    except OSError as err:
        raise ConfigError(f"cannot write to {what} {folder}: {err.strerror or err}") from None


def check_output_file(path: str | Path, flag: str, *, example: str | None = None, make_parents: bool = False) -> None:
    """Refuse, before any work, an output file that cannot be written, in one line that names ``flag``.

    The file is written atomically (a temporary file in its folder, renamed over it), so its folder
    must take new files: checked by a real write (:func:`probe_folder`), right for root too. An
    existing file must open for writing.

    Args:
        path: the file a command will write.
        flag: the option that names it, for the messages (``"--json"``, ``"-o"``).
        example: a file name to suggest when ``path`` is a folder.
        make_parents: the command creates missing folders; the first one that exists must take them.

    Raises:
        ConfigError: ``path`` is a folder, its folder is missing or not a folder, or it cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        hint = f", e.g. {path / example}" if example else ""
        raise ConfigError(f"{flag} {path} is a directory; give a file name{hint}")
    parent = path.parent
    while make_parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"cannot write {flag} {path}: {parent} is not a folder")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {flag} {path}: folder {parent} does not exist")
    try:
        probe_folder(parent)
    except OSError as err:
        raise ConfigError(f"cannot write {flag} {path}: cannot create files in {parent} "
                          f"({err.strerror or err})") from None
    if path.exists():
        try:
            open(path, "a").close()  # opens for writing without changing it
        except OSError as err:
            raise ConfigError(f"cannot write {flag} {path}: {err.strerror or err}") from None


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


def file_format(path: Path, what: str) -> str:
    """The format of an existing ``path`` from its first bytes (safetensors, zip, pickle or unknown).

    Args:
        path: the file.
        what: what it should be, for the messages (``"weight"``, ``"checkpoint"``).

    Raises:
        CheckpointError: a directory, an unreadable or empty file, or an MXNet file (which no loader here reads).
    """
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


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` whose failures say what the file is, never to load it unsafely.

    Args:
        path: the file.
        what: what it should be, for the messages (``"weight file"``, ``"checkpoint"``).

    Raises:
        CheckpointError: not a PyTorch file, damaged or truncated, or holding Python objects.
    """
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
    kind = file_format(path, "weight")
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
    obj = load_torch_file(path, "weight file")
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


def read_yaml_mapping(path: str | Path) -> tuple[dict | None, str]:
    """The YAML mapping in ``path``, or None and why not (the reader's error on one line, or ``"not a mapping"``),
    for the caller to raise in its own words."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return None, " ".join(str(err).split())
    return (data, "") if isinstance(data, dict) else (None, "not a mapping")
