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

import atexit
import hashlib
import math
import os
import threading
import time

import numba
import numpy as np

from numba import types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from .llvm import DTYPES, INLINE, JIT, prefetch, v8_lanes, v8_load, v8_splat, v_fma

SPLIT_FROM = 1 << 18  # multiply-adds (R * K * O) from which the two cores share a GEMM
_TILE = 4  # weight rows per tile: the column split falls on multiples of it
# Tiles of 4 weight rows x 2 input rows (8 accumulators). 4 x 4 tiles (16 accumulators) were 15-35%
# faster single-threaded at 8-16 rows, but LLVM took ~20x longer to compile the kernel (4 s -> 86 s
# on the development VM): a user's first call on a base-sized model paid over a minute.


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


@numba.njit(**INLINE)
def _prefetch_next(wf, p0, p1, p2, p3, m, i, last):
    """Ask for the lines at ``i`` of the first ``m`` of the next tile's rows (starting at p0..p3)."""
    if m > 0:
        prefetch(wf, min(p0 + i, last))
    if m > 1:
        prefetch(wf, min(p1 + i, last))
    if m > 2:
        prefetch(wf, min(p2 + i, last))
    if m > 3:
        prefetch(wf, min(p3 + i, last))


@numba.njit(**JIT)
def _skinny_kernel(xf, wf, b, has_bias, out, nr, k, n_out, o0, o1):  # noqa: C901 (one tiled loop nest)
    """``out[r, o] = x[r] . W[o] (+ b[o])`` for r < nr, o0 <= o < o1; flat C arrays:
    xf [R*K], wf [O*K], out [R*O]."""
    k8 = k - k % 8
    z = v8_splat(xf.dtype.type(0.0))
    last, pairs = n_out * k - 1, nr // 2
    o = o0
    while o + _TILE <= o1:  # tiles of 4 weight rows
        w0, w1, w2, w3 = o * k, (o + 1) * k, (o + 2) * k, (o + 3) * k
        r = 0
        while r + 2 <= nr:  # 4 weight rows x 2 input rows: 8 accumulators
            xa, xb = r * k, (r + 1) * k
            # Meanwhile, the next tile's rows come in: pass p asks for rows p, p + pairs, ... (the
            # hardware prefetcher alone leaves the first pass over a tile waiting on memory).
            p = r // 2
            m = 0 if p >= 4 else (4 - p + pairs - 1) // pairs
            n0 = w3 + k + p * k
            n1, n2, n3 = n0 + pairs * k, n0 + 2 * pairs * k, n0 + 3 * pairs * k
            a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = z
            for i in range(0, k8, 8):
                _prefetch_next(wf, n0, n1, n2, n3, m, i, last)
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
            m = 4 if pairs == 0 else 0  # a single row: this pass asks for the next tile
            a0 = a1 = a2 = a3 = z
            for i in range(0, k8, 8):
                _prefetch_next(wf, w3 + k, w3 + 2 * k, w3 + 3 * k, w3 + 4 * k, m, i, last)
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
# The output columns over two threads: a helper thread that claims chunks as it comes
#
# A decoding step makes ~75 GEMMs of 0.1-1 ms each. A Python thread pool takes 0.1-0.3 ms to wake
# a thread on a VM, and any fork-join (OpenMP's prange included) makes the caller wait for a thread
# the OS may not have scheduled: on a loaded 2-core machine that costs a time slice per GEMM, far
# more than the GEMM. Here the caller never waits for a helper that has not started: the columns
# are cut into chunks that the caller and one helper thread claim from an atomic counter, and the
# caller waits only for chunks the helper has claimed (and is computing). The helper polls for
# work for ~a millisecond after each job (so it is awake through a forward's GEMMs), then sleeps
# on an Event. Every chunk is computed by the same kernel whoever claims it: the values do not
# depend on the split.
# ---------------------------------------------------------------------------------------------


