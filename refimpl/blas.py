"""NumPy's OpenBLAS thread count, read and set through ctypes (no Numba, no threadpoolctl needed).

OpenBLAS's thread count is process-wide. Two users: the fast path's schedule (batch or token halves
on two threads, each with one BLAS thread) and the pipelines on a small model, where a GEMM is a few
microseconds and waking a second BLAS thread for it costs more than the product itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
from collections.abc import Iterator

import numpy as np

__all__ = ["openblas_threads", "blas_threads"]

_blas_threads = None  # (get, set) of the OpenBLAS that NumPy links, or () when not found


def openblas_threads():
    """``(get_num_threads, set_num_threads)`` of NumPy's OpenBLAS via ctypes, or None."""
    global _blas_threads
    if _blas_threads is None:
        _blas_threads = ()
        libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "lib*openblas*"))
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get, set_ in (
                ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
                ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                ("openblas_get_num_threads", "openblas_set_num_threads"),
            ):
                if hasattr(lib, get) and hasattr(lib, set_):
                    g, s = getattr(lib, get), getattr(lib, set_)
                    g.restype, g.argtypes = ctypes.c_int, []
                    s.restype, s.argtypes = None, [ctypes.c_int]
                    _blas_threads = (g, s)
                    break
            if _blas_threads:
                break
    return _blas_threads or None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with NumPy's OpenBLAS on ``n`` threads, then restore the count (no-op without
    OpenBLAS). The results of a GEMM do not depend on it: threads split the rows and columns, never
    the sums."""
    blas = openblas_threads()
    if blas is None:
        yield
        return
    get, set_ = blas
    before = get()
    if before == n:
        yield
        return
    set_(n)
    try:
        yield
    finally:
        set_(before)
