"""Losses, with torch's reductions (``reduction="mean"``) as transformers uses them.

All are computed in the logits' dtype. (transformers' causal-LM loss casts logits to float32
first, which *lowers* precision for a float64 model; refimpl does not: see docs/forward.md.)
"""

from __future__ import annotations

from .backend import namespace
from .ops import log_softmax

IGNORE_INDEX = -100


def cross_entropy(logits, labels, *, ignore_index: int = IGNORE_INDEX):
    """Mean negative log-likelihood over the labels that are not ``ignore_index``.

    logits: [M, K]; labels: [M] integers in [0, K) or ``ignore_index`` -> scalar.
    As in torch, when every label is ignored the mean is 0/0 = NaN.
    """
    xp = namespace(logits)
    m, k = logits.shape
    valid = labels != ignore_index  # [M]
    bad = xp.logical_and(valid, xp.logical_or(labels < 0, labels >= k))
    if bool(xp.any(bad)):
        raise ValueError(
            f"labels must lie in [0, {k}) or equal the ignore index {ignore_index}; "
            f"found {first_flagged(xp, labels, bad)}"
        )
    safe = xp.where(valid, labels, xp.zeros_like(labels))  # [M]
    logp = log_softmax(logits, axis=-1)  # [M, K]
    rows = xp.arange(m, device=getattr(logits, "device", None))
    picked = xp.take(xp.reshape(logp, (-1,)), rows * k + safe)  # [M]: logp[m, label_m]
    n_valid = xp.sum(xp.astype(valid, logits.dtype))
    return -xp.sum(xp.where(valid, picked, xp.zeros_like(picked))) / n_valid


def mse(predictions, targets):
    """``mean((predictions - targets)^2)`` (shapes must match)."""
    xp = namespace(predictions)
    d = predictions - targets
    return xp.mean(d * d)


def bce_with_logits(logits, targets):
    """Binary cross-entropy on logits, mean over every element, stable for large ``|x|``:
    ``max(x, 0) - x*y + log1p(exp(-|x|))``."""
    xp = namespace(logits)
    zero = xp.zeros_like(logits)
    return xp.mean(xp.maximum(logits, zero) - logits * targets + xp.log1p(xp.exp(-xp.abs(logits))))


def causal_lm_loss(logits, labels, *, ignore_index: int = IGNORE_INDEX):
    """Next-token loss: position t predicts label t+1.

    logits: [B, T, V]; labels: [B, T] -> scalar. Labels are shifted left by one and padded with
    ``ignore_index`` at the end (so the last position predicts nothing), as transformers does.
    """
    xp = namespace(logits)
    b, t, v = logits.shape
    pad = xp.full((b, 1), ignore_index, dtype=labels.dtype, device=getattr(labels, "device", None))
    shifted = xp.concat([labels[:, 1:], pad], axis=1)  # [B, T]
    return cross_entropy(xp.reshape(logits, (b * t, v)), xp.reshape(shifted, (-1,)), ignore_index=ignore_index)


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """Question-answering loss: ``(CE(start) + CE(end)) / 2``.

    start/end logits: [B, T]; positions: [B] (or [B, 1]). Positions are clamped to [0, T] and the
    index T (outside the input) is ignored, as transformers does.
    """
    xp = namespace(start_logits)
    t = start_logits.shape[1]
    sp = xp.clip(xp.reshape(start_positions, (-1,)), 0, t)  # [B]
    ep = xp.clip(xp.reshape(end_positions, (-1,)), 0, t)  # [B]
    start = cross_entropy(start_logits, sp, ignore_index=t)
    end = cross_entropy(end_logits, ep, ignore_index=t)
    return (start + end) / 2


def sequence_classification_loss(logits, labels, problem_type: str):
    """The loss ``problem_type`` names (resolved by :mod:`refimpl.inputs` as transformers infers it).

    logits: [B, K]. ``"regression"``: MSE against labels [B] (K = 1) or [B, K];
    ``"single_label_classification"``: cross-entropy against class ids [B];
    ``"multi_label_classification"``: BCE with logits against 0/1 targets [B, K].
    """
    xp = namespace(logits)
    if problem_type == "regression":
        return mse(xp.reshape(logits, labels.shape), labels)  # [B, 1] -> [B] when K = 1
    if problem_type == "single_label_classification":
        return cross_entropy(logits, labels)
    return bce_with_logits(logits, labels)


def first_flagged(xp, labels, bad) -> int:
    flat_bad = xp.reshape(bad, (-1,))
    flat = xp.reshape(labels, (-1,))
    idx = int(xp.argmax(xp.astype(flat_bad, xp.int8)))
    return int(flat[idx])


__all__ = ["cross_entropy", "mse", "bce_with_logits", "causal_lm_loss", "span_loss", "sequence_classification_loss",
           "IGNORE_INDEX", "first_flagged"]
