"""Scheduling, not math: GEMM orientation, attention per head, and the batch over two threads.

Every function here computes what a reference function defines (named in its docstring) with the
same products and sums; only the order of the work, the BLAS call shapes and the memory reuse
differ. ``tests/test_fast.py`` holds each to its definition.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..blas import openblas_threads
from ..ops import activation
from .kernels import attention, attention_few, attention_few_unchecked, bias_gelu, masked_softmax
from .packed import ISA, pack, packed_linear

THIN_ROWS = 64  # up to this many rows, linear() multiplies as (W x^T)^T
# On one thread (a part of a split), linear() multiplies up to this many rows with packed weights;
# where packed weights win depends on the kernel's ISA (refimpl.fast.packed.ISA), chosen from the
# host CPU. A base-sized forward of one sequence of T tokens on one thread (OpenBLAS on one thread),
# packed / OpenBLAS (A/B in one process, Sapphire Rapids):
#   AVX-512 tiles, OpenBLAS SkylakeX: float32 0.71 at T = 64 and 128, 0.85 at 256, 0.98 at 384, 1.00
#     at 512; float64 0.69 at 64, 0.84 at 128, 0.95 at 192, 0.97 at 256, 1.16 at 384. On two
#     threads an 8x128 forward in pieces of 256 rows took 0.95x the time of halves through
#     OpenBLAS in float32, but 1.09x the time of pieces of 128 rows in float64: hence 256 and 128.
#   AVX2 tiles, OpenBLAS Haswell, Numba for haswell (the AVX2 machine emulated on the same CPU), since
#     the micro-kernel's x addresses no longer form a serial chain (packed.py), two-thread forwards
#     with 256 packed rows / with 96 (one-thread OpenBLAS beyond): float32 0.69-0.90 at 1x256 (token
#     halves), 0.85-0.96 at 4x128, 0.91 at 8x64, 0.92-0.96 at 16x20 and 32x20, 0.99-1.00 at 8x128;
#     float64 1.04-1.12 with 128 or 256 rows at 1x256 to 8x128.
#   generic tiles (Sandy Bridge emulated, OpenBLAS Sandybridge), the single GEMMs: float32 0.33-0.39
#     at 4 rows, 0.56-0.72 at 16, 1.02-1.10 at 64; float64 0.53-0.68 at 32.
#   A split batch of single sequences of 384-512 tokens on two threads (AVX-512, float32), each a
#     piece with packed weights / halves through OpenBLAS (A/B in one process, three runs): 0.93-0.97
#     at 2x512, 0.94-0.98 at 3x384, 0.95-1.04 at 4x512 (where each half's OpenBLAS GEMMs have 1024
#     rows; pieces also let a thread the host holds back do less); with AVX2 tiles 1.03-1.05:
#     hence 512 for AVX-512's float32 only.
_PACKED_ROWS_BY_ISA = {
    "avx512": {np.dtype(np.float32): 512, np.dtype(np.float64): 128},
    "avx2": {np.dtype(np.float32): 256, np.dtype(np.float64): 96},
    "generic": {np.dtype(np.float32): 16, np.dtype(np.float64): 32},
}
PACKED_ROWS = _PACKED_ROWS_BY_ISA[ISA]


# A piece of several sequences in a split batch holds at most this many tokens (and at most
# PACKED_ROWS; a longer single sequence, up to PACKED_ROWS, is a piece of its own): pieces of
# 4 x 128 tokens took 1.03x the time of pieces of 2 x 128 at 8x128 (AVX-512, float32, A/B in one
# process).
PIECE_TOKENS = 256
# Outside a split, linear() multiplies up to TWO_CORE_ROWS rows with packed weights on both cores
# (packed_linear(cores=2)). Measured on a base-sized model (the 72 GEMMs of a forward in a row,
# weights from memory, float32): 0.6x the time of a skinny GEMM that streamed W in its stored order
# (since removed) at 16-32 rows, 0.83x at 8; at 1 row (decoding one sequence) 0.76-0.89x for
# [768|2304|3072|50265, 768] and 1.10x for [768, 3072] (AVX2 tiles 0.75-0.88x, float64 0.87-1.07x),
# a whole decoding step 0.87x at batch 1 and 0.95x at batch 4 (A/B in one process). OpenBLAS on two
# threads is faster from ~64 rows.
TWO_CORE_ROWS = 48
# A single sequence from this many tokens runs as two token halves (run_two); shorter ones run whole,
# their GEMMs on both cores. A/B on a base-sized model, whole / halves: 0.73 at 24 tokens, 0.81 at
# 32, 0.85 at 40, 0.96 at 48, 1.04 at 64 (float32; float64 0.73, 0.86, 0.96 at 24, 40, 48).
TOKEN_SPLIT_FROM = TWO_CORE_ROWS + 1
PER_HEAD_FROM = 128  # query length from which attention_context runs attention() per head
# Query lengths up to which attention_context runs attention_few (a decoding step). A base-sized
# decoding step (16-token prompts, 32 new tokens), against the batched matmuls: batch 8 0.94-0.97x
# the time, batch 1 0.99-1.00x; 256-token prompts: 0.92x and 0.98x. attention_few reads each pair's
# keys once per query row: at T = 2 and more the matmuls are faster (hot, T = 2: 1.1-1.3x; T = 8:
# 1.5-2.7x).
FEW_QUERIES = 1


def linear(x, weight, bias=None):
    """``ops.linear``: ``x @ W.T + b``, x: [..., in], weight: [out, in] -> [..., out].

    In a part of a split (one thread per core), up to ``PACKED_ROWS`` rows multiply with W packed
    once (:func:`packed_weight`, :func:`.packed.packed_linear`: no per-call packing of W as OpenBLAS
    does, a register-blocked micro-kernel); so do they where NumPy's OpenBLAS runs on one thread.
    Otherwise, up to ``TWO_CORE_ROWS`` rows (a short input, a decoding step) multiply with W packed,
    both cores on disjoint panels. Beyond, up to ``THIN_ROWS`` rows the same products and sums are
    scheduled as ``(W x^T)^T``: BLAS then streams W in its stored order, ~1.7x faster than
    ``x W^T`` on OpenBLAS. The bias is added in place to the fresh GEMM output (one [R, out] array
    fewer to allocate and fault in).
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in)  # [R, in]
    same = x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype)
    cores = packed_cores(rows, same)
    if cores:
        return packed_linear(rows, packed_weight(weight), bias, cores=cores).reshape(*lead, weight.shape[0])
    if rows.shape[0] <= THIN_ROWS:
        y = (weight @ rows.T).T  # [out, R] -> [R, out], a transposed view of a fresh array
    else:
        y = rows @ weight.T  # [R, in] @ [in, out] -> [R, out]
    y = y.reshape(*lead, weight.shape[0])  # [R, out] -> [..., out] (a view: R splits into lead)
    if bias is not None:
        if y.flags.writeable and y.dtype == bias.dtype:
            np.add(y, bias, out=y)
        else:
            y = y + bias
    return y


