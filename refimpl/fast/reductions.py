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


# Where both halves of a node are leaves (129 to 256 elements), the two leaves run side by side:
# each is one chain of dependent vector adds, waiting on the add's latency, and two chains overlap.
# Each leaf makes the same operations in the same order, so the same bits. A LayerNorm over rows of
# 768 (two sums of eight leaves of 96 each) took 0.70x the time in float32, 0.88x in float64
# (512 rows, A/B in one process).


@numba.njit(**INLINE)
def _two_leaves(a, lo0, n0, lo1, n1):
    """``(pairwise_leaf(a, lo0, n0), pairwise_leaf(a, lo1, n1))`` for 8 <= n0 <= n1 <= 128, the two
    chains interleaved."""
    m0, m1 = n0 - n0 % 8, n1 - n1 % 8
    r0, r1 = v8_load(a, lo0), v8_load(a, lo1)
    for i in range(8, m0, 8):
        r0 = v_add(r0, v8_load(a, lo0 + i))
        r1 = v_add(r1, v8_load(a, lo1 + i))
    for i in range(m0, m1, 8):
        r1 = v_add(r1, v8_load(a, lo1 + i))
    s0, s1 = lane_sum(r0), lane_sum(r1)
    for i in range(m0, n0):
        s0 += a[np.uintp(lo0 + i)]
    for i in range(m1, n1):
        s1 += a[np.uintp(lo1 + i)]
    return s0, s1


@numba.njit(**JIT)
def pairwise_sum_at(a, lo, n):
    """NumPy's pairwise sum of ``a[lo:lo + n]``."""
    if n <= 128:
        return pairwise_leaf(a, lo, n)
    n2 = n // 2
    n2 -= n2 % 8
    if n - n2 <= 128:  # (n2 <= n - n2: both halves are leaves)
        s0, s1 = _two_leaves(a, lo, n2, lo + n2, n - n2)
        return s0 + s1
    return pairwise_sum_at(a, lo, n2) + pairwise_sum_at(a, lo + n2, n - n2)


@numba.njit(**JIT)
def pairwise_sum(a):
    n = a.shape[0]
    return pairwise_sum_at(a, n - n, n)  # (an int64 0, not a literal: one specialisation)


@numba.njit(**INLINE)
def _centred_sq_leaf(a, mv, lo, m):
    """The eight accumulators of ``(a - mean)**2`` over a[lo:lo + m] (m >= 8, a multiple of 8; mv:
    the mean in every lane), seeded with the first eight squares."""
    d = v_sub(v8_load(a, lo), mv)
    r = v_mul(d, d)
    for i in range(8, m, 8):
        d = v_sub(v8_load(a, lo + i), mv)
        r = v_add(r, v_mul(d, d))
    return r


@numba.njit(**INLINE)
def _centred_sq_tail(a, mean, lo, m, n, res):
    for i in range(m, n):
        d = a[np.uintp(lo + i)] - mean
        res += d * d
    return res


@numba.njit(**JIT)
def _centred_sq_at(a, mean, lo, n):
    """``pairwise_sum_at`` of ``(a - mean) * (a - mean)`` without storing the squares."""
    if n < 8:
        return _centred_sq_tail(a, mean, lo, 0, n, a.dtype.type(0.0))
    mv = v8_splat(mean)
    if n <= 128:
        m = n - n % 8
        return _centred_sq_tail(a, mean, lo, m, n, lane_sum(_centred_sq_leaf(a, mv, lo, m)))
    n2 = n // 2
    n2 -= n2 % 8
    if n - n2 > 128:
        return _centred_sq_at(a, mean, lo, n2) + _centred_sq_at(a, mean, lo + n2, n - n2)
    lo1, n1 = lo + n2, n - n2  # both halves leaves: their chains interleaved (see _two_leaves)
    m0, m1 = n2 - n2 % 8, n1 - n1 % 8
    d0, d1 = v_sub(v8_load(a, lo), mv), v_sub(v8_load(a, lo1), mv)
    r0, r1 = v_mul(d0, d0), v_mul(d1, d1)
    for i in range(8, m0, 8):
        d0, d1 = v_sub(v8_load(a, lo + i), mv), v_sub(v8_load(a, lo1 + i), mv)
        r0, r1 = v_add(r0, v_mul(d0, d0)), v_add(r1, v_mul(d1, d1))
    for i in range(m0, m1, 8):
        d1 = v_sub(v8_load(a, lo1 + i), mv)
        r1 = v_add(r1, v_mul(d1, d1))
    s0 = _centred_sq_tail(a, mean, lo, m0, n2, lane_sum(r0))
    return s0 + _centred_sq_tail(a, mean, lo1, m1, n1, lane_sum(r1))


@numba.njit(**JIT)
def pairwise_sum_centred_sq(a, mean):
    """``pairwise_sum((a - mean) * (a - mean))`` without storing the squares."""
    n = a.shape[0]
    return _centred_sq_at(a, mean, n - n, n)
