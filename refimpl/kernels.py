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
- **Vector code two ways.** Element-wise loops are written as scalar code that LLVM's loop
  vectoriser turns into SIMD (branch-free helpers, inlined). Reductions cannot go that way without
  fast-math (and Numba runs no SLP vectoriser), so NumPy's eight interleaved accumulators are
  written as the eight lanes of one LLVM vector (``_Vec``, ``_v_add``...): the same IEEE
  operations in the same order, one instruction for all eight.
- **Cost only where it is needed.** A softmax row takes three passes: scale, mask and maximum in
  one; exp; the sum, which carries the previous row's division along (one latency-bound chain of
  adds beside a throughput-bound divider). GELU evaluates erf's second branch (its tail) only for
  blocks of a row that hold an element beyond its first (|z| >= 3.5 in float32, 2.8 in float64:
  next to none at initialisation, a few in a hundred in a trained model), and the float64 ``exp``
  does no subnormal arithmetic where its result is 0 (a ~150-cycle microcode assist per
  instruction, and the masked keys of an attention are all there). Every value stays the one the
  plain formulas give; ``tests/test_kernels.py`` holds both kernels bitwise to a frozen copy of
  them.
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
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

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
# Lanes in one LLVM vector, for the reductions. NumPy's pairwise sum keeps eight interleaved
# accumulators, and a row maximum can be taken as eight interleaved maxima: lane k of an 8-lane
# _Vec is accumulator k, so one vector add (or max) advances all eight, in exactly their scalar
# order. LLVM's loop vectoriser leaves floating-point reductions alone without fast-math, and
# Numba runs no SLP vectoriser (off since numba#8705), so eight scalar accumulators would stay
# eight scalar chains; these intrinsics say it. The arithmetic is IEEE lane by lane, as scalar.
# ---------------------------------------------------------------------------------------------


class _Vec(types.Type):
    """``lanes`` values of a float type, as one LLVM ``<lanes x float|double>``."""

    def __init__(self, dtype, lanes):
        self.dtype, self.lanes = dtype, lanes
        super().__init__(name=f"_Vec({dtype}, {lanes})")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        lane = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(lane, fe_type.lanes))


def _is_row(a) -> bool:
    """A C-contiguous 1-D float array type."""
    return (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
            and isinstance(a.dtype, types.Float))  # fmt: skip


def _vec_pointer(context, builder, aty, arr, i, lanes):
    data = context.make_array(aty)(context, builder, arr).data
    vty = ir.VectorType(context.get_value_type(aty.dtype), lanes)
    return builder.bitcast(builder.gep(data, [i]), vty.as_pointer())


