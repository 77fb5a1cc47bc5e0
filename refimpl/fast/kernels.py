"""The Numba kernels, each beside its Python wrapper: bias+GELU, LayerNorm, masked softmax, attention
(per (batch, head) around the packed GEMM, and for a few query rows in one kernel).

Each wrapper checks dtypes and shapes, fixes layouts and calls its kernel; each is held to its
NumPy definition (:mod:`refimpl.ops`, :mod:`refimpl.attention`) by ``tests/test_kernels.py``.
"""

from __future__ import annotations

import numba
import numpy as np

from .llvm import (DTYPES, INLINE, JIT, f64_bits, f64_from_bits, fma, pointer_like, prefetch, v64b_load, v8_load,
                   v8_splat, v8_store, v_abs_ge_bits, v_add, v_fma, v_max, v_mul)
from .elementary import by_dtype, exp_nonpos, gelu, gelu_main, tail_limit
from . import packed
from .jobs import ATTENTION_LIKE, attention_on_two_cores, code_fingerprint, read_only, register_attention_kernel
from .reductions import lane_max, lane_sum, pairwise_leaf, pairwise_leaf_div, pairwise_sum, pairwise_sum_centred_sq, pairwise_sum_div_at


@numba.njit(**INLINE)
def _scale_mask8(s, so, mask, mo, has_mask, sv, i):
    v = v_mul(v8_load(s, so + i), sv)
    return v_add(v, v8_load(mask, mo + i)) if has_mask else v


@numba.njit(**INLINE)
def _scale_mask_max(s, so, mask, mo, has_mask, scale, out, oo, n):
    """``out[oo:oo + n] = s[so:so + n] * scale + mask[mo:mo + n]`` (no mask: ``s * scale``),
    returning the maximum of what it wrote.

    The maximum is taken as the values are written, sixteen interleaved maxima (two vectors, so
    two dependency chains) seeded with the first value, then the tail: a maximum is exact, so any
    order gives the same value. NaN is not propagated here (np.max does), and need not be: a NaN
    in the row makes its exp(v - max) and so the row sum NaN, and the whole row NaN, as in the
    reference.
    """
    m = n - n % 8
    res = s[np.uintp(so)] * scale + mask[np.uintp(mo)] if has_mask else s[np.uintp(so)] * scale
    if m:
        sv = v8_splat(scale)
        r0 = r1 = v8_splat(res)
        m16 = n - n % 16
        for i in range(0, m16, 16):
            v0 = _scale_mask8(s, so, mask, mo, has_mask, sv, i)
            v1 = _scale_mask8(s, so, mask, mo, has_mask, sv, i + 8)
            v8_store(out, oo + i, v0)
            v8_store(out, oo + i + 8, v1)
            r0 = v_max(r0, v0)
            r1 = v_max(r1, v1)
        if m16 < m:
            v0 = _scale_mask8(s, so, mask, mo, has_mask, sv, m16)
            v8_store(out, oo + m16, v0)
            r0 = v_max(r0, v0)
        res = lane_max(v_max(r0, r1))
    for i in range(m, n):
        v = s[np.uintp(so + i)] * scale
        if has_mask:
            v += mask[np.uintp(mo + i)]
        out[np.uintp(oo + i)] = v
        res = max(res, v)
    return res


# ---------------------------------------------------------------------------------------------
# Kernels. Arrays are C-contiguous; rows are the last axis. Scalars (eps, n, scale) arrive
# already in the arrays' dtype, so every operation stays in that dtype.
# ---------------------------------------------------------------------------------------------


# How _bias_gelu_row splits a row, per dtype: (block, full_after, min_run). block: the elements
# checked together (a multiple of 64); full_after: so many blocks in a row needing erf's tail, and
# the rest of the row takes the full formula unchecked; min_run: the fewest blocks that take the
# first branch alone (a shorter stretch joins its neighbours). Measured on [256, 3072] rows: a
# block's loop costs ~150 cycles to start and drain, the float32 tail only 0.45 ns an element (so
# long blocks), the float64 tail 2.5 ns (so short ones, but long runs).
_GELU_PLAN_F32 = (256, 2, 1)
_GELU_PLAN_F64 = (64, 4, 4)
_gelu_plan = by_dtype(lambda x: _GELU_PLAN_F32, lambda x: _GELU_PLAN_F64)
_64b_lanes = by_dtype(lambda x: 16, lambda x: 8)  # the lanes of one 64-byte vector


@numba.njit(**INLINE)
def _needs_tail(yr, b, has_bias, j0, j1, lim, nxt):
    """Whether any ``z = yr + b`` in ``[j0, j1)`` has |z| >= lim (NaN: no); one 64-byte vector
    (16 float32 or 8 float64 lanes) at a time. Prefetches ``nxt[j0:j1]``."""
    w = _64b_lanes(lim)
    m = j1 - (j1 - j0) % w
    bits = 0
    for j in range(j0, m, w):
        prefetch(nxt, j)
        z = v_add(v64b_load(yr, j), v64b_load(b, j)) if has_bias else v64b_load(yr, j)
        bits |= v_abs_ge_bits(z, lim)
    for j in range(m, j1):
        z = yr[np.uintp(j)] + b[np.uintp(j)] if has_bias else yr[np.uintp(j)]
        bits |= abs(z) >= lim
    return bits != 0


# The two loops of _bias_gelu_row, each a function of its own: inlined into one kernel, the
# constants of both polynomials compete for registers (measured 5% slower).
# (One loop per case of has_bias: a test inside a loop would leave it scalar or masked.)


