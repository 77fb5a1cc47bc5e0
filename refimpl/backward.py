"""The backward pass, written out: one backward function beside each forward function.

llm.c's ``train_gpt2.c`` is the model: ``layernorm_backward`` next to ``layernorm_forward``, each
checked against PyTorch. Here every forward step of the reference (``refimpl.ops``,
``embeddings``, ``attention``, ``encoder``, ``heads``, ``losses``) has a backward function that
takes the gradient of the loss with respect to its output and returns the gradients with respect to
its inputs and parameters. docs/backward.md derives each equation beside the function.

**What a backward function keeps.** Nothing hidden: the arrays a step needs from its forward are
its arguments. They are the tensors the reference forward records when a :class:`~refimpl.Trace`
is attached (the names of docs/golden.md); cheap statistics are recomputed rather than stored
(LayerNorm's mean and 1/std from the recorded input, exactly as the forward computes them). The
per-block records (:class:`AttentionSaved`, :class:`FeedForwardSaved`, :class:`LMHeadSaved`, ...)
are built from the trace by small functions that name the trace entries they read.

**The composition.** :func:`gradients` runs the reference forward with a trace, then
:func:`backward` walks the graph in reverse: loss -> head -> final LayerNorm -> blocks L-1 .. 0
-> embeddings. :func:`grad` (``refimpl.grad``) returns the gradients under transformers' parameter
names. Dropout is not part of the reference (it is the identity at inference); a training step
here is transformers' training step with dropout probabilities 0.

Everything is NumPy, in the parameters' dtype (float32 or float64). Shape legend: B batch,
C choices, T query length, S key length, H hidden, N heads, D = H/N, I intermediate, V vocab,
K labels, L layers, R rows (all leading axes flattened).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import numpy as np

from .backend import erf
from .config import Config
from .inputs import Inputs, validate
from .losses import IGNORE_INDEX
from .ops import gelu, log_softmax, sigmoid, softplus
from .params import (
    TASKS,
    Attention,
    ClassificationHead,
    Embeddings,
    LayerNorm,
    Layer,
    Linear,
    LMHead,
    Params,
    hf_key_table,
    iter_leaves,
)
from .tasks import FORWARD
from .tracing import Trace, record, scope

# Keys of grad()'s result that are not parameters.
INPUTS_EMBEDS_KEY = "inputs_embeds"
ENCODER_STATES_KEY = "encoder_hidden_states"
# Golden gradients (docs/golden.md): grad.<trace name> and grad.<transformers parameter name>.
GRAD_PREFIX = "grad."


class GradientError(ValueError):
    """A call that has no gradient to compute (no loss, a KV cache); the message says what to pass."""


# =============================================================================================
# 1. Elementary operations (refimpl.ops)
# =============================================================================================


def linear_backward(dy, x, weight):
    """Backward of ``y = x W^T + b`` (``ops.linear``).

    dy: [..., out]; x: [..., in] (the forward's input); weight: [out, in]
    -> dx [..., in], dweight [out, in], dbias [out]. Every leading position contributes to
    dweight and dbias (summed over R = all leading axes).
    """
    n_out, n_in = weight.shape
    dy_rows = dy.reshape(-1, n_out)  # [R, out]
    x_rows = x.reshape(-1, n_in)  # [R, in]
    dx = (dy_rows @ weight).reshape(*dy.shape[:-1], n_in)  # [R, out] @ [out, in] -> [..., in]
    dweight = dy_rows.T @ x_rows  # [out, R] @ [R, in] -> [out, in]
    dbias = dy_rows.sum(axis=0)  # [out]
    return dx, dweight, dbias


def layer_norm_backward(dy, x, weight, eps: float):
    """Backward of ``y = (x - mean) / sqrt(var + eps) * weight + bias`` (``ops.layer_norm``).

    dy, x: [..., H]; weight: [H] -> dx [..., H], dweight [H], dbias [H]. Keeps only the input x:
    mean and 1/std are recomputed from it the way the forward computes them (two passes).
    With g = dy * weight and xhat the normalised input:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    """
    h = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    centred = x - mean  # [..., H]
    rstd = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)  # [..., 1]
    xhat = centred * rstd  # [..., H]
    dweight = (dy * xhat).reshape(-1, h).sum(axis=0)  # [H]
    dbias = dy.reshape(-1, h).sum(axis=0)  # [H]
    g = dy * weight  # dL/dxhat, [..., H]
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))  # [..., H]
    return dx, dweight, dbias


def softmax_backward(dp, p):
    """Backward of ``p = softmax(s)`` over the last axis, from the output p.

    dp, p: [..., S] -> ds [..., S] = p * (dp - sum(dp * p)). An additive constant in s (the
    attention mask) changes nothing here: the gradient reaches the scores unchanged.
    """
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def log_softmax_backward(dlogp, logp):
    """Backward of ``logp = log_softmax(x)`` (``ops.log_softmax``) from its output.

    dlogp, logp: [..., K] -> dx [..., K] = dlogp - exp(logp) * sum(dlogp).
    """
    return dlogp - np.exp(logp) * dlogp.sum(axis=-1, keepdims=True)


def tanh_backward(dy, y):
    """Backward of ``y = tanh(x)`` from its output: dx = dy * (1 - y^2)."""
    return dy * (1.0 - y * y)


# ---------------------------------------------------------------------------------------------
# Activations: d act / dx for every name of ops.ACTIVATIONS, at the same points torch uses
# (relu'(0) = 0, relu6'(0) = relu6'(6) = 0, leaky_relu'(0) = 0.01, hardswish'(-3) = 0, ...).
# ---------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_grad(x):
    """Exact GELU: ``Phi(x) + x phi(x)`` (the normal CDF and density)."""
    cdf = 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf


def _tanh_gelu_grad(x, c: float):
    """d/dx of ``0.5 x (1 + tanh(c (x + 0.044715 x^3)))`` (c = sqrt(2/pi) or its 10-digit value)."""
    t = np.tanh(c * (x + 0.044715 * (x * x * x)))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)


def gelu_tanh_grad(x):
    """``gelu_new`` / ``gelu_pytorch_tanh`` / ``gelu_accurate``: the tanh approximation."""
    return _tanh_gelu_grad(x, _SQRT_2_OVER_PI)


def gelu_fast_grad(x):
    """``gelu_fast``: the tanh approximation with the constant 0.7978845608."""
    return _tanh_gelu_grad(x, 0.7978845608)


def gelu_10_grad(x):
    """``gelu_10`` = clip(gelu(x), -10, 10): GELU's slope where the clip lets the value through
    (bounds included, as torch's clamp backward)."""
    y = gelu(x)
    return np.where((y >= -10.0) & (y <= 10.0), gelu_grad(x), np.zeros_like(x))


def hardswish_grad(x):
    """``x relu6(x + 3) / 6``: 0 up to -3, ``x/3 + 1/2`` strictly between, 1 from 3 on (torch's
    branches: hardswish'(-3) = 0 and hardswish'(3) = 1, the outer one-sided slopes)."""
    return np.where(x <= -3.0, np.zeros_like(x), np.where(x < 3.0, x / 3.0 + 0.5, np.ones_like(x)))


def laplace_grad(x):
    """``0.5 (1 + erf((x - mu) / (sigma sqrt 2)))``: the normal density ``N(mu, sigma^2)`` at x."""
    mu, sigma = 0.707107, 0.282095
    z = (x - mu) / (sigma * math.sqrt(2.0))
    return np.exp(-z * z) * (_INV_SQRT_2PI / sigma)


def leaky_relu_grad(x):
    return np.where(x > 0, np.ones_like(x), np.full_like(x, 0.01))


def identity_grad(x):
    return np.ones_like(x)


def mish_grad(x):
    """``x tanh(softplus(x))``: ``tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2)``."""
    t = np.tanh(softplus(x))
    return t + x * sigmoid(x) * (1.0 - t * t)


def quick_gelu_grad(x):
    """``x sigmoid(1.702 x)``: ``s + 1.702 x s (1 - s)``."""
    s = sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


def relu_grad(x):
    return np.where(x > 0, np.ones_like(x), np.zeros_like(x))


def relu2_grad(x):
    """``relu(x)^2``: ``2 relu(x)``."""
    return 2.0 * np.where(x > 0, x, np.zeros_like(x))


def relu6_grad(x):
    """``clip(x, 0, 6)`` is torch's hardtanh(0, 6): slope 1 strictly inside, 0 at and beyond the bounds."""
    return np.where((x > 0.0) & (x < 6.0), np.ones_like(x), np.zeros_like(x))


def sigmoid_grad(x):
    s = sigmoid(x)
    return s * (1.0 - s)


def silu_grad(x):
    """``x sigmoid(x)``: ``s (1 + x (1 - s))``."""
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def softplus_grad(x):
    """``log(1 + exp(x))`` with torch's threshold 20: ``e^x / (1 + e^x)``, and 1 where x > 20."""
    z = np.exp(np.minimum(x, 20.0))
    return np.where(x > 20.0, np.ones_like(x), z / (z + 1.0))


def sqrtsoftplus_grad(x):
    """``sqrt(softplus(x))``: ``softplus'(x) / (2 sqrt(softplus(x)))``."""
    return softplus_grad(x) / (2.0 * np.sqrt(softplus(x)))


def tanh_grad(x):
    t = np.tanh(x)
    return 1.0 - t * t


# hidden_act -> d act / dx, one entry per key of refimpl.ops.ACTIVATIONS (a test holds them equal).
ACTIVATION_GRADS: dict[str, Callable] = {
    "gelu": gelu_grad,
    "gelu_python": gelu_grad,
    "gelu_10": gelu_10_grad,
    "gelu_fast": gelu_fast_grad,
    "gelu_new": gelu_tanh_grad,
    "gelu_pytorch_tanh": gelu_tanh_grad,
    "gelu_python_tanh": gelu_tanh_grad,
    "gelu_accurate": gelu_tanh_grad,
    "hardswish": hardswish_grad,
    "laplace": laplace_grad,
    "leaky_relu": leaky_relu_grad,
    "linear": identity_grad,
    "mish": mish_grad,
    "quick_gelu": quick_gelu_grad,
    "relu": relu_grad,
    "relu2": relu2_grad,
    "relu6": relu6_grad,
    "sigmoid": sigmoid_grad,
    "silu": silu_grad,
    "swish": silu_grad,
    "sqrtsoftplus": sqrtsoftplus_grad,
    "tanh": tanh_grad,
}


def activation_backward(name: str, dy, x):
    """Backward of ``y = act(x)`` for ``hidden_act`` ``name``: dx = dy * act'(x) (x: the forward's input)."""
    with np.errstate(over="ignore"):  # exp overflow in branches that np.where discards
        return dy * ACTIVATION_GRADS[name](x)


# =============================================================================================
# 2. Embeddings (refimpl.embeddings)
# =============================================================================================


def lookup_backward(d_rows, ids, num_rows: int, padding_idx: int | None = None):
    """Backward of ``rows = table[ids]`` (``embeddings.lookup``): a scatter-add into the table.

    d_rows: [..., H]; ids: [...] -> dtable [num_rows, H]. A row looked up k times receives the sum
    of its k gradients. Rows at ``padding_idx`` receive nothing, as ``nn.Embedding(padding_idx=...)``
    (RoBERTa's word and position tables: pad tokens and pad positions do not train the pad row).
    """
    h = d_rows.shape[-1]
    flat_ids = ids.reshape(-1)  # [R]
    flat = d_rows.reshape(-1, h)  # [R, H]
    if padding_idx is not None:
        keep = flat_ids != padding_idx
        flat_ids, flat = flat_ids[keep], flat[keep]
    dtable = np.zeros((num_rows, h), dtype=d_rows.dtype)  # [num_rows, H]
    np.add.at(dtable, flat_ids, flat)
    return dtable


class EmbeddingsSaved(NamedTuple):
    """What the embedding backward needs: the LayerNorm's input and the three id arrays."""

    summed: Any  # [B, T, H] (word + token_type) + position          trace: embeddings.sum
    input_ids: Any  # [B, T] ints, or None when inputs_embeds were given
    token_type_ids: Any  # [B, T] ints (zeros when not given)
    position_ids: Any  # [B, T] ints (RoBERTa positions, or as given)


def embed_backward(d_out, s: EmbeddingsSaved, p: Embeddings, *, eps: float, pad_token_id: int | None,
                   trace: Trace | None = None):
    """Backward of ``LayerNorm((word[ids] + token_type[tt]) + position[pos])`` (``embeddings.embed``).

    d_out: [B, T, H] -> (d_word [B, T, H]: the gradient of the looked-up word rows, which is the
    gradient of ``inputs_embeds`` when those were given; Embeddings of gradients: the word table's
    from the lookup only (None with inputs_embeds), position and token-type tables, LayerNorm).
    """
    record(trace, "output", d_out)
    d_sum, d_gamma, d_beta = layer_norm_backward(d_out, s.summed, p.layer_norm.weight, eps)  # [B, T, H]
    record(trace, "sum", d_sum)
    # A sum passes its gradient to every term unchanged.
    record(trace, "position", d_sum)
    record(trace, "token_type", d_sum)
    record(trace, "word", d_sum)
    d_position = lookup_backward(d_sum, s.position_ids, p.position.shape[0], padding_idx=pad_token_id)
    d_token_type = lookup_backward(d_sum, s.token_type_ids, p.token_type.shape[0])
    d_word = None
    if s.input_ids is not None:
        d_word = lookup_backward(d_sum, s.input_ids, p.word.shape[0], padding_idx=pad_token_id)
    return d_sum, Embeddings(d_word, d_position, d_token_type, LayerNorm(d_gamma, d_beta))


# =============================================================================================
# 3. Attention (refimpl.attention)
# =============================================================================================


def split_heads(x, num_heads: int):
    """[B, T, H] -> [B, N, T, D] (as ``attention.split_heads``)."""
    b, t, h = x.shape
    return x.reshape(b, t, num_heads, h // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, N, T, D] -> [B, T, H] (as ``attention.merge_heads``)."""
    b, n, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, n * d)


class AttentionGrads(NamedTuple):
    dq: Any  # [B, N, T, D]
    dk: Any  # [B, N, S, D]
    dv: Any  # [B, N, S, D]
    dscores: Any  # [B, N, T, S] gradient of the scaled scores (before or after the mask: the same)
    dprobs: Any  # [B, N, T, S]


def scaled_dot_product_attention_backward(dcontext, q, k, v, probs) -> AttentionGrads:
    """Backward of ``context = softmax(q k^T * D^-0.5 + bias) v``.

    dcontext, q: [B, N, T, D]; k, v: [B, N, S, D]; probs: [B, N, T, S] (the forward's softmax
    output, which already holds the mask). The bias is a constant: no gradient. A fully masked row
    has uniform probabilities (docs/forward.md §4); its gradient is this same formula on them, as
    torch computes it.
    """
    scale = q.shape[-1] ** -0.5
    dprobs = dcontext @ v.swapaxes(-1, -2)  # [B, N, T, D] @ [B, N, D, S] -> [B, N, T, S]
    dv = probs.swapaxes(-1, -2) @ dcontext  # [B, N, S, T] @ [B, N, T, D] -> [B, N, S, D]
    dscores = softmax_backward(dprobs, probs)  # [B, N, T, S]
    draw = dscores * scale  # the gradient of q k^T (before the scale)
    dq = draw @ k  # [B, N, T, S] @ [B, N, S, D] -> [B, N, T, D]
    dk = draw.swapaxes(-1, -2) @ q  # [B, N, S, T] @ [B, N, T, D] -> [B, N, S, D]
    return AttentionGrads(dq, dk, dv, dscores, dprobs)


class AttentionSaved(NamedTuple):
    """What one attention sub-block's backward needs (trace names relative to its scope)."""

    x: Any  # [B, T, H] the block input: the residual stream before the block
    h: Any  # [B, T, H] LayerNorm(x)                                   layer_norm
    source: Any  # [B, S, H] what k and v were projected from: h (self) or the encoder states (cross)
    q: Any  # [B, N, T, D]                                             q
    k: Any  # [B, N, S, D]                                             k
    v: Any  # [B, N, S, D]                                             v
    probs: Any  # [B, N, T, S]                                         probs
    context: Any  # [B, N, T, D]                                       context


def attention_block_backward(d_out, s: AttentionSaved, p: Attention, *, eps: float, cross: bool = False,
                             trace: Trace | None = None):
    """Backward of ``x' = x + W_o merge(attention(LN(x))) + b_o`` (``attention.attention_block``).

    d_out: [B, T, H], the gradient of x' -> (dx [B, T, H]; d_source [B, S, H] for cross-attention
    (the gradient of the encoder states through this block's k and v), None for self-attention,
    where k and v come from LN(x) and their gradient is part of dx; Attention of gradients).
    """
    n = s.q.shape[1]
    record(trace, "residual", d_out)
    record(trace, "output", d_out)  # the residual add passes d_out to the branch unchanged
    d_merged, d_wo, d_bo = linear_backward(d_out, merge_heads(s.context), p.output.weight)  # [B, T, H]
    d_context = record(trace, "context", split_heads(d_merged, n))  # [B, N, T, D]
    g = scaled_dot_product_attention_backward(d_context, s.q, s.k, s.v, s.probs)
    record(trace, "probs", g.dprobs)
    record(trace, "scores", g.dscores)
    record(trace, "v", g.dv)
    record(trace, "k", g.dk)
    record(trace, "q", g.dq)
    dh, d_wq, d_bq = linear_backward(merge_heads(g.dq), s.h, p.query.weight)  # [B, T, H]
    d_src_k, d_wk, d_bk = linear_backward(merge_heads(g.dk), s.source, p.key.weight)  # [B, S, H]
    d_src_v, d_wv, d_bv = linear_backward(merge_heads(g.dv), s.source, p.value.weight)  # [B, S, H]
    d_source = d_src_k + d_src_v
    if not cross:
        dh = dh + d_source  # self-attention: q, k and v all read LN(x)
        d_source = None
    record(trace, "layer_norm", dh)
    dx_ln, d_gamma, d_beta = layer_norm_backward(dh, s.x, p.layer_norm.weight, eps)  # [B, T, H]
    dx = d_out + dx_ln  # the skip path and the LayerNorm path
    grads = Attention(LayerNorm(d_gamma, d_beta), Linear(d_wq, d_bq), Linear(d_wk, d_bk), Linear(d_wv, d_bv),
                      Linear(d_wo, d_bo))
    return dx, d_source, grads


def attention_saved(tensors: dict, prefix: str, x, encoder_states=None) -> AttentionSaved:
    """The record of the attention sub-block traced under ``prefix`` (``layers.0.attention.``),
    whose input was ``x``; ``encoder_states`` for cross-attention."""
    h = tensors[prefix + "layer_norm"]
    return AttentionSaved(
        x, h, h if encoder_states is None else encoder_states, tensors[prefix + "q"], tensors[prefix + "k"],
        tensors[prefix + "v"], tensors[prefix + "probs"], tensors[prefix + "context"],
    )


# =============================================================================================
# 4. The feed-forward sub-block, the pre-LN block and the stack (refimpl.encoder)
# =============================================================================================


class FeedForwardSaved(NamedTuple):
    """What the FFN sub-block's backward needs (trace names under ``layers.{i}.ffn.``)."""

    x: Any  # [B, T, H] the block input (the attention sub-block's residual)
    h: Any  # [B, T, H] LayerNorm(x)                                   layer_norm
    pre: Any  # [B, T, I] W_1 h + b_1                                  pre_activation
    act: Any  # [B, T, I] act(pre)                                     activation


class FeedForwardGrads(NamedTuple):
    ffn_layer_norm: LayerNorm
    intermediate: Linear
    output: Linear


def feed_forward_block_backward(d_out, s: FeedForwardSaved, p: Layer, *, act: str, eps: float,
                                trace: Trace | None = None):
    """Backward of ``x' = x + W_2 act(W_1 LN(x) + b_1) + b_2`` (``encoder.feed_forward_block``).

    d_out: [B, T, H] -> (dx [B, T, H], FeedForwardGrads).
    """
    record(trace, "residual", d_out)
    record(trace, "output", d_out)
    d_act, d_w2, d_b2 = linear_backward(d_out, s.act, p.output.weight)  # [B, T, I]
    record(trace, "activation", d_act)
    d_pre = record(trace, "pre_activation", activation_backward(act, d_act, s.pre))  # [B, T, I]
    dh, d_w1, d_b1 = linear_backward(d_pre, s.h, p.intermediate.weight)  # [B, T, H]
    record(trace, "layer_norm", dh)
    dx_ln, d_gamma, d_beta = layer_norm_backward(dh, s.x, p.ffn_layer_norm.weight, eps)
    return d_out + dx_ln, FeedForwardGrads(LayerNorm(d_gamma, d_beta), Linear(d_w1, d_b1), Linear(d_w2, d_b2))


class LayerSaved(NamedTuple):
    attention: AttentionSaved
    crossattention: AttentionSaved | None
    ffn: FeedForwardSaved


def layer_saved(tensors: dict, i: int, x, encoder_states=None) -> LayerSaved:
    """The record of block ``i`` (input ``x`` [B, T, H]) from the forward trace."""
    p = f"layers.{i}."
    att = attention_saved(tensors, p + "attention.", x)
    y = tensors[p + "attention.residual"]
    cross = None
    if p + "crossattention.q" in tensors:
        cross = attention_saved(tensors, p + "crossattention.", y, encoder_states)
        y = tensors[p + "crossattention.residual"]
    ffn = FeedForwardSaved(y, tensors[p + "ffn.layer_norm"], tensors[p + "ffn.pre_activation"], tensors[p + "ffn.activation"])
    return LayerSaved(att, cross, ffn)


def transformer_layer_backward(d_out, s: LayerSaved, p: Layer, config: Config, *, trace: Trace | None = None):
    """Backward of one pre-LN block (``encoder.transformer_layer``), the sub-blocks in reverse.

    d_out: [B, T, H] -> (dx [B, T, H], d_encoder_states [B, S_enc, H] or None, Layer of gradients).
    """
    eps = config.layer_norm_eps
    dx, f = feed_forward_block_backward(d_out, s.ffn, p, act=config.hidden_act, eps=eps, trace=scope(trace, "ffn"))
    d_enc, cross = None, None
    if s.crossattention is not None:
        dx, d_enc, cross = attention_block_backward(dx, s.crossattention, p.crossattention, eps=eps, cross=True,
                                                    trace=scope(trace, "crossattention"))
    dx, _, att = attention_block_backward(dx, s.attention, p.attention, eps=eps, trace=scope(trace, "attention"))
    return dx, d_enc, Layer(att, cross, f.ffn_layer_norm, f.intermediate, f.output)


# =============================================================================================
# 5. Heads (refimpl.heads)
# =============================================================================================


class LMHeadSaved(NamedTuple):
    """What the LM head's backward needs (trace names under ``head.``)."""

    sequence: Any  # [..., H] the final-LayerNorm output it reads          final_layer_norm
    dense: Any  # [..., H] dense(sequence)                                  head.dense
    gelu: Any  # [..., H] gelu(dense)                                       head.gelu
    layer_norm: Any  # [..., H] LayerNorm(gelu)                             head.layer_norm


def lm_head_backward(d_logits, s: LMHeadSaved, p: LMHead, *, eps: float, trace: Trace | None = None):
    """Backward of dense -> exact GELU -> LayerNorm -> ``W_dec^T`` + bias (``heads.lm_head``).

    d_logits: [..., V] -> (d_sequence [..., H], LMHead of gradients; its ``decoder_weight`` is the
    decoder's own part, which a tied model adds to the word-embedding gradient).
    """
    d_ln, d_dec, d_bias = linear_backward(d_logits, s.layer_norm, p.decoder_weight)  # [..., H], [V, H], [V]
    record(trace, "layer_norm", d_ln)
    d_gelu, d_gamma, d_beta = layer_norm_backward(d_ln, s.gelu, p.layer_norm.weight, eps)
    record(trace, "gelu", d_gelu)
    d_dense = record(trace, "dense", activation_backward("gelu", d_gelu, s.dense))
    d_seq, d_w, d_b = linear_backward(d_dense, s.sequence, p.dense.weight)
    return d_seq, LMHead(Linear(d_w, d_b), LayerNorm(d_gamma, d_beta), d_dec, d_bias)


def first_token_backward(d_first, sequence):
    """Backward of ``sequence[:, 0, :]``: [B, H] -> [B, T, H], zero at every other position."""
    d_seq = np.zeros_like(sequence)  # [B, T, H]
    d_seq[:, 0, :] = d_first
    return d_seq


def classification_head_backward(d_logits, sequence, tanh_out, p: ClassificationHead, *, trace: Trace | None = None):
    """Backward of dense -> tanh -> out_proj on token 0 (``heads.classification_head``).

    d_logits: [B, K]; sequence: [B, T, H]; tanh_out: [B, H] (trace ``head.tanh``)
    -> (d_sequence [B, T, H], ClassificationHead of gradients).
    """
    d_tanh, d_wo, d_bo = linear_backward(d_logits, tanh_out, p.out_proj.weight)  # [B, H]
    record(trace, "tanh", d_tanh)
    d_dense = record(trace, "dense", tanh_backward(d_tanh, tanh_out))  # [B, H]
    d_first, d_w, d_b = linear_backward(d_dense, sequence[:, 0, :], p.dense.weight)  # [B, H]
    return first_token_backward(d_first, sequence), ClassificationHead(Linear(d_w, d_b), Linear(d_wo, d_bo))


def pooler_backward(d_pooled, sequence, pooled, p: Linear, *, trace: Trace | None = None):
    """Backward of ``tanh(W h_0 + b)`` (``heads.pooler``). d_pooled, pooled: [B, H]; sequence:
    [B, T, H] -> (d_sequence [B, T, H], Linear of gradients)."""
    record(trace, "pooler", d_pooled)
    d_pre = tanh_backward(d_pooled, pooled)  # [B, H]
    d_first, d_w, d_b = linear_backward(d_pre, sequence[:, 0, :], p.weight)
    return first_token_backward(d_first, sequence), Linear(d_w, d_b)


def token_classification_head_backward(d_logits, sequence, p: Linear):
    """Backward of one linear layer per token. d_logits: [B, T, K] -> (d_sequence [B, T, H], Linear)."""
    d_seq, d_w, d_b = linear_backward(d_logits, sequence, p.weight)
    return d_seq, Linear(d_w, d_b)


def question_answering_head_backward(d_start, d_end, sequence, p: Linear):
    """Backward of ``linear(sequence) -> [..., 0], [..., 1]``. d_start, d_end: [B, T]
    -> (d_sequence [B, T, H], Linear)."""
    d_logits = np.stack([d_start, d_end], axis=-1)  # [B, T, 2]
    d_seq, d_w, d_b = linear_backward(d_logits, sequence, p.weight)
    return d_seq, Linear(d_w, d_b)


def multiple_choice_head_backward(d_logits, pooled, p: Linear):
    """Backward of ``linear(pooled).reshape(B, C)``. d_logits: [B, C]; pooled: [B*C, H]
    -> (d_pooled [B*C, H], Linear)."""
    d_scores = d_logits.reshape(-1, 1)  # [B, C] -> [B*C, 1]
    d_pooled, d_w, d_b = linear_backward(d_scores, pooled, p.weight)
    return d_pooled, Linear(d_w, d_b)


# =============================================================================================
# 6. Losses (refimpl.losses): the gradient of the loss with respect to the logits, for dL = 1
# =============================================================================================


def cross_entropy_backward(logits, labels, *, ignore_index: int = IGNORE_INDEX):
    """Backward of the mean cross-entropy over labels != ignore_index (``losses.cross_entropy``).

    logits: [M, K]; labels: [M] -> d_logits [M, K] = (softmax(logits) - onehot(label)) / n_valid on
    counted rows, 0 on ignored ones. With no counted label the loss is NaN and, as in torch, the
    gradient is 0.
    """
    valid = labels != ignore_index  # [M]
    n_valid = int(valid.sum())
    d_logp = np.zeros_like(logits)  # [M, K]: d loss / d log_softmax
    if n_valid:
        rows = np.nonzero(valid)[0]
        d_logp[rows, labels[rows]] = -1.0 / n_valid
    return log_softmax_backward(d_logp, log_softmax(logits, axis=-1))


def shift_labels(labels, *, ignore_index: int = IGNORE_INDEX):
    """The causal-LM label shift: position t predicts label t+1; the last predicts nothing. [B, T] -> [B, T]."""
    pad = np.full((labels.shape[0], 1), ignore_index, dtype=labels.dtype)
    return np.concatenate([labels[:, 1:], pad], axis=1)


def causal_lm_loss_backward(logits, labels, *, ignore_index: int = IGNORE_INDEX):
    """Backward of ``losses.causal_lm_loss``. logits: [B, T, V]; labels: [B, T] -> d_logits [B, T, V]."""
    b, t, v = logits.shape
    shifted = shift_labels(labels, ignore_index=ignore_index).reshape(-1)  # [B*T]
    return cross_entropy_backward(logits.reshape(b * t, v), shifted, ignore_index=ignore_index).reshape(b, t, v)


def mse_backward(predictions, targets):
    """Backward of ``mean((x - y)^2)``: ``2 (x - y) / n`` (n = number of elements)."""
    return 2.0 * (predictions - targets) / predictions.size


def bce_with_logits_backward(logits, targets):
    """Backward of the mean BCE with logits (``losses.bce_with_logits``): ``(sigmoid(x) - y) / n``."""
    return (sigmoid(logits) - targets) / logits.size


def span_loss_backward(start_logits, end_logits, start_positions, end_positions):
    """Backward of ``(CE(start) + CE(end)) / 2`` with positions clamped to [0, T] and T ignored
    (``losses.span_loss``). start/end logits: [B, T]; positions: [B] or [B, 1] -> (d_start, d_end)."""
    t = start_logits.shape[1]
    sp = np.clip(start_positions.reshape(-1), 0, t)  # [B]
    ep = np.clip(end_positions.reshape(-1), 0, t)  # [B]
    d_start = cross_entropy_backward(start_logits, sp, ignore_index=t) / 2
    d_end = cross_entropy_backward(end_logits, ep, ignore_index=t) / 2
    return d_start, d_end


def sequence_classification_loss_backward(logits, labels, problem_type: str):
    """Backward of ``losses.sequence_classification_loss`` for ``problem_type`` (resolved with the
    inputs, as transformers infers it). logits: [B, K]; labels as the loss takes them -> [B, K]."""
    if problem_type == "regression":  # labels [B] (K = 1) or [B, K]
        return mse_backward(logits.reshape(labels.shape), labels).reshape(logits.shape)
    if problem_type == "single_label_classification":
        return cross_entropy_backward(logits, labels)
    return bce_with_logits_backward(logits, labels)


# =============================================================================================
# 7. The composition: loss -> head -> final LayerNorm -> blocks in reverse -> embeddings
# =============================================================================================


@dataclass
class Gradients:
    """The result of :func:`gradients`.

    ``params`` is shaped like the model's :class:`~refimpl.params.Params` with a gradient at every
    leaf the loss depends on and None elsewhere (an unused pooler, the word table when
    ``inputs_embeds`` replace the lookup and no tied decoder reads it). For a tied LM head,
    ``params.lm_head.decoder_weight`` holds the decoder's part and ``params.embeddings.word`` the
    lookup's: :func:`named_gradients` adds them into one gradient, as torch accumulates them.
    """

    loss: Any  # [] the forward's loss
    params: Params
    inputs_embeds: Any = None  # [B, T, H] ([B, C, T, H] for multiple choice) when inputs_embeds were given
    encoder_hidden_states: Any = None  # [B, S_enc, H] when cross-attention read them
    tensors: dict | None = None  # the forward trace the backward read


def _record_params(ptrace: Trace | None, path: str, tree) -> None:
    """Record every gradient leaf of ``tree`` as ``<path>.<leaf path>`` (parameter-gradient names)."""
    if ptrace is None or tree is None:
        return
    if not dataclasses.is_dataclass(tree) and not isinstance(tree, list):
        ptrace(path, tree)
        return
    for leaf_path, value in iter_leaves(tree):
        if value is not None:
            ptrace(f"{path}.{leaf_path}", value)


def backward(tensors: dict, params: Params, config: Config, task: str, x: Inputs, *,
             trace: Trace | None = None) -> Gradients:
    """The whole backward pass for ``task`` from a forward trace (``tensors``: name -> array) and the
    forward's validated inputs ``x`` (:class:`refimpl.inputs.Inputs`: ids, positions, token types,
    labels as the losses took them; multiple choice flattened to [B*C, T]).

    ``trace``, when given, records the gradient of the loss with respect to each traced
    intermediate under the intermediate's own name, in the order computed (the reverse of the
    forward), and each parameter's gradient under ``params.<tree path>`` right after the block that
    completes it (the word table last: a tied decoder adds to it).
    """
    t = tensors
    eps, pad = config.layer_norm_eps, config.pad_token_id
    dtype = t["final_layer_norm"].dtype
    ptrace = None if trace is None else Trace(trace.tensors, trace.prefix + "params.")
    head_trace = scope(trace, "head")
    seq = t["final_layer_norm"]  # [B, T, H]
    g = Params(embeddings=None, layers=[None] * config.num_hidden_layers, final_layer_norm=None)
    record(trace, "loss", np.ones((), dtype=dtype))

    # -- loss and head: d final_layer_norm ---------------------------------------------------------
    if task in ("masked-lm", "causal-lm"):
        logits = t["logits"]  # [B, T, V]
        if task == "masked-lm":
            d_logits = cross_entropy_backward(logits.reshape(-1, logits.shape[-1]), x.labels.reshape(-1))
            d_logits = d_logits.reshape(logits.shape)
        else:
            d_logits = causal_lm_loss_backward(logits, x.labels)
        record(trace, "logits", d_logits)
        saved = LMHeadSaved(seq, t["head.dense"], t["head.gelu"], t["head.layer_norm"])
        d_seq, g.lm_head = lm_head_backward(d_logits, saved, params.lm_head, eps=eps, trace=head_trace)
        _record_params(ptrace, "lm_head", dataclasses.replace(g.lm_head, decoder_weight=None))
        if not config.tie_word_embeddings:
            _record_params(ptrace, "lm_head.decoder_weight", g.lm_head.decoder_weight)
    elif task == "sequence-classification":
        d_logits = record(trace, "logits", sequence_classification_loss_backward(t["logits"], x.labels, x.problem_type))
        d_seq, g.classifier = classification_head_backward(d_logits, seq, t["head.tanh"], params.classifier, trace=head_trace)
        _record_params(ptrace, "classifier", g.classifier)
    elif task == "token-classification":
        logits = t["logits"]  # [B, T, K]
        d_logits = cross_entropy_backward(logits.reshape(-1, logits.shape[-1]), x.labels.reshape(-1))
        d_logits = record(trace, "logits", d_logits.reshape(logits.shape))
        d_seq, g.token_classifier = token_classification_head_backward(d_logits, seq, params.token_classifier)
        _record_params(ptrace, "token_classifier", g.token_classifier)
    elif task == "question-answering":
        d_start, d_end = span_loss_backward(t["start_logits"], t["end_logits"], x.start_positions, x.end_positions)
        record(trace, "start_logits", d_start)
        record(trace, "end_logits", d_end)
        d_seq, g.qa_outputs = question_answering_head_backward(d_start, d_end, seq, params.qa_outputs)
        _record_params(ptrace, "qa_outputs", g.qa_outputs)
    elif task == "multiple-choice":
        d_logits = record(trace, "logits", cross_entropy_backward(t["logits"], x.labels.reshape(-1)))  # [B, C]
        d_pooled, g.choice_classifier = multiple_choice_head_backward(d_logits, t["head.pooler"], params.choice_classifier)
        _record_params(ptrace, "choice_classifier", g.choice_classifier)
        d_seq, g.pooler = pooler_backward(d_pooled, seq, t["head.pooler"], params.pooler, trace=head_trace)
        _record_params(ptrace, "pooler", g.pooler)
    else:  # pragma: no cover - gradients() refuses tasks without a loss
        raise GradientError(f"task {task!r} has no loss to differentiate")

    # -- final LayerNorm ---------------------------------------------------------------------------
    record(trace, "final_layer_norm", d_seq)
    last = f"layers.{config.num_hidden_layers - 1}.ffn.residual"
    x_last = t[last] if config.num_hidden_layers else t["embeddings.output"]
    dx, d_gamma, d_beta = layer_norm_backward(d_seq, x_last, params.final_layer_norm.weight, eps)
    g.final_layer_norm = LayerNorm(d_gamma, d_beta)
    _record_params(ptrace, "final_layer_norm", g.final_layer_norm)

    # -- the blocks, last to first -----------------------------------------------------------------
    d_enc = None
    for i in reversed(range(config.num_hidden_layers)):
        x_in = t[f"layers.{i - 1}.ffn.residual"] if i else t["embeddings.output"]
        saved = layer_saved(t, i, x_in, x.encoder_hidden_states)
        dx, d_enc_i, g.layers[i] = transformer_layer_backward(dx, saved, params.layers[i], config, trace=scope(trace, f"layers.{i}"))
        _record_params(ptrace, f"layers.{i}", g.layers[i])
        if d_enc_i is not None:
            d_enc = d_enc_i if d_enc is None else d_enc + d_enc_i

    # -- embeddings --------------------------------------------------------------------------------
    esaved = EmbeddingsSaved(t["embeddings.sum"], x.input_ids, x.token_type_ids, x.position_ids)
    d_word_rows, g.embeddings = embed_backward(dx, esaved, params.embeddings, eps=eps, pad_token_id=pad,
                                               trace=scope(trace, "embeddings"))
    _record_params(ptrace, "embeddings", dataclasses.replace(g.embeddings, word=None))
    word = g.embeddings.word
    if g.lm_head is not None and config.tie_word_embeddings:  # tied decoder: one parameter, one gradient
        word = g.lm_head.decoder_weight if word is None else word + g.lm_head.decoder_weight
    if word is not None:
        _record_params(ptrace, "embeddings.word", word)

    d_embeds = None
    if x.inputs_embeds is not None:  # multiple choice: back to [B, C, T, H]
        d_embeds = d_word_rows if x.num_choices is None else d_word_rows.reshape(-1, x.num_choices, *d_word_rows.shape[1:])
    return Gradients(t["loss"], g, d_embeds, d_enc, t)


def gradients(model, *, trace: Trace | None = None, **inputs) -> Gradients:
    """Run the reference forward of ``model(**inputs)`` with a trace and differentiate its loss.

    ``inputs`` are the model's arguments, validated as the forward validates them
    (:func:`refimpl.inputs.validate`), and must give a loss: ``labels``, or
    ``start_positions``/``end_positions`` for question answering. The forward is the reference
    (:mod:`refimpl.tasks`) on NumPy whatever backend ``model`` uses. ``trace``: see :func:`backward`.
    """
    if model.task == "base":
        raise GradientError("the base model has no loss to differentiate; load a task model and pass labels")
    if inputs.get("past_key_values") is not None or inputs.get("cache") is not None:
        raise GradientError("gradients run without a KV cache: pass the whole sequence, not past_key_values")
    ref = model if model.backend == "numpy" else model.to("numpy")
    x = validate(ref, **inputs)
    if model.task == "question-answering" and x.start_positions is None:
        raise GradientError("question answering needs start_positions and end_positions for a loss to differentiate")
    if model.task != "question-answering" and x.labels is None:
        raise GradientError(f"task {model.task!r} needs labels for a loss to differentiate")
    recorder = Trace()
    FORWARD[ref.task](ref.params, ref.config, x, trace=recorder)  # records every intermediate
    tensors = {k: v for k, v in recorder.tensors.items() if v is not None}
    return backward(tensors, ref.params, ref.config, ref.task, x, trace=trace)


def parameter_names(config: Config, task: str) -> dict[str, str]:
    """Tree path -> the transformers name (as ``named_parameters()`` lists it for the task class)
    of the parameter whose gradient the leaf is, or is part of.

    The tied decoder weight is the word-embedding parameter; an untied LM head's bias is
    ``lm_head.decoder.bias`` (transformers 5.x unties both, and the forward adds the decoder's).
    """
    table = hf_key_table(config, task, with_pooler=TASKS[task][2])
    names = {e.path: e.key for e in table}
    if "lm_head.decoder_weight" in names:
        if config.tie_word_embeddings:
            names["lm_head.decoder_weight"] = names["embeddings.word"]
        else:
            names["lm_head.bias"] = "lm_head.decoder.bias"
    return names


def named_gradients(model, g: Gradients) -> dict[str, Any]:
    """The gradients under transformers' parameter names, as ``named_parameters()`` lists them for
    the model's task class (``roberta_prelayernorm.`` prefix except for the base model; the pooler
    only where that class builds one).

    A tied decoder is one parameter (``...word_embeddings.weight``): its gradient is the lookup's
    plus the decoder's. An untied LM head (transformers 5.x) has ``lm_head.decoder.weight`` and
    ``lm_head.decoder.bias``, the ones the forward uses, beside a ``lm_head.bias`` it does not read:
    that name maps to None, as torch leaves its ``.grad`` None. A parameter the loss does not
    depend on (the word table when ``inputs_embeds`` replace the lookup) maps to None too.
    Adds ``inputs_embeds`` and ``encoder_hidden_states`` when those inputs were given.
    """
    config = model.config
    tree = dict(iter_leaves(g.params))
    out: dict[str, Any] = {}
    for path, name in parameter_names(config, model.task).items():
        value = tree.get(path)
        if name in out:  # the tied decoder: the word-embedding parameter's second use
            value = out[name] if value is None else value if out[name] is None else out[name] + value
        out[name] = value
    if "lm_head.decoder.bias" in out:
        out["lm_head.bias"] = None  # untied 5.x: a parameter the forward does not read
    if g.inputs_embeds is not None:
        out[INPUTS_EMBEDS_KEY] = g.inputs_embeds
    if g.encoder_hidden_states is not None:
        out[ENCODER_STATES_KEY] = g.encoder_hidden_states
    return out


def grad(model, **inputs) -> tuple[Any, dict[str, Any]]:
    """``refimpl.grad(model, **inputs) -> (loss, grads)``: the loss of ``model(**inputs)`` and its
    gradient with respect to every parameter, under transformers' names (see :func:`named_gradients`),
    plus ``grads["inputs_embeds"]`` (and ``grads["encoder_hidden_states"]``) when those were passed.

    Computed by the written-out backward of this module on the NumPy reference forward, in the
    model's dtype. ``inputs`` must give a loss: ``labels`` (``start_positions``/``end_positions`` for
    question answering).
    """
    g = gradients(model, **inputs)
    return g.loss, named_gradients(model, g)


def gradient_trace(model, **inputs) -> dict[str, np.ndarray]:
    """The golden gradients of ``model(**inputs)``'s loss, in the order the backward computes them.

    ``grad.<trace name>``: the gradient with respect to each traced intermediate (docs/golden.md's
    names; ``grad.loss`` is 1). ``grad.<transformers name>``: the gradient of each parameter as
    ``named_parameters()`` names it, placed right after the block that completes it (the word
    embeddings last: a tied decoder adds to them). ``grad.encoder_hidden_states`` last when
    cross-attention read them. Parameters the loss does not read are left out.
    """
    recorder = Trace()
    g = gradients(model, trace=recorder, **inputs)
    names = parameter_names(model.config, model.task)
    out: dict[str, np.ndarray] = {}
    for name, value in recorder.tensors.items():
        if name.startswith("params."):
            out[GRAD_PREFIX + names[name[len("params."):]]] = value
        else:
            out[GRAD_PREFIX + name] = value
    if g.encoder_hidden_states is not None:
        out[GRAD_PREFIX + ENCODER_STATES_KEY] = g.encoder_hidden_states
    return out
