"""Read and write MXNet NDArray-list files (Gluon ``.params`` weights) with numpy only.

MXNet has been retired to the Apache Attic, and no maintained library reads its weight files without
importing MXNet itself, whose last wheels predate current Python and numpy. The format is small, so it is
parsed here by hand, with every length checked against the bytes that remain, so that a damaged or hostile
file raises :class:`MXNetFormatError` instead of crashing, hanging or allocating memory the file cannot
back. The whole file is read into memory once; arrays are copied out of it.

Layout (everything little-endian)::

    uint64 0x112, uint64 reserved, uint64 N
    N arrays, each:
        uint32 magic     0xF993FAC8 v1 | 0xF993FAC9 v2 | 0xF993FACA v3 (numpy shapes) | else legacy
        int32  stype     v2/v3 only; 0 = dense (sparse arrays are rejected)
        shape            v1/v2/v3: uint32 ndim + int64 dims; legacy: the magic word *is* ndim, uint32 dims
        int32 dev_type, int32 dev_id   (ignored)
        int32  dtype flag, then prod(dims) elements of raw data
    uint64 K (0 or N), then K times: uint64 length + UTF-8 name

Choices that MXNet itself leaves open or that differ between its versions:

* "None" arrays. MXNet writes an uninitialised array as its shape alone: ndim 0 in v1/v2/legacy, ndim -1
  (or a dim of -1) in v3, with no context, dtype or data after it. Such an entry is read as an empty
  float32 array of shape ``(0,)``. In v3, ndim 0 is a real 0-d scalar with one element; the writer
  therefore refuses 0-d arrays for versions 0, 1 and 2, where they cannot be represented. A zero-size
  shape with ndim >= 1, e.g. ``(3, 0)``, is an ordinary array with context and dtype in every version, as
  the MXNet versions that wrote each layout saved it.
* float16 and bfloat16 data are upcast to float32; every other dtype is kept (native byte order).
* Bytes after the name table are an error: MXNet ignores them, but in a weight file they only ever mean
  that a count was misread or the file was damaged.
* Duplicate names are an error, since a dict would silently drop all but one of the arrays.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

__all__ = ["MXNetFormatError", "dump_ndarray_list", "load_ndarray_list", "load_params", "normalize_name",
           "save_ndarray_list"]

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
_MAGIC_VERSION = {V1_MAGIC: 1, V2_MAGIC: 2, V3_MAGIC: 3}
_VERSION_MAGIC = {v: m for m, v in _MAGIC_VERSION.items()}
MAX_NDIM = 32
BFLOAT16_FLAG = 12

# Flags from mshadow/base.h (TypeFlag). bfloat16 has no numpy dtype: its bits are read as uint16.
_FLAG_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("float64", np.dtype("<f8")),
    2: ("float16", np.dtype("<f2")),
    3: ("uint8", np.dtype("u1")),
    4: ("int32", np.dtype("<i4")),
    5: ("int8", np.dtype("i1")),
    6: ("int64", np.dtype("<i8")),
    7: ("bool", np.dtype("u1")),
    8: ("int16", np.dtype("<i2")),
    9: ("uint16", np.dtype("<u2")),
    10: ("uint32", np.dtype("<u4")),
    11: ("uint64", np.dtype("<u8")),
    BFLOAT16_FLAG: ("bfloat16", np.dtype("<u2")),
}
_KIND_SIZE_FLAGS = {
    ("f", 4): 0,
    ("f", 8): 1,
    ("f", 2): 2,
    ("u", 1): 3,
    ("i", 4): 4,
    ("i", 1): 5,
    ("i", 8): 6,
    ("b", 1): 7,
    ("i", 2): 8,
    ("u", 2): 9,
    ("u", 4): 10,
    ("u", 8): 11,
}

# The smallest possible array entry is a legacy "none" array: a single uint32 ndim word of 0.
_MIN_ARRAY_BYTES = 4
_U32, _I32, _U64 = struct.Struct("<I"), struct.Struct("<i"), struct.Struct("<Q")

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


class MXNetFormatError(ValueError):
    """Raised for any problem found in an MXNet NDArray-list file.

    Attributes:
        offset: byte offset in the file where the problem was found (None if it has no position).
        path: the file's path, when the source was a path.
        problem: the description without the path and offset prefix.
    """

    def __init__(self, problem: str, offset: int | None = None, path: str | None = None) -> None:
        self.problem = problem
        self.offset = offset
        self.path = path
        where = f"offset {offset}: " if offset is not None else "offset unknown: "
        super().__init__((f"{path}: " if path else "") + where + problem)


@dataclass(frozen=True, slots=True)
class _Entry:
    """One parsed array: its stored name (None when unnamed) and where its name table entry starts."""

    array: np.ndarray
    name: str | None
    name_offset: int | None


class _Reader:
    """Bounds-checked cursor over the file bytes."""

    def __init__(self, buf: memoryview, path: str | None) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, problem: str, offset: int | None = None) -> MXNetFormatError:
        return MXNetFormatError(problem, self.pos if offset is None else offset, self.path)

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > self.remaining:
            raise self.fail(f"truncated: {what} needs {nbytes} bytes but only {self.remaining} remain")

    def unpack(self, st: struct.Struct, what: str) -> int:
        self.need(st.size, what)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value


def _as_buffer(source: Source) -> tuple[memoryview, str | None]:
    """Returns the whole file as one memoryview (read once) and its path, if any."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).cast("B"), None
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return memoryview(source.read()), name if isinstance(name, str) else None
    path = os.fspath(source)
    return memoryview(Path(path).read_bytes()), str(path)


