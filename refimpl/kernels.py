"""Numba fast paths for the non-GEMM work of a forward pass, each beside its NumPy definition.

======================================================  ======================================
NumPy definition (:mod:`refimpl.ops`)                   fast path here
======================================================  ======================================
``ops.gelu(y + b)``                                     :func:`bias_gelu` ``(y, b)``
``ops.layer_norm(x, w, b, eps)``                        :func:`layer_norm` ``(x, w, b, eps)``
``h = x + (r + rb); ops.layer_norm(h, w, b, eps)``      :func:`residual_layer_norm` ``-> (h, ln)``
``ops.softmax(scores * scale + mask)``                  :func:`masked_softmax`
``ops.softmax(q @ k^T * scale + mask) @ v``             :func:`attention` (per-head schedule)
``ops.linear(x, w, b)``                                 ``_linear`` (bias added in place)
``ops.attention_context(q, k, v, mask, scale)``         ``_attention_context`` (no probs kept)
======================================================  ======================================

The functions in ``ops`` stay the definitions; ``tests/test_kernels.py`` holds each fast path to its
definition. The rules every kernel keeps:

- **The reference's operation order, in the input's dtype.** float32 in, float32 arithmetic out;
  the same additions, multiplications and divisions as the NumPy expression, in the same order
  (``x * 0.5 * (1 + erf(x / sqrt 2))``; ``(x - mean) / sqrt(var + eps) * w + b``;
  ``exp(v - max) / sum``). Sums use NumPy's own pairwise summation order
  (:func:`_pairwise_sum`), so LayerNorm is bitwise equal to ``ops.layer_norm``.
- **Two elementary functions are our own**, because libm's ``erf``/``exp`` do not vectorise (a
  libm ``erf`` costs ~22 ns an element here, as slow as the whole NumPy expression). ``_erf`` and
  ``_exp`` are branch-free polynomial evaluations that LLVM turns into SIMD code:

  * float64: within 2 ulp of the true ``erf`` (libm: 1 ulp) and 1 ulp of the true ``exp``.
  * float32: evaluated in float64 and rounded once, so they return the correctly rounded
    float32 value (up to ~1e-12 relative, i.e. practically always). This is the one place a
    float32 kernel computes in float64: it makes ``erf``/``exp`` *more* accurate than glibc's
    ``erff`` (up to 1 ulp off) and NumPy's SIMD ``expf``; the arithmetic around them stays float32.

  The polynomials use fused multiply-adds (``llvm.fma``, a correctly rounded operation, not a
  fast-math contraction); there is no ``fastmath`` anywhere.
- **Serial kernels, parallel batches.** On a 2-core machine, ``prange`` kernels alternating with
  OpenBLAS GEMMs starve each other's spinning threads; every kernel here is single-threaded and
  releases the GIL. Parallelism comes from :func:`_split_batch` instead: the encoder runs the two
  halves of a batch on two threads, each with single-threaded OpenBLAS, so the GEMMs *and* the
  kernels use both cores and no BLAS worker spins beside a kernel.
- **Lazy compilation.** ``@njit(cache=True)`` without signatures: nothing compiles at import.
  :func:`warmup` compiles (or loads from ``__pycache__``) every kernel for one dtype.

Layouts: every wrapper accepts any strides and makes C-contiguous copies where needed (parameters
and contiguous activations are used as they are). The feature axis (``H`` or ``S``) is the last.
``out=`` arrays must be C-contiguous, of the result's shape and dtype; they may alias the input
(``bias_gelu(y, b, out=y)``, ``masked_softmax(s, m, c, out=s)``) for in-place updates.

Shape legend: B batch, N heads, T query length, S key length, H hidden (or intermediate) size.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = [
    "attention", "bias_gelu", "layer_norm", "masked_softmax", "residual_layer_norm", "warmup",
]

_JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
# Loop- and branch-free scalar helpers are inlined in Numba IR: LLVM's inliner gives up on the
# bigger ones (erf), and a call left in a loop stops its vectorisation. (Their conditionals go
# through _select, which LLVM inlines, so Numba's inliner never sees a branch.)
_INLINE = dict(_JIT, inline="always")
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# Two LLVM primitives: a fused multiply-add and the float64 with a given bit pattern (for 2**k).
# ---------------------------------------------------------------------------------------------


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``; a single vfmadd instruction on x86-64 with FMA)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bit pattern is the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


# ---------------------------------------------------------------------------------------------
# Polynomial coefficients (highest degree first), made by _derive_polynomials() below: Chebyshev
# interpolation at 60 digits (a weighted least-squares fit for _ERF64_G), rounded to float64.
# ---------------------------------------------------------------------------------------------

# erf(a)/a as a polynomial in (a*a - 2), a in [0, 2]; degree 17, fit error 1.7e-18.
_ERF64_A = np.array([
    -1.4399844165014253e-17, 2.62738924491641e-16, -4.277203562413309e-15,
    6.916266960425581e-14, -1.0519610771735585e-12, 1.494076148784729e-11,
    -1.975144017269353e-10, 2.417774471448454e-09, -2.723881587421338e-08,
    2.8047269055247723e-07, -2.6183088556977705e-06, 2.1954553493521303e-05,
    -0.00016358986987993835, 0.0010705215357389465, -0.0060828471811443866,
    0.029869784652462907, -0.1305559304656227, 0.674933236039655,
])  # fmt: skip
# exp(a*a) * erfc(a) in (a - 4), a in [2, 6], error weighted by exp(-a*a) (erf needs erfc only to
# an absolute 1e-17); degree 14, weighted fit error 8.5e-18.
_ERF64_G = np.array([
    1.040271352328754e-09, 1.0350793523141296e-08, 5.34398170323795e-08,
    1.4754221359186217e-07, 3.070039067348844e-07, 1.6001252672743874e-07,
    8.584184597358784e-07, -3.599009446996965e-06, 1.6720383326656237e-05,
    -8.002790177609592e-05, 0.0003703256205377073, -0.0016811750838132084,
    0.0074654382649187055, -0.03238350527712299, 0.13699945764359087,
])  # fmt: skip
# (exp(r) - 1)/r in r, r in [-0.35, 0.35]; degree 10, fit error 2.0e-17.
_EXPM1_64 = np.array([
    2.5106262550879078e-08, 2.762773069846965e-07, 2.755725286336732e-06,
    2.4801501014878055e-05, 0.00019841269876840357, 0.001388888893514123,
    0.008333333333325551, 0.04166666666656548, 0.1666666666666667,
    0.5000000000000007, 1.0,
])  # fmt: skip
# For float32 results (evaluated in float64, fit error ~1e-12 << half a float32 ulp):
# erf(a)/a in (a*a - 3.125), a in [0, 2.5]; degree 15, fit error 3.0e-13.
_ERF32_A = np.array([
    -1.7026826481167547e-15, 2.811451285500127e-14, -3.7097780445134957e-13,
    5.2971449827084245e-12, -7.149351198581407e-11, 8.850440311103123e-10,
    -1.010023481362381e-08, 1.0574751536751509e-07, -1.008286899283602e-06,
    8.69002149660354e-06, -6.718378130935967e-05, 0.00046280257099353886,
    -0.0028332835062368352, 0.015582565207627491, -0.08145319520723758,
    0.5586599906117835,
])  # fmt: skip
# erf(a) in (a - 3.25), a in [2.5, 4] (beyond 3.9 erf rounds to 1 in float32); degree 13.
_ERF32_D = np.array([
    -4.120479932340304e-07, 1.8507026699301834e-06, -2.970783088594121e-06,
    -2.2726466573410834e-06, 2.5954873235086497e-05, -8.167184101294204e-05,
    0.0001699833186437005, -0.0002635234532314937, 0.0003137979854327603,
    -0.0002865698263222897, 0.00019580968521506247, -9.48643150557739e-05,
    2.9189025537042744e-05, 0.9999956972204359,
])  # fmt: skip
# (exp(r) - 1)/r in r, r in [-0.35, 0.35]; degree 7, fit error 5.0e-12.
_EXPM1_32 = np.array([
    2.4869188954759244e-05, 0.00019908888752377812, 0.001388883711096176,
    0.008333281538106084, 0.041666666793542445, 0.1666666679358881,
    0.4999999999995143, 0.9999999999951411,
])  # fmt: skip

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)  # as ops.gelu writes it: x / math.sqrt(2.0), rounded to the dtype


@numba.njit(**_JIT)
def _select(cond, a, b):
    """``a if cond else b`` (a select instruction once inlined)."""
    return a if cond else b


# One Horner evaluation per table. Each reads its table as a global: LLVM then sees constant
# coefficients and unrolls the loop (an array passed as an argument defeats that, and with it the
# vectorisation of every loop that calls these).


@numba.njit(**_JIT)
def _poly_erf64_a(w):
    p = _ERF64_A[0]
    for k in range(1, _ERF64_A.shape[0]):
        p = _fma(p, w, _ERF64_A[k])
    return p


@numba.njit(**_JIT)
def _poly_erf64_g(w):
    p = _ERF64_G[0]
    for k in range(1, _ERF64_G.shape[0]):
        p = _fma(p, w, _ERF64_G[k])
    return p


@numba.njit(**_JIT)
def _poly_expm1_64(w):
    p = _EXPM1_64[0]
    for k in range(1, _EXPM1_64.shape[0]):
        p = _fma(p, w, _EXPM1_64[k])
    return p


@numba.njit(**_JIT)
def _poly_erf32_a(w):
    p = _ERF32_A[0]
    for k in range(1, _ERF32_A.shape[0]):
        p = _fma(p, w, _ERF32_A[k])
    return p


@numba.njit(**_JIT)
def _poly_erf32_d(w):
    p = _ERF32_D[0]
    for k in range(1, _ERF32_D.shape[0]):
        p = _fma(p, w, _ERF32_D[k])
    return p


@numba.njit(**_JIT)
def _poly_expm1_32(w):
    p = _EXPM1_32[0]
    for k in range(1, _EXPM1_32.shape[0]):
        p = _fma(p, w, _EXPM1_32[k])
    return p


# ---------------------------------------------------------------------------------------------
# Scalar elementary functions. float64: _exp_f64, _erf_f64. float32 in/out: _exp_f32, _erf_f32.
# Branch-free (selects, no early returns) so that loops calling them vectorise.
# ---------------------------------------------------------------------------------------------


@numba.njit(**_INLINE)
def _exp_f64(x):
    """exp(x) in float64, within 1 ulp; exact 1 at 0, 0 below -745.2, inf above 709.8, NaN kept.

    x = k ln2 + r (Cody-Waite, |r| <= 0.35); exp(r) = 1 + r q(r); 2**k applied as two halves so
    that results in the subnormal range are rounded once, like libm's.
    """
    xc = min(max(x, -746.0), 710.0)
    kf = np.floor(xc * _LOG2E + 0.5)
    r = _fma(-kf, _LN2_LO, _fma(-kf, _LN2_HI, xc))  # the inner product and difference are exact
    p = _fma(r, _poly_expm1_64(r), 1.0)
    k = np.int64(kf)
    k1 = k >> 1
    y = p * _f64_from_bits((k1 + 1023) << 52) * _f64_from_bits((k - k1 + 1023) << 52)
    return _select(x == x, y, x)


@numba.njit(**_INLINE)
def _erf_f64(u):
    """erf(u) in float64, within 2 ulp of the true value (measured; glibc's erf: 1 ulp).

    |u| < 2: u * A(u*u). 2 <= |u|: 1 - exp(-u*u) * G(|u|), |u| clamped to 6 (erf(6) rounds to 1).
    -u*u carries a rounding error of up to 36 * 2**-53 relative, which erfc <= 0.005 scales far
    below an ulp of erf, so fdlibm's extra-precise splitting of u*u is not needed for erf.
    """
    a = abs(u)
    small = a * _poly_erf64_a(a * a - 2.0)
    ac = min(max(a, 2.0), 6.0)
    tail = 1.0 - _exp_f64(-(ac * ac)) * _poly_erf64_g(ac - 4.0)
    r = _select(a >= 2.0, tail, small)  # NaN takes `small` and stays NaN
    return math.copysign(r, u)


@numba.njit(**_INLINE)
def _exp_f32(x):
    """exp(x) for float32 x: computed in float64 (rel. error ~1e-12), rounded once to float32."""
    xd = np.float64(x)
    xc = min(max(xd, -150.0), 90.0)  # exp(-150) rounds to 0 and exp(90) to inf in float32
    kf = np.floor(xc * _LOG2E + 0.5)
    r = _fma(-kf, _LN2, xc)  # |k| <= 217: error <= 217 * |ln2 - _LN2| = 3e-15, ample for float32
    p = _fma(r, _poly_expm1_32(r), 1.0)
    y = np.float32(p * _f64_from_bits((np.int64(kf) + 1023) << 52))
    return _select(x == x, y, x)


@numba.njit(**_INLINE)
def _erf_f32(u):
    """erf(u) for float32 u: computed in float64 (abs. error ~3e-13), rounded once to float32."""
    ud = np.float64(u)
    a = abs(ud)
    small = a * _poly_erf32_a(a * a - 3.125)
    tail = _poly_erf32_d(min(a, 4.0) - 3.25)
    r = _select(a >= 2.5, tail, small)
    return np.float32(math.copysign(r, ud))


@numba.njit(**_INLINE)
def _gelu_f64(z):
    return z * 0.5 * (1.0 + _erf_f64(z / _SQRT2))


@numba.njit(**_INLINE)
def _gelu_f32(z):
    return z * np.float32(0.5) * (np.float32(1.0) + _erf_f32(z / np.float32(_SQRT2)))


# dtype dispatch for the generic kernels: `_gelu(z)` and `_exp(x)` resolve on the scalar's type.
def _gelu(z):  # pragma: no cover - typed by the overload below; the definition is ops.gelu
    raise NotImplementedError


def _exp(x):  # pragma: no cover - typed by the overload below
    raise NotImplementedError


@overload(_gelu, jit_options=_JIT, inline="always")
def _gelu_overload(z):
    if z == types.float32:
        return lambda z: _gelu_f32(z)
    if z == types.float64:
        return lambda z: _gelu_f64(z)
    return None


@overload(_exp, jit_options=_JIT, inline="always")
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


# ---------------------------------------------------------------------------------------------
# Reductions in NumPy's order (numpy/_core/src/umath/loops_utils.h.src, ``pairwise_sum``):
# below 8 elements a plain loop from 0; up to 128, eight interleaved accumulators combined as
# ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) and the tail added in order; above, split at n/2 rounded
# down to a multiple of 8 and recurse. ``np.add.reduce`` (so ``np.sum``/``np.mean``) over a
# contiguous last axis sums each row this way.
# ---------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _pairwise_sum(a):
    n = a.shape[0]
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            res += a[i]
        return res
    if n <= 128:
        r0, r1, r2, r3 = a[0], a[1], a[2], a[3]
        r4, r5, r6, r7 = a[4], a[5], a[6], a[7]
        m = n - n % 8
        for i in range(8, m, 8):
            u = np.uintp(i)  # unsigned: no negative-index wraparound, so the 8 loads vectorise
            r0 += a[u]
            r1 += a[u + 1]
            r2 += a[u + 2]
            r3 += a[u + 3]
            r4 += a[u + 4]
            r5 += a[u + 5]
            r6 += a[u + 6]
            r7 += a[u + 7]
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(m, n):
            res += a[i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a[:n2]) + _pairwise_sum(a[n2:])


@numba.njit(**_JIT)
def _pairwise_sum_centred_sq(a, mean):
    """``_pairwise_sum((a - mean) * (a - mean))`` without storing the squares."""
    n = a.shape[0]
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            d = a[i] - mean
            res += d * d
        return res
    if n <= 128:
        d0, d1, d2, d3 = a[0] - mean, a[1] - mean, a[2] - mean, a[3] - mean
        d4, d5, d6, d7 = a[4] - mean, a[5] - mean, a[6] - mean, a[7] - mean
        r0, r1, r2, r3 = d0 * d0, d1 * d1, d2 * d2, d3 * d3
        r4, r5, r6, r7 = d4 * d4, d5 * d5, d6 * d6, d7 * d7
        m = n - n % 8
        for i in range(8, m, 8):
            u = np.uintp(i)
            d0, d1, d2, d3 = a[u] - mean, a[u + 1] - mean, a[u + 2] - mean, a[u + 3] - mean
            d4, d5, d6, d7 = a[u + 4] - mean, a[u + 5] - mean, a[u + 6] - mean, a[u + 7] - mean
            r0 += d0 * d0
            r1 += d1 * d1
            r2 += d2 * d2
            r3 += d3 * d3
            r4 += d4 * d4
            r5 += d5 * d5
            r6 += d6 * d6
            r7 += d7 * d7
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(m, n):
            d = a[i] - mean
            res += d * d
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum_centred_sq(a[:n2], mean) + _pairwise_sum_centred_sq(a[n2:], mean)


@numba.njit(**_JIT)
def _row_max(a):
    """max(a), a non-empty: eight interleaved maxima (exact in any order), then the tail.

    NaN is not propagated here (np.max does), and need not be: a NaN in the row makes its
    exp(v - max) and so the row sum NaN, and the whole row NaN, as in the reference.
    """
    n = a.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    m = n - n % 8
    for i in range(0, m, 8):
        u = np.uintp(i)
        m0 = max(m0, a[u])
        m1 = max(m1, a[u + 1])
        m2 = max(m2, a[u + 2])
        m3 = max(m3, a[u + 3])
        m4 = max(m4, a[u + 4])
        m5 = max(m5, a[u + 5])
        m6 = max(m6, a[u + 6])
        m7 = max(m7, a[u + 7])
    res = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for i in range(m, n):
        res = max(res, a[i])
    return res


# ---------------------------------------------------------------------------------------------
# Kernels. Arrays are C-contiguous; rows are the last axis. Scalars (eps, n, scale) arrive
# already in the arrays' dtype, so every operation stays in that dtype.
# ---------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _bias_gelu_kernel(y, b, has_bias, out):  # y, out: [R, H]; b: [H]
    rows, h = y.shape
    for i in range(rows):
        yr = y[i]
        outr = out[i]
        if has_bias:
            for j in range(h):
                outr[j] = _gelu(yr[j] + b[j])
        else:
            for j in range(h):
                outr[j] = _gelu(yr[j])


@numba.njit(**_JIT)
def _bias_gelu_inplace_kernel(y, b, has_bias):  # y: [R, H], updated in place; b: [H]
    # Each row goes through a scratch row: with y read and written in one loop, LLVM cannot rule
    # out that b aliases y and keeps the loop scalar (~6x slower); the scratch loop vectorises,
    # and the copy back is from L1.
    rows, h = y.shape
    tmp = np.empty(h, y.dtype)
    for i in range(rows):
        yr = y[i]
        if has_bias:
            for j in range(h):
                tmp[j] = _gelu(yr[j] + b[j])
        else:
            for j in range(h):
                tmp[j] = _gelu(yr[j])
        for j in range(h):
            yr[j] = tmp[j]


@numba.njit(**_JIT)
def _layer_norm_row(xr, w, b, eps, n, outr):  # xr, outr: [H] (may alias); n = H in the dtype
    mean = _pairwise_sum(xr) / n
    var = _pairwise_sum_centred_sq(xr, mean) / n
    std = np.sqrt(var + eps)
    for j in range(xr.shape[0]):
        outr[j] = (xr[j] - mean) / std * w[j] + b[j]


@numba.njit(**_JIT)
def _layer_norm_kernel(x, w, b, eps, n, out):  # x, out: [R, H]
    for i in range(x.shape[0]):
        _layer_norm_row(x[i], w, b, eps, n, out[i])


@numba.njit(**_JIT)
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
        _layer_norm_row(hr, w, b, eps, n, out[i])


@numba.njit(**_JIT)
def _masked_softmax_kernel(s, mask, has_mask, scale, out):
    # s, out: [B, N, T, S]; mask: [1|B, 1|N, 1|T, S]
    nb, nh, nt, ns = s.shape
    mb, mh, mt = mask.shape[0], mask.shape[1], mask.shape[2]
    for bi in range(nb):
        for hi in range(nh):
            for ti in range(nt):
                sr = s[bi, hi, ti]
                orow = out[bi, hi, ti]
                if has_mask:
                    mr = mask[bi if mb > 1 else 0, hi if mh > 1 else 0, ti if mt > 1 else 0]
                    for j in range(ns):
                        orow[j] = sr[j] * scale + mr[j]
                else:
                    for j in range(ns):
                        orow[j] = sr[j] * scale
                m = _row_max(orow)
                for j in range(ns):
                    orow[j] = _exp(orow[j] - m)
                total = _pairwise_sum(orow)
                for j in range(ns):
                    orow[j] = orow[j] / total


# ---------------------------------------------------------------------------------------------
# Python wrappers: check dtypes and shapes, fix layouts, allocate, call.
# ---------------------------------------------------------------------------------------------


def _float_dtype(name: str, a) -> np.dtype:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(a).__name__}")
    if a.dtype not in _DTYPES:
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
    if res is y:  # in place (a fresh GEMM output): no new [R, H] array to fault in
        _bias_gelu_inplace_kernel(res.reshape(-1, h), bv, has_bias)
    else:
        _bias_gelu_kernel(_rows(y), bv, has_bias, res.reshape(-1, h))
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
    """``ops.softmax(scores * scale + mask)`` over the last axis, in one pass over each row.

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


def attention(q, k, v, mask=None, scale: float = 1.0, *, out=None):
    """Attention context ``softmax(q @ k^T * scale + mask) @ v``, one (batch, head) at a time.

    q: [B, N, T, D]; k, v: [B, N, S, D]; mask as in :func:`masked_softmax` -> [B, N, T, D].
    ``out`` may be any writeable array of that shape and dtype, e.g. the [B, N, T, D] view
    ``buf.transpose(0, 2, 1, 3)`` of a [B, T, N, D] buffer, so the heads land merged.

    Bitwise equal to the batched ``s = q @ k^T; masked_softmax(s, mask, scale, out=s); s @ v``
    (NumPy's batched matmul runs the same GEMM per (batch, head)); only the schedule differs:
    the two GEMMs stay in BLAS, and one [T, S] score block is reused, hot in cache, instead of a
    [B, N, T, S] array. On 2 cores that is ~13% faster than the batched form from T = 256 up
    (equal at T = 128) and needs B*N times less scratch memory. A fused Numba kernel does not
    pay here: its hand-written GEMMs would lose more to OpenBLAS than the fusion saves.
    """
    dtype = _float_dtype("q", q)
    _same_dtype(dtype, k=k, v=v, mask=mask)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[:2] + q.shape[3:] != (
        k.shape[:2] + k.shape[3:]
    ):
        raise ValueError(
            f"q must be [B, N, T, D] and k, v [B, N, S, D], got {q.shape}, {k.shape}, {v.shape}"
        )
    nb, nh, nt, _ = q.shape
    ns = k.shape[2]
    if out is None:
        out = np.empty(q.shape, dtype)
    elif not isinstance(out, np.ndarray) or out.shape != q.shape or out.dtype != dtype:
        raise ValueError(f"out must be a {dtype} array of shape {q.shape}")
    elif not out.flags.writeable:
        raise ValueError("out must be writeable")
    if ns == 0 or q.size == 0:
        out[...] = 0
        return out
    m4 = _mask4(mask, (nb, nh, nt, ns), (nb, nh, nt, ns), dtype)
    has_mask = mask is not None
    scale_t = dtype.type(scale)
    scores = np.empty((1, 1, nt, ns), dtype)  # [T, S] block, reused for every (batch, head)
    block = scores[0, 0]
    for bi in range(nb):
        for hi in range(nh):
            np.matmul(q[bi, hi], k[bi, hi].T, out=block)  # [T, D] @ [D, S] -> [T, S]
            mb = m4[bi if m4.shape[0] > 1 else 0, hi if m4.shape[1] > 1 else 0][None, None]
            _masked_softmax_kernel(scores, mb, has_mask, scale_t, scores)
            np.matmul(block, v[bi, hi], out=out[bi, hi])  # [T, S] @ [S, D] -> [T, D]
    return out


def warmup(dtype=np.float32) -> None:
    """Compile (or load from the on-disk cache) every kernel for ``dtype``; idempotent.

    The first call of each kernel in a fresh process otherwise pays this cost: a few seconds
    of LLVM work with a cold cache, a fraction of a second with a warm one.
    """
    dtype = np.dtype(dtype)
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    x = np.ones((2, 8), dtype)
    v = np.ones(8, dtype)
    bias_gelu(x, v)
    bias_gelu(x, v, out=x)  # the in-place kernel
    layer_norm(x, v, v, 1e-5)
    residual_layer_norm(x, x, v, v, 1e-5, r_bias=v)
    masked_softmax(np.ones((1, 1, 2, 8), dtype), np.zeros((1, 1, 1, 8), dtype), 0.5)
    # attention() adds no kernel of its own: it runs _masked_softmax_kernel on [1, 1, T, S] blocks.


# ---------------------------------------------------------------------------------------------
# Where the coefficients come from (run by hand; needs mpmath; never called at import).
# ---------------------------------------------------------------------------------------------


def _derive_polynomials(dps: int = 60) -> dict:  # pragma: no cover - provenance of the tables
    """Recompute the coefficient tables above: {name: [highest-degree coefficient first, ...]}."""
    import mpmath as mp

    mp.mp.dps = dps

    def chebyshev(f, a, b, n):  # interpolate at n+1 Chebyshev nodes; monomials in (x - mid)
        a, b = mp.mpf(a), mp.mpf(b)
        mid, half = (a + b) / 2, (b - a) / 2
        ws = [mp.cos(mp.pi * (k + mp.mpf(1) / 2) / (n + 1)) for k in range(n + 1)]
        c = mp.lu_solve(mp.matrix([[w**j for j in range(n + 1)] for w in ws]),
                        mp.matrix([f(mid + half * w) for w in ws]))  # fmt: skip
        return [float(c[j] / half**j) for j in reversed(range(n + 1))]

    def weighted(f, weight, a, b, n, points=160, rounds=5):  # Lawson-reweighted least squares
        a, b = mp.mpf(a), mp.mpf(b)
        mid, half = (a + b) / 2, (b - a) / 2
        xs = [mid + half * mp.cos(mp.pi * (k + mp.mpf(1) / 2) / points) for k in range(points)]
        ws, fs, lw = [weight(x) for x in xs], [f(x) for x in xs], [mp.mpf(1)] * points
        for _ in range(rounds):
            rows = [[ws[i] * lw[i] * ((xs[i] - mid) / half) ** j for j in range(n + 1)]
                    for i in range(points)]  # fmt: skip
            c = mp.qr_solve(mp.matrix(rows), mp.matrix([ws[i] * lw[i] * fs[i]
                                                         for i in range(points)]))[0]  # fmt: skip
            err = [abs(mp.polyval([c[j] for j in reversed(range(n + 1))], (xs[i] - mid) / half)
                       - fs[i]) * ws[i] for i in range(points)]  # fmt: skip
            lw = [lw[i] * mp.sqrt(err[i] + mp.mpf(10) ** -50) for i in range(points)]
            total = sum(lw)
            lw = [v / total * points for v in lw]
        return [float(c[j] / half**j) for j in reversed(range(n + 1))]

    def erf_over_a(t):
        return mp.erf(mp.sqrt(t)) / mp.sqrt(t) if t > 0 else 2 / mp.sqrt(mp.pi)

    def expm1_over_r(r):
        return mp.expm1(r) / r if r != 0 else mp.mpf(1)

    return {
        "_ERF64_A": chebyshev(erf_over_a, 0, 4, 17),
        "_ERF64_G": weighted(lambda a: mp.erfc(a) * mp.exp(a * a), lambda a: mp.exp(-a * a),
                             2, 6, 14),  # fmt: skip
        "_EXPM1_64": chebyshev(expm1_over_r, "-0.35", "0.35", 10),
        "_ERF32_A": chebyshev(erf_over_a, 0, "6.25", 15),
        "_ERF32_D": chebyshev(mp.erf, "2.5", 4, 13),
        "_EXPM1_32": chebyshev(expm1_over_r, "-0.35", "0.35", 7),
    }


# ---------------------------------------------------------------------------------------------
# The Numba kernel set: what ``Model(..., backend="numba")`` (the CPU default) runs.
# ---------------------------------------------------------------------------------------------


def _scaled_masked_softmax(scores, bias, scale: float):
    """``ops.scaled_masked_softmax`` through :func:`masked_softmax` (a new array: the traced
    ``scores`` stay as they were)."""
    return masked_softmax(scores, bias, scale)


_BLAS_THREADS = None  # (get, set) of the OpenBLAS that NumPy links, or () when not found
_POOL = None
_SPLIT_LOCK = threading.Lock()


def _openblas_threads():
    """``(get_num_threads, set_num_threads)`` of NumPy's OpenBLAS via ctypes, or None."""
    global _BLAS_THREADS
    if _BLAS_THREADS is None:
        _BLAS_THREADS = ()
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
                    _BLAS_THREADS = (g, s)
                    break
            if _BLAS_THREADS:
                break
    return _BLAS_THREADS or None


def _split_batch(fn, n: int):
    """``Kernels.split_batch``: on 2+ cores, the two halves of the batch on two threads, each
    with single-threaded OpenBLAS (the kernels release the GIL, and so does NumPy's matmul).

    Measured on 2 cores: 8x128 ~12% and 4x512 ~13% faster than one stream with 2-thread BLAS,
    because the softmax/GELU/LayerNorm kernels then run on both cores too, and no BLAS worker
    spins beside them. OpenBLAS's thread count is process-wide: it is set to 1 for the duration
    and restored; one split forward runs at a time (a second caller just runs whole).
    """
    global _POOL
    blas = _openblas_threads()
    if n < 2 or (os.cpu_count() or 1) < 2 or blas is None or not _SPLIT_LOCK.acquire(blocking=False):
        return [fn(slice(0, n))]
    try:
        get, set_ = blas
        before = get()
        if before < 2:  # BLAS already single-threaded: someone chose that; keep one stream
            return [fn(slice(0, n))]
        if _POOL is None:
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="refimpl-batch")
        half = (n + 1) // 2
        set_(1)
        try:
            first = _POOL.submit(fn, slice(0, half))
            second = fn(slice(half, n))
            return [first.result(), second]
        finally:
            set_(before)
    finally:
        _SPLIT_LOCK.release()


