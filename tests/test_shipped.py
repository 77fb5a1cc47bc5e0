"""The random checkpoints shipped in refimpl/data: one per head, small, honest about being random,
loadable by refimpl and transformers alike (same outputs), with a tokenizer both read the same way."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import refimpl
from conftest import task_inputs
from refimpl.hub import SHIPPED
from refimpl.params import TASKS
from refimpl.tokenizer import Tokenizer
from tolerances import assert_close

EXPECTED = {  # name: (task, labels)
    "tiny": ("masked-lm", None),
    "tiny-classify": ("sequence-classification", ["negative", "positive"]),
    "tiny-tag": ("token-classification", ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]),
    "tiny-qa": ("question-answering", None),
    "tiny-choose": ("multiple-choice", None),
    "tiny-generate": ("causal-lm", None),
}
TEXTS = ["Hello world, this is a test.", "Pétursdóttir lives in Reykjavík 🙂!", "  spaces   and\ttabs\n"]


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def test_one_shipped_checkpoint_per_head_within_a_size_budget():
    assert sorted(SHIPPED) == sorted(EXPECTED)
    assert {EXPECTED[n][0] for n in SHIPPED} == set(TASKS) - {"base"}  # every head can be tried
    sizes = {name: folder_bytes(folder) for name, folder in SHIPPED.items()}
    assert sizes["tiny"] < 5_000_000
    assert all(size < 400_000 for name, size in sizes.items() if name != "tiny"), sizes
    assert sum(sizes.values()) < 7_000_000, sizes  # the package data stays a few MB


@pytest.mark.parametrize("name", list(EXPECTED))
def test_model_card_says_random(name):
    with open(os.path.join(SHIPPED[name], "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert card.startswith("---\n") and "Random weights: this model was never trained" in card
    assert f"`{name}`" in card and "scripts/make_tiny_checkpoint.py" in card


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shipped_checkpoint_matches_transformers(name):
    """refimpl (float64) and transformers (the same folder, float64) give the same outputs."""
    import torch
    import transformers

    task, labels = EXPECTED[name]
    model = refimpl.from_pretrained(name, dtype="float64")
    assert model.task == task and model.name_or_path == SHIPPED[name]
    if labels is not None:
        assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.is_decoder == (task == "causal-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = getattr(transformers, TASKS[task][0]).from_pretrained(SHIPPED[name], attn_implementation="eager")
    hf = hf.double().eval()
    inputs = task_inputs(task, model.config, np.random.default_rng(14))
    ours = model(**inputs)
    with torch.no_grad():
        theirs = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    # transformers computes the causal-LM loss in float32 (test_parity's
    # test_causal_lm_loss_is_computed_in_model_dtype): compare that one at float32's tolerance.
    for field in ("loss", "logits", "start_logits", "end_logits"):
        if field == "loss" and task == "causal-lm":
            assert_close(np.asarray(ours.loss), theirs.loss.numpy(), "float32", f"{name} loss")
        elif getattr(theirs, field, None) is not None:
            assert_close(np.asarray(getattr(ours, field)), getattr(theirs, field).numpy(), "float64", f"{name} {field}")


@pytest.mark.parametrize("name", ["tiny", "tiny-qa"])
def test_shipped_tokenizer_reads_as_transformers_reads_it(name):
    """The full RoBERTa vocabulary and the reduced one (first merges only) tokenize the same way in
    refimpl and transformers, and every id is in the model's vocabulary."""
    import transformers

    ours = Tokenizer.from_pretrained(SHIPPED[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(SHIPPED[name])
    vocab = refimpl.from_pretrained(name).config.vocab_size
    assert len(ours) == vocab
    for text in TEXTS + [("Where?", "She lives in Paris.")]:
        args = text if isinstance(text, tuple) else (text,)
        ids = ours(*args)["input_ids"][0].tolist()
        assert ids == hf(*args)["input_ids"] and max(ids) < vocab, text
        if not isinstance(text, tuple):
            assert ours.decode(ids, skip_special_tokens=True) == text