def _decode(view: np.ndarray, flag: int) -> np.ndarray:
    """Copies raw little-endian data into an independent native array, upcasting 16-bit floats."""
    if flag == 2:
        return view.astype(np.float32)
    if flag == BFLOAT16_FLAG:
        # bfloat16 is the top half of a float32, so shifting the bits up is exact.
        return (view.astype(np.uint32) << 16).view(np.float32)
    if flag == 7:
        return view != 0
    return view.astype(view.dtype.newbyteorder("="))


def _read_array(r: _Reader, index: int, count: int) -> np.ndarray:
    """Parses array `index` at the cursor."""
    start = r.pos
    label = f"array {index} of {count}"
    magic = r.unpack(_U32, f"{label} header")
    version = _MAGIC_VERSION.get(magic, 0)
    if version >= 2:
        stype = r.unpack(_I32, f"{label} storage type")
        if stype in (1, 2):
            kind = "row_sparse" if stype == 1 else "csr"
            raise r.fail(f"{label}: sparse arrays are not supported (storage type {stype}, {kind})", start)
        if stype != 0:
            raise r.fail(f"{label}: sparse arrays are not supported (unknown storage type {stype})", start)

    dims_at = r.pos
    if version == 0:
        # Legacy files have no magic: the first word is ndim and the dims are uint32.
        ndim = magic
        if ndim > MAX_NDIM:
            raise r.fail(
                f"{label}: unknown array magic 0x{magic:08X} (as a legacy ndim it would be {ndim} > {MAX_NDIM})",
                start,
            )
        r.need(4 * ndim, f"{label} shape ({ndim} uint32 dims)")
        dims = list(struct.unpack_from(f"<{ndim}I", r.buf, r.pos))
        r.pos += 4 * ndim
    else:
        ndim_at = r.pos
        ndim = r.unpack(_U32, f"{label} ndim")
        if version == 3 and ndim == 0xFFFFFFFF:
            return _none_array()  # ndim -1: unknown shape, MXNet stores nothing more
        if ndim > MAX_NDIM:
            raise r.fail(f"{label}: ndim {ndim} exceeds the maximum of {MAX_NDIM}", ndim_at)
        dims_at = r.pos
        r.need(8 * ndim, f"{label} shape ({ndim} int64 dims)")
        dims = list(struct.unpack_from(f"<{ndim}q", r.buf, r.pos))
        r.pos += 8 * ndim
    if version == 3 and -1 in dims:
        return _none_array()  # a dim of -1 is unknown in numpy-shape semantics: nothing more is stored
    for axis, dim in enumerate(dims):
        if dim < 0:
            raise r.fail(f"{label}: dimension {axis} is negative ({dim}) in shape {tuple(dims)}", dims_at)
    if ndim == 0 and version != 3:
        return _none_array()

    r.need(8, f"{label} context")
    r.pos += 8  # device type and id: arrays are always loaded onto the CPU here
    flag_at = r.pos
    flag = r.unpack(_I32, f"{label} dtype flag")
    if flag not in _FLAG_DTYPES:
        raise r.fail(f"{label}: unknown dtype flag {flag}", flag_at)
    dtype_name, dtype = _FLAG_DTYPES[flag]

    size = math.prod(dims)
    nbytes = size * dtype.itemsize
    if nbytes > r.remaining:
        raise r.fail(
            f"{label} (shape {tuple(dims)}, {dtype_name}) claims {size} elements ({nbytes} bytes) "
            f"but only {r.remaining} bytes remain",
            start,
        )
    if size == 0 and math.prod(d for d in dims if d) * dtype.itemsize > sys.maxsize:
        # numpy refuses even zero-size shapes whose other dims overflow the address space.
        raise r.fail(f"{label}: shape {tuple(dims)} is too large to represent", dims_at)
    view = np.frombuffer(r.buf, dtype=dtype, count=size, offset=r.pos).reshape(dims)
    r.pos += nbytes
    return _decode(view, flag)


