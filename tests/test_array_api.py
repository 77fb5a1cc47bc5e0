"""The core math runs unchanged on ``array_api_strict`` arrays: no NumPy-only call can hide.

array_api_strict implements exactly the Array API standard and nothing else (no fancy indexing
beyond the standard, no implicit NumPy conversion), so a forward pass that runs on it will also run
on CuPy. Every task is run on strict arrays and compared with the NumPy run of the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import refimpl
from refimpl.backend import to_numpy
from refimpl.params import map_leaves
from tolerances import assert_close

xps = pytest.importorskip("array_api_strict")

TASKS = ["base", "masked-lm", "causal-lm", "sequence-classification", "token-classification", "question-answering", "multiple-choice"]


def to_strict(model: refimpl.Model) -> refimpl.Model:
    return refimpl.Model(model.config, map_leaves(lambda a: xps.asarray(np.asarray(a)), model.params), model.task)


def task_inputs(task, rng, config):
    b, t = 2, 6
    ids = rng.integers(3, config.vocab_size, size=(b, t))
    ids[:, 0] = 0
    mask = np.ones((b, t), dtype=np.int64)
    ids[1, 4:] = config.pad_token_id
    mask[1, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (np.arange(t) >= 3).astype(np.int64)[None].repeat(b, 0)}
    if task in ("masked-lm", "causal-lm", "token-classification"):
        k = config.vocab_size if task != "token-classification" else config.num_labels
        inputs["labels"] = np.where(mask == 1, rng.integers(0, k, size=(b, t)), -100)
    elif task == "sequence-classification":
        inputs["labels"] = rng.integers(0, config.num_labels, size=(b,))
    elif task == "question-answering":
        inputs["start_positions"] = np.array([1, 9])
        inputs["end_positions"] = np.array([2, 3])
    elif task == "multiple-choice":
        inputs = {k: np.stack([v, v[::-1]], axis=1) for k, v in inputs.items()}  # [B, C=2, T]
        inputs["labels"] = np.array([1, 0])
    return inputs


@pytest.mark.parametrize("task", TASKS)
def test_forward_runs_on_array_api_strict(hf_factory, task):
    kwargs = {"is_decoder": True} if task == "causal-lm" else {}
    _, folder = hf_factory(task, seed=11, **kwargs)
    model = refimpl.from_pretrained(folder, dtype="float64")
    strict = to_strict(model)
    inputs = task_inputs(task, np.random.default_rng(0), model.config)
    ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    out = strict(**{k: xps.asarray(v) for k, v in inputs.items()}, output_hidden_states=True, output_attentions=True)
    for name, value in ours.to_dict().items():
        got = out[name]
        if isinstance(value, tuple):
            for i, (a, b) in enumerate(zip(got, value)):
                assert type(a).__module__.startswith("array_api_strict"), f"{name}[{i}] left the namespace"
                assert_close(to_numpy(a), b, "float64", f"{name}[{i}]")
        else:
            assert type(got).__module__.startswith("array_api_strict"), f"{name} left the namespace"
            assert_close(to_numpy(got), value, "float64", name)
