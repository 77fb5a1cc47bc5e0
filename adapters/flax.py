"""transformers 4.x FlaxRobertaPreLayerNorm* classes as a candidate: ``capture_intermediates``
records the output of every submodule's ``__call__``, mapped here to golden names. Needs jax, flax
and transformers 4.x (``pip install '.[adapters-flax]'`` in a checkout of refimpl; transformers 5 has no Flax classes),
imported only here.

    model = load_flax("path/to/hf-folder", "masked-lm", "float64")       # enables jax_enable_x64
    tensors = capture(model, input_ids=ids, attention_mask=mask)           # {golden name: array}

Flax records module *outputs* only, so the tensors computed inside a module's ``__call__`` between
two submodules are not available: the embedding sum (the LayerNorm's input), the attention scores
(``dot_product_attention_weights`` scales the query, then returns only the weights), and the heads'
functional steps (the LM head's GELU, the classification head's tanh). The Flax classes compute no
loss. The model's ``dtype`` is the computation dtype: with float64 parameters and a float32 module
dtype every step runs in float32.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from refimpl.params import TASKS
from . import AdapterError, Dump, add_fields, finish, golden_inputs, require, split_heads

TASK_CLASSES = {task: "Flax" + cls for task, (cls, _, _) in TASKS.items()}
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "encoder_hidden_states",
          "encoder_attention_mask", "labels", "start_positions", "end_positions")
LABELS = ("labels", "start_positions", "end_positions")

# Golden names the Flax classes never expose, and why.
NOT_PROVIDED = [
    ("embeddings.sum", "computed inside FlaxRobertaPreLayerNormEmbeddings.__call__: Flax records module outputs, "
                       "not the LayerNorm's input"),
    ("*attention.scores", "dot_product_attention_weights scales the query before the product and returns only "
                          "the probabilities"),
    ("head.gelu", "the LM head's GELU is a function inside FlaxRobertaPreLayerNormLMHead, not a module"),
    ("head.tanh", "the classification head's tanh is a function inside its __call__, not a module"),
    ("loss", "the Flax classes compute no loss"),
]


def load_flax(folder: str, task: str, dtype: str = "float32", param_dtype: str | None = None):
    """The Flax class of ``task`` from ``folder`` (Flax weights, or PyTorch weights converted),
    computing in ``dtype`` with parameters in ``param_dtype`` (default: ``dtype``). float64 turns on
    ``jax_enable_x64`` (a process-wide JAX setting)."""
    jax, jnp, transformers = require("flax", "jax", "jax.numpy", "transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        raise AdapterError(f"transformers {transformers.__version__} has no Flax classes: the flax adapter needs "
                           f"transformers 4.x (pip install '.[adapters-flax]' from a checkout of refimpl, in its own environment)")
    require("flax", "flax")
    if "float64" in (dtype, param_dtype):
        jax.config.update("jax_enable_x64", True)
    cls = getattr(transformers, TASK_CLASSES[task], None)
    if cls is None:
        raise AdapterError(f"transformers {transformers.__version__} has no Flax class for task {task!r}")
    if not os.path.isdir(folder):
        raise AdapterError(f"--model: {folder!r} is not a folder (config.json + weights)")
    from_pt = not os.path.isfile(os.path.join(folder, "flax_model.msgpack"))
    transformers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(folder, from_pt=from_pt, dtype=getattr(jnp, dtype))
    target = getattr(jnp, param_dtype or dtype)
    model.params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, target), model.params)
    return model


def module_kwargs(model, inputs: dict) -> dict:
    """The keyword arguments FlaxRobertaPreLayerNormPreTrainedModel.__call__ passes to its module,
    with its defaults (token types 0, RoBERTa positions, a mask of ones, a head mask of ones)."""
    jnp = require("flax", "jax.numpy")
    from transformers.models.roberta_prelayernorm.modeling_flax_roberta_prelayernorm import (
        create_position_ids_from_input_ids,
    )

    c = model.config
    ids = jnp.asarray(inputs["input_ids"], dtype="i4")
    kw = dict(
        input_ids=ids,
        attention_mask=jnp.asarray(inputs.get("attention_mask", np.ones(ids.shape)), dtype="i4"),
        token_type_ids=jnp.asarray(inputs.get("token_type_ids", np.zeros(ids.shape)), dtype="i4"),
        head_mask=jnp.ones((c.num_hidden_layers, c.num_attention_heads), dtype="i4"),
        deterministic=True, output_attentions=True, output_hidden_states=True, return_dict=True,
    )
    kw["position_ids"] = (jnp.asarray(inputs["position_ids"], dtype="i4") if "position_ids" in inputs
                          else create_position_ids_from_input_ids(ids, c.pad_token_id))
    for name in ("encoder_hidden_states", "encoder_attention_mask"):
        if name in inputs:
            kw[name] = jnp.asarray(inputs[name], dtype=model.dtype if name == "encoder_hidden_states" else "i4")
    return kw


def capture(model, outputs_only: bool = False, **inputs) -> dict[str, np.ndarray]:
    """Run the Flax model on NumPy ``inputs`` with ``capture_intermediates``; -> {golden name: array}
    in forward order (``outputs_only``: the output fields only)."""
    from flax.traverse_util import flatten_dict

    out, state = model.module.apply({"params": model.params}, **module_kwargs(model, inputs),
                                    capture_intermediates=True, mutable=["intermediates"])
    tensors: dict[str, np.ndarray] = {}
    if outputs_only:
        add_fields(tensors, dict(out), _np)
        return tensors
    calls = {k[:-1]: v for k, v in flatten_dict(state["intermediates"]).items() if k[-1] == "__call__"}
    n = model.config.num_attention_heads

    def get(*path, index=0):
        value = calls.get(path)
        if value is None:
            return None
        value = value[0]  # capture_intermediates keeps a tuple of the calls' outputs
        return value[index] if isinstance(value, (tuple, list)) else value

    def put(name, value, heads=False):
        if value is not None:
            v = _np(value)
            tensors[name] = split_heads(v, n) if heads else v

    base = (model.base_model_prefix,) if (model.base_model_prefix, "embeddings") in calls else ()
    e = base + ("embeddings",)
    put("embeddings.word", get(*e, "word_embeddings"))
    put("embeddings.token_type", get(*e, "token_type_embeddings"))
    put("embeddings.position", get(*e, "position_embeddings"))
    put("embeddings.output", get(*e, "LayerNorm"))
    for i in range(model.config.num_hidden_layers):
        layer = base + ("encoder", "layer", str(i))
        for kind in ("attention", "crossattention"):
            a = layer + (kind,)
            if (a + ("LayerNorm",)) not in calls:
                continue
            p = f"layers.{i}.{kind}."
            put(p + "layer_norm", get(*a, "LayerNorm"))
            put(p + "q", get(*a, "self", "query"), heads=True)
            put(p + "k", get(*a, "self", "key"), heads=True)
            put(p + "v", get(*a, "self", "value"), heads=True)
            put(p + "probs", get(*a, "self", index=1))
            put(p + "context", get(*a, "self", index=0), heads=True)
            put(p + "output", get(*a, "output", "dense"))
            put(p + "residual", get(*a, "output"))
        p = f"layers.{i}.ffn."
        put(p + "layer_norm", get(*layer, "intermediate", "LayerNorm"))
        put(p + "pre_activation", get(*layer, "intermediate", "dense"))
        put(p + "activation", get(*layer, "intermediate"))
        put(p + "output", get(*layer, "output", "dense"))
        put(p + "residual", get(*layer, "output"))
    put("final_layer_norm", get(*base, "LayerNorm"))
    put("head.pooler", get(*base, "pooler"))
    if ("lm_head", "dense") in calls:
        put("head.dense", get("lm_head", "dense"))
        put("head.layer_norm", get("lm_head", "layer_norm"))
    if ("classifier", "dense") in calls:  # sequence classification's own head
        put("head.dense", get("classifier", "dense"))
    add_fields(tensors, {k: v for k, v in dict(out).items() if k not in ("hidden_states", "attentions", "cross_attentions")}, _np)
    return tensors


def _np(x) -> np.ndarray:
    return np.asarray(x)


def run(model, golden, *, dtype: str, task: str, outputs_only: bool = False, param_dtype: str | None = None) -> Dump:
    """The adapter: load ``model`` (a folder, or a loaded Flax model) and capture it on the golden's
    inputs (labels are not passed: the Flax classes compute no loss)."""
    transformers = require("flax", "transformers")
    if "inputs_embeds" in golden.inputs:
        raise AdapterError("the Flax classes take no inputs_embeds; write a golden from input_ids")
    if isinstance(model, (str, os.PathLike)):
        model = load_flax(os.fspath(model), task, dtype, param_dtype)
    inputs = {k: v for k, v in golden_inputs(golden, INPUTS, "flax").items() if k not in LABELS}
    tensors = capture(model, outputs_only=outputs_only, **inputs)
    compute = np.dtype(model.dtype).name
    params = sorted({np.dtype(p.dtype).name for p in _leaves(model.params)})
    notes = ["hidden_states follow the transformers 4.x convention: compare with --hidden-states 4.x"] if outputs_only else []
    return finish(golden, tensors, [] if outputs_only else NOT_PROVIDED,
                  f"transformers {transformers.__version__} Flax (computing in {compute}, parameters {'/'.join(params)})",
                  compute, outputs_only=outputs_only, notes=notes, hidden_states="4.x")


def _leaves(tree):
    jax = require("flax", "jax")
    return jax.tree_util.tree_leaves(tree)
