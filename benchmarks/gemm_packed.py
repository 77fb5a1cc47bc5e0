"""Benchmark: the packed-weight GEMM (refimpl.fast.packed) against OpenBLAS, one thread each.

``x @ W.T + b`` at roberta-base's shapes ([R, 768] x [768, 768]^T, [R, 768] x [3072, 768]^T,
[R, 3072] x [768, 3072]^T) for R = 1 ... 512 rows, float32 and float64. Candidates:

- ``packed``: :func:`refimpl.fast.packed.packed_linear` with the weight packed once beforehand;
- ``x@W.T``:  ``y = x @ W.T; y += b`` (OpenBLAS packs W on every call);
- ``(W@x.T).T``: ``y = (W @ x.T).T; y += b``, the orientation :func:`refimpl.fast.schedule.linear`
  uses for a few rows.

OpenBLAS runs on one thread (:func:`refimpl.blas.blas_threads`), the packed kernel is
single-threaded. Each case runs its candidates interleaved (A, B, C, A, B, C, ...) after a warm-up
call each, so that drifting machine load hits all of them alike, and reports medians; the table
shows packed / x@W.T and packed / (W@x.T).T (below 1: the packed kernel is faster).

By default every call multiplies the same weight, which stays in the caches between calls (L3 holds
it). ``--cold`` cycles through copies of the weight, ~160 MB of them, as a forward pass does (a
base-sized model is ~340 MB of float32 weights): each call reads its weight from memory.

    python benchmarks/gemm_packed.py [--repeats 21] [--dtype float32] [--rows 16,64] [--cold] [--json PATH]
    python benchmarks/gemm_packed.py --jit    # first-call (compile) times, empty and filled cache
    python benchmarks/gemm_packed.py --forward [--rows 8,16] [--repeats 7]   # a forward's GEMMs, two cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refimpl.blas import blas_threads  # noqa: E402
from refimpl.fast import packed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_micro import interleaved  # noqa: E402  (the same round-robin medians)

SHAPES = ((768, 768), (3072, 768), (768, 3072))  # (O, K): attention projections, FFN in, FFN out
ROWS = (1, 4, 8, 16, 32, 64, 128, 256, 512)


def candidates(x, ws, b, pws) -> dict:
    """The three candidates; each call takes the next of the weights ``ws`` (packed: ``pws``). The
    two BLAS candidates start a third of the way apart, so neither reads a weight the other has just
    brought into the caches."""
    n = len(ws)
    turn = {"packed": 0, "x@W.T": n // 3, "(W@x.T).T": 2 * n // 3}

    def take(name):
        turn[name] += 1
        return turn[name] % len(ws)

    def packed_():
        return packed.packed_linear(x, pws[take("packed")], b)

    def openblas():
        y = x @ ws[take("x@W.T")].T  # [R, K] @ [K, O] -> [R, O]
        y += b
        return y

    def thin():
        y = (ws[take("(W@x.T).T")] @ x.T).T  # [O, K] @ [K, R] -> [O, R] -> [R, O] (a transposed view)
        y += b
        return y

    return {"packed": packed_, "x@W.T": openblas, "(W@x.T).T": thin}


def run(dtypes, rows, repeats: int, cold: bool = False) -> list[dict]:
    records = []
    rng = np.random.default_rng(0)
    with blas_threads(1):
        for dtype in dtypes:
            t0 = time.perf_counter()
            packed.warmup(dtype)
            print(f"\n{dtype}: packed.warmup {time.perf_counter() - t0:.2f} s (this process; ISA {packed.ISA}, "
                  f"tile {packed._MR} x {packed.panel_width(dtype)}); medians of {repeats} interleaved repeats"
                  + ("; weights from memory (--cold)" if cold else ""))
            print(f"{'O x K':>11} " + " ".join(f"{'R=' + str(r):>11}" for r in rows))
            for n_out, k in SHAPES:
                w = rng.standard_normal((n_out, k)).astype(dtype)
                b = rng.standard_normal(n_out).astype(dtype)
                copies = max(2, int(160e6 // w.nbytes)) if cold else 1
                ws = [w] + [w.copy() for _ in range(copies - 1)]
                pws = [packed.pack(v) for v in ws]
                cells = []
                for r in rows:
                    x = rng.standard_normal((r, k)).astype(dtype)
                    res = interleaved(candidates(x, ws, b, pws), repeats)
                    ratio = res["packed"] / res["x@W.T"]
                    ratio_thin = res["packed"] / res["(W@x.T).T"]
                    records.append(dict(dtype=np.dtype(dtype).name, out=n_out, k=k, rows=r, cold=cold,
                                        seconds=res, packed_over_blas=ratio, packed_over_thin=ratio_thin))
                    cells.append(f"{ratio:5.2f}/{ratio_thin:<5.2f}")
                print(f"{n_out:>5}x{k:<5} " + " ".join(f"{c:>11}" for c in cells), flush=True)
    print("\ncells: packed / (x @ W.T + b)  /  packed / ((W @ x.T).T + b), single-threaded medians")
    return records


def forward_sequence(dtypes, rows, repeats: int) -> list[dict]:
    """The 72 GEMMs of a base-sized forward one after the other (12 layers: q, k, v stacked as one
    [2304, 768] weight, the [768, 768] output projection, [3072, 768] and [768, 3072]; ~340 MB of
    float32 weights, so each GEMM reads its weight from memory, as in a forward), at R rows, with
    packed weights with ``cores=2`` (what a forward outside a split runs up to
    ``schedule.TWO_CORE_ROWS`` rows) against OpenBLAS's ``(W x^T)^T`` on 2 threads, and packed
    weights on one thread for reference. Medians of interleaved repeats of the whole sequence, each
    candidate's in blocks of 3 with the first untimed, after a 0.2 s pause."""
    records = []
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
        ws = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
        bs = [rng.standard_normal(shape[0]).astype(dtype) for shape in shapes]
        pws = [packed.pack(w) for w in ws]
        print(f"\n{dtype}: the 72 GEMMs of a base-sized forward in a row; medians of {repeats} interleaved "
              f"repeats, ms (and / packed on 2 cores)")
        print(f"{'R':>4} {'packed, 2 cores':>15} {'OpenBLAS, 2 threads':>22} {'packed, 1 thread':>22}")
        for r in rows:
            xs = {k: rng.standard_normal((r, k)).astype(dtype) for k in (768, 3072)}

            def seq(fn):
                return lambda: [fn(xs[w.shape[1]], w, b, pw) for w, b, pw in zip(ws, bs, pws)]

            res = interleaved({
                "packed2": seq(lambda x, w, b, pw: packed.packed_linear(x, pw, b, cores=2)),
                "openblas2": seq(lambda x, w, b, pw: np.add((w @ x.T).T, b)),
                "packed1": seq(lambda x, w, b, pw: packed.packed_linear(x, pw, b)),
            }, repeats, block=3, pause=0.2)  # (OpenBLAS's workers spin ~0.1 s after a call)
            base = res["packed2"]
            records.append(dict(dtype=np.dtype(dtype).name, rows=r, seconds=res))
            print(f"{r:>4} {base * 1e3:>15.2f} " + " ".join(
                f"{res[k] * 1e3:>15.2f} ({res[k] / base:4.2f})" for k in ("openblas2", "packed1")), flush=True)
    return records


