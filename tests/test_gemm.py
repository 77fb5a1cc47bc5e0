"""The two-core jobs (refimpl.fast.jobs) and ``schedule.linear``'s schedule for few rows.

A packed GEMM on both cores is a job on jobs.py's board that the caller and a helper thread share
(its values: tests/test_packed.py, bitwise the one-thread result). Here: which GEMM ``linear``
picks for few rows, and the helper's life: compiled only for the dtype a process uses, nothing
compiled at import, and a fresh helper in a forked child.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from refimpl import ops
from refimpl.fast import packed, schedule
from tolerances import REORDERED, assert_close

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("lead", [(0,), (1,), (3,), (7,), (2, 4), (2, 5), (16,), (17,), (32,), (33,), (48,), (49,)])
def test_linear_uses_the_packed_gemm_for_few_rows(dtype, lead):
    """Outside a split: packed weights on two cores from 1 up to TWO_CORE_ROWS rows (a decoding
    step of one sequence included), BLAS above."""
    rng = np.random.default_rng(len(lead) + lead[0])
    x = rng.standard_normal(lead + (24,)).astype(dtype)
    w = rng.standard_normal((40, 24)).astype(dtype)
    b = rng.standard_normal(40).astype(dtype)
    got = schedule.linear(x, w, b)
    rows = x.reshape(-1, 24).shape[0]
    assert got.shape == lead + (40,) and got.dtype == dtype
    if 1 <= rows <= schedule.TWO_CORE_ROWS:
        np.testing.assert_array_equal(got, packed.packed_linear(x, packed.pack(w), b))
    assert_close(got, ops.linear(x, w, b), dtype.name, "linear", REORDERED)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_linear_keeps_to_one_core_where_blas_runs_on_one_thread(monkeypatch, dtype):
    """OpenBLAS on one thread (threadpoolctl, OPENBLAS_NUM_THREADS=1, a corpus worker): linear()
    multiplies 1 to PACKED_ROWS rows with packed weights on this core alone (no helper thread), BLAS
    beyond; bitwise the packed GEMM's result."""
    from refimpl.blas import blas_threads, openblas_threads

    if openblas_threads() is None:
        pytest.skip("no OpenBLAS thread control here")
    calls = []
    real = schedule.packed_linear
    monkeypatch.setattr(schedule, "packed_linear",
                        lambda x, p, b=None, cores=1: calls.append((x.shape[0], cores)) or real(x, p, b, cores=cores))
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((40, 24)).astype(dtype), rng.standard_normal(40).astype(dtype)
    most = schedule.PACKED_ROWS[dtype]
    with blas_threads(1):
        for r in (1, 48, 49, most, most + 1):
            x = rng.standard_normal((r, 24)).astype(dtype)
            got = schedule.linear(x, w, b)
            if r <= most:
                assert calls[-1] == (r, 1)
                np.testing.assert_array_equal(got, real(x, packed.pack(w), b))
            else:
                assert calls[-1][0] != r
            assert_close(got, ops.linear(x, w, b), dtype.name, "linear", REORDERED)


def test_a_float32_process_compiles_the_jobs_for_float32_only():
    """Compile only what a call needs: float32 GEMMs split over both cores (the helper thread
    included) compile the job functions and the driver for float32, and no float64 code."""
    code = (
        "import time, numpy as np, refimpl.fast.jobs as g, refimpl.fast.packed as p\n"
        "p.SPLIT_FROM, g._CPUS = 0, 2\n"
        "x, w = np.ones((3, 64), np.float32), np.ones((100, 64), np.float32)\n"
        "w.flags.writeable = False\n"
        "pw = p.pack(w)\n"
        "end = time.time() + 300\n"
        "while not g._serve.signatures and time.time() < end:\n"
        "    assert np.all(p.packed_linear(x, pw, cores=2) == 64)\n"
        "    time.sleep(0.05)\n"
        "assert np.all(p.packed_linear(np.asfortranarray(x), pw, np.zeros(100, np.float32), cores=2) == 64)\n"
        "entries = (g._run_chunk, g._serve, g._post, g._work, g.gemm_job, p._DRIVERS[np.dtype(np.float32)],\n"
        "           p._DRIVERS[np.dtype(np.float64)])\n"
        "sigs = [str(s) for f in entries for s in f.signatures]\n"
        "assert g._serve.signatures and g.gemm_job.signatures, sigs  # (the caller's entry, the helper's loop)\n"
        "assert not any('float64' in s for s in sigs), sigs\n"
        "assert not any(\", 2, 'C'\" in s for s in sigs), sigs  # (the attention kind: its like is 2-D)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_attention_jobs_compile_apart_from_the_gemm_jobs():
    """A decoding step's attention on both cores compiles the job functions for its own kind (a 2-D
    ``like``), not the packed GEMM driver; the helper switches loops as the kinds alternate."""
    code = (
        "import time, numpy as np, refimpl.fast.jobs as g, refimpl.fast.kernels as k, refimpl.fast.packed as p\n"
        "g.ATTENTION_SPLIT_FROM, g._CPUS = 0, 2\n"
        "rng = np.random.default_rng(0)\n"
        "q, kv = rng.standard_normal((2, 3, 1, 8)), rng.standard_normal((2, 3, 5, 8))\n"
        "one = k.attention_few(q, kv, kv)\n"
        "end = time.time() + 300\n"
        "while not g._serve.signatures and time.time() < end:  # (until the helper has its loop)\n"
        "    assert np.array_equal(k.attention_few(q, kv, kv, cores=2), one)\n"
        "    time.sleep(0.05)\n"
        "sigs = [str(s) for f in (g._serve, g.attention_job) for s in f.signatures]\n"
        "assert g._serve.signatures and g.attention_job.signatures and all(\", 2, 'C'\" in s for s in sigs), sigs\n"
        "assert not (p._DRIVERS[np.dtype(np.float64)].signatures or p._DRIVERS[np.dtype(np.float32)].signatures)\n"
        "p.SPLIT_FROM = 0\n"
        "x, w = np.ones((3, 64)), p.pack(np.ones((100, 64)))\n"
        "for _ in range(20):  # GEMM and attention jobs alternating: the same values\n"
        "    assert np.all(p.packed_linear(x, w, cores=2) == 64)\n"
        "    assert np.array_equal(k.attention_few(q, kv, kv, cores=2), one)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_import_compiles_nothing():
    code = (
        "import refimpl, refimpl.fast.jobs as g\n"
        "assert not (g._run_chunk.signatures or g._work.signatures or g._serve.signatures or g.gemm_job.signatures)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_two_core_jobs_in_a_forked_child():
    """The helper thread does not survive a fork: the child starts its own."""
    code = (
        "import os, numpy as np, refimpl.fast.packed as p\n"
        "p.SPLIT_FROM = 0\n"
        "x, w = np.ones((2, 16)), p.pack(np.ones((64, 16)))\n"
        "p.packed_linear(x, w, cores=2)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if np.all(p.packed_linear(x, w, cores=2) == 16) else 1)\n"
        "assert os.waitpid(pid, 0)[1] == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
