"""Position ids and the embedding layer.

RoBERTa numbers positions from ``pad_token_id + 1`` and gives padding tokens the position
``pad_token_id`` (fairseq's ``make_positions``). BERT-style ``0 .. T-1`` is wrong for this model.
"""

from __future__ import annotations

from .backend import namespace
from .ops import layer_norm
from .params import Embeddings
from .tracing import Trace, record


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
