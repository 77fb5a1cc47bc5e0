"""Skinny GEMMs: ``x @ W.T + b`` for a few rows of ``x``, streaming each weight matrix once.

For a handful of rows (a decoding step, a short input) a linear layer is bound by reading its
weights, not by arithmetic. OpenBLAS first packs all of ``W`` into its own layout (one more pass
over the weights, through the caches) and reaches ~10 GB/s of weights at [8, 768] x [768, 3072].
:func:`skinny_linear` reads ``W`` in its stored ``[out, in]`` order once: a tile of four weight
rows meets two input rows at a time, eight dot products held in eight vector accumulators, and
the four weight rows stay in L1 while every input row passes by. The two cores take disjoint
halves of the output columns (a ``prange`` of two: Numba's OpenMP threads wake in a few
microseconds, where a Python thread pool takes ~0.1-0.3 ms on this VM, as long as a 768 x 768
GEMV), so each streams half the weights.

Each output element is one dot product: eight interleaved partial sums of fused multiply-adds
(lane ``j`` sums ``k = j, j + 8, ...``), combined as ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)), then
the tail ``k >= in - in % 8`` added in order, then the bias. Another summation order than BLAS's
(which is not fixed either: it depends on the kernel the CPU gets), so it is held to ``x @ W.T + b``
by a bound (``tests/test_kernels.py``), and every output element is independent of the rows
beside it, of the column split and of the thread count.

Shape legend: R rows, K = in, O = out.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np

from .llvm import DTYPES, INLINE, JIT, v8_lanes, v8_load, v8_splat, v_fma

SKINNY_ROWS = 16  # up to this many rows, schedule.linear uses skinny_linear (measured crossover)
SPLIT_FROM = 1 << 18  # multiply-adds (R * K * O) from which the two cores share a GEMM
_TILE = 4  # weight rows per tile: the column split falls on multiples of it


@numba.njit(**INLINE)
def _lane_sum(v):
    s0, s1, s2, s3, s4, s5, s6, s7 = v8_lanes(v)
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(**INLINE)
def _dot_tail(xf, xo, wf, wo, k8, k, acc):
    for i in range(k8, k):
        acc += xf[np.uintp(xo + i)] * wf[np.uintp(wo + i)]
    return acc


@numba.njit(**INLINE)
def _finish(acc, xf, xo, wf, wo, k8, k, b, has_bias, o, out, oo):
    s = _dot_tail(xf, xo, wf, wo, k8, k, _lane_sum(acc))
    out[np.uintp(oo)] = s + b[np.uintp(o)] if has_bias else s


@numba.njit(**JIT)
def _skinny_kernel(xf, wf, b, has_bias, out, nr, k, n_out, o0, o1):  # noqa: C901 (one tiled loop nest)
    """``out[r, o] = x[r] . W[o] (+ b[o])`` for r < nr, o0 <= o < o1; flat C arrays:
    xf [R*K], wf [O*K], out [R*O]."""
    k8 = k - k % 8
    z = v8_splat(xf.dtype.type(0.0))
    o = o0
    while o + _TILE <= o1:  # tiles of 4 weight rows
        w0, w1, w2, w3 = o * k, (o + 1) * k, (o + 2) * k, (o + 3) * k
        r = 0
        while r + 2 <= nr:  # 4 weight rows x 2 input rows: 8 accumulators
            xa, xb = r * k, (r + 1) * k
            a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = z
            for i in range(0, k8, 8):
                va, vb = v8_load(xf, xa + i), v8_load(xf, xb + i)
                u = v8_load(wf, w0 + i)
                a0, c0 = v_fma(u, va, a0), v_fma(u, vb, c0)
                u = v8_load(wf, w1 + i)
                a1, c1 = v_fma(u, va, a1), v_fma(u, vb, c1)
                u = v8_load(wf, w2 + i)
                a2, c2 = v_fma(u, va, a2), v_fma(u, vb, c2)
                u = v8_load(wf, w3 + i)
                a3, c3 = v_fma(u, va, a3), v_fma(u, vb, c3)
            ra, rb = r * n_out + o, (r + 1) * n_out + o
            _finish(a0, xf, xa, wf, w0, k8, k, b, has_bias, o, out, ra)
            _finish(a1, xf, xa, wf, w1, k8, k, b, has_bias, o + 1, out, ra + 1)
            _finish(a2, xf, xa, wf, w2, k8, k, b, has_bias, o + 2, out, ra + 2)
            _finish(a3, xf, xa, wf, w3, k8, k, b, has_bias, o + 3, out, ra + 3)
            _finish(c0, xf, xb, wf, w0, k8, k, b, has_bias, o, out, rb)
            _finish(c1, xf, xb, wf, w1, k8, k, b, has_bias, o + 1, out, rb + 1)
            _finish(c2, xf, xb, wf, w2, k8, k, b, has_bias, o + 2, out, rb + 2)
            _finish(c3, xf, xb, wf, w3, k8, k, b, has_bias, o + 3, out, rb + 3)
            r += 2
        if r < nr:  # the last, odd input row: 4 x 1
            xa = r * k
            a0 = a1 = a2 = a3 = z
            for i in range(0, k8, 8):
                va = v8_load(xf, xa + i)
                a0 = v_fma(v8_load(wf, w0 + i), va, a0)
                a1 = v_fma(v8_load(wf, w1 + i), va, a1)
                a2 = v_fma(v8_load(wf, w2 + i), va, a2)
                a3 = v_fma(v8_load(wf, w3 + i), va, a3)
            ra = r * n_out + o
            _finish(a0, xf, xa, wf, w0, k8, k, b, has_bias, o, out, ra)
            _finish(a1, xf, xa, wf, w1, k8, k, b, has_bias, o + 1, out, ra + 1)
            _finish(a2, xf, xa, wf, w2, k8, k, b, has_bias, o + 2, out, ra + 2)
            _finish(a3, xf, xa, wf, w3, k8, k, b, has_bias, o + 3, out, ra + 3)
        o += _TILE
    while o < o1:  # the last 1-3 weight rows: 1 x 1
        w0 = o * k
        for r in range(nr):
            xa = r * k
            a0 = z
            for i in range(0, k8, 8):
                a0 = v_fma(v8_load(wf, w0 + i), v8_load(xf, xa + i), a0)
            _finish(a0, xf, xa, wf, w0, k8, k, b, has_bias, o, out, r * n_out + o)
        o += 1


# ---------------------------------------------------------------------------------------------
# The output columns over two threads
# ---------------------------------------------------------------------------------------------


@numba.njit(parallel=True, **JIT)
def _skinny_two(xf, wf, b, has_bias, out, nr, k, n_out, half):
    """``_skinny_kernel`` over ``[0, half)`` and ``[half, n_out)`` on Numba's two threads."""
    for t in numba.prange(2):
        o0 = 0 if t == 0 else half
        o1 = half if t == 0 else n_out
        _skinny_kernel(xf, wf, b, has_bias, out, nr, k, n_out, o0, o1)