_FIRST_CALLS = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from refimpl.fast import packed
res = {"import": time.perf_counter() - t0}
for name in sys.argv[1:]:
    dtype = np.dtype(name)
    t0 = time.perf_counter()
    packed.warmup(dtype)
    res[f"warmup({name})"] = time.perf_counter() - t0
print(json.dumps(res))
"""


def first_call_times() -> dict:
    """Fresh processes with an empty, then a filled, Numba cache directory (NUMBA_CACHE_DIR):
    float32 then float64 in one process, and float64 alone (the first compile in a process also
    pays Numba's one-time set-up)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    results = {}
    for order in (("float32", "float64"), ("float64",)):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
            for label in ("cold cache", "warm cache"):
                out = subprocess.run([sys.executable, "-c", _FIRST_CALLS, *order], env=env, cwd=root,
                                     check=True, capture_output=True, text=True).stdout  # fmt: skip
                res = json.loads(out.strip().splitlines()[-1])
                results[f"{' then '.join(order)}, {label}"] = res
                times = ", ".join(f"{k} {v:.2f} s" for k, v in res.items())
                print(f"{' then '.join(order):>19}, {label:>10}: {times}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dtype", choices=["float32", "float64"], help="one dtype (default: both)")
    parser.add_argument("--rows", default=None, help="comma-separated row counts (default: per mode)")
    parser.add_argument("--cold", action="store_true", help="weights from memory: cycle through ~160 MB of copies")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--jit", action="store_true", help="only measure first-call (compile) times")
    parser.add_argument("--forward", action="store_true",
                        help="the 72 GEMMs of a base-sized forward in a row, the two-core schedules (default rows 1,4,8,16,32,48,64)")
    args = parser.parse_args()
    if args.jit:
        result = {"first_calls": first_call_times()}
    elif args.forward:
        dtypes = [np.dtype(args.dtype)] if args.dtype else [np.dtype(np.float32)]
        rows = [int(r) for r in (args.rows or "1,4,8,16,32,48,64").split(",")]
        result = {"isa": packed.ISA, "repeats": args.repeats, "forward": forward_sequence(dtypes, rows, args.repeats)}
    else:
        dtypes = [np.dtype(args.dtype)] if args.dtype else [np.dtype(np.float32), np.dtype(np.float64)]
        rows = [int(r) for r in args.rows.split(",")] if args.rows else list(ROWS)
        cases = run(dtypes, rows, args.repeats, args.cold)
        result = {"isa": packed.ISA, "repeats": args.repeats, "cold": args.cold, "cases": cases}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