def _vec_load(lanes=None):
    """A load of ``lanes`` elements; ``lanes=None``: one 64-byte vector (16 float32 or 8 float64)."""

    @intrinsic
    def load(typingctx, a, i):
        """``a[i:i + lanes]`` (one unaligned vector load; the caller keeps it in bounds)."""
        if not (_is_row(a) and isinstance(i, types.Integer)):
            return None
        n = lanes or 512 // a.dtype.bitwidth

        def codegen(context, builder, signature, args):
            ptr = _vec_pointer(context, builder, signature.args[0], args[0], args[1], n)
            return builder.load(ptr, align=a.dtype.bitwidth // 8)

        return _Vec(a.dtype, n)(a, i), codegen

    return load


def _vec_splat(lanes):
    @intrinsic
    def splat(typingctx, s):
        """``lanes`` copies of the float ``s``."""
        if not isinstance(s, types.Float):
            return None

        def codegen(context, builder, signature, args):
            v = ir.Constant(ir.VectorType(args[0].type, lanes), None)
            for k in range(lanes):
                v = builder.insert_element(v, args[0], ir.Constant(ir.IntType(32), k))
            return v

        return _Vec(s, lanes)(s), codegen

    return splat


_v8_load, _v64b_load = _vec_load(8), _vec_load()
_v8_splat = _vec_splat(8)


@intrinsic
def _v8_store(typingctx, a, i, v):
    """``a[i:i + 8] = v``."""
    if not (_is_row(a) and isinstance(i, types.Integer) and v == _Vec(a.dtype, 8)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _vec_pointer(context, builder, signature.args[0], args[0], args[1], 8)
        builder.store(args[2], ptr, align=a.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(a, i, v), codegen


def _vec_binary(op):
    @intrinsic
    def vector_op(typingctx, x, y):
        if not (isinstance(x, _Vec) and x == y):
            return None

        def codegen(context, builder, signature, args):
            return op(builder, *args)

        return x(x, y), codegen

    return vector_op


_v_add = _vec_binary(lambda builder, x, y: builder.fadd(x, y))
_v_sub = _vec_binary(lambda builder, x, y: builder.fsub(x, y))
_v_mul = _vec_binary(lambda builder, x, y: builder.fmul(x, y))
_v_div = _vec_binary(lambda builder, x, y: builder.fdiv(x, y))
# max(x, y) lane by lane, as Numba's builtin computes it: y if y > x else x.
_v_max = _vec_binary(lambda builder, x, y: builder.select(builder.fcmp_ordered(">", y, x), y, x))


@intrinsic
def _v8_lanes(typingctx, v):
    """The eight lanes of ``v`` as a tuple."""
    if not (isinstance(v, _Vec) and v.lanes == 8):
        return None
    tup = types.UniTuple(v.dtype, 8)

    def codegen(context, builder, signature, args):
        lanes = [builder.extract_element(args[0], ir.Constant(ir.IntType(32), k)) for k in range(8)]
        return context.make_tuple(builder, tup, lanes)

    return tup(v), codegen


@intrinsic
def _prefetch(typingctx, a, i):
    """Ask for the cache line of ``a[i]`` (``llvm.prefetch``, read, into L2: a hint, no fault)."""
    if not (_is_row(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [ptr.type], fnty)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(a, i), codegen


@intrinsic
def _v_abs_ge_bits(typingctx, v, lim):
    """The lanes of ``v`` with |v| >= ``lim`` (NaN: no), as the bits of an integer."""
    if not (isinstance(v, _Vec) and lim == v.dtype):
        return None

    def codegen(context, builder, signature, args):
        vec, s = args
        lanes = signature.args[0].lanes
        bound = ir.Constant(ir.VectorType(s.type, lanes), None)
        for k in range(lanes):
            bound = builder.insert_element(bound, s, ir.Constant(ir.IntType(32), k))
        bits = signature.args[1].bitwidth
        fnty = ir.FunctionType(vec.type, [vec.type])
        fabs = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fabs.v{lanes}f{bits}")
        ge = builder.fcmp_ordered(">=", builder.call(fabs, [vec]), bound)
        return builder.zext(builder.bitcast(ge, ir.IntType(lanes)), ir.IntType(64))

    return types.int64(v, lim), codegen


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
def _exp_f64_core(x, xc, zero):
    """exp(x) in float64 from ``xc``, x clamped to at most 710 (a no-op where the caller knows
    x <= 0), and ``zero``, whether x < -745.2: there exp(x) < 0.94 * 2**-1075 rounds to 0, as the
    formula's own result does, and those lanes compute exp(0) instead (a subnormal operand or
    result costs a ~150-cycle microcode assist; the masked keys of an attention are all there)."""
    kf = np.floor(xc * _LOG2E + 0.5)
    r = _fma(-kf, _LN2_LO, _fma(-kf, _LN2_HI, xc))  # the inner product and difference are exact
    p = _fma(r, _poly_expm1_64(r), 1.0)
    k = np.int64(kf)
    k1 = k >> 1
    y = p * _f64_from_bits((k1 + 1023) << 52) * _f64_from_bits((k - k1 + 1023) << 52)
    return _select(x == x, _select(zero, 0.0, y), x)


@numba.njit(**_INLINE)
def _exp_f64(x):
    """exp(x) in float64, within 1 ulp; exact 1 at 0, 0 below -745.2, inf above 709.8, NaN kept.

    x = k ln2 + r (Cody-Waite, |r| <= 0.35); exp(r) = 1 + r q(r); 2**k applied as two halves so
    that results in the subnormal range are rounded once, like libm's.
    """
    zero = x < -745.2
    return _exp_f64_core(x, min(_select(zero, 0.0, x), 710.0), zero)


@numba.njit(**_INLINE)
def _exp_f64_nonpos(x):
    """``_exp_f64(x)`` for x <= 0 or NaN (x - max(row) in a softmax), one clamp fewer."""
    zero = x < -745.2
    return _exp_f64_core(x, _select(zero, 0.0, x), zero)


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
def _exp_f32_core(x, xc):
    """exp(x) for float32 x from ``xc``, float64(x) clamped to [-150, 90] (exp(-150) rounds to 0
    and exp(90) to inf in float32): computed in float64 (rel. error ~1e-12), rounded once."""
    kf = np.floor(xc * _LOG2E + 0.5)
    r = _fma(-kf, _LN2, xc)  # |k| <= 217: error <= 217 * |ln2 - _LN2| = 3e-15, ample for float32
    p = _fma(r, _poly_expm1_32(r), 1.0)
    y = np.float32(p * _f64_from_bits((np.int64(kf) + 1023) << 52))
    return _select(x == x, y, x)


@numba.njit(**_INLINE)
def _exp_f32(x):
    """exp(x) for float32 x: computed in float64 (rel. error ~1e-12), rounded once to float32."""
    return _exp_f32_core(x, min(max(np.float64(x), -150.0), 90.0))


@numba.njit(**_INLINE)
def _exp_f32_nonpos(x):
    """``_exp_f32(x)`` for x <= 0 or NaN (x - max(row) in a softmax), one clamp fewer."""
    return _exp_f32_core(x, max(np.float64(x), -150.0))


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


# GELU with erf's first branch only, for the elements a kernel knows to be in it (|u| = |z / sqrt 2|
# < 2.5 in float32, < 2 in float64), without the cost of the other branch. The same value as
# _gelu_f32/_gelu_f64 there: u * P(u*u) is copysign(|u| * P(|u|*|u|), u) bit for bit, since u*u
# is |u|*|u|, IEEE multiplication rounds |x| and -|x| alike, and P (~erf(u)/u) is positive on that
# range (>= 0.39, its error ~1e-13); the abs and the copysign are two operations saved.


@numba.njit(**_INLINE)
def _gelu_f32_main(z):
    ud = np.float64(z / np.float32(_SQRT2))
    erf = np.float32(ud * _poly_erf32_a(ud * ud - 3.125))
    return z * np.float32(0.5) * (np.float32(1.0) + erf)


@numba.njit(**_INLINE)
def _gelu_f64_main(z):
    u = z / _SQRT2
    return z * 0.5 * (1.0 + u * _poly_erf64_a(u * u - 2.0))


# dtype dispatch for the generic kernels: `_gelu(z)`, `_exp(x)`, ... resolve on the scalar's type.


def _by_dtype(f32, f64):
    """A function for Numba code that runs ``f32(x)`` on a float32 ``x`` and ``f64(x)`` on a
    float64 one (chosen at compile time, inlined). Numba wants the implementations' argument
    named as the stub's: ``x``."""

    def dispatch(x):  # pragma: no cover - typed by the overload below
        raise NotImplementedError

    @overload(dispatch, jit_options=_JIT, inline="always")
    def _typed(x):
        return {types.float32: f32, types.float64: f64}.get(x)

    return dispatch


_gelu = _by_dtype(lambda x: _gelu_f32(x), lambda x: _gelu_f64(x))  # the definition is ops.gelu
_exp = _by_dtype(lambda x: _exp_f32(x), lambda x: _exp_f64(x))
_exp_nonpos = _by_dtype(lambda x: _exp_f32_nonpos(x), lambda x: _exp_f64_nonpos(x))
# GELU with erf's first branch only (the caller knows |x| < _tail_limit(x))
_gelu_main = _by_dtype(lambda x: _gelu_f32_main(x), lambda x: _gelu_f64_main(x))
# A bound on |z| below which erf(z / sqrt 2) takes its first branch (|u| < 2.5 in float32, < 2 in
# float64): 3.5 < 2.5 * sqrt 2 and 2.8 < 2 * sqrt 2 by margins far beyond rounding.
_tail_limit = _by_dtype(lambda x: np.float32(3.5), lambda x: 2.8)
_gelu_plan = _by_dtype(lambda x: _GELU_PLAN_F32, lambda x: _GELU_PLAN_F64)
_64b_lanes = _by_dtype(lambda x: 16, lambda x: 8)  # the lanes of one 64-byte vector


# ---------------------------------------------------------------------------------------------
# Reductions in NumPy's order (numpy/_core/src/umath/loops_utils.h.src, ``pairwise_sum``):
# below 8 elements a plain loop from 0; up to 128, eight interleaved accumulators combined as
# ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)) and the tail added in order; above, split at n/2 rounded
# down to a multiple of 8 and recurse. ``np.add.reduce`` (so ``np.sum``/``np.mean``) over a
# contiguous last axis sums each row this way.
# ---------------------------------------------------------------------------------------------


@numba.njit(**_JIT)
def _lane_sum(r):
    """NumPy's combination of its eight accumulators: ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))."""
    r0, r1, r2, r3, r4, r5, r6, r7 = _v8_lanes(r)
    return ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))


@numba.njit(**_JIT)
def _lane_max(r):
    r0, r1, r2, r3, r4, r5, r6, r7 = _v8_lanes(r)
    return max(max(max(r0, r1), max(r2, r3)), max(max(r4, r5), max(r6, r7)))


@numba.njit(**_INLINE)
def _pairwise_leaf(a, lo, n):
    """NumPy's pairwise sum of ``a[lo:lo + n]`` for ``n <= 128`` (no recursion)."""
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            res += a[np.uintp(lo + i)]
        return res
    m = n - n % 8
    r = _v8_load(a, lo)  # lane k: accumulator k, seeded with a[lo + k]
    for i in range(8, m, 8):
        r = _v_add(r, _v8_load(a, lo + i))
    res = _lane_sum(r)
    for i in range(m, n):
        res += a[np.uintp(lo + i)]
    return res


@numba.njit(**_INLINE)
def _pairwise_leaf_div(a, lo, n, prev, total):
    """``_pairwise_leaf(a, lo, n)``, dividing ``a[prev:prev + n]`` by ``total`` meanwhile.

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
    tv = _v8_splat(total)
    r = _v8_load(a, lo)
    _v8_store(a, prev, _v_div(_v8_load(a, prev), tv))
    for i in range(8, m, 8):
        r = _v_add(r, _v8_load(a, lo + i))
        _v8_store(a, prev + i, _v_div(_v8_load(a, prev + i), tv))
    res = _lane_sum(r)
    for i in range(m, n):
        res += a[np.uintp(lo + i)]
        w = np.uintp(prev + i)
        a[w] = a[w] / total
    return res


@numba.njit(**_JIT)
def _pairwise_sum_div_at(a, lo, n, prev, total):
    """``_pairwise_sum(a[lo:lo + n])`` without making the view (offsets, not slices: no
    reference counting in a kernel's row loop); if ``prev >= 0``, dividing ``a[prev:prev + n]``
    by ``total`` meanwhile (:func:`_pairwise_leaf_div`)."""
    if n <= 128:
        if prev < 0:
            return _pairwise_leaf(a, lo, n)
        return _pairwise_leaf_div(a, lo, n, prev, total)
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum_div_at(a, lo, n2, prev, total) + _pairwise_sum_div_at(
        a, lo + n2, n - n2, prev + n2 if prev >= 0 else prev, total
    )


@numba.njit(**_JIT)
def _pairwise_sum(a):
    n = a.shape[0]
    if n <= 128:
        return _pairwise_leaf(a, n - n, n)  # (an int64 0, not a literal: one specialisation)
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
        m = n - n % 8
        mv = _v8_splat(mean)
        d = _v_sub(_v8_load(a, 0), mv)
        r = _v_mul(d, d)
        for i in range(8, m, 8):
            d = _v_sub(_v8_load(a, i), mv)
            r = _v_add(r, _v_mul(d, d))
        res = _lane_sum(r)
        for i in range(m, n):
            d = a[i] - mean
            res += d * d
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum_centred_sq(a[:n2], mean) + _pairwise_sum_centred_sq(a[n2:], mean)


@numba.njit(**_INLINE)
def _scale_mask8(s, so, mask, mo, has_mask, sv, i):
    v = _v_mul(_v8_load(s, so + i), sv)
    return _v_add(v, _v8_load(mask, mo + i)) if has_mask else v


@numba.njit(**_INLINE)
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
        sv = _v8_splat(scale)
        r0 = r1 = _v8_splat(res)
        m16 = n - n % 16
        for i in range(0, m16, 16):
            v0 = _scale_mask8(s, so, mask, mo, has_mask, sv, i)
            v1 = _scale_mask8(s, so, mask, mo, has_mask, sv, i + 8)
            _v8_store(out, oo + i, v0)
            _v8_store(out, oo + i + 8, v1)
            r0 = _v_max(r0, v0)
            r1 = _v_max(r1, v1)
        if m16 < m:
            v0 = _scale_mask8(s, so, mask, mo, has_mask, sv, m16)
            _v8_store(out, oo + m16, v0)
            r0 = _v_max(r0, v0)
        res = _lane_max(_v_max(r0, r1))
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


@numba.njit(**_INLINE)
def _needs_tail(yr, b, has_bias, j0, j1, lim, nxt):
    """Whether any ``z = yr + b`` in ``[j0, j1)`` has |z| >= lim (NaN: no); one 64-byte vector
    (16 float32 or 8 float64 lanes) at a time. Prefetches ``nxt[j0:j1]``."""
    w = _64b_lanes(lim)
    m = j1 - (j1 - j0) % w
    bits = 0
    for j in range(j0, m, w):
        _prefetch(nxt, j)
        z = _v_add(_v64b_load(yr, j), _v64b_load(b, j)) if has_bias else _v64b_load(yr, j)
        bits |= _v_abs_ge_bits(z, lim)
    for j in range(m, j1):
        z = yr[np.uintp(j)] + b[np.uintp(j)] if has_bias else yr[np.uintp(j)]
        bits |= abs(z) >= lim
    return bits != 0


# The two loops of _bias_gelu_row, each a function of its own: inlined into one kernel, the
# constants of both polynomials compete for registers (measured 5% slower).
# (One loop per case of has_bias: a test inside a loop would leave it scalar or masked.)


@numba.njit(**_JIT)
def _gelu_full_run(yr, b, has_bias, dst, j0, j1):
    if has_bias:
        for j in range(j0, j1):
            dst[np.uintp(j)] = _gelu(yr[np.uintp(j)] + b[np.uintp(j)])
    else:
        for j in range(j0, j1):
            dst[np.uintp(j)] = _gelu(yr[np.uintp(j)])


@numba.njit(**_JIT)
def _gelu_main_run(yr, b, has_bias, dst, j0, j1):
    if has_bias:
        for j in range(j0, j1):
            dst[np.uintp(j)] = _gelu_main(yr[np.uintp(j)] + b[np.uintp(j)])
    else:
        for j in range(j0, j1):
            dst[np.uintp(j)] = _gelu_main(yr[np.uintp(j)])


@numba.njit(**_INLINE)
def _bias_gelu_row(yr, b, has_bias, dst, flags, nxt):
    """``dst[:] = gelu(yr + b)`` (``gelu(yr)`` without bias); ``flags``: scratch, one per block;
    ``nxt``: the next row, prefetched meanwhile.

    erf's second branch (its tail) is needed only for |z| >= 3.54 in float32 (2.83 in float64):
    next to no element at initialisation, a few in a hundred in a trained model. So each block
    (``_GELU_PLAN_*``) is checked first, a vector test of |z| against 3.5 (2.8), a bound below the
    exact one so that no block needing the tail is missed; runs of blocks that do not need it take
    ``_gelu_main``, the others the whole branch-free ``_gelu``, each in a loop of its own. Both
    give every element the value ``_gelu`` gives it. Once ``full_after`` blocks in a row need the
    tail, the rest of the row takes ``_gelu`` unchecked.
    """
    h = yr.shape[0]
    lim, (blk, full_after, min_run) = _tail_limit(yr[0]), _gelu_plan(yr[0])
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


@numba.njit(**_JIT)
def _bias_gelu_kernel(y, b, has_bias, out):  # y, out: [R, H]; b: [H]
    flags = np.empty(y.shape[1] // 64 + 1, np.bool_)
    rows = y.shape[0]
    for i in range(rows):
        _bias_gelu_row(y[i], b, has_bias, out[i], flags, y[min(i + 1, rows - 1)])


@numba.njit(**_JIT)
def _bias_gelu_inplace_kernel(y, b, has_bias):  # y: [R, H], updated in place; b: [H]
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
    # s, out: [B, N, T, S]; mask: [1|B, 1|N, 1|T, S]. Rows are addressed by offsets into the flat
    # arrays: a row view per row would cost reference counting and a call per helper.
    nb, nh, nt, ns = s.shape
    mb, mh, mt = mask.shape[0], mask.shape[1], mask.shape[2]
    sf, mf, of = s.reshape(-1), mask.reshape(-1), out.reshape(-1)
    prev, total = -1, s.dtype.type(1.0)  # the row whose division is pending, and its sum
    for bi in range(nb):
        for hi in range(nh):
            for ti in range(nt):
                o = ((bi * nh + hi) * nt + ti) * ns
                mo = 0
                if has_mask:
                    mo = (((bi if mb > 1 else 0) * mh + (hi if mh > 1 else 0)) * mt
                          + (ti if mt > 1 else 0)) * ns  # fmt: skip
                m = _scale_mask_max(sf, o, mf, mo, has_mask, scale, of, o, ns)
                for j in range(ns):  # v - max(v) <= 0 (or NaN)
                    u = np.uintp(o + j)
                    of[u] = _exp_nonpos(of[u] - m)
                # the previous row's division rides along this row's sum (vector adds in one
                # dependency chain, divisions on the divider: the time of the longer of the two)
                if ns > 128:
                    t = _pairwise_sum_div_at(of, o, ns, prev, total)
                elif prev < 0:
                    t = _pairwise_leaf(of, o, ns)
                else:
                    t = _pairwise_leaf_div(of, o, ns, prev, total)
                prev, total = o, t
    if prev >= 0:
        for j in range(ns):
            u = np.uintp(prev + j)
            of[u] = of[u] / total


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
