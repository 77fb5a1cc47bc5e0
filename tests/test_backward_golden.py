"""Golden gradients: ``write_golden(..., gradients=True)`` / ``refimpl golden --gradients`` record the
gradient of the loss with respect to every traced intermediate and parameter (``grad.*``, in
backward order), and ``refimpl compare`` names the first gradient that diverges.

transformers' own gradients (tensor hooks on the same intermediates, ``.grad`` of every parameter)
pass against a refimpl float64 golden; seeded bugs in backward functions are named at the tensor
where they first show, with the hint for that step.
"""

from __future__ import annotations

import numpy as np
import pytest

import refimpl
from refimpl import backward as bw
from refimpl.cli import main
from refimpl.golden import compare, hint_for, read_golden, save_tensors, write_golden
from backward_oracle import build, torch_gradient_candidate
from conftest import ALL_TASKS, TINY, task_inputs

LOSS_TASKS = [t for t in ALL_TASKS if t != "base"]


def golden_case(task: str, tmp_path, **extra):
    cfg = {**TINY, "num_labels": 2, "is_decoder": task == "causal-lm", **extra}
    hf, model = build(task, cfg, seed=4)
    inputs = task_inputs(task, model.config, np.random.default_rng(6))
    path = tmp_path / f"{task}.safetensors"
    golden = write_golden(model, path, gradients=True, **inputs)
    return hf, model, inputs, golden, path


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("task", LOSS_TASKS)
def test_transformers_gradients_pass_against_the_golden(task, dtype, tmp_path):
    """float64: within 1e-12 of the golden everywhere; float32: passes the float32 profile (measured
    max abs error <= 5.6e-7 on these models, the profile allows 1e-4 + 1e-4 |g|)."""
    hf, model, inputs, golden, path = golden_case(task, tmp_path)
    names = list(golden.tensors)
    first_grad = names.index("grad.loss")
    assert all(not n.startswith("grad.") for n in names[:first_grad])  # forward first, then backward
    assert names[first_grad + 1] in ("grad.logits", "grad.start_logits")
    params = {n for n in names if n.startswith("grad.") and n.endswith((".weight", ".bias"))}
    assert params == {f"grad.{k}" for k, v in refimpl.grad(model, **inputs)[1].items() if v is not None}
    candidate = torch_gradient_candidate(hf, task, inputs, dtype)
    candidate = {k: v.astype(dtype) for k, v in candidate.items()}
    report = compare(path, candidate)
    assert report.profile == dtype
    assert report.passed, report.format_text()
    compared = [r for r in report.results if r.status != "missing"]
    missing = set(report.missing)
    assert all(".scores" in n or not n.startswith("grad.") for n in missing), missing  # everything but the scores
    assert len([r for r in compared if r.name.startswith("grad.")]) >= 40
    assert max(r.max_abs for r in compared) < (1e-12 if dtype == "float64" else 5e-6)


def test_golden_file_round_trips_the_gradient_order(tmp_path):
    _, _, _, golden, path = golden_case("masked-lm", tmp_path)
    again = read_golden(path)
    assert list(again.tensors) == list(golden.tensors)
    assert again.metadata["order"] == list(golden.tensors)


def _buggy_layer_norm_backward(dy, x, weight, eps):
    dx, dgamma, dbeta = LAYER_NORM_BACKWARD(dy, x, weight, eps)
    return dx, dgamma * 1.01, dbeta


LAYER_NORM_BACKWARD = bw.layer_norm_backward


