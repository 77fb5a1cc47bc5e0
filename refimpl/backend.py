"""The array namespace (``xp``) and the few hooks that must know which backend they are on.

Every math function in :mod:`refimpl` takes arrays and asks them for their namespace with
:func:`namespace`; it then uses only ``xp.*`` calls from the Array API standard. That keeps one code
path for NumPy, CuPy and ``array_api_strict`` (which CI uses to catch NumPy-only calls).

Only three things here know which library they are talking to:

- :func:`erf`: the error function is not part of the Array API standard. On NumPy it is the C
  library's ``erf``/``erff`` (correctly rounded to within an ulp): called directly for small
  arrays, through a Numba ``vectorize`` (no ``fastmath``, compiled on first need) for large ones,
  the same bits either way; on CuPy it is ``cupyx.scipy.special.erf``; any other namespace goes
  through NumPy.
- :func:`to_numpy` / :func:`asarray_like`: device transfers.
- :func:`finfo_min`: the additive-mask constant for a dtype (the one mask constant of the project).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:  # array-api-compat gives NumPy and CuPy arrays a standard namespace.
    import array_api_compat as _compat
except ImportError:  # pragma: no cover - a declared dependency
    _compat = None


_NUMPY_NS = None  # the namespace of NumPy arrays, made on first use
# NumPy 2.1 and later implement the Array API standard in their main namespace, with every function
# refimpl calls (``cumulative_sum`` came in 2.1), the same functions array-api-compat's NumPy
# namespace wraps for older versions; refimpl then uses ``numpy`` itself. Building the wrapper
# namespace reads every attribute of ``numpy``, which imports numpy.testing, numpy.f2py, numpy.ma
# and more: 0.1-0.25 s at the first call of every process, most of a small model's answer.
NUMPY_IS_ARRAY_API = np.lib.NumpyVersion(np.__version__) >= "2.1.0"


def namespace(*arrays: Any):
    """The Array API namespace of ``arrays`` (NumPy, CuPy, array_api_strict, ...)."""
    global _NUMPY_NS
    if _compat is not None and type(arrays[0] if arrays else None) is np.ndarray and all(
        type(a) is np.ndarray or a is None for a in arrays
    ):
        # The common case, answered without array-api-compat's general dispatch (~2.5 us a call,
        # a few hundred calls per decoding step): plain NumPy arrays (and Nones) -> NumPy's namespace.
        if _NUMPY_NS is None:
            _NUMPY_NS = np if NUMPY_IS_ARRAY_API else _compat.array_namespace(np.empty(0))
        return _NUMPY_NS
    arrays = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool))]
    if _compat is None:
        return np
    return _compat.array_namespace(*arrays)


def is_numpy(xp) -> bool:
    """True when ``xp`` is NumPy (plain or wrapped by array-api-compat)."""
    name = getattr(xp, "__name__", "")
    return name in ("numpy", "array_api_compat.numpy")


def is_cupy(xp) -> bool:
    name = getattr(xp, "__name__", "")
    return name in ("cupy", "array_api_compat.cupy")


def to_numpy(x) -> np.ndarray:
    """Any backend's array (or a Python scalar/list) as a NumPy array on the host."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get") and type(x).__module__.startswith("cupy"):
        return x.get()
    if hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError):
            pass
    return np.asarray(x)


def asarray_like(x_np: np.ndarray, like) -> Any:
    """``x_np`` (a NumPy array) moved to the namespace and device of ``like``."""
    xp = namespace(like)
    if is_numpy(xp):
        return x_np
    if is_cupy(xp):
        import cupy

        return cupy.asarray(x_np)
    return xp.asarray(x_np)