@numba.njit(**JIT)
def _gelu_full_run(yr, b, has_bias, dst, j0, j1):
    if has_bias:
        for j in range(j0, j1):
            dst[np.uintp(j)] = gelu(yr[np.uintp(j)] + b[np.uintp(j)])
    else:
        for j in range(j0, j1):
            dst[np.uintp(j)] = gelu(yr[np.uintp(j)])


@numba.njit(**JIT)
def _gelu_main_run(yr, b, has_bias, dst, j0, j1):
    if has_bias:
        for j in range(j0, j1):
            dst[np.uintp(j)] = gelu_main(yr[np.uintp(j)] + b[np.uintp(j)])
    else:
        for j in range(j0, j1):
            dst[np.uintp(j)] = gelu_main(yr[np.uintp(j)])


@numba.njit(**INLINE)
def _bias_gelu_row(yr, b, has_bias, dst, flags, nxt):
    """``dst[:] = gelu(yr + b)`` (``gelu(yr)`` without bias); ``flags``: scratch, one per block;
    ``nxt``: the next row, prefetched meanwhile.

    erf's second branch (its tail) is needed only for |z| >= 3.54 in float32 (2.83 in float64):
    next to no element at initialisation, a few in a hundred in a trained model. So each block
    (``_GELU_PLAN_*``) is checked first, a vector test of |z| against 3.5 (2.8), a bound below the
    exact one so that no block needing the tail is missed; runs of blocks that do not need it take
    ``gelu_main``, the others the whole branch-free ``gelu``, each in a loop of its own. Both
    give every element the value ``gelu`` gives it. Once ``full_after`` blocks in a row need the
    tail, the rest of the row takes ``gelu`` unchecked.
    """
    h = yr.shape[0]
    lim, (blk, full_after, min_run) = tail_limit(yr[0]), _gelu_plan(yr[0])
    nblk = (h + blk - 1) // blk
    run = 0
    for k in range(nblk):
        if run >= full_after:
            flags[k] = True
            continue
        j0 = k * blk
        flags[k] = _needs_tail(yr, b, has_bias, j0, min(j0 + blk, h), lim, nxt)
        run = run + 1 if flags[k] else 0
    # A stretch of fewer than min_run blocks without the tail joins its neighbours: a short loop
    # pays its start and its dependency chains' latency, more than the tail would cost.
    k = 0
    while k < nblk:
        e = k
        while e < nblk and not flags[e]:
            e += 1
        if e - k < min_run and e - k < nblk:
            flags[k:e] = True
        k = e + 1
    k0 = 0
    while k0 < nblk:
        k1 = k0 + 1
        while k1 < nblk and flags[k1] == flags[k0]:
            k1 += 1
        j0, j1 = k0 * blk, min(k1 * blk, h)
        if flags[k0]:
            _gelu_full_run(yr, b, has_bias, dst, j0, j1)
        else:
            _gelu_main_run(yr, b, has_bias, dst, j0, j1)
        k0 = k1


