"""MXNet weight files without MXNet: a numpy reader and writer for NDArray-list (``.params``) files."""

from .ndarray import (
    MXNetFormatError,
    dump_ndarray_list,
    load_ndarray_list,
    load_params,
    normalize_name,
    save_ndarray_list,
)

__all__ = [
    "MXNetFormatError",
    "dump_ndarray_list",
    "load_ndarray_list",
    "load_params",
    "normalize_name",
    "save_ndarray_list",
]