def _none_array() -> np.ndarray:
    return np.empty((0,), dtype=np.float32)


def _parse(source: Source) -> tuple[list[_Entry], str | None]:
    """Parses a whole NDArray-list file into entries in file order."""
    buf, path = _as_buffer(source)
    r = _Reader(buf, path)
    if len(buf) >= 8:
        magic = _U64.unpack_from(buf, 0)[0]
        if magic != LIST_MAGIC:
            raise r.fail(f"not an MXNet NDArray list: magic 0x{magic:X}, expected 0x{LIST_MAGIC:X}", 0)
    r.need(24, "the list header")
    r.pos = 16  # the reserved word is ignored, as MXNet does
    count_at = r.pos
    count = r.unpack(_U64, "array count")
    # Bound N by what the file could possibly hold before looping, so a huge N fails at once.
    max_count = max(0, r.remaining - 8) // _MIN_ARRAY_BYTES
    if count > max_count:
        raise r.fail(
            f"array count {count} is impossible: only {r.remaining} bytes remain "
            f"(each array needs at least {_MIN_ARRAY_BYTES}, plus 8 for the name count)",
            count_at,
        )
    arrays = [_read_array(r, i, count) for i in range(count)]

    names_at = r.pos
    n_names = r.unpack(_U64, "name count")
    if n_names not in (0, count):
        raise r.fail(f"name count {n_names} is neither 0 nor the array count {count}", names_at)
    entries: list[_Entry] = []
    seen: dict[str, int] = {}
    for i, array in enumerate(arrays):
        if not n_names:
            entries.append(_Entry(array, None, None))
            continue
        name_at = r.pos
        length = r.unpack(_U64, f"name {i} length")
        if length > r.remaining:
            raise r.fail(f"name {i} claims {length} bytes but only {r.remaining} remain", name_at)
        raw = bytes(r.buf[r.pos : r.pos + length])
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise r.fail(f"name {i} is not valid UTF-8 ({exc.reason})", r.pos + exc.start) from None
        r.pos += length
        if name in seen:
            raise r.fail(f"duplicate name {name!r} (arrays {seen[name]} and {i})", name_at)
        seen[name] = i
        entries.append(_Entry(array, name, name_at))
    if r.remaining:
        raise r.fail(f"{r.remaining} trailing bytes after the name table")
    return entries, path