@numba.njit(**JIT)
def bias_gelu_inplace_kernel(y, b, has_bias):  # y: [R, H], updated in place; b: [H]
    # Each row goes through a scratch row: with y read and written in one loop, LLVM cannot rule
    # out that b aliases y and keeps the loop scalar (~6x slower); the scratch loop vectorises,
    # and the copy back is from L1.
    rows, h = y.shape
    tmp = np.empty(h, y.dtype)
    flags = np.empty(h // 64 + 1, np.bool_)
    for i in range(rows):
        yr = y[i]
        _bias_gelu_row(yr, b, has_bias, tmp, flags, y[min(i + 1, rows - 1)])
        for j in range(h):
            yr[j] = tmp[j]


@numba.njit(**JIT)
def layer_norm_row(xr, w, b, eps, n, outr):  # xr, outr: [H] (may alias); n = H in the dtype
    mean = pairwise_sum(xr) / n
    var = pairwise_sum_centred_sq(xr, mean) / n
    std = np.sqrt(var + eps)
    for j in range(xr.shape[0]):
        outr[j] = (xr[j] - mean) / std * w[j] + b[j]


@numba.njit(**JIT)
def _layer_norm_kernel(x, w, b, eps, n, out):  # x, out: [R, H]
    for i in range(x.shape[0]):
        layer_norm_row(x[i], w, b, eps, n, out[i])


@numba.njit(**JIT)
def _residual_layer_norm_kernel(x, r, rb, has_rb, w, b, eps, n, hsum, out):  # all rows [R, H]
    h = x.shape[1]
    for i in range(x.shape[0]):
        xr = x[i]
        rr = r[i]
        hr = hsum[i]
        if has_rb:
            for j in range(h):
                hr[j] = xr[j] + (rr[j] + rb[j])
        else:
            for j in range(h):
                hr[j] = xr[j] + rr[j]
        layer_norm_row(hr, w, b, eps, n, out[i])


@numba.njit(**INLINE)
def _softmax_rows(sf, of, o, nt, ns, mf, mo, mrs, has_mask, scale, prev, total):
    """``of[o + ti*S : ...] = softmax(sf[...] * scale + mf[mo + ti*mrs : ...])`` for the ``nt`` rows
    of S = ``ns`` from offset ``o`` (``sf`` may be ``of``): scale, mask and maximum; exp; NumPy's
    pairwise sum; a true division. Each row's division rides along the next row's sum (vector adds
    in one dependency chain, divisions on the divider: the time of the longer of the two), the
    pending one given as (``prev``, ``total``), row offset and sum (``prev`` < 0: none); returns the
    last row's, still to divide (:func:`_divide_row`)."""
    for ti in range(nt):
        r = o + ti * ns
        m = _scale_mask_max(sf, r, mf, mo + ti * mrs, has_mask, scale, of, r, ns)
        for j in range(ns):  # v - max(v) <= 0 (or NaN)
            u = np.uintp(r + j)
            of[u] = exp_nonpos(of[u] - m)
        if ns > 128:
            t = pairwise_sum_div_at(of, r, ns, prev, total)
        elif prev < 0:
            t = pairwise_leaf(of, r, ns)
        else:
            t = pairwise_leaf_div(of, r, ns, prev, total)
        prev, total = r, t
    return prev, total


@numba.njit(**INLINE)
def _divide_row(of, prev, ns, total):
    """The division :func:`_softmax_rows` left pending: ``of[prev:prev + ns] /= total``."""
    for j in range(ns):
        u = np.uintp(prev + j)
        of[u] = of[u] / total


@numba.njit(**JIT)
def _masked_softmax_kernel(s, mask, has_mask, scale, out):
    # s, out: [B, N, T, S]; mask: [1|B, 1|N, 1|T, S]. Rows are addressed by offsets into the flat
    # arrays: a row view per row would cost reference counting and a call per helper.
    nb, nh, nt, ns = s.shape
    mb, mh, mt = mask.shape[0], mask.shape[1], mask.shape[2]
    sf, mf, of = s.reshape(-1), mask.reshape(-1), out.reshape(-1)
    prev, total = np.int64(-1), s.dtype.type(1.0)  # the row whose division is pending, and its sum
    for bi in range(nb):
        for hi in range(nh):
            mo = ((bi if mb > 1 else 0) * mh + (hi if mh > 1 else 0)) * mt * ns if has_mask else 0
            prev, total = _softmax_rows(sf, of, ((bi * nh + hi) * nt) * ns, nt, ns, mf, mo, ns if mt > 1 else 0,
                                        has_mask, scale, prev, total)
    if prev >= 0:
        _divide_row(of, prev, ns, total)


# ---------------------------------------------------------------------------------------------
# Python wrappers: check dtypes and shapes, fix layouts, allocate, call.
# ---------------------------------------------------------------------------------------------


def _float_dtype(name: str, a) -> np.dtype:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a.dtype


def _same_dtype(dtype: np.dtype, **arrays) -> None:
    for name, a in arrays.items():
        if a is not None and _float_dtype(name, a) != dtype:
            raise TypeError(
                f"{name} has dtype {a.dtype} but the input is {dtype}; "
                "cast explicitly (the kernels never up- or downcast)"
            )


def _vector(name: str, v, h: int) -> np.ndarray:
    """A length-``h`` parameter vector, C-contiguous (copied if strided or read-only)."""
    if v.shape != (h,):
        raise ValueError(f"{name} must have shape ({h},), got {v.shape}")
    if not (v.flags.c_contiguous and v.flags.writeable):
        v = np.array(v, order="C")  # read-only (mmap'd) parameters would need a second compile
    return v


def _out(out, shape, dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} array of shape {tuple(shape)}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    return out


def _rows(x) -> np.ndarray:
    """``x`` as a C-contiguous, writeable [R, H] array (a view when ``x`` already is one).

    Read-only inputs are copied rather than given a second compiled specialisation.
    """
    x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x, order="C")
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def bias_gelu(y, b=None, *, out=None):
    """Exact GELU of ``y + b``: ``ops.gelu(y + b)``, fused.

    y: [..., H]; b: [H] or None -> [..., H] in y's dtype. ``out=y`` updates ``y`` in place.
    float64 is within a few ulp of ``ops.gelu`` (both erf's are within 1-2 ulp of the truth);
    float32 uses a correctly rounded erf, where ``ops.gelu`` uses glibc's ``erff``.
    """
    dtype = _float_dtype("y", y)
    _same_dtype(dtype, b=b)
    if y.ndim == 0:
        raise ValueError("y must have at least one axis")
    h = y.shape[-1]
    res = _out(out, y.shape, dtype)
    if y.size == 0:
        return res
    has_bias = b is not None
    bv = _vector("b", b, h) if has_bias else np.zeros(1, dtype)
    if res is not y:  # (one kernel, in place: a copy costs a tenth of the GELU, a kernel of its own 0.6 s to compile)
        res[...] = y
    bias_gelu_inplace_kernel(res.reshape(-1, h), bv, has_bias)  # (in place on a fresh GEMM output: no new array)
    return res


def layer_norm(x, weight, bias, eps: float, *, out=None):
    """LayerNorm over the last axis, bitwise equal to ``ops.layer_norm`` (same summation order).

    x: [..., H]; weight, bias: [H] -> [..., H]. ``out=x`` normalises in place.
    """
    dtype = _float_dtype("x", x)
    _same_dtype(dtype, weight=weight, bias=bias)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis, got shape {x.shape}")
    h = x.shape[-1]
    w, b = _vector("weight", weight, h), _vector("bias", bias, h)
    res = _out(out, x.shape, dtype)
    if x.size:
        _layer_norm_kernel(_rows(x), w, b, dtype.type(eps), dtype.type(h), res.reshape(-1, h))
    return res


