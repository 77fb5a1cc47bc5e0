"""The KV cache for incremental decoding, as plain data plus a few functions.

A decoder (``config.is_decoder``) that has already seen ``P`` tokens keeps, per layer, the keys and
values of its self-attention over those tokens. The next call feeds only the ``T`` new tokens: their
queries attend over ``S = P + T`` keys (the cached ``P`` and their own ``T``), and their keys and
values are appended. With cross-attention the encoder's keys and values ``[B, N, S_enc, D]`` do not
change from step to step: they are computed once, on the first call, and reused.

Layout (shape legend of :mod:`refimpl.ops`)::

    KVCache
      layers: L x LayerCache
        keys, values     [B, N, capacity, D]   preallocated buffers; [:, :, :length] is filled
        length           P, the number of cached positions (pads included)
        cross_keys       [B, N, S_enc, D] or None   (cross-attention, set on the first call)
        cross_values     [B, N, S_enc, D] or None
      encoder_attention_mask   the 2-D [B, S_enc] (or 4-D) mask given with the encoder states on
                               the first call, reused when a later call passes none

Growth is geometric: when an append does not fit, the buffer is reallocated with at least twice the
capacity and the filled part copied once, so ``n`` one-token steps copy ``O(n)`` entries in total,
not ``O(n^2)`` as concatenating on every step does (transformers' ``DynamicCache``). New keys are
written into the free tail of the buffer with slice assignment.

The cache is mutated in place by :func:`append` (as transformers' caches are): pass it back to the
model to continue the sequence; to branch, :func:`copy_cache` first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backend import namespace
from .config import Config

MIN_CAPACITY = 16  # positions allocated on the first append (at least)


@dataclass
class LayerCache:
    """One layer's cached keys and values. ``keys``/``values``: [B, N, capacity, D] or None (empty)."""

    keys: Any = None  # [B, N, capacity, D]
    values: Any = None  # [B, N, capacity, D]
    length: int = 0  # P: positions filled in keys/values
    cross_keys: Any = None  # [B, N, S_enc, D], computed once
    cross_values: Any = None  # [B, N, S_enc, D]

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


@dataclass
class KVCache:
    """The whole model's cache: one :class:`LayerCache` per layer, plus the encoder mask."""

    layers: list[LayerCache]
    batch: int
    dtype: Any
    encoder_attention_mask: Any = None  # [B, S_enc] (or 4-D), from the first call with encoder states
    xp: Any = field(default=None, repr=False)
    device: Any = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """P: the number of cached positions (every layer holds the same number)."""
        return self.layers[0].length if self.layers else 0

    def get_seq_length(self) -> int:
        """transformers' name for :attr:`length`."""
        return self.length

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]


def empty_cache(config: Config, batch: int, dtype, xp, device=None, capacity: int = 0) -> KVCache:
    """A cache for ``config.num_hidden_layers`` layers and ``batch`` rows, holding nothing yet.

    ``capacity`` > 0 preallocates ``[B, N, capacity, D]`` buffers (e.g. prompt + new tokens in
    :func:`refimpl.generate.generate`), so that decoding never reallocates.
    """
    layers = [LayerCache() for _ in range(config.num_hidden_layers)]
    if capacity > 0:
        shape = (batch, config.num_attention_heads, capacity, config.head_size)
        for lc in layers:
            lc.keys = xp.empty(shape, dtype=dtype, device=device)
            lc.values = xp.empty(shape, dtype=dtype, device=device)
    return KVCache(layers, batch, dtype, xp=xp, device=device)


def _grow(buf, filled: int, needed: int, xp):
    """A buffer [B, N, >= needed, D] holding ``buf[:, :, :filled]``; ``buf`` itself if it is big enough."""
    capacity = buf.shape[2]
    if needed <= capacity:
        return buf
    new_capacity = max(needed, 2 * capacity, MIN_CAPACITY)
    b, n, _, d = buf.shape
    new = xp.empty((b, n, new_capacity, d), dtype=buf.dtype, device=getattr(buf, "device", None))
    if filled:
        new[:, :, :filled, :] = buf[:, :, :filled, :]  # the one copy per doubling
    return new


def append(layer: LayerCache, k, v):
    """Append this step's keys/values and return views of everything cached.

    k, v: [B, N, T, D] -> (keys, values), each a [B, N, P + T, D] view of the layer's buffers.
    ``layer.length`` grows from P to P + T. The returned views stay valid after later appends (they
    cover positions that are never written again, and a reallocation leaves the old buffer alive).
    """
    xp = namespace(k, v)
    p, t = layer.length, k.shape[2]
    if layer.keys is None:
        b, n, _, d = k.shape
        layer.keys = xp.empty((b, n, max(t, MIN_CAPACITY), d), dtype=k.dtype, device=getattr(k, "device", None))
        layer.values = xp.empty((b, n, max(t, MIN_CAPACITY), d), dtype=v.dtype, device=getattr(v, "device", None))
    elif layer.keys.shape[0] != k.shape[0] or layer.keys.shape[1] != k.shape[1] or layer.keys.shape[3] != k.shape[3]:
        raise ValueError(
            f"the cache holds keys of shape [batch, heads, ., head_size] = "
            f"{[layer.keys.shape[0], layer.keys.shape[1], '.', layer.keys.shape[3]]}; this step's are {list(k.shape)}"
        )
    layer.keys = _grow(layer.keys, p, p + t, xp)
    layer.values = _grow(layer.values, p, p + t, xp)
    layer.keys[:, :, p : p + t, :] = k  # [B, N, T, D] into the free tail
    layer.values[:, :, p : p + t, :] = v
    layer.length = p + t
    return layer.keys[:, :, : p + t, :], layer.values[:, :, : p + t, :]  # [B, N, S, D] each


def filled(layer: LayerCache):
    """The cached (keys, values), each [B, N, P, D] (views), or (None, None) when empty."""
    if layer.keys is None:
        return None, None
    return layer.keys[:, :, : layer.length, :], layer.values[:, :, : layer.length, :]


def set_cross(layer: LayerCache, k, v) -> None:
    """Store the cross-attention keys/values [B, N, S_enc, D], computed once from the encoder states."""
    layer.cross_keys, layer.cross_values = k, v


def has_cross(layer: LayerCache) -> bool:
    return layer.cross_keys is not None


def copy_cache(cache: KVCache) -> KVCache:
    """An independent copy (only the filled part of each buffer), to continue one prefix two ways."""
    xp = cache.xp
    layers = []
    for lc in cache.layers:
        k, v = filled(lc)
        layers.append(
            LayerCache(
                None if k is None else xp.asarray(k, copy=True),
                None if v is None else xp.asarray(v, copy=True),
                lc.length,
                lc.cross_keys,  # never written: safe to share
                lc.cross_values,
            )
        )
    return KVCache(layers, cache.batch, cache.dtype, cache.encoder_attention_mask, xp=xp, device=cache.device)
