"""Output records with transformers' field names (``ModelOutput`` subclasses, as plain dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ModelOutput:
    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}


@dataclass
class BaseModelOutputWithPoolingAndCrossAttentions(ModelOutput):
    last_hidden_state: Any = None  # [B, T, H]
    pooler_output: Any = None  # [B, H] or None when the checkpoint has no pooler
    hidden_states: tuple | None = None  # L + 1 x [B, T, H]
    attentions: tuple | None = None  # L x [B, N, T, S]
    cross_attentions: tuple | None = None  # L x [B, N, T, S_enc]
    past_key_values: Any = None  # the KV cache (decoders with use_cache=True)

    @property
    def cache(self):
        """transformers 5.x's name for ``past_key_values``."""
        return self.past_key_values


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Any = None
    logits: Any = None  # [B, T, V]
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class CausalLMOutputWithCrossAttentions(ModelOutput):
    loss: Any = None
    logits: Any = None  # [B, T', V] (T' = T, or what logits_to_keep keeps)
    past_key_values: Any = None  # the KV cache (refimpl.cache.KVCache) when use_cache
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None

    @property
    def cache(self):
        """transformers 5.x's name for ``past_key_values``."""
        return self.past_key_values


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Any = None
    logits: Any = None  # [B, num_labels]
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Any = None
    logits: Any = None  # [B, T, num_labels]
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Any = None
    start_logits: Any = None  # [B, T]
    end_logits: Any = None  # [B, T]
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclass
class MultipleChoiceModelOutput(ModelOutput):
    loss: Any = None
    logits: Any = None  # [B, C]
    hidden_states: tuple | None = None  # of the flattened [B*C, T, H] batch, as transformers
    attentions: tuple | None = None
