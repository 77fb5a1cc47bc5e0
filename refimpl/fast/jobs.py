"""Two-core jobs: a helper thread that shares a GEMM's weight panels (or attention's heads) with the caller.

A short input or a decoding step makes ~50 GEMMs of 0.1-1 ms each, bound by reading the weights.
:func:`.packed.packed_linear` (``cores=2``) cuts the packed weight's panels into a few chunks, and
the caller and one helper thread claim them from an atomic counter on a job board (an int64 array),
each running :mod:`.packed`'s driver on its chunks, so that each streams about half the weights.
Every chunk is computed by the same kernel whoever claims it: the values do not depend on the split.
A decoding step's attention is the other kind of job (:func:`attention_on_two_cores`): chunks of
(batch, head) pairs through :func:`.kernels.attention_few_kernel`, each pair's cached keys and
values read from memory by whichever core claims it. Compiled code can post both kinds itself on
a board it holds (:func:`held_board`, :func:`gemm_job`, :func:`attention_job`: a decoding step's
blocks in one call, :mod:`.decoding`).

Also here, used by :mod:`.packed`'s driver too: :func:`read_only` (an array retyped read-only inside
Numba code).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import threading
import time

import numba
import numpy as np

from numba import types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from .llvm import DTYPES, INLINE, JIT, LINKED, pointer_like

# ---------------------------------------------------------------------------------------------
# The panels over two threads: a helper thread that claims chunks as it comes
#
# A decoding step makes ~50 GEMMs of 0.1-1 ms each. A Python thread pool takes 0.1-0.3 ms to wake
# a thread on a VM, and any fork-join (OpenMP's prange included) makes the caller wait for a thread
# the OS may not have scheduled: on a loaded 2-core machine that costs a time slice per GEMM, far
# more than the GEMM. Here the caller never waits for a helper that has not started: the panels
# are cut into chunks that the caller and one helper thread claim from an atomic counter, and the
# caller waits only for chunks the helper has claimed (and is computing). The helper polls for
# work for ~0.5 ms after each job (so it is awake through a forward's GEMMs), then sleeps
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
_DTYPE = 5  # the job's itemsize (4: float32, 8: float64)
_X, _W, _B, _OUT, _SCRATCH, _HAS_BIAS, _NR, _K, _NOUT, _CHUNK, _NCHUNKS, _KC, _MC = range(6, 19)  # a GEMM
# 0: a packed GEMM (the fields above), 1: attention_few (these, with _CHUNK and _NCHUNKS). A job's
# ``like`` (an array of its dtype) is 1-D for a GEMM, 2-D for attention: the job functions compile
# for one kind at a time (:func:`_job_chunk`), so a process that never decodes never compiles the
# attention kernel into them, nor one that only decodes with the NumPy backend the GEMM driver.
_KIND = 19
_ALAY, _ALAYN, _AHAS_MASK, _APAIRS = range(20, 24)  # its layout vector (address, length), ...
_BOARD = 24  # fields
_LOW = (1 << 32) - 1

_PACKED_DRIVERS: dict = {}  # dtype -> (the driver, its panel width P): packed.py's, registered on its import


_ATTENTION_KERNEL: list = []  # kernels.py's attention_few_kernel, registered on its import


def register_attention_kernel(kernel) -> None:
    """Give the attention jobs their kernel (:mod:`.kernels` calls this on import)."""
    _ATTENTION_KERNEL[:] = [kernel]


def register_packed_drivers(drivers: dict) -> None:
    """Give the jobs their kernels (:mod:`.packed` calls this on import, and ``refimpl.fast``
    imports it with the package: every process that runs a job has them before its first compile)."""
    _PACKED_DRIVERS.update(drivers)


def _attention_chunk(board, like, idx):
    """Chunk ``idx`` of the attention job on the board: (batch, head) pairs idx*chunk ..
    (idx+1)*chunk through :func:`.kernels.attention_few_kernel`."""
    raise NotImplementedError  # (Numba-only: see the overload below)


@overload(_attention_chunk, jit_options=LINKED)
def _attention_chunk_impl(board, like, idx):
    attention_few_kernel = _ATTENTION_KERNEL[0]  # (an IndexError here: refimpl.fast.kernels not imported)

    def impl(board, like, idx):
        lay = numba.carray(pointer_like(board[_ALAY], board), board[_ALAYN])
        p0 = idx * board[_CHUNK]
        attention_few_kernel(lay, board[_AHAS_MASK] != 0, like, p0, min(p0 + board[_CHUNK], board[_APAIRS]))

    return impl


def _job_chunk(board, like, idx):
    """Chunk ``idx`` of the job on the board, by ``like``'s kind (see ``_KIND``)."""
    raise NotImplementedError  # (Numba-only: see the overload below)


