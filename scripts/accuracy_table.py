#!/usr/bin/env python3
"""How accurate are refimpl float32 and torch float32 (and torch float16/bfloat16) against a
refimpl float64 golden? Prints the Markdown table pasted into docs/golden.md, which justifies the
tolerance profiles of ``refimpl.golden.PROFILES``.

    .venv/bin/python scripts/accuracy_table.py            # ~1.5 minutes on 2 cores
    .venv/bin/python scripts/accuracy_table.py --ops      # each operation alone (the "why" table)

For each configuration and implementation: the error on the logits and on the last hidden state
(max abs; max rel over elements with |g| >= 1e-3 max|g|, since relative errors of values that
cancel to ~0 say nothing; rms for the logits), and "needed", the smallest tol for which every traced tensor passes
|c - g| <= tol + tol*|g| (the comparison's rule with rtol = atol = tol). refimpl runs with the
reference NumPy kernels and with the Numba fast paths (the CPU default; when tracing, its FFN
activation takes the reference path, so its logits/last-hidden columns come from an untraced call).
Needs torch + transformers.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import refimpl  # noqa: E402
from refimpl.config import Config  # noqa: E402
from refimpl.golden import PROFILES, compare, trace  # noqa: E402
from refimpl.kernels import numba_kernels  # noqa: E402
from refimpl.ops import REFERENCE  # noqa: E402

from dump_transformers_golden import capture, torch_inputs  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from conftest import randomize_  # noqa: E402  (the tests' weight randomiser)

TINY = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-5)
BASE2 = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)


def build(cfg: dict, std: float, bias_std: float, seed: int = 0):
    import transformers

    config = transformers.RobertaPreLayerNormConfig(**cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        hf = transformers.RobertaPreLayerNormForMaskedLM(config)
    hf.config._attn_implementation = "eager"
    randomize_(hf, seed, std, bias_std)
    hf = hf.eval().double()
    rconfig = Config.from_dict({k: v for k, v in config.to_dict().items()})
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = refimpl.Model(rconfig, refimpl.params_from_state_dict(rconfig, "masked-lm", state, "float64"), "masked-lm")
    return hf, model


def shipped():
    """The checkpoint shipped as ``--model tiny`` (transformers' default init: std 0.02, zero biases)."""
    from dump_transformers_golden import load_transformers
    from refimpl.cli.common import resolve_model_path

    folder = resolve_model_path("tiny")
    hf = load_transformers(folder, "masked-lm", "float64")
    return hf, refimpl.from_pretrained(folder, task="masked-lm", dtype="float64")


def make_inputs(vocab: int, b: int, t: int, padding: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, t))
    ids[:, 0] = 0
    ids[:, -1] = 2
    if padding:  # row 1 right-padded to half length, row 0 full
        ids[1, t // 2:] = 1
        ids[1, t // 2 - 1] = 2
    return dict(input_ids=ids, attention_mask=(ids != 1).astype(np.int64))


def errors(golden: np.ndarray, cand: np.ndarray) -> tuple[float, float, float]:
    """-> (max abs, max rel over |g| >= 1e-3 max|g|, rms)."""
    g = np.asarray(golden, np.float64)
    d = np.abs(np.asarray(cand, np.float64) - g)
    big = np.abs(g) >= 1e-3 * np.max(np.abs(g))
    return float(d.max()), float((d[big] / np.abs(g[big])).max()), float(np.sqrt(np.mean(d * d)))


def needed(golden: dict, cand: dict) -> tuple[float, str]:
    """The smallest tol with |c - g| <= tol (1 + |g|) on every shared tensor, and where it is reached."""
    worst, where = 0.0, ""
    for name, g in golden.items():
        if name not in cand:
            continue
        g64 = np.asarray(g, np.float64)
        r = float(np.max(np.abs(np.asarray(cand[name], np.float64) - g64) / (1.0 + np.abs(g64))))
        if r > worst:
            worst, where = r, name
    return worst, where


def run_config(label: str, cfg: dict | None, std: float, bias_std: float, b: int, t: int, padding: bool, low: bool):
    hf, model64 = build(cfg, std, bias_std) if cfg is not None else shipped()
    inputs = make_inputs(model64.config.vocab_size, b, t, padding)
    golden = trace(model64, **inputs)
    rows = []
    impls = [("refimpl float32", "numpy"), ("refimpl float32 (Numba kernels)", "numba"),
             ("torch float32", torch.float32), ("torch float64", torch.float64)]
    if low:
        impls += [("torch bfloat16", torch.bfloat16), ("torch float16", torch.float16)]
    for name, dt in impls:
        t0 = time.perf_counter()
        if isinstance(dt, str):  # refimpl: outputs from an untraced call (the fast paths run there)
            m32 = model64.astype("float32")
            m32 = refimpl.Model(m32.config, m32.params, m32.task, numba_kernels() if dt == "numba" else REFERENCE)
            cand = trace(m32, **inputs)
            out = m32(**inputs, output_hidden_states=True)
            logits, hidden = out.logits, out.hidden_states[-1]
        else:
            cand = capture(hf.to(dt), **torch_inputs(inputs, dt))
            hf.double()
            logits, hidden = cand["logits"], cand["final_layer_norm"]
        lg = errors(golden["logits"], logits)
        hs = errors(golden["final_layer_norm"], hidden)[:2]
        need, where = needed(golden, cand)
        profile = name.split()[1]
        ok = compare_ok(golden, cand, profile)
        rows.append((label, name, *lg, *hs, need, where, profile, ok, time.perf_counter() - t0))
    return rows


def compare_ok(golden: dict, cand: dict, profile: str) -> str:
    from refimpl.golden import Golden

    report = compare(Golden(golden, {}, {}), cand, profile=profile)
    return "pass" if report.passed else f"FAIL at {report.first_divergence.name}"


def ops_table() -> None:
    """Each operation alone on identical float32 inputs, vs the same operation in float64."""
    from refimpl import ops

    rng = np.random.default_rng(0)
    kern = numba_kernels()

    def err(ref, y):
        d = np.asarray(y, np.float64) - ref
        scale = np.max(np.abs(ref))
        return f"{np.max(np.abs(d)) / scale:.1e} / {np.sqrt(np.mean(d * d)) / scale:.1e}"

    def row(name, f_np, f_numba, f_torch, *args):
        a32 = [a.astype(np.float32) for a in args]
        ref = f_np(*[a.astype(np.float64) for a in a32])
        numba = err(ref, f_numba(*a32)) if f_numba else "same GEMM"
        print(f"| {name} | {err(ref, f_np(*a32))} | {numba} | {err(ref, f_torch(*[torch.from_numpy(a) for a in a32]).numpy())} |")

    F = torch.nn.functional
    x = rng.standard_normal((128, 768))
    w1, b1 = 0.02 * rng.standard_normal((3072, 768)), 0.02 * rng.standard_normal(3072)
    h = rng.standard_normal((128, 3072))
    w2, b2 = 0.02 * rng.standard_normal((768, 3072)), 0.02 * rng.standard_normal(768)
    emb = 0.02 * rng.standard_normal((50265, 768))
    g, b = 1 + 0.1 * rng.standard_normal(768), 0.02 * rng.standard_normal(768)
    print("| operation (roberta-base shapes) | refimpl (NumPy) max / rms | refimpl (Numba) max / rms | torch max / rms |")
    print("|---|---|---|---|")
    row("linear 768 -> 3072", ops.linear, None, F.linear, x, w1, b1)
    row("linear 768 -> 3072 + GELU", lambda x, w, b: ops.linear_act(x, w, b, "gelu"),
        lambda x, w, b: kern.linear_act(x, w, b, "gelu"), lambda x, w, b: F.gelu(F.linear(x, w, b)), x, w1, b1)
    row("linear 3072 -> 768", ops.linear, None, F.linear, h, w2, b2)
    row("logits 768 -> 50265", ops.linear, None, F.linear, x[:32], emb)
    row("LayerNorm (768)", lambda x, g, b: ops.layer_norm(x, g, b, 1e-5), lambda x, g, b: kern.layer_norm(x, g, b, 1e-5),
        lambda x, g, b: F.layer_norm(x, (768,), g, b, 1e-5), 3 * rng.standard_normal((128, 768)) + 0.5, g, b)
    eye = np.eye(3072)
    row("GELU (erf)", ops.gelu, lambda z: kern.linear_act(z, eye.astype(np.float32), np.zeros(3072, np.float32), "gelu"),
        F.gelu, 3 * rng.standard_normal((128, 3072)))
    row("softmax (64 keys)", ops.softmax, lambda s: kern.scaled_masked_softmax(s, None, 1.0), lambda s: torch.softmax(s, -1),
        4 * rng.standard_normal((2, 12, 64, 64)))


def main() -> int:
    torch.set_num_threads(os.cpu_count() or 1)
    if "--ops" in sys.argv[1:]:
        ops_table()
        return 0
    configs = [
        ("tiny random (H16, L2, std 0.5), B2 T16", TINY, 0.5, 0.5, 2, 16, False, True),
        ("tiny random, padded", TINY, 0.5, 0.5, 2, 16, True, True),
        ("roberta-base-shaped L2 (std 0.02), B2 T64", BASE2, 0.02, 0.02, 2, 64, False, True),
        ("roberta-base-shaped L2, padded", BASE2, 0.02, 0.02, 2, 64, True, False),
        ("shipped `--model tiny` (H16, L2, std 0.02), padded", None, 0, 0, 2, 16, True, True),
    ]
    rows = []
    for c in configs:
        rows += run_config(*c)
    print("| configuration | implementation | logits max abs | logits max rel | logits rms | last hidden max abs | "
          "last hidden max rel | needed tol (where) | profile: result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (label, name, la, lr, lrms, ha, hr, need, where, profile, ok, secs) in rows:
        print(f"| {label} | {name} | {la:.1e} | {lr:.1e} | {lrms:.1e} | {ha:.1e} | {hr:.1e} | {need:.1e} ({where}) | "
              f"{profile}: {ok} |")
    print()
    print("profiles: " + "; ".join(f"{k} rtol=atol={v[k]:g}" for k, v in PROFILES.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
