"""Reductions in NumPy's summation order, so that a kernel's sums are bitwise NumPy's."""

from __future__ import annotations

import numba
import numpy as np

from .llvm import INLINE, JIT, v8_lanes, v8_load, v8_splat, v8_store, v_add, v_div, v_mul, v_sub


# ---------------------------------------------------------------------------------------------
# Reductions in NumPy's order (numpy/_core/src/umath/loops_utils.h.src, ``pairwise_sum``):
# below 8 elements a plain loop from 0; up to 128, eight interleaved accumulators combined as
# ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) and the tail added in order; above, split at n/2 rounded
# down to a multiple of 8 and recurse. ``np.add.reduce`` (so ``np.sum``/``np.mean``) over a
# contiguous last axis sums each row this way.
# ---------------------------------------------------------------------------------------------


@numba.njit(**JIT)
def lane_sum(r):
    """NumPy's combination of its eight accumulators: ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))."""
    r0, r1, r2, r3, r4, r5, r6, r7 = v8_lanes(r)
    return ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))


@numba.njit(**JIT)
def lane_max(r):
    r0, r1, r2, r3, r4, r5, r6, r7 = v8_lanes(r)
    return max(max(max(r0, r1), max(r2, r3)), max(max(r4, r5), max(r6, r7)))


@numba.njit(**INLINE)
def pairwise_leaf(a, lo, n):
    """NumPy's pairwise sum of ``a[lo:lo + n]`` for ``n <= 128`` (no recursion)."""
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            res += a[np.uintp(lo + i)]
        return res
    m = n - n % 8
    r = v8_load(a, lo)  # lane k: accumulator k, seeded with a[lo + k]
    for i in range(8, m, 8):
        r = v_add(r, v8_load(a, lo + i))
    res = lane_sum(r)
    for i in range(m, n):
        res += a[np.uintp(lo + i)]
    return res


@numba.njit(**INLINE)
def pairwise_leaf_div(a, lo, n, prev, total):
    """``pairwise_leaf(a, lo, n)``, dividing ``a[prev:prev + n]`` by ``total`` meanwhile.

    The sum is one chain of dependent vector adds (latency-bound), the division throughput-bound
    on the divider: together they take the time of the longer, not of both.
    """
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            res += a[np.uintp(lo + i)]
            w = np.uintp(prev + i)
            a[w] = a[w] / total
        return res
    m = n - n % 8
    tv = v8_splat(total)
    r = v8_load(a, lo)
    v8_store(a, prev, v_div(v8_load(a, prev), tv))
    for i in range(8, m, 8):
        r = v_add(r, v8_load(a, lo + i))
        v8_store(a, prev + i, v_div(v8_load(a, prev + i), tv))
    res = lane_sum(r)
    for i in range(m, n):
        res += a[np.uintp(lo + i)]
        w = np.uintp(prev + i)
        a[w] = a[w] / total
    return res


@numba.njit(**JIT)
def pairwise_sum_div_at(a, lo, n, prev, total):
    """``pairwise_sum(a[lo:lo + n])`` without making the view (offsets, not slices: no
    reference counting in a kernel's row loop); if ``prev >= 0``, dividing ``a[prev:prev + n]``
    by ``total`` meanwhile (:func:`pairwise_leaf_div`)."""
    if n <= 128:
        if prev < 0:
            return pairwise_leaf(a, lo, n)
        return pairwise_leaf_div(a, lo, n, prev, total)
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum_div_at(a, lo, n2, prev, total) + pairwise_sum_div_at(
        a, lo + n2, n - n2, prev + n2 if prev >= 0 else prev, total
    )


@numba.njit(**JIT)
def pairwise_sum(a):
    n = a.shape[0]
    if n <= 128:
        return pairwise_leaf(a, n - n, n)  # (an int64 0, not a literal: one specialisation)
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum(a[:n2]) + pairwise_sum(a[n2:])


@numba.njit(**JIT)
def pairwise_sum_centred_sq(a, mean):
    """``pairwise_sum((a - mean) * (a - mean))`` without storing the squares."""
    n = a.shape[0]
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            d = a[i] - mean
            res += d * d
        return res
    if n <= 128:
        m = n - n % 8
        mv = v8_splat(mean)
        d = v_sub(v8_load(a, 0), mv)
        r = v_mul(d, d)
        for i in range(8, m, 8):
            d = v_sub(v8_load(a, i), mv)
            r = v_add(r, v_mul(d, d))
        res = lane_sum(r)
        for i in range(m, n):
            d = a[i] - mean
            res += d * d
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum_centred_sq(a[:n2], mean) + pairwise_sum_centred_sq(a[n2:], mean)
