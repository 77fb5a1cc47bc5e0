"""``Model``: a config, a parameter tree and a task, callable like a transformers model.

Reading order for the forward pass: :meth:`Model.__call__` validates the inputs and dispatches to
one ``_forward_<task>`` method; each calls :meth:`Model._base` (embeddings -> blocks -> final
LayerNorm, in :mod:`refimpl.embeddings` / :mod:`refimpl.encoder`) and then its head from
:mod:`refimpl.heads` and its loss from :mod:`refimpl.losses`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import heads, losses
from .attention import attention_bias
from .backend import CUPY_INSTALL_HINT, is_cupy, namespace, to_numpy
from .config import Config
from .embeddings import embed, position_ids_from_input_ids, position_ids_from_inputs_embeds
from .cache import KVCache, empty_cache, has_cross
from .encoder import EncoderOutput
from .split import encode_maybe_split, rows_maybe_split, splits
from .ops import REFERENCE, Kernels
from .outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .params import (
    TASKS,
    Params,
    map_leaves,
    normalize_task,
    num_parameters,
)
from .safetensors_io import CheckpointError, parse_dtype
from .tracing import Trace, record, scope

BACKENDS = ("numba", "numpy", "cupy")


class InputError(ValueError):
    """Bad model input; the message names the argument and what it must be."""


class Model:
    """A RoBERTa-PreLayerNorm model for one task. Pure data plus a ``__call__`` that runs the math.

    Attributes: ``config`` (:class:`Config`), ``params`` (:class:`Params`), ``task`` (a key of
    :data:`refimpl.params.TASKS`), ``kernels`` (the implementations of the fused steps),
    ``name_or_path`` (the local folder :func:`refimpl.from_pretrained` loaded, where the tokenizer
    is; None for a model built in memory; kept by :meth:`to` and :meth:`astype`).
    """

    name_or_path: str | None = None

    def __init__(self, config: Config, params: Params, task: str = "base", kernels: Kernels = REFERENCE):
        self.config = config
        self.params = params
        self.task = normalize_task(task)
        self.kernels = kernels
        head = TASKS[self.task][1]
        if head is not None and getattr(params, head) is None:
            raise CheckpointError(f"task {self.task!r} needs the {head} parameters, which these params lack")

    # ---- properties --------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.params.embeddings.word.dtype

    @property
    def xp(self):
        return namespace(self.params.embeddings.word)

    def num_parameters(self) -> int:
        return num_parameters(self.params)

    def astype(self, dtype: str) -> "Model":
        """The same model computing in ``dtype`` ("float32" or "float64"); ties are kept."""
        target = parse_dtype(dtype)
        xp = self.xp
        cache: dict[int, Any] = {}

        def convert(a):
            if id(a) not in cache:
                cache[id(a)] = a if a.dtype == target else xp.astype(a, getattr(xp, np.dtype(target).name))
            return cache[id(a)]

        return self._same_source(Model(self.config, map_leaves(convert, self.params), self.task, self.kernels))

    def _same_source(self, other: "Model") -> "Model":
        other.name_or_path = self.name_or_path
        return other

    @property
    def backend(self) -> str:
        """``numba`` (NumPy arrays, Numba kernels), ``numpy`` (the pure reference) or ``cupy``."""
        return "cupy" if is_cupy(self.xp) else self.kernels.name

    def to(self, backend: str) -> "Model":
        """The same model on another backend (:data:`BACKENDS`); parameters move once, ties kept.

        ``numpy`` is the pure NumPy reference; ``numba`` (the CPU default) runs the Numba kernels
        of :mod:`refimpl.kernels` for LayerNorm, masked softmax and bias+GELU, each tested against
        its NumPy definition; ``cupy`` moves the parameters to the GPU and runs the same math
        functions through the Array API namespace. Outputs stay on the model's device.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if backend == "cupy":
            try:
                import cupy
            except ImportError:
                raise ImportError(f"backend='cupy' needs CuPy: {CUPY_INSTALL_HINT}") from None
            move = cupy.asarray
            kernels = REFERENCE
        else:
            move = to_numpy
            if backend == "numba":
                from .kernels import numba_kernels

                kernels = numba_kernels()
            else:
                kernels = REFERENCE
        cache: dict[int, Any] = {}

        def convert(a):
            if id(a) not in cache:
                cache[id(a)] = move(a)
            return cache[id(a)]

        return self._same_source(Model(self.config, map_leaves(convert, self.params), self.task, kernels))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model(task={self.task!r}, dtype={np.dtype(self.dtype).name if hasattr(self.dtype, 'kind') else self.dtype}, "
            f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
            f"vocab={c.vocab_size}, parameters={self.num_parameters():,})"
        )

    # ---- the forward pass --------------------------------------------------------------------
    def __call__(
        self,
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
        trace: Trace | None = None,
    ):
        """The forward pass. Decoders (``config.is_decoder``, tasks base and causal-lm) also take
        ``use_cache`` (default ``config.use_cache``) and a cache from an earlier call as
        ``past_key_values=`` or ``cache=`` (transformers 5.x's name); they return the updated cache
        in ``past_key_values``. With a cache, pass only the new ids and a 2-D ``attention_mask``
        covering the cached and the new positions, [B, P + T]. See docs/decoder.md.
        """
        task = self.task
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
        if task == "multiple-choice":
            if encoder_hidden_states is not None or encoder_attention_mask is not None:
                raise InputError("multiple choice has no cross-attention: encoder_hidden_states/encoder_attention_mask are for decoders")
            return self._forward_multiple_choice(
                input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels,
                output_hidden_states, output_attentions, trace,
            )
        kv, return_cache = self._resolve_cache(
            input_ids if input_ids is not None else inputs_embeds, past_key_values, cache, use_cache, labels
        )
        base = self._base(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            encoder_hidden_states, encoder_attention_mask, trace, cache=kv, need_probs=output_attentions,
        )
        # The heads run over the halves of the batch exactly when the encoder did (refimpl.split).
        split = splits(self.kernels, base.last_hidden_state.shape[0], trace=trace, cache=kv, encoder_hidden_states=encoder_hidden_states)
        kv = kv if return_cache else None
        extras = dict(
            hidden_states=tuple(base.hidden_states) if output_hidden_states else None,
            attentions=tuple(base.attentions) if output_attentions else None,
        )
        seq = base.last_hidden_state  # [B, T, H]
        t = scope(trace, "head")
        if task == "base":
            pooled = None if self.params.pooler is None else self._rows(
                lambda s: heads.pooler(s, self.params.pooler, trace=t), seq, split)  # [B, H]
            return BaseModelOutputWithPoolingAndCrossAttentions(
                last_hidden_state=seq, pooler_output=pooled, past_key_values=kv,
                cross_attentions=self._cross(base, output_attentions), **extras,
            )
        if task == "masked-lm":
            logits = record(trace, "logits", self._rows(self._lm_head(t), seq, split))  # [B, T, V]
            loss = None
            if labels is not None:
                lab = self._labels(labels, seq.shape[:2], "labels")
                loss = losses.cross_entropy(self.xp.reshape(logits, (-1, logits.shape[-1])), self.xp.reshape(lab, (-1,)))
            return MaskedLMOutput(loss=record(trace, "loss", loss), logits=logits, **extras)
        if task == "causal-lm":
            kept = self._keep_positions(seq, logits_to_keep)  # [B, T', H]
            logits = record(trace, "logits", self._rows(self._lm_head(t), kept, split))  # [B, T', V]
            loss = None
            if labels is not None:
                if kept.shape[1] != seq.shape[1]:
                    raise InputError("labels need the logits of every position; leave logits_to_keep at 0 when passing labels")
                lab = self._labels(labels, seq.shape[:2], "labels")
                loss = losses.causal_lm_loss(logits, lab)
            return CausalLMOutputWithCrossAttentions(
                loss=record(trace, "loss", loss), logits=logits, past_key_values=kv,
                cross_attentions=self._cross(base, output_attentions), **extras,
            )
        if task == "sequence-classification":
            logits = record(trace, "logits", self._rows(
                lambda s: heads.classification_head(s, self.params.classifier, trace=t), seq, split))  # [B, K]
            loss = None if labels is None else self._sequence_classification_loss(logits, labels)
            return SequenceClassifierOutput(loss=record(trace, "loss", loss), logits=logits, **extras)
        if task == "token-classification":
            logits = record(trace, "logits", self._rows(
                lambda s: heads.token_classification_head(s, self.params.token_classifier), seq, split))  # [B, T, K]
            loss = None
            if labels is not None:
                lab = self._labels(labels, seq.shape[:2], "labels")
                loss = losses.cross_entropy(self.xp.reshape(logits, (-1, logits.shape[-1])), self.xp.reshape(lab, (-1,)))
            return TokenClassifierOutput(loss=record(trace, "loss", loss), logits=logits, **extras)
        if task == "question-answering":
            if self.config.num_labels != 2:
                raise CheckpointError(f"question answering needs num_labels=2 (start, end); the config has {self.config.num_labels}")
            start, end = self._rows(lambda s: heads.question_answering_head(s, self.params.qa_outputs), seq, split)  # [B, T] each
            record(trace, "start_logits", start)
            record(trace, "end_logits", end)
            loss = None
            if (start_positions is None) != (end_positions is None):
                raise InputError("pass both start_positions and end_positions, or neither")
            if start_positions is not None:
                b = seq.shape[0]
                sp = self._labels(start_positions, (b,), "start_positions", allow_trailing_one=True)
                ep = self._labels(end_positions, (b,), "end_positions", allow_trailing_one=True)
                loss = losses.span_loss(start, end, sp, ep)
            return QuestionAnsweringModelOutput(loss=record(trace, "loss", loss), start_logits=start, end_logits=end, **extras)
        raise AssertionError(task)  # pragma: no cover

    def _rows(self, head, seq, split: bool):
        """``head(seq)`` for a head that treats each row of ``seq`` [B, ...] on its own: over the two
        halves of the batch when the encoder ran that way (``split``, from :func:`refimpl.split.splits`),
        so BLAS stays single-threaded for the whole forward; else as it is."""
        return rows_maybe_split(head, seq, kernels=self.kernels, split=split)

    def _lm_head(self, trace):
        return lambda s: heads.lm_head(s, self.params.lm_head, eps=self.config.layer_norm_eps, kernels=self.kernels, trace=trace)

    def _resolve_cache(self, ref, past_key_values, cache, use_cache, labels):
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
        if self.task not in ("base", "causal-lm"):
            if passed is not None:
                raise InputError(f"a KV cache is for the base and causal-lm tasks, not {self.task!r}")
            return None, False
        if not self.config.is_decoder:
            if passed is not None:
                raise InputError("a KV cache needs a decoder: this config has is_decoder=False")
            return None, False
        use_cache = self.config.use_cache if use_cache is None else bool(use_cache)
        if labels is not None:
            use_cache = False
        if passed is None and use_cache:
            batch = ref.shape[0] if hasattr(ref, "shape") else len(ref) if ref is not None else 0
            device = getattr(self.params.embeddings.word, "device", None)
            passed = empty_cache(self.config, batch, self.dtype, self.xp, device)
        return passed, use_cache

    def _cross(self, base: EncoderOutput, output_attentions: bool):
        if not output_attentions or not self.config.add_cross_attention or base.cross_attentions[0] is None:
            return None
        return tuple(base.cross_attentions)

    def _forward_multiple_choice(
        self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels,
        output_hidden_states, output_attentions, trace,
    ):
        """[B, C, T] inputs are flattened to [B*C, T], scored through the pooler, reshaped to [B, C]."""
        if self.params.pooler is None:
            raise CheckpointError(
                "multiple choice scores the pooler output, and this checkpoint has no pooler weights "
                "(pooler.dense.*); use a checkpoint trained for multiple choice"
            )
        xp = self.xp
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        ref_arr = _to_array(ref, xp, "input_ids" if input_ids is not None else "inputs_embeds", self.dtype if input_ids is None else None)
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
            a = _to_array(x, xp, name, float_dtype, allow_float)
            if a.ndim != 2 + ndim_tail or tuple(a.shape[:2]) != (b, c):
                raise InputError(f"{name} must have shape [{b}, {c}, ...] like the inputs; got {tuple(a.shape)}")
            return xp.reshape(a, (b * c, *a.shape[2:]))

        base = self._base(
            flat(input_ids, "input_ids"), flat(attention_mask, "attention_mask", allow_float=True), flat(token_type_ids, "token_type_ids"),
            flat(position_ids, "position_ids"), flat(inputs_embeds, "inputs_embeds", 2, self.dtype), None, None, trace,
            need_probs=output_attentions,
        )
        pooled = self._rows(lambda s: heads.pooler(s, self.params.pooler, trace=scope(trace, "head")), base.last_hidden_state, splits(self.kernels, base.last_hidden_state.shape[0], trace=trace))  # [B*C, H]
        logits = record(trace, "logits", heads.multiple_choice_head(pooled, self.params.choice_classifier, c))  # [B, C]
        loss = None
        if labels is not None:
            loss = losses.cross_entropy(logits, self._labels(labels, (b,), "labels", classes=c))
        return MultipleChoiceModelOutput(
            loss=record(trace, "loss", loss), logits=logits,
            hidden_states=tuple(base.hidden_states) if output_hidden_states else None,
            attentions=tuple(base.attentions) if output_attentions else None,
        )

    def _base(
        self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
        encoder_hidden_states, encoder_attention_mask, trace, cache: KVCache | None = None,
        need_probs: bool = True,
    ) -> EncoderOutput:
        """Validate and resolve the inputs, then embeddings -> blocks -> final LayerNorm.

        ``cache`` (decoders): the :class:`~refimpl.cache.KVCache` holding P earlier positions; it is
        updated in place with this call's T positions. ``need_probs``: whether the attention
        probabilities are kept (``output_attentions``); without them the kernels may skip them.
        """
        c, xp, dtype = self.config, self.xp, self.dtype
        past_length = 0 if cache is None else cache.length
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        device = getattr(self.params.embeddings.word, "device", None)
        if input_ids is not None:
            input_ids = _to_array(input_ids, xp, "input_ids")
            if input_ids.ndim != 2:
                raise InputError(
                    f"input_ids must be 2-D [batch, length]; got shape {tuple(input_ids.shape)}"
                    + (" (wrap a single sequence in a list)" if input_ids.ndim == 1 else "")
                )
            b, t = input_ids.shape
            _check_range(xp, input_ids, 0, c.vocab_size, "input_ids", f"the vocabulary [0, {c.vocab_size})")
        else:
            inputs_embeds = _to_array(inputs_embeds, xp, "inputs_embeds", dtype)
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.hidden_size:
                raise InputError(f"inputs_embeds must have shape [batch, length, {c.hidden_size}]; got {tuple(inputs_embeds.shape)}")
            b, t = inputs_embeds.shape[:2]
        if b == 0 or t == 0:
            raise InputError(f"the inputs are empty (batch {b}, length {t})")
        if cache is not None:
            self._check_cache(cache, b)
        s = past_length + t
        # Position ids: RoBERTa's, from the ids (pads get pad_token_id), or sequential from embeddings.
        if position_ids is None:
            if input_ids is not None:
                position_ids = position_ids_from_input_ids(input_ids, c.pad_token_id, past_length)
            else:
                position_ids = position_ids_from_inputs_embeds(b, t, c.pad_token_id, xp, device)
            limit_hint = (
                f"the sequence is longer than the model allows: at most max_position_embeddings - "
                f"pad_token_id - 1 = {c.max_sequence_length} tokens (cached ones included); truncate the input"
            )
            if int(xp.max(position_ids)) >= c.max_position_embeddings:
                raise InputError(limit_hint)
        else:
            position_ids = self._shaped_ints(position_ids, (b, t), "position_ids")
            _check_range(xp, position_ids, 0, c.max_position_embeddings, "position_ids", f"[0, {c.max_position_embeddings})")
        if token_type_ids is None:
            token_type_ids = xp.zeros((b, t), dtype=xp.int64, device=device)
        else:
            token_type_ids = self._shaped_ints(token_type_ids, (b, t), "token_type_ids")
            _check_range(xp, token_type_ids, 0, c.type_vocab_size, "token_type_ids", f"[0, type_vocab_size={c.type_vocab_size})")
        if past_length and attention_mask is not None:
            attention_mask = _to_array(attention_mask, xp, "attention_mask", allow_float=True)
        if past_length and attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[1] == t:
            raise InputError(
                f"with a cache holding {past_length} positions, attention_mask covers the cached and the new "
                f"positions: shape [{b}, {s}] (the previous mask with {t} columns appended), not [{b}, {t}]"
            )
        bias = attention_bias(
            self._mask(attention_mask, b, t, s, "attention_mask"),
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
                    self._mask(mask, b, t, s_enc, "encoder_attention_mask"),
                    batch=b, query_length=t, key_length=s_enc, dtype=dtype, xp=xp, device=device,
                )
        elif encoder_hidden_states is not None:
            if not c.add_cross_attention:
                raise InputError("encoder_hidden_states need cross-attention layers: this config has add_cross_attention=False")
            encoder_hidden_states = _to_array(encoder_hidden_states, xp, "encoder_hidden_states", dtype)
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
                encoder_attention_mask = self._mask(encoder_attention_mask, b, t, s_enc, "encoder_attention_mask")
                encoder_bias = attention_bias(
                    encoder_attention_mask,
                    batch=b, query_length=t, key_length=s_enc, dtype=dtype, xp=xp, device=device,
                )
            if cache is not None and not cached_cross:
                cache.encoder_attention_mask = encoder_attention_mask  # reused by later calls that omit it
        elif encoder_attention_mask is not None:
            raise InputError("encoder_attention_mask was given without encoder_hidden_states")
        emb = embed(
            self.params.embeddings, position_ids, token_type_ids, eps=c.layer_norm_eps,
            input_ids=input_ids, inputs_embeds=inputs_embeds, trace=scope(trace, "embeddings"),
        )  # [B, T, H]
        # encode(...) itself, or the same over the two halves of the batch on two threads (numba backend)
        return encode_maybe_split(
            emb, self.params, c, bias, encoder_hidden_states=encoder_hidden_states, encoder_bias=encoder_bias,
            cache=cache, kernels=self.kernels, trace=trace, need_probs=need_probs,
        )

    def _check_cache(self, cache, b: int) -> None:
        """A cache passed back must come from this model's kind of call: same layers, batch, dtype."""
        if len(cache.layers) != self.config.num_hidden_layers:
            raise InputError(f"the cache has {len(cache.layers)} layers; this model has {self.config.num_hidden_layers}")
        k = cache.layers[0].keys
        if k is not None and (k.shape[0] != b or k.dtype != self.dtype):
            raise InputError(
                f"the cache holds batch {k.shape[0]} in {k.dtype}; this call has batch {b} in {self.dtype}"
            )

    # ---- input helpers -----------------------------------------------------------------------
    def _shaped_ints(self, x, shape: tuple, name: str):
        a = _to_array(x, self.xp, name)
        if tuple(a.shape) != tuple(shape):
            raise InputError(f"{name} must have shape {list(shape)} like the inputs; got {list(a.shape)}")
        return a

    def _mask(self, mask, b: int, t: int, s: int, name: str):
        """A 2-D [B, S] padding mask (any numeric or bool dtype) or a 4-D [B|1, 1|N, T, S] mask."""
        if mask is None:
            return None
        xp = self.xp
        m = _to_array(mask, xp, name, allow_float=True)
        if m.ndim == 2:
            if tuple(m.shape) != (b, s):
                raise InputError(f"{name} must have shape [{b}, {s}] (batch, key length); got {list(m.shape)}")
            return m
        if m.ndim == 4:
            n = self.config.num_attention_heads
            bb, nn, tt, ss = m.shape
            if bb not in (1, b) or nn not in (1, n) or tt not in (1, t) or ss != s:
                raise InputError(f"a 4-D {name} must have shape [{b} or 1, 1 or {n}, {t} or 1, {s}]; got {list(m.shape)}")
            if m.dtype != xp.bool and m.dtype != self.dtype:
                raise InputError(
                    f"a 4-D {name} is an additive bias and must be bool or the model's dtype "
                    f"({self.dtype}); got {m.dtype}"
                )
            return m
        raise InputError(f"{name} must be 2-D [batch, key length] or 4-D; got {m.ndim}-D")

    def _labels(self, labels, shape: tuple, name: str, allow_trailing_one: bool = False, classes: int | None = None):
        """Integer labels of ``shape``; ``labels`` must lie in [0, classes) or be -100 (``classes``
        defaults to the vocabulary for the LM tasks and to num_labels for token classification)."""
        a = _to_array(labels, self.xp, name)
        if allow_trailing_one and a.ndim == len(shape) + 1 and a.shape[-1] == 1:
            a = self.xp.reshape(a, tuple(shape))
        if tuple(a.shape) != tuple(shape):
            raise InputError(f"{name} must have shape {list(shape)}; got {list(a.shape)}")
        if classes is None and name == "labels":
            classes = self.config.num_labels if self.task == "token-classification" else self.config.vocab_size
        if classes is not None:
            _check_labels(self.xp, a, classes, name)
        return a

    def _keep_positions(self, seq, logits_to_keep):
        """``logits_to_keep``: 0 keeps every position, k > 0 the last k, an index array those positions."""
        xp = self.xp
        if isinstance(logits_to_keep, (int, np.integer)) and not isinstance(logits_to_keep, bool):
            k = int(logits_to_keep)
            if k < 0:
                raise InputError(f"logits_to_keep must be >= 0; got {k}")
            return seq if k == 0 else seq[:, -k:, :]
        idx = _to_array(logits_to_keep, xp, "logits_to_keep")
        if idx.ndim != 1:
            raise InputError("logits_to_keep must be an int or a 1-D array of positions")
        _check_range(xp, idx, 0, seq.shape[1], "logits_to_keep", f"[0, {seq.shape[1]})")
        return xp.take(seq, idx, axis=1)

    def _sequence_classification_loss(self, logits, labels):
        """The loss ``problem_type`` asks for, inferred as transformers does when unset.

        num_labels == 1 -> regression (MSE); integer labels -> single-label (cross-entropy);
        otherwise multi-label (BCE with logits). Unlike transformers, the inference is made per call
        and never written back into the config.
        """
        xp, k = self.xp, self.config.num_labels
        b = logits.shape[0]
        lab = _to_array(labels, xp, "labels", allow_float=True)
        problem = self.config.problem_type
        if problem is None:
            if k == 1:
                problem = "regression"
            elif xp.isdtype(lab.dtype, "integral"):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            lab = xp.astype(lab, self.dtype)
            if k == 1:
                if lab.size != b:
                    raise InputError(f"regression labels must have {b} values (one per sequence); got shape {list(lab.shape)}")
                return losses.mse(xp.reshape(logits, (-1,)), xp.reshape(lab, (-1,)))
            if tuple(lab.shape) != (b, k):
                raise InputError(f"regression labels must have shape [{b}, {k}]; got {list(lab.shape)}")
            return losses.mse(logits, lab)
        if problem == "single_label_classification":
            if not xp.isdtype(lab.dtype, "integral"):
                raise InputError("single-label classification needs integer labels")
            if tuple(lab.shape) not in ((b,), (b, 1)):
                raise InputError(f"single-label classification labels must have shape [{b}]; got {list(lab.shape)}")
            _check_labels(xp, lab, k, "labels")
            return losses.cross_entropy(logits, xp.reshape(lab, (-1,)))
        if tuple(lab.shape) != (b, k):
            raise InputError(f"multi-label classification labels must have shape [{b}, {k}] (0/1 per label); got {list(lab.shape)}")
        return losses.bce_with_logits(logits, xp.astype(lab, self.dtype))


