"""Tests for the hand-written MXNet NDArray-list reader and writer (openaff.mxnet.ndarray)."""

from __future__ import annotations

import io
import json
import math
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from _mxnet_fixtures import CIFAR, COMPACT, COMPACT_FILES, SHARED_FILES, needs_shared
from hypothesis import given, settings
from hypothesis import strategies as st

from openaff.mxnet import MXNetFormatError, load_params, normalize_name
from openaff.mxnet.ndarray import dump_ndarray_list, load_ndarray_list, save_ndarray_list  # the list format itself

# The compact fixtures live in the project, so the module-level reads below work in any clone.
SMALL = COMPACT / "aff_cifar_resnet_b1_c1_k10.params"
SMALL_BYTES = SMALL.read_bytes()
FP16 = COMPACT / "aff_cifar_resnet_b1_c1_k10.fp16.params"

# No example database: it would write a .hypothesis folder into the shared tree.
PROPERTY = settings(max_examples=60, deadline=None, database=None)

V1, V2, V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_ITEMSIZE = {0: 4, 1: 8, 2: 2, 3: 1, 4: 4, 5: 1, 6: 8, 7: 1, 8: 2, 9: 2, 10: 4, 11: 8, 12: 2}


def _scan_v2(data: bytes) -> tuple[list[dict[str, int]], int, list[int]]:
    """Walks a v2 file independently of the reader: per-array field offsets, the name table and names."""
    pos, arrays = 24, []
    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        magic, _stype, ndim = struct.unpack_from("<IiI", data, pos)
        assert magic == V2
        dims = struct.unpack_from(f"<{ndim}q", data, pos + 12)
        flag_at = pos + 12 + 8 * ndim + 8
        flag = struct.unpack_from("<i", data, flag_at)[0]
        data_at = flag_at + 4
        end = data_at + math.prod(dims) * _ITEMSIZE[flag]
        arrays.append({"start": pos, "ndim_at": pos + 8, "flag": flag, "data_at": data_at, "end": end})
        pos = end
    names_at, name_offsets = pos, []
    pos += 8
    for _ in arrays:
        name_offsets.append(pos)
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
    assert pos == len(data)
    return arrays, names_at, name_offsets


SMALL_ARRAYS, SMALL_NAMES_AT, SMALL_NAME_OFFSETS = _scan_v2(SMALL_BYTES)


def _keys_file(params: Path) -> Path:
    own = params.with_name(params.name.replace(".params", ".keys.json"))
    # The large fp16 file shares the key listing of its float32 twin; the compact one has its own.
    return own if own.exists() else params.with_name(params.name.replace(".fp16", "").replace(".params", ".keys.json"))


# ---------------------------------------------------------------------------------------------------------
# Real fixtures: the compact set always, the large set where ../shared is present

FIXTURE_FILES = [COMPACT / f"{stem}.params" for stem in COMPACT_FILES]
FIXTURE_FILES += [pytest.param(CIFAR / f"{stem}.params", marks=needs_shared) for stem in SHARED_FILES]


def test_compact_fixture_files_present() -> None:
    assert sorted(p.name for p in COMPACT.glob("*.params")) == sorted(f"{s}.params" for s in COMPACT_FILES)


@needs_shared
def test_shared_fixture_files_present() -> None:
    assert sorted(p.name for p in CIFAR.glob("*.params")) == sorted(f"{s}.params" for s in SHARED_FILES)


def _fixture_id(p: object) -> str:
    return p.name if isinstance(p, Path) else str(p)


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=_fixture_id)
def test_fixture_names_and_shapes(path: Path) -> None:
    arrays = load_ndarray_list(path)
    expected = json.loads(_keys_file(path).read_text())
    assert [[k, list(v.shape)] for k, v in arrays.items()] == [[k, list(s)] for k, s in expected]
    for array in arrays.values():
        assert array.dtype == np.float32
        assert array.flags.writeable and array.flags.owndata and array.flags.c_contiguous
    # Normalization leaves save_parameters names alone.
    assert list(load_params(path)) == list(arrays)


def test_fixture_sources_agree() -> None:
    by_path = load_ndarray_list(SMALL)
    for source in (str(SMALL), SMALL_BYTES, bytearray(SMALL_BYTES), io.BytesIO(SMALL_BYTES)):
        other = load_ndarray_list(source)
        assert list(other) == list(by_path)
        assert all(np.array_equal(other[k], by_path[k]) for k in by_path)


