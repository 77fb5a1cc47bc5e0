"""Random checkpoints for every pipeline head, written with NumPy only (no torch): the corpus tests
compare refimpl with itself (one process against a cluster), so they need models, not an oracle.

``write(folder, task, seed, **config)``: config.json (the shipped tiny model's, with the overrides
and the task's architecture), model.safetensors (every key of ``params.hf_key_table`` for the
task, ~N(0, 0.5^2), LayerNorm scales ~1 + N(0, 0.1^2), as conftest's ``randomize_``) and the
shipped tokenizer files (the real RoBERTa BPE).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from refimpl.config import Config
from refimpl.golden import save_tensors
from refimpl.hub import SHIPPED
from refimpl.params import TASKS, hf_key_table

TINY = SHIPPED["tiny"]
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
HEADS = {  # corpus task: (model task, config overrides)
    "embed": ("base", {}),
    "fill-mask": ("masked-lm", {}),
    "classify": ("sequence-classification", {"id2label": {0: "negative", 1: "neutral", 2: "positive"}}),
    "tag": ("token-classification", {"id2label": NER_LABELS}),
    "qa": ("question-answering", {}),
    "choose": ("multiple-choice", {}),
}


def write(folder, task: str, seed: int, **overrides) -> str:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(TINY, "config.json"), encoding="utf-8") as f:
        d = json.load(f)
    d.update(overrides)
    if "id2label" in overrides:
        d["label2id"] = {v: k for k, v in overrides["id2label"].items()}
    d["architectures"] = [TASKS[task][0]]
    config = Config.from_dict(d)
    rng = np.random.default_rng(seed)
    tensors = {}
    for e in hf_key_table(config, task):
        if e.key == "lm_head.decoder.weight":
            continue  # tied to the word embeddings, left out as transformers writes it
        noise = rng.standard_normal(e.shape).astype(np.float32)
        is_scale = e.key.endswith("LayerNorm.weight") or e.key.endswith("layer_norm.weight")
        tensors[e.key] = (1.0 + 0.1 * noise) if is_scale else 0.5 * noise
    save_tensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TINY, name), os.path.join(folder, name))
    return folder
