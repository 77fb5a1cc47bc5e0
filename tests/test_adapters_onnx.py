"""The ONNX adapter: transformers' classes exported with torch.onnx (both exporters), run by
onnxruntime, intermediates mapped to golden names through the exporters' module scopes. Needs
onnxruntime and onnx (the adapters-onnx extra; skipped without them) and, to export, torch,
transformers and onnxscript."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from refimpl.golden import compare
from refimpl_adapters import AdapterError, dump

pytestmark = pytest.mark.adapters
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from adapter_cases import TASKS, golden_case  # noqa: E402


def _our_temporary_folders(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("refimpl-onnx-"))


@pytest.mark.parametrize("task", TASKS)
def test_every_head_exported_by_torchscript_passes_float32(task, tmp_path, monkeypatch):
    golden, _, folder = golden_case(tmp_path, task)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    d = dump("onnx", folder, golden, dtype="float32", exporter="torchscript")
    assert d.missing == {}, d.missing  # every golden tensor mapped from the graph
    report = compare(golden, d.tensors)
    assert report.profile == "float32" and report.passed, report.format_text()
    assert _our_temporary_folders(temporary) == []  # the exported graph's folder is gone after the run


def test_a_graph_over_the_inline_limit_runs_from_a_temporary_file(tmp_path, monkeypatch):
    """Graphs over protobuf's 2 GB reach onnxruntime as a file with external data, written to a
    temporary folder that is removed once the session has read it (the limit lowered to 0 here)."""
    import refimpl_adapters.onnx as adapter

    golden, _, folder = golden_case(tmp_path, "base")
    saved = tmp_path / "model.onnx"
    want = dump("onnx", folder, golden, dtype="float32", exporter="torchscript", save=str(saved))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    monkeypatch.setattr(adapter, "_INLINE_LIMIT", 0)
    got = dump("onnx", str(saved), golden)
    assert set(got.tensors) == set(want.tensors)
    for k, v in want.tensors.items():
        np.testing.assert_array_equal(got.tensors[k], v)
    assert _our_temporary_folders(temporary) == []


@pytest.mark.parametrize("task", ["masked-lm", "sequence-classification"])
def test_dynamo_export_maps_every_tensor_and_passes(task, tmp_path):
    pytest.importorskip("onnxscript")
    golden, _, folder = golden_case(tmp_path, task)
    saved = tmp_path / "model.onnx"
    d = dump("onnx", folder, golden, dtype="float32", exporter="dynamo", save=str(saved))
    assert d.missing == {} and saved.is_file()
    assert compare(golden, d.tensors).passed
    again = dump("onnx", str(saved), golden)  # the saved graph, run as a file
    assert set(again.tensors) == set(d.tensors)
    for k, v in d.tensors.items():
        np.testing.assert_array_equal(again.tensors[k], v)


def test_a_graph_without_module_scopes_lists_what_it_cannot_map(tmp_path):
    golden, _, folder = golden_case(tmp_path, "masked-lm")
    path = tmp_path / "model.onnx"
    dump("onnx", folder, golden, exporter="torchscript", save=str(path))
    proto = onnx.load(str(path))
    for i, node in enumerate(proto.graph.node):  # what another exporter might write: no scopes
        node.name = f"n{i}"
        del node.metadata_props[:]
    onnx.save(proto, str(path))
    d = dump("onnx", str(path), golden)
    assert set(d.tensors) == {"logits", "loss"}  # the graph outputs, named like golden tensors
    assert "embeddings.output" in d.missing and "records no module scopes" in d.missing["embeddings.output"]
    assert compare(golden, d.tensors).passed


def test_seeded_bug_is_named_at_the_first_wrong_tensor(tmp_path):
    golden, hf, _ = golden_case(tmp_path, "token-classification")
    hf.roberta_prelayernorm.encoder.layer[0].intermediate.LayerNorm.eps = 0.1  # a wrong LayerNorm eps
    d = dump("onnx", hf.float(), golden, exporter="torchscript")
    report = compare(golden, d.tensors)
    assert report.first_divergence.name == "layers.0.ffn.layer_norm", report.format_text()
    assert "LayerNorm eps" in report.hint


def test_outputs_only_and_float64_and_bad_inputs(tmp_path):
    golden, _, folder = golden_case(tmp_path, "base")
    d = dump("onnx", folder, golden, exporter="torchscript", outputs_only=True)
    assert {"hidden_states.0", "hidden_states.2", "attentions.1", "last_hidden_state"} <= set(d.tensors)
    report = compare(golden, d.tensors)
    assert report.passed and any("5.x convention" in n for n in report.notes)
    with pytest.raises(AdapterError, match="run the graph in float32"):  # onnxruntime has no float64 Erf
        dump("onnx", folder, golden, dtype="float64", exporter="torchscript")
    path = tmp_path / "base.onnx"
    dump("onnx", folder, golden, exporter="torchscript", save=str(path))
    del golden.inputs["token_type_ids"]  # a graph input the golden lacks gets its default (zeros)
    golden.inputs["position_ids"] = np.ones_like(golden.inputs["input_ids"])
    with pytest.raises(AdapterError, match="takes no 'position_ids' input"):
        dump("onnx", str(path), golden)