def test_arrays_are_independent_of_the_buffer() -> None:
    buf = bytearray(SMALL_BYTES)
    first = next(iter(load_ndarray_list(buf).values()))
    before = first.copy()
    buf[SMALL_ARRAYS[0]["data_at"] : SMALL_ARRAYS[0]["end"]] = bytes(
        SMALL_ARRAYS[0]["end"] - SMALL_ARRAYS[0]["data_at"]
    )
    assert np.array_equal(first, before)
    first[...] = 7  # writable


def test_fp16_fixture_upcasts_to_float32() -> None:
    data = FP16.read_bytes()
    raw, _, _ = _scan_v2(data)
    arrays = load_ndarray_list(FP16)
    names = list(arrays)
    assert len(raw) == len(names)
    flags = {name: info["flag"] for name, info in zip(names, raw, strict=True)}
    convs = [n for n in names if arrays[n].ndim == 4]
    stats = [n for n in names if n.endswith(("running_mean", "running_var", "gamma", "beta"))]
    assert convs and stats
    assert all(flags[n] == 2 for n in convs)  # stored as float16 ...
    assert all(flags[n] == 0 for n in stats)
    assert all(arrays[n].dtype == np.float32 for n in names)  # ... returned as float32
    for name, info in zip(names, raw, strict=True):
        if info["flag"] == 2:
            count = (info["end"] - info["data_at"]) // 2
            stored = np.frombuffer(data, "<f2", count, info["data_at"]).astype(np.float32)
            assert np.array_equal(arrays[name].ravel(), stored)


# ---------------------------------------------------------------------------------------------------------
# Round trips through the writer

DTYPES = [np.float32, np.float64, np.uint8, np.int32, np.int8, np.int64, np.bool_, np.int16, np.uint16]
DTYPES += [np.uint32, np.uint64]


def _sample(dtype: type, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def _round_trip_set(version: int) -> dict[str, np.ndarray]:
    shapes: list[tuple[int, ...]] = [(2, 3), (5,), (1, 2, 3, 4), (0,), (3, 0, 2)]
    if version == 3:
        shapes.append(())
    arrays = {}
    for i, dtype in enumerate([*DTYPES, np.float16]):
        for j, shape in enumerate(shapes):
            arrays[f"block{i}.{j}.{np.dtype(dtype).name}"] = _sample(dtype, shape, 10 * i + j)
    arrays["ünïcode.wéight"] = np.ones((2, 2), np.float32)
    return arrays


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_round_trip_named(version: int) -> None:
    arrays = _round_trip_set(version)
    loaded = load_ndarray_list(dump_ndarray_list(arrays, version=version))
    assert list(loaded) == list(arrays)
    for key, original in arrays.items():
        got = loaded[key]
        expected_dtype = np.float32 if original.dtype == np.float16 else original.dtype
        assert got.dtype == expected_dtype, key
        assert got.shape == original.shape, key
        assert np.array_equal(got, original.astype(expected_dtype)), key


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_round_trip_unnamed(version: int) -> None:
    arrays = [np.arange(6, dtype=np.int64).reshape(2, 3), np.linspace(0, 1, 4, dtype=np.float64)]
    for data in (
        dump_ndarray_list(arrays, version=version),
        dump_ndarray_list(dict(a=arrays[0], b=arrays[1]), version, names=False),
    ):
        loaded = load_ndarray_list(data)
        assert list(loaded) == ["0", "1"]
        assert np.array_equal(loaded["0"], arrays[0]) and np.array_equal(loaded["1"], arrays[1])


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_round_trip_empty_list(version: int) -> None:
    data = dump_ndarray_list({}, version=version)
    assert data == struct.pack("<QQQQ", 0x112, 0, 0, 0)
    assert load_ndarray_list(data) == {}


def test_writer_handles_big_endian_and_non_contiguous_input() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    arrays = {"be": base.astype(">f8"), "t": base.T, "s": base[:, ::2]}
    loaded = load_ndarray_list(dump_ndarray_list(arrays))
    for key, value in arrays.items():
        assert np.array_equal(loaded[key], value)
        assert loaded[key].dtype == np.float64 and loaded[key].dtype.isnative


def test_writer_bytes_match_the_documented_layout() -> None:
    x = np.array([[1.5, -2.0, 3.0]], dtype=np.float32)
    payload = x.tobytes()
    tail = struct.pack("<Q", 1) + struct.pack("<Q", 3) + b"w.x"
    head = struct.pack("<QQQ", 0x112, 0, 1)
    ctx_flag = struct.pack("<iii", 1, 0, 0)
    expected = {
        0: struct.pack("<III", 2, 1, 3),
        1: struct.pack("<IIqq", V1, 2, 1, 3),
        2: struct.pack("<IiIqq", V2, 0, 2, 1, 3),
        3: struct.pack("<IiIqq", V3, 0, 2, 1, 3),
    }
    for version, shape in expected.items():
        assert dump_ndarray_list({"w.x": x}, version=version) == head + shape + ctx_flag + payload + tail


def test_save_to_path_and_file(tmp_path: Path) -> None:
    arrays = {"a": np.arange(3, dtype=np.int32)}
    save_ndarray_list(tmp_path / "x.params", arrays, version=3)
    buf = io.BytesIO()
    save_ndarray_list(buf, arrays, version=3)
    assert (tmp_path / "x.params").read_bytes() == buf.getvalue()
    assert np.array_equal(load_ndarray_list(tmp_path / "x.params")["a"], arrays["a"])


def test_writer_rejects_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="version"):
        dump_ndarray_list({"a": np.zeros(1)}, version=4)
    for version in (0, 1, 2):
        with pytest.raises(ValueError, match="0-d"):
            dump_ndarray_list({"a": np.float32(1.0)}, version=version)
    with pytest.raises(TypeError, match="complex"):
        dump_ndarray_list({"a": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError):
        dump_ndarray_list({1: np.zeros(2)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="does not fit"):
        dump_ndarray_list({"a": np.zeros(2, np.float32)}, dtype_flags={"a": 12})


BF16_VALUES = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 65280.0, 2.0**-126], dtype=np.float32)
BF16_BITS = (BF16_VALUES.view(np.uint32) >> 16).astype("<u2")  # these values are exact in bfloat16


