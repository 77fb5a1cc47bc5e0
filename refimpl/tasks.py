"""One pure function per task: embeddings -> encoder -> head -> loss. This is the reference forward.

Each function takes the parameter tree, the config and the validated inputs
(:class:`refimpl.inputs.Inputs`, which hold RoBERTa's position ids, the token types, the additive
attention bias and the labels) and returns transformers' output record. Given a
:class:`~refimpl.tracing.Trace`, every intermediate is recorded under the names of docs/golden.md;
the computation is the same with or without one. :class:`refimpl.Model` calls these on the
``numpy`` and ``cupy`` backends and whenever a trace is attached; the ``numba`` backend runs
:mod:`refimpl.fast.tasks`, held to these by tests.
"""

from __future__ import annotations

from . import heads, losses
from .backend import namespace
from .config import Config
from .encoder import embed
from .encoder import EncoderOutput, encode, feed_forward_block, transformer_layer
from .attention import attention_block
from .ops import layer_norm
from .inputs import Inputs
from .outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from .params import Params
from .tracing import Trace, record, scope


def encoder_forward(params: Params, config: Config, x: Inputs, trace: Trace | None = None) -> EncoderOutput:
    """Embeddings, the L pre-LN blocks and the final LayerNorm: [B, T] ids -> [B, T, H] states."""
    h = embed(params.embeddings, x.position_ids, x.token_type_ids, eps=config.layer_norm_eps,
              input_ids=x.input_ids, inputs_embeds=x.inputs_embeds, trace=scope(trace, "embeddings"))  # [B, T, H]
    return encode(h, params, config, x.attention_bias, encoder_hidden_states=x.encoder_hidden_states,
                  encoder_bias=x.encoder_bias, cache=x.cache, trace=trace)


def first_token_states(params: Params, config: Config, x: Inputs):
    """``encoder_forward(...).last_hidden_state[:, 0]``, [B, H], computing the last block for the
    first position only: a sequence classifier and an ``<s>`` embedding read nothing else.

    The last block's keys and values need every position (``LayerNorm(h)`` [B, T, H], passed to
    the attention sub-block as the states it attends over); its query, output projection, FFN and
    the final LayerNorm run on position 0 alone. Every row's numbers are those of the full encoder
    up to the rounding of a GEMM with fewer rows. Without the shortcut's preconditions (a cache,
    cross-attention, no layers) it is the full encoder's first position.
    """
    if x.cache is not None or x.encoder_hidden_states is not None or not params.layers:
        return encoder_forward(params, config, x).last_hidden_state[:, 0]
    eps, heads_ = config.layer_norm_eps, config.num_attention_heads
    h = embed(params.embeddings, x.position_ids, x.token_type_ids, eps=eps, input_ids=x.input_ids,
              inputs_embeds=x.inputs_embeds)  # [B, T, H]
    for layer in params.layers[:-1]:
        h = transformer_layer(h, layer, x.attention_bias, config).hidden  # [B, T, H]
    last = params.layers[-1]
    p = last.attention
    kv = layer_norm(h, p.layer_norm.weight, p.layer_norm.bias, eps)  # [B, T, H]: what every position offers
    bias = x.attention_bias  # [B|1, 1|N, T|1, S] or None
    if bias is not None and bias.shape[-2] > 1:
        bias = bias[:, :, :1]  # [B|1, 1|N, 1, S]: the first query's row
    h0, _, _ = attention_block(h[:, :1], p, bias, num_heads=heads_, eps=eps, key_value_states=kv,
                               cross=True)  # [B, 1, H]: LayerNorm(h[:, :1]) queries, kv's keys and values
    h0 = feed_forward_block(h0, last, act=config.hidden_act, eps=eps)  # [B, 1, H]
    fl = params.final_layer_norm
    return layer_norm(h0, fl.weight, fl.bias, eps)[:, 0]  # [B, H]


def base(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """The bare encoder, and the pooler ``tanh(W h_<s> + b)`` when the checkpoint has one."""
    enc = encoder_forward(params, config, x, trace)
    seq = enc.last_hidden_state  # [B, T, H]
    pooled = None if params.pooler is None else heads.pooler(seq, params.pooler, trace=scope(trace, "head"))  # [B, H]
    return BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=seq, pooler_output=pooled, past_key_values=x.cache if x.return_cache else None,
        cross_attentions=cross_attentions(enc, x), **extras(enc, x))