@overload(_job_chunk, jit_options=LINKED)
def _job_chunk_impl(board, like, idx):
    if like.ndim == 1:
        return lambda board, like, idx: _packed_chunk(board, like, idx)
    return lambda board, like, idx: _attention_chunk(board, like, idx)


def _packed_chunk(board, like, idx):
    """Chunk ``idx`` of the job on the board: panels idx*chunk .. (idx+1)*chunk through
    :mod:`.packed`'s driver for ``like``'s dtype (an overload: each dtype compiles its own driver
    only, and only when a two-core job first runs)."""
    raise NotImplementedError  # (Numba-only: see the overload below)


@overload(_packed_chunk, jit_options=LINKED)
def _packed_chunk_impl(board, like, idx):
    drive, p = _PACKED_DRIVERS[as_dtype(like.dtype)]  # (a KeyError here: refimpl.fast.packed not imported)

    def impl(board, like, idx):
        nr, k, n_out, chunk = board[_NR], board[_K], board[_NOUT], board[_CHUNK]
        n_panels = (n_out + p - 1) // p
        xp = numba.carray(pointer_like(board[_X], like), nr * k)  # x packed whole (_pack_x_whole), or x
        pf = numba.carray(pointer_like(board[_W], like), n_panels * k * p)
        has_bias = board[_HAS_BIAS] != 0
        b = numba.carray(pointer_like(board[_B], like), n_out if has_bias else 1)
        out = numba.carray(pointer_like(board[_OUT], like), nr * n_out)
        scratch = numba.carray(pointer_like(board[_SCRATCH], like), nr * p if n_out % p else nr * n_out)
        drive(read_only(xp), read_only(pf), read_only(b), has_bias, out, scratch, xp, nr, k, n_out, board[_KC],
              board[_MC], idx * chunk, idx * chunk + chunk, idx >= 0)  # prepacked: True, typed as
        # a bool (a literal True would compile the driver once more), as in packed_linear's own call

    return impl


@numba.njit(**JIT)
def _may_sleep(board, seen):
    """Announce sleep; False (and no sleep) if a job arrived meanwhile."""
    _atomic(board, _SLEEPING, 1, 1)
    if _atomic(board, _SEQ, 0, 0) != seen:
        _atomic(board, _SLEEPING, 1, 0)
        return False
    return True


@numba.njit(**JIT)
def _post(board, xf, wf, b, has_bias, out, scratch, nr, k, n_out, chunk, n_chunks, kc, mc):
    """Publish a job (its fields, then the chunk counter, then the job number)."""
    seq = board[_SEQ] + 1
    board[_X], board[_W], board[_B], board[_OUT] = xf.ctypes.data, wf.ctypes.data, b.ctypes.data, out.ctypes.data
    board[_SCRATCH], board[_HAS_BIAS], board[_NR], board[_K], board[_NOUT] = scratch.ctypes.data, has_bias, nr, k, n_out
    board[_CHUNK], board[_NCHUNKS], board[_KC], board[_MC] = chunk, n_chunks, kc, mc
    board[_KIND] = 0
    _publish(board, seq, xf.itemsize)


@numba.njit(**INLINE)
def _publish(board, seq, itemsize):
    """The job's dtype, then the chunk counter, then the job number (the helper reads them in reverse)."""
    _atomic(board, _DTYPE, 1, itemsize)
    _atomic(board, _DONE, 1, 0)
    _atomic(board, _NEXT, 1, seq << 32)
    _atomic(board, _SEQ, 1, seq)


@numba.njit(**JIT)
def _post_attention(board, lay, has_mask, like, chunk, n_chunks, n_pairs):
    """Publish an attention_few job (:func:`.kernels.attention_few_kernel`'s arguments)."""
    seq = board[_SEQ] + 1
    board[_ALAY], board[_ALAYN], board[_AHAS_MASK], board[_APAIRS] = lay.ctypes.data, lay.size, has_mask, n_pairs
    board[_CHUNK], board[_NCHUNKS], board[_KIND] = chunk, n_chunks, 1
    _publish(board, seq, like.itemsize)


def code_fingerprint(*more: str) -> int:
    """A hash of packed.py, llvm.py, kernels.py, elementary.py and reductions.py (this folder), of
    the files named in ``more``, and of ``REFIMPL_PACKED_ISA``: what the code compiled into the job
    functions (or another function that calls them) depends on. Each file is read once a process
    (three modules ask at import)."""
    h = hashlib.sha256(os.environ.get("REFIMPL_PACKED_ISA", "").encode())
    for name in ("packed.py", "llvm.py", "kernels.py", "elementary.py", "reductions.py") + more:
        h.update(_source(name))
    return int.from_bytes(h.digest()[:7], "little")