def test_bfloat16_hand_built() -> None:
    array = struct.pack("<IiIq", V2, 0, 1, len(BF16_BITS)) + struct.pack("<iii", 1, 0, 12) + BF16_BITS.tobytes()
    data = struct.pack("<QQQ", 0x112, 0, 1) + array + struct.pack("<QQ", 1, 4) + b"bf16"
    loaded = load_ndarray_list(data)["bf16"]
    assert loaded.dtype == np.float32
    assert np.array_equal(loaded, BF16_VALUES)
    assert np.signbit(loaded[4])
    # The writer's flag override produces the same bytes.
    assert dump_ndarray_list({"bf16": BF16_BITS}, dtype_flags={"bf16": 12}) == data


def _file(arrays: list[bytes], names: list[bytes] | None = None) -> bytes:
    head = struct.pack("<QQQ", 0x112, 0, len(arrays))
    table = struct.pack("<Q", 0 if names is None else len(names))
    for name in names or []:
        table += struct.pack("<Q", len(name)) + name
    return head + b"".join(arrays) + table


_ONE_I32 = struct.pack("<IiIq", V2, 0, 1, 1) + struct.pack("<iiii", 1, 0, 4, 42)


@pytest.mark.parametrize(
    "none_entry",
    [
        struct.pack("<I", 0),  # legacy: ndim word 0
        struct.pack("<II", V1, 0),
        struct.pack("<IiI", V2, 0, 0),
        struct.pack("<IiI", V3, 0, 0xFFFFFFFF),  # v3: ndim -1
        struct.pack("<IiIqq", V3, 0, 2, 3, -1),  # v3: an unknown dim
    ],
    ids=["legacy", "v1", "v2", "v3-ndim", "v3-dim"],
)
def test_none_arrays_read_as_empty_and_stop_the_entry(none_entry: bytes) -> None:
    loaded = load_ndarray_list(_file([none_entry, _ONE_I32], [b"none", b"next"]))
    assert loaded["none"].shape == (0,) and loaded["none"].dtype == np.float32
    assert loaded["next"].tolist() == [42]


def test_v3_zero_dim_is_a_scalar() -> None:
    entry = struct.pack("<IiI", V3, 0, 0) + struct.pack("<iii", 1, 0, 1) + struct.pack("<d", 2.5)
    loaded = load_ndarray_list(_file([entry], [b"s"]))["s"]
    assert loaded.shape == () and loaded.dtype == np.float64 and loaded == 2.5


def test_legacy_hand_built() -> None:
    entry = struct.pack("<III", 2, 2, 1) + struct.pack("<iii", 2, 1, 6) + struct.pack("<qq", -5, 2**40)
    loaded = load_ndarray_list(_file([entry], [b"legacy"]))["legacy"]
    assert loaded.dtype == np.int64 and loaded.tolist() == [[-5], [2**40]]