def _linear(x, weight, bias=None):
    """``ops.linear`` with the bias added in place to the fresh GEMM output (bitwise the same
    sums; one [R, out] array fewer to allocate and fault in)."""
    from . import ops

    y = ops.linear(x, weight)  # [..., out], a new array (or a transposed view of one)
    if bias is None:
        return y
    if isinstance(y, np.ndarray) and y.flags.writeable and y.dtype == bias.dtype:
        np.add(y, bias, out=y)
        return y
    return y + bias


PER_HEAD_FROM = 128  # query length from which _attention_context runs attention() per head


def _attention_context(q, k, v, bias, scale: float):
    """``ops.attention_context``: no probabilities to keep, so the softmax runs in place on the
    fresh score GEMM output, and the context is written straight into a [B, T, N, D] buffer (the
    heads then merge without a copy). From ``PER_HEAD_FROM`` query positions up, :func:`attention`'s
    per-head schedule (faster there: a hot [T, S] block, 2-D GEMMs; measured 1-2% faster at
    T = 128 inside a split batch, ~13% from T = 256); below it, batched matmuls.
    -> [B, N, T, D] (a view of the C-contiguous [B, T, N, D] buffer).
    """
    nb, nh, nt, nd = q.shape
    buf = np.empty((nb, nt, nh, nd), q.dtype)
    ctx = buf.transpose(0, 2, 1, 3)  # [B, N, T, D] view
    if nt >= PER_HEAD_FROM:
        attention(q, k, v, bias, scale, out=ctx)
    else:
        scores = np.empty((nb, nh, nt, k.shape[2]), q.dtype)  # (matmul may pick another layout)
        np.matmul(q, np.swapaxes(k, -1, -2), out=scores)  # [B, N, T, S], fresh: softmax in place
        masked_softmax(scores, bias, scale, out=scores)
        np.matmul(scores, v, out=ctx)
    return ctx


def _linear_act(x, weight, bias, act_name: str):
    """``ops.linear_act``: the exact GELU is fused with the bias add; other activations use the
    NumPy definitions."""
    from . import ops

    if act_name in ("gelu", "gelu_python"):
        y = ops.linear(x, weight)  # [..., I], no bias yet
        if y.flags.c_contiguous and y.flags.writeable:
            # always a fresh GEMM output (or a view of one): GELU in place (no second [R, I] array; from ~32 MB glibc maps
            # every new array afresh and the page faults cost more than the GELU itself)
            return bias_gelu(y, bias, out=y)
        return bias_gelu(y, bias)  # (W x^T)^T for a few rows is a transposed view: a new array
    return ops.linear_act(x, weight, bias, act_name)


def numba_kernels():
    """The :class:`refimpl.ops.Kernels` whose steps run these Numba kernels (NumPy arrays only)."""
    from .ops import Kernels

    return Kernels(
        "numba", linear=_linear, layer_norm=layer_norm, scaled_masked_softmax=_scaled_masked_softmax, linear_act=_linear_act,
        attention_context=_attention_context, split_batch=_split_batch,
    )
