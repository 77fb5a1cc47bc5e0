"""Golden files: the trace naming scheme, writing/reading, the comparison, and the worked example.

The worked example is the real thing: transformers in float32, dumped through the forward hooks of
scripts/dump_transformers_golden.py (imported here, not copied), must pass against a refimpl
float64 golden under the float32 profile for every task; deliberately broken candidates must be
caught at the tensor where the mistake is made.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest

import refimpl
from refimpl.config import Config
from refimpl.golden import (
    PROFILES,
    GoldenFormatError,
    compare,
    hint_for,
    read_golden,
    write_golden,
)
from refimpl.ops import layer_norm, linear
from tolerances import PARITY, REORDERED, SCALED_SCORES, assert_close
from refimpl.io import write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["base", "masked-lm", "causal-lm", "sequence-classification", "token-classification",
         "question-answering", "multiple-choice"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dump():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return _load_script("dump_transformers_golden")


def make_inputs(task: str, seed: int = 0, b: int = 2, t: int = 7, vocab: int = 60, hidden: int = 16) -> dict:
    """Ids with <s>/</s>, right padding in row 1, token types, and labels for the task's loss."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(b, t))
    ids[:, 0] = 0
    ids[0, -1] = 2
    ids[1, t - 2:] = 1
    ids[1, t - 3] = 2
    mask = (ids != 1).astype(np.int64)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, size=(b, t)))
    if task == "multiple-choice":  # [B=1, C=2, T]
        inputs = {k: v[None] for k, v in inputs.items()}
        inputs["labels"] = np.array([1])
    elif task in ("masked-lm", "causal-lm", "token-classification"):
        inputs["labels"] = np.where(mask == 1, rng.integers(0, 2, size=(b, t)), -100)
    elif task == "sequence-classification":
        inputs["labels"] = np.array([0, 1])
    elif task == "question-answering":
        inputs["start_positions"] = np.array([1, 2])
        inputs["end_positions"] = np.array([3, 4])
    return inputs


def golden_and_hf(hf_factory, tmp_path, task="masked-lm", inputs=None, **config):
    hf, folder = hf_factory(task, seed=3, **config)
    model = refimpl.from_pretrained(folder, task=task, dtype="float64")
    inputs = make_inputs(task) if inputs is None else inputs
    path = tmp_path / f"{task}.golden.safetensors"
    write_golden(model, path, **inputs)
    return read_golden(path), hf, model, inputs


def dump_candidate(dump, hf, inputs, tmp_path, name="candidate", **call):
    """transformers float32 through the hook script, written to and read back from a file."""
    import torch

    hf = hf.float()
    tensors = dump.capture(hf, **dump.torch_inputs({**inputs, **call}, torch.float32))
    path = tmp_path / f"{name}.safetensors"
    dump.write_candidate(str(path), tensors, "float32")
    return path


# ---------------------------------------------------------------------------------------------
# The naming scheme
# ---------------------------------------------------------------------------------------------