@intrinsic
def _atomic(typingctx, a, i, op, v):
    """``a[i]``'s old value after ``op`` (0: load, 1: store v, 2: add v), sequentially consistent;
    a: a C-contiguous int64 array."""
    if not (isinstance(a, types.Array) and a.dtype == types.int64 and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        arr, idx, opv, val = args
        ptr = builder.gep(context.make_array(signature.args[0])(context, builder, arr).data, [idx])
        kind = signature.args[2].literal_value
        if kind == 0:
            return builder.load_atomic(ptr, "seq_cst", 8)
        if kind == 1:
            old = builder.load_atomic(ptr, "seq_cst", 8)
            builder.store_atomic(val, ptr, "seq_cst", 8)
            return old
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    if not isinstance(op, types.IntegerLiteral):
        return None
    return types.int64(a, i, op, types.int64), codegen


@intrinsic
def _cas(typingctx, a, i, expected, new):
    """Compare-and-swap ``a[i]``: the value found (== ``expected`` when the swap happened)."""
    if not (isinstance(a, types.Array) and a.dtype == types.int64 and a.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        arr, idx, exp, val = args
        ptr = builder.gep(context.make_array(signature.args[0])(context, builder, arr).data, [idx])
        pair = builder.cmpxchg(ptr, exp, val, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return types.int64(a, i, types.int64, types.int64), codegen


@intrinsic
def _pointer_like(typingctx, address, like):
    """The address (a 64-bit integer) as a pointer to ``like``'s element type."""
    if not (address in (types.int64, types.uint64) and isinstance(like, types.Array)):
        return None
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


@intrinsic
def read_only(typingctx, a):
    """``a`` typed as a read-only array (the same data): the arrays a job hands a kernel have the
    types the caller's own call gives it, so both compile to one specialisation."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        # (a borrowed reference: incref it, as the caller's scope will release the result too)
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return a.copy(readonly=True)(a), codegen


# The job board: one int64 array, its fields at these indices.
_SEQ, _NEXT, _DONE, _SLEEPING, _EXIT = 0, 1, 2, 3, 4  # job number; next chunk (seq << 32 | index)
_KIND, _DTYPE = 5, 6  # what the job runs (SKINNY or PACKED) and its itemsize
_X, _W, _B, _OUT, _SCRATCH, _HAS_BIAS, _NR, _K, _NOUT, _CHUNK, _NCHUNKS, _KC, _MC = range(7, 20)  # the job
_LOW = (1 << 32) - 1
SKINNY, PACKED = 0, 1  # job kinds: column chunks of _skinny_kernel; panel chunks of packed.py's driver


@numba.njit(**INLINE)
def _arrays(px, pw, pb, pout, like, nr, k, n_out):
    """The flat arrays at these addresses, as writeable C arrays of ``like``'s dtype: every caller
    hands the kernel the same array types, so it compiles once per dtype (not once per read-only
    or writeable combination of its inputs). The kernel only reads x, W and b."""
    return (numba.carray(_pointer_like(px, like), nr * k), numba.carray(_pointer_like(pw, like), n_out * k),
            numba.carray(_pointer_like(pb, like), n_out), numba.carray(_pointer_like(pout, like), nr * n_out))


@numba.njit(**INLINE)
def _skinny_chunk(xf, wf, b, has_bias, out, nr, k, n_out, chunk, idx):
    o0 = idx * chunk
    _skinny_kernel(xf, wf, b, has_bias, out, nr, k, n_out, o0, min(n_out, o0 + chunk))


_PACKED_DRIVERS: dict = {}  # dtype -> (the driver, its panel width P): packed.py's, registered on its import


def register_packed_drivers(drivers: dict) -> None:
    """Give PACKED jobs their kernels (:mod:`.packed` calls this on import, and ``refimpl.fast``
    imports it with the package: every process that runs a job has them before its first compile)."""
    _PACKED_DRIVERS.update(drivers)


def _packed_chunk(board, like, idx):
    """Chunk ``idx`` of a PACKED job on the board: panels idx*chunk .. (idx+1)*chunk through
    :mod:`.packed`'s driver for ``like``'s dtype (an overload: each dtype compiles its own driver
    only, and only when a two-core job first runs)."""
    raise NotImplementedError  # (Numba-only: see the overload below)


@overload(_packed_chunk, jit_options=INLINE)
def _packed_chunk_impl(board, like, idx):
    drive, p = _PACKED_DRIVERS[as_dtype(like.dtype)]  # (a KeyError here: refimpl.fast.packed not imported)

    def impl(board, like, idx):
        nr, k, n_out, chunk = board[_NR], board[_K], board[_NOUT], board[_CHUNK]
        n_panels = (n_out + p - 1) // p
        xp = numba.carray(_pointer_like(board[_X], like), nr * k)  # x packed whole (_pack_x_whole), or x
        pf = numba.carray(_pointer_like(board[_W], like), n_panels * k * p)
        has_bias = board[_HAS_BIAS] != 0
        b = numba.carray(_pointer_like(board[_B], like), n_out if has_bias else 1)
        out = numba.carray(_pointer_like(board[_OUT], like), nr * n_out)
        scratch = numba.carray(_pointer_like(board[_SCRATCH], like), nr * p if n_out % p else nr * n_out)
        drive(read_only(xp), read_only(pf), read_only(b), has_bias, out, scratch, xp, nr, k, n_out, board[_KC],
              board[_MC], idx * chunk, idx * chunk + chunk, idx >= 0)  # prepacked: True, typed as
        # a bool (a literal True would compile the driver once more), as in packed_linear's own call

    return impl


@numba.njit(**JIT)
def _run_whole(xf, wf, b, has_bias, out, nr, k, n_out):
    """The whole skinny GEMM on the caller's thread (below the split threshold, or while another
    caller holds the helper)."""
    x, w, bb, o = _arrays(xf.ctypes.data, wf.ctypes.data, b.ctypes.data, out.ctypes.data, out, nr, k, n_out)
    _skinny_chunk(x, w, bb, has_bias, o, nr, k, n_out, n_out, nr - nr)  # chunk 0 of one (not a literal 0:
    # a literal would compile the kernel once more, for a constant first column)


@numba.njit(**JIT)
def _may_sleep(board, seen):
    """Announce sleep; False (and no sleep) if a job arrived meanwhile."""
    _atomic(board, _SLEEPING, 1, 1)
    if _atomic(board, _SEQ, 0, 0) != seen:
        _atomic(board, _SLEEPING, 1, 0)
        return False
    return True


@numba.njit(**JIT)
def _post(board, kind, xf, wf, b, has_bias, out, scratch, nr, k, n_out, chunk, n_chunks, kc, mc):
    """Publish a job (its fields, then the chunk counter, then the job number)."""
    seq = board[_SEQ] + 1
    board[_X], board[_W], board[_B], board[_OUT] = xf.ctypes.data, wf.ctypes.data, b.ctypes.data, out.ctypes.data
    board[_SCRATCH], board[_HAS_BIAS], board[_NR], board[_K], board[_NOUT] = scratch.ctypes.data, has_bias, nr, k, n_out
    board[_CHUNK], board[_NCHUNKS], board[_KC], board[_MC] = chunk, n_chunks, kc, mc
    _atomic(board, _KIND, 1, kind)
    _atomic(board, _DTYPE, 1, xf.itemsize)
    _atomic(board, _DONE, 1, 0)
    _atomic(board, _NEXT, 1, seq << 32)
    _atomic(board, _SEQ, 1, seq)


def _packed_fingerprint() -> int:
    """A hash of packed.py and llvm.py (this folder) and of ``REFIMPL_PACKED_ISA``: what the packed
    driver compiled into the job functions depends on."""
    h = hashlib.sha256(os.environ.get("REFIMPL_PACKED_ISA", "").encode())
    for name in ("packed.py", "llvm.py"):
        try:
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(name.encode())
    return int.from_bytes(h.digest()[:7], "little")


def _job_functions(fingerprint: int):
    """The job functions that run PACKED chunks, and so compile packed.py's driver into themselves:
    ``_run_chunk`` and every function that calls it. Numba keys a cached function on its own file,
    bytecode and closure cells, not on the functions it compiles in; each of these holds
    ``fingerprint`` (:func:`_packed_fingerprint`) as a closure cell, so that a cached copy made with
    another packed.py, llvm.py or forced ISA is never loaded (its x layout would not match the
    caller's). They reach each other as module globals: a closure cell holding a dispatcher would
    keep them out of the cache altogether."""

    @numba.njit(**JIT)
    def run_chunk(board, like, idx):
        """Chunk ``idx`` of the job on the board, whichever thread claimed it. (Not inlined: the
        helper's and the caller's loops call one compiled copy of both kinds' kernels.)"""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        if board[_KIND] == SKINNY:
            nr, k, n_out = board[_NR], board[_K], board[_NOUT]
            xf, wf, b, out = _arrays(board[_X], board[_W], board[_B], board[_OUT], like, nr, k, n_out)
            _skinny_chunk(xf, wf, b, board[_HAS_BIAS] != 0, out, nr, k, n_out, board[_CHUNK], idx)
        else:
            _packed_chunk(board, like, idx)

    @numba.njit(**JIT)
    def help_with(board, seq, like):
        """The helper's share of job ``seq``: claim chunks by compare-and-swap until none is left.

        The claim checks the job number, so a helper that arrives late (the job finished, another
        posted) claims nothing; while it holds a claimed chunk the caller waits, so the job's arrays
        stay alive and its fields unchanged.
        """
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        c = _atomic(board, _NEXT, 0, 0)
        if c >> 32 != seq:
            return
        n = board[_NCHUNKS]
        while c >> 32 == seq and (c & _LOW) < n:
            found = _cas(board, _NEXT, c, c + 1)
            if found == c:
                _run_chunk(board, like, c & _LOW)
                _atomic(board, _DONE, 2, 1)
                c += 1
            else:
                c = found

    @numba.njit(**JIT)
    def serve(board, seen, polls, like):
        """The helper's loop for jobs of ``like``'s dtype: take part in every new job; return the last
        job number seen once ``polls`` polls found nothing new, or at once when asked to exit or when
        a job of the other dtype arrives (left unseen: the caller serves it with that dtype's loop).
        One loop per dtype, so that a process compiles the kernels only for the dtypes it uses."""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        idle = 0
        while idle < polls:
            if _atomic(board, _EXIT, 0, 0) != 0:
                return seen
            seq = _atomic(board, _SEQ, 0, 0)
            if seq != seen:
                if _atomic(board, _DTYPE, 0, 0) != like.itemsize:
                    return seen
                seen = seq
                idle = 0
                _help_with(board, seq, like)
            else:
                idle += 1
        return seen

    @numba.njit(**JIT)
    def work(board, like):
        """The caller's share of the posted job, then the wait for the helper's claimed chunks."""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        base, n_chunks = board[_SEQ] << 32, board[_NCHUNKS]
        while True:
            idx = _atomic(board, _NEXT, 2, 1) - base
            if idx >= n_chunks:
                break
            _run_chunk(board, like, idx)
            _atomic(board, _DONE, 2, 1)
        while _atomic(board, _DONE, 0, 0) < n_chunks:
            pass

    @numba.njit(**JIT)
    def post_work(board, kind, xf, wf, b, has_bias, out, scratch, nr, k, n_out, chunk, n_chunks, kc, mc):
        """``_post`` and ``_work`` in one call (the helper is awake)."""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        _post(board, kind, xf, wf, b, has_bias, out, scratch, nr, k, n_out, chunk, n_chunks, kc, mc)
        _work(board, out)

    return run_chunk, help_with, serve, work, post_work


_run_chunk, _help_with, _serve, _work, _post_work = _job_functions(_packed_fingerprint())


class _Helper:
    """The helper thread and its job board (one per process: re-created after a fork)."""

    POLL_S = 0.0005  # how long the helper polls after its last job before it sleeps

    def __init__(self, dtype=np.float32):
        self.dtype = np.dtype(dtype)  # the dtype of the first job: its loop compiles first
        self.pid = os.getpid()
        self.board = np.zeros(24, np.int64)
        self.wake = threading.Event()
        self.lock = threading.Lock()  # one split at a time; a second caller runs whole
        self.thread = threading.Thread(target=self._loop, name="refimpl-gemm", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def stop(self):
        """Let the helper end (at exit); later jobs run on the caller's thread alone."""
        self.board[_EXIT] = 1
        self.wake.set()

    def _loop(self):
        board, seen = self.board, 0
        likes = {a.itemsize: a for a in (np.zeros(1, np.float32), np.zeros(1, np.float64))}
        like = likes[self.dtype.itemsize]
        _serve(board, seen, 1, like)  # compile or load it first
        t0 = time.perf_counter()
        _serve(board, seen, 1 << 16, like)  # calibrate: polls a second
        polls = max(1 << 12, int(self.POLL_S * (1 << 16) / max(time.perf_counter() - t0, 1e-6)))
        while not board[_EXIT]:
            seen = _serve(board, seen, polls, like)
            if board[_SEQ] != seen and not board[_EXIT]:  # a job of the other dtype: its loop
                like = likes.get(int(board[_DTYPE]), like)
                continue
            if _may_sleep(board, seen):
                self.wake.wait()
                self.wake.clear()
                board[_SLEEPING] = 0

    def run(self, kind, xf, wf, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, kc=0, mc=0):
        args = (self.board, kind, xf, wf, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, kc, mc)
        if self.board[_SLEEPING]:  # (if it falls asleep just after this, it misses one job: no harm)
            _post(*args)
            self.wake.set()
            _work(self.board, of)
        else:
            _post_work(*args)


_CPUS = os.cpu_count() or 1
_helper = None
_helper_lock = threading.Lock()


def _the_helper(dtype):
    global _helper
    if _helper is None or _helper.pid != os.getpid():
        with _helper_lock:
            if _helper is None or _helper.pid != os.getpid():
                _helper = _Helper(dtype)
    return _helper


def on_two_cores(kind, xf, wf, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, kc=0, mc=0) -> bool:
    """Run a job of ``kind`` (SKINNY: output columns ``chunk`` at a time; PACKED: ``chunk`` panels
    at a time, x packed whole in ``xf`` in k-blocks of ``kc`` and row blocks of ``mc``, or x itself
    below ``packed.X_PACK_FROM`` rows) with the helper thread: both claim chunks until none is
    left. -> False, nothing run, where it cannot: one core, or the helper busy with another
    caller's job (the caller then runs the whole GEMM itself). Flat C arrays of one dtype."""
    if _CPUS < 2 or n_chunks < 2:
        return False
    helper = _the_helper(of.dtype)
    if not helper.lock.acquire(blocking=False):
        return False
    try:
        helper.run(kind, xf, wf, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, kc, mc)
    finally:
        helper.lock.release()
    return True


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
    out = result_array(out, x.shape[:-1] + (n_out,), dtype)
    nr = math.prod(x.shape[:-1])
    if out.size == 0:
        return out
    if k == 0:
        out[...] = 0 if bias is None else bias
        return out
    xf, wf, of = flat_view(x), flat_view(weight), out.reshape(-1)
    has_bias = bias is not None
    b = flat_view(bias if has_bias else np.zeros(1, dtype))  # read-only either way: one specialisation

    if nr * k * n_out >= SPLIT_FROM and n_out >= 2 * _TILE:
        chunk = max(_TILE, -(-n_out // (_TILE * 24)) * _TILE)  # ~24 chunks, whole tiles
        if on_two_cores(SKINNY, xf, wf, b, has_bias, of, of, nr, k, n_out, chunk, -(-n_out // chunk)):
            return out
    _run_whole(xf, wf, b, has_bias, of, nr, k, n_out)
    return out


def warmup(dtype=np.float32) -> None:
    """Compile (or load from the on-disk cache) the skinny GEMM for ``dtype``; idempotent."""
    dtype = np.dtype(dtype)
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    skinny_linear(np.ones((1, 8), dtype), np.ones((5, 8), dtype), np.ones(5, dtype))
