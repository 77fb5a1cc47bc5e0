"""The parameter tree, and the ONE table that names its leaves in Hugging Face state dicts.

Parameters are plain data: small dataclasses whose leaves are arrays in the checkpoint's own
orientation (a ``Linear.weight`` is ``[out, in]``). The tree for a whole model is :class:`Params`.

:func:`hf_key_table` is the single declarative mapping ``tree path -> state-dict key``; loading
(``load_hf_state_dict``), export and every converter go through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from .config import Config

# ---------------------------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------------------------


@dataclass
class Linear:
    weight: Any  # [out, in]
    bias: Any  # [out]


@dataclass
class LayerNorm:
    weight: Any  # [H]
    bias: Any  # [H]


@dataclass
class Embeddings:
    word: Any  # [V, H]
    position: Any  # [max_position_embeddings, H]
    token_type: Any  # [type_vocab_size, H]
    layer_norm: LayerNorm


@dataclass
class Attention:
    """One (self- or cross-) attention sub-block with its own pre-LayerNorm."""

    layer_norm: LayerNorm  # applied to the block input before q/k/v
    query: Linear  # [H, H]
    key: Linear  # [H, H]
    value: Linear  # [H, H]
    output: Linear  # [H, H]


@dataclass
class Layer:
    attention: Attention
    crossattention: Attention | None
    ffn_layer_norm: LayerNorm  # pre-FFN LayerNorm (transformers: intermediate.LayerNorm)
    intermediate: Linear  # [I, H]
    output: Linear  # [H, I]


@dataclass
class LMHead:
    dense: Linear  # [H, H]
    layer_norm: LayerNorm
    decoder_weight: Any  # [V, H], tied to the word embeddings unless tie_word_embeddings=False
    bias: Any  # [V]


@dataclass
class ClassificationHead:
    dense: Linear  # [H, H]
    out_proj: Linear  # [num_labels, H]


@dataclass
class Params:
    embeddings: Embeddings
    layers: list[Layer]
    final_layer_norm: LayerNorm  # transformers: roberta_prelayernorm.LayerNorm
    pooler: Linear | None = None  # [H, H]; absent in the task models that do not use it
    lm_head: LMHead | None = None  # masked-lm, causal-lm
    classifier: ClassificationHead | None = None  # sequence-classification
    token_classifier: Linear | None = None  # token-classification: [num_labels, H]
    qa_outputs: Linear | None = None  # question-answering: [num_labels, H]
    choice_classifier: Linear | None = None  # multiple-choice: [1, H]
    extras: dict = field(default_factory=dict)  # unused by the math; kept for round trips


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

# task -> (transformers class name, the head's tree field, whether transformers builds a pooler)
TASKS: dict[str, tuple[str, str | None, bool]] = {
    "base": ("RobertaPreLayerNormModel", None, True),
    "masked-lm": ("RobertaPreLayerNormForMaskedLM", "lm_head", False),
    "causal-lm": ("RobertaPreLayerNormForCausalLM", "lm_head", False),
    "sequence-classification": ("RobertaPreLayerNormForSequenceClassification", "classifier", False),
    "token-classification": ("RobertaPreLayerNormForTokenClassification", "token_classifier", False),
    "question-answering": ("RobertaPreLayerNormForQuestionAnswering", "qa_outputs", False),
    "multiple-choice": ("RobertaPreLayerNormForMultipleChoice", "choice_classifier", True),
}
_CLASS_TO_TASK = {cls: task for task, (cls, _, _) in TASKS.items()}
# The original efficient_mlm classes and plain RoBERTa names map to the same tasks.
_CLASS_TO_TASK.update({cls.replace("RobertaPreLayerNorm", "Roberta"): t for cls, t in _CLASS_TO_TASK.items()})


def normalize_task(task: str) -> str:
    """A task name or a transformers class name -> one of :data:`TASKS`."""
    if task in TASKS:
        return task
    if task in _CLASS_TO_TASK:
        return _CLASS_TO_TASK[task]
    alias = task.replace("_", "-").lower()
    if alias in TASKS:
        return alias
    raise ValueError(
        f"unknown task {task!r}; use one of {', '.join(TASKS)} or a transformers class name such as "
        "'RobertaPreLayerNormForMaskedLM'"
    )


def task_from_architectures(architectures: list[str] | None) -> str:
    """The task named by ``config.json``'s ``architectures`` (``base`` when absent)."""
    for arch in architectures or []:
        if arch in _CLASS_TO_TASK:
            return _CLASS_TO_TASK[arch]
    return "base"


