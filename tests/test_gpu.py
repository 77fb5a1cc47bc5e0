"""GPU checks (``pytest -m gpu``): the parity suite on CuPy against the NumPy float64 result.

Skipped, with the reason, where CuPy is missing or cannot allocate on a GPU (CuPy imports on
machines without a driver and fails only at the first allocation: refimpl.backend.cupy_status
allocates to find out).
"""

from __future__ import annotations

import numpy as np
import pytest

import refimpl
from refimpl.backend import cupy_status, to_numpy
from tolerances import assert_close

OK, WHY = cupy_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"no usable GPU: {WHY}")]

TASKS = ["base", "masked-lm", "causal-lm", "sequence-classification", "token-classification", "question-answering", "multiple-choice"]


def inputs_for(task, config, rng):
    b, t = 3, 11
    ids = rng.integers(3, config.vocab_size, size=(b, t))
    ids[:, 0] = 0
    mask = np.ones((b, t), dtype=np.int64)
    ids[1, 7:] = config.pad_token_id
    mask[1, 7:] = 0
    ids[2, :4] = config.pad_token_id  # left padding
    mask[2, :4] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if task in ("masked-lm", "causal-lm", "token-classification"):
        k = config.vocab_size if task != "token-classification" else config.num_labels
        inputs["labels"] = np.where(mask == 1, rng.integers(0, k, size=(b, t)), -100)
    elif task == "sequence-classification":
        inputs["labels"] = rng.integers(0, config.num_labels, size=(b,))
    elif task == "question-answering":
        inputs["start_positions"], inputs["end_positions"] = np.array([1, 2, 30]), np.array([3, 2, 5])
    elif task == "multiple-choice":
        inputs = {k: np.stack([v, v[::-1]], axis=1) for k, v in inputs.items()}
        inputs["labels"] = np.array([1, 0, 1])
    return inputs


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("task", TASKS)
def test_cupy_matches_numpy_float64(hf_factory, task, dtype):
    _, folder = hf_factory(task, seed=21, **({"is_decoder": True} if task == "causal-lm" else {}))
    reference = refimpl.from_pretrained(folder, dtype="float64", backend="numpy")
    gpu = refimpl.from_pretrained(folder, dtype=dtype, backend="cupy")
    assert gpu.backend == "cupy"
    inputs = inputs_for(task, reference.config, np.random.default_rng(0))
    want = reference(**inputs, output_hidden_states=True, output_attentions=True)
    got = gpu(**inputs, output_hidden_states=True, output_attentions=True)
    for name, value in want.to_dict().items():
        g = got[name]
        if isinstance(value, tuple):
            for i, (a, b) in enumerate(zip(g, value)):
                assert type(a).__module__.startswith("cupy"), f"{name}[{i}] left the GPU"
                assert_close(to_numpy(a), b, dtype, f"{name}[{i}]")
        else:
            assert type(g).__module__.startswith("cupy"), f"{name} left the GPU"
            assert_close(to_numpy(g), value, dtype, name)


def test_cupy_to_and_back(hf_factory):
    _, folder = hf_factory("masked-lm", seed=22)
    cpu = refimpl.from_pretrained(folder, dtype="float64")
    gpu = cpu.to("cupy")
    assert gpu.params.lm_head.decoder_weight is gpu.params.embeddings.word  # tie kept on the device
    back = gpu.to("numpy")
    assert isinstance(back.params.embeddings.word, np.ndarray)
    ids = np.array([[0, 5, 6, 2]])
    assert_close(back(input_ids=ids).logits, cpu(input_ids=ids).logits, "float64", "round trip")


def test_cupy_cached_decoding_and_generation(hf_factory):
    if not hasattr(refimpl, "generate"):
        pytest.skip("refimpl.generate is not available")
    _, folder = hf_factory("causal-lm", seed=23, is_decoder=True)
    cpu = refimpl.from_pretrained(folder, dtype="float64", backend="numpy")
    gpu = cpu.to("cupy")
    prompt = np.array([[1, 1, 0, 5, 6], [0, 7, 8, 9, 10]])
    mask = (prompt != 1).astype(np.int64)
    want = refimpl.generate(cpu, prompt, attention_mask=mask, max_new_tokens=8)
    got = refimpl.generate(gpu, prompt, attention_mask=mask, max_new_tokens=8)
    np.testing.assert_array_equal(to_numpy(got), to_numpy(want))