@functools.lru_cache(maxsize=None)
def _source(name: str) -> bytes:
    """The bytes of this folder's file ``name`` (its name where it cannot be read)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            return f.read()
    except OSError:
        return name.encode()


def _job_functions(fingerprint: int):
    """The job functions, which compile packed.py's driver into themselves: ``_run_chunk`` and every
    function that calls it. Numba keys a cached function on its own file, bytecode and closure
    cells, not on the functions it compiles in; each of these holds
    ``fingerprint`` (:func:`code_fingerprint`) as a closure cell, so that a cached copy made with
    another packed.py, llvm.py or forced ISA is never loaded (its x layout would not match the
    caller's). They reach each other as module globals: a closure cell holding a dispatcher would
    keep them out of the cache altogether."""

    @numba.njit(**JIT)
    def run_chunk(board, like, idx):
        """Chunk ``idx`` of the job on the board, whichever thread claimed it. (Not inlined: the
        helper's and the caller's loops call one compiled copy of the driver.)"""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        _job_chunk(board, like, idx)

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
        """The helper's loop for jobs of ``like``'s dtype and kind: take part in every new job; return
        the last job number seen once ``polls`` polls found nothing new, or at once when asked to
        exit or when a job of another dtype or kind arrives (left unseen: the caller serves it with
        that loop). One loop per dtype and kind, so that a process compiles only what it uses."""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        idle = 0
        while idle < polls:
            if _atomic(board, _EXIT, 0, 0) != 0:
                return seen
            seq = _atomic(board, _SEQ, 0, 0)
            if seq != seen:
                if _atomic(board, _DTYPE, 0, 0) != like.itemsize or board[_KIND] != like.ndim - 1:
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
    def post_work(board, xf, wf, b, has_bias, out, scratch, nr, k, n_out, chunk, n_chunks, kc, mc):
        """A packed GEMM as a job: ``_post`` and ``_work`` in one call (the board held by the caller,
        :func:`held_board`; the helper awake or not). Flat C arrays as ``on_two_cores`` takes them."""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        _post(board, xf, wf, b, has_bias, out, scratch, nr, k, n_out, chunk, n_chunks, kc, mc)
        _work(board, out)

    @numba.njit(**JIT)
    def post_attention_work(board, lay, has_mask, like, chunk, n_chunks, n_pairs):
        """attention_few's pairs as a job: ``_post_attention`` and ``_work`` in one call (the board
        held by the caller; the helper awake or not)."""
        fingerprint  # noqa: B018 (in the cache key: see _job_functions)
        _post_attention(board, lay, has_mask, like, chunk, n_chunks, n_pairs)
        _work(board, like)

    return run_chunk, help_with, serve, work, post_work, post_attention_work


_run_chunk, _help_with, _serve, _work, gemm_job, attention_job = _job_functions(code_fingerprint())


class _Helper:
    """The helper thread and its job board (one per process: re-created after a fork)."""

    POLL_S = 0.0005  # how long the helper polls after its last job before it sleeps

    def __init__(self, like):
        self.first = (like.itemsize, like.ndim - 1)  # the dtype and kind of the first job: its loop compiles first
        self.pid = os.getpid()
        self.board = np.zeros(_BOARD, np.int64)
        self.wake = threading.Event()
        self.lock = threading.Lock()  # one split at a time; a second caller runs whole
        self.thread = threading.Thread(target=self._loop, name="refimpl-jobs", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def stop(self):
        """Let the helper end (at exit); later jobs run on the caller's thread alone."""
        self.board[_EXIT] = 1
        self.wake.set()

    def _loop(self):
        board, seen = self.board, 0
        likes = {(a.itemsize, a.ndim - 1): a for a in (np.zeros(1, np.float32), np.zeros(1, np.float64),
                                                       ATTENTION_LIKE[DTYPES[0]], ATTENTION_LIKE[DTYPES[1]])}
        like = likes[self.first]
        _serve(board, seen, 1, like)  # compile or load it first
        # Calibrate: how many polls take POLL_S, on a board of its own. (Calibrated on the shared
        # board, the count also took in the jobs that arrived meanwhile, which the helper serves,
        # and the caller's traffic on the board's cache line: 3 of 4 fresh helpers measured during
        # a decoding run then slept after a few microseconds of polling, and half of a step's
        # GEMMs found the helper asleep and waited for it to wake; 1-3% do now. The wall time
        # still includes any wait for the GIL, so the fastest of three is kept.)
        own, t = np.zeros_like(board), []
        for _ in range(3):
            t0 = time.perf_counter()
            _serve(own, 0, 1 << 16, like)  # (nothing arrives: exactly 65536 polls)
            t.append(time.perf_counter() - t0)
        polls = max(1 << 12, int(self.POLL_S * (1 << 16) / max(min(t), 1e-6)))
        while not board[_EXIT]:
            seen = _serve(board, seen, polls, like)
            if board[_SEQ] != seen and not board[_EXIT]:  # a job of another dtype or kind: its loop
                like = likes.get((int(board[_DTYPE]), int(board[_KIND])), like)
                continue
            if _may_sleep(board, seen):
                self.wake.wait()
                self.wake.clear()
                board[_SLEEPING] = 0