# ---------------------------------------------------------------------------------------------
# The one key table
# ---------------------------------------------------------------------------------------------

BASE_PREFIX = "roberta_prelayernorm."


class Entry(NamedTuple):
    path: str  # tree path, e.g. "layers.3.attention.query.weight"
    key: str  # Hugging Face state-dict key
    shape: tuple[int, ...]  # the shape the config implies


def _linear(path: str, key: str, n_out: int, n_in: int) -> list[Entry]:
    return [Entry(f"{path}.weight", f"{key}.weight", (n_out, n_in)), Entry(f"{path}.bias", f"{key}.bias", (n_out,))]


def _norm(path: str, key: str, h: int) -> list[Entry]:
    return [Entry(f"{path}.weight", f"{key}.weight", (h,)), Entry(f"{path}.bias", f"{key}.bias", (h,))]


def _attention(path: str, key: str, h: int) -> list[Entry]:
    return (
        _norm(f"{path}.layer_norm", f"{key}.LayerNorm", h)
        + _linear(f"{path}.query", f"{key}.self.query", h, h)
        + _linear(f"{path}.key", f"{key}.self.key", h, h)
        + _linear(f"{path}.value", f"{key}.self.value", h, h)
        + _linear(f"{path}.output", f"{key}.output.dense", h, h)
    )


def hf_key_table(config: Config, task: str, *, with_pooler: bool | None = None) -> list[Entry]:
    """``[Entry(tree path, Hugging Face state-dict key, shape), ...]`` for ``task``.

    Paths use dots and list indices (``layers.3.attention.query.weight``). Keys are those of
    transformers' task classes: base-model keys carry the ``roberta_prelayernorm.`` prefix except
    for ``task="base"``. The tied decoder weight ``lm_head.decoder.weight`` is listed; loaders take
    it from the word embeddings when a file omits it (as transformers writes tied weights).
    """
    task = normalize_task(task)
    _, head, default_pooler = TASKS[task]
    pooler = default_pooler if with_pooler is None else with_pooler
    H, I, V, C = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_labels
    table: list[Entry] = [
        Entry("embeddings.word", "embeddings.word_embeddings.weight", (V, H)),
        Entry("embeddings.position", "embeddings.position_embeddings.weight", (config.max_position_embeddings, H)),
        Entry("embeddings.token_type", "embeddings.token_type_embeddings.weight", (config.type_vocab_size, H)),
        *_norm("embeddings.layer_norm", "embeddings.LayerNorm", H),
    ]
    for i in range(config.num_hidden_layers):
        p, k = f"layers.{i}", f"encoder.layer.{i}"
        table += _attention(f"{p}.attention", f"{k}.attention", H)
        if config.add_cross_attention:
            table += _attention(f"{p}.crossattention", f"{k}.crossattention", H)
        table += _norm(f"{p}.ffn_layer_norm", f"{k}.intermediate.LayerNorm", H)
        table += _linear(f"{p}.intermediate", f"{k}.intermediate.dense", I, H)
        table += _linear(f"{p}.output", f"{k}.output.dense", H, I)
    table += _norm("final_layer_norm", "LayerNorm", H)
    if pooler:
        table += _linear("pooler", "pooler.dense", H, H)
    prefix = "" if task == "base" else BASE_PREFIX
    table = [e._replace(key=prefix + e.key) for e in table]
    if head == "lm_head":
        table += _linear("lm_head.dense", "lm_head.dense", H, H)
        table += _norm("lm_head.layer_norm", "lm_head.layer_norm", H)
        table += [Entry("lm_head.decoder_weight", "lm_head.decoder.weight", (V, H)), Entry("lm_head.bias", "lm_head.bias", (V,))]
    elif head == "classifier":
        table += _linear("classifier.dense", "classifier.dense", H, H)
        table += _linear("classifier.out_proj", "classifier.out_proj", C, H)
    elif head == "token_classifier":
        table += _linear("token_classifier", "classifier", C, H)
    elif head == "qa_outputs":
        table += _linear("qa_outputs", "qa_outputs", C, H)
    elif head == "choice_classifier":
        table += _linear("choice_classifier", "classifier", 1, H)
    return table


