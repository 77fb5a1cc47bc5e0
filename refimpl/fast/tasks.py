"""The fast forward: the reference tasks (:mod:`refimpl.tasks`) with Numba kernels and BLAS scheduling.

The same equations in the same order as the reference, step by step, with these differences of
schedule only (each held to the reference by ``tests/test_fast.py``):

- LayerNorm, the masked softmax and bias+GELU run the Numba kernels of :mod:`.kernels`;
- ``x W^T + b`` is :func:`.schedule.linear` (packed weights for few rows, ``(W x^T)^T`` or
  ``x W^T`` for more, bias added in place); q, k and v of a self-attention are one GEMM (:func:`qkv`);
- without ``output_attentions`` the probabilities are never kept (:func:`.schedule.attention_context`);
- a batch of 2+ sequences without a cache or cross-attention runs on two threads, in halves or in
  pieces the threads take in turn (:func:`.schedule.split_batch`, :func:`pieces`), encoder and head
  together, when its work is worth it (:func:`worth_splitting`); the loss is taken over the whole
  batch;
- one sequence of ``TOKEN_SPLIT_FROM`` tokens or more (no cache, cross-attention or kept
  probabilities), when its work is worth it, runs as two token halves that meet at the attention
  (:func:`encode_token_halves`);
- a decoding step's blocks run in one compiled call (:mod:`.decoding`).

Only NumPy arrays; nothing is traced (a traced call runs the reference).
"""

from __future__ import annotations

import threading

import numpy as np

from .. import losses
from ..backend import finfo_min
from ..cache import append, has_cross, set_cross
from ..config import Config
from ..encoder import EncoderOutput
from ..inputs import Inputs
from ..outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from ..params import Attention, Layer, Params
from ..tasks import cross_attentions, extras
from . import decoding
from .kernels import attention, layer_norm, masked_softmax
from .schedule import (PACKED_ROWS, PIECE_TOKENS, TOKEN_SPLIT_FROM, TWO_CORE_ROWS, attention_context, linear, linear_act,
                       linears, run_two, split_batch)

# ---------------------------------------------------------------------------------------------
# The encoder (refimpl.attention.attention_block, refimpl.encoder.feed_forward_block / encode)
# ---------------------------------------------------------------------------------------------


def split_heads(x, num_heads: int):
    """``attention.split_heads`` in NumPy alone (no namespace lookup: it runs 3 times a layer).
    [B, T, H] -> [B, N, T, D]."""
    b, t, h = x.shape
    return x.reshape(b, t, num_heads, h // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """``attention.merge_heads`` in NumPy alone. [B, N, T, D] -> [B, T, H]."""
    b, n, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, n * d)


def qkv(h, p: Attention) -> list:
    """The query, key and value projections of ``h`` [B, T, H] -> three [B, T, H]: one GEMM with the
    three weights stacked where they are packed (:func:`.schedule.linears`; the same values)."""
    return linears(h, (p.query.weight, p.key.weight, p.value.weight), (p.query.bias, p.key.bias, p.value.bias))


def attention_block(x, p: Attention, bias, *, num_heads: int, eps: float, key_value_states=None, cache=None,
                    cross: bool = False, need_probs: bool = False):
    """``x + W_o · attention(LayerNorm(x))`` -> (output [B, T, H], probabilities [B, N, T, S] or None)."""
    h = layer_norm(x, p.layer_norm.weight, p.layer_norm.bias, eps)  # [B, T, H]
    if not cross:
        q, k, v = (split_heads(a, num_heads) for a in qkv(h, p))  # [B, T, H] each -> [B, N, T, D]
        if cache is not None:
            k, v = append(cache, k, v)  # [B, N, S, D] views of the cache buffers
    else:
        q = split_heads(linear(h, p.query.weight, p.query.bias), num_heads)  # [B, N, T, D]
        if cache is not None and has_cross(cache):
            k, v = cache.cross_keys, cache.cross_values  # [B, N, S, D]
        else:
            k = split_heads(linear(key_value_states, p.key.weight, p.key.bias), num_heads)  # [B, N, S, D]
            v = split_heads(linear(key_value_states, p.value.weight, p.value.bias), num_heads)  # [B, N, S, D]
            if cache is not None:
                set_cross(cache, k, v)
    scale = q.shape[-1] ** -0.5
    if need_probs:
        probs = masked_softmax(q @ np.swapaxes(k, -1, -2), bias, scale)  # [B, N, T, S]
        context = probs @ v  # [B, N, T, D]
    else:
        probs, context = None, attention_context(q, k, v, bias, scale)  # [B, N, T, D]
    return x + linear(merge_heads(context), p.output.weight, p.output.bias), probs  # [B, T, H]


