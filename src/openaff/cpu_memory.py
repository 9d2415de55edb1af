"""Keep freed memory in the process, so that CPU steps stop page-faulting (glibc malloc).

PyTorch's CPU allocator takes every activation from ``malloc``. glibc serves large blocks with
``mmap`` and gives freed memory back to the kernel (``munmap``, heap trimming), so the next forward
pass touches fresh pages and the kernel zeroes every one of them. Measured on the 2-core
development VM (fp32, batch 8, 224x224 inference): about 60 000 minor page faults per forward pass
for ``resnet50d`` and ``aff_resnet50``, and 460-480 ms instead of 560-610 ms once freed memory is
kept. How many faults a model takes also depends on the order of its allocations and frees (for
the same network, 2 500 in one process and 58 000 in another), which makes timings of one model
swing by several per cent between processes.

:func:`retain_freed_memory` tells glibc to keep what is freed (``M_TRIM_THRESHOLD`` at its maximum,
no ``mmap`` for large blocks): after the first step a process reuses its own pages. The price is
that the process never returns memory to the system before it ends, which suits a benchmark, a
training or evaluation run, not a library that shares a long-lived process. jemalloc or tcmalloc
(``LD_PRELOAD``) do the same job by other means. No library does this one call, hence this module.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["apply_cpu_alloc", "minor_page_faults", "retain_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it; musl's mallopt does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel (whole process).

    Returns:
        True if glibc accepted both settings; False on other C libraries and systems, where nothing
        changes.
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_INT_MAX))) and bool(libc.mallopt(_M_MMAP_MAX, 0))


def apply_cpu_alloc(mode: str, device_type: str) -> str | None:
    """The ``--cpu-alloc`` / ``cpu_alloc`` setting of the commands: act on it for a CPU run.

    Args:
        mode: ``"retain"`` (call :func:`retain_freed_memory`) or ``"system"`` (leave malloc alone).
        device_type: the run's device type; nothing is done off the CPU.

    Returns:
        What the run got, for the record: ``mode``, a note when ``retain`` was not available, or
        None off the CPU.
    """
    if device_type != "cpu":
        return None
    if mode == "retain" and not retain_freed_memory():
        return "system (retain not available: not glibc)"
    return mode


def minor_page_faults() -> int:
    """Minor page faults of this process so far (all threads); 0 where the system does not count them."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
