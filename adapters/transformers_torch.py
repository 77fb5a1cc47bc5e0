"""transformers' RobertaPreLayerNorm* PyTorch classes, 4.x and 5.x, as a candidate: forward hooks on
the submodules record each intermediate under its golden name (docs/golden.md, "How the adapters
map"). Needs torch and transformers (``pip install '.[adapters-torch]'`` in a checkout of refimpl), imported only here.

    model = load_transformers("path/to/hf-folder", "masked-lm", "float32")
    tensors = capture(model, **torch_inputs(golden.inputs, "float32"))      # {golden name: array}

The model must use eager attention (sdpa never materialises the probabilities). The two major
versions differ in what the hooks see: 5.x's self-attention module always returns the
probabilities and multiplies the scores by ``module.scaling``; 4.x's returns them only with
``output_attentions=True`` (always passed here) and divides by ``sqrt(attention_head_size)``.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np

from refimpl.params import TASKS
from . import AdapterError, Dump, add_fields, finish, golden_inputs, require

TASK_CLASSES = {task: cls for task, (cls, _, _) in TASKS.items()}
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
          "start_positions", "end_positions", "encoder_hidden_states", "encoder_attention_mask")
OUTPUT_NAMES = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "loss")


def major_version() -> int:
    transformers = require("transformers", "transformers")
    return int(transformers.__version__.split(".")[0])


def load_transformers(folder: str, task: str, dtype: str = "float32"):
    """The transformers class of ``task`` from ``folder``, eager attention, eval mode, in ``dtype``."""
    torch, transformers = require("transformers", "torch", "transformers")
    name = TASK_CLASSES.get(task)
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise AdapterError(f"transformers {transformers.__version__} has no class for task {task!r} ({name})")
    if not os.path.isdir(folder):
        raise AdapterError(f"--model: {folder!r} is not a folder (config.json + weights)")
    dtype_arg = "dtype" if major_version() >= 5 else "torch_dtype"  # 4.x: torch_dtype (dtype came in 4.56)
    quiet(transformers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(folder, attn_implementation="eager", **{dtype_arg: getattr(torch, dtype)})
    return model.eval()


def quiet(transformers) -> None:
    """No progress bars or loading chatter from transformers on the command line."""
    logging = transformers.utils.logging
    logging.set_verbosity_error()
    if hasattr(logging, "disable_progress_bar"):
        logging.disable_progress_bar()


def torch_inputs(inputs: dict[str, np.ndarray], dtype) -> dict:
    """NumPy model inputs -> torch tensors (floating ones in ``dtype``, a torch dtype or its name)."""
    torch = require("transformers", "torch")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out = {}
    for k, v in inputs.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def _heads(x, num_heads: int):
    """[B, T, H] -> [B, N, T, D], the golden layout of q, k, v and the attention context."""
    b, t, h = x.shape
    return x.reshape(b, t, num_heads, h // num_heads).transpose(1, 2)


def capture(model, outputs_only: bool = False, **inputs) -> dict[str, np.ndarray]:
    """Run ``model(**inputs)`` (torch tensors); -> {golden name: array} in the model's dtype, in the
    order computed. With ``outputs_only`` no hooks: the output fields (``hidden_states.{i}``,
    ``attentions.{i}``, ``logits``, ...) as the model returns them."""
    torch = require("transformers", "torch")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise AdapterError("load the model with attn_implementation='eager': sdpa does not return attention probabilities")
    if outputs_only:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
        tensors: dict = {}
        add_fields(tensors, {k: getattr(out, k, None) for k in
                             OUTPUT_NAMES + ("hidden_states", "attentions", "cross_attentions")}, _to_numpy)
        return tensors
    tensors = {}
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
                context, probs = output[0], output[1]  # eager attention: the merged context and the probabilities
                # The scaled scores are eager attention's first line, recomputed from the hooked q, k as the
                # version computes them: 5.x multiplies by module.scaling, 4.x divides by sqrt(head size).
                scores = torch.matmul(tensors[p + "q"], tensors[p + "k"].transpose(2, 3))
                if hasattr(module, "scaling"):
                    scores = scores * module.scaling
                else:
                    scores = scores / math.sqrt(module.attention_head_size)
                put(p + "scores", scores)
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
            out = model(**inputs, output_attentions=True)  # 4.x returns the probabilities only when asked
    finally:
        for h in handles:
            h.remove()
    for name in OUTPUT_NAMES:
        value = getattr(out, name, None)
        if value is not None:
            tensors[name] = value.detach()
    return {k: _to_numpy(v) for k, v in tensors.items()}


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.float().numpy()  # exact; written back as BF16 by write_candidate
    return t.detach().cpu().numpy()


def run(model, golden, *, dtype: str, task: str, outputs_only: bool = False) -> Dump:
    """The adapter: load ``model`` (a folder, or a loaded transformers model) and capture it on the
    golden's inputs."""
    transformers = require("transformers", "transformers")
    if isinstance(model, (str, os.PathLike)):
        model = load_transformers(os.fspath(model), task, dtype)
    inputs = golden_inputs(golden, INPUTS, "transformers")
    torch_dtype = next(p.dtype for p in model.parameters())
    tensors = capture(model, outputs_only=outputs_only, **torch_inputs(inputs, torch_dtype))
    name = str(torch_dtype).replace("torch.", "")
    convention = "5.x" if major_version() >= 5 else "4.x"
    notes = [f"hidden_states follow the transformers {convention} convention: compare with --hidden-states "
             f"{convention}"] if outputs_only and convention == "4.x" else []
    return finish(golden, tensors, [], f"transformers {transformers.__version__} PyTorch ({name})", name,
                  outputs_only=outputs_only, notes=notes, hidden_states=convention)
