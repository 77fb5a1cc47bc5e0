"""Micro-benchmark: refimpl.fast.kernels vs the NumPy definitions (refimpl.ops) vs torch, float32.

Shapes are roberta-base's (H=768, I=3072, N=12, D=64) at batch 8 x 128 tokens, plus 4 x 512 for
the softmax and the attention context, and the in-place GELU of one half-batch (4 x 128 tokens) as
the forward pass runs it. The GELU kernel's cost depends on the values (erf's second branch is
evaluated only for blocks holding some |z| >= 3.5), so it runs on z ~ N(0, 1) and on a wide spread,
z ~ N(-1, 1.5), where most blocks need it. Kernel cases also print the kernel's time per element.
Every case runs its candidates interleaved (A, B, C, A, B, C, ...) so that drifting machine load
hits all of them alike, and reports medians. Kernels write into preallocated outputs, as the
forward pass will; the kernels are single-threaded, torch runs with --threads intra-op threads (1
compares per core; 2 is this machine's best for torch). On a machine shared with other jobs, prefer
--threads 1: spinning thread pools degrade worst.

    python benchmarks/kernels_micro.py [--repeats 21] [--dtype float32] [--threads 2]
    python benchmarks/kernels_micro.py --jit    # first-call (compile) times, cold and warm cache
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from refimpl import ops  # noqa: E402
from refimpl.fast import kernels  # noqa: E402


def interleaved(candidates: dict, repeats: int, block: int = 1, pause: float = 0.0) -> dict:
    """Median seconds per call of each candidate, run round-robin after one warm-up call each.

    With ``block`` > 1 a candidate runs ``block`` calls back to back in each round and the first is
    not timed; ``pause`` seconds pass before each candidate's turn. Both keep a candidate from
    paying for what the previous one left behind: OpenBLAS's workers spin for ~0.1 s after a
    two-thread call and take a core from whoever runs next (refimpl's two-core GEMM at one row took
    2x its time right after OpenBLAS)."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            time.sleep(pause)
            for i in range(block):
                t0 = time.perf_counter()
                fn()
                if i or block == 1:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


_FIRST_CALLS = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from refimpl.fast import kernels
res = {"import": time.perf_counter() - t0}
dtype = np.dtype(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 128, 768)).astype(dtype)
v = rng.standard_normal(768).astype(dtype)
s = rng.standard_normal((8, 12, 128, 128)).astype(dtype)
m = np.zeros((8, 1, 1, 128), dtype)
calls = {
    "bias_gelu": lambda: kernels.bias_gelu(x, v),
    "layer_norm": lambda: kernels.layer_norm(x, v, v, 1e-5),
    "residual_layer_norm": lambda: kernels.residual_layer_norm(x, x, v, v, 1e-5),
    "masked_softmax": lambda: kernels.masked_softmax(s, m, 0.125),
}
for name, fn in calls.items():
    t0 = time.perf_counter()
    fn()
    res[name] = time.perf_counter() - t0
