"""Tiny random checkpoints with the real RoBERTa tokenizer, one per pipeline task (built once a session).

Each is a transformers model (conftest's ``build_hf`` + ``randomize_``: weights ~N(0, 0.5^2), so
scores are far from uniform) saved with ``save_pretrained`` in float32, with the tokenizer files of
tests/data/roberta-tokenizer copied in. ``get(tmp_path_factory)`` returns
``{name: (hf_model_float32, folder)}`` and the transformers tokenizer under ``"tokenizer"``.
"""

from __future__ import annotations

import os
import shutil

from conftest import build_hf, save_hf

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "data", "roberta-tokenizer")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
SHAPE = dict(vocab_size=50265, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=514, type_vocab_size=1)
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}

SPECS = {  # name: (task, seed, config overrides)
    "mlm": ("masked-lm", 1, {}),
    "cls": ("sequence-classification", 2, {"id2label": {0: "negative", 1: "neutral", 2: "positive"}}),
    "cls_multi": ("sequence-classification", 3, {"id2label": {0: "sports", 1: "politics", 2: "science"},
                                                 "problem_type": "multi_label_classification"}),
    "cls_one": ("sequence-classification", 4, {"id2label": {0: "LABEL_0"}}),
    "ner": ("token-classification", 9, {"id2label": NER_LABELS}),
    "qa": ("question-answering", 6, {}),
    "mc": ("multiple-choice", 7, {}),
    "causal": ("causal-lm", 8, {}),
}

_BUILT: dict = {}


def copy_tokenizer(folder) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_DIR, name), os.path.join(folder, name))


def get(tmp_path_factory) -> dict:
    if _BUILT:
        return _BUILT
    import transformers

    root = tmp_path_factory.mktemp("pipeline-checkpoints")
    for name, (task, seed, overrides) in SPECS.items():
        kwargs = {**SHAPE, **overrides}
        if "id2label" in kwargs:
            kwargs["label2id"] = {v: k for k, v in kwargs["id2label"].items()}
        model = build_hf(task, seed, **kwargs)
        folder = save_hf(model, root / name, dtype="float32")
        copy_tokenizer(folder)
        _BUILT[name] = (model.float(), folder)
    _BUILT["tokenizer"] = transformers.AutoTokenizer.from_pretrained(_BUILT["mlm"][1])
    return _BUILT
