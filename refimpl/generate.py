"""Autoregressive generation with the KV cache: greedy and sampling, batched with left padding.

    ids = generate(model, [[0, 31414, 232]], max_new_tokens=20)            # greedy
    ids = generate(model, batch_ids, attention_mask=mask, do_sample=True,   # sampling
                   temperature=0.8, top_k=50, top_p=0.95, seed=0)

The prompt runs once (prefill); after that each step feeds one token per sequence and reads the
keys/values of everything before it from the cache (:mod:`refimpl.cache`). Only the last position's
logits go through the LM head (``logits_to_keep=1``): with a 50k vocabulary that is the largest
matrix of the model.

Positions (see docs/decoder.md): ``position_style="roberta"`` gives every token the position a full
forward pass over the whole sequence would give it (``pad + 1, pad + 2, ...`` counted over non-pad
tokens; pads get ``pad``). ``position_style="zero-based"`` reproduces transformers'
``GenerationMixin.generate``, which passes its own ``position_ids = cumsum(attention_mask) - 1``
(masked positions set to 0) and then ``last + 1`` per step: positions that RoBERTa never saw in
training, so the two styles give different tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .backend import to_numpy
from .cache import empty_cache
from .encoder import position_ids_from_input_ids



class _FromConfig:
    """The default of ``eos_token_id`` / ``pad_token_id``: the model config's value.

    A named sentinel (``None`` is meaningful for these ids: it disables stopping), so that
    ``help(generate)`` shows ``eos_token_id=FROM_CONFIG`` rather than an object address.
    """

    def __repr__(self) -> str:
        return "FROM_CONFIG"


FROM_CONFIG = _FromConfig()
POSITION_STYLES = ("roberta", "zero-based")


class GenerationError(ValueError):
    """A bad argument to :func:`generate`; the message names it and what it must be."""


# ---------------------------------------------------------------------------------------------
# Choosing the next token
# ---------------------------------------------------------------------------------------------


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """Top-k, then top-p (nucleus) filtering, as transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper``.

    logits: [B, V] -> [B, V] with ``-inf`` at every removed entry.

    - ``top_k``: keep the entries ``>=`` the k-th largest logit of the row (ties at the boundary
      are all kept, as ``scores < topk(scores, k)[-1]`` removes only strictly smaller ones).
    - ``top_p``: sort the row's probabilities (softmax of the logits left by top-k) in decreasing
      order and keep the shortest prefix whose total reaches ``top_p``: an entry is kept when the
      probability of the entries before it is ``< top_p``. The most likely entry is always kept.
    """
    out = np.array(logits, copy=True)
    if out.ndim != 2:
        raise GenerationError(f"logits must be 2-D [batch, vocab]; got shape {list(out.shape)}")
    v = out.shape[-1]
    if top_k is not None:
        if int(top_k) != top_k or top_k < 1:
            raise GenerationError(f"top_k must be a positive integer; got {top_k!r}")
        k = min(int(top_k), v)
        kth = np.sort(out, axis=-1)[:, v - k][:, None]  # [B, 1], the k-th largest
        out = np.where(out < kth, -np.inf, out)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1]; got {top_p!r}")
        if top_p < 1.0:
            probs = _softmax(out)  # [B, V]
            order = np.argsort(-probs, axis=-1, kind="stable")  # [B, V] decreasing
            sorted_p = np.take_along_axis(probs, order, axis=-1)
            before = np.cumsum(sorted_p, axis=-1) - sorted_p  # probability mass ahead of each entry
            keep_sorted = before < top_p
            keep_sorted[:, 0] = True
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, axis=-1)
            out = np.where(keep, out, -np.inf)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from ``softmax(logits)``: [B, V] -> [B] int64.

    Inverse-CDF sampling with one uniform per row from ``rng`` (so a seeded generator gives the
    same tokens run to run); entries at ``-inf`` have probability 0 and are never drawn.
    """
    probs = _softmax(np.asarray(logits, dtype=np.float64))  # [B, V]
    cdf = np.cumsum(probs, axis=-1)  # [B, V]
    u = (1.0 - rng.random(probs.shape[0])) * cdf[:, -1]  # [B], in (0, total]
    idx = np.sum(cdf < u[:, None], axis=-1)  # first entry whose cdf reaches u: its probability is > 0
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.int64)


