"""Forward + backward: refimpl's written-out backward (refimpl.grad) against torch autograd.

    python benchmarks/backward.py                                  # roberta-base, 8x128, float32, sequence classification
    python benchmarks/backward.py --task masked-lm --json out.json
    python benchmarks/backward.py --config tiny --shapes 2x16 --repeats 2 --profile   # a quick check

For each shape it prints the median time of one training step's gradient computation (the loss and
every parameter's gradient; no optimiser step) for each candidate, interleaved in one process, and
the ratio refimpl / torch (lower is faster for refimpl):

* ``refimpl``: ``refimpl.grad(model, input_ids=..., attention_mask=..., labels=...)``: the NumPy
  reference forward with a trace, then the backward of refimpl/backward.py.
* ``eager`` / ``sdpa``: transformers' ``RobertaPreLayerNormFor<Task>`` in train mode with every
  dropout probability 0 (the reference has no dropout), ``zero_grad(set_to_none=True)``,
  ``loss.backward()``.
* ``GEMM``: the GEMMs of forward + backward alone, at their shapes, on the model's weights, with
  NumPy's BLAS (per linear layer ``x W^T``, ``dy W``, ``dy^T x``; per attention ``q k^T``, ``p v``
  and their four backward products): ``%GEMM`` is its time over refimpl's, the share of the step
  that would remain if everything but the GEMMs cost nothing.

The method is benchmarks/bench.py's: candidates take turns in rounds (order rotating), each runs
``--block`` calls back to back and the first is not timed (it absorbs spinning BLAS/OpenMP threads
left by the previous candidate). ``--profile`` adds a cProfile breakdown of refimpl's step by
function (own time), which says where the time goes beyond the GEMMs.

Not a test: numbers depend on the machine and its load; quote ratios from one run on a quiet machine.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

CONFIGS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=50265),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000),
}
CLASSES = {"sequence-classification": "RobertaPreLayerNormForSequenceClassification",
           "masked-lm": "RobertaPreLayerNormForMaskedLM"}


def step_gemms(model, b: int, t: int):
    """A function running the GEMMs of one forward + backward of ``model`` on [b, t], and nothing else."""
    cfg, dtype = model.config, model.dtype
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b * t, h)).astype(dtype)  # [B*T, H]
    a = rng.standard_normal((b * t, i)).astype(dtype)  # [B*T, I]
    q = rng.standard_normal((b, n, t, h // n)).astype(dtype)  # [B, N, T, D]
    p = rng.standard_normal((b, n, t, t)).astype(dtype)  # [B, N, T, T]
    layers = [(lp.attention.query.weight, lp.attention.key.weight, lp.attention.value.weight,
               lp.attention.output.weight, lp.intermediate.weight, lp.output.weight) for lp in model.params.layers]
    head = []
    if model.params.lm_head is not None:  # the LM head's dense and the decoder over the vocabulary
        head = [(x, model.params.lm_head.dense.weight, x), (x, model.params.lm_head.decoder_weight,
                rng.standard_normal((b * t, cfg.vocab_size)).astype(dtype))]

    def linear3(rows, w, dy):  # forward, dx, dW
        rows @ w.T
        dy @ w
        dy.T @ rows

    def run():
        for wq, wk, wv, wo, w1, w2 in layers:
            for w in (wq, wk, wv, wo):
                linear3(x, w, x)
            linear3(x, w1, a)
            linear3(a, w2, x)
            kt = np.swapaxes(q, -1, -2)
            q @ kt  # scores
            p @ q  # context
            q @ kt  # dprobs = dctx v^T
            np.swapaxes(p, -1, -2) @ q  # dv
            p @ q  # dq
            np.swapaxes(p, -1, -2) @ q  # dk
        for rows, w, dy in head:
            linear3(rows, w, dy)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="base")
    ap.add_argument("--task", choices=list(CLASSES), default="sequence-classification")
    ap.add_argument("--layers", type=int, default=None, help="override the config's number of layers")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--shapes", default="8x128", help="e.g. 1x128,8x128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block", type=int, default=3, help="calls per candidate per round; the first is not timed")
    ap.add_argument("--profile", action="store_true", help="print a cProfile breakdown of refimpl's step")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import refimpl

    cfg = dict(CONFIGS[args.config])
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    config = transformers.RobertaPreLayerNormConfig(
        max_position_embeddings=514, layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=2, **cfg)
    tdtype = getattr(torch, args.dtype)
    folder = tempfile.mkdtemp(prefix="refimpl-backward-bench-")
    atexit.register(shutil.rmtree, folder, True)  # (the model saved there: ~1 GB at base size)
    cls = getattr(transformers, CLASSES[args.task])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        cls(config).save_pretrained(folder)
        eager = cls.from_pretrained(folder, attn_implementation="eager", dtype=tdtype).train()
        sdpa = cls.from_pretrained(folder, attn_implementation="sdpa", dtype=tdtype).train()
    model = refimpl.from_pretrained(folder, task=args.task, dtype=args.dtype, backend="numpy")

    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"numpy {np.__version__}")
    print(f"# {args.config} config ({cfg['num_hidden_layers']} layers), {args.task}, {args.dtype}; {machine}")
    print(f"{'shape':>7} {'refimpl ms':>10} {'eager ms':>9} {'sdpa ms':>8} {'GEMM ms':>8} {'ref/eager':>9} {'ref/sdpa':>8} {'%GEMM':>6}")
    results = []
    for b, t in [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]:
        rng = np.random.default_rng(0)
        ids = rng.integers(3, cfg["vocab_size"], size=(b, t))
        ids[:, 0] = 0
        mask = np.ones_like(ids)
        labels = rng.integers(0, 2, size=b) if args.task == "sequence-classification" else ids.copy()
        tin = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask), "labels": torch.from_numpy(labels)}

        def torch_step(m):
            m.zero_grad(set_to_none=True)
            m(**tin).loss.backward()

        fns = {
            "refimpl": lambda: refimpl.grad(model, input_ids=ids, attention_mask=mask, labels=labels),
            "eager": lambda: torch_step(eager),
            "sdpa": lambda: torch_step(sdpa),
            "gemm": step_gemms(model, b, t),
        }
        for f in fns.values():
            f()
        times = {k: [] for k in fns}
        order = list(fns)
        for r in range(args.repeats):
            for k in order[r % len(order):] + order[: r % len(order)]:
                fns[k]()  # untimed: absorbs what the previous candidate left behind
                for _ in range(args.block - 1):
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"shape": [b, t], "median_s": med, "ratio_eager": med["refimpl"] / med["eager"],
               "ratio_sdpa": med["refimpl"] / med["sdpa"], "share_of_gemm": med["gemm"] / med["refimpl"]}
        results.append(row)
        print(f"{b:>3}x{t:<4}{med['refimpl'] * 1e3:10.1f} {med['eager'] * 1e3:9.1f} {med['sdpa'] * 1e3:8.1f} "
              f"{med['gemm'] * 1e3:8.1f} {row['ratio_eager']:9.2f} {row['ratio_sdpa']:8.2f} {100 * row['share_of_gemm']:5.1f}%")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(max(1, args.repeats)):
                fns["refimpl"]()
            prof.disable()
            print(f"\n# where refimpl's step goes ({b}x{t}, own time per function, {max(1, args.repeats)} calls):")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "task": args.task, "dtype": args.dtype, "machine": machine, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