def packed_cores(rows, same: bool) -> int:
    """How :func:`linear` multiplies ``rows`` [R, in] with packed weights: 1 (this core only: this
    thread runs a part of a split, or NumPy's OpenBLAS runs on one thread, 1 <= R <=
    ``PACKED_ROWS``), 2 (both cores: 1 <= R <= ``TWO_CORE_ROWS``), or 0 (not: another schedule;
    also for no rows, or when the dtypes differ, ``same`` False)."""
    r = rows.shape[0]
    if not same or r < 1:
        return 0
    if this_core_only():
        return 1 if r <= PACKED_ROWS.get(rows.dtype, 0) else 0
    return 2 if r <= TWO_CORE_ROWS else 0


def this_core_only() -> bool:
    """Whether this thread's work keeps to its own core: it runs a part of a split, or NumPy's
    OpenBLAS runs on one thread (:func:`_blas_on_one_thread`)."""
    return getattr(_here, "one_thread", False) or _blas_on_one_thread()


def _blas_on_one_thread() -> bool:
    """Whether NumPy's OpenBLAS runs on one thread outside a split: someone chose one thread
    (``OPENBLAS_NUM_THREADS=1``, threadpoolctl, a corpus worker's ``threads=1``, another thread's
    split holding the other core), so refimpl's GEMMs keep to this core too, with packed weights
    where they beat single-threaded OpenBLAS (up to ``PACKED_ROWS`` rows). Unknown (no OpenBLAS
    found): False."""
    blas = openblas_threads()
    return blas is not None and blas[0]() < 2