_lock = threading.Lock()


def _flat(a) -> np.ndarray:
    """A C-contiguous, writeable 1-D copy-free view of ``a`` where possible (else a copy)."""
    if not (a.flags.c_contiguous and a.flags.writeable):
        a = np.array(a, order="C")  # read-only (mmap'd) weights would need a second compile
    return a.reshape(-1)


def skinny_linear(x, weight, bias=None, *, out=None):
    """``ops.linear``: ``x @ W.T + b`` for few rows. x: [..., K]; weight: [O, K]; bias: [O] or None
    -> [..., O], C-contiguous, in x's dtype (float32 or float64; no casting).

    ``out``: a C-contiguous, writeable array of the result's shape and dtype to write into.
    Within a few ulp per element of any BLAS's ``x @ W.T`` (a bound in ``K`` ulps of the sum of
    ``|x * w|``): see the module docstring for the summation order.
    """
    for name, a in (("x", x), ("weight", weight), ("bias", bias)):
        if a is not None and (not isinstance(a, np.ndarray) or a.dtype not in DTYPES):
            raise TypeError(f"{name} must be a float32 or float64 NumPy array")
    dtype = x.dtype
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        raise TypeError(f"weight and bias must have x's dtype {dtype}; cast explicitly (no casting here)")
    if x.ndim == 0 or weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x [..., K] and weight [O, K] do not fit: {x.shape} and {weight.shape}")
    n_out, k = weight.shape
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {bias.shape}")
    shape = x.shape[:-1] + (n_out,)
    if out is None:
        out = np.empty(shape, dtype)
    elif not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
              and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a C-contiguous, writeable {dtype} array of shape {shape}")
    nr = int(np.prod(x.shape[:-1], dtype=np.int64))
    if out.size == 0:
        return out
    if k == 0:
        out[...] = 0 if bias is None else bias
        return out
    xf, wf, of = _flat(x), _flat(weight), out.reshape(-1)
    has_bias = bias is not None
    b = _flat(bias) if has_bias else np.zeros(1, dtype)

    half = (n_out // 2) // _TILE * _TILE
    if nr * k * n_out < SPLIT_FROM or half == 0 or (os.cpu_count() or 1) < 2 or not _lock.acquire(blocking=False):
        _skinny_kernel(xf, wf, b, has_bias, of, nr, k, n_out, 0, n_out)
        return out
    try:  # one split at a time (Numba's workqueue layer allows no concurrent parallel calls)
        _skinny_two(xf, wf, b, has_bias, of, nr, k, n_out, half)
    finally:
        _lock.release()
    return out


def warmup(dtype=np.float32) -> None:
    """Compile (or load from the on-disk cache) the skinny GEMM for ``dtype``; idempotent."""
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    skinny_linear(np.ones((1, 8), dtype), np.ones((5, 8), dtype), np.ones(5, dtype))