res["all"] = sum(res.values())
t0 = time.perf_counter()
kernels.warmup("float64" if dtype == np.float32 else "float32")
res["warmup(other dtype)"] = time.perf_counter() - t0
print(json.dumps(res))
"""


def first_call_times(dtype: str) -> None:
    """Fresh processes with an empty, then a filled, Numba cache directory (NUMBA_CACHE_DIR)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", _FIRST_CALLS, dtype], env=env, cwd=root,
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            res = json.loads(out.strip().splitlines()[-1])
            print(f"{label:>10}: " + ", ".join(f"{k} {v:.2f} s" for k, v in res.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--jit", action="store_true", help="only measure first-call times")
    args = parser.parse_args()
    if args.jit:
        first_call_times(args.dtype)
        return

    try:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(args.threads)
    except ImportError:  # pragma: no cover - torch is a test extra
        torch = None
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    kernels.warmup(dtype)
    print(f"kernels.warmup({dtype}): {time.perf_counter() - t0:.2f} s (this process)")
    print(f"{dtype}, medians of {args.repeats} interleaved repeats; torch threads={args.threads}\n")

    rows = []

    def case(label, ref, kern, tch, elements=None):
        cands = {"numpy": ref, "kernel": kern}
        if torch is not None and tch is not None:
            cands["torch"] = tch
        res = interleaved(cands, args.repeats)
        rows.append((label, res))
        tt = res.get("torch", math.nan)
        per = f"  ({res['kernel'] / elements * 1e9:5.2f} ns/element)" if elements else ""
        print(
            f"{label:<42} numpy {res['numpy'] * 1e3:8.2f} ms  kernel {res['kernel'] * 1e3:7.2f} ms"
            f"  torch {tt * 1e3:7.2f} ms   numpy/kernel {res['numpy'] / res['kernel']:5.1f}x"
            f"  kernel/torch {res['kernel'] / tt:5.2f}x{per}",
            flush=True,
        )

    def as_t(a):
        return torch.from_numpy(a) if torch is not None else None

    # bias + GELU on [8, 128, H] for H = 768 and I = 3072. The kernel's cost depends on the values:
    # erf's second branch is evaluated only for blocks holding some |y + b| >= 3.5 (float32; 2.8
    # in float64). z ~ N(0, 1) holds few; z ~ N(-1, 1.5) many.
    for h, mean, std in ((768, 0.0, 1.0), (3072, 0.0, 1.0), (3072, -1.0, 1.5)):
        y = (mean + std * rng.standard_normal((8, 128, h))).astype(dtype)
        b = (0.1 * rng.standard_normal(h)).astype(dtype)
        out = np.empty_like(y)
        ty, tb = as_t(y), as_t(b)
        case(
            f"bias_gelu [8,128,{h}] z~N({mean:g},{std:g})",
            lambda y=y, b=b: ops.gelu(y + b),
            lambda y=y, b=b, out=out: kernels.bias_gelu(y, b, out=out),
            (lambda ty=ty, tb=tb: F.gelu(ty + tb)) if torch else None,
            y.size,
        )
    # in place, as the forward runs it on the fresh FFN GEMM output (each call restores y first:
    # the copy is in every candidate's time)
    y0 = rng.standard_normal((4 * 128, 3072)).astype(dtype)
    b = (0.1 * rng.standard_normal(3072)).astype(dtype)
    y = y0.copy()
    ty, tb = as_t(y), as_t(b)

    def gelu_in_place():
        np.copyto(y, y0)
        return kernels.bias_gelu(y, b, out=y)

    def torch_in_place():
        np.copyto(y, y0)
        return F.gelu(ty.add_(tb))

    case(
        "bias_gelu in place [512,3072] (+copy)",
        lambda: ops.gelu(y0 + b),
        gelu_in_place,
        torch_in_place if torch else None,
        y.size,
    )

    # LayerNorm and residual + LayerNorm on [8, 128, 768]
    x = (3.0 + rng.standard_normal((8, 128, 768))).astype(dtype)
    r = rng.standard_normal((8, 128, 768)).astype(dtype)
    w = (1.0 + 0.1 * rng.standard_normal(768)).astype(dtype)
    bb = (0.1 * rng.standard_normal(768)).astype(dtype)
    out, hout = np.empty_like(x), np.empty_like(x)
    tx, tr, tw, tbb = as_t(x), as_t(r), as_t(w), as_t(bb)
    case(
        "layer_norm [8,128,768]",
        lambda: ops.layer_norm(x, w, bb, 1e-5),
        lambda: kernels.layer_norm(x, w, bb, 1e-5, out=out),
        (lambda: F.layer_norm(tx, (768,), tw, tbb, 1e-5)) if torch else None,
    )
    case(
        "residual_layer_norm [8,128,768]",
        lambda: (lambda h: (h, ops.layer_norm(h, w, bb, 1e-5)))(x + r),
        lambda: kernels.residual_layer_norm(x, r, w, bb, 1e-5, h_out=hout, out=out),
        (lambda: (lambda h: (h, F.layer_norm(h, (768,), tw, tbb, 1e-5)))(tx + tr))
        if torch
        else None,
    )

    # scale + mask + softmax on [8, 12, 128, 128] and [4, 12, 512, 512], a quarter of keys masked
    for bsz, t in ((8, 128), (4, 512)):
        s = (4.0 * rng.standard_normal((bsz, 12, t, t))).astype(dtype)
        mask = np.zeros((bsz, 1, 1, t), dtype)
        mask[:, :, :, (3 * t) // 4 :] = np.finfo(dtype).min
        scale = 1.0 / math.sqrt(64)
        out = np.empty_like(s)
        ts_, tm = as_t(s), as_t(mask)
        case(
            f"masked_softmax [{bsz},12,{t},{t}]",
            lambda s=s, mask=mask: ops.softmax(s * scale + mask),
            lambda s=s, mask=mask, out=out: kernels.masked_softmax(s, mask, scale, out=out),
            (lambda ts_=ts_, tm=tm: torch.softmax(ts_ * scale + tm, dim=-1)) if torch else None,
            s.size,
        )

    # attention context at T = S = 512: batched NumPy reference vs the two kernel schedules
    bsz, t, d = 4, 512, 64
    q, k, v = rng.standard_normal((3, bsz, 12, t, d)).astype(dtype)
    mask = np.zeros((bsz, 1, 1, t), dtype)
    mask[:, :, :, (3 * t) // 4 :] = np.finfo(dtype).min
    scale = 1.0 / math.sqrt(d)
    ctx = np.empty_like(q)

    def reference():
        return ops.softmax((q @ k.swapaxes(-1, -2)) * dtype.type(scale) + mask) @ v

    def batched():
        s = q @ k.swapaxes(-1, -2)
        kernels.masked_softmax(s, mask, scale, out=s)
        return s @ v

    tq, tk, tv, tm = as_t(q), as_t(k), as_t(v), as_t(mask)
    sdpa = None
    if torch is not None:
        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, scale=scale)
    case(f"attention [{bsz},12,{t},{d}] batched+softmax", reference, batched, sdpa)
    case(f"attention [{bsz},12,{t},{d}] kernels.attention", reference,
         lambda: kernels.attention(q, k, v, mask, scale, out=ctx), sdpa)  # fmt: skip


if __name__ == "__main__":
    main()
