"""The fast path: the reference forward with Numba kernels and BLAS scheduling (the ``numba`` backend).

The reference (:mod:`refimpl.tasks` and the math modules under it) is the definition; nothing in it
imports this package. Here the same forward runs faster, held to the reference by tests:

- :mod:`.llvm`: LLVM primitives (fused multiply-add, vectors of lanes for the reductions);
- :mod:`.elementary`: ``exp``, ``erf`` and the exact GELU as vectorisable polynomials;
- :mod:`.reductions`: sums in NumPy's pairwise order;
- :mod:`.kernels`: the kernels, each beside its wrapper;
- :mod:`.packed`: the packed-weight GEMM (weights packed once; one core, or both on panel chunks);
- :mod:`.jobs`: the helper thread and job board through which both cores share a packed GEMM (or
  a decoding step's attention);
- :mod:`.schedule`: GEMM orientation, attention per head, the batch on two threads;
- :mod:`.tasks`: the fast encoder, heads and task functions that :class:`refimpl.Model` calls;
- :mod:`.decoding`: a decoding step's blocks in one compiled call (the same kernels, jobs and
  order as :mod:`.tasks` calling them one by one: the same bits).

=====================================================  ==========================================
Definition (reference)                                 fast path
=====================================================  ==========================================
``ops.gelu(y + b)``                                    :func:`.kernels.bias_gelu` ``(y, b)``
``ops.layer_norm(x, w, b, eps)``                       :func:`.kernels.layer_norm` ``(x, w, b, eps)``
``h = x + (r + rb); ops.layer_norm(h, w, b, eps)``     :func:`.kernels.residual_layer_norm` ``-> (h, ln)``
``ops.softmax(scores * scale + mask)``                 :func:`.kernels.masked_softmax`
``ops.softmax(q @ k^T * scale + mask) @ v``            :func:`.kernels.attention` (per head, packed GEMMs)
the same for one query row (a decoding step)         :func:`.kernels.attention_few` (both cores)
``ops.linear(x, w, b)``                                :func:`.schedule.linear` (packed weights, ``(W x^T)^T`` or ``x W^T``)
``attention.scaled_dot_product_attention`` (context)   :func:`.schedule.attention_context` (no probs kept)
``tasks.<task>``                                       :mod:`.tasks` ``.<task>`` (batch or token parts on 2 threads)
=====================================================  ==========================================

``tests/test_kernels.py`` holds each kernel to its definition (bitwise where the operation order is
the same, else within a stated ulp bound) and ``tests/test_fast.py`` the fast forward to the
reference forward for every task. The rules every kernel keeps:

- **The reference's operation order, in the input's dtype.** float32 in, float32 arithmetic out;
  the same additions, multiplications and divisions as the NumPy expression, in the same order
  (``x * 0.5 * (1 + erf(x / sqrt 2))``; ``(x - mean) / sqrt(var + eps) * w + b``;
  ``exp(v - max) / sum``). Sums use NumPy's own pairwise summation order
  (:func:`.reductions.pairwise_sum`), so LayerNorm is bitwise equal to ``ops.layer_norm``.
- **Two elementary functions are our own**, because libm's ``erf``/``exp`` do not vectorise (a
  libm ``erf`` costs ~22 ns an element here, as slow as the whole NumPy expression). ``erf`` and
  ``exp`` are branch-free polynomial evaluations that LLVM turns into SIMD code:

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
  written as the eight lanes of one LLVM vector (``llvm._Vec``, ``v_add``...): the same IEEE
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
  releases the GIL. Parallelism comes from :func:`.schedule.split_batch` instead: the encoder runs the two
  halves of a batch on two threads, each with single-threaded OpenBLAS, so the GEMMs *and* the
  kernels use both cores and no BLAS worker spins beside a kernel.
- **Compiled when first needed, once per machine.** Every kernel is ``@numba.njit(**JIT)`` (or
  ``**INLINE`` for a helper inlined into its callers) from :mod:`.llvm`, without signatures:
  nothing compiles at import, and a kernel compiles on its first call, for the dtype of that call
  only (a float32 model never compiles the float64 code). ``JIT`` has ``cache=True``: the machine
  code goes to disk and later processes load it (:mod:`refimpl.jitcache` makes sure Numba has a
  writable folder for it, also for a read-only install). A new kernel follows the same pattern:
  declare it with ``**JIT``, pass scalars already in the arrays' dtype and flags as ``bool`` (one
  specialisation per dtype), and copy read-only arrays rather than compiling for them.
  :func:`.kernels.warmup` compiles every kernel for one dtype ahead of time (for an image
  build or a benchmark); nothing calls it at run time.

Layouts: every wrapper accepts any strides and makes C-contiguous copies where needed (parameters
and contiguous activations are used as they are). The feature axis (``H`` or ``S``) is the last.
``out=`` arrays must be C-contiguous, of the result's shape and dtype; they may alias the input
(``bias_gelu(y, b, out=y)``, ``masked_softmax(s, m, c, out=s)``) for in-place updates.

Shape legend: B batch, N heads, T query length, S key length, H hidden (or intermediate) size.
"""

from .. import jitcache

jitcache.ensure()  # before the first cache=True declaration: Numba picks the cache folder there

from . import packed  # noqa: E402,F401 (registers its kernels for the two-core jobs)
from . import kernels  # noqa: E402,F401 (registers attention_few's kernel for the two-core jobs)
