"""Scheduling, not math: :func:`refimpl.encoder.encode` over slices of the batch.

``Kernels.split_batch`` (the numba backend's) runs the halves of a batch on two threads, each with
single-threaded BLAS, so that the GEMMs *and* the Numba kernels use both cores. Every sequence is
computed on its own either way, so the result is the same: bitwise whenever BLAS picks the same
kernel for a half as for the whole (a half of one row goes to its GEMV instead of its GEMM: then the
same to rounding). :class:`refimpl.model.Model` calls :func:`encode_maybe_split` and, for the heads,
:func:`rows_maybe_split`; the encoder and the heads themselves know nothing of it.
"""

from __future__ import annotations

import dataclasses

from .backend import namespace
from .config import Config
from .encoder import EncoderOutput, encode
from .ops import Kernels
from .params import Params


def splits(kernels: Kernels, batch: int, *, trace=None, cache=None, encoder_hidden_states=None) -> bool:
    """Whether a forward runs over the halves of its batch: ``kernels.split_batch`` set, 2+ sequences,
    and no trace, cache or cross-attention (those run the batch whole). The one statement of the
    rule, for the encoder (:func:`encode_maybe_split`) and the heads (:func:`rows_maybe_split`)."""
    return (kernels.split_batch is not None and batch >= 2
            and trace is None and cache is None and encoder_hidden_states is None)  # fmt: skip


def encode_maybe_split(embeddings, params: Params, config: Config, bias, *, kernels: Kernels, need_probs: bool = True,
                       **kw) -> EncoderOutput:
    """:func:`~refimpl.encoder.encode`, over parts of the batch when :func:`splits` says so; ``kw``
    goes to ``encode`` as it is."""
    if not splits(kernels, embeddings.shape[0], **{k: kw.get(k) for k in ("trace", "cache", "encoder_hidden_states")}):
        return encode(embeddings, params, config, bias, kernels=kernels, need_probs=need_probs, **kw)
    return _encode_in_parts(embeddings, params, config, bias, kernels=kernels, need_probs=need_probs)


def _encode_in_parts(embeddings, params: Params, config: Config, bias, *, kernels: Kernels, need_probs: bool):
    """:func:`~refimpl.encoder.encode` over slices of the batch (``kernels.split_batch`` may run them concurrently),
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


def rows_maybe_split(fn, x, *, kernels: Kernels, split: bool):
    """``fn(x)`` for a head that treats the rows of ``x`` [B, ...] independently (pooler, LM head,
    classifiers): over the halves of the batch on ``kernels.split_batch``'s threads when set, and
    joined along the batch axis (``fn`` may return an array or a tuple of arrays). ``split``: what
    :func:`splits` said for the forward's encoder (False: ``fn(x)`` as it is).

    Besides using both cores, this keeps BLAS single-threaded for the whole of a split forward: a
    multi-threaded OpenBLAS call leaves its worker spinning for ~0.1 s, which would take a core from
    the next split forward (measured: 8x128 base forward 752 ms after an idle pause, 805 ms right
    after a 2-thread GEMM).
    """
    if not split:
        return fn(x)
    parts = kernels.split_batch(lambda rows: fn(x[rows]), x.shape[0])
    if len(parts) == 1:
        return parts[0]
    xp = namespace(x)
    if isinstance(parts[0], tuple):
        return tuple(xp.concat([p[i] for p in parts], axis=0) for i in range(len(parts[0])))
    return xp.concat(parts, axis=0)
