"""Input validation: the arguments of a forward pass -> :class:`Inputs`, checked and resolved.

Everything here is about what a caller may pass (lists or arrays, shapes, dtypes, ranges, which
arguments go with which task) and turning it into the arrays the math reads: RoBERTa's position
ids, default token types, the additive attention bias, the KV cache, labels in the shape the loss
takes. The math itself (:mod:`refimpl.tasks`) starts from an :class:`Inputs` and checks nothing.
Every problem is an :class:`InputError` whose message names the argument and what it must be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .attention import attention_bias
from .backend import namespace, to_numpy
from .cache import KVCache, empty_cache, has_cross
from .encoder import position_ids_from_input_ids, position_ids_from_inputs_embeds
from .losses import IGNORE_INDEX, first_flagged
from .io import CheckpointError

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class InputError(ValueError):
    """Bad model input; the message names the argument and what it must be."""


@dataclass
class Inputs:
    """A forward pass's inputs, validated and resolved: what the task functions read.

    Multiple choice arrives here already flattened from [B, C, T] to [B*C, T] (``num_choices`` = C).
    """

    input_ids: Any  # [B, T] int64, or None when inputs_embeds are given
    inputs_embeds: Any  # [B, T, H] in the model's dtype, or None
    position_ids: Any  # [B, T] int64: RoBERTa's (pads get pad_token_id) unless given
    token_type_ids: Any  # [B, T] int64 (zeros unless given)
    attention_bias: Any  # additive [B|1, 1|N, T|1, S] (0 or finfo.min), or None: nothing masked
    encoder_hidden_states: Any = None  # [B, S_enc, H] (decoders with cross-attention)
    encoder_bias: Any = None  # additive [B|1, 1|N, T|1, S_enc], or None
    cache: KVCache | None = None  # decoders: read and extended in place by this call
    return_cache: bool = False  # whether the output carries the cache (past_key_values)
    labels: Any = None  # per task: [B, T] ints, [B] ints, [B] or [B, K] floats; None: no loss
    start_positions: Any = None  # question answering: [B] ints
    end_positions: Any = None  # question answering: [B] ints
    keep: Any = None  # causal LM: the positions whose logits are computed ([T'] ints), None = all
    problem_type: str | None = None  # sequence classification with labels: one of PROBLEM_TYPES
    num_choices: int | None = None  # multiple choice: C
    output_hidden_states: bool = False
    output_attentions: bool = False


def validate(
    model,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    labels=None,
    start_positions=None,
    end_positions=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    logits_to_keep: int | Any = 0,
    past_key_values=None,
    use_cache: bool | None = None,
    cache=None,
) -> Inputs:
    """Check the arguments of ``model(...)`` (a :class:`refimpl.Model`) and resolve them."""
    task = model.task
    if logits_to_keep is None:
        logits_to_keep = 0
    if task != "question-answering" and (start_positions is not None or end_positions is not None):
        raise InputError(f"start_positions/end_positions are for question answering, not {task!r}")
    if task == "base" and labels is not None:
        raise InputError("the base model has no head and takes no labels; load a task model")
    if task == "question-answering" and labels is not None:
        raise InputError("question answering takes start_positions and end_positions, not labels")
    if task != "causal-lm" and not _is_zero_int(logits_to_keep):
        raise InputError(f"logits_to_keep is for causal-lm, not {task!r}")
    if task == "question-answering" and model.config.num_labels != 2:
        raise CheckpointError(f"question answering needs num_labels=2 (start, end); the config has {model.config.num_labels}")
    num_choices = None
    if task == "multiple-choice":
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise InputError("multiple choice has no cross-attention: encoder_hidden_states/encoder_attention_mask are for decoders")
        if model.params.pooler is None:
            raise CheckpointError(
                "multiple choice scores the pooler output, and this checkpoint has no pooler weights "
                "(pooler.dense.*); use a checkpoint trained for multiple choice"
            )
        num_choices, (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds) = _flatten_choices(
            model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
    kv, return_cache = _resolve_cache(model, input_ids if input_ids is not None else inputs_embeds,
                                      past_key_values, cache, use_cache, labels)
    x = _resolve_base(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                      encoder_hidden_states, encoder_attention_mask, kv)
    x.return_cache, x.num_choices = return_cache, num_choices
    x.output_hidden_states, x.output_attentions = bool(output_hidden_states), bool(output_attentions)
    b, t = x.position_ids.shape
    xp = model.xp
    if task == "causal-lm":
        x.keep = _keep_positions(xp, t, logits_to_keep)
        if labels is not None and x.keep is not None:
            raise InputError("labels need the logits of every position; leave logits_to_keep at 0 when passing labels")
    if labels is not None:
        if task in ("masked-lm", "causal-lm"):
            x.labels = _labels(xp, labels, (b, t), "labels", model.config.vocab_size)
        elif task == "token-classification":
            x.labels = _labels(xp, labels, (b, t), "labels", model.config.num_labels)
        elif task == "multiple-choice":
            x.labels = _labels(xp, labels, (b // num_choices,), "labels", num_choices)
        elif task == "sequence-classification":
            x.problem_type, x.labels = _classification_labels(model, labels, b)
    if (start_positions is None) != (end_positions is None):
        raise InputError("pass both start_positions and end_positions, or neither")
    if start_positions is not None:
        x.start_positions = _labels(xp, start_positions, (b,), "start_positions", allow_trailing_one=True)
        x.end_positions = _labels(xp, end_positions, (b,), "end_positions", allow_trailing_one=True)
    return x


# ---------------------------------------------------------------------------------------------
# The shared inputs: ids or embeddings, positions, token types, masks, cache
# ---------------------------------------------------------------------------------------------


def _resolve_base(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                  encoder_hidden_states, encoder_attention_mask, cache: KVCache | None) -> Inputs:
    c, xp, dtype = model.config, model.xp, model.dtype
    past_length = 0 if cache is None else cache.length
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("pass exactly one of input_ids and inputs_embeds")
    device = getattr(model.params.embeddings.word, "device", None)
    if input_ids is not None:
        input_ids = to_array(input_ids, xp, "input_ids")
        if input_ids.ndim != 2:
            raise InputError(
                f"input_ids must be 2-D [batch, length]; got shape {tuple(input_ids.shape)}"
                + (" (wrap a single sequence in a list)" if input_ids.ndim == 1 else "")
            )
        b, t = input_ids.shape
        _check_range(xp, input_ids, 0, c.vocab_size, "input_ids", f"the vocabulary [0, {c.vocab_size})")
    else:
        inputs_embeds = to_array(inputs_embeds, xp, "inputs_embeds", dtype)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
            raise InputError(f"inputs_embeds must have shape [batch, length, {c.hidden_size}]; got {tuple(inputs_embeds.shape)}")
        b, t = inputs_embeds.shape[:2]
    if b == 0 or t == 0:
        raise InputError(f"the inputs are empty (batch {b}, length {t})")
    if cache is not None:
        _check_cache(model, cache, b)
    s = past_length + t
    # Position ids: RoBERTa's, from the ids (pads get pad_token_id), or sequential from embeddings.
    if position_ids is None:
        if input_ids is not None:
            position_ids = position_ids_from_input_ids(input_ids, c.pad_token_id, past_length)
        else:
            position_ids = position_ids_from_inputs_embeds(b, t, c.pad_token_id, xp, device)
        if int(xp.max(position_ids)) >= c.max_position_embeddings:
            raise InputError(
                f"the sequence is longer than the model allows: at most max_position_embeddings - "
                f"pad_token_id - 1 = {c.max_sequence_length} tokens (cached ones included); truncate the input"
            )
    else:
        position_ids = _shaped_ints(xp, position_ids, (b, t), "position_ids")
        _check_range(xp, position_ids, 0, c.max_position_embeddings, "position_ids", f"[0, {c.max_position_embeddings})")
    if token_type_ids is None:
        token_type_ids = xp.zeros((b, t), dtype=xp.int64, device=device)
    else:
        token_type_ids = _shaped_ints(xp, token_type_ids, (b, t), "token_type_ids")
        _check_range(xp, token_type_ids, 0, c.type_vocab_size, "token_type_ids", f"[0, type_vocab_size={c.type_vocab_size})")
    if past_length and attention_mask is not None:
        attention_mask = to_array(attention_mask, xp, "attention_mask", allow_float=True)
    if past_length and attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] == t:
        raise InputError(
            f"with a cache holding {past_length} positions, attention_mask covers the cached and the new "
            f"positions: shape [{b}, {s}] (the previous mask with {t} columns appended), not [{b}, {t}]"
        )
    bias = attention_bias(
        _mask(model, attention_mask, b, t, s, "attention_mask"),
        batch=b, query_length=t, key_length=s, dtype=dtype, xp=xp, device=device,
        causal=c.is_decoder, past_length=past_length,
    )
    encoder_bias = None
    cached_cross = cache is not None and has_cross(cache.layers[0])
    if cached_cross and encoder_hidden_states is None:
        # Cross-attention keys/values come from the cache; the mask given on the first call is reused.
        s_enc = cache.layers[0].cross_keys.shape[2]
        mask = encoder_attention_mask if encoder_attention_mask is not None else cache.encoder_attention_mask
        if mask is not None:
            encoder_bias = attention_bias(
                _mask(model, mask, b, t, s_enc, "encoder_attention_mask"),
                batch=b, query_length=t, key_length=s_enc, dtype=dtype, xp=xp, device=device,
            )
    elif encoder_hidden_states is not None:
        if not c.add_cross_attention:
            raise InputError("encoder_hidden_states need cross-attention layers: this config has add_cross_attention=False")
        encoder_hidden_states = to_array(encoder_hidden_states, xp, "encoder_hidden_states", dtype)
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != c.hidden_size:
            raise InputError(
                f"encoder_hidden_states must have shape [{b}, source_length, {c.hidden_size}]; got {tuple(encoder_hidden_states.shape)}"
            )
        s_enc = encoder_hidden_states.shape[1]
        if cached_cross and s_enc != cache.layers[0].cross_keys.shape[2]:
            raise InputError(
                f"the cache holds cross-attention keys for {cache.layers[0].cross_keys.shape[2]} encoder positions; "
                f"these encoder_hidden_states have {s_enc} (start a new cache for a new source)"
            )
        if encoder_attention_mask is not None:
            encoder_attention_mask = _mask(model, encoder_attention_mask, b, t, s_enc, "encoder_attention_mask")
            encoder_bias = attention_bias(
                encoder_attention_mask,
                batch=b, query_length=t, key_length=s_enc, dtype=dtype, xp=xp, device=device,
            )
        if cache is not None and not cached_cross:
            cache.encoder_attention_mask = encoder_attention_mask  # reused by later calls that omit it
    elif encoder_attention_mask is not None:
        raise InputError("encoder_attention_mask was given without encoder_hidden_states")
    return Inputs(input_ids, inputs_embeds, position_ids, token_type_ids, bias, encoder_hidden_states, encoder_bias, cache)


def _flatten_choices(model, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds):
    """Multiple choice: [B, C, T] inputs -> C and the same inputs as [B*C, T] (embeddings [B*C, T, H])."""
    xp = model.xp
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise InputError("pass exactly one of input_ids and inputs_embeds")
    ref_arr = to_array(ref, xp, "input_ids" if input_ids is not None else "inputs_embeds",
                       model.dtype if input_ids is None else None)
    want = 3 if input_ids is not None else 4
    if ref_arr.ndim != want:
        raise InputError(
            f"multiple choice takes {'input_ids [batch, choices, length]' if want == 3 else 'inputs_embeds [batch, choices, length, hidden]'}; "
            f"got shape {tuple(ref_arr.shape)}"
        )
    b, c = ref_arr.shape[:2]

    def flat(x, name, ndim_tail=1, float_dtype=None, allow_float=False):
        if x is None:
            return None
        a = to_array(x, xp, name, float_dtype, allow_float)
        if a.ndim != 2 + ndim_tail or tuple(a.shape[:2]) != (b, c):
            raise InputError(f"{name} must have shape [{b}, {c}, ...] like the inputs; got {tuple(a.shape)}")
        return xp.reshape(a, (b * c, *a.shape[2:]))  # [B, C, ...] -> [B*C, ...]

    return c, (flat(input_ids, "input_ids"), flat(attention_mask, "attention_mask", allow_float=True),
               flat(token_type_ids, "token_type_ids"), flat(position_ids, "position_ids"),
               flat(inputs_embeds, "inputs_embeds", 2, model.dtype))


def _resolve_cache(model, ref, past_key_values, cache, use_cache, labels):
    """-> (the cache this call reads and extends, or None; whether to return it).

    As transformers: only decoders use a cache (``use_cache`` is ignored otherwise), it defaults
    to ``config.use_cache``, and a call with labels returns none (but still reads one passed in).
    """
    if past_key_values is not None and cache is not None:
        raise InputError("pass the cache as cache= or as past_key_values=, not both")
    passed = past_key_values if past_key_values is not None else cache
    if passed is not None and not isinstance(passed, KVCache):
        raise InputError(
            f"past_key_values must be a refimpl KVCache (returned by a call with use_cache=True); got {type(passed).__name__}"
        )
    if model.task not in ("base", "causal-lm"):
        if passed is not None:
            raise InputError(f"a KV cache is for the base and causal-lm tasks, not {model.task!r}")
        return None, False
    if not model.config.is_decoder:
        if passed is not None:
            raise InputError("a KV cache needs a decoder: this config has is_decoder=False")
        return None, False
    use_cache = model.config.use_cache if use_cache is None else bool(use_cache)
    if labels is not None:
        use_cache = False
    if passed is None and use_cache:
        batch = ref.shape[0] if hasattr(ref, "shape") else len(ref) if ref is not None else 0
        device = getattr(model.params.embeddings.word, "device", None)
        passed = empty_cache(model.config, batch, model.dtype, model.xp, device)
    return passed, use_cache


def _check_cache(model, cache: KVCache, b: int) -> None:
    """A cache passed back must come from this model's kind of call: same layers, batch, dtype."""
    if len(cache.layers) != model.config.num_hidden_layers:
        raise InputError(f"the cache has {len(cache.layers)} layers; this model has {model.config.num_hidden_layers}")
    k = cache.layers[0].keys
    if k is not None and (k.shape[0] != b or k.dtype != model.dtype):
        raise InputError(
            f"the cache holds batch {k.shape[0]} in {k.dtype}; this call has batch {b} in {model.dtype}"
        )