def feed_forward_block(x, p: Layer, *, act: str, eps: float):
    """``x + W_2 · act(W_1 · LayerNorm(x) + b_1) + b_2``. x: [B, T, H] -> [B, T, H]."""
    h = layer_norm(x, p.ffn_layer_norm.weight, p.ffn_layer_norm.bias, eps)  # [B, T, H]
    a = linear_act(h, p.intermediate.weight, p.intermediate.bias, act)  # [B, T, I]
    return x + linear(a, p.output.weight, p.output.bias)  # [B, T, H]


def embeddings(e, word, token_type_ids, position_ids, eps: float):
    """``LayerNorm((word + token type) + position)``, the reference's order of the adds. word: [..., H]
    (the word vectors, or ``inputs_embeds``); the ids: [...] -> [..., H]."""
    return layer_norm((word + e.token_type[token_type_ids]) + e.position[position_ids],
                      e.layer_norm.weight, e.layer_norm.bias, eps)


def final_norm(params: Params, h, eps: float):
    """The final LayerNorm after the last block (pre-LN). [..., H] -> [..., H]."""
    fl = params.final_layer_norm
    return layer_norm(h, fl.weight, fl.bias, eps)


def encode(params: Params, config: Config, x: Inputs, rows: slice | None = None) -> EncoderOutput:
    """Embeddings, the L blocks and the final LayerNorm for ``rows`` of the batch (None: all). A
    decoding step (one new token, a cache; no hidden states, probabilities or cross-attention asked
    for) runs its blocks in one compiled call where it can (:func:`.decoding.run`: the same bits)."""
    c, eps, heads = config, config.layer_norm_eps, config.num_attention_heads
    pick = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])
    bias = x.attention_bias
    if rows is not None and bias is not None and bias.shape[0] > 1:
        bias = bias[rows]  # [B|1, 1|N, T|1, S]
    e = params.embeddings
    word = e.word[pick(x.input_ids)] if x.inputs_embeds is None else pick(x.inputs_embeds)  # [b, T, H]
    h = embeddings(e, word, pick(x.token_type_ids), pick(x.position_ids), eps)  # [b, T, H]
    if (x.cache is not None and rows is None and x.encoder_hidden_states is None and not x.output_attentions
            and not x.output_hidden_states and decoding.run(params, config, h, x.cache, bias)):
        n = len(params.layers)  # (a decoding step's blocks in one call: the same bits)
        h = final_norm(params, h, eps)  # [b, 1, H]
        return EncoderOutput(h, [None] * n + [h], [None] * n, [None] * n)
    hidden, attentions, crosses = [h], [], []
    for i, layer in enumerate(params.layers):
        cache = None if x.cache is None else x.cache.layers[i]
        h, probs = attention_block(h, layer.attention, bias, num_heads=heads, eps=eps, cache=cache,
                                   need_probs=x.output_attentions)
        cross_probs = None
        if layer.crossattention is not None and (x.encoder_hidden_states is not None or (cache is not None and has_cross(cache))):
            h, cross_probs = attention_block(h, layer.crossattention, x.encoder_bias, num_heads=heads, eps=eps,
                                             key_value_states=x.encoder_hidden_states, cache=cache, cross=True,
                                             need_probs=x.output_attentions)
        h = feed_forward_block(h, layer, act=c.hidden_act, eps=eps)
        hidden.append(h)
        attentions.append(probs)
        crosses.append(cross_probs)
    hidden[-1] = final_norm(params, h, eps)  # [b, T, H]
    return EncoderOutput(hidden[-1], hidden, attentions, crosses)