def residual_layer_norm(x, r, weight, bias, eps: float, *, r_bias=None, h_out=None, out=None):
    """The residual add and the next LayerNorm, fused: ``h = x + (r + r_bias)``, ``ln(h)``.

    x, r: [..., H] (same shape); r_bias: [H] or None (the bias of the linear that made ``r``,
    added first as ``linear`` does); weight, bias: [H]. Returns ``(h, layer_norm(h))``, both
    bitwise equal to the NumPy expressions. ``h_out=x`` updates the residual stream in place.
    """
    dtype = _float_dtype("x", x)
    _same_dtype(dtype, r=r, weight=weight, bias=bias, r_bias=r_bias)
    if x.shape != r.shape:
        raise ValueError(f"x and r must have the same shape, got {x.shape} and {r.shape}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last axis, got shape {x.shape}")
    h = x.shape[-1]
    w, b = _vector("weight", weight, h), _vector("bias", bias, h)
    has_rb = r_bias is not None
    rb = _vector("r_bias", r_bias, h) if has_rb else np.zeros(1, dtype)
    hsum = _out(h_out, x.shape, dtype)
    res = _out(out, x.shape, dtype)
    if x.size:
        _residual_layer_norm_kernel(
            _rows(x), _rows(r), rb, has_rb, w, b, dtype.type(eps), dtype.type(h),
            hsum.reshape(-1, h), res.reshape(-1, h),
        )  # fmt: skip
    return hsum, res


def masked_softmax(scores, mask=None, scale: float = 1.0, *, out=None):
    """``ops.softmax(scores * scale + mask)`` over the last axis, three passes over each row.

    scores: [B, N, T, S] (or fewer leading axes); mask: None or additive, broadcastable as
    [1|B, 1|N, 1|T, S] (fewer axes are prepended with 1), holding 0 or ``finfo(dtype).min``, in
    scores' dtype. ``scale`` is rounded to the dtype and multiplied first, then the mask is added,
    as in the attention. A row masked everywhere gives the uniform distribution, never NaN.
    ``out=scores`` works in place (the attention's scores are a fresh GEMM output).
    """
    dtype = _float_dtype("scores", scores)
    _same_dtype(dtype, mask=mask)
    if not 1 <= scores.ndim <= 4:
        raise ValueError(f"scores must have 1 to 4 axes, got shape {scores.shape}")
    s4 = np.ascontiguousarray(scores) if scores.flags.writeable else np.array(scores, order="C")
    s4 = s4.reshape((1,) * (4 - scores.ndim) + scores.shape)
    res = _out(out, scores.shape, dtype)
    if scores.size == 0:
        return res
    m4 = _mask4(mask, s4.shape, scores.shape, dtype)
    _masked_softmax_kernel(s4, m4, mask is not None, dtype.type(scale), res.reshape(s4.shape))
    return res


def _mask4(mask, shape4, shape, dtype) -> np.ndarray:
    """``mask`` as a C-contiguous [1|B, 1|N, 1|T, S] array (a [1, 1, 1, 1] dummy for None)."""
    if mask is None:
        return np.zeros((1, 1, 1, 1), dtype)
    if mask.ndim > 4:
        raise ValueError(f"mask must have at most 4 axes, got shape {mask.shape}")
    m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    for ax in range(4):
        if m4.shape[ax] not in (1, shape4[ax]):
            raise ValueError(f"mask of shape {mask.shape} does not broadcast against {shape}")
    if m4.shape[3] != shape4[3]:  # a mask constant along the keys: materialise that axis
        m4 = np.broadcast_to(m4, m4.shape[:3] + shape4[3:])
    return np.ascontiguousarray(m4) if m4.flags.writeable else np.array(m4, order="C")


def _attention_args(q, k, v, mask, out, *, contiguous_out: bool = False):
    """The checks and the mask of :func:`attention` and :func:`attention_few` -> (dtype, ``out`` or a
    new [B, N, T, D] array, the mask as [1|B, 1|N, 1|T, S] (:func:`_mask4`), or None where there is
    nothing to compute: no keys or no queries, ``out`` then zeros). ``contiguous_out``: ``out``
    must also have its last axis contiguous and no stride negative."""
    dtype = _float_dtype("q", q)
    _same_dtype(dtype, k=k, v=v, mask=mask)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[:2] + q.shape[3:] != (
        k.shape[:2] + k.shape[3:]
    ):
        raise ValueError(
            f"q must be [B, N, T, D] and k, v [B, N, S, D], got {q.shape}, {k.shape}, {v.shape}"
        )
    if out is None:
        out = np.empty(q.shape, dtype)
    elif not isinstance(out, np.ndarray) or out.shape != q.shape or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} array of shape {q.shape}")
    elif not out.flags.writeable:
        raise ValueError("out must be writeable")
    elif contiguous_out and out.size and (out.strides[-1] != dtype.itemsize or min(out.strides) < 0):
        raise ValueError("out must have its last axis contiguous and no stride negative")
    nb, nh, nt, _ = q.shape
    ns = k.shape[2]
    if ns == 0 or q.size == 0:
        out[...] = 0
        return dtype, out, None
    return dtype, out, _mask4(mask, (nb, nh, nt, ns), (nb, nh, nt, ns), dtype)