def _mask(model, mask, b: int, t: int, s: int, name: str):
    """A 2-D [B, S] padding mask (any numeric or bool dtype) or a 4-D [B|1, 1|N, T, S] mask."""
    if mask is None:
        return None
    xp = model.xp
    m = to_array(mask, xp, name, allow_float=True)
    if m.ndim == 2:
        if tuple(m.shape) != (b, s):
            raise InputError(f"{name} must have shape [{b}, {s}] (batch, key length); got {list(m.shape)}")
        return m
    if m.ndim == 4:
        n = model.config.num_attention_heads
        bb, nn, tt, ss = m.shape
        if bb not in (1, b) or nn not in (1, n) or tt not in (1, t) or ss != s:
            raise InputError(f"a 4-D {name} must have shape [{b} or 1, 1 or {n}, {t} or 1, {s}]; got {list(m.shape)}")
        if m.dtype != xp.bool and m.dtype != model.dtype:
            raise InputError(
                f"a 4-D {name} is an additive bias and must be bool or the model's dtype "
                f"({model.dtype}); got {m.dtype}"
            )
        return m
    raise InputError(f"{name} must be 2-D [batch, key length] or 4-D; got {m.ndim}-D")


# ---------------------------------------------------------------------------------------------
# Task arguments: labels, positions, logits_to_keep
# ---------------------------------------------------------------------------------------------