def encode_token_halves(params: Params, config: Config, x: Inputs) -> EncoderOutput | None:
    """``encode`` for ONE sequence as two token halves on two threads (None: not split, see
    :func:`run_two`). Without a cache, cross-attention or kept probabilities only.

    Each thread runs LayerNorm, the projections, the FFN and the residual adds for its half of the
    tokens (each token on its own, as in the reference); the two meet at the attention, which
    needs every token's keys and values: after the q/k/v projections (a barrier) each thread runs
    the attention of half the heads over all tokens, and after it (a second barrier) each goes on
    with its tokens. The same products and sums as ``encode``; BLAS sees other call shapes.
    """
    c, eps, nh = config, config.layer_norm_eps, config.num_attention_heads
    e = params.embeddings
    word = e.word[x.input_ids] if x.inputs_embeds is None else x.inputs_embeds  # [1, T, H]
    h0 = embeddings(e, word, x.token_type_ids, x.position_ids, eps)  # [1, T, H]
    t, hid = h0.shape[1], h0.shape[2]
    d, half, heads0 = hid // nh, (t + 1) // 2, (nh + 1) // 2
    projections = np.empty((3, 1, t, hid), h0.dtype)  # the projections of every token, [1, T, H] each
    ctx = np.empty((1, t, hid), h0.dtype)  # the attention context, heads merged
    hidden = [h0] + [np.empty_like(h0) for _ in params.layers]
    bias = x.attention_bias  # [1, 1|N, T|1, S] or None
    meet = threading.Barrier(2)

    def heads(a, part):  # [1, T, H] -> [1, n, T, D], this part's heads
        return a.reshape(1, t, nh, d)[:, :, :heads0] if part == 0 else a.reshape(1, t, nh, d)[:, :, heads0:]

    def run(part):
        rows = slice(0, half) if part == 0 else slice(half, t)
        hb = None if bias is None or bias.shape[1] == 1 else (slice(0, heads0) if part == 0 else slice(heads0, nh))
        part_bias = bias if hb is None else bias[:, hb]
        h = h0[:, rows]  # [1, t', H]
        try:
            for i, layer in enumerate(params.layers):
                p = layer.attention
                ln = layer_norm(h, p.layer_norm.weight, p.layer_norm.bias, eps)  # [1, t', H]
                for j, a in enumerate(qkv(ln, p)):  # [1, t', H] each
                    projections[j, :, rows] = a
                meet.wait()  # every token's q, k, v are there
                q, k, v = (heads(a, part).transpose(0, 2, 1, 3) for a in projections)  # [1, n, T, D]
                if q.shape[1]:
                    attention(q, k, v, part_bias, d**-0.5, out=heads(ctx, part).transpose(0, 2, 1, 3))
                meet.wait()  # every head's context is there (and q, k, v may be overwritten)
                h = h + linear(ctx[:, rows], p.output.weight, p.output.bias)  # [1, t', H]
                h = feed_forward_block(h, layer, act=c.hidden_act, eps=eps)
                hidden[i + 1][:, rows] = h
        except BaseException:
            meet.abort()  # the other part stops at its next meeting instead of waiting for ever
            raise
        return final_norm(params, h, eps)  # [1, t', H]

    parts = run_two(run)
    if parts is None:
        return None
    hidden[-1] = np.concatenate(parts, axis=1)  # [1, T, H]
    n = len(params.layers)
    return EncoderOutput(hidden[-1], hidden, [None] * n, [None] * n)


