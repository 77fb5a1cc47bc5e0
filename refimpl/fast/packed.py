"""Packed-weight GEMM: ``x @ W.T + b`` for 1-512 rows, ``W`` packed once (the first time it is used).

OpenBLAS copies ``W`` into its own panel layout on every call (for a few rows, one more pass over
the weights than the product needs); for a linear layer of a model that layout can be made once.
:func:`pack` cuts ``W`` [O, K] into panels of ``P`` output rows, stored k-major
(``panels[q, k, j] = W[q * P + j, k]``, zero rows pad the last panel), and :func:`packed_linear`
multiplies with a register-blocked micro-kernel:

    for each k-block of up to KC inputs (AVX-512: 768):
      for each block of up to MC rows (AVX-512: 32 * MR):
        copy x's block (MC x KC, stays in L2) into a buffer, tile by tile, k-major (from
        X_PACK_FROM rows; fewer rows are read in place)
        for each panel q of P outputs (its k-block, KC x P, AVX-512: 96 KB, comes into L2 once):
          for each tile of MR rows in the row block (x's tile, KC x MR, AVX-512: 24 KB float32):
            the micro-kernel: MR x P accumulators in vector registers; for each k of the block
            load the two P/2-lane weight vectors panels[q, k, :], broadcast x[r, k] for each of
            the MR rows (MR neighbours in the buffer) and fuse-multiply-add it into that row's
            two accumulators (each tile also prefetches its share of the next panel's block
            into L2)

The last R % MR rows of a row block go through tiles of 4, 2 and 1 rows (the same micro-kernel,
fewer accumulators), spanning several panels each, right after the MR-row tiles of the same group
of panels (their blocks still in L2: the weight is streamed from memory once, whatever R; with
AVX2 tiles, where at most one MR-row tile runs, the tail tiles also ask for the next group's
blocks). Below X_PACK_FROM rows, a tail of more than MR / 2 rows becomes a full tile instead
(:func:`whole_tiles`). A partial last panel (O % P real columns) accumulates in a scratch [R, P],
copied into ``out`` at the end; every other tile reads and writes ``out`` directly.

========  ===================  =========================  ============
ISA       float32 MR x P       float64 MR x P             accumulators
========  ===================  =========================  ============
AVX-512   8 x 32 (2 zmm/row)   8 x 16 (2 zmm/row)         16
AVX2      6 x 16 (2 ymm/row)   6 x 8 (2 ymm/row)          12
generic   4 x 8 (2 x 4 lanes)  4 x 8 (2 x 4 lanes)        8
========  ===================  =========================  ============

The ISA is chosen at import from the host CPU's features (``avx512f``; else ``avx2`` and ``fma``;
else generic). Testing knob: the environment variable ``REFIMPL_PACKED_ISA=avx512|avx2|generic``,
read at import, forces one (``tests/test_packed.py`` runs the AVX2 and generic tiles on an
AVX-512 machine and checks they give the same bits).

Numerics: every output element is ONE sequential chain of fused multiply-adds in k order,

    acc = 0;  for k = 0, 1, ..., K-1:  acc = fma(x[r, k], W[o, k], acc);  y[r, o] = acc + b[o]

The k-blocks do not change it: a block ends by storing ``acc`` (exactly) in ``out`` and the next
resumes from it. The bias is added after the chain (one rounding), never folded into it. So the
result is bitwise independent of the number of rows, of how they fall into tiles (a row in a tail
tile gets the same bits), of the ISA's tile shape and of threads; it is equal to a scalar loop
of ``llvm.fma`` (``tests/test_packed.py``). Another summation order than BLAS's, so it is held to
``x @ W.T + b`` by the K-term dot-product bound (tolerances.KERNEL_ULPS["dot"]).

Compile time: a micro-kernel with 16 vector accumulators written with Numba-level vector
intrinsics can take LLVM a minute to compile (an earlier 4 x 4 tile took 86 s). Here the
micro-kernel (the loop over k for one tile) is written directly as LLVM IR in an ``@intrinsic``:
one basic block with a phi node per accumulator, which LLVM only has to schedule and allocate
registers for; the loops around it are plain Numba. A cold compile takes ~1-2 s per dtype, and
only the dtype used is compiled.

Shape legend: R rows (all leading axes of x), K = in, O = out, P panel width (outputs per panel),
MR rows per tile, MC rows per row block, KC inputs per k-block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from .jobs import chunks_of, on_two_cores, read_only, register_packed_drivers
from .llvm import DTYPES, INLINE, JIT, LINKED, v8_transpose, v8x8_transpose

__all__ = ["ISA", "Packed", "pack", "packed_linear", "panel_width", "warmup"]

# ISA -> (MR rows per tile, P outputs per panel for float32, for float64). Two vectors per tile row.
_TILES = {
    "avx512": (8, 32, 16),  # 2 x 512-bit vectors per row: 16 accumulators + 2 weights + 1 broadcast
    "avx2": (6, 16, 8),  # 2 x 256-bit vectors per row: 12 accumulators of the 16 ymm registers
    "generic": (4, 8, 8),  # 2 x 4 lanes (SSE-sized); without FMA hardware llvm.fma calls libm's fma
}


def _host_isa() -> str:
    forced = os.environ.get("REFIMPL_PACKED_ISA", "")
    if forced:
        if forced not in _TILES:
            raise ValueError(f"REFIMPL_PACKED_ISA must be one of {sorted(_TILES)}, got {forced!r}")
        return forced
    features = llvm_binding.get_host_cpu_features()
    if features.get("avx512f"):
        return "avx512"
    if features.get("avx2") and features.get("fma"):
        return "avx2"
    return "generic"


ISA = _host_isa()
_MR = _TILES[ISA][0]
# ISA -> (KC inputs per k-block, MC rows per row block, a multiple of MR).
_BLOCKS = {
    # A panel's block KC * P = 96 KB (L2); x's block 768 KB float32, 1.5 MB float64. Tried on the
    # development VM (AVX-512, 48 KB L1, 2 MB L2), none faster within the noise: KC = 128, 192,
    # 256, 384 or the whole K (float32 and float64); MC = 64 ... 256 rows or none for R <= 512;
    # MR = 12 (24 accumulators).
    "avx512": (768, 256),
    # x's block 288 KB float32, within the 512 KB L2 of AMD's Zen 2 and 3 (192 rows would be 576 KB).
    # With AVX2 code on the AVX-512 VM (48 KB L1, 2 MB L2), A/B in one process: MC = 96 and 192 the
    # same (0.999-1.012, base-sized forwards at 1x256 to 8x128). KC = 256 with MC = 144 (BLIS's
    # blocking of its 6 x 16 kernel for Zen: the panel's block in L1) was as fast from 128 rows, but
    # at 1 to 40 rows, where each panel is best streamed once, whole, forwards took 1.12-1.17x the
    # time of KC = 768 (alternating processes, runs minutes apart).
    "avx2": (768, 96),
    "generic": (768, 128),
}
KC, MC = _BLOCKS[ISA]
# Copying x's block k-major (one contiguous stream for the broadcasts instead of MR rows K apart)
# is 5-25% faster from 256 rows (float64 most), the same below (AVX-512), and costs ~0.4 s more
# compile time.

# With cores=2, the panels are cut into this many chunks (at most). Fewer, longer chunks stream the
# weights better: a base-sized forward's 72 GEMMs at 16 rows took 23.3 ms in 4 chunks each, 25.3 in
# 8, 26.4 in 16 (the first panel of every chunk waits on memory); 2 leave no room for a late helper.
TWO_CORE_CHUNKS = 4
SPLIT_FROM = 1 << 18  # multiply-adds (R * K * O) from which cores=2 shares a GEMM with the helper thread
# From this many rows x is copied tile by tile, k-major, before the micro-kernel reads it; fewer rows
# read x in place (the MR broadcasts of a step from MR rows K apart). Measured when the copy went
# element by element (~0.5-0.7 ns an element, x in cache): a base-sized forward at 1x16 and 1x32
# (two-core GEMM) took 0.84-0.93x the time in place (3 runs each); at 48 rows in place was not
# faster. The copy now moves eight columns of a tile at a time, transposed in registers
# (llvm.v8_transpose): 0.09-0.31 ns an element float32, 0.46-0.57 float64, as fast as a plain copy
# of x (Sapphire Rapids); GEMMs of 256-512 rows took 0.94-0.99x the time of the element-by-element
# copy (AVX-512 and AVX2 tiles, float32 and float64), base-sized forwards 0.95-0.99x. (The decoding
# step in one call, refimpl.fast.decoding, relies on x read in place below X_PACK_FROM.)
X_PACK_FROM = 33
_WIDTHS = {DTYPES[0]: _TILES[ISA][1], DTYPES[1]: _TILES[ISA][2]}


def whole_tiles(nr: int) -> int:
    """The rows R' that R = ``nr`` rows of x multiply as: R itself, or, below X_PACK_FROM rows
    (memory-bound: streaming the weight once dominates) with more than MR / 2 rows left over after
    the full tiles (AVX-512: 5-7 of 8), R rounded up to a multiple of MR, the extra rows zeros and
    their outputs dropped. The left-over rows would otherwise run as 4-, 2- and 1-row tiles, which
    stream the weights worse than a full tile with its prefetch; each output keeps its chain (the
    same bits). A decoding step's GEMMs (base-sized masked LM, two cores, runs minutes apart),
    AVX-512 tiles: batch 5-7 took 1.23-1.37x the time of batch 8, 13-15 1.21-1.27x that of 16;
    rounded up 1.02-1.03x, and 21-31 0.91-0.97x the time not rounded. AVX2 tiles (whose 4- and
    2-row tails prefetch): batch 5 0.80x, 4 and 11 0.94-0.95x, 10 and 16 1.00-1.03x."""
    if nr < X_PACK_FROM and nr % _MR > _MR // 2:
        return nr - nr % _MR + _MR
    return nr


def two_core_chunks(nr: int, k: int, n_out: int, width: int) -> tuple[int, int]:
    """How ``packed_linear(cores=2)`` shares R = ``nr`` rows x [O = ``n_out``, K = ``k``] panels of
    ``width`` with the helper: (panels a chunk, chunks), or (0, 0) where it runs on one core (below
    ``SPLIT_FROM`` multiply-adds, or a single panel)."""
    n_panels = -(-n_out // width)
    if nr * k * n_out < SPLIT_FROM or n_panels < 2:
        return 0, 0
    return chunks_of(n_panels, TWO_CORE_CHUNKS)


def panel_width(dtype) -> int:
    """P, the outputs per panel of this CPU's kernel for ``dtype`` (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return _WIDTHS[dtype]


