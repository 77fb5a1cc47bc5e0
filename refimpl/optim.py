"""Fine-tuning's optimiser, written out: AdamW, the linear warm-up/decay schedule, global-norm clipping.

Each is the definition torch and transformers use, operation for operation, so that a refimpl
training step and a torch one give the same parameters (tests/test_finetune.py holds five steps to
1e-10 in float64):

- :func:`adamw_update` is ``torch.optim.AdamW`` (the single-tensor path): decoupled weight decay
  ``p <- p (1 - lr wd)`` first, then the moments, bias correction and ``eps`` added *after* the
  square root of the corrected second moment.
- :func:`linear_schedule` is transformers' ``get_linear_schedule_with_warmup`` (a multiplier of
  the base learning rate, 0 at step 0 when there is a warm-up).
- :func:`clip_grad_norm` is ``torch.nn.utils.clip_grad_norm_``: the 2-norm of the per-tensor
  2-norms, every gradient scaled by ``min(1, max_norm / (norm + 1e-6))``.

Parameters and gradients are ``{name: array}`` dicts (transformers' names, as :func:`refimpl.grad`
returns them); a None gradient is a parameter the loss does not read, which torch's optimiser
skips (no decay, no moment update) and so does this one. Everything is pure: new arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np


@dataclass
class AdamWState:
    """Per-parameter optimiser state, as torch keeps it: the step count and both moments."""

    step: dict[str, int] = field(default_factory=dict)
    exp_avg: dict[str, Any] = field(default_factory=dict)  # first moment, like the parameter
    exp_avg_sq: dict[str, Any] = field(default_factory=dict)  # second moment


def adamw_update(param, grad, exp_avg, exp_avg_sq, step: int, *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float):
    """One AdamW step of one tensor (``step`` counts from 1). -> (param, exp_avg, exp_avg_sq).

    p   <- p (1 - lr wd)                                   decoupled weight decay
    m   <- m + (1 - b1) (g - m)                            torch's lerp (weight 1 - b1 < 0.5)
    v   <- b2 v + (1 - b2) g^2
    p   <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """
    param = param * (1.0 - lr * weight_decay)
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * (grad * grad)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    step_size = lr / bias_correction1
    denom = np.sqrt(exp_avg_sq) / math.sqrt(bias_correction2) + eps
    param = param + (-step_size) * exp_avg / denom
    return param, exp_avg, exp_avg_sq


def decays(name: str) -> bool:
    """Whether weight decay applies to a parameter: not to biases nor LayerNorm parameters
    (transformers' Trainer default, ``get_decay_parameter_names``); embeddings do decay."""
    return not (name.endswith("bias") or "LayerNorm." in name or "layer_norm." in name)


def adamw_step(params: Mapping[str, Any], grads: Mapping[str, Any], state: AdamWState, *, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
               decay: Callable[[str], bool] = decays) -> tuple[dict[str, Any], AdamWState]:
    """One AdamW step over every parameter with a gradient. -> (new params, new state).

    ``decay(name)`` says which parameters get ``weight_decay`` (the others 0): the two parameter
    groups a transformers Trainer builds. Defaults are torch's except ``weight_decay`` (torch's
    default is also 0.01).
    """
    beta1, beta2 = betas
    new_params = dict(params)
    new = AdamWState(dict(state.step), dict(state.exp_avg), dict(state.exp_avg_sq))
    for name, g in grads.items():
        if g is None or name not in params:
            continue
        p = params[name]
        step = new.step.get(name, 0) + 1
        m = new.exp_avg.get(name)
        v = new.exp_avg_sq.get(name)
        if m is None:
            m, v = np.zeros_like(p), np.zeros_like(p)
        new_params[name], new.exp_avg[name], new.exp_avg_sq[name] = adamw_update(
            p, g, m, v, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay if decay(name) else 0.0,
        )
        new.step[name] = step
    return new_params, new


def linear_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up from 0 over
    ``warmup_steps``, then linear decay to 0 at ``total_steps`` (transformers'
    ``get_linear_schedule_with_warmup`` under ``torch.optim.lr_scheduler.LambdaLR``)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def global_norm(grads: Mapping[str, Any]) -> float:
    """The 2-norm of all gradients together: the 2-norm of the per-tensor 2-norms (torch's order)."""
    norms = [np.sqrt(np.sum(g * g)) for g in grads.values() if g is not None]
    if not norms:
        return 0.0
    stacked = np.stack(norms)
    return np.sqrt(np.sum(stacked * stacked))


def clip_grad_norm(grads: Mapping[str, Any], max_norm: float) -> tuple[dict[str, Any], Any]:
    """Scale every gradient by ``min(1, max_norm / (total_norm + 1e-6))``
    (``torch.nn.utils.clip_grad_norm_``). -> (clipped gradients, total norm before clipping)."""
    total = global_norm(grads)
    coef = min(1.0, float(max_norm / (total + 1e-6)))
    return {k: None if g is None else g * coef for k, g in grads.items()}, total