SPLIT_MIN_WORK = 2_000_000
"""The fewest multiply-adds of the encoder's projections and FFN (all layers, whole batch) worth two
threads: below it, handing half the batch to the other thread costs more than it saves (a tiny
model's forward is mostly Python and kernel dispatch; a thread hop on a busy 2-core machine can
take longer than the half it carries). 2M is ~0.2 ms of one core's GEMM time."""


SPLIT_MIN_ROWS = TWO_CORE_ROWS + 1
"""The fewest tokens (batch x length) worth two threads: up to ``TWO_CORE_ROWS`` the GEMMs of a whole
batch run on both cores anyway (:func:`.schedule.linear`), and the halves would each stream every
weight. A/B on a base-sized model, whole / halves: 0.88 at 2x8, 0.84 at 3x16, 0.99-1.03 at 2x16,
4x8, 2x24, 4x12, 8x4."""


def worth_splitting(config: Config, x: Inputs, head_work: int = 0) -> bool:
    """Whether the batch has ``SPLIT_MIN_ROWS`` tokens and its encoder work, plus ``head_work``
    multiply-adds of a head, reaches :data:`SPLIT_MIN_WORK` (then it runs as two halves)."""
    b, t = x.position_ids.shape[:2]
    h, i = config.hidden_size, config.intermediate_size
    work = b * t * config.num_hidden_layers * (4 * h * h + 2 * h * i) + head_work
    return b * t >= SPLIT_MIN_ROWS and work >= SPLIT_MIN_WORK


