"""The packed-weight GEMM (refimpl.fast.packed) against a scalar chain of fused multiply-adds.

Every output element of ``packed_linear`` is one chain ``acc = fma(x[r, k], W[o, k], acc)`` for
k = 0, 1, ..., K-1 from 0, then ``acc + b[o]``: so it is checked BITWISE against that chain
written as a scalar Numba loop of ``llvm.fma`` (Python 3.11 has no ``math.fma``, and float32
``float64(a) * b + c`` rounded to float32 is not always the correctly rounded fma), and bitwise
independent of the rows beside it, of the k-blocks, of the tile shape (AVX-512, AVX2, generic)
and of threads. Against the exact ``x @ W.T + b`` it is held to the K-term dot-product bound
(tolerances.KERNEL_ULPS["dot"]), which any BLAS summation order also satisfies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest

from refimpl.fast import packed
from refimpl.fast.llvm import JIT, fma
from tolerances import KERNEL_ULPS

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (1, 2, 4, 5, 7, 8, 9, 12, 13, 16, 17, 29, 33, 35, 47, 100)  # (5-7, 13, 29: padded to full tiles;
# from 33, x is copied tile by tile: tails of 4, 2 and 1 rows)
OUTS = (1, 3, 31, 32, 33, 100, 130, 600)  # 600: several groups of panels, tails in each
INS = (1, 7, 16, 767, 768, 769, 1600)


@numba.njit(**JIT)
def _fma_chains(x, w, out):
    """out[r, o] = the chain acc = fma(x[r, k], w[o, k], acc), k = 0 .. K-1, from acc = 0."""
    for r in range(x.shape[0]):
        for o in range(w.shape[0]):
            acc = x.dtype.type(0.0)
            for k in range(x.shape[1]):
                acc = fma(x[r, k], w[o, k], acc)
            out[r, o] = acc


def _reference_packed(x, w, b):
    """What packed_linear computes, one scalar fma at a time: x [R, K], w [O, K], b [O] or None."""
    out = np.empty((x.shape[0], w.shape[0]), x.dtype)
    _fma_chains(np.ascontiguousarray(x), np.ascontiguousarray(w), out)
    return out if b is None else out + b  # the bias after the chain: one rounding


def _exact(x, w, b):
    wide = np.float64 if x.dtype == F32 else np.longdouble
    y = x.astype(wide) @ w.astype(wide).T
    return y if b is None else y + b.astype(wide)


def _assert_dot_bound(got, x, w, b):
    """Per element, the classical bound of a K-term dot product (Higham's gamma_K, with the bias)
    against the exact x @ W.T + b: |got - exact| <= ulps * eps * K * (|x| @ |W|.T + |b|)."""
    k = x.shape[-1]
    size = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T + (0 if b is None else np.abs(b))
    bound = KERNEL_ULPS["dot"][x.dtype.name] * np.finfo(x.dtype).eps * k * size
    err = np.abs(got.astype(np.float64) - _exact(x, w, b).astype(np.float64))
    assert np.all(err <= bound), float(np.max(err / np.maximum(bound, np.finfo(np.float64).tiny)))


def _data(dtype, rows, n_out, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = rng.standard_normal((n_out, k)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("k", INS)
def test_packed_linear_is_the_scalar_fma_chain(dtype, k):
    """Every R in ROWS (row tails of each tile size) x every O in OUTS (partial last panels), with
    and without bias, bitwise. The chains of a row and column do not depend on the others, so the
    reference of the largest shape holds every smaller one as a corner. The rows straddle
    X_PACK_FROM: x read in place and x copied tile by tile give the same bits."""
    assert min(ROWS) < packed.X_PACK_FROM <= max(ROWS)
    x, w, b = _data(dtype, max(ROWS), max(OUTS), k, seed=k)
    want = _reference_packed(x, w, None)  # [100, 600]
    for n_out in OUTS:
        pw = packed.pack(w[:n_out])
        for rows in ROWS:
            got = packed.packed_linear(x[:rows], pw)
            assert got.shape == (rows, n_out) and got.dtype == dtype and got.flags.c_contiguous
            np.testing.assert_array_equal(got, want[:rows, :n_out])
            got = packed.packed_linear(x[:rows], pw, b[:n_out])
            np.testing.assert_array_equal(got, want[:rows, :n_out] + b[:n_out])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("rows,n_out,k", [(1, 1, 1), (5, 31, 7), (17, 33, 769), (9, 100, 1600)])
def test_packed_linear_within_the_dot_product_bound(dtype, rows, n_out, k):
    x, w, b = _data(dtype, rows, n_out, k, seed=rows + n_out + k)
    for bias in (b, None):
        got = packed.packed_linear(x, packed.pack(w), bias)
        np.testing.assert_array_equal(got, _reference_packed(x, w, bias))
        _assert_dot_bound(got, x, w, bias)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_each_element_independent_of_rows_blocks_and_threads(monkeypatch, dtype):
    x, w, b = _data(dtype, 37, 70, 1600, seed=1)
    pw = packed.pack(w)
    whole = packed.packed_linear(x, pw, b)
    for a, z in ((0, 1), (3, 11), (5, 37), (8, 16), (36, 37), (1, 30)):  # full tiles become tails
        np.testing.assert_array_equal(packed.packed_linear(x[a:z], pw, b), whole[a:z])
    monkeypatch.setattr(packed, "KC", 5)  # many k-blocks: the chain resumes from out each time
    monkeypatch.setattr(packed, "MC", 5)  # row blocks of 5 rows: tails in every block
    np.testing.assert_array_equal(packed.packed_linear(x, pw, b), whole)
    monkeypatch.undo()
    results = [None] * 4

    def work(i):
        results[i] = packed.packed_linear(x[i:], pw, b)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, y in enumerate(results):
        np.testing.assert_array_equal(y, whole[i:])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_two_cores_give_the_same_bits(monkeypatch, dtype):
    """cores=2: the caller and jobs.py's helper thread claim chunks of panels (x packed once for
    both, or read in place below X_PACK_FROM rows): bitwise the one-thread result, for full and
    partial last panels, tails of every tile size, several k-blocks and row blocks, one panel per
    chunk or many; also when the helper is busy with another caller's job (the caller runs it all)
    and on one core."""
    from refimpl.fast import jobs

    monkeypatch.setattr(packed, "SPLIT_FROM", 0)  # two cores whatever the size
    x, w, b = _data(dtype, 37, 300, 1600, seed=5)
    for rows in (1, 3, 7, 8, 12, 13, 37):  # (7, 13: padded to full tiles with 8-row tiles; 12: a 4-row tail)
        for n_out in (2 * packed.panel_width(dtype), 100, 300):  # 2 panels; partial last panels
            pw = packed.pack(w[:n_out])
            for bias in (b[:n_out], None):
                one = packed.packed_linear(x[:rows], pw, bias)
                np.testing.assert_array_equal(packed.packed_linear(x[:rows], pw, bias, cores=2), one)
    pw = packed.pack(w)
    one = packed.packed_linear(x, pw, b)
    few = packed.packed_linear(x[:13], pw, b)  # (x read in place: below X_PACK_FROM)
    for chunks in (1, 2, 3, 1000):  # one chunk (no helper), chunks of uneven size, a panel each
        monkeypatch.setattr(packed, "TWO_CORE_CHUNKS", chunks)
        np.testing.assert_array_equal(packed.packed_linear(x, pw, b, cores=2), one)
    monkeypatch.setattr(packed, "KC", 5)  # k-blocks and row blocks inside each chunk
    monkeypatch.setattr(packed, "MC", 16)
    np.testing.assert_array_equal(packed.packed_linear(x, pw, b, cores=2), one)
    for cores in (1, 2):  # x read in place, k-block by k-block
        np.testing.assert_array_equal(packed.packed_linear(x[:13], pw, b, cores=cores), few)
    monkeypatch.undo()
    monkeypatch.setattr(packed, "SPLIT_FROM", 0)
    helper = jobs._the_helper(np.zeros(1, dtype))
    with helper.lock:  # another caller holds the helper: this one runs the job alone
        np.testing.assert_array_equal(packed.packed_linear(x, pw, b, cores=2), one)
    monkeypatch.setattr(jobs, "_CPUS", 1)
    np.testing.assert_array_equal(packed.packed_linear(x, pw, b, cores=2), one)
    with pytest.raises(ValueError, match="cores must be 1 or 2"):
        packed.packed_linear(x, pw, b, cores=3)


def test_two_core_jobs_from_many_threads_at_once(monkeypatch):
    """Jobs of float32 and float64, x read in place and packed, posted from four threads at once: one
    caller at a time has the helper, the others run whole; every result is the one-thread result."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(packed, "SPLIT_FROM", 0)
    cases = []
    for i, dtype in enumerate((F32, F64, F32, F64)):
        x, w, b = _data(dtype, 1 + 13 * i, 100 + 40 * i, 64, seed=10 + i)  # 1, 14, 27, 40 rows
        pw = packed.pack(w)
        cases.append((x, b, pw, packed.packed_linear(x, pw, b)))

    def run(case):
        x, b, pw, want = case
        for _ in range(50):
            np.testing.assert_array_equal(packed.packed_linear(x, pw, b, cores=2), want)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, cases))


