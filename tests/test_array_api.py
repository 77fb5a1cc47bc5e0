"""The core math runs unchanged on ``array_api_strict`` arrays: no NumPy-only call can hide.

array_api_strict implements exactly the Array API standard and nothing else (no fancy indexing
beyond the standard, no implicit NumPy conversion), so a forward pass that runs on it will also run
on CuPy. Every task is run on strict arrays and compared with the NumPy run of the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest

import refimpl
from refimpl.params import map_leaves
from conftest import ALL_TASKS, assert_outputs_close, task_inputs

xps = pytest.importorskip("array_api_strict")

def to_strict(model: refimpl.Model) -> refimpl.Model:
    return refimpl.Model(model.config, map_leaves(lambda a: xps.asarray(np.asarray(a)), model.params), model.task)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_forward_runs_on_array_api_strict(hf_factory, task):
    kwargs = {"is_decoder": True} if task == "causal-lm" else {}
    _, folder = hf_factory(task, seed=11, **kwargs)
    model = refimpl.from_pretrained(folder, dtype="float64")
    strict = to_strict(model)
    inputs = task_inputs(task, model.config, np.random.default_rng(0))
    want = model(**inputs, output_hidden_states=True, output_attentions=True)
    got = strict(**{k: xps.asarray(v) for k, v in inputs.items()}, output_hidden_states=True, output_attentions=True)
    assert_outputs_close(got, want, "float64", "array_api_strict")