def load_ndarray_list(source: Source) -> dict[str, np.ndarray]:
    """Loads an MXNet NDArray-list file (``nd.save`` / Gluon ``save_parameters`` output).

    float16 and bfloat16 arrays are upcast to float32; other dtypes are kept. Every returned array is
    writable and owns its memory. Entries that MXNet stores as uninitialised ("none") come back as empty
    float32 arrays of shape ``(0,)``.

    Args:
        source: a path, the file's bytes, or a binary file object.

    Returns:
        name -> array in file order, names exactly as stored; ``"0"``, ``"1"``, ... for an unnamed list.

    Raises:
        MXNetFormatError: the file is not a valid dense NDArray list.
    """
    entries, _ = _parse(source)
    return {str(i) if e.name is None else e.name: e.array for i, e in enumerate(entries)}


_PREFIX_RE = re.compile(r"^(?:arg|aux):")
# A Gluon name scope is the block's lower-cased class name plus a counter ("affresnet0"), followed by
# "_" and the dotted attribute path, whose first segment is an identifier and which has at least one dot.
_SCOPE_RE = re.compile(r"^([a-z][a-z0-9_]*?[0-9])_([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)+)$")


def _split_scope(name: str) -> tuple[str, str] | None:
    match = _SCOPE_RE.match(name)
    return (match.group(1), match.group(2)) if match else None


def normalize_name(name: str) -> str:
    """Maps an old ``save_params`` name onto the ``save_parameters`` attribute path.

    Strips one ``arg:`` / ``aux:`` prefix, then a leading Gluon name scope (``affresnet0_``,
    ``resnetv1b0_``: lower-case letters/digits/underscores ending in a digit, then ``_``) but only when what
    follows is a dotted attribute path starting with an identifier, e.g. ``affresnet0_layer1.0.conv1.weight``
    -> ``layer1.0.conv1.weight``. Names without a dot (``resnetv10_conv0_weight``) and ordinary paths such
    as ``layer3.0.conv1.weight`` are returned unchanged. An attribute that itself looks like
    ``block1_conv.weight`` would lose ``block1_`` here; :func:`load_params` guards against that by stripping
    a scope only when every name in the file carries the same one.

    Args:
        name: a stored parameter name.

    Returns:
        The normalized name.
    """
    name = _PREFIX_RE.sub("", name, count=1)
    split = _split_scope(name)
    return split[1] if split else name


def load_params(source: Source) -> dict[str, np.ndarray]:
    """Loads a Gluon ``.params`` file with names normalized to attribute paths.

    Like :func:`load_ndarray_list` followed by :func:`normalize_name` on every key, except that the name
    scope is stripped only when all names share the same scope, as ``save_params`` writes them; a file
    with mixed names keeps its scopes (``arg:`` / ``aux:`` are always stripped).

    Args:
        source: a path, the file's bytes, or a binary file object.

    Returns:
        normalized name -> array in file order.

    Raises:
        MXNetFormatError: the file is invalid, or two names normalize to the same name.
    """
    entries, path = _parse(source)
    stored = [str(i) if e.name is None else e.name for i, e in enumerate(entries)]
    bare = [_PREFIX_RE.sub("", n, count=1) for n in stored]
    splits = [_split_scope(n) for n in bare]
    if splits and all(splits) and len({s[0] for s in splits if s}) == 1:
        bare = [s[1] for s in splits if s]
    out: dict[str, np.ndarray] = {}
    first: dict[str, int] = {}
    for i, (key, entry) in enumerate(zip(bare, entries, strict=True)):
        if key in first:
            j = first[key]
            raise MXNetFormatError(
                f"names {stored[j]!r} (array {j}) and {stored[i]!r} (array {i}) both normalize to {key!r}",
                entry.name_offset,
                path,
            )
        first[key] = i
        out[key] = entry.array
    return out


def _flag_for(array: np.ndarray) -> int:
    if array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16, when that package is in use
        return BFLOAT16_FLAG
    flag = _KIND_SIZE_FLAGS.get((array.dtype.kind, array.dtype.itemsize))
    if flag is None:
        raise TypeError(f"dtype {array.dtype} has no MXNet dtype flag")
    return flag