def test_bias_is_added_after_the_chain():
    x, w, b = _data(F32, 9, 40, 100, seed=2)
    pw = packed.pack(w)
    np.testing.assert_array_equal(packed.packed_linear(x, pw, b), packed.packed_linear(x, pw) + b)


def test_pack_layout():
    w = np.arange(33 * 5, dtype=np.float64).reshape(33, 5) + 1  # [O, K]: no zeros
    pw = packed.pack(w)
    p = packed.panel_width(F64)
    assert (pw.n_out, pw.k, pw.width, pw.dtype) == (33, 5, p, F64)
    n_panels = -(-33 // p)
    assert pw.panels.shape == (n_panels * p * 5,) and pw.panels.flags.c_contiguous
    assert not pw.panels.flags.writeable
    o, k = np.meshgrid(np.arange(33), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(pw.panels[((o // p) * 5 + k) * p + o % p], w)
    assert np.count_nonzero(pw.panels) == w.size  # the padding rows are zeros
    np.testing.assert_array_equal(packed.pack(np.asfortranarray(w)).panels, pw.panels)


@numba.njit
def _pack_into(src, so, o_stride, i_stride, n_out, k, p):
    dst = np.zeros(-(-n_out // p) * k * p, src.dtype)
    packed.pack_into(src, so, o_stride, i_stride, n_out, k, dst, p)
    return dst


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("n_out,k", [(1, 1), (8, 8), (13, 21), (40, 64), (77, 9)])
def test_pack_into_is_packs_layout(dtype, n_out, k):
    """packed.pack_into (compiled code: attention packs its keys and values with it) writes pack()'s
    panels, from W's rows (8 x 8 blocks transposed, and the rest) or from its columns."""
    p = packed.panel_width(dtype)
    w = np.random.default_rng(n_out * k).standard_normal((n_out, k)).astype(dtype)
    want = packed.pack(w).panels
    flat = np.zeros(1 + n_out * (k + 5), dtype)  # W's rows k + 5 apart, from offset 1
    flat[1:].reshape(n_out, k + 5)[:, :k] = w
    np.testing.assert_array_equal(_pack_into(flat, 1, k + 5, 1, n_out, k, p), want)
    cols = np.zeros((k, n_out + 3), dtype)  # W^T's rows: W by columns, n_out + 3 apart
    cols[:, :n_out] = w.T
    np.testing.assert_array_equal(_pack_into(cols.reshape(-1), 0, 1, n_out + 3, n_out, k, p), want)


def test_layouts_out_leading_axes_and_read_only_inputs(tmp_path):
    x, w, b = _data(F32, 6, 24, 40, seed=3)
    pw = packed.pack(w)
    want = packed.packed_linear(x, pw, b)
    lead = packed.packed_linear(x.reshape(2, 3, 40), pw, b)
    assert lead.shape == (2, 3, 24)
    np.testing.assert_array_equal(lead.reshape(6, 24), want)
    strided = np.zeros((6, 80), np.float32)
    strided[:, ::2] = x
    np.testing.assert_array_equal(packed.packed_linear(strided[:, ::2], pw, b), want)
    np.testing.assert_array_equal(packed.packed_linear(np.asfortranarray(x), pw, b), want)
    ro = x.copy()
    ro.flags.writeable = False
    rb = b.copy()
    rb.flags.writeable = False
    np.testing.assert_array_equal(packed.packed_linear(ro, pw, rb), want)
    path = tmp_path / "w.bin"
    w.tofile(path)
    mm = np.memmap(path, np.float32, mode="r", shape=w.shape)  # a read-only memory map, as loading makes
    np.testing.assert_array_equal(packed.packed_linear(x, packed.pack(mm), b), want)
    out = np.empty((2, 3, 24), np.float32)
    assert packed.packed_linear(x.reshape(2, 3, 40), pw, b, out=out) is out
    np.testing.assert_array_equal(out.reshape(6, 24), want)
    out = np.empty((7, 24), np.float32)  # (7 rows: a full tile and a zero row with 8-row tiles)
    assert packed.packed_linear(np.vstack([x, x[:1]]), pw, b, out=out) is out
    np.testing.assert_array_equal(out, np.vstack([want, want[:1]]))


def test_empty_sizes():
    w = np.ones((3, 4), np.float32)
    assert packed.packed_linear(np.ones((0, 4), np.float32), packed.pack(w)).shape == (0, 3)
    assert packed.packed_linear(np.ones((2, 4), np.float32), packed.pack(w[:0])).shape == (2, 0)
    b = np.arange(3.0)
    empty_k = packed.pack(np.ones((3, 0)))
    np.testing.assert_array_equal(packed.packed_linear(np.ones((2, 0)), empty_k, b), [b, b])
    np.testing.assert_array_equal(packed.packed_linear(np.ones((2, 0)), empty_k), np.zeros((2, 3)))


def test_bad_inputs_raise_clear_errors(monkeypatch):
    x, w = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
    pw = packed.pack(w)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        packed.packed_linear(x.astype(np.int64), pw)
    with pytest.raises(TypeError, match="packed must be a Packed"):
        packed.packed_linear(x, w)
    with pytest.raises(TypeError, match="x's dtype"):
        packed.packed_linear(x.astype(np.float64), pw)
    with pytest.raises(TypeError, match="x's dtype"):
        packed.packed_linear(x, pw, np.ones(3))
    with pytest.raises(TypeError, match="bias must be a float32 or float64"):
        packed.packed_linear(x, pw, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="do not fit"):
        packed.packed_linear(np.ones((2, 5), np.float32), pw)
    with pytest.raises(ValueError, match="do not fit"):
        packed.packed_linear(np.ones((), np.float32), pw)
    with pytest.raises(ValueError, match="bias must have shape"):
        packed.packed_linear(x, pw, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        packed.packed_linear(x, pw, out=np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        packed.packed_linear(x, pw, out=np.ones((3, 2), np.float32).T)
    other = packed.Packed(np.zeros(2 * 4), 1, 4, 2)  # another ISA's width
    with pytest.raises(ValueError, match="pack it again"):
        packed.packed_linear(x.astype(np.float64), other)
    with pytest.raises(ValueError, match="C-contiguous 1-D array of"):
        packed.Packed(np.zeros(7), 1, 4, 2)
    with pytest.raises(TypeError, match="weight must be a float32 or float64"):
        packed.pack(w.astype(np.float16))
    with pytest.raises(ValueError, match=r"weight must be \[O, K\]"):
        packed.pack(np.ones(4, np.float32))
    with pytest.raises(TypeError, match="dtype must be"):
        packed.warmup(np.int32)
    monkeypatch.setenv("REFIMPL_PACKED_ISA", "sse9")
    with pytest.raises(ValueError, match="REFIMPL_PACKED_ISA must be one of"):
        packed._host_isa()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_warmup_compiles_one_specialisation(dtype):
    """After warmup, any layout or writeability of x, bias or none, compiles nothing more."""
    packed.warmup(dtype)
    kernel = packed._DRIVERS[np.dtype(dtype)]  # (the x packing inside it compiles with it)
    before = len(kernel.signatures)
    x, w, b = _data(dtype, 3, 40, 64)
    pw = packed.pack(w)
    x.flags.writeable = False
    packed.packed_linear(x, pw, b)
    packed.packed_linear(np.asfortranarray(x), pw)
    packed.packed_linear(x.copy(), pw, out=np.empty((3, 40), dtype))
    assert len(kernel.signatures) == before == 1


_ISA_SCRIPT = r"""
import sys, numpy as np
from refimpl.fast import packed
assert packed.ISA == sys.argv[1], packed.ISA
assert packed._DRIVERS[np.dtype(np.float32)].signatures == [], "import compiled something"
packed.SPLIT_FROM = 0  # cores=2 below: the helper compiled for this ISA, not loaded for another
outs = []
for dtype in (np.float32, np.float64):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((47, 1603)).astype(dtype)  # 23 rows read in place, 47 copied tile by tile
    w = rng.standard_normal((70, 1603)).astype(dtype)
    b = rng.standard_normal(70).astype(dtype)
    pw = packed.pack(w)
    outs.append(packed.packed_linear(x, pw, b))
    assert np.array_equal(packed.packed_linear(x, pw, b, cores=2), outs[-1])
    assert np.array_equal(packed.packed_linear(x[:23], pw, b), outs[-1][:23])
np.savez(sys.argv[2], f32=outs[0], f64=outs[1])
"""


def test_the_helper_is_cached_per_packed_driver(monkeypatch):
    """jobs.py's job functions compile packed.py's driver into themselves; Numba's cache keys them on
    jobs.py alone, so each holds a fingerprint of packed.py, llvm.py and the forced ISA as a
    closure cell (part of the cache key): a helper cached with another driver is never loaded."""
    from refimpl.fast import jobs

    fingerprint = jobs.code_fingerprint()
    for fn in (jobs._run_chunk, jobs._help_with, jobs._serve, jobs._work, jobs.gemm_job, jobs.attention_job):
        cells = [c.cell_contents for c in fn.py_func.__closure__ or ()]
        assert cells == [fingerprint], fn.py_func.__name__  # (a plain int: the cache still works)
        assert fn._cache is not None and type(fn._cache).__name__ == "FunctionCache"
    other = "generic" if os.environ.get("REFIMPL_PACKED_ISA") == "avx2" else "avx2"  # (whatever this run forces)
    monkeypatch.setenv("REFIMPL_PACKED_ISA", other)
    assert jobs.code_fingerprint() != fingerprint


@pytest.mark.slow  # two cold compiles in a fresh process (a few seconds), then cached
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_every_tile_shape_gives_the_same_bits(tmp_path, isa):
    """The AVX2 (6 x 16 / 6 x 8) and generic (4 x 8) tiles, forced by REFIMPL_PACKED_ISA on any
    x86-64 machine, give this machine's bits (each element is the same chain)."""
    path = tmp_path / "out.npz"
    env = dict(os.environ, REFIMPL_PACKED_ISA=isa)
    subprocess.run([sys.executable, "-c", _ISA_SCRIPT, isa, str(path)], check=True, cwd=ROOT, env=env)
    got = np.load(path)
    for name, dtype in (("f32", np.float32), ("f64", np.float64)):
        rng = np.random.default_rng(5)
        x = rng.standard_normal((47, 1603)).astype(dtype)
        w = rng.standard_normal((70, 1603)).astype(dtype)
        b = rng.standard_normal(70).astype(dtype)
        np.testing.assert_array_equal(got[name], packed.packed_linear(x, packed.pack(w), b))
        np.testing.assert_array_equal(got[name], _reference_packed(x, w, b))


_LINKED_SCRIPT = r"""
import numba, numpy as np
from refimpl.fast import kernels, packed
packed.SPLIT_FROM = 0
rng = np.random.default_rng(0)
x, w = rng.standard_normal((40, 64)).astype(np.float32), rng.standard_normal((96, 64)).astype(np.float32)
y = packed.packed_linear(x, packed.pack(w), cores=2)  # a two-core GEMM job
q, k = rng.standard_normal((2, 4, 1, 64)).astype(np.float32), rng.standard_normal((2, 4, 128, 64)).astype(np.float32)
kernels.attention_few(q, k, k, cores=2)  # a two-core attention job

@numba.njit
def on_this_core(xf, pf, of, scratch, xp):  # the driver from compiled code
    packed.drive(xf, pf, pf, False, of, scratch, xp, 40, 64, 96, packed.KC, packed.MC, 0, 3, False)

out = np.empty(40 * 96, np.float32)
on_this_core(packed.flat_view(x), packed.pack(w).panels, out, out, np.empty(40 * 64, np.float32))
assert np.array_equal(out.reshape(40, 96), y)
"""


def test_overloads_that_pick_the_driver_are_never_cached(tmp_path):
    """Numba keys a cached function on its own bytecode and closure cells. The overload
    implementations that link in the driver of the ISA in use, or a registered kernel, are therefore
    never cached (llvm.LINKED): a cached copy kept the driver of whichever ISA compiled it first, and
    a later process with another ``REFIMPL_PACKED_ISA`` ran it over its own panels, writing past its
    buffers (found as a heap corruption). Their callers are cached, keyed by jobs.code_fingerprint."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", _LINKED_SCRIPT], check=True, cwd=ROOT, env=env)
    names = [p.name for p in tmp_path.rglob("*.nbi")]
    assert any("run_chunk" in n for n in names), names  # (the callers: cached)
    assert not [n for n in names if "_chunk_impl" in n or "_drive_impl" in n], names


def test_a_float32_process_compiles_the_float32_kernel_only():
    code = (
        "import numpy as np\n"
        "from refimpl.fast import packed as p\n"
        "f32, f64 = np.dtype(np.float32), np.dtype(np.float64)\n"
        "assert not (p._DRIVERS[f32].signatures or p._DRIVERS[f64].signatures), 'import compiled'\n"
        "x, w = np.ones((13, 64), np.float32), np.ones((70, 64), np.float32)\n"
        "w.flags.writeable = False\n"
        "pw = p.pack(w)\n"
        "assert np.all(p.packed_linear(x, pw) == 64)\n"
        "assert np.all(p.packed_linear(np.asfortranarray(x), pw, np.ones(70, np.float32)) == 65)\n"
        "assert len(p._DRIVERS[f32].signatures) == 1 and not p._DRIVERS[f64].signatures\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
