"""LLVM primitives for the kernels: fused multiply-add, bit casts, and vectors of lanes.

``JIT``/``INLINE`` are the compile options every kernel uses (cached on disk, no fast-math, NumPy's
error model, the GIL released). The vector intrinsics let a reduction keep NumPy's eight
interleaved accumulators as the eight lanes of one LLVM vector: the same IEEE operations in the
same order, one instruction for all eight.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model


JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)
# Loop- and branch-free scalar helpers are inlined in Numba IR: LLVM's inliner gives up on the
# bigger ones (erf), and a call left in a loop stops its vectorisation. (Their conditionals go
# through elementary.select, which LLVM inlines, so Numba's inliner never sees a branch.)
INLINE = dict(JIT, inline="always")
# For overload implementations that pick their code by something other than their own source (the
# packed driver of the ISA in use, a registered kernel): never cached themselves. Numba keys a cached
# function on its own bytecode and closure cells only, so a cached copy of, say, a lambda calling
# ``_packed_chunk`` kept the driver of whatever ISA compiled it first (REFIMPL_PACKED_ISA=avx2 then
# ran AVX-512 panels over AVX2-packed weights, out of bounds). Uncached, they are compiled into their
# callers, which hold a fingerprint of that state (``jobs.code_fingerprint``).
LINKED = dict(INLINE, cache=False)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# ---------------------------------------------------------------------------------------------
# LLVM primitives: a fused multiply-add, and float64 bit patterns both ways (for 2**k).
# ---------------------------------------------------------------------------------------------


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (``llvm.fma``; a single vfmadd instruction on x86-64 with FMA)."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def f64_from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bit pattern is the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def f64_bits(typingctx, x):
    """The IEEE-754 bit pattern of the float64 ``x``, as an int64."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@intrinsic
def pointer_like(typingctx, address, like):
    """The address (a 64-bit integer) as a pointer to ``like``'s element type (for ``numba.carray``)."""
    if not (address in (types.int64, types.uint64) and isinstance(like, types.Array)):
        return None
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


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


v8_load, v64b_load = _vec_load(8), _vec_load()
v8_splat = _vec_splat(8)


@intrinsic
def v8_store(typingctx, a, i, v):
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


v_add = _vec_binary(lambda builder, x, y: builder.fadd(x, y))
v_sub = _vec_binary(lambda builder, x, y: builder.fsub(x, y))
v_mul = _vec_binary(lambda builder, x, y: builder.fmul(x, y))
v_div = _vec_binary(lambda builder, x, y: builder.fdiv(x, y))
# max(x, y) lane by lane, as Numba's builtin computes it: y if y > x else x.
v_max = _vec_binary(lambda builder, x, y: builder.select(builder.fcmp_ordered(">", y, x), y, x))


@intrinsic
def v_fma(typingctx, x, y, z):
    """``x * y + z`` lane by lane, each rounded once (``llvm.fma`` on the vector)."""
    if not (isinstance(x, _Vec) and x == y == z):
        return None

    def codegen(context, builder, signature, args):
        vty = args[0].type
        fnty = ir.FunctionType(vty, [vty, vty, vty])
        bits = signature.args[0].dtype.bitwidth
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{x.lanes}f{bits}")
        return builder.call(fn, list(args))

    return x(x, y, z), codegen


@intrinsic
def v8_lanes(typingctx, v):
    """The eight lanes of ``v`` as a tuple."""
    if not (isinstance(v, _Vec) and v.lanes == 8):
        return None
    tup = types.UniTuple(v.dtype, 8)

    def codegen(context, builder, signature, args):
        lanes = [builder.extract_element(args[0], ir.Constant(ir.IntType(32), k)) for k in range(8)]
        return context.make_tuple(builder, tup, lanes)

    return tup(v), codegen


@intrinsic
def prefetch(typingctx, a, i):
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
def v_abs_ge_bits(typingctx, v, lim):
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