def test_trace_names_in_forward_order(hf_factory):
    _, folder = hf_factory("base", num_hidden_layers=1)
    model = refimpl.from_pretrained(folder, task="base", dtype="float64", backend="numba")
    inputs = make_inputs("base")
    tensors = refimpl.trace(model, **inputs)
    attn = ["layer_norm", "q", "k", "v", "scores", "probs", "context", "output", "residual"]
    ffn = ["layer_norm", "pre_activation", "activation", "output", "residual"]
    assert list(tensors) == (
        [f"embeddings.{n}" for n in ("word", "token_type", "position", "sum", "output")]
        + [f"layers.0.attention.{n}" for n in attn] + [f"layers.0.ffn.{n}" for n in ffn]
        + ["final_layer_norm", "head.pooler", "last_hidden_state", "pooler_output"]
    )
    b, t, h, n = 2, 7, 16, 4
    assert tensors["layers.0.attention.q"].shape == (b, n, t, h // n)
    assert tensors["layers.0.attention.probs"].shape == (b, n, t, t)
    # scores are scaled by 1/sqrt(D) and recorded before the mask
    q, k = tensors["layers.0.attention.q"], tensors["layers.0.attention.k"]
    np.testing.assert_allclose(tensors["layers.0.attention.scores"], q @ np.swapaxes(k, -1, -2) / math.sqrt(h // n),
                               rtol=SCALED_SCORES["float64"])
    # pre_activation -> activation is the erf GELU of the config
    pre = tensors["layers.0.ffn.pre_activation"]
    np.testing.assert_array_equal(tensors["layers.0.ffn.activation"], refimpl.ops.gelu(pre))
    np.testing.assert_array_equal(tensors["final_layer_norm"], tensors["last_hidden_state"])
    # tracing changes nothing: a traced call runs the reference, bitwise the untraced reference
    # (the same program); the fast path agrees to rounding (other BLAS call shapes)
    reference = refimpl.Model(model.config, model.params, model.task)
    assert model.backend == "numba" and reference.backend == "numpy"
    traced = refimpl.trace(model, **inputs)
    np.testing.assert_array_equal(reference(**inputs).last_hidden_state, traced["last_hidden_state"])
    assert_close(model(**inputs).last_hidden_state, traced["last_hidden_state"], "float64", "fast vs traced", REORDERED)


def test_trace_head_and_cross_attention_names(hf_factory):
    _, folder = hf_factory("causal-lm", num_hidden_layers=1, add_cross_attention=True)
    model = refimpl.from_pretrained(folder, task="causal-lm", dtype="float64")
    inputs = make_inputs("causal-lm")
    enc = np.random.default_rng(1).standard_normal((2, 5, 16))
    names = list(refimpl.trace(model, **inputs, encoder_hidden_states=enc))
    cross = [n for n in names if ".crossattention." in n]
    assert cross == [f"layers.0.crossattention.{n}" for n in
                     ("layer_norm", "q", "k", "v", "scores", "probs", "context", "output", "residual")]
    assert names.index(cross[-1]) < names.index("layers.0.ffn.layer_norm")
    assert names[-5:] == ["head.dense", "head.gelu", "head.layer_norm", "logits", "loss"]


# ---------------------------------------------------------------------------------------------
# The worked example: transformers float32 through the hooks passes, for every task
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS + ["causal-lm+cross"])
def test_transformers_float32_passes_float32_profile(task, hf_factory, tmp_path, dump):
    config, call = {}, {}
    if task == "causal-lm+cross":
        task, config = "causal-lm", dict(add_cross_attention=True)
        rng = np.random.default_rng(2)
        call = dict(encoder_hidden_states=rng.standard_normal((2, 5, 16)),
                    encoder_attention_mask=np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    inputs = {**make_inputs(task), **call}
    golden, hf, _, _ = golden_and_hf(hf_factory, tmp_path, task, inputs, **config)
    cand = dump_candidate(dump, hf, inputs, tmp_path)
    report = compare(golden, cand)  # profile from the candidate: float32
    assert report.profile == "float32"
    assert report.passed, report.format_text()
    assert report.missing == [] and report.unexpected == []  # the hooks record every golden name
    worst = max(r.max_abs for r in report.results)
    assert 0 < worst < PARITY["float32"], worst  # observed: up to ~6e-6 with weights ~N(0, 0.5^2)
    assert ("loss" in golden.tensors) == (task != "base")
    if config:
        assert "layers.0.crossattention.probs" in golden.tensors


def test_transformers_float64_passes_float64_profile(hf_factory, tmp_path, dump):
    import torch

    golden, hf, _, inputs = golden_and_hf(hf_factory, tmp_path)
    tensors = dump.capture(hf.double(), **dump.torch_inputs(inputs, torch.float64))
    report = compare(golden, tensors)
    assert report.profile == "float64" and report.passed, report.format_text()


# ---------------------------------------------------------------------------------------------
# Broken candidates are caught at the right tensor
# ---------------------------------------------------------------------------------------------


def test_bert_style_positions_diverge_at_embeddings_position(hf_factory, tmp_path, dump):
    golden, hf, _, inputs = golden_and_hf(hf_factory, tmp_path)
    t = inputs["input_ids"].shape[1]
    bert = np.broadcast_to(np.arange(t), inputs["input_ids"].shape).copy()
    report = compare(golden, dump_candidate(dump, hf, inputs, tmp_path, position_ids=bert))
    assert not report.passed
    assert report.first_divergence.name == "embeddings.position"
    assert "pad_token_id+1" in report.format_text()


def test_tanh_gelu_diverges_at_layer0_activation(hf_factory, tmp_path, dump):
    from transformers.activations import ACT2FN

    golden, hf, _, inputs = golden_and_hf(hf_factory, tmp_path)
    for layer in hf.roberta_prelayernorm.encoder.layer:
        layer.intermediate.intermediate_act_fn = ACT2FN["gelu_new"]
    report = compare(golden, dump_candidate(dump, hf, inputs, tmp_path))
    assert report.first_divergence.name == "layers.0.ffn.activation", report.format_text()
    assert "erf GELU vs tanh" in report.format_text()
    pre = next(r for r in report.results if r.name == "layers.0.ffn.pre_activation")
    assert pre.status == "pass"


def test_missing_final_layer_norm_diverges_at_final_layer_norm(hf_factory, tmp_path, dump):
    import torch

    golden, hf, _, inputs = golden_and_hf(hf_factory, tmp_path)
    hf.roberta_prelayernorm.LayerNorm = torch.nn.Identity()
    report = compare(golden, dump_candidate(dump, hf, inputs, tmp_path))
    assert report.first_divergence.name == "final_layer_norm", report.format_text()
    assert "final LayerNorm applied" in report.format_text()


def test_post_ln_block_diverges_at_layer0_attention(hf_factory, tmp_path, monkeypatch):
    """refimpl itself with a post-LN attention block: x = LN(x + attention(x))."""
    import refimpl.encoder
    from refimpl.attention import merge_heads, scaled_dot_product_attention, split_heads
    from refimpl.tracing import record

    def post_ln_attention_block(x, p, bias, *, num_heads, eps, trace=None, **_):
        q = record(trace, "q", split_heads(linear(x, p.query.weight, p.query.bias), num_heads))
        k = record(trace, "k", split_heads(linear(x, p.key.weight, p.key.bias), num_heads))
        v = record(trace, "v", split_heads(linear(x, p.value.weight, p.value.bias), num_heads))
        context, probs = scaled_dot_product_attention(q, k, v, bias, trace=trace)
        attn = record(trace, "output", linear(merge_heads(context), p.output.weight, p.output.bias))
        h = record(trace, "residual", x + attn)
        return record(trace, "layer_norm", layer_norm(h, p.layer_norm.weight, p.layer_norm.bias, eps)), probs, (k, v)

    golden, _, model, inputs = golden_and_hf(hf_factory, tmp_path)
    monkeypatch.setattr(refimpl.encoder, "attention_block", post_ln_attention_block)
    candidate = refimpl.trace(model.astype("float32"), **inputs)
    report = compare(golden, candidate)
    assert report.profile == "float32"
    assert report.first_divergence.name in ("layers.0.attention.layer_norm", "layers.0.attention.residual")
    assert "pre-LN vs post-LN" in report.format_text()
    assert all(r.status == "pass" for r in report.results if r.name.startswith("embeddings."))


def test_wrong_layer_norm_eps_is_caught_in_float64(hf_factory, tmp_path):
    golden, _, model, inputs = golden_and_hf(hf_factory, tmp_path)
    broken = refimpl.Model(model.config.replace(layer_norm_eps=1e-12), model.params, model.task)
    report = compare(golden, refimpl.trace(broken, **inputs))
    assert report.profile == "float64"
    assert report.first_divergence.name == "embeddings.output"
    assert "eps" in hint_for("embeddings.output")


# ---------------------------------------------------------------------------------------------
# The file format
# ---------------------------------------------------------------------------------------------


def test_golden_round_trip_with_metadata(hf_factory, tmp_path):
    golden, _, model, inputs = golden_and_hf(hf_factory, tmp_path, "question-answering")
    path = golden.path
    traced = refimpl.trace(model, **inputs)  # a traced call runs the reference, as write_golden does
    assert list(golden.tensors) == list(traced)  # forward order survives the file
    for name, value in traced.items():
        assert golden.tensors[name].dtype == np.float64
        np.testing.assert_array_equal(golden.tensors[name], value)
    for name, value in inputs.items():
        np.testing.assert_array_equal(golden.inputs[name], value)
    meta = golden.metadata
    assert meta["format"] == "refimpl-golden" and meta["format_version"] == "1"
    assert meta["refimpl_version"] == refimpl.__version__
    assert meta["dtype"] == "float64" and meta["task"] == "question-answering"
    assert Config.from_dict(meta["config"]) == model.config
    assert golden.tensors["loss"].shape == ()
    # any safetensors reader sees the same file
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        assert f.metadata()["format"] == "refimpl-golden"
        assert set(f.keys()) == set(traced) | {f"inputs.{k}" for k in inputs}


def test_same_content_is_the_same_bytes_in_every_process(tmp_path):
    """The safetensors library writes metadata in a Rust hash map's order, seeded per process and per
    call; refimpl sorts it, so a golden file's bytes depend on its content only (the corpus runner and
    anyone checksumming golden files rely on it). Written 4 times here and twice in fresh processes."""
    import subprocess
    import sys

    meta = {k: f"value of {k} é" for k in ("tokenizer", "config", "format_version", "order", "inputs", "format",
                                            "refimpl_version", "task", "dtype", "zeta", "alpha")}
    tensors = {"logits": np.arange(6.0).reshape(2, 3), "inputs.input_ids": np.arange(4)}
    script = ("import sys, json, numpy as np; from refimpl.io import write_safetensors; "
              "write_safetensors(sys.argv[1], {'logits': np.arange(6.0).reshape(2, 3), "
              "'inputs.input_ids': np.arange(4)}, json.loads(sys.argv[2]))")
    paths = []
    for i in range(6):
        path = tmp_path / f"g{i}.safetensors"
        order = dict(reversed(meta.items())) if i % 2 else meta
        if i < 4:
            write_safetensors(path, tensors, order)
        else:
            subprocess.run([sys.executable, "-c", script, str(path), json.dumps(order)], check=True)
        paths.append(path)
    first = paths[0].read_bytes()
    assert all(p.read_bytes() == first for p in paths[1:])
    from safetensors import safe_open

    with safe_open(paths[0], "np") as f:  # still a file the library reads, metadata intact
        assert f.metadata() == meta
        np.testing.assert_array_equal(f.get_tensor("logits"), tensors["logits"])


def test_unknown_format_version_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    write_safetensors(path, {"logits": np.zeros(2)}, {"format": "refimpl-golden", "format_version": "2"})
    with pytest.raises(GoldenFormatError, match=r"version '2'.*understood versions: 1"):
        read_golden(path)
    write_safetensors(path, {"logits": np.zeros(2)}, {"format": "something-else"})
    with pytest.raises(GoldenFormatError, match="not a refimpl golden file"):
        read_golden(path)


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors

    model = refimpl.from_pretrained(os.path.join(ROOT, "refimpl", "data", "tiny-random-mlm"), dtype="float64")
    ids = np.array([[0, 31414, 232, 2]])
    target = tmp_path / "golden.safetensors"
    calls = []

    def failing_write(specs, filename, metadata=None):  # half a file, then Ctrl-C
        calls.append(1)
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("simulated interruption mid-write")

    monkeypatch.setattr(safetensors, "serialize_file", failing_write)
    with pytest.raises(KeyboardInterrupt):
        write_golden(model, target, input_ids=ids)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary file
    monkeypatch.undo()
    write_golden(model, target, input_ids=ids)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors, "serialize_file", failing_write)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_golden(model, target, input_ids=ids[:, :3])
    assert os.listdir(tmp_path) == ["golden.safetensors"] and target.read_bytes() == before  # the old file intact


# ---------------------------------------------------------------------------------------------
# The comparison's rules
# ---------------------------------------------------------------------------------------------


def _small_golden(tmp_path):
    model = refimpl.from_pretrained(os.path.join(ROOT, "refimpl", "data", "tiny-random-mlm"), dtype="float64")
    return write_golden(model, tmp_path / "g.safetensors", input_ids=np.array([[0, 31414, 232, 2, 1]]),
                        attention_mask=np.array([[1, 1, 1, 1, 0]]), labels=np.array([[-100, 5, -100, -100, -100]]))


def test_missing_tensors_fail_only_when_strict(tmp_path):
    golden = _small_golden(tmp_path)
    subset = {k: v.astype(np.float32) for k, v in golden.tensors.items() if not k.startswith("layers.1.")}
    report = compare(golden, subset)
    assert report.passed and len(report.missing) == 14
    assert not compare(golden, subset, strict=True).passed
    typo = {**subset, "layers.0.attention.querry": subset["layers.0.attention.q"]}
    report = compare(golden, typo)
    assert report.unexpected == [("layers.0.attention.querry", "layers.0.attention.q")]


def test_shape_mismatch_and_wrong_inputs_are_divergences(tmp_path):
    golden = _small_golden(tmp_path)
    merged = dict(golden.tensors)
    merged["layers.0.attention.q"] = np.zeros((1, 5, 16))  # heads not split
    report = compare(golden, merged)
    assert report.first_divergence.name == "layers.0.attention.q" and report.first_divergence.status == "shape"
    other = {"inputs.input_ids": golden.inputs["input_ids"] + 1, **golden.tensors}
    assert compare(golden, other).first_divergence.name == "inputs.input_ids"


def test_low_precision_candidates_and_profiles(tmp_path, dump):
    golden = _small_golden(tmp_path)
    path = str(tmp_path / "bf16.safetensors")
    dump.write_candidate(path, {k: v.astype(np.float32) for k, v in golden.tensors.items()}, "bfloat16")
    report = compare(golden, path)
    assert report.profile == "bfloat16" and report.passed, report.format_text()
    worst = max(r.max_rel for r in report.results if r.max_rel is not None and np.isfinite(r.max_rel))
    assert 1e-3 < worst <= 2 ** -8  # bfloat16 rounding: at most half an ulp of an 8-bit significand
    assert not compare(golden, path, profile="float32").passed
    f16 = {k: v.astype(np.float16) for k, v in golden.tensors.items()}
    assert compare(golden, f16).profile == "float16"
    assert compare(golden, f16, rtol=0.0, atol=0.0).passed is False
    assert set(PROFILES) == {"float64", "float32", "float16", "bfloat16"}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_agrees_with_nan(tmp_path):
    model = refimpl.from_pretrained(os.path.join(ROOT, "refimpl", "data", "tiny-random-mlm"), dtype="float64")
    golden = write_golden(model, tmp_path / "g.safetensors", input_ids=np.array([[0, 5, 2]]), labels=np.full((1, 3), -100))
    assert np.isnan(golden.tensors["loss"])  # every label ignored: 0/0, as torch
    assert compare(golden, golden).passed
    assert not compare(golden, {"loss": np.float32(0.0)}).passed


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_golden_compare(tmp_path, capsys):
    from refimpl.cli import main

    golden = str(tmp_path / "golden.safetensors")
    assert main(["golden", "--model", "tiny", "--text", "Hello world", "--out", golden]) == 0
    g = read_golden(golden)
    assert g.metadata["tokenizer"]["text"] == ["Hello world"]
    assert g.metadata["tokenizer"]["input_ids"] == g.inputs["input_ids"].tolist()
    assert g.dtype == "float64" and g.task == "masked-lm"
    capsys.readouterr()
    assert main(["compare", golden, golden]) == 0
    assert "PASS" in capsys.readouterr().out

    broken = dict(g.tensors)
    broken["embeddings.position"] = broken["embeddings.position"] + 0.01
    cand = str(tmp_path / "broken.safetensors")
    write_safetensors(cand, {k: v.astype(np.float32) for k, v in broken.items()})
    assert main(["compare", golden, cand]) == 1
    out = capsys.readouterr().out
    assert "first divergence: embeddings.position" in out and "hint:" in out

    assert main(["compare", golden, cand, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] is False and report["first_divergence"]["name"] == "embeddings.position"
    assert report["profile"] == "float32" and len(report["tensors"]) == len(g.tensors)
    assert main(["compare", golden, cand, "--atol", "0.02", "--quiet"]) == 0


def test_cli_input_ids_file_and_errors(tmp_path, capsys):
    from refimpl.cli import main

    ids = tmp_path / "ids.txt"
    ids.write_text("0 31414 232 2\n0 20920 2 1\n")
    out = str(tmp_path / "g.safetensors")
    assert main(["golden", "--model", "tiny", "--input-ids", str(ids), "--dtype", "float32", "--out", out]) == 0
    g = read_golden(out)
    assert g.dtype == "float32"
    np.testing.assert_array_equal(g.inputs["attention_mask"], [[1, 1, 1, 1], [1, 1, 1, 0]])
    npy = tmp_path / "ids.npy"
    np.save(npy, np.array([[0, 31414, 232, 2]]))
    assert main(["golden", "--model", "tiny", "--input-ids", str(npy), "--out", out]) == 0
    capsys.readouterr()
    bad = tmp_path / "v2.safetensors"
    write_safetensors(bad, {"logits": np.zeros(1)}, {"format": "refimpl-golden", "format_version": "9"})
    assert main(["compare", str(bad), out]) == 2
    assert "understood versions: 1" in capsys.readouterr().err
