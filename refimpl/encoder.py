"""The encoder: the embedding layer, the pre-LayerNorm blocks and the final LayerNorm.

The embedding layer sums the word, token-type and position embeddings and normalises them.
RoBERTa numbers positions from ``pad_token_id + 1`` and gives padding tokens the position
``pad_token_id`` (fairseq's ``make_positions``). BERT-style ``0 .. T-1`` is wrong for this model.

A block is two (three, with cross-attention) residual updates, each with its own LayerNorm on the
way in and none on the way out::

    x = x + Attention(LayerNorm(x))                       # attention_block
    x = x + CrossAttention(LayerNorm(x), encoder_states)  # only when add_cross_attention
    x = x + W_2 · act(W_1 · LayerNorm(x) + b_1) + b_2      # feed_forward_block

After the last block comes one final LayerNorm (in :func:`encode`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import attention_block
from .backend import namespace
from .cache import KVCache, LayerCache, has_cross
from .config import Config
from .ops import activation, layer_norm, linear
from .params import Embeddings, Layer, Params
from .tracing import Trace, record, scope

# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def position_ids_from_input_ids(input_ids, pad_token_id: int, past_length: int = 0):
    """``(cumsum(ids != pad) + past_length) * (ids != pad) + pad``.

    input_ids: [B, T] integers -> [B, T] int64. Real tokens get ``pad + 1, pad + 2, ...`` counted
    over real tokens only (left padding shifts nothing), continued by ``past_length`` cached tokens;
    pads get ``pad``.
    """
    xp = namespace(input_ids)
    is_token = xp.astype(input_ids != pad_token_id, xp.int64)  # [B, T]
    return (xp.cumulative_sum(is_token, axis=1) + past_length) * is_token + pad_token_id


def position_ids_from_inputs_embeds(batch: int, length: int, pad_token_id: int, xp, device=None):
    """Sequential ``pad + 1 .. pad + T`` for every row: padding cannot be seen in embeddings.

    -> [B, T] int64 (as transformers' ``create_position_ids_from_inputs_embeds``).
    """
    row = xp.arange(pad_token_id + 1, length + pad_token_id + 1, dtype=xp.int64, device=device)  # [T]
    return xp.broadcast_to(row[None, :], (batch, length))


def lookup(table, ids):
    """Rows of ``table`` [R, H] at integer ``ids`` [...] -> [..., H] (``xp.take`` on flat ids)."""
    xp = namespace(table)
    flat = xp.reshape(ids, (-1,))  # [B*T]
    rows = xp.take(table, flat, axis=0)  # [B*T, H]
    return xp.reshape(rows, (*ids.shape, table.shape[-1]))


def embed(
    p: Embeddings,
    position_ids,
    token_type_ids,
    *,
    eps: float,
    input_ids=None,
    inputs_embeds=None,
    trace: Trace | None = None,
):
    """``LayerNorm(word[ids] + token_type[tt] + position[pos])`` -> [B, T, H].

    Exactly one of ``input_ids`` [B, T] and ``inputs_embeds`` [B, T, H] is given; position_ids and
    token_type_ids are [B, T] (already resolved by the caller). Summation order follows
    transformers: ``(word + token_type) + position``.
    """
    word = lookup(p.word, input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, H]
    record(trace, "word", word)
    token_type = record(trace, "token_type", lookup(p.token_type, token_type_ids))  # [B, T, H]
    position = record(trace, "position", lookup(p.position, position_ids))  # [B, T, H]
    summed = record(trace, "sum", (word + token_type) + position)  # [B, T, H]
    return record(trace, "output", layer_norm(summed, p.layer_norm.weight, p.layer_norm.bias, eps))


# ---------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------


def feed_forward_block(x, p: Layer, *, act: str, eps: float, trace: Trace | None = None):
    """``x + W_2 · act(W_1 · LayerNorm(x) + b_1) + b_2``.

    x: [B, T, H] -> [B, T, H] (through [B, T, I]).
    """
    h = record(trace, "layer_norm", layer_norm(x, p.ffn_layer_norm.weight, p.ffn_layer_norm.bias, eps))  # [B, T, H]
    pre = record(trace, "pre_activation", linear(h, p.intermediate.weight, p.intermediate.bias))  # [B, T, I]
    a = record(trace, "activation", activation(act)(pre))  # [B, T, I]
    out = record(trace, "output", linear(a, p.output.weight, p.output.bias))  # [B, T, H]
    return record(trace, "residual", x + out)


@dataclass
class LayerOutput:
    hidden: object  # [B, T, H]
    self_attention: object  # probabilities [B, N, T, S]
    cross_attention: object | None  # probabilities [B, N, T, S_enc]


def transformer_layer(
    x,
    p: Layer,
    bias,
    config: Config,
    *,
    encoder_hidden_states=None,
    encoder_bias=None,
    cache: LayerCache | None = None,
    trace: Trace | None = None,
) -> LayerOutput:
    """One pre-LN block: two residual updates (three with cross-attention). x: [B, T, H].

    ``cache`` is this layer's :class:`~refimpl.cache.LayerCache` (updated in place), or None. With a
    cache that already holds cross-attention keys/values, cross-attention runs on those even when
    ``encoder_hidden_states`` is not passed again.
    """
    heads, eps = config.num_attention_heads, config.layer_norm_eps
    x, self_probs, _ = attention_block(x, p.attention, bias, num_heads=heads, eps=eps, cache=cache,
                                       trace=scope(trace, "attention"))  # [B, T, H]
    cross_probs = None
    if p.crossattention is not None and (encoder_hidden_states is not None or (cache is not None and has_cross(cache))):
        x, cross_probs, _ = attention_block(x, p.crossattention, encoder_bias, num_heads=heads, eps=eps,
                                            key_value_states=encoder_hidden_states, cache=cache, cross=True,
                                            trace=scope(trace, "crossattention"))  # [B, T, H]
    x = feed_forward_block(x, p, act=config.hidden_act, eps=eps, trace=scope(trace, "ffn"))  # [B, T, H]
    return LayerOutput(x, self_probs, cross_probs)


@dataclass
class EncoderOutput:
    last_hidden_state: object  # [B, T, H], after the final LayerNorm
    hidden_states: list  # L + 1 entries, transformers 5.x convention (see encode)
    attentions: list  # L entries of [B, N, T, S]
    cross_attentions: list  # L entries of [B, N, T, S_enc] or None (no cross-attention)


def encode(
    embeddings,
    params: Params,
    config: Config,
    bias,
    *,
    encoder_hidden_states=None,
    encoder_bias=None,
    cache: KVCache | None = None,
    trace: Trace | None = None,
) -> EncoderOutput:
    """The stack of L blocks and the final LayerNorm. embeddings: [B, T, H] -> EncoderOutput.

    ``hidden_states`` follows transformers 5.x: the embedding output, then the outputs of blocks
    0 .. L-2, then the final-LayerNorm output (equal to ``last_hidden_state``) in place of block
    L-1's raw output. fairseq's ``inner_states`` instead end with the raw output of the last block;
    the trace records it as ``layers.{L-1}.ffn.residual``.
    """
    x = embeddings  # [B, T, H]
    hidden, attentions, crosses = [x], [], []
    for i, layer in enumerate(params.layers):
        out = transformer_layer(x, layer, bias, config, encoder_hidden_states=encoder_hidden_states,
                                encoder_bias=encoder_bias, cache=None if cache is None else cache.layers[i],
                                trace=scope(trace, f"layers.{i}"))
        x = out.hidden  # [B, T, H]
        hidden.append(x)
        attentions.append(out.self_attention)
        crosses.append(out.cross_attention)
    fl = params.final_layer_norm
    last = record(trace, "final_layer_norm", layer_norm(x, fl.weight, fl.bias, config.layer_norm_eps))  # [B, T, H]
    hidden[-1] = last
    return EncoderOutput(last, hidden, attentions, crosses)