def dump_ndarray_list(
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    version: int = 2,
    names: bool = True,
    dtype_flags: Mapping[str | int, int] | None = None,
) -> bytes:
    """Serializes arrays as an MXNet NDArray list (dense, CPU context).

    Args:
        arrays: name -> array, or a sequence of arrays (always written unnamed).
        version: 1, 2 or 3 for the v1/v2/v3 array magic, 0 for the legacy layout (uint32 dims, no magic).
            0-d arrays need version 3; the legacy layout needs dims below 2**32.
        names: write the name table (a Mapping's keys); False writes an unnamed list.
        dtype_flags: per-array dtype flag overrides, keyed by name or index; the raw bytes are written
            under that flag, so the item sizes must match. Use it to write bfloat16 from uint16 bit patterns.

    Returns:
        The file's bytes.

    Raises:
        ValueError: unsupported version, or an array the chosen version cannot represent.
        TypeError: a dtype with no MXNet flag, or a non-str name.
    """
    if version not in (0, 1, 2, 3):
        raise ValueError(f"version must be 0 (legacy), 1, 2 or 3, not {version!r}")
    if isinstance(arrays, Mapping):
        all_keys: list[str] | None = list(arrays.keys())
        values = list(arrays.values())
        if not all(isinstance(k, str) for k in all_keys):
            raise TypeError("array names must be str")
    else:
        all_keys, values = None, list(arrays)
    keys = all_keys if names else None
    overrides = dict(dtype_flags or {})

    out = bytearray(struct.pack("<QQQ", LIST_MAGIC, 0, len(values)))
    for i, value in enumerate(values):
        array = np.asarray(value)
        flag = _flag_for(array)
        override = overrides.get(i)
        if all_keys is not None and all_keys[i] in overrides:
            override = overrides[all_keys[i]]
        if override is not None:
            if override not in _FLAG_DTYPES:
                raise ValueError(f"array {i}: unknown dtype flag {override}")
            if _FLAG_DTYPES[override][1].itemsize != array.dtype.itemsize:
                raise ValueError(f"array {i}: dtype {array.dtype} does not fit flag {override}")
            flag = override
        if array.ndim == 0 and version != 3:
            raise ValueError(f"array {i}: 0-d arrays need version 3 (in v{version} ndim 0 means 'none')")
        if array.ndim > MAX_NDIM:
            raise ValueError(f"array {i}: ndim {array.ndim} exceeds {MAX_NDIM}")
        if version == 0:
            if any(d >= 2**32 for d in array.shape):
                raise ValueError(f"array {i}: the legacy layout stores dims as uint32")
            out += struct.pack(f"<I{array.ndim}I", array.ndim, *array.shape)
        else:
            out += _U32.pack(_VERSION_MAGIC[version])
            if version >= 2:
                out += _I32.pack(0)  # dense storage
            out += struct.pack(f"<I{array.ndim}q", array.ndim, *array.shape)
        out += struct.pack("<iii", 1, 0, flag)  # context: cpu(0)
        data = np.ascontiguousarray(array)
        if data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        out += data.tobytes()
    if keys is None:
        out += _U64.pack(0)
    else:
        out += _U64.pack(len(keys))
        for key in keys:
            raw = key.encode("utf-8")
            out += _U64.pack(len(raw)) + raw
    return bytes(out)


def save_ndarray_list(
    path_or_file: str | os.PathLike[str] | IO[bytes],
    arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    version: int = 2,
    names: bool = True,
    dtype_flags: Mapping[str | int, int] | None = None,
) -> None:
    """Writes arrays as an MXNet NDArray-list file; see :func:`dump_ndarray_list`.

    Args:
        path_or_file: destination path or binary file object.
        arrays: name -> array, or a sequence of arrays (written unnamed).
        version: 0 (legacy), 1, 2 or 3.
        names: write the name table.
        dtype_flags: per-array dtype flag overrides, keyed by name or index.
    """
    data = dump_ndarray_list(arrays, version=version, names=names, dtype_flags=dtype_flags)
    if hasattr(path_or_file, "write"):
        path_or_file.write(data)
    else:
        Path(os.fspath(path_or_file)).write_bytes(data)