def _labels(xp, labels, shape: tuple, name: str, classes: int | None = None, allow_trailing_one: bool = False):
    """Integer labels of ``shape``, in [0, classes) or -100 (ignored) when ``classes`` is given."""
    a = to_array(labels, xp, name)
    if allow_trailing_one and a.ndim == len(shape) + 1 and a.shape[-1] == 1:
        a = xp.reshape(a, tuple(shape))
    if tuple(a.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {list(shape)}; got {list(a.shape)}")
    if classes is not None:
        _check_labels(xp, a, classes, name)
    return a


def _classification_labels(model, labels, b: int):
    """Sequence classification: -> (problem type, labels as its loss takes them).

    The problem type is ``config.problem_type``, or inferred as transformers does when unset:
    num_labels == 1 -> regression (MSE); integer labels -> single-label (cross-entropy); otherwise
    multi-label (BCE with logits). Unlike transformers, the inference is made per call and never
    written back into the config. Labels come back as [B] ints (single-label), [B] or [B, K] in
    the model's dtype (regression, K = num_labels), or [B, K] 0/1 in the model's dtype (multi-label).
    """
    xp, k = model.xp, model.config.num_labels
    lab = to_array(labels, xp, "labels", allow_float=True)
    problem = model.config.problem_type
    if problem is None:
        if k == 1:
            problem = "regression"
        elif _isdtype(xp, lab.dtype, "integral"):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        lab = xp.astype(lab, model.dtype)
        if k == 1:
            if lab.size != b:
                raise InputError(f"regression labels must have {b} values (one per sequence); got shape {list(lab.shape)}")
            return problem, xp.reshape(lab, (b,))
        if tuple(lab.shape) != (b, k):
            raise InputError(f"regression labels must have shape [{b}, {k}]; got {list(lab.shape)}")
        return problem, lab
    if problem == "single_label_classification":
        if not _isdtype(xp, lab.dtype, "integral"):
            raise InputError("single-label classification needs integer labels")
        if tuple(lab.shape) not in ((b,), (b, 1)):
            raise InputError(f"single-label classification labels must have shape [{b}]; got {list(lab.shape)}")
        _check_labels(xp, lab, k, "labels")
        return problem, xp.reshape(xp.astype(lab, xp.int64), (b,))
    if tuple(lab.shape) != (b, k):
        raise InputError(f"multi-label classification labels must have shape [{b}, {k}] (0/1 per label); got {list(lab.shape)}")
    return problem, xp.astype(lab, model.dtype)


def _keep_positions(xp, t: int, logits_to_keep):
    """``logits_to_keep``: 0 keeps every position (None), k > 0 the last k, an index array those
    positions -> [T'] int64 positions, or None."""
    if isinstance(logits_to_keep, (int, np.integer)) and not isinstance(logits_to_keep, bool):
        k = int(logits_to_keep)
        if k < 0:
            raise InputError(f"logits_to_keep must be >= 0; got {k}")
        return None if k == 0 or k >= t else xp.arange(t - k, t, dtype=xp.int64)
    idx = to_array(logits_to_keep, xp, "logits_to_keep")
    if idx.ndim != 1:
        raise InputError("logits_to_keep must be an int or a 1-D array of positions")
    _check_range(xp, idx, 0, t, "logits_to_keep", f"[0, {t})")
    return idx


# ---------------------------------------------------------------------------------------------
# Conversion and checks
# ---------------------------------------------------------------------------------------------


_KINDS = {"bool": "b", "integral": "iu", "real floating": "f"}


def _isdtype(xp, dtype, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``; a NumPy dtype (NumPy's, CuPy's) answered from its kind letter
    (NumPy's isdtype takes ~2.5 us a call, a few per model call)."""
    if isinstance(dtype, np.dtype):
        return dtype.kind in _KINDS[kind]
    return xp.isdtype(dtype, kind)


def _is_zero_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) == 0


def to_array(x, xp, name: str, float_dtype=None, allow_float: bool = False):
    """Nested lists or any backend's array -> an array of ``xp``.

    Integer inputs (``float_dtype is None and not allow_float``) must have an integer (or, for masks,
    bool) dtype and become int64. With ``float_dtype``, the input must already be that dtype (or be a
    list, converted to it): refimpl never changes a float array's precision behind your back.
    """
    if not hasattr(x, "dtype") or not _same_namespace(x, xp):  # lists, scalars, strings, other backends
        try:
            arr = np.asarray(to_numpy(x) if hasattr(x, "dtype") else x)
        except ValueError:
            raise InputError(f"{name} is ragged: every row must have the same length (pad it)") from None
        if arr.dtype == object:
            raise InputError(f"{name} is ragged or holds non-numbers: every row must have the same length")
        if float_dtype is not None and arr.dtype.kind in "iuf" and not hasattr(x, "dtype"):
            arr = arr.astype(float_dtype)
        elif arr.size == 0 and not hasattr(x, "dtype"):
            arr = arr.astype(np.int64)  # [] or [[]]: let the emptiness check speak, not the dtype check
        x = xp.asarray(arr)
    if float_dtype is not None:
        if not _isdtype(xp, x.dtype, "real floating"):
            raise InputError(f"{name} must be a floating-point array; got dtype {x.dtype}")
        if x.dtype != float_dtype:
            raise InputError(f"{name} has dtype {x.dtype} but the model computes in {float_dtype}; cast it first")
        return x
    if _isdtype(xp, x.dtype, "bool"):
        if allow_float:
            return x
        raise InputError(f"{name} must hold integers; got dtype bool (a mask passed in its place?)")
    if _isdtype(xp, x.dtype, "integral"):
        return x if allow_float else xp.astype(x, xp.int64)
    if allow_float and _isdtype(xp, x.dtype, "real floating"):
        return x
    raise InputError(f"{name} must hold {'numbers' if allow_float else 'integers'}; got dtype {x.dtype}")


def _same_namespace(x, xp) -> bool:
    try:
        return namespace(x) is xp or namespace(x).__name__ == xp.__name__
    except TypeError:
        return False


def _shaped_ints(xp, x, shape: tuple, name: str):
    a = to_array(x, xp, name)
    if tuple(a.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {list(shape)} like the inputs; got {list(a.shape)}")
    return a


def _check_range(xp, a, lo: int, hi: int, name: str, what: str) -> None:
    if a.size == 0:
        return
    mn, mx = int(xp.min(a)), int(xp.max(a))
    if mn < lo or mx >= hi:
        bad = mn if mn < lo else mx
        raise InputError(f"{name} contains {bad}, outside {what}")


def _check_labels(xp, a, k: int, name: str) -> None:
    """Class labels must lie in [0, k) or equal -100 (ignored)."""
    bad = xp.logical_and(a != IGNORE_INDEX, xp.logical_or(a < 0, a >= k))
    if bool(xp.any(bad)):
        raise InputError(f"{name} must lie in [0, {k}) or be -100 (ignored); found {first_flagged(xp, a, bad)}")
