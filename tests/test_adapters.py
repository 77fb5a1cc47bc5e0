"""The adapters (refimpl_adapters, `refimpl dump`) with transformers 5.x PyTorch, and the hints that
know: output fields and the hidden_states conventions, float32 rounding in a float64 comparison, a
per-unit bias offset. transformers 4.x, Flax and ONNX have their own files (test_adapters_*.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import refimpl
from refimpl.golden import compare, float32_evidence, output_field_map, read_golden
from refimpl_adapters import ADAPTERS, AdapterError, dump, require

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("transformers 5.x tests (4.x: tests/test_adapters_transformers4.py)", allow_module_level=True)

from adapter_cases import TASKS, golden_case  # noqa: E402


# ---------------------------------------------------------------------------------------------
# transformers 5.x PyTorch: every head, float32 and float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_transformers5_every_head_float32_and_float64(task, tmp_path):
    golden, _, folder = golden_case(tmp_path, task)
    d32 = dump("transformers", folder, golden, dtype="float32")
    assert d32.missing == {}  # the hooks record every golden name
    report = compare(golden, d32.tensors)
    assert report.profile == "float32" and report.passed, report.format_text()
    d64 = dump("transformers", folder, golden, dtype="float64")
    d64.write(tmp_path / "c64.safetensors")  # every tensor as float64, as `refimpl dump --dtype float64` writes
    report = compare(golden, tmp_path / "c64.safetensors")
    assert report.profile == "float64"
    if task != "causal-lm":
        assert report.passed, report.format_text()
    else:  # 5.x computes the causal-LM loss in float32, whatever the model's dtype (docs/judge.md)
        fd = report.first_divergence
        assert fd.name == "loss", report.format_text()
        assert all(r.status == "pass" for r in report.results if r.name != "loss")
        assert "loss looks computed in float32 while the tensors before it agree to float64 precision" in report.hint
        assert d64.tensors["loss"].dtype == np.float32  # as transformers returned it


def test_dump_writes_a_candidate_file_with_provenance(tmp_path):
    from safetensors import safe_open

    golden, _, folder = golden_case(tmp_path, "masked-lm")
    path = tmp_path / "cand.safetensors"
    dump("transformers", folder, golden.path, dtype="bfloat16").write(path)
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "refimpl-candidate" and meta["implementation"].startswith(f"transformers {transformers.__version__}")
    report = compare(golden, str(path), rtol=0.2, atol=0.2)
    assert report.profile == "bfloat16" and report.passed, report.format_text()


def test_seeded_bug_is_named_at_the_first_wrong_tensor(tmp_path):
    golden, hf, _ = golden_case(tmp_path, "sequence-classification")
    hf.roberta_prelayernorm.encoder.layer[1].attention.LayerNorm.eps = 0.1  # a wrong LayerNorm eps in block 1
    report = compare(golden, dump("transformers", hf.float(), golden, dtype="float32").tensors)
    assert report.first_divergence.name == "layers.1.attention.layer_norm", report.format_text()
    assert all(r.status == "pass" for r in report.results[: report.results.index(report.first_divergence)])
    assert "LayerNorm eps" in report.hint


# ---------------------------------------------------------------------------------------------
# Output fields and the hidden_states conventions
# ---------------------------------------------------------------------------------------------


def test_output_field_map():
    five, four = output_field_map(3, "5.x"), output_field_map(3, "4.x")
    assert five["hidden_states.0"] == "embeddings.output"
    assert five["hidden_states.2"] == four["hidden_states.2"] == "layers.1.ffn.residual"
    assert five["hidden_states.3"] == "final_layer_norm" and four["hidden_states.3"] == "layers.2.ffn.residual"
    assert five["attentions.2"] == "layers.2.attention.probs"
    assert five["cross_attentions.0"] == "layers.0.crossattention.probs"
    with pytest.raises(ValueError, match="known: 5.x, 4.x"):
        output_field_map(2, "6.x")


def test_outputs_only_5x_candidate_passes_and_its_convention_is_named(tmp_path):
    golden, _, folder = golden_case(tmp_path, "causal-lm", add_cross_attention=False)
    d = dump("transformers", folder, golden, dtype="float32", outputs_only=True)
    assert set(d.tensors) == {"hidden_states.0", "hidden_states.1", "hidden_states.2", "attentions.0", "attentions.1",
                              "logits", "loss"}
    assert "layers.0.attention.q" in d.missing and "final_layer_norm" not in d.missing
    report = compare(golden, d.tensors)
    assert report.passed, report.format_text()
    rows = {(r.name, r.source) for r in report.results if r.source}
    assert ("final_layer_norm", "hidden_states.2") in rows and ("layers.1.attention.probs", "attentions.1") in rows
    assert any("follows the transformers 5.x convention" in n for n in report.notes)
    stated = compare(golden, d.tensors, hidden_states="4.x")  # the wrong convention stated
    assert stated.first_divergence.name == "layers.1.ffn.residual"
    assert "follows the transformers 5.x convention, not the 4.x one stated" in stated.hint


def _as_4x(golden, tensors):
    """A 5.x outputs-only candidate turned into the 4.x convention: hidden_states[L] is the last
    block's raw output (taken from the hooked candidate, so it is the implementation's own value)."""
    out = dict(tensors["fields"])
    out["hidden_states.2"] = tensors["hooks"]["layers.1.ffn.residual"]
    return out


def test_4x_convention_passes_when_stated_and_is_named_when_not(tmp_path):
    golden, _, folder = golden_case(tmp_path, "masked-lm")
    tensors = {"fields": dump("transformers", folder, golden, outputs_only=True).tensors,
               "hooks": dump("transformers", folder, golden).tensors}
    cand = _as_4x(golden, tensors)
    report = compare(golden, cand, hidden_states="4.x")
    assert report.passed, report.format_text()
    assert any("follows the transformers 4.x convention" in n and "as stated" in n for n in report.notes)
    report = compare(golden, cand)  # not stated
    assert not report.passed and report.first_divergence.name == "final_layer_norm"
    text = report.format_text()
    assert "transformers 4.x hidden_states convention" in text and "--hidden-states 4.x" in text
    assert "is the final LayerNorm applied?" not in text
    # the case: 4.x hidden_states mapped with the 5.x table, under the golden name
    direct = {"final_layer_norm": cand["hidden_states.2"], "logits": cand["logits"]}
    report = compare(golden, direct)
    assert "if it was taken from hidden_states[2]" in report.hint and "--hidden-states 4.x" in report.hint


def test_a_missing_final_layer_norm_is_still_blamed(tmp_path):
    golden, hf, _ = golden_case(tmp_path, "masked-lm")
    hf.roberta_prelayernorm.LayerNorm = torch.nn.Identity()
    report = compare(golden, dump("transformers", hf.float(), golden, outputs_only=True).tensors)
    assert report.first_divergence.name == "final_layer_norm"
    assert report.hint.startswith("is the final LayerNorm applied?")  # logits fail too: not a convention


# ---------------------------------------------------------------------------------------------
# Float32 rounding in a float64 comparison; a per-unit bias offset
# ---------------------------------------------------------------------------------------------


def test_float32_computed_float64_candidate_is_named(tmp_path):
    golden, _, folder = golden_case(tmp_path, "token-classification")
    model32 = refimpl.from_pretrained(folder, task="token-classification", dtype="float32")
    widened = {k: v.astype(np.float64) for k, v in refimpl.trace(model32, **golden.inputs).items()}
    report = compare(golden, widened)
    assert report.profile == "float64" and not report.passed
    assert report.hint.startswith("this looks computed in float32, not float64")
    assert "exactly representable in float32" in report.hint and "passes the float32 profile" in report.hint
    assert "eps" not in report.hint
    # computed in float32 but not stored so (a relative nudge of ~1e-12 makes the values float64-only,
    # far below float32's rounding): the rounding scale alone names it
    jitter = {k: v + np.random.default_rng(0).uniform(-1, 1, v.shape) * 1e-12 * np.abs(v) for k, v in widened.items()}
    assert "float32's rounding" in compare(golden, jitter).hint


def test_wrong_eps_in_float64_is_not_mistaken_for_float32(tmp_path):
    golden, _, folder = golden_case(tmp_path, "base")
    model = refimpl.from_pretrained(folder, task="base", dtype="float64")
    broken = refimpl.Model(model.config.replace(layer_norm_eps=1e-12), model.params, model.task)
    report = compare(golden, refimpl.trace(broken, **golden.inputs))
    assert report.first_divergence.name == "embeddings.output"
    assert report.diagnosis is None and "eps" in report.hint
    fd = report.first_divergence
    assert float32_evidence(golden.tensors[fd.name], refimpl.trace(broken, **golden.inputs)[fd.name]) is None


def test_a_missing_bias_is_named_as_a_per_unit_offset(tmp_path):
    golden, hf, _ = golden_case(tmp_path, "masked-lm")
    with torch.no_grad():
        hf.lm_head.bias.zero_()  # what transformers 4.46.3 does on loading (test_adapters_transformers4.py)
    report = compare(golden, dump("transformers", hf.float(), golden).tensors)
    assert report.first_divergence.name == "logits"
    assert "one constant per output unit" in report.hint and "lm_head.bias" in report.hint


# ---------------------------------------------------------------------------------------------
# The command line and the errors
# ---------------------------------------------------------------------------------------------


def test_cli_dump_and_compare(tmp_path, capsys):
    from refimpl.cli import main

    golden, _, folder = golden_case(tmp_path, "question-answering")
    out = str(tmp_path / "c.safetensors")
    assert main(["dump", "--impl", "transformers", "--model", folder, golden.path, "--out", out]) == 0
    assert f"from transformers {transformers.__version__} PyTorch (float32)" in capsys.readouterr().out
    assert main(["compare", golden.path, out, "--quiet"]) == 0
    assert main(["dump", "--impl", "transformers", "--model", folder, golden.path, "--out", out, "--outputs-only"]) == 0
    printed = capsys.readouterr().out
    assert "not provided (" in printed and "layers.{0,1}.attention.q" in printed
    assert main(["compare", golden.path, out, "--hidden-states", "5.x"]) == 0
    assert main(["compare", golden.path, out, "--hidden-states", "4.x", "--quiet"]) == 1
    assert "drop --hidden-states 4.x" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import importlib

    from refimpl.cli import main

    golden, _, folder = golden_case(tmp_path, "base")
    real = importlib.import_module

    def no_jax(name, *a, **k):
        if name.split(".")[0] in ("jax", "flax"):
            raise ImportError(f"No module named '{name}'")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_jax)
    assert main(["dump", "--impl", "flax", "--model", folder, golden.path, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install '.[adapters-flax]' in a checkout" in err, err
    monkeypatch.undo()
    with pytest.raises(AdapterError, match=r"pip install '\.\[adapters-onnx\]' in a checkout"):
        require("onnx", "a_module_that_does_not_exist")
    assert main(["dump", "--impl", "transformers", "--model", str(tmp_path / "nowhere"), golden.path, "--out", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(AdapterError, match="unknown implementation 'jax'; known: transformers, flax, onnx"):
        dump("jax", folder, golden)
    assert set(ADAPTERS) == {"transformers", "flax", "onnx"}
    assert read_golden(golden.path).task == "base"


def test_refimpl_imports_no_framework():
    """Importing refimpl, the adapters package and the CLIs (refimpl's full parser, with `refimpl dump`)
    imports none of the frameworks: an adapter imports its framework only when it runs."""
    import subprocess
    import sys

    code = ("import sys, refimpl, refimpl_adapters, refimpl.cli, refimpl_adapters.transformers_torch, "
            "refimpl_adapters.flax, refimpl_adapters.onnx, refimpl_adapters.cli; "
            "assert 'run another implementation' in refimpl.cli.build_parser().format_help(); "
            "refimpl_adapters.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'jax', 'flax', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