def finfo_min(xp, dtype) -> float:
    """The additive mask value for ``dtype``: ``finfo(dtype).min``, as transformers uses.

    Masked scores become ``score + min``; after the row maximum is subtracted they underflow to an
    exact 0 in ``exp``. A row with every key masked stays finite (all scores shift by the same
    ``min``) and softmax gives it a uniform distribution rather than NaN, as in transformers.
    """
    return float(xp.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------
# erf: the one special function the model needs (exact GELU), behind one hook.
# ---------------------------------------------------------------------------------------------

# Up to this many elements, erf calls the C library's erf/erff directly, one element at a time
# (~0.3 us each): no compile at all, so a small model answers without loading Numba. From here on
# a Numba ufunc over the same C functions (~20 ns an element) is compiled on first need, per dtype.
# The two give the same bits (they call the same function); tests/test_coldstart.py checks it.
ERF_DIRECT_MAX = 1 << 15
# ...and once a process has sent this many elements down the direct path in all (~0.3 s of calls,
# about what loading the ufunc from the on-disk cache costs), it loads the ufunc: a pipeline over
# many texts pays the load once instead of 15x the ufunc's time on every batch. (Same bits either way.)
ERF_DIRECT_BUDGET = 1 << 20
_direct_used = 0


def _libm_erf():
    """{dtype: the C library's erf (float64) / erff (float32) as a Python callable}, or {} if absent."""
    import ctypes

    try:
        lib = ctypes.CDLL(None)  # the process's own symbols: CPython's math module links libm
        fns = {np.dtype(np.float64): lib.erf, np.dtype(np.float32): lib.erff}
    except (OSError, AttributeError):  # pragma: no cover - no dlopen(NULL) (Windows) or no erff
        return {}
    for dtype, fn in fns.items():
        c = ctypes.c_double if dtype == np.float64 else ctypes.c_float
        fn.restype, fn.argtypes = c, [c]
    return fns


_direct: dict | None = None
_ERF_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_numba_erf: dict = {}  # dtype -> the compiled ufunc


def _erf_scalar(x):  # libm erf/erff: accurate to about an ulp
    return math.erf(x)


def _get_numba_erf(dtype: np.dtype):
    """A Numba ufunc for ``dtype`` calling the C library's erf (erff in float32), compiled on first
    use (or loaded from the on-disk cache: :mod:`refimpl.jitcache`)."""
    ufunc = _numba_erf.get(dtype)
    if ufunc is None:
        import numba

        from . import jitcache

        jitcache.ensure()
        sig = f"{dtype.name}({dtype.name})"
        ufunc = numba.vectorize([sig], cache=True, fastmath=False, nopython=True)(_erf_scalar)
        _numba_erf[dtype] = ufunc
    return ufunc


def _erf_numpy(x: np.ndarray) -> np.ndarray:
    """erf of a NumPy float32/float64 array: the C library's erf, direct or through Numba (same bits)."""
    global _direct, _direct_used
    if _direct is None:
        _direct = _libm_erf()
    dtype = x.dtype
    if dtype not in _ERF_DTYPES:  # as a ufunc with float32 and float64 loops would: float16 -> float32, ints -> float64
        dtype = np.result_type(dtype, np.float32)
        x = x.astype(dtype)
    fn = _direct.get(dtype)
    if (fn is not None and x.size <= ERF_DIRECT_MAX and dtype not in _numba_erf
            and _direct_used + x.size <= ERF_DIRECT_BUDGET):
        _direct_used += x.size
        return np.fromiter(map(fn, x.ravel().tolist()), dtype, x.size).reshape(x.shape)
    return _get_numba_erf(dtype)(x)


def erf(x):
    """Element-wise error function in ``x``'s dtype and namespace.

    On NumPy: the C library's ``erf`` (``erff`` for float32), correctly rounded to within an ulp,
    whatever the array's size (small arrays call it directly, large ones through a Numba ufunc).
    """
    xp = namespace(x)
    if is_numpy(xp):
        return _erf_numpy(x)
    if is_cupy(xp):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    # Any other namespace (array_api_strict in CI): compute on the host, return in kind.
    return xp.asarray(_erf_numpy(to_numpy(x)), device=getattr(x, "device", None))


# How to get CuPy (refimpl is installed from a checkout, not from the package index): the one place
# that says it (tests/test_install_hints.py checks every hint in the code and the docs).
CUPY_INSTALL_HINT = ("pip install cupy-cuda12x (CUDA 12; cupy-cuda11x for CUDA 11), or pip install '.[gpu]' "
                     "in a checkout of refimpl")


def cupy_status() -> tuple[bool, str]:
    """``(True, device name)`` when CuPy can allocate on a GPU, else ``(False, the reason)``.

    CuPy imports fine on a machine without a driver and fails only at the first allocation, so
    this allocates.
    """
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        return False, f"cupy is not importable ({type(e).__name__}: {e}); {CUPY_INSTALL_HINT}"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "no CUDA device"
        cupy.zeros(1).sum().item()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return True, name
    except Exception as e:  # no driver, no device, out of memory...
        return False, f"CuPy cannot use a GPU here ({type(e).__name__}: {e})"
