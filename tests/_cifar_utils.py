"""CIFAR batches exactly as the official python archives hold them, and pickles that must be refused.

The official ``cifar-10-batches-py`` files were written by Python 2's cPickle with protocol 2:
every ``str`` (keys, file names, the dtype code) is a ``BINSTRING`` opcode, which Python 3 reads
as ``bytes`` with ``encoding="bytes"``, and the image array is rebuilt through
``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype``.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy 2: numpy._core.multiarray._reconstruct


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its opcodes can be chosen one by one
    """Protocol-2 pickles with Python 2's opcodes for strings and numpy's pre-2.0 module names.

    Args:
        file: the output stream.
        legacy_names: write ``numpy.core.multiarray`` (the official files) rather than numpy 2's
            ``numpy._core.multiarray``.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file: io.BytesIO, legacy_names: bool = True) -> None:
        super().__init__(file, protocol=2)
        self.legacy_names = legacy_names

    def _binstring(self, data: bytes) -> None:
        n = len(data)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + data)

    def save_bytes(self, obj: bytes) -> None:
        self._binstring(obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self._binstring(obj.encode("latin-1"))
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        if obj is _RECONSTRUCT:
            module = "numpy.core.multiarray" if self.legacy_names else _RECONSTRUCT.__module__
            self.write(pickle.GLOBAL + f"{module}\n_reconstruct\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def py2_dumps(obj: object, legacy_names: bool = True) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote the official CIFAR files."""
    buf = io.BytesIO()
    Py2Pickler(buf, legacy_names).dump(obj)
    return buf.getvalue()


def official_cifar10(root: Path, n_test: int = 20, n_train: int = 2, seed: int = 0,
                     legacy_names: bool = True) -> Path:
    """``root/cifar-10-batches-py`` with the official files (tiny batches) and their keys; returns root."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train
        batch = {"batch_label": f"{name.replace('_', ' ')} of 6", "labels": rng.integers(0, 10, n).tolist(),
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(py2_dumps(batch, legacy_names))
    meta = {"num_cases_per_batch": 10000, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(py2_dumps(meta, legacy_names))
    return root


class Reduce:
    """An object whose unpickling calls ``fn(*args)``: what a crafted pickle runs."""

    def __init__(self, fn: object, *args: object) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return self.fn, self.args