def _rows_of_8(context, builder, aty, arr, off, ld, m):
    """``m`` vector loads of 8 elements of flat array ``arr`` (type ``aty``), at ``off``, ``off + ld``, ..."""
    rows = [builder.add(off, builder.mul(ld, ir.Constant(ld.type, i))) for i in range(m)]  # off + i*ld
    return [builder.load(_vec_pointer(context, builder, aty, arr, at, 8), align=aty.dtype.bitwidth // 8) for at in rows]


def _concatenated(builder, vecs):
    """The 8-lane vectors ``vecs`` as one vector, lane i*8 + c holding ``vecs[i][c]`` (padded with
    undefined vectors to a power of two of them)."""
    width = 1
    while width < len(vecs):
        width *= 2
    vecs = vecs + [ir.Constant(vecs[0].type, ir.Undefined)] * (width - len(vecs))
    while len(vecs) > 1:
        n = vecs[0].type.count
        both = ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), list(range(2 * n)))
        vecs = [builder.shuffle_vector(vecs[j], vecs[j + 1], both) for j in range(0, len(vecs), 2)]
    return vecs[0]


def _lanes(builder, whole, picks):
    """The lanes ``picks`` of ``whole``, in that order, as one vector (a shuffle)."""
    i32 = ir.IntType(32)
    mask = ir.Constant(ir.VectorType(i32, len(picks)), picks)
    return builder.shuffle_vector(whole, ir.Constant(whole.type, ir.Undefined), mask)


@intrinsic
def v8_transpose(typingctx, src, so, ld, dst, do, rows):
    """``dst[do + c*rows + i] = src[so + i*ld + c]`` for i < ``rows`` (an integer literal, 1 to 8)
    and c < 8: a [rows, 8] block of rows ``ld`` apart stored column by column, contiguous (``rows``
    vector loads, shuffles in registers, ``rows`` vector stores, where a loop of scalar copies makes
    8 * rows strided stores)."""
    if not (_is_row(src) and _is_row(dst) and src.dtype == dst.dtype and isinstance(rows, types.IntegerLiteral)
            and all(isinstance(t, types.Integer) for t in (so, ld, do))):
        return None
    m = rows.literal_value
    if not 1 <= m <= 8:
        return None

    def codegen(context, builder, signature, args):
        sa, s_off, lda, da, d_off = args[:5]
        whole = _concatenated(builder, _rows_of_8(context, builder, signature.args[0], sa, s_off, lda, m))
        t = _lanes(builder, whole, [i * 8 + c for c in range(8) for i in range(m)])
        data = context.make_array(signature.args[3])(context, builder, da).data
        ptr = builder.bitcast(builder.gep(data, [d_off]), t.type.as_pointer())
        builder.store(t, ptr, align=src.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(src, so, ld, dst, do, rows), codegen


@intrinsic
def v8x8_transpose(typingctx, src, so, ld, dst, do, dld):
    """``dst[do + c*dld + i] = src[so + i*ld + c]`` for i, c < 8: an 8 x 8 block of rows ``ld``
    apart stored transposed, its columns ``dld`` apart (eight vector loads, shuffles in
    registers, eight vector stores)."""
    if not (_is_row(src) and _is_row(dst) and src.dtype == dst.dtype
            and all(isinstance(t, types.Integer) for t in (so, ld, do, dld))):
        return None

    def codegen(context, builder, signature, args):
        sa, s_off, lda, da, d_off, ldd = args
        whole = _concatenated(builder, _rows_of_8(context, builder, signature.args[0], sa, s_off, lda, 8))
        for c in range(8):  # column c: lanes i*8 + c of the whole block
            at = builder.add(d_off, builder.mul(ldd, ir.Constant(ldd.type, c)))  # do + c*dld
            ptr = _vec_pointer(context, builder, signature.args[3], da, at, 8)
            builder.store(_lanes(builder, whole, [i * 8 + c for i in range(8)]), ptr, align=src.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(src, so, ld, dst, do, dld), codegen
