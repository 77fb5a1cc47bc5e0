#!/usr/bin/env python3
"""Dump a transformers RobertaPreLayerNorm forward pass as a refimpl *candidate* file.

A worked example for implementers (docs/golden.md): forward hooks on the submodules record each
intermediate under refimpl's trace names, so that ``refimpl compare GOLDEN CANDIDATE`` can point at
the first tensor where the implementation diverges. Run it on the golden's own inputs:

    refimpl golden --model tiny --text "Hello world" --out golden.safetensors
    python scripts/dump_transformers_golden.py --model tiny --golden golden.safetensors --out candidate.safetensors
    refimpl compare golden.safetensors candidate.safetensors

Only :func:`capture` is specific to transformers; the same pattern (record a named tensor where the
implementation computes it) works for any framework. Needs torch and transformers, which refimpl
itself never imports: ``pip install '.[test]'`` in a checkout of refimpl installs both.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

NEEDS = ("scripts/dump_transformers_golden.py runs transformers as the candidate, so it needs torch and "
         "transformers, which refimpl itself never imports: pip install '.[test]' in a checkout of refimpl")
try:
    import torch
    import transformers  # noqa: F401  (imported here so that a missing one is reported at once)
except ImportError as e:
    if __name__ == "__main__":
        print(f"{os.path.basename(__file__)}: error: {NEEDS} ({e})", file=sys.stderr)
        sys.exit(2)
    raise ImportError(f"{NEEDS} ({e})") from e

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's refimpl
from refimpl.params import TASKS  # noqa: E402  (refimpl's one task table)

TASK_CLASSES = {task: cls for task, (cls, _, _) in TASKS.items()}
OUTPUT_NAMES = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "loss")


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H] -> [B, N, T, D], refimpl's layout for q, k, v and the attention context."""
    b, t, h = x.shape
    return x.reshape(b, t, num_heads, h // num_heads).transpose(1, 2)


def capture(model, **inputs) -> dict[str, np.ndarray]:
    """Run ``model(**inputs)`` (torch tensors) with forward hooks; -> {refimpl name: array} in the
    model's dtype. The model must use eager attention (the attention probabilities are its output)."""
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise ValueError("load the model with attn_implementation='eager': sdpa does not return attention probabilities")
    tensors: dict[str, torch.Tensor] = {}
    handles = []

    def put(name, value):
        tensors[name] = value.detach().clone()

    def on_output(name, transform=None):  # record a module's output
        def hook(module, args, output):
            put(name, transform(output) if transform else output)
        return hook

    def on_input(name):  # record a module's (first) input
        def hook(module, args):
            put(name, args[0])
        return hook

    def fwd(module, name, transform=None):
        handles.append(module.register_forward_hook(on_output(name, transform)))

    def pre(module, name):
        handles.append(module.register_forward_pre_hook(on_input(name)))

    base = getattr(model, model.base_model_prefix, model)
    n = model.config.num_attention_heads
    emb = base.embeddings
    fwd(emb.word_embeddings, "embeddings.word")
    fwd(emb.token_type_embeddings, "embeddings.token_type")
    fwd(emb.position_embeddings, "embeddings.position")
    pre(emb.LayerNorm, "embeddings.sum")  # word + token_type + position, the LayerNorm's input
    fwd(emb.LayerNorm, "embeddings.output")

    for i, layer in enumerate(base.encoder.layer):
        blocks = [("attention", layer.attention)]
        if getattr(layer, "crossattention", None) is not None:
            blocks.append(("crossattention", layer.crossattention))
        for kind, block in blocks:
            p = f"layers.{i}.{kind}."
            fwd(block.LayerNorm, p + "layer_norm")
            fwd(block.self.query, p + "q", lambda y: _heads(y, n))
            fwd(block.self.key, p + "k", lambda y: _heads(y, n))
            fwd(block.self.value, p + "v", lambda y: _heads(y, n))

            def attention_done(module, args, output, p=p):
                context, probs = output  # eager attention returns the merged context and the probabilities
                # The scaled scores are eager_attention_forward's first line; recomputed from the hooked q, k.
                put(p + "scores", torch.matmul(tensors[p + "q"], tensors[p + "k"].transpose(2, 3)) * module.scaling)
                put(p + "probs", probs)
                put(p + "context", _heads(context, n))

            handles.append(block.self.register_forward_hook(attention_done))
            fwd(block.output.dense, p + "output")
            fwd(block.output, p + "residual")  # dense + dropout + the block input
        p = f"layers.{i}.ffn."
        fwd(layer.intermediate.LayerNorm, p + "layer_norm")
        fwd(layer.intermediate.dense, p + "pre_activation")
        fwd(layer.intermediate, p + "activation")
        fwd(layer.output.dense, p + "output")
        fwd(layer.output, p + "residual")

    fwd(base.LayerNorm, "final_layer_norm")
    if getattr(base, "pooler", None) is not None:
        fwd(base.pooler, "head.pooler")
    if hasattr(model, "lm_head"):
        fwd(model.lm_head.dense, "head.dense")
        pre(model.lm_head.layer_norm, "head.gelu")
        fwd(model.lm_head.layer_norm, "head.layer_norm")
    classifier = getattr(model, "classifier", None)
    if classifier is not None and hasattr(classifier, "out_proj"):  # sequence classification's own head
        fwd(classifier.dense, "head.dense")
        pre(classifier.out_proj, "head.tanh")

    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    for name in OUTPUT_NAMES:
        value = getattr(out, name, None)
        if value is not None:
            tensors[name] = value.detach()
    return {k: _to_numpy(v) for k, v in tensors.items()}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy()  # exact; written back as BF16 by write_candidate
    return t.cpu().numpy()


def torch_inputs(inputs: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """NumPy model inputs -> torch tensors (floating ones in the model's dtype)."""
    out = {}
    for k, v in inputs.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def write_candidate(path: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> None:
    """Write the captured tensors as safetensors in ``dtype`` (float32, float16 or bfloat16)."""
    from refimpl.golden import save_tensors

    if dtype == "bfloat16":
        bits = {k: float32_to_bf16_bits(v) for k, v in tensors.items()}
        save_tensors(path, bits, dtypes={k: "BF16" for k in bits})
    else:
        save_tensors(path, {k: np.asarray(v, dtype=dtype) for k, v in tensors.items()})


def float32_to_bf16_bits(x) -> np.ndarray:
    """float32 -> the bits of the nearest bfloat16 (round to nearest even; NaN stays NaN), as uint16."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def load_transformers(folder: str, task: str, dtype: str = "float32"):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = getattr(transformers, TASK_CLASSES[task])
        model = cls.from_pretrained(folder, attn_implementation="eager", dtype=getattr(torch, dtype))
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face folder (config.json + weights), 'tiny' or a Hub id")
    ap.add_argument("--golden", required=True, help="the golden file whose inputs to run")
    ap.add_argument("--out", required=True, help="the candidate safetensors file to write")
    ap.add_argument("--task", default=None, help="default: the golden's task")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    args = ap.parse_args(argv)

    from refimpl.golden import read_golden
    from refimpl.hub import resolve

    golden = read_golden(args.golden)
    task = args.task or golden.task
    model = load_transformers(resolve(args.model), task, args.dtype)
    tensors = capture(model, **torch_inputs(golden.inputs, getattr(torch, args.dtype)))
    write_candidate(args.out, tensors, args.dtype)
    print(f"wrote {len(tensors)} tensors ({args.dtype}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