def next_tokens(
    logits: np.ndarray, *, do_sample: bool, temperature: float, top_k, top_p, rng: np.random.Generator | None
) -> np.ndarray:
    """The next token of every row from its last-position logits [B, V] -> [B] int64.

    Greedy: ``argmax`` (the first maximum on ties, as ``torch.argmax``). Sampling: logits divided by
    ``temperature``, then :func:`filter_logits`, then :func:`sample`.
    """
    if not do_sample:
        return np.argmax(logits, axis=-1).astype(np.int64)
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return sample(filter_logits(scaled, top_k, top_p), rng)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def generate(
    model,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id=FROM_CONFIG,
    pad_token_id=FROM_CONFIG,
    seed: int | None = None,
    position_style: str = "roberta",
    encoder_hidden_states=None,
    encoder_attention_mask=None,
) -> np.ndarray:
    """Continue each prompt of a LEFT-padded batch; returns ids [B, T + n] (NumPy int64).

    model: a causal-lm :class:`~refimpl.model.Model` whose config has ``is_decoder=True``.
    input_ids: [B, T] prompts, shorter ones padded on the left with ``pad_token_id``.
    attention_mask: [B, T] (1 = token, 0 = padding); by default inferred from the pads as
    transformers does (``ids != pad`` when a pad occurs and pad differs from EOS, else all ones).
    n <= max_new_tokens: generation stops early once every row has produced an EOS token (any of
    ``eos_token_id``, an int or a list; ``None`` disables stopping); a row that has finished gets
    ``pad_token_id`` for the remaining steps. Both default to the config's values.
    do_sample=False is greedy (argmax). do_sample=True samples from ``softmax(logits / temperature)``
    after top-k and top-p filtering (:func:`filter_logits`), drawing from
    ``numpy.random.default_rng(seed)``: the same seed gives the same ids.
    position_style: ``"roberta"`` (the positions of a full forward pass) or ``"zero-based"``
    (transformers ``generate()``'s own position ids); see the module docstring.
    encoder_hidden_states / encoder_attention_mask: [B, S_enc, H] / [B, S_enc] for a model with
    cross-attention; their keys and values are computed once and kept in the cache.
    """
    cfg = model.config
    if model.task != "causal-lm" or not cfg.is_decoder:
        raise GenerationError(
            f"generate needs a causal-lm model whose config has is_decoder=True; got task {model.task!r} "
            f"with is_decoder={cfg.is_decoder} (load with task='causal-lm' and set is_decoder in config.json)"
        )
    if position_style not in POSITION_STYLES:
        raise GenerationError(f"position_style must be one of {', '.join(POSITION_STYLES)}; got {position_style!r}")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer; got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if do_sample and not temperature > 0:
        raise GenerationError(f"temperature must be > 0; got {temperature!r}")
    if do_sample:  # validate the filters once, before any compute
        filter_logits(np.zeros((1, 2)), top_k, top_p)

    ids = _int_array(input_ids, "input_ids")
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise GenerationError(f"input_ids must be a non-empty 2-D [batch, length] array; got shape {list(ids.shape)}")
    b, t = ids.shape
    eos = _eos_list(cfg.eos_token_id if eos_token_id is FROM_CONFIG else eos_token_id)
    pad = cfg.pad_token_id if pad_token_id is FROM_CONFIG else pad_token_id
    if pad is None:
        pad = eos[0] if eos else None  # as transformers: pad with EOS when there is no pad token
    mask = _prompt_mask(ids, attention_mask, pad, eos)  # [B, T] int64
    if np.any(np.diff(mask, axis=1) < 0):
        raise GenerationError(
            "attention_mask has padding after a token: generate appends to the right, so pad prompts on the LEFT"
        )

    rng = np.random.default_rng(seed) if do_sample else None
    if position_style == "roberta":
        positions = position_ids_from_input_ids(ids, cfg.pad_token_id)  # [B, T], as model.forward
        count = np.sum(ids != cfg.pad_token_id, axis=1)  # [B] non-pad tokens so far
    else:
        positions = np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1)  # [B, T], transformers' generate
        count = positions[:, -1]
    last = int(np.max(count)) + max_new_tokens + (cfg.pad_token_id if position_style == "roberta" else 0)
    if last >= cfg.max_position_embeddings:
        raise GenerationError(
            f"the prompt ({int(np.max(count))} tokens) plus max_new_tokens={max_new_tokens} reaches position {last}; "
            f"the model has max_position_embeddings={cfg.max_position_embeddings}: shorten one or the other"
        )
    xp = model.xp
    cache = empty_cache(cfg, b, model.dtype, xp, getattr(model.params.embeddings.word, "device", None), capacity=t + max_new_tokens)

    out = np.empty((b, t + max_new_tokens), dtype=np.int64)
    out[:, :t] = ids
    full_mask = np.ones((b, t + max_new_tokens), dtype=np.int64)
    full_mask[:, :t] = mask
    unfinished = np.ones(b, dtype=bool)
    step_ids, step_pos = ids, positions
    n = 0
    while n < max_new_tokens:
        res = model(
            input_ids=step_ids, attention_mask=full_mask[:, : t + n], position_ids=step_pos,
            encoder_hidden_states=encoder_hidden_states if n == 0 else None,
            encoder_attention_mask=encoder_attention_mask if n == 0 else None,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        logits = to_numpy(res.logits[:, -1, :])  # [B, V]
        tok = next_tokens(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
        if eos:
            tok = np.where(unfinished, tok, pad)  # finished rows get pad
        out[:, t + n] = tok
        n += 1
        if eos:
            unfinished &= ~np.isin(tok, eos)
            if not unfinished.any():
                break
        # The new token's position.
        if position_style == "roberta":
            is_token = tok != cfg.pad_token_id
            count = count + is_token
            pos = np.where(is_token, count + cfg.pad_token_id, cfg.pad_token_id)
        else:
            count = count + 1
            pos = count
        step_ids, step_pos = tok[:, None], pos[:, None]  # [B, 1] each
    return np.ascontiguousarray(out[:, : t + n])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _int_array(x, name: str) -> np.ndarray:
    try:
        a = np.asarray(to_numpy(x) if hasattr(x, "dtype") else x)
    except ValueError:
        raise GenerationError(f"{name} is ragged: every row must have the same length (pad on the left)") from None
    if a.dtype == bool or a.dtype.kind not in "iu":
        raise GenerationError(f"{name} must hold integers; got dtype {a.dtype}")
    return a.astype(np.int64)


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, (int, np.integer)):
        return [int(eos)]
    if isinstance(eos, Sequence) and all(isinstance(e, (int, np.integer)) for e in eos):
        return [int(e) for e in eos]
    raise GenerationError(f"eos_token_id must be an int, a list of ints or None; got {eos!r}")


def _prompt_mask(ids: np.ndarray, attention_mask, pad, eos: list[int]) -> np.ndarray:
    """The [B, T] 0/1 mask: as given, or inferred from the pads as transformers' generate does."""
    if attention_mask is not None:
        m = np.asarray(to_numpy(attention_mask) if hasattr(attention_mask, "dtype") else attention_mask)
        if m.shape != ids.shape:
            raise GenerationError(f"attention_mask must have the shape of input_ids {list(ids.shape)}; got {list(m.shape)}")
        return (m != 0).astype(np.int64)
    if pad is not None and np.any(ids == pad) and pad not in eos:
        return (ids != pad).astype(np.int64)
    return np.ones(ids.shape, dtype=np.int64)
