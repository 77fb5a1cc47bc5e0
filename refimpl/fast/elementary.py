"""The elementary functions of the kernels: ``exp``, ``erf`` and the exact GELU, per dtype.

Branch-free polynomial evaluations that LLVM vectorises (libm's ``erf``/``exp`` do not): float64
within 2 ulp of the true ``erf`` and 1 ulp of ``exp``; float32 evaluated in float64 and rounded
once (correctly rounded in practice). The tables' provenance is :func:`derive_polynomials`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .llvm import INLINE, JIT, f64_bits, f64_from_bits, fma


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


@numba.njit(**JIT)
def select(cond, a, b):
    """``a if cond else b`` (a select instruction once inlined)."""
    return a if cond else b


# One Horner evaluation per table. Each reads its table as a global: LLVM then sees constant
# coefficients and unrolls the loop (an array passed as an argument defeats that, and with it the
# vectorisation of every loop that calls these).


@numba.njit(**JIT)
def _poly_erf64_a(w):
    p = _ERF64_A[0]
    for k in range(1, _ERF64_A.shape[0]):
        p = fma(p, w, _ERF64_A[k])
    return p


@numba.njit(**JIT)
def _poly_erf64_g(w):
    p = _ERF64_G[0]
    for k in range(1, _ERF64_G.shape[0]):
        p = fma(p, w, _ERF64_G[k])
    return p


@numba.njit(**JIT)
def _poly_expm1_64(w):
    p = _EXPM1_64[0]
    for k in range(1, _EXPM1_64.shape[0]):
        p = fma(p, w, _EXPM1_64[k])
    return p


@numba.njit(**JIT)
def _poly_erf32_a(w):
    p = _ERF32_A[0]
    for k in range(1, _ERF32_A.shape[0]):
        p = fma(p, w, _ERF32_A[k])
    return p


@numba.njit(**JIT)
def _poly_erf32_d(w):
    p = _ERF32_D[0]
    for k in range(1, _ERF32_D.shape[0]):
        p = fma(p, w, _ERF32_D[k])
    return p


@numba.njit(**JIT)
def _poly_expm1_32(w):
    p = _EXPM1_32[0]
    for k in range(1, _EXPM1_32.shape[0]):
        p = fma(p, w, _EXPM1_32[k])
    return p


# ---------------------------------------------------------------------------------------------
# Scalar elementary functions. float64: _exp_f64, _erf_f64. float32 in/out: _exp_f32, _erf_f32.
# Branch-free (selects, no early returns) so that loops calling them vectorise.
# ---------------------------------------------------------------------------------------------


@numba.njit(**INLINE)
def _exp_f64_core(x, xc, zero):
    """exp(x) in float64 from ``xc``, x clamped to at most 710 (a no-op where the caller knows
    x <= 0), and ``zero``, whether x < -745.2: there exp(x) < 0.94 * 2**-1075 rounds to 0, as the
    formula's own result does, and those lanes compute exp(0) instead (a subnormal operand or
    result costs a ~150-cycle microcode assist; the masked keys of an attention are all there)."""
    kf = np.floor(xc * _LOG2E + 0.5)
    r = fma(-kf, _LN2_LO, fma(-kf, _LN2_HI, xc))  # the inner product and difference are exact
    p = fma(r, _poly_expm1_64(r), 1.0)
    k = np.int64(kf)
    k1 = k >> 1
    y = p * f64_from_bits((k1 + 1023) << 52) * f64_from_bits((k - k1 + 1023) << 52)
    return select(x == x, select(zero, 0.0, y), x)


@numba.njit(**INLINE)
def _exp_f64(x):
    """exp(x) in float64, within 1 ulp; exact 1 at 0, 0 below -745.2, inf above 709.8, NaN kept.

    x = k ln2 + r (Cody-Waite, |r| <= 0.35); exp(r) = 1 + r q(r); 2**k applied as two halves so
    that results in the subnormal range are rounded once, like libm's.
    """
    zero = x < -745.2
    return _exp_f64_core(x, min(select(zero, 0.0, x), 710.0), zero)


@numba.njit(**INLINE)
def _exp_f64_nonpos(x):
    """``_exp_f64(x)`` for x <= 0 or NaN (x - max(row) in a softmax), one clamp fewer."""
    zero = x < -745.2
    return _exp_f64_core(x, select(zero, 0.0, x), zero)


@numba.njit(**INLINE)
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
    r = select(a >= 2.0, tail, small)  # NaN takes `small` and stays NaN
    return math.copysign(r, u)


_ROUNDER = 6755399441055744.0  # 1.5 * 2**52: adding it rounds a float64 below 2**51 to an integer


@numba.njit(**INLINE)
def _exp_f32_core(xc):
    """exp(x) for float32 x from ``xc``, float64(x) clamped to [-150, 90] (exp(-150) rounds to 0
    and exp(90) to inf in float32; a NaN kept): computed in float64 (rel. error ~1e-12), rounded once.

    k = x log2(e) rounded to an integer by adding and subtracting 1.5 * 2**52: the sum t then holds
    k in its low significand bits (two's complement), so t's bits shifted left by 52, plus the bias,
    are those of 2**k (a floor and a conversion to integer fewer). A NaN runs through r and p to
    the result."""
    t = fma(xc, _LOG2E, _ROUNDER)
    kf = t - _ROUNDER
    r = fma(-kf, _LN2, xc)  # |k| <= 217: error <= 217 * |ln2 - _LN2| = 3e-15, ample for float32
    p = fma(r, _poly_expm1_32(r), 1.0)
    return np.float32(p * f64_from_bits((f64_bits(t) << 52) + (1023 << 52)))


@numba.njit(**INLINE)
def _exp_f32(x):
    """exp(x) for float32 x: computed in float64 (rel. error ~1e-12), rounded once to float32."""
    xd = np.float64(x)
    return _exp_f32_core(select(xd < -150.0, -150.0, select(xd > 90.0, 90.0, xd)))


@numba.njit(**INLINE)
def _exp_f32_nonpos(x):
    """``_exp_f32(x)`` for x <= 0 or NaN (x - max(row) in a softmax), one clamp fewer."""
    xd = np.float64(x)
    return _exp_f32_core(select(xd < -150.0, -150.0, xd))


@numba.njit(**INLINE)
def _erf_f32(u):
    """erf(u) for float32 u: computed in float64 (abs. error ~3e-13), rounded once to float32."""
    ud = np.float64(u)
    a = abs(ud)
    small = a * _poly_erf32_a(a * a - 3.125)
    tail = _poly_erf32_d(min(a, 4.0) - 3.25)
    r = select(a >= 2.5, tail, small)
    return np.float32(math.copysign(r, ud))


@numba.njit(**INLINE)
def _gelu_f64(z):
    return z * 0.5 * (1.0 + _erf_f64(z / _SQRT2))


@numba.njit(**INLINE)
def _gelu_f32(z):
    return z * np.float32(0.5) * (np.float32(1.0) + _erf_f32(z / np.float32(_SQRT2)))


# GELU with erf's first branch only, for the elements a kernel knows to be in it (|u| = |z / sqrt 2|
# < 2.5 in float32, < 2 in float64), without the cost of the other branch. The same value as
# _gelu_f32/_gelu_f64 there: u * P(u*u) is copysign(|u| * P(|u|*|u|), u) bit for bit, since u*u
# is |u|*|u|, IEEE multiplication rounds |x| and -|x| alike, and P (~erf(u)/u) is positive on that
# range (>= 0.39, its error ~1e-13); the abs and the copysign are two operations saved.


@numba.njit(**INLINE)
def _gelu_f32_main(z):
    ud = np.float64(z / np.float32(_SQRT2))
    erf = np.float32(ud * _poly_erf32_a(ud * ud - 3.125))
    return z * np.float32(0.5) * (np.float32(1.0) + erf)


@numba.njit(**INLINE)
def _gelu_f64_main(z):
    u = z / _SQRT2
    return z * 0.5 * (1.0 + u * _poly_erf64_a(u * u - 2.0))


# dtype dispatch for the generic kernels: `gelu(z)`, `_exp(x)`, ... resolve on the scalar's type.


def by_dtype(f32, f64):
    """A function for Numba code that runs ``f32(x)`` on a float32 ``x`` and ``f64(x)`` on a
    float64 one (chosen at compile time, inlined). Numba wants the implementations' argument
    named as the stub's: ``x``."""

    def dispatch(x):  # pragma: no cover - typed by the overload below
        raise NotImplementedError

    @overload(dispatch, jit_options=JIT, inline="always")
    def _typed(x):
        return {types.float32: f32, types.float64: f64}.get(x)

    return dispatch


gelu = by_dtype(lambda x: _gelu_f32(x), lambda x: _gelu_f64(x))  # the definition is ops.gelu
_exp = by_dtype(lambda x: _exp_f32(x), lambda x: _exp_f64(x))
exp_nonpos = by_dtype(lambda x: _exp_f32_nonpos(x), lambda x: _exp_f64_nonpos(x))
# GELU with erf's first branch only (the caller knows |x| < tail_limit(x))
gelu_main = by_dtype(lambda x: _gelu_f32_main(x), lambda x: _gelu_f64_main(x))
# A bound on |z| below which erf(z / sqrt 2) takes its first branch (|u| < 2.5 in float32, < 2 in
# float64): 3.5 < 2.5 * sqrt 2 and 2.8 < 2 * sqrt 2 by margins far beyond rounding.
tail_limit = by_dtype(lambda x: np.float32(3.5), lambda x: 2.8)


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