def _candidate_with_bug(model, inputs, monkeypatch, name, bug):
    monkeypatch.setattr(bw, name, bug)
    try:
        return {**refimpl.trace(model, **inputs), **bw.gradient_trace(model, **inputs)}
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("task,first", [
    ("masked-lm", "grad.lm_head.layer_norm.weight"),  # the LM head's LayerNorm is the first one backward meets
    ("sequence-classification", "grad.roberta_prelayernorm.LayerNorm.weight"),  # the final LayerNorm
])
def test_a_seeded_dgamma_bug_is_named_by_refimpl_compare(task, first, tmp_path, monkeypatch, capsys):
    _, model, inputs, golden, path = golden_case(task, tmp_path)
    candidate = _candidate_with_bug(model, inputs, monkeypatch, "layer_norm_backward", _buggy_layer_norm_backward)
    cand_path = tmp_path / "candidate.safetensors"
    save_tensors(cand_path, candidate)
    assert main(["compare", str(path), str(cand_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"first divergence: {first}:" in out, out
    assert "dgamma = sum over positions of dy * xhat" in out
    assert compare(golden, candidate).first_divergence.name == first
    # the forward and every gradient before it agree exactly: same code, same inputs
    report = compare(golden, candidate)
    before = report.results[: [r.name for r in report.results].index(first)]
    assert all(r.status == "pass" and r.max_abs == 0.0 for r in before)


def test_seeded_bugs_in_softmax_and_activation_backward_are_named(tmp_path, monkeypatch):
    _, model, inputs, golden, _ = golden_case("sequence-classification", tmp_path, hidden_act="gelu")
    last = model.config.num_hidden_layers - 1

    def softmax_without_the_correction(dp, p):
        return p * dp

    cand = _candidate_with_bug(model, inputs, monkeypatch, "softmax_backward", softmax_without_the_correction)
    fd = compare(golden, cand).first_divergence
    assert fd.name == f"grad.layers.{last}.attention.scores"
    assert "softmax backward" in hint_for(fd.name)

    grads = dict(bw.ACTIVATION_GRADS, gelu=bw.gelu_tanh_grad)  # the tanh GELU's derivative for the exact one
    cand = _candidate_with_bug(model, inputs, monkeypatch, "ACTIVATION_GRADS", grads)
    fd = compare(golden, cand).first_divergence
    assert fd.name == f"grad.layers.{last}.ffn.pre_activation"
    assert "activation's derivative" in hint_for(fd.name)


def test_golden_cli_writes_gradients_with_labels(tmp_path, capsys):
    out = tmp_path / "g.safetensors"
    ids = tmp_path / "ids.txt"
    ids.write_text("0 31414 232 2\n0 20920 2 1\n")
    assert main(["golden", "--model", "tiny", "--input-ids", str(ids), "--gradients", "--labels",
                 "-100 5 6 -100; -100 7 -100 -100", "--out", str(out)]) == 0
    g = read_golden(out)
    assert g.inputs["labels"].tolist() == [[-100, 5, 6, -100], [-100, 7, -100, -100]]
    assert "grad.roberta_prelayernorm.embeddings.word_embeddings.weight" in g.tensors
    loss, grads = refimpl.grad(refimpl.from_pretrained("tiny", dtype="float64"), **g.inputs)
    np.testing.assert_array_equal(g.tensors["grad.lm_head.dense.weight"], grads["lm_head.dense.weight"])
    np.testing.assert_array_equal(g.tensors["loss"], loss)
    capsys.readouterr()
    # the default labels of an LM: the input ids, -100 at padding
    assert main(["golden", "--model", "tiny", "--input-ids", str(ids), "--gradients", "--out", str(out)]) == 0
    assert read_golden(out).inputs["labels"].tolist() == [[0, 31414, 232, 2], [0, 20920, 2, -100]]


@pytest.mark.parametrize("argv,message", [
    (["--labels", "1 2"], "--labels goes with --gradients"),
    (["--gradients", "--labels", "1 x"], "--labels must hold integers"),
    (["--gradients", "--labels", "1 2 3"], "needs one row of 4 per text"),
    (["--gradients", "--task", "base"], "the base model has none"),
])
def test_golden_cli_gradient_errors(argv, message, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("0 31414 232 2\n")
    assert main(["golden", "--model", "tiny", "--input-ids", str(ids), "--out", str(tmp_path / "g.safetensors"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
