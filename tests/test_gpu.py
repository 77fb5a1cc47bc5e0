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
from conftest import ALL_TASKS, assert_outputs_close, task_inputs
from tolerances import assert_close

OK, WHY = cupy_status()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not OK, reason=f"no usable GPU: {WHY}")]

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("task", ALL_TASKS)
def test_cupy_matches_numpy_float64(hf_factory, task, dtype):
    _, folder = hf_factory(task, seed=21, **({"is_decoder": True} if task == "causal-lm" else {}))
    reference = refimpl.from_pretrained(folder, dtype="float64", backend="numpy")
    gpu = refimpl.from_pretrained(folder, dtype=dtype, backend="cupy")
    assert gpu.backend == "cupy"
    inputs = task_inputs(task, reference.config, np.random.default_rng(0))
    want = reference(**inputs, output_hidden_states=True, output_attentions=True)
    got = gpu(**inputs, output_hidden_states=True, output_attentions=True)
    assert_outputs_close(got, want, dtype, "cupy")


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
