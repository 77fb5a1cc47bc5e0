"""Forward time of two refimpl checkouts, interleaved in one run: did a change keep the speed?

    python benchmarks/compare_checkouts.py --a /path/to/old/checkout --b . --rounds 6

Each round runs one process per checkout, alternating which goes first; each process builds the
same roberta-base-sized model (random weights from a fixed seed, float32, the default ``numba``
backend), warms it up, and times a forward at every shape in its steady state (rounds of 3
back-to-back calls, the last 2 timed). The report gives, per shape, the median time of each
checkout over all rounds and the ratio B / A; alternating processes spreads whatever else the
machine does over both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, statistics, sys, time
import numpy as np
import refimpl
from refimpl.params import build_params, hf_key_table

shapes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
cfg = refimpl.Config.from_dict(dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, max_position_embeddings=514, pad_token_id=1,
                                    type_vocab_size=1, layer_norm_eps=1e-5))
rng = np.random.default_rng(0)
leaves = {e.path: (rng.standard_normal(e.shape, dtype=np.float32) * 0.02) for e in hf_key_table(cfg, "base")}
model = refimpl.Model(cfg, build_params(cfg, "base", leaves), "base").to("numba")
out = {}
for b, t in shapes:
    ids = rng.integers(3, cfg.vocab_size, size=(b, t))
    mask = np.ones_like(ids)
    model(input_ids=ids, attention_mask=mask)  # compile / warm
    times = []
    for _ in range(repeats):
        for i in range(3):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            if i:
                times.append(time.perf_counter() - t0)
    out[f"{b}x{t}"] = statistics.median(times)
print(json.dumps(out))
"""


def run(checkout: str, shapes, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(shapes), str(repeats)], env=env,
                          capture_output=True, text=True, cwd=os.path.abspath(checkout))
    if done.returncode:
        raise SystemExit(f"{checkout}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="the baseline checkout (its folder holds refimpl/)")
    parser.add_argument("--b", required=True, help="the checkout to compare")
    parser.add_argument("--shapes", default="1x16,1x128,8x128,32x128,4x512")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per shape and process")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    times = {"a": [], "b": []}
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for side in order:
            times[side].append(run(getattr(args, side), shapes, args.repeats))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    report = {}
    print(f"{'shape':>8} {'A ms':>9} {'B ms':>9} {'B/A':>6}")
    for b, t in shapes:
        key = f"{b}x{t}"
        a = statistics.median(x[key] for x in times["a"])
        bb = statistics.median(x[key] for x in times["b"])
        report[key] = {"a_ms": a * 1e3, "b_ms": bb * 1e3, "ratio": bb / a}
        print(f"{key:>8} {a * 1e3:9.1f} {bb * 1e3:9.1f} {bb / a:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"a": args.a, "b": args.b, "rounds": args.rounds, "shapes": report, "raw": times}, f, indent=1)


if __name__ == "__main__":
    main()