# ---------------------------------------------------------------------------------------------
# Packed weights: each weight matrix packed once, the first time a GEMM on one thread needs it
# ---------------------------------------------------------------------------------------------

_here = threading.local()  # .one_thread: this thread runs a part of a split (OpenBLAS on one thread)
_packed: dict[int, tuple] = {}  # id(weight) -> (weakref to the weight, its Packed)
_pack_lock = threading.Lock()
PACKED_CACHE_MAX = 4096  # entries; beyond it the cache starts afresh (weights passed as fresh views)


def packed_weight(*weights):
    """``pack(weight)``, made once per weight array and kept while the array lives (a model's
    parameters live as long as the model; the packed copy takes as much memory again). Several
    weights [O_i, K]: their rows stacked [sum O_i, K], packed as one (:func:`linears`)."""
    key = tuple(map(id, weights))
    hit = _packed.get(key)
    if hit is not None and all(r() is w for r, w in zip(hit[0], weights)):
        return hit[1]
    with _pack_lock:  # the two halves of a split ask for the same weights at once
        hit = _packed.get(key)
        if hit is not None and all(r() is w for r, w in zip(hit[0], weights)):
            return hit[1]
        if len(_packed) >= PACKED_CACHE_MAX:
            _packed.clear()
        p = pack(weights[0] if len(weights) == 1 else np.concatenate(weights))

        def forget(ref, key=key):
            if ref in _packed.get(key, ((),))[0]:
                del _packed[key]

        _packed[key] = (tuple(weakref.ref(w, forget) for w in weights), p)
        for w in weights:
            release_mapped_pages(w)
        return p


def linears(x, weights, biases) -> list:
    """``[ops.linear(x, W_i, b_i), ...]``, the projections of one input (an attention's q, k, v).

    Where :func:`linear` would multiply with packed weights, one GEMM with the weights stacked
    ``[sum O_i, K]`` (packed once) and the biases joined; its ``[R, sum O_i]`` output is cut into
    ``[..., O_i]`` views. Each element is the same chain as in its own GEMM: the same bits, one
    job (and one pass of x's packing) instead of several. Otherwise one :func:`linear` each.
    """
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in)  # [R, in]
    same = all(w.dtype == x.dtype for w in weights) and all(b is not None and b.dtype == x.dtype for b in biases)
    cores = packed_cores(rows, same)
    if cores:
        y = packed_linear(rows, packed_weight(*weights), np.concatenate(biases), cores=cores)  # [R, sum O_i]
        outs, o = [], 0
        for w in weights:
            outs.append(y[:, o:o + w.shape[0]].reshape(*lead, w.shape[0]))  # [..., O_i] view
            o += w.shape[0]
        return outs
    return [linear(x, w, b) for w, b in zip(weights, biases)]


