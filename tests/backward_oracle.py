"""torch autograd as the oracle for refimpl's backward pass (test-only).

``torch_gradients(hf, task, inputs, dtype)`` runs transformers' model on NumPy inputs in ``dtype``
and returns ``(loss, {name: .grad as NumPy or None})`` for every ``named_parameters()`` entry, plus
``inputs_embeds`` / ``encoder_hidden_states`` when those were given. The causal-LM loss is
computed here from transformers' logits with ``torch.nn.functional.cross_entropy`` in the model's
dtype: transformers' own causal-LM loss casts the logits to float32 (docs/forward.md §9), which
would make a float64 oracle a float32 one.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import transformers

import refimpl
from conftest import TASK_CLASSES, randomize_


def build(task: str, cfg: dict, seed: int, std: float = 0.5):
    """A transformers model for ``task`` from config kwargs (eager attention, eval, float64) and the
    refimpl float64 model with the same weights (reference backend)."""
    config = transformers.RobertaPreLayerNormConfig(**cfg)
    config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        hf = getattr(transformers, TASK_CLASSES[task])(config)
    randomize_(hf, seed, std=std)
    hf = hf.eval().double()
    return hf, refimpl_twin(hf, task)


def refimpl_twin(hf, task: str, dtype: str = "float64"):
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}  # own arrays: tests perturb them
    rconfig = refimpl.Config.from_dict(hf.config.to_dict())
    return refimpl.Model(rconfig, refimpl.params_from_state_dict(rconfig, task, state, dtype), task)


def torch_inputs(inputs: dict, dtype: torch.dtype, grad_floats: bool = True) -> dict:
    out = {}
    for k, v in inputs.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if t.is_floating_point():
            t = t.to(dtype)
            if grad_floats and k in ("inputs_embeds", "encoder_hidden_states"):
                t.requires_grad_(True)
        out[k] = t
    return out


def torch_loss(hf, task: str, tin: dict):
    """The task's loss from transformers' forward (the causal-LM loss recomputed in the model's dtype)."""
    if task != "causal-lm":
        return hf(**tin).loss
    labels = tin.pop("labels")
    logits = hf(**tin).logits  # [B, T, V]
    v = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)


def torch_gradients(hf, task: str, inputs: dict, dtype: str = "float64"):
    """-> (loss as NumPy, {name: gradient or None}) from torch autograd, model in ``dtype``."""
    tdtype = getattr(torch, dtype)
    hf = hf.to(tdtype)
    try:
        hf.zero_grad(set_to_none=True)
        tin = torch_inputs(inputs, tdtype)
        loss = torch_loss(hf, task, dict(tin))
        loss.backward()
        grads = {n: None if p.grad is None else p.grad.detach().numpy().copy() for n, p in hf.named_parameters()}
        for k in ("inputs_embeds", "encoder_hidden_states"):
            if k in tin:
                grads[k] = tin[k].grad.detach().numpy().copy()
        return loss.detach().numpy().copy(), grads
    finally:
        hf.zero_grad(set_to_none=True)
        hf.double()


def _heads(g: torch.Tensor, n: int) -> torch.Tensor:
    b, t, h = g.shape
    return g.reshape(b, t, n, h // n).transpose(1, 2)


def torch_gradient_candidate(hf, task: str, inputs: dict, dtype: str = "float64") -> dict[str, np.ndarray]:
    """transformers' gradients under refimpl's golden names: ``grad.<parameter name>`` from
    ``.grad`` and ``grad.<trace name>`` for the intermediates that are module inputs or outputs
    (tensor hooks on them; the scaled scores are not a tensor of transformers' graph and stay out).
    The mapping of modules to names is scripts/dump_transformers_golden.py's."""
    tdtype = getattr(torch, dtype)
    hf = hf.to(tdtype)
    found: dict[str, torch.Tensor] = {}
    handles = []
    n = hf.config.num_attention_heads

    def keep(name, tensor, transform=None):
        def hook(g):
            found[name] = transform(g) if transform else g
        tensor.register_hook(hook)

    def out(module, name, pick=None, transform=None):
        handles.append(module.register_forward_hook(
            lambda m, a, o: keep(name, o if pick is None else o[pick], transform)))

    def inp(module, name):
        handles.append(module.register_forward_pre_hook(lambda m, a: keep(name, a[0])))

    base = getattr(hf, hf.base_model_prefix)
    emb = base.embeddings
    if "input_ids" in inputs:
        out(emb.word_embeddings, "embeddings.word")
    out(emb.token_type_embeddings, "embeddings.token_type")
    out(emb.position_embeddings, "embeddings.position")
    inp(emb.LayerNorm, "embeddings.sum")
    out(emb.LayerNorm, "embeddings.output")
    for i, layer in enumerate(base.encoder.layer):
        blocks = [("attention", layer.attention)]
        if getattr(layer, "crossattention", None) is not None:
            blocks.append(("crossattention", layer.crossattention))
        for kind, block in blocks:
            p = f"layers.{i}.{kind}."
            out(block.LayerNorm, p + "layer_norm")
            for proj in ("query", "key", "value"):
                out(getattr(block.self, proj), p + proj[0], transform=lambda g: _heads(g, n))
            out(block.self, p + "context", pick=0, transform=lambda g: _heads(g, n))
            out(block.self, p + "probs", pick=1)
            out(block.output.dense, p + "output")
            out(block.output, p + "residual")
        p = f"layers.{i}.ffn."
        out(layer.intermediate.LayerNorm, p + "layer_norm")
        out(layer.intermediate.dense, p + "pre_activation")
        out(layer.intermediate, p + "activation")
        out(layer.output.dense, p + "output")
        out(layer.output, p + "residual")
    out(base.LayerNorm, "final_layer_norm")
    if getattr(base, "pooler", None) is not None:
        out(base.pooler, "head.pooler")
    if hasattr(hf, "lm_head"):
        out(hf.lm_head.dense, "head.dense")
        inp(hf.lm_head.layer_norm, "head.gelu")
        out(hf.lm_head.layer_norm, "head.layer_norm")
    classifier = getattr(hf, "classifier", None)
    if classifier is not None and hasattr(classifier, "out_proj"):
        out(classifier.dense, "head.dense")
        inp(classifier.out_proj, "head.tanh")
    def outputs(module, args, kwargs, output):
        for name in ("logits", "start_logits", "end_logits"):
            if getattr(output, name, None) is not None:
                keep(name, getattr(output, name))

    handles.append(hf.register_forward_hook(outputs, with_kwargs=True))
    try:
        hf.zero_grad(set_to_none=True)
        tin = torch_inputs(inputs, tdtype)
        loss = torch_loss(hf, task, dict(tin))
        keep("loss", loss)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    result = {f"grad.{k}": v.detach().numpy().copy() for k, v in found.items()}
    result.update({f"grad.{k}": p.grad.numpy().copy() for k, p in hf.named_parameters() if p.grad is not None})
    if "encoder_hidden_states" in tin:
        result["grad.encoder_hidden_states"] = tin["encoder_hidden_states"].grad.numpy().copy()
    hf.zero_grad(set_to_none=True)
    hf.double()
    return result