# ---------------------------------------------------------------------------------------------
# Input conversion
# ---------------------------------------------------------------------------------------------


def _is_zero_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) == 0


def _to_array(x, xp, name: str, float_dtype=None, allow_float: bool = False):
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
        if not xp.isdtype(x.dtype, "real floating"):
            raise InputError(f"{name} must be a floating-point array; got dtype {x.dtype}")
        if x.dtype != float_dtype:
            raise InputError(f"{name} has dtype {x.dtype} but the model computes in {float_dtype}; cast it first")
        return x
    if xp.isdtype(x.dtype, "bool"):
        if allow_float:
            return x
        raise InputError(f"{name} must hold integers; got dtype bool (a mask passed in its place?)")
    if xp.isdtype(x.dtype, "integral"):
        return x if allow_float else xp.astype(x, xp.int64)
    if allow_float and xp.isdtype(x.dtype, "real floating"):
        return x
    raise InputError(f"{name} must hold {'numbers' if allow_float else 'integers'}; got dtype {x.dtype}")


def _same_namespace(x, xp) -> bool:
    try:
        return namespace(x) is xp or namespace(x).__name__ == xp.__name__
    except TypeError:
        return False


def _check_range(xp, a, lo: int, hi: int, name: str, what: str) -> None:
    if a.size == 0:
        return
    mn, mx = int(xp.min(a)), int(xp.max(a))
    if mn < lo or mx >= hi:
        bad = mn if mn < lo else mx
        raise InputError(f"{name} contains {bad}, outside {what}")


def _check_labels(xp, a, k: int, name: str) -> None:
    """Class labels must lie in [0, k) or equal -100 (ignored)."""
    bad = xp.logical_and(a != losses.IGNORE_INDEX, xp.logical_or(a < 0, a >= k))
    if bool(xp.any(bad)):
        raise InputError(f"{name} must lie in [0, {k}) or be -100 (ignored); found {losses.first_flagged(xp, a, bad)}")