def release_mapped_pages(a) -> bool:
    """Let the OS drop the resident pages of ``a`` when it is a view of a read-only file map (a
    checkpoint loaded by refimpl): packed, the weight is read again only by other schedules, which
    fault its pages back in from the page cache. Without this, the packed copy and the mapped
    original are both resident (a base-sized model: ~340 MiB more). Whole pages inside ``a`` only;
    nothing else is touched. -> whether pages were released."""
    base = a
    while isinstance(base, np.ndarray) and not isinstance(base.base, mmap.mmap):
        base = base.base  # the array made on the map itself: np.memmap's own, mode "r"
    if not (isinstance(base, np.memmap) and base.mode == "r" and hasattr(base.base, "madvise")):
        return False
    start = base.ctypes.data - base.offset % mmap.ALLOCATIONGRANULARITY  # the map's first byte
    page = mmap.PAGESIZE
    lo = -(-(a.ctypes.data - start) // page) * page
    hi = (a.ctypes.data - start + a.nbytes) // page * page
    if hi <= lo or not a.flags.c_contiguous:
        return False
    try:
        base.base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # (a shared, read-only file map: no data lost)
    except (OSError, ValueError):
        return False
    return True


def _on_one_thread(fn):
    """``fn`` marked, while it runs, as a part of a split: its GEMMs have this core alone."""

    def run(*args):
        _here.one_thread = True
        try:
            return fn(*args)
        finally:
            _here.one_thread = False

    return run


def linear_act(x, weight, bias, act_name: str):
    """``ops.activation(act)(ops.linear(x, W, b))``: the FFN's first projection and its activation.

    The exact GELU is fused with the bias add and runs in place on the fresh GEMM output (from
    ~32 MB glibc maps every new array afresh, and the page faults would cost more than the GELU);
    other activations use their NumPy definitions.
    """
    if act_name in ("gelu", "gelu_python"):
        y = linear(x, weight)  # [..., I], no bias yet
        if y.flags.c_contiguous and y.flags.writeable:
            return bias_gelu(y, bias, out=y)
        return bias_gelu(y, bias)  # (W x^T)^T for a few rows is a transposed view: a new array
    return activation(act_name)(linear(x, weight, bias))


def attention_context(q, k, v, bias, scale: float):
    """``softmax(q k^T * scale + bias) v`` without keeping the probabilities (``attention``'s
    ``scaled_dot_product_attention`` when nobody asks for them).

    q: [B, N, T, D]; k, v: [B, N, S, D] -> [B, N, T, D], a view of a C-contiguous [B, T, N, D]
    buffer, so that the heads merge without a copy. The softmax runs in place on the fresh score
    GEMM output. From ``PER_HEAD_FROM`` query positions up, :func:`~refimpl.fast.kernels.attention`
    (one kernel over the (batch, head) pairs: a hot [T, S] block between two packed GEMMs; with
    OpenBLAS's GEMMs in its place this schedule was already 1-2% faster than the batched matmuls at
    T = 128 inside a split batch, ~13% from T = 256; from 16 query rows instead of 128, forwards
    at 8x64 and 16x16 took 1.05x and 1.02x the time); up to ``FEW_QUERIES`` (a decoding step),
    :func:`~refimpl.fast.kernels.attention_few` (each pair's cached keys and values read once, in
    place; the pairs on both cores unless this thread keeps to its own); between, batched matmuls.
    """
    nb, nh, nt, nd = q.shape
    buf = np.empty((nb, nt, nh, nd), q.dtype)
    ctx = buf.transpose(0, 2, 1, 3)  # [B, N, T, D] view
    if nt <= FEW_QUERIES:
        cores = 1 if this_core_only() else 2
        if k.shape[2] and (bias is None or (bias.ndim == 4 and bias.flags.c_contiguous and bias.dtype == q.dtype)):
            attention_few_unchecked(q, k, v, bias, scale, ctx, cores)  # (the model's own arrays)
        else:
            attention_few(q, k, v, bias, scale, out=ctx, cores=cores)
    elif nt >= PER_HEAD_FROM:
        attention(q, k, v, bias, scale, out=ctx)
    else:
        scores = np.empty((nb, nh, nt, k.shape[2]), q.dtype)  # (matmul may pick another layout)
        np.matmul(q, np.swapaxes(k, -1, -2), out=scores)  # [B, N, T, S], fresh: softmax in place
        masked_softmax(scores, bias, scale, out=scores)
        np.matmul(scores, v, out=ctx)
    return ctx


# ---------------------------------------------------------------------------------------------
# The batch over two threads
# ---------------------------------------------------------------------------------------------

_pool = None
_split_lock = threading.Lock()


@contextlib.contextmanager
def _two_threads():
    """The helper thread (a one-worker pool) with OpenBLAS on one thread for the block, or None
    (nothing to do) where a split cannot run: one core, no control over OpenBLAS's threads, BLAS
    single-threaded by choice (someone chose that: keep one stream), or another split already
    running (one at a time: OpenBLAS's thread count is process-wide). The count is restored after."""
    global _pool
    blas = openblas_threads()
    if (os.cpu_count() or 1) < 2 or blas is None or not _split_lock.acquire(blocking=False):
        yield None
        return
    try:
        get, set_ = blas
        before = get()
        if before < 2:
            yield None
            return
        if _pool is None:
            _pool = ThreadPoolExecutor(1, thread_name_prefix="refimpl-batch")
        set_(1)
        try:
            yield _pool
        finally:
            set_(before)
    finally:
        _split_lock.release()


def split_batch(fn, n: int, piece: int | None = None) -> list:
    """``[fn(rows), ...]`` over consecutive slices of ``range(n)``, in order: on 2+ cores, on two
    threads, each with single-threaded OpenBLAS (the kernels release the GIL, and so does NumPy's
    matmul); else ``[fn(slice(0, n))]``. The slices: the two halves of the batch, or, with
    ``piece`` (items) under half the batch, pieces of ``piece`` items that the two threads take in
    turn as each finishes one (a thread the OS holds back does less of the batch). When a piece
    raises, the other thread takes no more, and the exception is raised here once it has stopped.

    Measured on 2 cores: 8x128 ~12% and 4x512 ~13% faster than one stream with 2-thread BLAS,
    because the softmax/GELU/LayerNorm kernels then run on both cores too, and no BLAS worker
    spins beside them. One split runs at a time (a second caller just runs whole; see
    :func:`_two_threads`).
    """
    if n < 2:
        return [fn(slice(0, n))]
    with _two_threads() as pool:
        if pool is None:
            return [fn(slice(0, n))]
        half = (n + 1) // 2
        step = half if piece is None or piece >= half else max(1, piece)
        slices = [slice(a, min(a + step, n)) for a in range(0, n, step)]
        results = [None] * len(slices)
        turn = itertools.count()  # (next() on it is atomic under the GIL)
        failed = threading.Event()  # a piece raised: the other thread takes no more

        def take_turns():
            for i in iter(turn.__next__, None):
                if i >= len(slices) or failed.is_set():
                    return
                try:
                    results[i] = fn(slices[i])
                except BaseException:
                    failed.set()
                    raise

        part = _on_one_thread(take_turns)
        first = pool.submit(part)
        try:
            part()
        finally:
            first.result()  # (waits; re-raises the helper's exception, if any)
        return results


def run_two(fn) -> list | None:
    """``[fn(0), fn(1)]`` on two threads at once, each with single-threaded OpenBLAS, or None
    (nothing run) where :func:`split_batch` would not split: one core, no control over OpenBLAS's
    threads, BLAS single-threaded by choice, or another split already running.

    For work that must meet halfway (a single sequence split over its tokens, which meet at the
    attention): ``fn`` gets its part's index and synchronises with the other part itself. If one
    part raises, the exception is re-raised here after both have ended.
    """
    with _two_threads() as pool:
        if pool is None:
            return None
        part = _on_one_thread(fn)
        first = pool.submit(part, 0)
        try:
            second, error = part(1), None
        except BaseException as e:  # noqa: BLE001 (re-raised below, after part 0 has ended)
            second, error = None, e
        errors = [e for e in (first.exception(), error) if e is not None]  # waits for part 0
        if errors:  # the part that failed first, not the other one's broken barrier
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return [first.result(), second]
