"""The pre-LayerNorm transformer block and the stack of blocks.

A block is two (three, with cross-attention) residual updates, each with its own LayerNorm on the
way in and none on the way out::

    x = x + Attention(LayerNorm(x))                       # attention_block
    x = x + CrossAttention(LayerNorm(x), encoder_states)  # only when add_cross_attention
    x = x + W_2 · act(W_1 · LayerNorm(x) + b_1) + b_2      # feed_forward_block

After the last block comes one final LayerNorm (in :func:`encode`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .attention import attention_block
from .backend import namespace
from .cache import KVCache, LayerCache, has_cross
from .config import Config
from .ops import REFERENCE, Kernels, activation
from .params import Layer, Params
from .trace import Trace, record, scope


def feed_forward_block(x, p: Layer, *, act: str, eps: float, kernels: Kernels = REFERENCE, trace: Trace | None = None):
    """``x + W_2 · act(W_1 · LayerNorm(x) + b_1) + b_2``.

    x: [B, T, H] -> [B, T, H] (through [B, T, I]).
    """
    h = record(trace, "layer_norm", kernels.layer_norm(x, p.ffn_layer_norm.weight, p.ffn_layer_norm.bias, eps))  # [B, T, H]
    if trace is None:
        a = kernels.linear_act(h, p.intermediate.weight, p.intermediate.bias, act)  # [B, T, I]
    else:  # the same definition in two recorded steps (linear_act's reference is exactly this)
        pre = record(trace, "pre_activation", kernels.linear(h, p.intermediate.weight, p.intermediate.bias))  # [B, T, I]
        a = record(trace, "activation", activation(act)(pre))  # [B, T, I]
    out = record(trace, "output", kernels.linear(a, p.output.weight, p.output.bias))  # [B, T, H]
    return record(trace, "residual", x + out)


@dataclass
class LayerOutput:
    hidden: object  # [B, T, H]
    self_attention: object  # probabilities [B, N, T, S]
    cross_attention: object | None  # probabilities [B, N, T, S_enc]
    present: tuple | None  # ((k, v) self, (k, v) cross or None), for the cache


def transformer_layer(
    x,
    p: Layer,
    bias,
    config: Config,
    *,
    encoder_hidden_states=None,
    encoder_bias=None,
    cache: LayerCache | None = None,
    kernels: Kernels = REFERENCE,
    trace: Trace | None = None,
    need_probs: bool = True,
) -> LayerOutput:
    """One pre-LN block. x: [B, T, H] -> LayerOutput with hidden [B, T, H].

    ``cache`` is this layer's :class:`~refimpl.cache.LayerCache` (updated in place), or None. With a
    cache that already holds cross-attention keys/values, cross-attention runs on those even when
    ``encoder_hidden_states`` is not passed again. With ``need_probs=False`` the attention
    probabilities are not returned (None), which lets the kernels skip materialising them.
    """
    heads, eps = config.num_attention_heads, config.layer_norm_eps
    x, self_probs, self_kv = attention_block(
        x, p.attention, bias, num_heads=heads, eps=eps, cache=cache, kernels=kernels, trace=scope(trace, "attention"),
        need_probs=need_probs,
    )
    cross_probs, cross_kv = None, None
    if encoder_hidden_states is not None or (cache is not None and has_cross(cache)):
        if p.crossattention is None:
            raise ValueError(
                "encoder_hidden_states were given but the model has no cross-attention layers; "
                "load a config with add_cross_attention=True"
            )
        x, cross_probs, cross_kv = attention_block(
            x,
            p.crossattention,
            encoder_bias,
            num_heads=heads,
            eps=eps,
            key_value_states=encoder_hidden_states,
            cache=cache,
            cross=True,
            kernels=kernels,
            trace=scope(trace, "crossattention"),
            need_probs=need_probs,
        )
    x = feed_forward_block(x, p, act=config.hidden_act, eps=eps, kernels=kernels, trace=scope(trace, "ffn"))
    return LayerOutput(x, self_probs, cross_probs, (self_kv, cross_kv))


@dataclass
class EncoderOutput:
    last_hidden_state: object  # [B, T, H], after the final LayerNorm
    hidden_states: list  # L + 1 entries, transformers 5.x convention (see encode)
    attentions: list  # L entries of [B, N, T, S]
    cross_attentions: list  # L entries of [B, N, T, S_enc] (decoders with cross-attention)
    presents: list  # L entries of ((k, v), cross (k, v) or None)


def encode(
    embeddings,
    params: Params,
    config: Config,
    bias,
    *,
    encoder_hidden_states=None,
    encoder_bias=None,
    cache: KVCache | None = None,
    kernels: Kernels = REFERENCE,
    trace: Trace | None = None,
    need_probs: bool = True,
) -> EncoderOutput:
    """The stack of L blocks and the final LayerNorm. embeddings: [B, T, H] -> EncoderOutput.

    ``hidden_states`` follows transformers 5.x: the embedding output, then the outputs of blocks
    0 .. L-2, then the final-LayerNorm output (equal to ``last_hidden_state``) in place of block
    L-1's raw output. fairseq's ``inner_states`` instead end with the raw output of the last block;
    the trace records it as ``layers.{L-1}.ffn.residual``. ``need_probs=False``: the
    ``attentions``/``cross_attentions`` entries are None (callers that do not return them).
    """
    if (
        kernels.split_batch is not None
        and embeddings.shape[0] >= 2
        and trace is None
        and cache is None
        and encoder_hidden_states is None
    ):
        return _encode_in_parts(embeddings, params, config, bias, kernels=kernels, need_probs=need_probs)
    x = embeddings
    hidden, attentions, crosses, presents = [x], [], [], []
    for i, layer in enumerate(params.layers):
        out = transformer_layer(
            x,
            layer,
            bias,
            config,
            encoder_hidden_states=encoder_hidden_states,
            encoder_bias=encoder_bias,
            cache=None if cache is None else cache.layers[i],
            kernels=kernels,
            trace=scope(trace, f"layers.{i}"),
            need_probs=need_probs,
        )
        x = out.hidden
        hidden.append(x)
        attentions.append(out.self_attention)
        crosses.append(out.cross_attention)
        presents.append(out.present)
    fl = params.final_layer_norm
    last = record(trace, "final_layer_norm", kernels.layer_norm(x, fl.weight, fl.bias, config.layer_norm_eps))  # [B, T, H]
    hidden[-1] = last
    return EncoderOutput(last, hidden, attentions, crosses, presents)


def _encode_in_parts(embeddings, params: Params, config: Config, bias, *, kernels: Kernels, need_probs: bool):
    """:func:`encode` over slices of the batch (``kernels.split_batch`` may run them concurrently),
    joined along the batch axis. Every sequence is computed on its own in either case, so the
    result is the same (bitwise, with the same GEMM kernels)."""
    xp = namespace(embeddings)
    whole = dataclasses.replace(kernels, split_batch=None)

    def part(rows):
        b = bias if bias is None or bias.shape[0] == 1 else bias[rows]  # [B|1, 1|N, T|1, S]
        return encode(embeddings[rows], params, config, b, kernels=whole, need_probs=need_probs)

    parts = kernels.split_batch(part, embeddings.shape[0])
    if len(parts) == 1:
        return parts[0]

    def cat(arrays):
        return None if arrays[0] is None else xp.concat(arrays, axis=0)

    def cat_kv(kvs):
        return None if kvs[0] is None else (cat([kv[0] for kv in kvs]), cat([kv[1] for kv in kvs]))

    def cat_presents(per_part):
        return (cat_kv([p[0] for p in per_part]), cat_kv([p[1] for p in per_part]))

    n = len(parts[0].hidden_states)
    last = cat([p.last_hidden_state for p in parts])
    return EncoderOutput(
        last,
        _LazyParts([[p.hidden_states[i] for p in parts] for i in range(n - 1)] + [last], cat, joined_tail=1),
        [cat([p.attentions[i] for p in parts]) for i in range(n - 1)],
        [cat([p.cross_attentions[i] for p in parts]) for i in range(n - 1)],
        _LazyParts([[p.presents[i] for p in parts] for i in range(n - 1)], cat_presents),
    )


class _LazyParts(list):
    """A list whose entries are joined from their per-part pieces on first access (hidden states
    and keys/values of a split batch are rarely read: only with output_hidden_states)."""

    def __init__(self, pieces, join, joined_tail: int = 0):
        super().__init__(pieces)
        self._join = join
        self._done = [False] * (len(pieces) - joined_tail) + [True] * joined_tail

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        if not self._done[i]:
            super().__setitem__(i, self._join(super().__getitem__(i)))
            self._done[i] = True
        return super().__getitem__(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __setitem__(self, i, value):
        i = range(len(self))[i]
        super().__setitem__(i, value)
        self._done[i] = True

    def __add__(self, other):
        return list(self) + list(other)

    def copy(self):
        return list(self)
