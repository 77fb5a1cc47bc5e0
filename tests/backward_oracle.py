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
