"""Attention masks and multi-head attention with its pre-LayerNorm sub-block.

Masks are additive biases ``[B, 1, T, S]`` (or broadcastable to it) holding ``0`` where a query may
look at a key and ``finfo(dtype).min`` where it may not, added to the scaled scores as transformers'
eager attention does.
"""

from __future__ import annotations

from .backend import finfo_min, namespace
from .cache import LayerCache, append, has_cross, set_cross
from .ops import layer_norm, linear, softmax
from .params import Attention
from .tracing import Trace, record

# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def keep_to_bias(keep, dtype):
    """Boolean ``keep`` (True = attend) -> additive bias in ``dtype``: 0 or ``finfo(dtype).min``."""
    xp = namespace(keep)
    device = getattr(keep, "device", None)
    zero = xp.zeros((), dtype=dtype, device=device)
    masked = xp.full((), finfo_min(xp, dtype), dtype=dtype, device=device)
    return xp.where(keep, zero, masked)


def causal_keep(query_length: int, key_length: int, past_length: int, xp, device=None):
    """Query ``t`` (absolute position ``past_length + t``) may see keys ``s <= past_length + t``.

    -> [1, 1, T, S] bool.
    """
    q = xp.arange(query_length, device=device)[:, None] + past_length  # [T, 1]
    k = xp.arange(key_length, device=device)[None, :]  # [1, S]
    return (k <= q)[None, None, :, :]


def attention_bias(
    attention_mask,
    *,
    batch: int,
    query_length: int,
    key_length: int,
    dtype,
    xp,
    device=None,
    causal: bool = False,
    past_length: int = 0,
):
    """The additive attention bias for one forward pass, or ``None`` when nothing is masked.

    attention_mask:
      - ``None``: every key is visible (before the causal rule, if any);
      - 2D padding mask [B, S] of 0/1 ints, bools or floats: any non-zero entry means "attend"
        (transformers casts it to bool), combined with the causal rule when ``causal``;
      - 4D [B|1, 1|N, T, S]: a boolean mask (True = attend) is turned into a bias; a float mask is
        taken as an additive bias and used as given, as transformers does (no causal rule added).
    -> [B|1, 1|N, T|1, S] in ``dtype``, or None.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        if attention_mask.dtype == xp.bool:
            return keep_to_bias(attention_mask, dtype)
        return xp.astype(attention_mask, dtype)
    keep = None
    if attention_mask is not None:
        keep = (attention_mask != 0)[:, None, None, :]  # [B, 1, 1, S]
    if causal:
        c = causal_keep(query_length, key_length, past_length, xp, device)  # [1, 1, T, S]
        keep = c if keep is None else xp.logical_and(keep, c)  # [B, 1, T, S]
    if keep is None:
        return None
    return keep_to_bias(keep, dtype)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def split_heads(x, num_heads: int):
    """[B, T, H] -> [B, N, T, D]."""
    xp = namespace(x)
    b, t, h = x.shape
    return xp.permute_dims(xp.reshape(x, (b, t, num_heads, h // num_heads)), (0, 2, 1, 3))


def merge_heads(x):
    """[B, N, T, D] -> [B, T, H]."""
    xp = namespace(x)
    b, n, t, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, t, n * d))


def scaled_dot_product_attention(q, k, v, bias, *, trace: Trace | None = None):
    """``softmax(q k^T / sqrt(D) + bias) v``.

    q: [B, N, T, D]; k, v: [B, N, S, D]; bias: [B|1, 1|N, T|1, S] or None.
    -> context [B, N, T, D], probabilities [B, N, T, S]. The scale multiplies before the mask is
    added, as in transformers' eager attention.
    """
    xp = namespace(q, k)
    scale = q.shape[-1] ** -0.5  # 1/sqrt(D), written as transformers writes it
    scores = record(trace, "scores", xp.matmul(q, xp.matrix_transpose(k)) * scale)  # [B, N, T, S]
    if bias is not None:
        scores = scores + bias  # masked keys: + finfo(dtype).min
    probs = record(trace, "probs", softmax(scores, axis=-1))  # [B, N, T, S]
    context = record(trace, "context", xp.matmul(probs, v))  # [B, N, T, D]
    return context, probs


def attention_block(
    x,
    p: Attention,
    bias,
    *,
    num_heads: int,
    eps: float,
    key_value_states=None,
    cache: LayerCache | None = None,
    cross: bool = False,
    trace: Trace | None = None,
):
    """The pre-LN attention sub-block: ``x + W_o · attention(LayerNorm(x))``.

    x: [B, T, H]. For self-attention keys and values come from ``LayerNorm(x)``; for
    cross-attention (``cross=True``, ``key_value_states`` [B, S, H], the encoder output) they come
    from those states as given, with no LayerNorm, as transformers does. ``cache`` is this layer's
    :class:`~refimpl.cache.LayerCache`: for self-attention this step's [B, N, T, D] keys/values are
    appended to the P cached ones and attention runs over all S = P + T; for cross-attention the
    encoder keys/values [B, N, S, D] are computed on the first call, stored, and reused after.
    -> (output [B, T, H], probabilities [B, N, T, S], (k, v) each [B, N, S, D]).
    """
    h = record(trace, "layer_norm", layer_norm(x, p.layer_norm.weight, p.layer_norm.bias, eps))  # [B, T, H]
    q = record(trace, "q", split_heads(linear(h, p.query.weight, p.query.bias), num_heads))  # [B, N, T, D]
    k, v = keys_values(h, p, num_heads=num_heads, key_value_states=key_value_states, cache=cache, cross=cross)
    record(trace, "k", k)  # [B, N, S, D]
    record(trace, "v", v)  # [B, N, S, D]
    context, probs = scaled_dot_product_attention(q, k, v, bias, trace=trace)  # [B, N, T, D], [B, N, T, S]
    attn = record(trace, "output", linear(merge_heads(context), p.output.weight, p.output.bias))  # [B, T, H]
    return record(trace, "residual", x + attn), probs, (k, v)


def keys_values(h, p: Attention, *, num_heads: int, key_value_states=None, cache: LayerCache | None = None,
                cross: bool = False):
    """The keys and values one attention sub-block attends over -> (k, v), each [B, N, S, D].

    Self-attention projects ``h = LayerNorm(x)`` [B, T, H]; with a cache, these T positions are
    appended to the P cached ones (S = P + T). Cross-attention projects ``key_value_states``
    [B, S, H] once and then reuses the cached projections.
    """
    if cross and cache is not None and has_cross(cache):
        return cache.cross_keys, cache.cross_values  # computed on the first call, [B, N, S, D]
    source = key_value_states if cross else h  # [B, S, H] or [B, T, H]
    k = split_heads(linear(source, p.key.weight, p.key.bias), num_heads)  # [B, N, T|S, D]
    v = split_heads(linear(source, p.value.weight, p.value.bias), num_heads)  # [B, N, T|S, D]
    if cache is not None and cross:
        set_cross(cache, k, v)  # computed once, reused by every later step
    elif cache is not None:  # self-attention with a cache: write [B, N, T, D] after the P cached
        k, v = append(cache, k, v)  # [B, N, S, D] views of the cache buffers
    return k, v
