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


# The terms a sum adds: the elements themselves, or (``centred``, LayerNorm's variance) their
# squared distances from the mean, computed as the sum reads them. ``centred`` is a constant where
# these inlined helpers are called, so each caller compiles one branch.


@numba.njit(**INLINE)
def _terms8(a, i, mv, centred):
    """The terms of ``a[i:i + 8]`` as a vector (``mv``: the mean in every lane)."""
    v = v8_load(a, i)
    if centred:
        d = v_sub(v, mv)
        return v_mul(d, d)
    return v


@numba.njit(**INLINE)
def _term(a, i, mean, centred):
    v = a[np.uintp(i)]
    if centred:
        d = v - mean
        return d * d
    return v


@numba.njit(**INLINE)
def _leaf(a, lo, n, mean, centred):
    """NumPy's pairwise sum of the terms of ``a[lo:lo + n]``, ``n <= 128``: below 8 terms a plain
    loop from 0; else eight interleaved accumulators (lane k of one vector: accumulator k) seeded
    with the first eight terms, combined by :func:`lane_sum`, then the tail added in order."""
    res, m = a.dtype.type(0.0), 0
    if n >= 8:
        m = n - n % 8
        mv = v8_splat(mean)
        r = _terms8(a, lo, mv, centred)
        for i in range(8, m, 8):
            r = v_add(r, _terms8(a, lo + i, mv, centred))
        res = lane_sum(r)
    for i in range(m, n):
        res += _term(a, lo + i, mean, centred)
    return res


@numba.njit(**INLINE)
def pairwise_leaf(a, lo, n):
    """NumPy's pairwise sum of ``a[lo:lo + n]`` for ``n <= 128`` (no recursion)."""
    return _leaf(a, lo, n, a.dtype.type(0.0), False)


@numba.njit(**INLINE)
def _half(n):
    """Where NumPy splits a node of ``n`` > 128 terms: n // 2, rounded down to a multiple of 8."""
    n2 = n // 2
    return n2 - n2 % 8


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
    n2 = _half(n)
    return pairwise_sum_div_at(a, lo, n2, prev, total) + pairwise_sum_div_at(
        a, lo + n2, n - n2, prev + n2 if prev >= 0 else prev, total
    )


# Where both halves of a node are leaves (129 to 256 terms), the two leaves run side by side:
# each is one chain of dependent vector adds, waiting on the add's latency, and two chains overlap.
# Each leaf makes the same operations in the same order, so the same bits. A LayerNorm over rows of
# 768 (two sums of eight leaves of 96 each) took 0.70x the time in float32, 0.88x in float64
# (512 rows, A/B in one process). The two recursions below differ only in ``centred``: a constant
# passed down a recursive function would make Numba compile a literal specialisation of it, which
# has called a null address when loaded from the cache (numba#6061; see attention_few_kernel).


@numba.njit(**INLINE)
def _two_leaves(a, lo0, n0, lo1, n1, mean, centred):
    """``(_leaf(a, lo0, n0, ...), _leaf(a, lo1, n1, ...))`` for 8 <= n0 <= n1 <= 128, the two
    chains interleaved."""
    m0, m1 = n0 - n0 % 8, n1 - n1 % 8
    mv = v8_splat(mean)
    r0, r1 = _terms8(a, lo0, mv, centred), _terms8(a, lo1, mv, centred)
    for i in range(8, m0, 8):
        r0 = v_add(r0, _terms8(a, lo0 + i, mv, centred))
        r1 = v_add(r1, _terms8(a, lo1 + i, mv, centred))
    for i in range(m0, m1, 8):
        r1 = v_add(r1, _terms8(a, lo1 + i, mv, centred))
    s0, s1 = lane_sum(r0), lane_sum(r1)
    for i in range(m0, n0):
        s0 += _term(a, lo0 + i, mean, centred)
    for i in range(m1, n1):
        s1 += _term(a, lo1 + i, mean, centred)
    return s0, s1


@numba.njit(**JIT)
def pairwise_sum_at(a, lo, n):
    """NumPy's pairwise sum of ``a[lo:lo + n]``."""
    if n <= 128:
        return pairwise_leaf(a, lo, n)
    n2 = _half(n)
    if n - n2 <= 128:  # (n2 <= n - n2: both halves are leaves)
        s0, s1 = _two_leaves(a, lo, n2, lo + n2, n - n2, a.dtype.type(0.0), False)
        return s0 + s1
    return pairwise_sum_at(a, lo, n2) + pairwise_sum_at(a, lo + n2, n - n2)


@numba.njit(**JIT)
def pairwise_sum(a):
    n = a.shape[0]
    return pairwise_sum_at(a, n - n, n)  # (an int64 0, not a literal: one specialisation)


@numba.njit(**JIT)
def _centred_sq_at(a, mean, lo, n):
    """``pairwise_sum_at`` of ``(a - mean) * (a - mean)`` without storing the squares."""
    if n <= 128:
        return _leaf(a, lo, n, mean, True)
    n2 = _half(n)
    if n - n2 <= 128:
        s0, s1 = _two_leaves(a, lo, n2, lo + n2, n - n2, mean, True)
        return s0 + s1
    return _centred_sq_at(a, mean, lo, n2) + _centred_sq_at(a, mean, lo + n2, n - n2)


@numba.njit(**JIT)
def pairwise_sum_centred_sq(a, mean):
    """``pairwise_sum((a - mean) * (a - mean))`` without storing the squares."""
    n = a.shape[0]
    return _centred_sq_at(a, mean, n - n, n)
