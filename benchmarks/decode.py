"""Decode throughput: refimpl.generate vs transformers' model.generate, greedy, float32, on the CPU.

A roberta-base-sized causal LM (hidden 768, 12 layers, 12 heads, vocab 50265) with random weights
(transformers' initialisation), the same weights in both. The same left-padded prompts go through
both, greedy, ``max_new_tokens`` new tokens, EOS disabled so every run produces exactly that many.
refimpl runs with ``position_style="zero-based"`` so that both compute the same thing (and the
script reports whether the tokens agree). Runs are interleaved (A, B, A, B, ...) and medians taken.

Reported per batch size: end-to-end tokens/s (prefill included) and decode-only tokens/s, from
``(time(n new) - time(1 new)) / (n - 1)`` per step, and the ratio refimpl / transformers.

Also measured, interleaved with both: the **GEMV floor**, the time of one step's matrix products
alone (every projection of every layer, the LM head's dense layer and its [V, H] decoder, on the
model's own weights, B rows, each the two-core job of refimpl's packed GEMM that a step posts, q,
k and v as one GEMM on the stacked weights, back to back with their arguments prepared: no
Python between them; :func:`step_gemvs`). At batch 1 a step
streams all ~500 MB of float32 weights once, so this is close to what memory bandwidth allows
any implementation that computes the full logits in float32; ``transformers ms/step / floor
ms/step`` is about the largest speed-up over transformers this machine permits, and refimpl's
step over the floor is what its non-GEMM work and Python cost.

    python benchmarks/decode.py [--new 32] [--prompt 16] [--batches 1 8] [--repeats 3] [--threads 2] [--backend numba]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(threads: int, backend: str = "numba"):
    import torch
    import transformers

    import refimpl
    from refimpl.loading import params_from_state_dict

    torch.set_num_threads(threads)
    cfg = transformers.RobertaPreLayerNormConfig(
        vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=514, layer_norm_eps=1e-5, is_decoder=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.RobertaPreLayerNormForCausalLM(cfg).eval()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    config = refimpl.Config.from_dict(cfg.to_dict())
    ours = refimpl.Model(config, params_from_state_dict(config, "causal-lm", state, "float32"), "causal-lm")
    return hf, ours.to(backend)


def step_gemvs(model, batch: int):
    """One decoding step's matrix products alone: [batch, in] x [in, out] for every weight matrix,
    each as the two-core job a step posts (``refimpl.fast.packed.packed_linear`` with ``cores=2``:
    the weights packed, q, k and v as one GEMM on the stacked weights, the panels in chunks that the
    caller and the helper thread claim), back to back, with every argument prepared beforehand:
    the time to stream the weights once through the step's own GEMM kernel, with no Python between
    the jobs. -> (run, bytes of weights read)."""
    from refimpl.fast import jobs, packed
    from refimpl.fast.schedule import packed_weight

    p = model.params
    mats = [(lp.attention.query.weight, lp.attention.key.weight, lp.attention.value.weight) for lp in p.layers]
    mats += [(w,) for lp in p.layers for w in (lp.attention.output.weight, lp.intermediate.weight, lp.output.weight)]
    mats += [(p.lm_head.dense.weight,), (p.lm_head.decoder_weight,)]
    rng = np.random.default_rng(0)
    rows = packed.whole_tiles(batch)  # (as packed_linear multiplies them)
    if rows >= packed.X_PACK_FROM:
        raise SystemExit(f"step_gemvs: batch {batch} would pack x; up to {packed.X_PACK_FROM - 1} rows only")
    calls = []
    for ws in mats:
        pk = packed_weight(*ws)
        k, n_out = ws[0].shape[1], pk.n_out
        chunk, n_chunks = packed.two_core_chunks(rows, k, n_out, pk.width)  # (as packed_linear cuts them)
        x = packed.flat_view(rng.standard_normal((rows, k)).astype(model.dtype))
        out = np.empty(rows * n_out, model.dtype)
        scratch = np.empty(rows * pk.width, model.dtype) if n_out % pk.width else out
        bias = packed.flat_view(np.zeros(n_out, model.dtype))
        calls.append((x, pk.panels, bias, True, out, scratch, rows, k, n_out, chunk, n_chunks, packed.KC, packed.MC))

    def run():
        for job in calls:
            if not jobs.on_two_cores(*job):
                raise RuntimeError("the helper thread is busy: the floor would run on one core")

    return run, sum(w.nbytes for ws in mats for w in ws)


def prompts(batch: int, length: int, rng):
    ids = np.full((batch, length), 1, dtype=np.int64)
    mask = np.zeros((batch, length), dtype=np.int64)
    for b in range(batch):
        n = length if b == 0 else int(rng.integers(length // 2, length + 1))
        ids[b, length - n :] = rng.integers(3, 50265, size=n)
        ids[b, length - n] = 0
        mask[b, length - n :] = 1
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--backend", default="numba", choices=["numba", "numpy"], help="refimpl's CPU backend (default: numba, as from_pretrained)")
    args = ap.parse_args()

    import torch

    import refimpl

    hf, ours = build(args.threads, args.backend)
    rng = np.random.default_rng(0)
    print(f"refimpl backend {args.backend}, threads {args.threads}, torch {torch.__version__}, attention {hf.config._attn_implementation}, "
          f"prompt {args.prompt}, new {args.new}, float32")

    def run_ours(ids, mask, n):
        return refimpl.generate(ours, ids, mask, max_new_tokens=n, eos_token_id=None, position_style="zero-based")

    def run_hf(ids, mask, n):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hf.generate(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1,
            ).numpy()

    results = []
    for batch in args.batches:
        ids, mask = prompts(batch, args.prompt, rng)
        same = np.array_equal(run_ours(ids, mask, args.new), run_hf(ids, mask, args.new))  # also warms up
        floor_fn, floor_bytes = step_gemvs(ours, batch)
        floor_fn()
        times = {("refimpl", n): [] for n in (1, args.new)} | {("transformers", n): [] for n in (1, args.new)}
        floor_times = []
        for _ in range(args.repeats):
            for n in (1, args.new):
                for name, fn in (("refimpl", run_ours), ("transformers", run_hf)):
                    t0 = time.perf_counter()
                    fn(ids, mask, n)
                    times[(name, n)].append(time.perf_counter() - t0)
            for _ in range(5):
                t0 = time.perf_counter()
                floor_fn()
                floor_times.append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        floor = statistics.median(floor_times)
        row = {}
        for name in ("refimpl", "transformers"):
            e2e = batch * args.new / med[(name, args.new)]
            step = (med[(name, args.new)] - med[(name, 1)]) / (args.new - 1)
            row[name] = (e2e, batch / step, step)
            print(f"batch {batch:2d}  {name:12s}  end-to-end {e2e:8.1f} tok/s   decode {batch / step:8.1f} tok/s "
                  f"({step * 1e3:6.1f} ms/step)   prefill+1 {med[(name, 1)] * 1e3:6.1f} ms")
        print(f"batch {batch:2d}  GEMV floor   {floor * 1e3:6.1f} ms/step ({floor_bytes / floor / 1e9:.1f} GB/s of weights): "
              f"refimpl's step is {row['refimpl'][2] / floor:.2f}x the floor; transformers/floor = {row['transformers'][2] / floor:.2f}x "
              f"(the largest decode speed-up this machine allows)")
        print(f"batch {batch:2d}  ratio refimpl/transformers: end-to-end {row['refimpl'][0] / row['transformers'][0]:.2f}x, "
              f"decode {row['refimpl'][1] / row['transformers'][1]:.2f}x; same tokens: {same}")
        results.append({
            "batch": batch, "same_tokens": bool(same), "floor_s_per_step": floor,
            **{f"{name}_{key}": value for name, (e2e, dec, step) in row.items()
               for key, value in (("end_to_end_tok_s", e2e), ("decode_tok_s", dec), ("s_per_step", step))},
            "ratio_end_to_end": row["refimpl"][0] / row["transformers"][0],
            "ratio_decode": row["refimpl"][1] / row["transformers"][1],
        })
    if args.json:
        import json
        import platform

        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "threads": args.threads, "prompt": args.prompt, "new": args.new,
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