def attention(q, k, v, mask=None, scale: float = 1.0, *, out=None):
    """Attention context ``softmax(q @ k^T * scale + mask) @ v``, one (batch, head) at a time, in
    one kernel (:func:`attention_packed_kernel`).

    q: [B, N, T, D]; k, v: [B, N, S, D]; mask as in :func:`masked_softmax` -> [B, N, T, D].
    ``out`` may be any writeable array of that shape and dtype, e.g. the [B, N, T, D] view
    ``buf.transpose(0, 2, 1, 3)`` of a [B, T, N, D] buffer, so the heads land merged. q, k and v
    are read in place when their last axis is contiguous (views of a projection's output are).

    The two products are the packed GEMM's (:mod:`.packed`: each element one chain of fused
    multiply-adds in k order, the same bits whatever the rows, tiles, ISA or thread), k and v
    packed as its weights; between them :func:`masked_softmax`'s softmax, one [T, S] score block
    reused, hot in cache. So the result is bitwise ``packed_linear(q, pack(k))``, that softmax, then
    ``packed_linear(p, pack(v^T))`` for each pair; another summation order than BLAS's, held to
    the reference within the dot-product bounds; the results do not depend on which BLAS kernel
    the CPU picks. Against the same schedule around OpenBLAS's GEMMs (a Python loop over the
    pairs), a base-sized layer's attention at 2x128 and 1x512 took 0.83x and 0.89x the time
    (float32, one thread), base-sized forwards at 8x128 and 4x512 0.96x and 0.98x (A/B in one
    process). Below 128 query rows the batched matmuls remain faster
    (:func:`~refimpl.fast.schedule.attention_context`). A cold compile takes ~4 s (the driver and
    the softmax's rows are compiled into the kernel), once per machine and dtype.
    """
    dtype, out, m4 = _attention_args(q, k, v, mask, out)
    if m4 is None:
        return out
    target = out if out.strides[-1] == dtype.itemsize and min(out.strides) >= 0 else np.empty(q.shape, dtype)
    q, k, v = _readable(q), _readable(k), _readable(v)  # (kept alive: the kernel reads their addresses)
    lay = np.empty(_LAY, np.int64)
    _layout(q, k, v, m4, target, dtype.type(scale), lay)
    n_pairs = q.shape[0] * q.shape[1]  # B * N
    attention_packed_kernel(lay, mask is not None, ATTENTION_LIKE[dtype], n_pairs, packed.panel_width(dtype), packed.KC,
                            packed.MC)
    if target is not out:
        out[...] = target
    return out


# The rows of p a context GEMM takes at a time: below X_PACK_FROM, so that p is read in place (a copy
# of p tile by tile would be shared by only D / P panels).
_CONTEXT_ROWS = packed.X_PACK_FROM - 1


def _make_attention_packed(fingerprint):
    """The kernel, with ``fingerprint`` (:func:`.jobs.code_fingerprint`) as a closure cell: it
    compiles packed.py's driver into itself, and Numba keys a cached function on its own code only
    (a copy cached with another driver or ISA is never loaded)."""

    @numba.njit(**JIT)
    def attention_packed_kernel(lay, has_mask, like, n_pairs, p, kc, mc):  # noqa: C901
        """The attention context of every (batch, head) pair, the arrays as in
        :func:`attention_few_kernel`'s layout vector ``lay`` (B * N = ``n_pairs``); ``p``: the packed kernel's panel
        width for the dtype, ``kc``/``mc``: its blocks (:mod:`.packed`)."""
        fingerprint  # noqa: B018 (in the cache key)
        qf, kf, vf, mf, of, nh, nt, ns, nd, scale = _unpacked(lay, like)
        dt = like.dtype
        npk, npv = (ns + p - 1) // p, (nd + p - 1) // p
        kp = np.zeros(npk * nd * p, dt)  # k [S, D] as a weight's panels (packed.pack_into; padding stays 0)
        vp = np.zeros(npv * ns * p, dt)  # v^T [D, S] as a weight's panels
        qb = np.empty(nt * nd, dt)  # [T, D] the pair's queries, contiguous
        sc = np.empty(nt * ns, dt)  # [T, S] its scores, then probabilities
        cb = np.empty(nt * nd, dt)  # [T, D] its context
        scr = np.empty(max(nt, _CONTEXT_ROWS) * p, dt)  # [R, P] a partial last panel's columns
        xp = np.empty(min(nt, mc) * min(nd, kc), dt)  # q's row block, tile by tile (from X_PACK_FROM rows)
        nob = read_only(np.zeros(1, dt))  # (no bias)
        no = nt < 0  # False, typed as a bool (a literal would compile the driver once more)
        zero = nt - nt
        one = dt.type(1.0)
        for pair in range(n_pairs):
            bi, hi = pair // nh, pair % nh
            qo, qs = _pair_start(lay, _Q, bi, hi), lay[_Q + 2]  # q[bi, hi, 0, 0] and its row stride
            ko, ks = _pair_start(lay, _K, bi, hi), lay[_K + 2]
            vo, vs = _pair_start(lay, _V, bi, hi), lay[_V + 2]
            mo, ms = _pair_start(lay, _M, bi, hi), lay[_M + 2]  # (ms 0: one mask row for every query)
            oo, ors = _pair_start(lay, _O, bi, hi), lay[_O + 2]
            packed.pack_into(kf, ko, ks, 1, ns, nd, kp, p)  # k [S, D] as the weight [O = S, K = D]
            for t in range(nt):  # q's rows, contiguous (unsigned offsets: the copy vectorises)
                for d in range(nd):
                    qb[np.uintp(t * nd + d)] = qf[np.uintp(qo + t * qs + d)]
            # scores [T, S] = q [T, D] @ k^T, then the softmax of each row in place
            packed.drive(read_only(qb), read_only(kp), nob, no, sc, scr, xp, nt, nd, ns, kc, mc, zero, npk, no)
            last, total = _softmax_rows(sc, sc, zero, nt, ns, mf, mo, ms, has_mask, scale, zero - 1, one)
            _divide_row(sc, last, ns, total)
            packed.pack_into(vf, vo, 1, vs, nd, ns, vp, p)  # v^T [D, S] as the weight [O = D, K = S]
            for r0 in range(0, nt, _CONTEXT_ROWS):  # context [T, D] = p [T, S] @ v, p read in place
                r1 = min(nt, r0 + _CONTEXT_ROWS)
                packed.drive(read_only(sc[r0 * ns:r1 * ns]), read_only(vp), nob, no, cb[r0 * nd:r1 * nd], scr, xp,
                             r1 - r0, ns, nd, kc, mc, zero, npv, no)
            for t in range(nt):
                for d in range(nd):
                    of[np.uintp(oo + t * ors + d)] = cb[np.uintp(t * nd + d)]

    return attention_packed_kernel


