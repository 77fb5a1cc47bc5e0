"""The skinny GEMM (refimpl.fast.gemm) against the exact ``x @ W.T + b``, and its schedule.

Each output element is one dot product in a fixed order, whatever the rows beside it, the column
split or the thread count: those are checked bitwise. Against the exact product (float64 for
float32 inputs, long double for float64) it is held to the classical bound of a K-term dot
product (tolerances.KERNEL_ULPS["dot"]), which any BLAS summation order also satisfies.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refimpl import ops
from refimpl.fast import gemm, schedule
from tolerances import KERNEL_ULPS, REORDERED, assert_close

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def _exact(x, w, b):
    wide = np.float64 if x.dtype == F32 else np.longdouble
    y = x.astype(wide) @ w.astype(wide).T
    return y if b is None else y + b.astype(wide)


def _assert_dot_bound(got, x, w, b):
    k = x.shape[-1]
    size = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T + (0 if b is None else np.abs(b))
    bound = KERNEL_ULPS["dot"][x.dtype.name] * np.finfo(x.dtype).eps * k * size
    err = np.abs(got.astype(np.float64) - _exact(x, w, b).astype(np.float64))
    assert np.all(err <= bound), float(np.max(err / np.maximum(bound, np.finfo(np.float64).tiny)))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("n_out,k", [(1, 1), (3, 7), (4, 8), (7, 13), (40, 24), (96, 256), (130, 777)])
def test_skinny_linear_within_the_dot_product_bound(dtype, rows, n_out, k):
    rng = np.random.default_rng(rows * 1000 + n_out + k)
    x = rng.standard_normal((rows, k)).astype(dtype)
    w = rng.standard_normal((n_out, k)).astype(dtype)
    b = rng.standard_normal(n_out).astype(dtype)
    for bias in (b, None):
        got = gemm.skinny_linear(x, w, bias)
        assert got.shape == (rows, n_out) and got.dtype == dtype and got.flags.c_contiguous
        _assert_dot_bound(got, x, w, bias)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_skinny_linear_each_element_independent_of_rows_split_and_threads(monkeypatch, dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 300)).astype(dtype)
    w = rng.standard_normal((1030, 300)).astype(dtype)
    b = rng.standard_normal(1030).astype(dtype)
    monkeypatch.setattr(gemm, "SPLIT_FROM", 0)  # the two-thread column split
    split = gemm.skinny_linear(x, w, b)
    monkeypatch.setattr(gemm, "SPLIT_FROM", 1 << 62)  # one call, one thread
    whole = gemm.skinny_linear(x, w, b)
    np.testing.assert_array_equal(split, whole)
    for i in range(x.shape[0]):  # a row alone (the 4x1 and 1x1 tiles) gives the same values
        np.testing.assert_array_equal(gemm.skinny_linear(x[i : i + 1], w, b)[0], whole[i])
    part = gemm.skinny_linear(x, w[5:12], b[5:12])  # another column range: the same values
    np.testing.assert_array_equal(part, whole[:, 5:12])


def test_skinny_linear_layouts_out_and_leading_axes():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    want = gemm.skinny_linear(x.reshape(6, 40), w).reshape(2, 3, 24)
    strided = np.zeros((2, 3, 80), np.float32)
    strided[..., ::2] = x
    ro = w.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(gemm.skinny_linear(strided[..., ::2], ro), want)
    np.testing.assert_array_equal(gemm.skinny_linear(x, np.asfortranarray(w)), want)
    out = np.empty((2, 3, 24), np.float32)
    assert gemm.skinny_linear(x, w, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert gemm.skinny_linear(np.ones((0, 40), np.float32), w).shape == (0, 24)
    b = np.arange(3.0)
    np.testing.assert_array_equal(gemm.skinny_linear(np.ones((2, 0)), np.ones((3, 0)), b), [b, b])


def test_skinny_linear_bad_inputs_raise_clear_errors():
    x, w = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        gemm.skinny_linear(x.astype(np.int64), w)
    with pytest.raises(TypeError, match="dtype"):
        gemm.skinny_linear(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="do not fit"):
        gemm.skinny_linear(x, np.ones((3, 5), np.float32))
    with pytest.raises(ValueError, match="bias must have shape"):
        gemm.skinny_linear(x, w, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        gemm.skinny_linear(x, w, out=np.ones((3, 2), np.float32))
    with pytest.raises(TypeError, match="dtype must be"):
        gemm.warmup(np.int32)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("lead", [(1,), (3,), (7,), (2, 4), (2, 5), (16,), (17,), (32,), (33,), (48,), (49,)])
def test_linear_uses_the_skinny_or_packed_gemm_for_few_rows(dtype, lead):
    """Outside a split: the skinny GEMM below TWO_CORE_FROM rows, packed weights on two cores up to
    TWO_CORE_ROWS, BLAS above."""
    from refimpl.fast import packed

    rng = np.random.default_rng(len(lead))
    x = rng.standard_normal(lead + (24,)).astype(dtype)
    w = rng.standard_normal((40, 24)).astype(dtype)
    b = rng.standard_normal(40).astype(dtype)
    got = schedule.linear(x, w, b)
    rows = x.reshape(-1, 24).shape[0]
    assert got.shape == lead + (40,) and got.dtype == dtype
    if rows < schedule.TWO_CORE_FROM:
        np.testing.assert_array_equal(got, gemm.skinny_linear(x, w, b))
    elif rows <= schedule.TWO_CORE_ROWS:
        np.testing.assert_array_equal(got, packed.packed_linear(x, packed.pack(w), b))
    assert_close(got, ops.linear(x, w, b), dtype.name, "linear", REORDERED)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_warmup_compiles_one_specialisation(dtype):
    """After warmup, one-thread calls with any layout of x and read-only weights compile nothing more.
    (The two-core path's kernels compile on first use; which of them a call takes depends on whether
    the helper thread is asleep, so they are not counted here.)"""
    gemm.warmup(dtype)
    kernels = (gemm._run_whole,)  # the caller-thread entry (the kernel inside it takes writeable C arrays only)
    before = [len(k.signatures) for k in kernels]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(dtype)
    w = rng.standard_normal((200, 64)).astype(dtype)  # 3 * 64 * 200 < SPLIT_FROM: the caller's thread alone
    assert x.shape[0] * w.size < gemm.SPLIT_FROM
    w.flags.writeable = False
    gemm.skinny_linear(x[:, ::1], w, w[:, 0].copy())
    gemm.skinny_linear(np.asfortranarray(x), w)
    assert [len(k.signatures) for k in kernels] == before


def test_a_float32_process_compiles_the_kernel_for_float32_only():
    """Compile only what a call needs: float32 work, split over both cores (helper thread
    included), compiles one kernel specialisation, and no float64 one."""
    code = (
        "import time, numpy as np, refimpl.fast.gemm as g\n"
        "g.SPLIT_FROM, g._CPUS = 0, 2\n"
        "x, w = np.ones((3, 64), np.float32), np.ones((64, 64), np.float32)\n"
        "w.flags.writeable = False\n"
        "end = time.time() + 300\n"
        "while not g._serve.signatures and time.time() < end:\n"
        "    assert np.all(g.skinny_linear(x, w) == 64)\n"
        "    time.sleep(0.05)\n"
        "g.skinny_linear(x, w, np.zeros(64, np.float32))\n"
        "g.SPLIT_FROM = 1 << 62\n"
        "g.skinny_linear(x, w, np.zeros(64, np.float32))\n"
        "g.skinny_linear(np.asfortranarray(x), w)\n"
        "entries = (g._run_whole, g._serve, g._post, g._work, g._post_work)\n"
        "sigs = [str(s) for f in entries for s in f.signatures]\n"
        "assert g._serve.signatures and len(g._run_whole.signatures) == 1, sigs\n"
        "assert not any('float64' in s for s in sigs), sigs\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_import_compiles_nothing():
    code = (
        "import refimpl, refimpl.fast.gemm as g\n"
        "assert not (g._run_whole.signatures or g._work.signatures or g._serve.signatures)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_skinny_linear_from_many_threads_at_once(monkeypatch):
    """One caller at a time shares the helper thread; the others run whole: the same values."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(gemm, "SPLIT_FROM", 0)
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((200 + 8 * i, 64)).astype(np.float64) for i in range(6)]
    x = rng.standard_normal((5, 64))
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda w: [gemm.skinny_linear(x, w) for _ in range(30)], ws))
    for w, outs in zip(ws, got):
        monkeypatch.setattr(gemm, "SPLIT_FROM", 1 << 62)
        whole = gemm.skinny_linear(x, w)
        for y in outs:
            np.testing.assert_array_equal(y, whole)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_skinny_linear_in_a_forked_child():
    """The helper thread does not survive a fork: the child starts its own."""
    code = (
        "import os, numpy as np, refimpl.fast.gemm as g\n"
        "g.SPLIT_FROM = 0\n"
        "x, w = np.ones((2, 16)), np.ones((64, 16))\n"
        "g.skinny_linear(x, w)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if np.all(g.skinny_linear(x, w) == 16) else 1)\n"
        "assert os.waitpid(pid, 0)[1] == 0\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)
