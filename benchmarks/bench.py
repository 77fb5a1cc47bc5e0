"""The CPU benchmark suite: refimpl (numpy and numba backends) vs transformers (eager, sdpa) and
onnxruntime on the same weights, interleaved in one process.

    python benchmarks/bench.py                       # base config, float32, all shapes
    python benchmarks/bench.py --config large --dtype float64 --repeats 5 --json out.json

For each shape it prints the median time of every implementation, the ratio refimpl / torch
(lower is faster for refimpl), and refimpl's achieved GFLOP/s next to the machine's GEMM throughput:

* ``GEMM``: the GEMMs of the forward pass alone, at its matrix shapes, on its weights, with NumPy's
  BLAS at its default thread count (:func:`forward_gemms`: per layer the four [B*T, H] x [H, H]
  projections, q, k and v scheduled as refimpl schedules them (one GEMM on the three weights
  stacked where they are packed), [B*T, H] x [H, I], [B*T, I] x [I, H], and the batched attention products
  [B, N, T, D] x [B, N, D, T] and [B, N, T, T] x [B, N, T, D]), run as one more interleaved
  candidate. ``%GEMM`` is its time over refimpl's (numba): the share of the forward that would
  remain if everything but the GEMMs cost nothing.
* ``FFN GEMM``: one [B*T, H] x [H, I] matmul, the most BLAS-friendly shape of the forward.
* ``steal s``: CPU seconds the hypervisor gave to other guests during the shape's timed calls, all
  candidates together (Linux ``/proc/stat``; per candidate in the JSON's ``steal_s``, next to every
  timed call in ``times_s``): on a VM, a shape with much steal was measured on a held-back machine.

Candidates take turns in rounds (the order rotating each round, against drifting machine load);
in a round each runs ``--block`` calls back to back (default 3) and the first is not timed. That
untimed call absorbs what the previous candidate left behind: a multi-threaded OpenBLAS or OpenMP
call leaves its workers spinning for ~0.1 s, which taxes whoever runs next (measured: refimpl's
8x128 forward 7% slower right after a 2-thread GEMM; transformers eager at 1x128 up to 1.7x
slower right after another candidate). The timed calls are each implementation's steady state,
what a loop over batches sees.

Not a test: the numbers depend on the machine; quote ratios from one run, never bare times.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

from pipelines import steal_seconds  # (this folder: the scripts run as ``python benchmarks/...``)

CONFIGS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128), (4, 512)]


def forward_flops(cfg: dict, b: int, t: int) -> float:
    """Multiply-adds x 2 of the encoder's matmuls (projections, FFN, attention scores and context)."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_layer = 2 * b * t * (4 * h * h + 2 * h * i) + 2 * 2 * b * t * t * h
    return L * per_layer