attention_packed_kernel = _make_attention_packed(code_fingerprint())


# ---------------------------------------------------------------------------------------------
# Attention for a few queries (a decoding step): one kernel over (batch, head) pairs
# ---------------------------------------------------------------------------------------------

# The layout vector of attention_few_kernel (int64): the sizes; the element strides (batch, head,
# row) of q, k, v, the mask and the output (each array's last axis is contiguous); the scale (its
# slot holds the float64's bits); each array's address and its extent (elements from its first to its last).
_NH, _NT, _NS, _ND, _Q, _K, _V, _M, _O, _SCALE, _ADDR, _EXT, _LAY = 0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 20, 25, 30


@numba.njit(**INLINE)
def _unpacked(lay, like):
    """The layout vector read back: q, k, v, the mask and out as flat runs of ``like``'s dtype
    (carrays at their addresses), N, T, S, D, and the scale in that dtype (exactly its value)."""
    qf, kf, vf, mf, of = [numba.carray(pointer_like(lay[_ADDR + a], like), lay[_EXT + a]) for a in range(5)]
    scale = like.dtype.type(f64_from_bits(lay[_SCALE]))
    return qf, kf, vf, mf, of, lay[_NH], lay[_NT], lay[_NS], lay[_ND], scale


@numba.njit(**INLINE)
def _pair_start(lay, at, bi, hi):
    """Where the array whose strides start at slot ``at`` (_Q, _K, _V, _M or _O) begins for batch
    row ``bi`` and head ``hi`` (its row 0; row t is ``lay[at + 2]`` elements on)."""
    return bi * lay[at] + hi * lay[at + 1]


