"""Slow checks (``python -m pytest -m slow``): parity at the real model size.

A roberta-base-shaped RobertaPreLayerNormForMaskedLM (12 layers, hidden 768, vocab 50265, 514
positions, eps 1e-5, transformers' own initialisation) against refimpl, float64 and float32, on a
padded batch of 2 x 128 tokens.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers

import refimpl
from conftest import save_hf, torch_forward
from tolerances import assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_sized(tmp_path_factory):
    config = transformers.RobertaPreLayerNormConfig(vocab_size=50265, max_position_embeddings=514, layer_norm_eps=1e-5)
    config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        hf = transformers.RobertaPreLayerNormForMaskedLM(config).eval().double()
    return hf, save_hf(hf, tmp_path_factory.mktemp("base-sized"))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_roberta_base_sized_parity(base_sized, dtype, backend):
    hf, folder = base_sized
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50265, size=(2, 128))
    ids[:, 0] = 0
    ids[1, 100:] = 1
    mask = (ids != 1).astype(np.int64)
    theirs = torch_forward(hf, dtype, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    ours = refimpl.from_pretrained(folder, dtype=dtype, backend=backend)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert_close(ours.logits, theirs.logits.numpy(), dtype, "logits")
    for i in (0, 6, 12):
        assert_close(ours.hidden_states[i], theirs.hidden_states[i].numpy(), dtype, f"hidden_states[{i}]")
