"""transformers 4.x PyTorch through the transformers adapter, in its own environment
(tests/envs/transformers4.txt: transformers 4.46.3, whose pins conflict with the test extra's 5.x);
skipped cleanly under transformers 5."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from refimpl.golden import compare
from refimpl_adapters import dump

pytestmark = pytest.mark.adapters
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("needs transformers 4.x (the environment of tests/envs/transformers4.txt)", allow_module_level=True)

from adapter_cases import LM_TASKS, TASKS, golden_case  # noqa: E402


@pytest.mark.parametrize("task", TASKS)
def test_every_head_float32_and_float64(task, tmp_path):
    # a float64 checkpoint run in float32, and a float32 checkpoint run in float64: loading in
    # another dtype than the file's keeps lm_head.bias (see the next test for the same dtype)
    golden, _, folder = golden_case(tmp_path, task)
    d = dump("transformers", folder, golden, dtype="float32")
    assert d.missing == {} and d.implementation.startswith("transformers 4.")
    report = compare(golden, d.tensors)
    assert report.profile == "float32" and report.passed, report.format_text()
    golden, _, folder = golden_case(tmp_path, task, saved="float32")
    d = dump("transformers", folder, golden, dtype="float64")
    d.write(tmp_path / "c64.safetensors")
    report = compare(golden, tmp_path / "c64.safetensors")
    assert report.profile == "float64" and report.passed, report.format_text()  # 4.x's causal-LM loss is float64


@pytest.mark.skipif(transformers.__version__ != "4.46.3", reason="the finding is about transformers 4.46.3")
@pytest.mark.parametrize("task", LM_TASKS)
def test_4463_loads_lm_head_bias_as_zeros_in_the_files_own_dtype(task, tmp_path):
    """transformers 4.46.3 reloads its own float32 masked/causal-LM checkpoint with lm_head.bias zero
    (no missing key reported) when the file has no lm_head.decoder.bias; refimpl's compare names it."""
    golden, hf, folder = golden_case(tmp_path, task, saved="float32")
    cls = type(hf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(folder, output_loading_info=True)  # no dtype given: float32, the file's
    assert info["missing_keys"] == [] and model.lm_head.bias.dtype == torch.float32
    assert torch.count_nonzero(model.lm_head.bias) == 0 and torch.count_nonzero(hf.lm_head.bias) == hf.config.vocab_size
    report = compare(golden, dump("transformers", folder, golden, dtype="float32").tensors)
    fd = report.first_divergence
    assert fd.name == "logits", report.format_text()
    assert all(r.status == "pass" for r in report.results[: report.results.index(fd)])
    assert "one constant per output unit" in report.hint and "lm_head.bias" in report.hint
    assert "4.46.3" in report.hint


def test_4x_hidden_states_convention(tmp_path):
    golden, _, folder = golden_case(tmp_path, "masked-lm")
    d = dump("transformers", folder, golden, dtype="float32", outputs_only=True)
    assert "--hidden-states 4.x" in d.notes[0]
    assert "final_layer_norm" in d.missing  # hidden_states.2 is the raw output under 4.x
    report = compare(golden, d.tensors, hidden_states="4.x")
    assert report.passed, report.format_text()
    assert any("follows the transformers 4.x convention" in n and "as stated" in n for n in report.notes)
    report = compare(golden, d.tensors)
    assert report.first_divergence.name == "final_layer_norm"
    assert "transformers 4.x hidden_states convention" in report.hint and "--hidden-states 4.x" in report.hint
    assert "final LayerNorm applied" not in report.format_text()
    np.testing.assert_allclose(d.tensors["hidden_states.2"], golden.tensors["layers.1.ffn.residual"], rtol=1e-4, atol=1e-4)


def test_seeded_bug_is_named_at_the_first_wrong_tensor(tmp_path):
    golden, hf, _ = golden_case(tmp_path, "question-answering")
    hf.roberta_prelayernorm.encoder.layer[1].intermediate.LayerNorm.eps = 0.1
    report = compare(golden, dump("transformers", hf.float(), golden).tensors)
    assert report.first_divergence.name == "layers.1.ffn.layer_norm", report.format_text()
    assert "LayerNorm eps" in report.hint