def masked_lm(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """LM head on every position; cross-entropy over the labels that are not -100."""
    enc = encoder_forward(params, config, x, trace)
    logits = record(trace, "logits", heads.lm_head(enc.last_hidden_state, params.lm_head, eps=config.layer_norm_eps,
                                                   trace=scope(trace, "head")))  # [B, T, V]
    loss = None
    if x.labels is not None:
        xp = namespace(logits)
        loss = losses.cross_entropy(xp.reshape(logits, (-1, logits.shape[-1])), xp.reshape(x.labels, (-1,)))  # [B*T, V]
    return MaskedLMOutput(loss=record(trace, "loss", loss), logits=logits, **extras(enc, x))


def causal_lm(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """LM head on the kept positions (all, or ``logits_to_keep``); next-token cross-entropy."""
    enc = encoder_forward(params, config, x, trace)
    seq = enc.last_hidden_state  # [B, T, H]
    kept = seq if x.keep is None else namespace(seq).take(seq, x.keep, axis=1)  # [B, T', H]
    logits = record(trace, "logits", heads.lm_head(kept, params.lm_head, eps=config.layer_norm_eps,
                                                   trace=scope(trace, "head")))  # [B, T', V]
    loss = None if x.labels is None else losses.causal_lm_loss(logits, x.labels)  # labels shifted left by one
    return CausalLMOutputWithCrossAttentions(
        loss=record(trace, "loss", loss), logits=logits, past_key_values=x.cache if x.return_cache else None,
        cross_attentions=cross_attentions(enc, x), **extras(enc, x))


def sequence_classification(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """dense -> tanh -> out_proj on the first token (not the pooler); the loss ``problem_type`` names."""
    enc = encoder_forward(params, config, x, trace)
    logits = record(trace, "logits", heads.classification_head(enc.last_hidden_state, params.classifier,
                                                               trace=scope(trace, "head")))  # [B, K]
    loss = None if x.labels is None else losses.sequence_classification_loss(logits, x.labels, x.problem_type)
    return SequenceClassifierOutput(loss=record(trace, "loss", loss), logits=logits, **extras(enc, x))


def token_classification(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """A linear layer on every token; cross-entropy over the labels that are not -100."""
    enc = encoder_forward(params, config, x, trace)
    logits = record(trace, "logits", heads.token_classification_head(enc.last_hidden_state, params.token_classifier))  # [B, T, K]
    loss = None
    if x.labels is not None:
        xp = namespace(logits)
        loss = losses.cross_entropy(xp.reshape(logits, (-1, logits.shape[-1])), xp.reshape(x.labels, (-1,)))  # [B*T, K]
    return TokenClassifierOutput(loss=record(trace, "loss", loss), logits=logits, **extras(enc, x))


def question_answering(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """Start and end logits per token; the mean of the two span cross-entropies."""
    enc = encoder_forward(params, config, x, trace)
    start, end = heads.question_answering_head(enc.last_hidden_state, params.qa_outputs)  # [B, T] each
    record(trace, "start_logits", start)
    record(trace, "end_logits", end)
    loss = None
    if x.start_positions is not None:
        loss = losses.span_loss(start, end, x.start_positions, x.end_positions)
    return QuestionAnsweringModelOutput(loss=record(trace, "loss", loss), start_logits=start, end_logits=end,
                                        **extras(enc, x))


def multiple_choice(params: Params, config: Config, x: Inputs, trace: Trace | None = None):
    """[B, C, T] choices flattened to [B*C, T] (by the inputs), scored through the pooler -> [B, C]."""
    enc = encoder_forward(params, config, x, trace)
    pooled = heads.pooler(enc.last_hidden_state, params.pooler, trace=scope(trace, "head"))  # [B*C, H]
    logits = record(trace, "logits", heads.multiple_choice_head(pooled, params.choice_classifier, x.num_choices))  # [B, C]
    loss = None if x.labels is None else losses.cross_entropy(logits, x.labels)
    return MultipleChoiceModelOutput(loss=record(trace, "loss", loss), logits=logits, **extras(enc, x))


# ---------------------------------------------------------------------------------------------


def extras(enc: EncoderOutput, x: Inputs) -> dict:
    """The optional output fields: ``hidden_states`` (L + 1) and ``attentions`` (L), when asked for."""
    return dict(hidden_states=tuple(enc.hidden_states) if x.output_hidden_states else None,
                attentions=tuple(enc.attentions) if x.output_attentions else None)


def cross_attentions(enc: EncoderOutput, x: Inputs):
    """The cross-attention probabilities (L entries) of a decoder with cross-attention, when asked for."""
    if not x.output_attentions or not enc.cross_attentions or enc.cross_attentions[0] is None:
        return None
    return tuple(enc.cross_attentions)


# task name -> its function (the keys of refimpl.params.TASKS)
FORWARD = {
    "base": base,
    "masked-lm": masked_lm,
    "causal-lm": causal_lm,
    "sequence-classification": sequence_classification,
    "token-classification": token_classification,
    "question-answering": question_answering,
    "multiple-choice": multiple_choice,
}