@numba.njit(**INLINE)
def _scores(qf, qo, kf, ko, ks, ns, nd, sc, nxt):
    """``sc[j] = q . k_j`` for j < S (k_j at ``ko + j*ks``): eight interleaved chains of fused
    multiply-adds per key (lane l takes d = l, l + 8, ...) combined as
    ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), then the last D % 8 terms in order. Four keys at a time
    (four independent chains); a key's value is the same wherever it falls. ``nxt`` >= 0: where
    the next pair's keys start, asked for (into L2) row by row meanwhile."""
    m = nd - nd % 8
    zero = sc.dtype.type(0.0)
    j = 0
    while j < ns:
        g = min(4, ns - j)  # keys this step; past the row's end the last key is repeated, unused
        k0 = ko + j * ks
        k1, k2, k3 = k0 + min(1, g - 1) * ks, k0 + min(2, g - 1) * ks, k0 + min(3, g - 1) * ks
        s0 = s1 = s2 = s3 = zero
        if nxt >= 0:
            for i in range(g):
                for e in range(0, nd, 64 // sc.itemsize):
                    prefetch(kf, nxt + (j + i) * ks + e)
        if m:
            qv = v8_load(qf, qo)
            r0, r1 = v_mul(qv, v8_load(kf, k0)), v_mul(qv, v8_load(kf, k1))
            r2, r3 = v_mul(qv, v8_load(kf, k2)), v_mul(qv, v8_load(kf, k3))
            for d in range(8, m, 8):
                qv = v8_load(qf, qo + d)
                r0, r1 = v_fma(qv, v8_load(kf, k0 + d), r0), v_fma(qv, v8_load(kf, k1 + d), r1)
                r2, r3 = v_fma(qv, v8_load(kf, k2 + d), r2), v_fma(qv, v8_load(kf, k3 + d), r3)
            s0, s1, s2, s3 = lane_sum(r0), lane_sum(r1), lane_sum(r2), lane_sum(r3)
        for d in range(m, nd):
            qd = qf[np.uintp(qo + d)]
            s0, s1 = fma(qd, kf[np.uintp(k0 + d)], s0), fma(qd, kf[np.uintp(k1 + d)], s1)
            s2, s3 = fma(qd, kf[np.uintp(k2 + d)], s2), fma(qd, kf[np.uintp(k3 + d)], s3)
        sc[np.uintp(j)] = s0
        if g > 1:
            sc[np.uintp(j + 1)] = s1
        if g > 2:
            sc[np.uintp(j + 2)] = s2
        if g > 3:
            sc[np.uintp(j + 3)] = s3
        j += g


@numba.njit(**INLINE)
def _context(sc, vf, vo, vs, ns, nd, of, oo, nxt):
    """``out[d] = sum_j p_j v_j[d]`` (v_j at ``vo + j*vs``): for each d one chain of fused
    multiply-adds from 0 in j order. Eight lanes x eight vectors at a time, kept in registers
    (eight independent chains), then eight lanes, then the last D % 8 one by one. ``nxt`` >= 0:
    where the next pair's values start, asked for meanwhile (with the first 64 of each row)."""
    zero = sc.dtype.type(0.0)
    z = v8_splat(zero)
    d = 0
    while d + 64 <= nd:
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z
        for j in range(ns):
            if nxt >= 0:
                for e in range(0, 64, 64 // sc.itemsize):
                    prefetch(vf, nxt + j * vs + d + e)
            p, w = v8_splat(sc[j]), vo + j * vs + d
            a0, a1 = v_fma(p, v8_load(vf, w), a0), v_fma(p, v8_load(vf, w + 8), a1)
            a2, a3 = v_fma(p, v8_load(vf, w + 16), a2), v_fma(p, v8_load(vf, w + 24), a3)
            a4, a5 = v_fma(p, v8_load(vf, w + 32), a4), v_fma(p, v8_load(vf, w + 40), a5)
            a6, a7 = v_fma(p, v8_load(vf, w + 48), a6), v_fma(p, v8_load(vf, w + 56), a7)
        v8_store(of, oo + d, a0)
        v8_store(of, oo + d + 8, a1)
        v8_store(of, oo + d + 16, a2)
        v8_store(of, oo + d + 24, a3)
        v8_store(of, oo + d + 32, a4)
        v8_store(of, oo + d + 40, a5)
        v8_store(of, oo + d + 48, a6)
        v8_store(of, oo + d + 56, a7)
        d += 64
    while d + 8 <= nd:
        a0 = z
        for j in range(ns):
            a0 = v_fma(v8_splat(sc[j]), v8_load(vf, vo + j * vs + d), a0)
        v8_store(of, oo + d, a0)
        d += 8
    while d < nd:
        a = zero
        for j in range(ns):
            a = fma(sc[j], vf[np.uintp(vo + j * vs + d)], a)
        of[np.uintp(oo + d)] = a
        d += 1


@numba.njit(**JIT)
def attention_few_kernel(lay, has_mask, like, p0, p1):
    """The attention context of (batch, head) pairs p0..p1 (pair = batch * N + head), one query row
    at a time: the scores q . k_j (:func:`_scores`), the softmax of ``s * scale + mask`` as
    :func:`masked_softmax` computes it (scale, mask and maximum; exp; NumPy's pairwise sum; a true
    division), then ``sum_j p_j v_j`` (:func:`_context`), asking for the next pair's keys and values
    meanwhile (they come from memory: the weights streamed since the last step pushed them out of
    cache; on one core, a decoding step at batch 8 took 0.97x the time with it than without). The
    arrays, their sizes, strides and the scale are read from the layout vector ``lay``
    (:func:`_layout`); ``like``: an array of their dtype. Whatever pairs a call gets, each row's
    values are the same."""
    # q [B, N, T, D], k and v [B, N, S, D], the mask [1|B, 1|N, 1|T, S], out [B, N, T, D], each as
    # the flat run of its elements; a row's offset there is the sum of index x stride.
    qf, kf, vf, mf, of, nh, nt, ns, nd, scale = _unpacked(lay, like)
    one = like.dtype.type(1.0)
    sc = np.empty(ns, like.dtype)  # [S], one row of scores, then probabilities
    # (offsets as int64 variables: with the literals 0 and -1 the recursive pairwise_sum_div_at got
    # a specialisation whose copy loaded from Numba's cache called a null address)
    lo = np.int64(0)
    for pair in range(p0, p1):
        bi, hi = pair // nh, pair % nh
        qo = _pair_start(lay, _Q, bi, hi)  # q[bi, hi, 0, :]
        ko = _pair_start(lay, _K, bi, hi)  # k[bi, hi, 0, :] (row j at ko + j * its row stride)
        vo = _pair_start(lay, _V, bi, hi)  # v[bi, hi, 0, :]
        mo = _pair_start(lay, _M, bi, hi)  # the mask's row for (bi, hi), query 0
        oo = _pair_start(lay, _O, bi, hi)  # out[bi, hi, 0, :]
        bn, hn = (pair + 1) // nh, (pair + 1) % nh  # the next pair's batch row and head
        kn = _pair_start(lay, _K, bn, hn) if pair + 1 < p1 else -1  # its keys, asked for meanwhile
        vn = _pair_start(lay, _V, bn, hn) if pair + 1 < p1 else -1  # its values
        for ti in range(nt):
            _scores(qf, qo + ti * lay[_Q + 2], kf, ko, lay[_K + 2], ns, nd, sc, kn if ti == 0 else -1)
            m = _scale_mask_max(sc, lo, mf, mo + ti * lay[_M + 2], has_mask, scale, sc, lo, ns)
            for j in range(ns):  # v - max(v) <= 0 (or NaN)
                sc[j] = exp_nonpos(sc[j] - m)
            total = pairwise_leaf(sc, lo, ns) if ns <= 128 else pairwise_sum_div_at(sc, lo, ns, lo - 1, one)
            for j in range(ns):
                sc[j] = sc[j] / total
            _context(sc, vf, vo, lay[_V + 2], ns, nd, of, oo + ti * lay[_O + 2], vn if ti == 0 else -1)


register_attention_kernel(attention_few_kernel)  # (the two-core jobs, refimpl.fast.jobs)


LAYOUT_SIZE = _LAY  # int64 entries in attention_few_kernel's layout vector


@numba.njit(**INLINE)
def layout_sizes(lay, nh, nt, ns, nd, scale):
    """N heads, T query rows, S keys, D and the scale (the dtype's value, as a float64) into
    :func:`attention_few_kernel`'s layout vector ``lay`` (int64, ``LAYOUT_SIZE``)."""
    lay[_NH], lay[_NT], lay[_NS], lay[_ND] = nh, nt, ns, nd
    lay[_SCALE] = f64_bits(scale)  # (its bits: a view of lay as float64 costs ~0.2 s of compile per function)


@numba.njit(**INLINE)
def layout_array(lay, at, address, extent, batch_stride, head_stride, row_stride):
    """Array number ``at`` (0 q, 1 k, 2 v, 3 the mask, 4 out) into the layout vector: its address,
    its extent (elements from its first to one past its last) and its batch, head and row strides
    in elements (0 along an axis of size 1: it broadcasts)."""
    s = _Q + 3 * at  # (_Q, _K, _V, _M, _O: three strides each, in that order)
    lay[s], lay[s + 1], lay[s + 2] = batch_stride, head_stride, row_stride
    lay[_ADDR + at], lay[_EXT + at] = address, extent


@numba.njit(**INLINE)
def _place(lay, a, at):
    """4-D array ``a`` as array number ``at`` of the layout vector (:func:`layout_array`)."""
    it = a.itemsize
    ext = 1
    for ax in range(4):
        ext += (a.shape[ax] - 1) * (a.strides[ax] // it)
    layout_array(lay, at, a.ctypes.data, ext, a.strides[0] // it if a.shape[0] > 1 else 0,
                 a.strides[1] // it if a.shape[1] > 1 else 0, a.strides[2] // it if a.shape[2] > 1 else 0)


@numba.njit(**JIT)
def _layout(q, k, v, m4, out, scale, lay):
    """Fill the layout vector of :func:`attention_few_kernel` for these 4-D arrays (non-empty, the
    last axis of each contiguous, no stride negative: the caller checks; any other strides)."""
    layout_sizes(lay, q.shape[1], q.shape[2], k.shape[2], q.shape[3], np.float64(scale))
    _place(lay, q, 0)
    _place(lay, k, 1)
    _place(lay, v, 2)
    _place(lay, m4, 3)
    _place(lay, out, 4)


def _readable(a):
    """``a`` itself where its last axis is contiguous and no stride is negative, else a C copy."""
    it = a.itemsize
    return a if a.strides[-1] == it and min(a.strides) >= 0 else np.ascontiguousarray(a)


def attention_few(q, k, v, mask=None, scale: float = 1.0, *, out=None, cores: int = 1):
    """Attention context ``softmax(q @ k^T * scale + mask) @ v`` for a few query positions (a
    decoding step: T = 1) in one kernel over the (batch, head) pairs (:func:`attention_few_kernel`).

    q: [B, N, T, D]; k, v: [B, N, S, D], any strides (views of a cache's buffers are read in place);
    mask as in :func:`masked_softmax` -> [B, N, T, D] (``out``: any writeable array of that shape
    whose last axis is contiguous). Where BLAS would run B * N matrix-vector products and the
    softmax a pass of its own, each pair's keys and values are read once and its scores stay in
    cache. ``cores=2`` shares the pairs with :mod:`.jobs`' helper thread (chunks of pairs claimed
    as they come): the same values whichever thread computes a pair. The softmax is
    :func:`masked_softmax`'s; the two products are other summation orders than BLAS's, held to
    the reference within the dot-product bound.
    """
    if cores not in (1, 2):
        raise ValueError(f"cores must be 1 or 2, got {cores!r}")
    dtype, out, m4 = _attention_args(q, k, v, mask, out, contiguous_out=True)
    if m4 is None:
        return out
    q, k, v = _readable(q), _readable(k), _readable(v)  # (kept alive: the kernel reads their addresses)
    return _attention_few_run(q, k, v, m4, mask is not None, dtype.type(scale), out, cores)


def attention_few_unchecked(q, k, v, bias, scale: float, out, cores: int):
    """:func:`attention_few` on arrays the fast forward made, without its argument checks (in a
    decoding loop they cost more than the kernel: ~35 us a layer against its ~16 us; a step at
    batch 1 0.988x the time without them). The caller guarantees: q [B, N, T, D], k, v [B, N, S, D]
    (S >= 1) and out [B, N, T, D] of one float dtype, each with its last axis contiguous and no
    stride negative; bias None or a C-contiguous [1|B, 1|N, 1|T, S] array of that dtype."""
    dtype = q.dtype
    has_mask = bias is not None
    return _attention_few_run(q, k, v, bias if has_mask else _NO_MASK[dtype], has_mask, dtype.type(scale), out, cores)


_NO_MASK = {dtype: np.zeros((1, 1, 1, 1), dtype) for dtype in DTYPES}  # (never read: has_mask is False)


def _attention_few_run(q, k, v, m4, has_mask: bool, scale_t, out, cores: int):
    """The layout vector, then the kernel on this core or a job on both (arrays as checked by the
    callers above) -> out."""
    nb, nh, _, nd = q.shape
    lay = np.empty(_LAY, np.int64)
    _layout(q, k, v, m4, out, scale_t, lay)
    like = ATTENTION_LIKE[q.dtype]  # (the dtype; as the attention jobs pass it)
    if cores == 2 and attention_on_two_cores(lay, has_mask, like, nb * nh, nb * nh * k.shape[2] * nd):
        return out
    attention_few_kernel(lay, has_mask, like, 0, nb * nh)
    return out


def warmup(dtype=np.float32) -> None:
    """Compile (or load from the on-disk cache) every kernel for ``dtype``; idempotent.

    The first call of each kernel in a fresh process otherwise pays this cost: a few seconds
    of LLVM work with a cold cache, a fraction of a second with a warm one.
    """
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    x = np.ones((2, 8), dtype)
    v = np.ones(8, dtype)
    bias_gelu(x, v)
    bias_gelu(x, v, out=x)  # the in-place kernel
    layer_norm(x, v, v, 1e-5)
    residual_layer_norm(x, x, v, v, 1e-5, r_bias=v)
    masked_softmax(np.ones((1, 1, 2, 8), dtype), np.zeros((1, 1, 1, 8), dtype), 0.5)
    attention_few(np.ones((1, 1, 1, 8), dtype), np.ones((1, 1, 2, 8), dtype), np.ones((1, 1, 2, 8), dtype),
                  np.zeros((1, 1, 1, 2), dtype))
    # attention() adds no kernel of its own: it runs _masked_softmax_kernel on [1, 1, T, S] blocks.