def gemm_gflops(m: int, k: int, n: int, dtype, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((m, k)).astype(dtype)
    w = np.random.default_rng(1).standard_normal((n, k)).astype(dtype)
    a @ w.T
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ w.T
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def forward_gemms(model, b: int, t: int):
    """A function that runs the GEMMs of ``model``'s forward on [b, t] inputs, and nothing else.

    The same shapes and weights, through ``refimpl.fast.schedule.linear`` and ``linears`` (q, k and
    v) themselves (few rows: packed weights on both cores); activations are random (GEMM time does
    not depend on values).
    """
    from refimpl.fast.schedule import linear, linears

    cfg, dtype = model.config, model.dtype
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b * t, h)).astype(dtype)  # [B*T, H]
    a = rng.standard_normal((b * t, i)).astype(dtype)  # [B*T, I]
    q = rng.standard_normal((b, n, t, h // n)).astype(dtype)  # [B, N, T, D]
    probs = rng.standard_normal((b, n, t, t)).astype(dtype)  # [B, N, T, T]
    layers = [
        ((lp.attention.query, lp.attention.key, lp.attention.value),
         lp.attention.output.weight, lp.intermediate.weight, lp.output.weight)
        for lp in model.params.layers
    ]  # fmt: skip

    def run():
        for qkv, wo, w1, w2 in layers:
            linears(x, [p.weight for p in qkv], [p.bias for p in qkv])  # as the forward runs them
            linear(x, wo)
            linear(x, w1)
            linear(a, w2)
            q @ np.swapaxes(q, -1, -2)
            probs @ q

    return run


def onnx_session(hf, folder: str, dtype: str):
    """An onnxruntime session for the same model, or ``(None, reason)``."""
    try:
        import onnxruntime as ort
        import torch
    except ImportError as e:
        return None, f"not installed ({e}); pip install '.[bench]'"
    if dtype != "float32":
        return None, "float32 only"
    path = os.path.join(folder, "model.onnx")
    try:
        class LastHidden(torch.nn.Module):  # a positional-only signature for the exporter
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids):
                return self.model(input_ids=input_ids).last_hidden_state

        ids = torch.ones((1, 8), dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LastHidden(hf), (ids,), path, input_names=["input_ids"], output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": {0: "b", 1: "t"}}, dynamo=False,
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        # Spinning worker threads would steal the cores from whatever runs next in the interleave.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]), "ok"
    except Exception as e:  # export or load failed: report, do not abort the suite
        return None, f"export failed: {type(e).__name__}: {str(e)[:120]}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="base")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES), help="e.g. 1x16,8x128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--skip", default="", help="candidates to leave out, e.g. numpy,sdpa (their columns read nan)")
    p.add_argument("--block", type=int, default=3,
                   help="calls per candidate per round, back to back; the first is not timed (default 3)")
    args = p.parse_args(argv)

    import torch
    import transformers

    import refimpl

    cfg = CONFIGS[args.config]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    config = transformers.RobertaPreLayerNormConfig(vocab_size=50265, max_position_embeddings=514, layer_norm_eps=1e-5, **cfg)
    tdtype = getattr(torch, args.dtype)
    folder = tempfile.mkdtemp(prefix="refimpl-bench-")
    atexit.register(shutil.rmtree, folder, True)  # (the model saved there: ~1 GB at base size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        base = transformers.RobertaPreLayerNormModel(config).eval()
        base.save_pretrained(folder)
        eager = transformers.RobertaPreLayerNormModel.from_pretrained(folder, attn_implementation="eager", dtype=tdtype).eval()
        sdpa = transformers.RobertaPreLayerNormModel.from_pretrained(folder, attn_implementation="sdpa", dtype=tdtype).eval()
    numba_model = refimpl.from_pretrained(folder, task="base", dtype=args.dtype, backend="numba")
    numpy_model = numba_model.to("numpy")
    session, ort_status = onnx_session(sdpa.float(), folder, args.dtype)
    sdpa.to(tdtype)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}"
    print(f"# {args.config} config, {args.dtype}; {machine}; onnxruntime: {ort_status}")
    header = (f"{'shape':>7} {'numba ms':>9} {'numpy ms':>9} {'eager ms':>9} {'sdpa ms':>8} {'ort ms':>7} {'GEMM ms':>8} "
              f"{'nb/eager':>8} {'nb/sdpa':>7} {'nb/ort':>7} {'GFLOP/s':>8} {'GEMM':>6} {'%GEMM':>6} {'FFN GEMM':>8} {'steal s':>7}")
    print(header)
    results = []
    for b, t in shapes:
        ids = np.random.default_rng(0).integers(3, 50265, size=(b, t))
        ids[:, 0] = 0
        ids_t = torch.from_numpy(ids)

        def torch_run(m):
            with torch.no_grad():
                m(ids_t)

        fns = {
            "numba": lambda: numba_model(input_ids=ids),
            "numpy": lambda: numpy_model(input_ids=ids),
            "eager": lambda: torch_run(eager),
            "sdpa": lambda: torch_run(sdpa),
        }
        if session is not None:
            fns["ort"] = lambda: session.run(None, {"input_ids": ids})
        fns["gemm"] = forward_gemms(numba_model, b, t)
        for name in filter(None, args.skip.split(",")):
            fns.pop(name, None)
        for f in fns.values():  # warm-up (JIT, allocator, caches)
            f()
        times = {k: [] for k in fns}
        steal = {k: 0.0 for k in fns}  # CPU seconds the hypervisor took during each candidate's timed calls
        order = list(fns)
        for r in range(args.repeats):  # rounds, rotating who runs first
            for k in order[r % len(order):] + order[: r % len(order)]:
                f = fns[k]
                f()  # absorbs what the previous candidate left behind (spinning threads, cold caches)
                for _ in range(args.block - 1):
                    s0, t0 = steal_seconds(), time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
                    s1 = steal_seconds()
                    steal[k] = None if s0 is None or s1 is None or steal[k] is None else steal[k] + s1 - s0
        med = {k: statistics.median(v) for k, v in times.items()}
        med.update({k: float("nan") for k in ("numpy", "eager", "sdpa") if k not in med})
        flops = forward_flops(cfg, b, t)
        gflops = flops / med["numba"] / 1e9
        gemm = flops / med["gemm"] / 1e9  # the same matrix shapes, GEMMs only
        ffn_gemm = gemm_gflops(b * t, cfg["hidden_size"], cfg["intermediate_size"], np.dtype(args.dtype))
        row = {"shape": [b, t], "median_s": {k: v for k, v in med.items() if k in times}, "gflops": gflops, "gemm_gflops": gemm,
               "share_of_gemm": med["gemm"] / med["numba"], "ffn_gemm_gflops": ffn_gemm,
               "times_s": times, "steal_s": {k: None if v is None else round(v, 2) for k, v in steal.items()}}
        results.append(row)
        ort = med.get("ort")
        print(
            f"{b:>3}x{t:<4}{med['numba'] * 1e3:9.1f} {med['numpy'] * 1e3:9.1f} {med['eager'] * 1e3:9.1f} {med['sdpa'] * 1e3:8.1f} "
            f"{(ort or float('nan')) * 1e3:7.1f} {med['gemm'] * 1e3:8.1f} {med['numba'] / med['eager']:8.2f} {med['numba'] / med['sdpa']:7.2f} "
            f"{(med['numba'] / ort) if ort else float('nan'):7.2f} {gflops:8.1f} {gemm:6.1f} {100 * row['share_of_gemm']:5.1f}% {ffn_gemm:8.1f}"
            f"  {sum(v or 0.0 for v in steal.values()):5.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "dtype": args.dtype, "machine": machine, "onnxruntime": ort_status, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
