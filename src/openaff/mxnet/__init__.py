"""MXNet weight files without MXNet: a numpy reader and writer for NDArray-list (``.params``) files, and
the converter of the authors' weights into our models (``openaff convert``, :func:`convert_params`)."""

from .convert import ConversionError, convert_params
from .ndarray import (
    MXNetFormatError,
    dump_ndarray_list,
    load_ndarray_list,
    load_params,
    normalize_name,
    save_ndarray_list,
)

__all__ = ["ConversionError", "MXNetFormatError", "convert_params", "dump_ndarray_list", "load_ndarray_list",
           "load_params", "normalize_name", "save_ndarray_list"]
