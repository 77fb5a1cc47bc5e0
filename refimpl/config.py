"""The model configuration: transformers' ``RobertaPreLayerNormConfig``, as plain data.

Field names and defaults are those of transformers 5.x (``RobertaPreLayerNormConfig`` and the
``PreTrainedConfig`` fields that matter here). Unknown keys from a ``config.json`` are kept in
``extra`` and written back by :meth:`Config.to_dict`, so a round trip loses nothing.

A ``config.json`` is file content: its sizes are checked against :data:`LIMITS` (generous bounds
far above any released model, so that a corrupt or hostile file is refused before anything is
built from it: a ten-million-layer key table, a hundred-million-entry ``id2label``), and every
field refimpl reads has its type checked, so that a bad file is a :class:`ConfigError` naming the
field, never a ``TypeError`` deep inside.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .io import read_json, short_repr
from .ops import ACTIVATIONS, activation

MODEL_TYPE = "roberta-prelayernorm"
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


class ConfigError(ValueError):
    """A configuration that this model cannot run; the message names the field and the fix."""


# Upper bounds on the sizes a config may declare. Released RoBERTa-style models stay far below:
# xlm-roberta-xxl has 48 layers, hidden 4096, FFN 16384 and a 250,002-token vocabulary; the
# largest label sets of public classifiers are in the tens of thousands.
LIMITS = {
    "vocab_size": 2**24,
    "hidden_size": 2**16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 2**12,
    "intermediate_size": 2**20,
    "max_position_embeddings": 2**21,
    "type_vocab_size": 2**16,
    "num_labels": 2**18,
}
_INT_KEY = re.compile(r"\s*[+-]?\d{1,18}\s*")


def _within_limit(name: str, value: int) -> None:
    if value > LIMITS[name]:
        raise ConfigError(
            f"{name}={short_repr(value)} is above refimpl's limit of {LIMITS[name]:,}, a generous bound that no "
            "released model comes near: the config is corrupt, or it does not describe a RoBERTa-PreLayerNorm model")


def _label_id(key: Any, what: str) -> int:
    if type(key) is int or (isinstance(key, str) and _INT_KEY.fullmatch(key)):
        return int(key)
    raise ConfigError(f"{what} must be an integer label id, got {short_repr(key)}")


@dataclass
class Config:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    use_cache: bool = True
    classifier_dropout: float | None = None
    is_decoder: bool = False
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    # PreTrainedConfig fields used by the heads.
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    architectures: list[str] | None = None
    # Everything else found in config.json (kept, written back, never interpreted).
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # As transformers: label2id is derived only with a default id2label (else kept, even None).
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(2)}
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        if not isinstance(self.id2label, dict):
            raise ConfigError(f"id2label must map label ids to label names, got {short_repr(self.id2label)}")
        if len(self.id2label) > LIMITS["num_labels"]:
            _within_limit("num_labels", len(self.id2label))
        id2label = {}
        for k, v in self.id2label.items():
            if not isinstance(v, (str, int, float)) or isinstance(v, bool):
                raise ConfigError(f"id2label[{short_repr(k)}] must be a label name, got {short_repr(v)}")
            id2label[_label_id(k, "an id2label key")] = v
        self.id2label = id2label
        if self.label2id is not None:
            if not isinstance(self.label2id, dict):
                raise ConfigError(f"label2id must map label names to label ids, got {short_repr(self.label2id)}")
            self.label2id = {k: _label_id(v, f"label2id[{short_repr(k)}]") for k, v in self.label2id.items()}

    # ---- derived quantities ------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def head_size(self) -> int:
        """D = H / N."""
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence the position table allows without a cache.

        Positions start at ``pad_token_id + 1``, so ``max_position_embeddings - pad_token_id - 1``
        tokens fit (514 - 1 - 1 = 512 for roberta-base).
        """
        return self.max_position_embeddings - (self.pad_token_id or 0) - 1

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "Config":
        d = {**d, **overrides}
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k != "num_labels"}
        if "num_labels" in d and d["num_labels"] is not None:
            n = d["num_labels"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ConfigError(f"num_labels must be a positive integer, got {short_repr(n)}")
            _within_limit("num_labels", n)  # before the tables below are built
            if kwargs.get("id2label") is None:
                kwargs["id2label"] = {i: f"LABEL_{i}" for i in range(n)}
                kwargs["label2id"] = {f"LABEL_{i}": i for i in range(n)}
            elif not isinstance(kwargs["id2label"], dict) or len(kwargs["id2label"]) != n:
                raise ConfigError(
                    f"num_labels={n} disagrees with id2label, which has "
                    f"{len(kwargs['id2label']) if isinstance(kwargs['id2label'], dict) else 'no'} entries; drop one of them"
                )
        config = cls(**kwargs, extra=extra)
        config.validate()
        return config

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "Config":
        path = os.fspath(path)
        try:
            d = read_json(path, ConfigError, what="the config", max_bytes=64 * 2**20)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path!r}") from None
        try:
            return cls.from_dict(d, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> "Config":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no config.json in {os.fspath(folder)!r}: a Hugging Face model folder needs one"
            )
        return cls.from_json_file(path, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out = {**self.extra, **d}
        out["model_type"] = MODEL_TYPE
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` applied and validated."""
        return Config.from_dict(self.to_dict(), **changes)

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {short_repr(v)}")
            _within_limit(name, v)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            positive_int(name)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                f"({self.num_attention_heads}); choose heads that divide the hidden size"
            )
        if not isinstance(self.hidden_act, str):
            raise ConfigError(f"hidden_act must be a string, got {type(self.hidden_act).__name__}")
        if len(self.hidden_act) > 64:
            raise ConfigError(f"hidden_act={short_repr(self.hidden_act)} is not an activation name")
        try:
            activation(self.hidden_act)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and eps < 1e300 and math.isfinite(eps)):
            raise ConfigError(f"layer_norm_eps must be a positive finite number, got {short_repr(eps)}")
        if self.pad_token_id is None:
            raise ConfigError(
                "pad_token_id must be set: RoBERTa's position ids count from pad_token_id + 1 "
                "(checkpoints use 1)"
            )
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise ConfigError(f"pad_token_id must be an integer token id (checkpoints use 1), got {short_repr(self.pad_token_id)}")
        if not (0 <= self.pad_token_id < self.vocab_size):
            raise ConfigError(
                f"pad_token_id={self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        if self.pad_token_id + 1 >= self.max_position_embeddings:
            raise ConfigError(
                f"max_position_embeddings={self.max_position_embeddings} leaves no room for a "
                f"token: positions start at pad_token_id + 1 = {self.pad_token_id + 1}"
            )
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(
                f"problem_type={short_repr(self.problem_type)} is not one of {', '.join(PROBLEM_TYPES)}"
            )
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ConfigError(
                'problem_type="single_label_classification" needs num_labels > 1; use num_labels=2 '
                'for binary classification or problem_type="regression"'
            )
        for name in ("is_decoder", "add_cross_attention", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {short_repr(getattr(self, name))}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if isinstance(v, list) and name == "eos_token_id" else [v]
            if not all(i is None or (isinstance(i, int) and not isinstance(i, bool)) for i in ids):
                raise ConfigError(f"{name} must be an integer token id (or null), got {short_repr(v)}")
        if self.architectures is not None and (
            not isinstance(self.architectures, list) or not all(isinstance(a, str) for a in self.architectures)
        ):
            raise ConfigError(
                f"architectures must be a list of class names such as [\"RobertaPreLayerNormForMaskedLM\"], got "
                f"{short_repr(self.architectures)}")
        if self.num_labels < 1:
            raise ConfigError("num_labels must be at least 1 (id2label is empty); set num_labels or id2label")
        if self.add_cross_attention and not self.is_decoder:
            raise ConfigError("add_cross_attention=True needs is_decoder=True")


__all__ = ["Config", "ConfigError", "ACTIVATIONS", "MODEL_TYPE"]