def pieces(params: Params, x: Inputs) -> int | None:
    """Sequences a thread takes at a time in a split batch: at most as many as make ``PIECE_TOKENS``
    tokens (and ``PACKED_ROWS``) (each piece's GEMMs then multiply with packed weights, which cost nothing to reuse, where
    OpenBLAS would pack every weight again for each piece), in an even number of pieces of nearly
    equal size; one, for sequences longer than that up to ``PACKED_ROWS`` tokens; or None (halves)
    beyond. An odd count leaves one thread the last piece alone: a base-sized classifier over
    batches of 32 texts (~20 tokens: pieces of 12, 12 and 8) took 1.09x the time of pieces of 8
    (A/B in one process)."""
    b, t = x.position_ids.shape[:2]
    packed = PACKED_ROWS.get(params.embeddings.word.dtype, 0)
    if not 0 < t <= packed:
        return None
    rows = min(PIECE_TOKENS, packed)
    if t > rows:
        return 1  # (a longer single sequence: a piece of its own)
    n = -(-b // (rows // t))  # pieces of at most rows // t sequences
    return -(-b // (n + n % 2))  # sequences a piece, for an even number of pieces


# ---------------------------------------------------------------------------------------------
# Some positions read (the pipelines): the tokens nobody needs left out, the last block on the rest
# ---------------------------------------------------------------------------------------------


def needed_tokens(bias, keep) -> np.ndarray:
    """Which positions of a batch the final states at ``keep`` [b, T] (bool) depend on -> [b, T] bool.

    A row where nothing is kept needs nothing. In a row where something is kept: every position
    kept, and every key some query attends to. With a padding bias (``bias`` [b|1, 1|N, 1, S],
    each entry 0 or finfo.min: a 2-D ``attention_mask``), a key whose bias is finfo.min for every
    head adds exactly 0 to every softmax sum (exp underflows), so it is needed only where kept; a
    row that masks every key (its softmax is uniform over them) needs them all, as does any other
    bias (a causal or 4-D mask, or None: nothing masked)."""
    b, t = keep.shape
    rows = keep.any(axis=1)[:, None]  # [b, 1]
    every = np.broadcast_to(rows, (b, t)).copy()  # [b, T]: all positions of the rows read
    if bias is None or bias.shape[-2] != 1 or bias.shape[-1] != t:
        return every
    low = finfo_min(np, bias.dtype)  # the additive mask of a masked key (refimpl.attention.keep_to_bias)
    flat = bias[:, :, 0, :]  # [b|1, 1|N, S]
    if not np.all((flat == 0) | (flat == low)):
        return every
    attended = np.broadcast_to((flat == 0).any(axis=1), (b, t))  # [b, S]: some head attends to the key
    attended = attended | ~attended.any(axis=1, keepdims=True)  # a row masking every key: all of them
    return (attended | keep) & rows  # [b, T]


def padded(y, at, b: int, t: int):
    """The rows ``y`` [n, C] of the positions ``at`` [n] (flat, into b * T) in a [b, T, C] batch,
    zeros at the other positions (finite: queries nobody reads, keys nobody attends to)."""
    if len(at) == b * t:
        return y.reshape(b, t, y.shape[-1])  # every position: a view
    out = np.zeros((b * t, y.shape[-1]), y.dtype)
    out[at] = y
    return out.reshape(b, t, y.shape[-1])


def attention_block_at(x, p: Attention, bias, at, shape: tuple, *, num_heads: int, eps: float, queries=None):
    """``attention_block`` (self-attention, no cache) on the tokens at the flat positions ``at`` [n]
    of a [b, T] batch (``shape``), every other position left out (:func:`needed_tokens`).

    x: [n, H], the states at ``at``. queries: the indices into x [m] (row-major) whose outputs are
    wanted, None: all. Keys and values come from all n; the attention itself runs in the batch's
    layout (:func:`padded`, ``bias`` [b|1, 1|N, T|1, S] unchanged), the queries of a row side by
    side when only some are wanted. -> [m, H] (or [n, H]): the same numbers as ``attention_block``
    at those positions, to the rounding of GEMMs with fewer rows.
    """
    b, t = shape
    h = layer_norm(x, p.layer_norm.weight, p.layer_norm.bias, eps)  # [n, H]
    if queries is None:
        q, k, v = qkv(h, p)  # [n, H] each
        q_at, q_shape, q_bias, res = at, (b, t), bias, x
    else:
        k, v = linears(h, (p.key.weight, p.value.weight), (p.key.bias, p.value.bias))  # [n, H] each
        q, res = linear(h[queries], p.query.weight, p.query.bias), x[queries]  # [m, H] each
        row, col = np.divmod(at[queries], t)  # [m] each: the batch row and position of each query
        first = np.searchsorted(row, row)  # [m]: the row's first query (row-major: rows ascending)
        slot = np.arange(len(row)) - first  # [m]: its place among the row's queries
        width = int(slot.max()) + 1 if len(slot) else 1  # Q, the most queries in a row
        q_at, q_shape, q_bias = row * width + slot, (b, width), bias
        if bias is not None and bias.shape[-2] > 1:  # a per-query bias: each query's own row of it
            q_bias = np.zeros((b, bias.shape[1], width, bias.shape[-1]), bias.dtype)  # [b, 1|N, Q, S]
            q_bias[row, :, slot, :] = bias[row if bias.shape[0] > 1 else 0, :, col, :]  # [m, 1|N, S]
    q = split_heads(padded(q, q_at, *q_shape), num_heads)  # [b, N, T|Q, D]
    k, v = (split_heads(padded(a, at, b, t), num_heads) for a in (k, v))  # [b, N, T, D] each
    context = attention_context(q, k, v, q_bias, q.shape[-1] ** -0.5)  # [b, N, T|Q, D]
    context = merge_heads(context).reshape(-1, x.shape[-1])  # [b*(T|Q), H]
    if len(q_at) < context.shape[0]:
        context = context[q_at]  # [m|n, H]
    return res + linear(context, p.output.weight, p.output.bias)  # [m|n, H]


def states_at(params: Params, config: Config, x: Inputs, keep, rows: slice | None = None) -> np.ndarray:
    """``encode(params, config, x, rows).last_hidden_state[keep]``: the final states at the
    positions ``keep`` [b, T] (bool, the rows' part) marks, [M, H] in row-major order.

    Every block runs on the tokens those states depend on only (:func:`needed_tokens`: the padding
    of a batch is left out of the projections and FFNs), the last block's query, attention output,
    FFN and the final LayerNorm on the kept positions only (a classifier reads ``<s>``, fill-mask
    the masks). Each kept state is the full encoder's up to the rounding of GEMMs with other row
    counts. With a cache, cross-attention, ``inputs_embeds`` or no layers: the full encoder's.
    """
    if x.cache is not None or x.encoder_hidden_states is not None or x.inputs_embeds is not None or not params.layers:
        return encode(params, config, x, rows).last_hidden_state[keep]
    c, eps, heads = config, config.layer_norm_eps, config.num_attention_heads
    if not keep.any():
        return np.zeros((0, c.hidden_size), params.embeddings.word.dtype)  # [0, H]
    rows = slice(None) if rows is None else rows
    bias = x.attention_bias
    if bias is not None and bias.shape[0] > 1:
        bias = bias[rows]  # [b|1, 1|N, T|1, S]
    b, t = keep.shape
    at = np.flatnonzero(needed_tokens(bias, keep))  # [n] flat positions of the tokens computed
    e = params.embeddings
    ids, types, positions = (a[rows].reshape(-1)[at] for a in (x.input_ids, x.token_type_ids, x.position_ids))
    h = embeddings(e, e.word[ids], types, positions, eps)  # [n, H]
    for layer in params.layers[:-1]:
        h = attention_block_at(h, layer.attention, bias, at, (b, t), num_heads=heads, eps=eps)  # [n, H]
        h = feed_forward_block(h, layer, act=c.hidden_act, eps=eps)  # [n, H]
    last = params.layers[-1]
    queries = np.searchsorted(at, np.flatnonzero(keep))  # [M]: the kept positions among the computed
    h = attention_block_at(h, last.attention, bias, at, (b, t), num_heads=heads, eps=eps, queries=queries)  # [M, H]
    h = feed_forward_block(h, last, act=c.hidden_act, eps=eps)  # [M, H]
    return final_norm(params, h, eps)  # [M, H]


def over_batch(params: Params, config: Config, x: Inputs, run, head_work: int = 0) -> np.ndarray:
    """``run(rows)`` ([b', ...] arrays) over the batch, joined along the first axis: in two halves
    or pieces on two threads when :func:`worth_splitting` (never with a cache or cross-attention),
    else in one call."""
    b = x.position_ids.shape[0]
    whole = x.cache is not None or x.encoder_hidden_states is not None
    parts = split_batch(run, b, pieces(params, x)) if b > 1 and not whole and worth_splitting(config, x, head_work) \
        else [run(slice(0, b))]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def first_token_states(params: Params, config: Config, x: Inputs) -> np.ndarray:
    """``encode(...).last_hidden_state[:, 0]``, [B, H]: the final state of the first token only
    (:func:`states_at`: a sequence classifier and an ``<s>`` embedding read nothing else). Held to
    the reference ``refimpl.tasks.encoder_forward(...).last_hidden_state[:, 0]`` by
    ``tests/test_fast.py``."""
    keep = np.zeros(x.position_ids.shape[:2], bool)  # [B, T]
    keep[:, 0] = True
    return token_states(params, config, x, keep)  # [B, H]: one kept position a row


def token_states(params: Params, config: Config, x: Inputs, keep) -> np.ndarray:
    """``encode(...).last_hidden_state[keep]``, [M, H] in row-major order of ``keep`` [B, T]
    (:func:`states_at`, over the batch on two threads when worth it)."""
    return over_batch(params, config, x, lambda rows: states_at(params, config, x, keep[rows], rows))


def over_rows(params: Params, config: Config, x: Inputs, head, head_work: int = 0):
    """``head(encode(rows))`` over the rows of the batch -> (the head's arrays joined along the
    batch, the EncoderOutput with the fields the caller returns joined likewise).

    A batch of 2+ sequences without a cache or cross-attention runs as two halves on two threads
    (:func:`split_batch`) when :func:`worth_splitting` (``head_work``: the head's multiply-adds for
    the whole batch); every sequence is computed on its own either way. One sequence of at least
    ``TOKEN_SPLIT_FROM`` tokens, its work worth it, runs as two token halves
    (:func:`encode_token_halves`). ``head`` maps an EncoderOutput to a tuple of [b, ...] arrays.
    """
    b, t = x.position_ids.shape[:2]
    whole = x.cache is not None or x.encoder_hidden_states is not None
    worth = not whole and worth_splitting(config, x, head_work)
    if b == 1 and worth and not x.output_attentions and t >= TOKEN_SPLIT_FROM:
        enc = encode_token_halves(params, config, x)
        if enc is not None:
            return head(enc), enc
    if b < 2 or not worth:
        enc = encode(params, config, x)
        return head(enc), enc
    parts = split_batch(lambda rows: (lambda enc: (head(enc), enc))(encode(params, config, x, rows)), b, pieces(params, x))
    if len(parts) == 1:
        return parts[0]

    def cat(arrays):
        return None if arrays[0] is None else np.concatenate(arrays, axis=0)

    outs = tuple(cat([p[0][i] for p in parts]) for i in range(len(parts[0][0])))
    encs = [p[1] for p in parts]
    n = len(encs[0].hidden_states)
    hidden = [cat([e.hidden_states[i] for e in encs]) for i in range(n)] if x.output_hidden_states else [None] * n
    attentions = [cat([e.attentions[i] for e in encs]) for i in range(n - 1)]
    crosses = [cat([e.cross_attentions[i] for e in encs]) for i in range(n - 1)]
    return outs, EncoderOutput(hidden[-1], hidden, attentions, crosses)


# ---------------------------------------------------------------------------------------------
# The heads (refimpl.heads) and the tasks (refimpl.tasks)
# ---------------------------------------------------------------------------------------------


def lm_head_work(params: Params, config: Config, rows: int) -> int:
    """The LM head's multiply-adds on ``rows`` rows: [rows, H] x [H, H] and [H, V]."""
    h = config.hidden_size
    return rows * h * (h + params.lm_head.decoder_weight.shape[0])


def lm_head(seq, p, eps: float):
    """dense -> exact GELU -> LayerNorm -> tied decoder + bias. [..., H] -> [..., V]."""
    h = linear_act(seq, p.dense.weight, p.dense.bias, "gelu")  # [..., H] (GELU in place)
    return linear(layer_norm(h, p.layer_norm.weight, p.layer_norm.bias, eps), p.decoder_weight, p.bias)  # [..., V]


def pooler(seq, p):
    """``tanh(W · h_<s> + b)`` on the first token. [b, T, H] -> [b, H]."""
    return np.tanh(linear(seq[:, 0, :], p.weight, p.bias))


def base(params: Params, config: Config, x: Inputs):
    (seq, pooled), enc = over_rows(params, config, x, lambda enc: (
        enc.last_hidden_state, None if params.pooler is None else pooler(enc.last_hidden_state, params.pooler)))
    return BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=seq, pooler_output=pooled, past_key_values=x.cache if x.return_cache else None,
        cross_attentions=cross_attentions(enc, x), **extras(enc, x))


def masked_lm(params: Params, config: Config, x: Inputs):
    eps = config.layer_norm_eps
    b, t = x.position_ids.shape[:2]
    work = lm_head_work(params, config, b * t)
    (logits,), enc = over_rows(params, config, x, lambda enc: (lm_head(enc.last_hidden_state, params.lm_head, eps),), work)
    loss = None
    if x.labels is not None:
        loss = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.labels.reshape(-1))  # [B*T, V]
    return MaskedLMOutput(loss=loss, logits=logits, **extras(enc, x))


