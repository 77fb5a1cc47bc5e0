"""refimpl on CuPy vs torch CUDA (eager and sdpa), roberta-base-sized, at the benchmark shapes.

Interleaved repeats in one process, medians, ratios refimpl / torch (lower is faster for refimpl).
Run by benchmarks/gpu_check.sh; needs cupy, torch with CUDA and transformers.
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

SHAPES = [(1, 16), (1, 128), (8, 128), (32, 128), (4, 512)]


def main() -> int:
    import cupy
    import torch
    import transformers

    import refimpl

    if not torch.cuda.is_available():
        print("torch has no CUDA here; install a CUDA build of torch to compare")
        return 1
    config = transformers.RobertaPreLayerNormConfig(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=514, layer_norm_eps=1e-5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.RobertaPreLayerNormModel(config).eval()
    folder = tempfile.mkdtemp(prefix="refimpl-gpu-bench-")
    atexit.register(shutil.rmtree, folder, True)  # (the model saved there: ~1 GB at base size)
    hf.save_pretrained(folder)
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'dtype':8} {'shape':>7} {'refimpl ms':>11} {'eager ms':>9} {'sdpa ms':>8} {'/eager':>7} {'/sdpa':>6}")
    for dtype in ("float32", "float64"):
        tdtype = getattr(torch, dtype)
        ours = refimpl.from_pretrained(folder, task="base", dtype=dtype, backend="cupy")
        eager = transformers.RobertaPreLayerNormModel.from_pretrained(folder, attn_implementation="eager", dtype=tdtype).cuda().eval()
        sdpa = transformers.RobertaPreLayerNormModel.from_pretrained(folder, attn_implementation="sdpa", dtype=tdtype).cuda().eval()
        for b, t in SHAPES:
            ids = np.random.default_rng(0).integers(3, 50265, size=(b, t))
            ids[:, 0] = 0
            ids_gpu = cupy.asarray(ids)
            ids_t = torch.from_numpy(ids).cuda()

            def run_ours():
                ours(input_ids=ids_gpu).last_hidden_state
                cupy.cuda.Device().synchronize()

            def run_torch(m):
                with torch.no_grad():
                    m(ids_t)
                torch.cuda.synchronize()

            fns = {"ours": run_ours, "eager": lambda: run_torch(eager), "sdpa": lambda: run_torch(sdpa)}
            for f in fns.values():
                f()
                f()
            times = {k: [] for k in fns}
            for _ in range(10):
                for k, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{dtype:8} {b:>3}x{t:<4} {med['ours']:11.2f} {med['eager']:9.2f} {med['sdpa']:8.2f} "
                  f"{med['ours'] / med['eager']:7.2f} {med['ours'] / med['sdpa']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