# ---------------------------------------------------------------------------------------------------------
# Name normalization


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ("arg:layer1.0.conv1.weight", "layer1.0.conv1.weight"),
        ("aux:features.1.running_mean", "features.1.running_mean"),
        ("affresnet0_layer1.0.conv1.weight", "layer1.0.conv1.weight"),
        ("arg:affresnet0_layer1.0.conv1.weight", "layer1.0.conv1.weight"),
        ("aux:resnetv1b0_features.2.running_var", "features.2.running_var"),
        ("aff_resnet0_fc.weight", "fc.weight"),
        ("layer3.0.conv1.weight", "layer3.0.conv1.weight"),
        ("features.5.2.attention.global_att2.4.bias", "features.5.2.attention.global_att2.4.bias"),
        ("resnetv10_conv0_weight", "resnetv10_conv0_weight"),  # no dotted path after the scope
        ("conv1_1.weight", "conv1_1.weight"),  # the remainder would start with a digit
        ("fc.weight", "fc.weight"),
        ("0", "0"),
        ("arg:aux:x.y", "aux:x.y"),  # only one prefix is stripped
    ],
)
def test_normalize_name(stored: str, expected: str) -> None:
    assert normalize_name(stored) == expected


def test_load_params_scoped_file_matches_plain_file() -> None:
    plain = load_params(SMALL)
    scoped = {
        ("aux:" if "running" in k else "arg:") + "affresnet0_" + k: v for k, v in load_ndarray_list(SMALL).items()
    }
    loaded = load_params(dump_ndarray_list(scoped, version=2))
    assert list(loaded) == list(plain)
    assert all(np.array_equal(loaded[k], plain[k]) for k in plain)


def test_load_params_keeps_scopes_unless_every_name_shares_one() -> None:
    arrays = {"block1_conv.weight": np.zeros(1), "arg:layer1.0.weight": np.zeros(1)}
    assert list(load_params(dump_ndarray_list(arrays))) == ["block1_conv.weight", "layer1.0.weight"]
    assert normalize_name("block1_conv.weight") == "conv.weight"  # the per-name rule alone would strip it


def test_load_params_unnamed() -> None:
    assert list(load_params(dump_ndarray_list([np.zeros(1), np.ones(2)]))) == ["0", "1"]


def test_load_params_collision_names_both() -> None:
    data = dump_ndarray_list({"arg:a.w": np.zeros(1), "aux:a.w": np.ones(1)})
    with pytest.raises(MXNetFormatError) as info:
        load_params(data)
    message = str(info.value)
    assert "offset" in message and "'arg:a.w'" in message and "'aux:a.w'" in message
    assert info.value.offset is not None and data[info.value.offset + 8 :].startswith(b"aux:a.w")


# ---------------------------------------------------------------------------------------------------------
# Errors

# Layout of BASE (v2): array "a" (2x3 float32) at 24, array "b" (3 int64) at 88, name count at 144,
# name 0 length at 152, name 1 length at 161, end at 170.
BASE = dump_ndarray_list({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3)}, version=2)


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


ERROR_CASES = {
    "list magic": (_patch(BASE, 0, "<Q", 0x113), 0, "not an MXNet NDArray list"),
    "short header": (BASE[:10], 0, "list header"),
    "huge count": (_patch(BASE, 16, "<Q", 10**15), 16, "array count"),
    "count 2**64-1": (_patch(BASE, 16, "<Q", 2**64 - 1), 16, "array count"),
    "sparse": (_patch(BASE, 88 + 4, "<i", 1), 88, "sparse arrays are not supported"),
    "unknown stype": (_patch(BASE, 88 + 4, "<i", 7), 88, "sparse arrays are not supported"),
    "absurd ndim": (_patch(BASE, 24 + 8, "<I", 33), 32, "ndim 33"),
    "legacy garbage magic": (_patch(BASE, 88, "<I", 0xDEADBEEF), 88, "unknown array magic"),
    "negative dim": (_patch(BASE, 36 + 8, "<q", -3), 36, "negative"),
    "v3 dim -2": (_patch(_patch(BASE, 24, "<I", V3), 44, "<q", -2), 36, "negative"),
    "huge dim": (_patch(BASE, 36, "<q", 2**63 - 1), 24, "bytes remain"),
    "huge zero-size shape": (_patch(_patch(BASE, 36, "<q", 0), 44, "<q", 2**62), 36, "too large"),
    "unknown dtype": (_patch(BASE, 60, "<i", 99), 60, "unknown dtype flag 99"),
    "name count": (_patch(BASE, 144, "<Q", 3), 144, "neither 0 nor"),
    "name length": (_patch(BASE, 161, "<Q", 2**63 - 1), 161, "name 1 claims"),
    "utf-8": (BASE[:160] + b"\xff" + BASE[161:], 160, "UTF-8"),
    "duplicate names": (BASE[:169] + b"a", 161, "duplicate name 'a'"),
    "trailing bytes": (BASE + b"\0\0\0", 170, "3 trailing bytes"),
    "truncated data": (BASE[:130], 88, "bytes remain"),
    "truncated shape": (BASE[:40], 36, "truncated"),
    "truncated name table": (BASE[:165], 161, "truncated"),
}


