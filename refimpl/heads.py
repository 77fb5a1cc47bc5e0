"""The task heads on top of the final hidden states. Each is a few lines of linear algebra.

sequence: [B, T, H] is the encoder output after the final LayerNorm throughout.
"""

from __future__ import annotations

from .backend import namespace
from .ops import gelu, layer_norm, linear
from .params import ClassificationHead, LMHead, Linear
from .tracing import Trace, record


def pooler(sequence, p: Linear, *, trace: Trace | None = None):
    """``tanh(W · h_<s> + b)`` on the first token. [B, T, H] -> [B, H]."""
    xp = namespace(sequence)
    return record(trace, "pooler", xp.tanh(linear(sequence[:, 0, :], p.weight, p.bias)))


def lm_head(sequence, p: LMHead, *, eps: float, trace: Trace | None = None):
    """Masked/causal LM head: dense -> exact GELU -> LayerNorm -> tied decoder + bias.

    [..., H] -> [..., V]. The decoder weight is the word-embedding matrix [V, H] unless the config
    unties it; the GELU is always the exact erf form, whatever ``hidden_act`` says.
    """
    x = record(trace, "dense", linear(sequence, p.dense.weight, p.dense.bias))  # [..., H]
    x = record(trace, "gelu", gelu(x))  # [..., H]
    x = record(trace, "layer_norm", layer_norm(x, p.layer_norm.weight, p.layer_norm.bias, eps))  # [..., H]
    return linear(x, p.decoder_weight, p.bias)  # [..., V]


def classification_head(sequence, p: ClassificationHead, *, trace: Trace | None = None):
    """Sequence classification on ``<s>``: dense -> tanh -> out_proj (not the pooler).

    [B, T, H] -> [B, num_labels].
    """
    xp = namespace(sequence)
    x = record(trace, "dense", linear(sequence[:, 0, :], p.dense.weight, p.dense.bias))  # [B, H]
    x = record(trace, "tanh", xp.tanh(x))  # [B, H]
    return linear(x, p.out_proj.weight, p.out_proj.bias)  # [B, num_labels]


def token_classification_head(sequence, p: Linear):
    """A linear layer per token. [B, T, H] -> [B, T, num_labels]."""
    return linear(sequence, p.weight, p.bias)


def question_answering_head(sequence, p: Linear):
    """Span logits. [B, T, H] -> start [B, T], end [B, T] (``num_labels`` must be 2)."""
    logits = linear(sequence, p.weight, p.bias)  # [B, T, 2]
    return logits[..., 0], logits[..., 1]


def multiple_choice_head(pooled, p: Linear, num_choices: int):
    """One score per choice from the pooler output. [B*C, H] -> [B, C]."""
    xp = namespace(pooled)
    scores = linear(pooled, p.weight, p.bias)  # [B*C, 1]
    return xp.reshape(scores, (-1, num_choices))  # [B, C]