_CPUS = os.cpu_count() or 1
_helper = None
_helper_lock = threading.Lock()


def _the_helper(like):
    global _helper
    if _helper is None or _helper.pid != os.getpid():
        with _helper_lock:
            if _helper is None or _helper.pid != os.getpid():
                _helper = _Helper(like)
    return _helper


def _taken(like):
    """The helper, its board now held by this caller and the helper woken if it sleeps (if it falls
    asleep just after, it misses a job: no harm), or None: one core, or the helper serving another
    caller (one at a time). The caller releases ``helper.lock``."""
    if _CPUS < 2:
        return None
    helper = _the_helper(like)
    if not helper.lock.acquire(blocking=False):
        return None
    if helper.board[_SLEEPING]:
        helper.wake.set()
    return helper


@contextlib.contextmanager
def held_board(like):
    """The job board, held by this caller for the block, its helper thread woken if it sleeps: jobs
    posted on it from compiled code (:func:`gemm_job`, :func:`attention_job`) are shared with the
    helper. None where they cannot be: one core, or the helper serving another caller (one at a
    time). ``like``: an array of the jobs' dtype (the helper's first loop compiles for it)."""
    helper = _taken(like)
    try:
        yield None if helper is None else helper.board
    finally:
        if helper is not None:
            helper.lock.release()


def chunks_of(n: int, most: int) -> tuple[int, int]:
    """``n`` items (panels, pairs) cut into at most ``most`` chunks of nearly equal size -> (items a
    chunk, chunks)."""
    chunk = -(-n // min(n, most))
    return chunk, -(-n // chunk)


def on_two_cores(xf, wf, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, kc, mc) -> bool:
    """Run a packed GEMM as a job with the helper thread (``chunk`` panels at a time; x packed whole
    in ``xf`` in k-blocks of ``kc`` and row blocks of ``mc``, or x itself below ``packed.X_PACK_FROM``
    rows): both claim chunks until none is left. -> False, nothing run, where it cannot: one core,
    or the helper busy with another caller's job (the caller then runs the whole GEMM itself).
    Flat C arrays of one dtype."""
    helper = _taken(of) if n_chunks >= 2 else None
    if helper is None:
        return False
    try:  # (not held_board: a generator's context costs ~1.4 us, ~50 times a forward)
        gemm_job(helper.board, xf, wf, b, has_bias, of, scratch, nr, k, n_out, chunk, n_chunks, kc, mc)
    finally:
        helper.lock.release()
    return True


ATTENTION_LIKE = {dtype: np.zeros((1, 1), dtype) for dtype in DTYPES}  # an attention job's ``like``
ATTENTION_CHUNKS = 8  # chunks of (batch, head) pairs an attention_few job is cut into (at most)
ATTENTION_SPLIT_FROM = 1 << 15  # key elements (B * N * S * D) from which attention_few takes both cores


def attention_on_two_cores(lay, has_mask, like, n_pairs: int, work: int) -> bool:
    """Run :func:`.kernels.attention_few_kernel` over ``n_pairs`` (batch, head) pairs as a job with the
    helper thread, both claiming chunks of pairs (``like``: an array of the dtype; ``work``: the key
    elements, B * N * S * D). -> False, nothing run, where it cannot or need not: one core, too
    little work (below ``ATTENTION_SPLIT_FROM``), or the helper busy with another caller's job."""
    helper = _taken(like) if n_pairs >= 2 and work >= ATTENTION_SPLIT_FROM else None
    if helper is None:
        return False
    try:
        chunk, n_chunks = chunks_of(n_pairs, ATTENTION_CHUNKS)
        attention_job(helper.board, lay, has_mask, like, chunk, n_chunks, n_pairs)
    finally:
        helper.lock.release()
    return True