def test_base_layout() -> None:
    arrays, names_at, name_offsets = _scan_v2(BASE)
    assert [a["start"] for a in arrays] == [24, 88] and names_at == 144 and name_offsets == [152, 161]
    assert len(BASE) == 170


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_name_offset_and_problem(case: str) -> None:
    data, offset, text = ERROR_CASES[case]
    with pytest.raises(MXNetFormatError) as info:
        load_ndarray_list(data)
    assert info.value.offset == offset
    assert f"offset {offset}" in str(info.value)
    assert text in str(info.value)
    assert info.value.path is None
    assert isinstance(info.value, ValueError)


def test_error_carries_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.params"
    path.write_bytes(BASE[:50])
    with pytest.raises(MXNetFormatError) as info:
        load_ndarray_list(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Property-based robustness on a real file


@PROPERTY
@given(length=st.integers(0, len(SMALL_BYTES) - 1))
def test_truncation_always_raises_format_error(length: int) -> None:
    with pytest.raises(MXNetFormatError, match="offset"):
        load_ndarray_list(SMALL_BYTES[:length])


def _header_regions() -> list[tuple[int, int]]:
    regions = [(0, 200), (SMALL_NAMES_AT, len(SMALL_BYTES))]
    regions += [(max(0, a["start"] - 4), a["data_at"] + 4) for a in SMALL_ARRAYS]
    return regions


HEADER_REGIONS = _header_regions()


@PROPERTY
@given(data=st.data())
def test_header_corruption_loads_or_raises_format_error(data: st.DataObject) -> None:
    buf = bytearray(SMALL_BYTES)
    for _ in range(data.draw(st.integers(1, 4))):
        lo, hi = data.draw(st.sampled_from(HEADER_REGIONS))
        at = data.draw(st.integers(lo, hi - 1))
        patch = data.draw(st.binary(min_size=1, max_size=8))
        buf[at : at + len(patch)] = patch
    try:
        loaded = load_ndarray_list(bytes(buf))
    except MXNetFormatError as exc:
        assert "offset" in str(exc)
    else:
        assert all(isinstance(v, np.ndarray) for v in loaded.values())


def _inflate(data: st.DataObject) -> tuple[int, str, int]:
    kind = data.draw(st.sampled_from(["count", "names", "ndim", "dim", "name_len"]))
    big64 = st.integers(2**24, 2**63 - 1)
    if kind == "count":
        return 16, "<Q", data.draw(big64)
    if kind == "names":
        return SMALL_NAMES_AT, "<Q", data.draw(big64)
    if kind == "name_len":
        return data.draw(st.sampled_from(SMALL_NAME_OFFSETS)), "<Q", data.draw(big64)
    array = data.draw(st.sampled_from(SMALL_ARRAYS))
    if kind == "ndim":
        return array["ndim_at"], "<I", data.draw(st.integers(33, 2**32 - 1))
    ndim = struct.unpack_from("<I", SMALL_BYTES, array["ndim_at"])[0]
    return array["ndim_at"] + 4 + 8 * data.draw(st.integers(0, ndim - 1)), "<q", data.draw(big64)


@PROPERTY
@given(data=st.data())
def test_inflated_counts_fail_fast_without_big_allocations(data: st.DataObject) -> None:
    offset, fmt, value = _inflate(data)
    buf = bytearray(SMALL_BYTES)
    struct.pack_into(fmt, buf, offset, value)
    tracemalloc.start()
    try:
        with pytest.raises(MXNetFormatError, match="offset"):
            load_ndarray_list(buf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(SMALL_BYTES)