def masked_lm_at(params: Params, config: Config, x: Inputs, where: np.ndarray) -> np.ndarray:
    """The masked-LM logits at the positions ``where`` marks only: ``masked_lm(...).logits[where]``.

    where: [B, T] bool -> [M, V], M = ``where.sum()``, in row-major order of ``where``. The encoder
    computes the states at those positions (:func:`states_at`: padding left out, the last block on
    the marked rows), the LM head runs on the M rows instead of all B*T (a fill-mask pipeline
    reads nothing else), each half of the batch on its thread. Held to the reference
    ``refimpl.tasks.masked_lm(...).logits[where]`` by ``tests/test_pipelines.py``.
    """
    eps = config.layer_norm_eps
    work = lm_head_work(params, config, int(where.sum()))
    return over_batch(params, config, x, lambda rows: lm_head(states_at(params, config, x, where[rows], rows),
                                                              params.lm_head, eps), work)  # [M, V]


def causal_lm(params: Params, config: Config, x: Inputs):
    eps = config.layer_norm_eps

    def head(enc):
        seq = enc.last_hidden_state  # [b, T, H]
        return (lm_head(seq if x.keep is None else np.take(seq, x.keep, axis=1), params.lm_head, eps),)  # [b, T', V]

    b, t = x.position_ids.shape[:2]
    work = lm_head_work(params, config, b * (t if x.keep is None else len(x.keep)))
    (logits,), enc = over_rows(params, config, x, head, work)
    loss = None if x.labels is None else losses.causal_lm_loss(logits, x.labels)
    return CausalLMOutputWithCrossAttentions(
        loss=loss, logits=logits, past_key_values=x.cache if x.return_cache else None,
        cross_attentions=cross_attentions(enc, x), **extras(enc, x))