# ---------------------------------------------------------------------------------------------
# Packing: a NumPy copy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Packed:
    """A weight [O, K] in panels of ``width`` outputs: ``panels`` (1-D, C, read-only) holds
    ``W[o, i]`` at ``((o // width) * k + i) * width + o % width``, zero rows padding the last
    panel. Made by :func:`pack`; a Packed built by hand is checked and its panels made read-only."""

    panels: np.ndarray  # [ceil(O / P) * K * P]
    n_out: int  # O
    k: int  # K
    width: int  # P

    def __post_init__(self):
        a = self.panels
        if not isinstance(a, np.ndarray) or a.dtype not in DTYPES:
            raise TypeError("panels must be a float32 or float64 NumPy array")
        if min(self.n_out, self.k) < 0 or self.width < 1:
            raise ValueError(f"bad Packed sizes: n_out={self.n_out}, k={self.k}, width={self.width}")
        size = -(-self.n_out // self.width) * self.width * self.k
        if a.ndim != 1 or a.size != size or not a.flags.c_contiguous:
            raise ValueError(f"panels must be a C-contiguous 1-D array of {size} elements, got {a.shape}")
        if a.flags.writeable:  # a read-only view (the caller's array keeps its flags)
            a = a.view()
            a.flags.writeable = False
            object.__setattr__(self, "panels", a)

    @property
    def dtype(self) -> np.dtype:
        return self.panels.dtype


ALIGN = 64  # bytes: a panel row (P/2 lanes = 64 bytes) never straddles two cache lines


def _aligned_zeros(n: int, dtype) -> np.ndarray:
    """``np.zeros(n, dtype)`` starting on a 64-byte boundary. NumPy's own allocations are only
    16-byte aligned, and a vector load that straddles two cache lines costs two: with misaligned
    panels the same GEMMs took up to 1.4x as long (Sapphire Rapids, float32, 80 rows)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n * itemsize + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n * itemsize].view(dtype)


def pack(weight) -> Packed:
    """Pack a ``Linear.weight`` [O, K] (float32 or float64, any layout, a read-only memory map too)
    for :func:`packed_linear`, in panels of this CPU's width. One copy; ``weight`` is not kept."""
    if not isinstance(weight, np.ndarray) or weight.dtype not in DTYPES:
        raise TypeError("weight must be a float32 or float64 NumPy array")
    if weight.ndim != 2:
        raise ValueError(f"weight must be [O, K], got shape {weight.shape}")
    n_out, k = weight.shape
    p = panel_width(weight.dtype)
    n_panels, full = -(-n_out // p), n_out // p
    panels = _aligned_zeros(n_panels * k * p, weight.dtype).reshape(n_panels, k, p)  # [O/P, K, P]
    w = np.asarray(weight)  # (a memmap as a plain array view: no copy)
    panels[:full] = w[: full * p].reshape(full, p, k).transpose(0, 2, 1)  # [O/P, P, K] -> [O/P, K, P]
    if full < n_panels:  # the last panel: its real rows, the rest stays zero
        panels[full, :, : n_out - full * p] = w[full * p :].T  # [O % P, K] -> [K, O % P]
    return Packed(panels.reshape(-1), n_out, k, p)  # (made read-only there)


@numba.njit(**INLINE)
def pack_into(src, so, o_stride, i_stride, n_out, k, dst, p):
    """:func:`pack`'s layout, for compiled code: the weight W [O = ``n_out``, K = ``k``] with
    ``W[o, i] = src[so + o*o_stride + i*i_stride]`` into ``dst`` as panels of ``p`` (a multiple of
    8): ``dst[((o // p) * K + i) * p + o % p] = W[o, i]``. The last panel's padding (columns O to
    its end) is not written: zero it once. Given by rows (``i_stride`` 1, e.g. attention's keys as
    a weight) W goes in 8 x 8 blocks transposed in registers; by columns (``o_stride`` 1, e.g. the
    values as the weight v^T) each panel row is a copy of P contiguous values."""
    if i_stride == 1:
        o8, k8 = n_out - n_out % 8, k - k % 8
        for o0 in range(0, o8, 8):
            for i0 in range(0, k8, 8):
                v8x8_transpose(src, so + o0 * o_stride + i0, o_stride, dst, ((o0 // p) * k + i0) * p + o0 % p, p)
        for o in range(n_out):  # the rest: rows from o8 (every i), columns from k8 (every row)
            for i in range(0 if o >= o8 else k8, k):
                dst[np.uintp(((o // p) * k + i) * p + o % p)] = src[np.uintp(so + o * o_stride + i)]
        return
    for i in range(k):  # (unsigned offsets: no negative-index wraparound, so the copies vectorise)
        for g in range((n_out + p - 1) // p):
            for j in range(min(p, n_out - g * p)):
                dst[np.uintp((g * k + i) * p + j)] = src[np.uintp(so + (g * p + j) * o_stride + i * i_stride)]


# ---------------------------------------------------------------------------------------------
# The micro-kernel, as LLVM IR
# ---------------------------------------------------------------------------------------------


def _is_flat(a) -> bool:
    """A C-contiguous 1-D float array type."""
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and isinstance(a.dtype, types.Float)


@intrinsic
def _tile(typingctx, w, wo, x, xo, xks, xis, c, co, ldc, kn, b, bo, start, add_bias, rows, width, ahead, fstep,
          fetch, pstride, panels):
    """One tile of MR rows x G panels of P outputs over one k-block, for k = 0 .. kn-1 (kn >= 1):

        acc[i, j] = 0 if start else c[co + i*ldc + j]          i < rows (MR), j < panels * width (G*P)
        acc[i, g*P + j] = fma(x[xo + k*xks + i*xis], w[wo + g*pstride + k*width + j], acc[i, g*P + j])
                                                                                 for k in order
        c[co + i*ldc + j] = acc[i, j] (+ b[bo + j] if add_bias)

    w: the panels (panel g of the tile at wo + g*pstride); x: the x buffer (xks = rows, xis = 1: the
    tile at xo is [kn, rows], x[r + i, k0 + k] at k*rows + i) or x itself (xks = 1, xis = K: its
    rows in place); c: out [R*O] or a scratch; b: the bias (read only
    when add_bias). Several panels give a tile of few rows enough independent chains (an MR x 1
    tile of 1-2 rows has 2-4 and waits on the fma latency). With ``fetch`` lines, step k also asks
    for the 64-byte lines at w[ahead + k*fstep + j*E], j < fetch, E elements making 64 bytes, in
    L2 (a share of a coming panel's block: a hint, never a fault; it moves no number). ``rows``, ``width``,
    ``fetch`` and ``panels`` are integer literals: each combination is its own straight-line IR.
    """
    arrays = (w, x, c, b)
    if not (all(_is_flat(a) for a in arrays) and w.dtype == x.dtype == c.dtype == b.dtype):
        return None
    if not all(isinstance(a, types.IntegerLiteral) for a in (rows, width, fetch, panels)):
        return None
    mr, p, lines, npan = rows.literal_value, width.literal_value, fetch.literal_value, panels.literal_value
    intp, boolean = types.intp, types.boolean
    sig = types.none(w, intp, x, intp, intp, intp, c, intp, intp, intp, b, intp, boolean, boolean, rows, width, intp,
                     intp, fetch, intp, panels)

    def codegen(context, builder, signature, args):
        wa, wo, xa, xo, xks, xis, ca, co, ldc, kn, ba, bo, start, add_bias, _, _, ahead, fst, _, pst = args[:20]
        aty = signature.args[0]
        fty = context.get_value_type(aty.dtype)  # float or double
        lanes, itemsize = p // 2, aty.dtype.bitwidth // 8
        vty = ir.VectorType(fty, lanes)  # <16 x float> (zmm) for AVX-512 float32, ...
        i32, i64 = ir.IntType(32), ir.IntType(64)

        def const(v):
            return ir.Constant(i64, v)

        def data(i, value):  # the element pointer of flat array argument i
            return context.make_array(signature.args[i])(context, builder, value).data

        def vload(ptr, off):  # lanes elements at ptr + off, as one (unaligned) vector load
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), vty.as_pointer()), align=itemsize)

        def vstore(v, ptr, off):
            builder.store(v, builder.bitcast(builder.gep(ptr, [off]), vty.as_pointer()), align=itemsize)

        # Pointers: the panel's block at k0, the x tile and each tile row's c[r, o0].
        wp, pp = builder.gep(data(0, wa), [wo]), builder.gep(data(0, wa), [ahead])  # (pp: maybe past the end)
        xp, cdata = builder.gep(data(2, xa), [xo]), data(6, ca)
        crows = [builder.gep(cdata, [builder.add(co, builder.mul(ldc, const(i)))]) for i in range(mr)]
        # Row i of the tile at xp + i*xis, each pointer made opaque to LLVM (an empty asm that returns
        # its operand): seeing rows i and i+1 xis apart, LLVM's loop strength reduction would chain
        # them (row i+1's address = row i's + xis, MR dependent adds per k step: a serial chain
        # longer than the step's MR fmas, with AVX2 code). Opaque, each row keeps its own pointer.
        ptr_ty = xp.type
        opaque = ir.FunctionType(ptr_ty, [ptr_ty])
        xrow = [builder.asm(opaque, "", "=r,0", [builder.gep(xp, [builder.mul(xis, const(i))])], False)
                for i in range(mr)]
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{lanes}f{aty.dtype.bitwidth}")
        zero_index = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
        i8p = ir.IntType(8).as_pointer()
        llvm_prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))

        # entry:   br start, fresh, resume
        # fresh:   (accumulators = 0)                        br loop
        # resume:  acc[i][j] = load c row i, vector j        br loop
        fresh = builder.append_basic_block("packed.fresh")
        resume = builder.append_basic_block("packed.resume")
        loop = builder.append_basic_block("packed.loop")
        builder.cbranch(start, fresh, resume)
        builder.position_at_end(fresh)
        builder.branch(loop)
        builder.position_at_end(resume)
        nv = 2 * npan  # vectors per tile row: vector v covers outputs v*lanes .. (panel v // 2)
        loaded = [[vload(crows[i], const(v * lanes)) for v in range(nv)] for i in range(mr)]
        builder.branch(loop)

        # loop:  k   = phi [0, fresh], [0, resume], [k + 1, loop]
        #        acc = phi [0, fresh], [c, resume], [acc', loop]          (one per accumulator)
        #        w0, w1 = <lanes x T> loads of the panel at k*P and k*P + lanes
        #        (fetch: llvm.prefetch(read, L2, data) of the fetch lines at ahead + k*fstep)
        #        for each row i: s = load x_tile[k, i]; v = splat(s) (insertelement + shufflevector)
        #                        acc'[i][0] = llvm.fma(v, w0, acc[i][0]); acc'[i][1] = ... w1 ...
        #        br k + 1 < kn, loop, done
        builder.position_at_end(loop)
        k = builder.phi(i64, "k")
        k.add_incoming(const(0), fresh)
        k.add_incoming(const(0), resume)
        acc = [[builder.phi(vty) for v in range(nv)] for i in range(mr)]
        for i in range(mr):
            for v in range(nv):
                acc[i][v].add_incoming(ir.Constant(vty, None), fresh)  # zeroinitializer
                acc[i][v].add_incoming(loaded[i][v], resume)
        koff = builder.mul(k, const(p))
        wv = []  # panel g's two vectors at k: w[wo + g*pstride + k*P ...]
        for g in range(npan):
            gp = builder.gep(wp, [builder.mul(pst, const(g))]) if g else wp
            wv += [vload(gp, koff), vload(gp, builder.add(koff, const(lanes)))]
        foff = builder.mul(k, fst)
        for j in range(lines):  # (64 // itemsize elements = 64 bytes = one cache line)
            line = builder.bitcast(builder.gep(pp, [builder.add(foff, const(j * 64 // itemsize))]), i8p)
            builder.call(llvm_prefetch, [line, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        new = []
        xk = builder.mul(k, xks)  # the tile's x at k: xp[k*xks + i*xis], i < MR
        for i in range(mr):
            s = builder.load(builder.gep(xrow[i], [xk]), align=itemsize)
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), s, ir.Constant(i32, 0))
            v = builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zero_index)  # s in every lane
            new.append([builder.call(fma, [v, wv[j], acc[i][j]]) for j in range(nv)])
        k1 = builder.add(k, const(1))
        for i in range(mr):
            for j in range(nv):
                acc[i][j].add_incoming(new[i][j], loop)
        k.add_incoming(k1, loop)
        done = builder.append_basic_block("packed.done")
        builder.cbranch(builder.icmp_signed("<", k1, kn), loop, done)

        # done:  br add_bias, biased, store
        # biased: acc' + b[bo : bo + P] (one rounding per element)      br store
        # store:  y = phi [acc', done], [acc' + b, biased]; store each row's two vectors in c
        builder.position_at_end(done)
        biased = builder.append_basic_block("packed.biased")
        store = builder.append_basic_block("packed.store")
        builder.cbranch(add_bias, biased, store)
        builder.position_at_end(biased)
        bp = builder.gep(data(10, ba), [bo])
        bv = [vload(bp, const(v * lanes)) for v in range(nv)]
        plus = [[builder.fadd(new[i][j], bv[j]) for j in range(nv)] for i in range(mr)]
        builder.branch(store)
        builder.position_at_end(store)
        ys = [[builder.phi(vty) for j in range(nv)] for i in range(mr)]  # (phis first in a block)
        for i in range(mr):
            for j in range(nv):
                ys[i][j].add_incoming(new[i][j], done)
                ys[i][j].add_incoming(plus[i][j], biased)
                vstore(ys[i][j], crows[i], const(j * lanes))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# The loops around it (plain Numba): one driver per ISA and dtype
# ---------------------------------------------------------------------------------------------


@numba.njit(**JIT)
def _pack_x(xf, xp, at, r0, r1, k, k0, kn, mr):
    """x's row block x[r0:r1, k0:k0+kn] into xp from ``at``, tile by tile: the tile of m rows from
    row r at xp[at + (r - r0) * kn], k-major ([kn, m]: the m rows' x[., k] side by side), so that
    the micro-kernel reads one contiguous stream. The tiles as the driver cuts them: MR rows, then
    4, 2, 1."""
    r = r0
    while r < r1:
        m = mr if r + mr <= r1 else (4 if r1 - r >= 4 else (2 if r1 - r >= 2 else 1))
        xo, src = at + (r - r0) * kn, r * k + k0
        kv = kn - kn % 8  # columns in blocks of 8: a transpose in registers each
        for kk in range(0, kv, 8):
            if m == 8:
                v8_transpose(xf, src + kk, k, xp, xo + kk * 8, 8)
            elif m == 6:
                v8_transpose(xf, src + kk, k, xp, xo + kk * 6, 6)
            elif m == 4:
                v8_transpose(xf, src + kk, k, xp, xo + kk * 4, 4)
            elif m == 2:
                v8_transpose(xf, src + kk, k, xp, xo + kk * 2, 2)
            else:
                v8_transpose(xf, src + kk, k, xp, xo + kk, 1)
        for i in range(m):
            for kk in range(kv, kn):
                xp[xo + kk * m + i] = xf[src + i * k + kk]
        r += m


@numba.njit(**INLINE)
def _tail_ahead(q, tg, q1, ps, k0, p):
    """A tail tile's prefetch address and step (elements a k step): the block at k0 of panel q + tg
    (tg: the group size, or 0), one row a step, where tg > 0 and that panel is in the range (q1:
    its end); else panel q's own block, step 0 (in cache: no traffic)."""
    if 0 < tg and q + tg < q1:
        return (q + tg) * ps + k0 * p, p
    return q * ps + k0 * p, 0


@numba.njit(**JIT)
def _pack_x_whole(xf, xp, nr, k, kc, mc, mr):
    """All of x [R, K] into xp [R*K], block by block as the driver reads it: the block of rows
    r0..r1 and inputs k0..k0+kn at r0*K + k0*(r1 - r0) (the layout of ``prepacked`` x)."""
    for r0 in range(0, nr, mc):
        r1 = min(nr, r0 + mc)
        for k0 in range(0, k, kc):
            _pack_x(xf, xp, r0 * k + k0 * (r1 - r0), r0, r1, k, k0, min(kc, k - k0), mr)


def _make_driver(mr, p, lines, g4, g2, g1, tail_fetch):
    """The driver for tiles of ``mr`` rows and panels of ``p`` outputs (a panel's row: ``lines``
    64-byte lines, at least 1); the tail tiles of 4, 2 and 1 rows span ``g4``, ``g2`` and ``g1``
    panels, and the panels are worked through in groups of
    ``g1`` (each group's full tiles, then its tail tiles). A closure, so that the tile shapes are compile-time
    constants (the literals the micro-kernel needs) that Numba's cache keys on: an ISA forced by
    REFIMPL_PACKED_ISA never loads another ISA's cached code."""

    tf = 1 if tail_fetch else 0  # prefetch lines a step in the 4- and 2-row tail tiles

    @numba.njit(**JIT)
    def _packed_kernel(xf, pf, bf, has_bias, of, scratch, xp, nr, k, n_out, kc, mc, q0, q1, prepacked):  # noqa: C901
        """``of[r*O + o] = fma chain over k of x[r, k] * W[o, k] (+ b[o])`` for the outputs of
        panels q0..q1 (o from q0*P to min(q1*P, O)); flat C arrays: xf [R*K], pf the panels, bf [O]
        (or any, without bias), of [R*O], scratch [R*P] (the last, partial panel's columns), xp:
        x's row block, tile by tile, k-major, packed here ([min(R, MC) * min(K, KC)]), or all of x
        packed by ``_pack_x_whole`` when ``prepacked`` ([R*K]; xf is then not read). Below
        ``X_PACK_FROM`` rows x is read in place from xf, and xp is neither read nor written."""
        full = n_out // p  # panels whose P columns are all real: written in place in of
        n_panels = full + (1 if n_out % p else 0)
        q1 = min(q1, n_panels)
        qf = min(q1, full)  # this range's full panels: q0..qf
        ps = k * p  # from one panel to the next in pf
        direct = nr < X_PACK_FROM  # x read in place, not packed (see X_PACK_FROM)
        xs = xf if direct else read_only(xp)
        xi = k if direct else 1
        ksm, ks4, ks2, ks1 = (1, 1, 1, 1) if direct else (mr, 4, 2, 1)
        for k0 in range(0, k, kc):
            kn = min(kc, k - k0)
            start, last = k0 == 0, k0 + kn == k
            addb = last and has_bias
            for r0 in range(0, nr, mc):
                r1 = min(nr, r0 + mc)
                rt = r0 + (r1 - r0) // mr * mr  # rows r0..rt in tiles of MR, the tail rt..r1 below
                nt = (rt - r0) // mr  # MR-row tiles
                fs = -(-p // nt) if nt else p  # each tile's prefetch step (elements a k step)
                # x[r, k0 + kk] of a tile from row r: read from xs at xb + r*xr + kk*ks + (r' - r)*xi.
                # Packed, xs is xp: x[r0:r1, k0:k0+kn] tile by tile, k-major, at xa (ks: the tile's
                # rows, xi 1); direct, xs is x itself (ks 1, xi K).
                if direct:
                    xb, xr = k0, k
                else:
                    xa = r0 * k + k0 * (r1 - r0) if prepacked else 0
                    if not prepacked:
                        _pack_x(xf, xp, 0, r0, r1, k, k0, kn, mr)
                    xb, xr = xa - r0 * kn, kn
                # The panels in groups of g1: each group's MR-row tiles, then its tail rows in tiles of
                # 4, 2 and 1 rows, each tile spanning several panels (the same chains, enough of them
                # to hide the fma latency). The tail tiles find the group's blocks in L2: a weight is
                # streamed from memory once whatever the rows (3, 5, 6 or 7 rows: not two or three
                # times; MR + 1 ... 2*MR - 1 rows, e.g. a decoding batch of 8 with AVX2's 6-row tiles:
                # not twice). Asking for the next group's blocks in the tail was no faster (tried).
                for qg in range(q0, q1, g1):
                    for q in range(qg, min(qg + g1, q1)):
                        wo = (q * k + k0) * p  # the panel's block: pf[wo : wo + kn*P], [kn, P]
                        ahead, bo = wo + ps, q * p  # the next panel's block (past the end for the last)
                        # The MR-row tiles. Together they ask for the next panel's block, so that it comes
                        # into L2 while this panel computes: each tile a 1/nt share of it, one line per
                        # k step (a single tile: all of it, two lines a step). The hardware prefetcher
                        # alone leaves each panel's first pass waiting on memory; asking for the whole
                        # block during the first of several tiles floods the line-fill buffers while the
                        # later tiles leave memory idle. A base-sized forward's 72 GEMMs, one thread,
                        # weights from memory: spread 0.72-0.89x the time of first-tile-only at 32-256
                        # rows (two threads sharing the weights 0.70-0.88x); the next-but-one panel
                        # instead was no faster.
                        if q < full and nt == 1:
                            _tile(pf, wo, xs, xb + r0 * xr, ksm, xi, of, q * p + r0 * n_out, n_out, kn, bf, bo, start,
                                  addb, mr, p, ahead, p, lines, ps, 1)
                        elif q < full:
                            for i in range(nt):
                                r = r0 + i * mr
                                _tile(pf, wo, xs, xb + r * xr, ksm, xi, of, q * p + r * n_out, n_out, kn, bf, bo, start,
                                      addb, mr, p, ahead + i * kn * fs, fs, 1, ps, 1)
                        else:  # the partial panel accumulates in scratch [R, P]; bias added on copy-out
                            r = r0
                            while r + mr <= r1:
                                _tile(pf, wo, xs, xb + r * xr, ksm, xi, scratch, r * p, p, kn, bf, bo, start, False,
                                      mr, p, ahead, 0, 0, ps, 1)
                                r += mr
                            if mr > 4 and r1 - r >= 4:
                                _tile(pf, wo, xs, xb + r * xr, ks4, xi, scratch, r * p, p, kn, bf, bo, start, False,
                                      4, p, ahead, 0, 0, ps, 1)
                                r += 4
                            if r1 - r >= 2:
                                _tile(pf, wo, xs, xb + r * xr, ks2, xi, scratch, r * p, p, kn, bf, bo, start, False,
                                      2, p, ahead, 0, 0, ps, 1)
                                r += 2
                            if r1 - r >= 1:
                                _tile(pf, wo, xs, xb + r * xr, ks1, xi, scratch, r * p, p, kn, bf, bo, start, False,
                                      1, p, ahead, 0, 0, ps, 1)
                    qe, r = min(qg + g1, qf), rt  # (the group's full panels)
                    if r >= r1 or qg >= qe:
                        continue
                    # With ``tail_fetch``, the 4- and 2-row tiles of a row block with at most one MR-row
                    # tile ask for a share of the next group's blocks (one line a step of the panel g1
                    # on from the tile's first), which would otherwise come when that group's tiles
                    # first read them; with more MR-row tiles, compute hides the wait. Otherwise (and
                    # past the range) they ask for their own block (in cache: no traffic).
                    tg = g1 if tail_fetch and nt <= 1 else 0
                    if mr > 4 and r1 - r >= 4:
                        q = qg
                        while q + g4 <= qe:
                            ta, tstep = _tail_ahead(q, tg, q1, ps, k0, p)
                            _tile(pf, (q * k + k0) * p, xs, xb + r * xr, ks4, xi, of, q * p + r * n_out, n_out, kn, bf,
                                  q * p, start, addb, 4, p, ta, tstep, tf, ps, g4)
                            q += g4
                        while q < qe:
                            ta, tstep = _tail_ahead(q, tg, q1, ps, k0, p)
                            _tile(pf, (q * k + k0) * p, xs, xb + r * xr, ks4, xi, of, q * p + r * n_out, n_out, kn, bf,
                                  q * p, start, addb, 4, p, ta, tstep, tf, ps, 1)
                            q += 1
                        r += 4
                    if r1 - r >= 2:
                        q = qg
                        while q + g2 <= qe:
                            ta, tstep = _tail_ahead(q, tg, q1, ps, k0, p)
                            _tile(pf, (q * k + k0) * p, xs, xb + r * xr, ks2, xi, of, q * p + r * n_out, n_out, kn, bf,
                                  q * p, start, addb, 2, p, ta, tstep, tf, ps, g2)
                            q += g2
                        while q < qe:
                            ta, tstep = _tail_ahead(q, tg, q1, ps, k0, p)
                            _tile(pf, (q * k + k0) * p, xs, xb + r * xr, ks2, xi, of, q * p + r * n_out, n_out, kn, bf,
                                  q * p, start, addb, 2, p, ta, tstep, tf, ps, 1)
                            q += 1
                        r += 2
                    if r1 - r >= 1:
                        q = qg
                        while q + g1 <= qe:
                            _tile(pf, (q * k + k0) * p, xs, xb + r * xr, ks1, xi, of, q * p + r * n_out, n_out, kn, bf,
                                  q * p, start, addb, 1, p, 0, 0, 0, ps, g1)
                            q += g1
                        while q < qe:
                            _tile(pf, (q * k + k0) * p, xs, xb + r * xr, ks1, xi, of, q * p + r * n_out, n_out, kn, bf,
                                  q * p, start, addb, 1, p, 0, 0, 0, ps, 1)
                            q += 1
        if full < q1:  # the partial panel (in this range): its real columns, plus the bias
            o0 = full * p
            for r in range(nr):
                for j in range(n_out - o0):
                    y = scratch[r * p + j]
                    of[r * n_out + o0 + j] = y + bf[o0 + j] if has_bias else y

    return _packed_kernel


# One driver per dtype (its panel width), each compiled on its first call only.
# Panels per tail tile of 4, 2, 1 rows: 16 accumulators with AVX-512's 32 vector registers, 8 with
# the 16 of AVX2 (and the generic tile). The last, g1, is also the panel group the driver works
# through at a time (AVX-512 float32: 8 panels of a 768-input block, 768 KB, in L2).
_TAIL_PANELS = (2, 4, 8) if ISA == "avx512" else (1, 2, 4)
# Prefetching in the tail tiles (see the driver), AVX2 only. A decoding step's GEMMs (a base-sized
# masked LM, two cores; runs minutes apart), with / without: AVX2 tiles at batch 4 0.80x the time,
# 6 0.88-0.93x, 7 0.93-0.97x, 8 0.94-0.98x; AVX-512 tiles 1.04x at 4, 1.12-1.19x at 6 and 7 (0.88x
# at 12).
_TAIL_FETCH = ISA == "avx2"
_DRIVERS = {dtype: _make_driver(_MR, panel_width(dtype), max(1, panel_width(dtype) * dtype.itemsize // 64),
                                *_TAIL_PANELS, _TAIL_FETCH) for dtype in DTYPES}
register_packed_drivers({dtype: (_DRIVERS[dtype], panel_width(dtype)) for dtype in DTYPES})  # the two-core jobs (refimpl.fast.jobs)


def drive(xf, pf, bf, has_bias, of, scratch, xp, nr, k, n_out, kc, mc, q0, q1, prepacked):
    """The driver for ``of``'s dtype (its arguments), for compiled code: a GEMM on this core."""
    raise NotImplementedError  # (Numba-only: see the overload below)


@overload(drive, jit_options=LINKED)
def _drive_impl(xf, pf, bf, has_bias, of, scratch, xp, nr, k, n_out, kc, mc, q0, q1, prepacked):
    driver = _DRIVERS[as_dtype(of.dtype)]
    return lambda xf, pf, bf, has_bias, of, scratch, xp, nr, k, n_out, kc, mc, q0, q1, prepacked: driver(
        xf, pf, bf, has_bias, of, scratch, xp, nr, k, n_out, kc, mc, q0, q1, prepacked)


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------


def flat_view(a) -> np.ndarray:
    """A C-contiguous, read-only 1-D view of ``a`` (a copy only when ``a`` is not C-contiguous).

    Always read-only, so the kernels compile one specialisation that serves loaded checkpoints
    (read-only memory maps) and in-memory arrays alike, and the weights are never copied."""
    if not a.flags.c_contiguous:
        a = np.array(a, order="C")
    v = a.reshape(-1).view()
    v.flags.writeable = False
    return v


def result_array(out, shape: tuple, dtype) -> np.ndarray:
    """``out`` checked as a GEMM's destination (C-contiguous, writeable, ``shape``, ``dtype``), or a
    new array when it is None."""
    if out is None:
        return np.empty(shape, dtype)
    if not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == dtype
            and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a C-contiguous, writeable {dtype} array of shape {shape}")
    return out


_NO_BIAS = {dtype: flat_view(np.zeros(1, dtype)) for dtype in DTYPES}  # (never read: has_bias is False)
_NO_X = {dtype: np.zeros(1, dtype) for dtype in DTYPES}  # (never read: x is read in place)


def packed_linear(x, packed, bias=None, *, out=None, cores: int = 1):
    """``ops.linear`` with a packed weight: ``x @ W.T + b``. x: [..., K]; packed: :func:`pack` of
    weight [O, K]; bias: [O] or None -> [..., O], C-contiguous, in x's dtype (no casting).

    ``out``: a C-contiguous, writeable array of the result's shape and dtype to write into.
    ``cores=2``: from ``SPLIT_FROM`` multiply-adds, the caller and :mod:`.jobs`' helper thread
    share the panels (chunks of them claimed as they come; x packed once for both); on one core, or
    while the helper serves another caller, the caller runs all of it.
    Each element is one fused multiply-add chain in k order, then the bias (module docstring):
    within the K-term dot-product bound of any BLAS's ``x @ W.T + b``, and the same bits whatever
    the rows, the ISA's tile or ``cores``.
    """
    if not isinstance(x, np.ndarray) or x.dtype not in DTYPES:
        raise TypeError("x must be a float32 or float64 NumPy array")
    if not isinstance(packed, Packed):
        raise TypeError(f"packed must be a Packed weight (refimpl.fast.packed.pack), got {type(packed).__name__}")
    if bias is not None and (not isinstance(bias, np.ndarray) or bias.dtype not in DTYPES):
        raise TypeError("bias must be a float32 or float64 NumPy array")
    if cores not in (1, 2):
        raise ValueError(f"cores must be 1 or 2, got {cores!r}")
    dtype = x.dtype
    if packed.dtype != dtype or (bias is not None and bias.dtype != dtype):
        raise TypeError(f"packed weight and bias must have x's dtype {dtype}; cast explicitly (no casting here)")
    n_out, k = packed.n_out, packed.k
    if x.ndim == 0 or x.shape[-1] != k:
        raise ValueError(f"x [..., K] and the packed weight [O, K] do not fit: {x.shape} and {(n_out, k)}")
    if packed.width != _WIDTHS[dtype]:
        raise ValueError(f"the weight was packed in panels of {packed.width}; this CPU's kernel ({ISA}) "
                         f"uses {_WIDTHS[dtype]}: pack it again")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must have shape ({n_out},), got {bias.shape}")
    shape = x.shape[:-1] + (n_out,)
    if out is not None:
        result_array(out, shape, dtype)  # (checked before any work)
    nr = x.size // k if k else 0  # R
    whole = whole_tiles(nr)  # R'
    if whole != nr:
        rows = np.zeros((whole, k), dtype)  # [R', K]: x's rows, then zeros
        rows[:nr] = x.reshape(nr, k)
        y = packed_linear(rows, packed, bias, cores=cores)[:nr].reshape(shape)  # [..., O]
        if out is None:
            return y  # (C-contiguous: the first R rows of [R', O])
        out[...] = y
        return out
    out = result_array(out, shape, dtype)
    if out.size == 0:
        return out
    if k == 0:
        out[...] = 0 if bias is None else bias
        return out
    p, of = packed.width, out.ravel()  # of: [R*O], a view of out
    n_panels = -(-n_out // p)
    has_bias = bias is not None
    b = flat_view(bias) if has_bias else _NO_BIAS[dtype]  # read-only either way: one specialisation
    scratch = np.empty(nr * p, dtype) if n_out % p else of  # [R, P] for a partial last panel (else unused)
    chunk, n_chunks = two_core_chunks(nr, k, n_out, p) if cores == 2 else (0, 0)
    if n_chunks:
        if nr < X_PACK_FROM:  # both threads read x in place
            xr, xp = flat_view(x), _NO_X[dtype]
        else:
            xp = np.empty(nr * k, dtype)  # all of x, packed once for both threads
            _pack_x_whole(flat_view(x), xp, nr, k, KC, MC, _MR)
            xr = flat_view(xp)  # (read-only, as x read in place: one specialisation)
        if on_two_cores(xr, packed.panels, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, KC, MC):
            return out
        _DRIVERS[dtype](xr, packed.panels, b, has_bias, of, scratch, xp, nr, k, n_out, KC, MC, 0, n_panels, True)
        return out
    # x's row block, packed tile by tile (not needed when x is read in place)
    xp = _NO_X[dtype] if nr < X_PACK_FROM else np.empty(min(nr, MC) * min(k, KC), dtype)
    _DRIVERS[dtype](flat_view(x), packed.panels, b, has_bias, of, scratch, xp, nr, k, n_out, KC, MC, 0, n_panels, False)
    return out


def warmup(dtype=np.float32) -> None:
    """Compile (or load from the on-disk cache) the packed GEMM for ``dtype``; idempotent."""
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    packed_linear(np.ones((1, 8), dtype), pack(np.ones((5, 8), dtype)), np.ones(5, dtype))