# Keys that transformers may write but that carry no information of their own: alias -> source.
TIED_ALIASES = {"lm_head.decoder.bias": "lm_head.bias"}


# ---------------------------------------------------------------------------------------------
# Building and walking the tree
# ---------------------------------------------------------------------------------------------


def build_params(config: Config, task: str, leaves: Mapping[str, Any]) -> Params:
    """Assemble a :class:`Params` from ``{tree path: array}`` (as listed by :func:`hf_key_table`)."""

    def lin(p: str) -> Linear:
        return Linear(leaves[f"{p}.weight"], leaves[f"{p}.bias"])

    def ln(p: str) -> LayerNorm:
        return LayerNorm(leaves[f"{p}.weight"], leaves[f"{p}.bias"])

    def opt_lin(p: str) -> Linear | None:
        return lin(p) if f"{p}.weight" in leaves else None

    def attention(p: str) -> Attention:
        return Attention(ln(f"{p}.layer_norm"), lin(f"{p}.query"), lin(f"{p}.key"), lin(f"{p}.value"), lin(f"{p}.output"))

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}"
        layers.append(
            Layer(
                attention=attention(f"{p}.attention"),
                crossattention=attention(f"{p}.crossattention") if config.add_cross_attention else None,
                ffn_layer_norm=ln(f"{p}.ffn_layer_norm"),
                intermediate=lin(f"{p}.intermediate"),
                output=lin(f"{p}.output"),
            )
        )
    lm_head = None
    if "lm_head.bias" in leaves:
        lm_head = LMHead(lin("lm_head.dense"), ln("lm_head.layer_norm"), leaves["lm_head.decoder_weight"], leaves["lm_head.bias"])
    classifier = None
    if "classifier.dense.weight" in leaves:
        classifier = ClassificationHead(lin("classifier.dense"), lin("classifier.out_proj"))
    return Params(
        embeddings=Embeddings(
            leaves["embeddings.word"], leaves["embeddings.position"], leaves["embeddings.token_type"], ln("embeddings.layer_norm")
        ),
        layers=layers,
        final_layer_norm=ln("final_layer_norm"),
        pooler=opt_lin("pooler"),
        lm_head=lm_head,
        classifier=classifier,
        token_classifier=opt_lin("token_classifier"),
        qa_outputs=opt_lin("qa_outputs"),
        choice_classifier=opt_lin("choice_classifier"),
    )


def iter_leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(tree path, array)`` for every leaf of a parameter tree, in field order."""
    if tree is None:
        return
    if dataclasses.is_dataclass(tree):
        for f in dataclasses.fields(tree):
            if f.name == "extras":
                continue
            yield from iter_leaves(getattr(tree, f.name), f"{prefix}{f.name}.")
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            yield from iter_leaves(item, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


def map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    """A new tree with ``fn`` applied to every array leaf (e.g. to change dtype or device)."""
    if tree is None:
        return None
    if dataclasses.is_dataclass(tree):
        changes = {f.name: map_leaves(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree) if f.name != "extras"}
        return dataclasses.replace(tree, **changes)
    if isinstance(tree, list):
        return [map_leaves(fn, t) for t in tree]
    return fn(tree)


def num_parameters(params: Params) -> int:
    """Distinct parameters (a tied decoder weight counts once)."""
    seen, n = set(), 0
    for _, leaf in iter_leaves(params):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            n += int(getattr(leaf, "size", 0))
    return n
