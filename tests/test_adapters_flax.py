"""transformers 4.x Flax classes through the flax adapter, in their own environment
(tests/envs/transformers4.txt: jax, flax, transformers 4.46.3); skipped cleanly without them."""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest

from refimpl.golden import compare
from refimpl_adapters import dump

pytestmark = pytest.mark.adapters
pytest.importorskip("jax")
pytest.importorskip("flax")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("the Flax classes need transformers 4.x (tests/envs/transformers4.txt)", allow_module_level=True)

from adapter_cases import TASKS, golden_case, with_config  # noqa: E402

NEVER = ["embeddings.sum", "layers.*.attention.scores", "head.gelu", "head.tanh", "loss"]


@pytest.mark.parametrize("task", TASKS)
def test_every_head_float32_and_float64(task, tmp_path):
    golden, _, folder = golden_case(tmp_path, task)
    expected = {n for n in golden.tensors if any(fnmatch.fnmatchcase(n, p) for p in NEVER)}
    for dtype in ("float32", "float64"):
        d = dump("flax", folder, golden, dtype=dtype)
        assert set(d.missing) == expected, d.missing  # the names Flax cannot provide, each with its reason
        assert all(d.missing.values())
        report = compare(golden, d.tensors)
        assert report.profile == dtype and report.passed, report.format_text()


def test_float64_parameters_with_a_float32_module_dtype_are_named(tmp_path):
    """The issue's case: float64 parameters, but the module's computation dtype left at float32."""
    golden, _, folder = golden_case(tmp_path, "masked-lm")
    d = dump("flax", folder, golden, dtype="float32", param_dtype="float64")
    d.write(tmp_path / "c.safetensors", dtype="float64")
    report = compare(golden, tmp_path / "c.safetensors")
    assert report.profile == "float64" and not report.passed
    assert report.hint.startswith("this looks computed in float32, not float64"), report.format_text()
    assert "passes the float32 profile" in report.hint
    assert compare(golden, tmp_path / "c.safetensors", profile="float32").passed


def test_outputs_only_follow_the_4x_convention(tmp_path):
    golden, _, folder = golden_case(tmp_path, "base")
    d = dump("flax", folder, golden, dtype="float64", outputs_only=True)
    report = compare(golden, d.tensors, hidden_states="4.x")
    assert report.passed, report.format_text()
    report = compare(golden, d.tensors)
    assert report.first_divergence.name == "final_layer_norm"
    assert "4.x hidden_states convention" in report.hint


def test_seeded_bug_is_named_at_the_first_wrong_tensor(tmp_path):
    golden, _, folder = golden_case(tmp_path, "sequence-classification")
    broken = with_config(folder, tmp_path / "eps", layer_norm_eps=0.1)
    report = compare(golden, dump("flax", broken, golden, dtype="float32").tensors)
    assert report.first_divergence.name == "embeddings.output", report.format_text()
    assert "eps" in report.hint
    np.testing.assert_array_equal(report.results[0].max_abs, 0.0)  # embeddings.word: the same table rows