def sequence_classification(params: Params, config: Config, x: Inputs):
    p = params.classifier

    def head(enc):  # dense -> tanh -> out_proj on <s>: [b, K]
        return (linear(np.tanh(linear(enc.last_hidden_state[:, 0, :], p.dense.weight, p.dense.bias)),
                       p.out_proj.weight, p.out_proj.bias),)

    (logits,), enc = over_rows(params, config, x, head)
    loss = None if x.labels is None else losses.sequence_classification_loss(logits, x.labels, x.problem_type)
    return SequenceClassifierOutput(loss=loss, logits=logits, **extras(enc, x))


def token_classification(params: Params, config: Config, x: Inputs):
    p = params.token_classifier
    (logits,), enc = over_rows(params, config, x, lambda enc: (linear(enc.last_hidden_state, p.weight, p.bias),))
    loss = None
    if x.labels is not None:
        loss = losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.labels.reshape(-1))  # [B*T, K]
    return TokenClassifierOutput(loss=loss, logits=logits, **extras(enc, x))


def question_answering(params: Params, config: Config, x: Inputs):
    p = params.qa_outputs

    def head(enc):  # [b, T, 2] -> start, end [b, T]
        span = linear(enc.last_hidden_state, p.weight, p.bias)
        return span[..., 0], span[..., 1]

    (start, end), enc = over_rows(params, config, x, head)
    loss = None
    if x.start_positions is not None:
        loss = losses.span_loss(start, end, x.start_positions, x.end_positions)
    return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end, **extras(enc, x))


def multiple_choice(params: Params, config: Config, x: Inputs):
    (pooled,), enc = over_rows(params, config, x, lambda enc: (pooler(enc.last_hidden_state, params.pooler),))  # [B*C, H]
    p = params.choice_classifier
    logits = linear(pooled, p.weight, p.bias).reshape(-1, x.num_choices)  # [B*C, 1] -> [B, C]
    loss = None if x.labels is None else losses.cross_entropy(logits, x.labels)
    return MultipleChoiceModelOutput(loss=loss, logits=logits, **extras(enc, x))


FORWARD = {
    "base": base,
    "masked-lm": masked_lm,
    "causal-lm": causal_lm,
    "sequence-classification": sequence_classification,
    "token-classification": token_classification,
    "question-answering": question_answering,
    "multiple-choice": multiple_choice,
}
