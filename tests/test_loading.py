"""``refimpl.from_pretrained`` against folders written by transformers' ``save_pretrained``.

Checkpoint dtypes (float16, bfloat16, float32, float64) x compute dtypes (float32, float64), sharded
checkpoints, zero-copy memory mapping, weight tying, task/key mismatches, damaged files and missing
files. Every error is a :class:`refimpl.CheckpointError` or ``FileNotFoundError`` whose message says
what is wrong and where.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import refimpl
from conftest import TINY, build_hf, build_post_ln_roberta, save_hf, torch_forward
from refimpl import CheckpointError
from tolerances import assert_close

V, PAD = TINY["vocab_size"], 1
IDS = np.array([[0, 5, 17, 33, 2, PAD], [0, 40, 2, PAD, PAD, PAD]])
MASK = (IDS != PAD).astype(np.int64)
LABELS = np.where(MASK == 1, (IDS * 7) % V, -100)
SRC_DTYPES = ["float16", "bfloat16", "float32", "float64"]


def hf_state(model) -> dict[str, np.ndarray]:
    """The transformers model's parameters as float64 NumPy arrays."""
    return {k: v.detach().to(torch.float64).numpy() for k, v in model.state_dict().items()}


def copy_folder(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_weights(folder: str, fn) -> None:
    """Rewrite ``model.safetensors`` with ``fn(state) -> state`` (the safetensors library)."""
    path = os.path.join(folder, "model.safetensors")
    state = fn(load_file(path))
    save_file(state, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    """(transformers masked-LM model in float64, its float32 folder)."""
    model = build_hf("masked-lm", seed=1)
    return model, save_hf(model, tmp_path_factory.mktemp("mlm"), dtype="float32")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = build_hf("base", seed=2)
    return model, save_hf(model, tmp_path_factory.mktemp("base"), dtype="float32")


# ---------------------------------------------------------------------------------------------
# checkpoint dtype x compute dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src", SRC_DTYPES)
def test_checkpoint_dtypes_load_and_match_transformers(src, tmp_path):
    model = build_hf("masked-lm", seed=3)
    folder = save_hf(model, tmp_path / src, dtype=src)  # leaves `model` holding the rounded weights in float64
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    expected_tag = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}[src]
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {expected_tag}
    ref = torch_forward(model, "float64", input_ids=IDS, attention_mask=MASK, labels=LABELS)
    rounded = hf_state(model)
    for dtype in ("float32", "float64"):
        ours = refimpl.from_pretrained(folder, task="masked-lm", dtype=dtype)
        assert ours.dtype == np.dtype(dtype)
        # the weights are the checkpoint's, exactly (float16/bfloat16 widen exactly; float64 -> float32 rounds as torch does)
        word = ours.params.embeddings.word
        assert word.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(word, rounded["roberta_prelayernorm.embeddings.word_embeddings.weight"].astype(dtype))
        np.testing.assert_array_equal(ours.params.lm_head.bias, rounded["lm_head.bias"].astype(dtype))
        out = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS)
        assert out.logits.dtype == np.dtype(dtype)
        assert_close(out.logits, ref.logits.numpy(), dtype, "logits")
        assert_close(out.loss, ref.loss.numpy(), dtype, "loss")


def test_bfloat16_gives_exact_float32_bits(tmp_path):
    model = build_hf("masked-lm", seed=4)
    bf16 = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    folder = save_hf(model, tmp_path / "bf16", dtype="bfloat16")
    ours = refimpl.from_pretrained(folder, task="masked-lm", dtype="float32")
    key = "roberta_prelayernorm.encoder.layer.1.intermediate.dense.weight"
    want = bf16[key].to(torch.float32).numpy()
    got = ours.params.layers[1].intermediate.weight
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.any(got.view(np.uint32) & 0xFFFF)  # the low half of every float32 is zero


# ---------------------------------------------------------------------------------------------
# sharded checkpoints
# ---------------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads_identically(mlm, tmp_path):
    model, single = mlm
    folder = save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in os.listdir(folder)
    assert "model.safetensors" not in shards
    a = refimpl.from_pretrained(single, task="masked-lm")
    b = refimpl.from_pretrained(folder, task="masked-lm")
    la, lb = dict(refimpl.params.iter_leaves(a.params)), dict(refimpl.params.iter_leaves(b.params))
    assert la.keys() == lb.keys()
    for k in la:
        np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
        assert lb[k].dtype == np.float32
    np.testing.assert_array_equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)
    assert b.params.lm_head.decoder_weight is b.params.embeddings.word


def test_sharded_checkpoint_with_a_missing_shard(mlm, tmp_path):
    model, _ = mlm
    folder = save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(CheckpointError, match=f"lists the shard '{shard}', which is not in"):
        refimpl.from_pretrained(folder)


@pytest.mark.parametrize("content", ["{not json", "{}", '{"weight_map": [1, 2]}', "[]"])
def test_corrupt_shard_index(mlm, tmp_path, content):
    model, _ = mlm
    folder = save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: (not a safetensors index|weight_map must map|the shard index is not valid JSON)"):
        refimpl.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------
# zero copy and tying
# ---------------------------------------------------------------------------------------------


def _file_backed(a) -> bool:
    """Whether ``a`` views a memory-mapped file: its ``.base`` chain reaches a numpy.memmap and,
    below it, the ``mmap.mmap`` of the file (an ``astype`` of a memmap is a memmap subclass too,
    but owns its data)."""
    seen_memmap = False
    while isinstance(a, np.ndarray):
        seen_memmap = seen_memmap or isinstance(a, np.memmap)
        a = a.base
    return seen_memmap and isinstance(a, mmap.mmap)


def test_float32_file_as_float32_is_memory_mapped(mlm):
    _, folder = mlm
    ours = refimpl.from_pretrained(folder, task="masked-lm", dtype="float32")
    for path, leaf in refimpl.params.iter_leaves(ours.params):
        assert not leaf.flags.owndata, path
        assert _file_backed(leaf), path
        assert not leaf.flags.writeable, path  # a read-only map of the file


def test_float64_from_float32_converts(mlm):
    _, folder = mlm
    ours = refimpl.from_pretrained(folder, task="masked-lm", dtype="float64")
    for path, leaf in refimpl.params.iter_leaves(ours.params):
        assert leaf.dtype == np.float64, path
        assert not _file_backed(leaf), path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tied_decoder_is_the_word_embedding_array(mlm, dtype):
    _, folder = mlm
    assert "lm_head.decoder.weight" not in load_file(os.path.join(folder, "model.safetensors"))
    ours = refimpl.from_pretrained(folder, task="masked-lm", dtype=dtype)
    assert ours.config.tie_word_embeddings
    assert ours.params.lm_head.decoder_weight is ours.params.embeddings.word
    assert ours.num_parameters() == sum(p.numel() for p in mlm[0].parameters())


def test_untied_checkpoint_loads_its_own_decoder(tmp_path):
    model = build_hf("masked-lm", seed=5, tie_word_embeddings=False)
    folder = save_hf(model, tmp_path / "untied")
    state = load_file(os.path.join(folder, "model.safetensors"))
    assert "lm_head.decoder.weight" in state
    # transformers 5.x unties the decoder's bias with its weight: the forward adds lm_head.decoder.bias
    assert not np.array_equal(state["lm_head.decoder.bias"], state["lm_head.bias"])
    decoder = model.lm_head.decoder.weight.detach().numpy()
    word = model.roberta_prelayernorm.embeddings.word_embeddings.weight.detach().numpy()
    assert not np.array_equal(decoder, word)
    ours = refimpl.from_pretrained(folder, task="masked-lm", dtype="float64")
    assert ours.params.lm_head.decoder_weight is not ours.params.embeddings.word
    np.testing.assert_array_equal(ours.params.lm_head.decoder_weight, decoder)
    np.testing.assert_array_equal(ours.params.lm_head.bias, state["lm_head.decoder.bias"])
    exported = refimpl.state_dict(ours)
    np.testing.assert_array_equal(exported["lm_head.decoder.weight"], decoder)
    np.testing.assert_array_equal(exported["lm_head.decoder.bias"], state["lm_head.decoder.bias"])
    ref = torch_forward(model, "float64", input_ids=IDS, attention_mask=MASK)
    assert_close(ours(input_ids=IDS, attention_mask=MASK).logits, ref.logits.numpy(), "float64", "logits")
    # without its decoder an untied checkpoint is incomplete
    edit_weights(folder, lambda s: {k: v for k, v in s.items() if k != "lm_head.decoder.weight"})
    with pytest.raises(CheckpointError, match=r"missing \(1\): lm_head.decoder.weight"):
        refimpl.from_pretrained(folder, task="masked-lm")


# ---------------------------------------------------------------------------------------------
# tasks and heads
# ---------------------------------------------------------------------------------------------


def test_base_from_masked_lm_checkpoint(mlm):
    model, folder = mlm
    ours = refimpl.from_pretrained(folder, task="base", dtype="float64")
    assert ours.task == "base" and ours.params.lm_head is None
    out = ours(input_ids=IDS, attention_mask=MASK)
    assert out.pooler_output is None  # the masked-LM checkpoint has no pooler
    with torch.no_grad():
        ref = model.roberta_prelayernorm(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK))
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), "float64", "last_hidden_state")


def test_base_checkpoint_with_pooler(base):
    model, folder = base
    assert "pooler.dense.weight" in load_file(os.path.join(folder, "model.safetensors"))
    ours = refimpl.from_pretrained(folder, dtype="float64")
    assert ours.task == "base"
    ref = torch_forward(model, "float64", input_ids=IDS, attention_mask=MASK)
    out = ours(input_ids=IDS, attention_mask=MASK)
    assert_close(out.pooler_output, ref.pooler_output.numpy(), "float64", "pooler_output")


@pytest.mark.parametrize(
    "task, keys",
    [
        ("masked-lm", ["lm_head.dense.weight", "lm_head.dense.bias", "lm_head.layer_norm.weight", "lm_head.bias"]),
        ("sequence-classification", ["classifier.dense.weight", "classifier.out_proj.weight", "classifier.out_proj.bias"]),
        ("token-classification", ["classifier.weight", "classifier.bias"]),
        ("question-answering", ["qa_outputs.weight", "qa_outputs.bias"]),
        ("multiple-choice", ["classifier.weight", "classifier.bias"]),
    ],
)
def test_task_from_base_checkpoint_lists_missing_head_keys(base, task, keys):
    _, folder = base
    with pytest.raises(CheckpointError, match=f"does not match a RoBERTa-PreLayerNorm {task} model") as info:
        refimpl.from_pretrained(folder, task=task)
    msg = str(info.value)
    assert "missing (" in msg and folder in msg and "the task is right" in msg
    for k in keys:
        assert k in msg
    assert "encoder.layer" not in msg  # the base weights themselves were found


def test_missing_pooler_allowed_for_base_refused_for_multiple_choice(tmp_path):
    model = build_hf("multiple-choice", seed=6)
    folder = save_hf(model, tmp_path / "mc")
    assert refimpl.from_pretrained(folder).task == "multiple-choice"
    edit_weights(folder, lambda s: {k: v for k, v in s.items() if ".pooler." not in k})
    out = refimpl.from_pretrained(folder, task="base")(input_ids=IDS)
    assert out.pooler_output is None and out.last_hidden_state.shape == (2, 6, TINY["hidden_size"])
    with pytest.raises(CheckpointError, match=r"missing \(2\): roberta_prelayernorm.pooler.dense.weight, roberta_prelayernorm.pooler.dense.bias"):
        refimpl.from_pretrained(folder)  # architectures says multiple choice


def test_multiple_choice_model_without_pooler_refuses_at_call(tmp_path):
    """Params assembled by hand (not through loading) meet the same rule when called."""
    model = build_hf("multiple-choice", seed=6)
    ours = refimpl.from_pretrained(save_hf(model, tmp_path / "mc"))
    ours.params.pooler = None
    with pytest.raises(CheckpointError, match="multiple choice scores the pooler output"):
        ours(input_ids=np.stack([IDS, IDS], axis=1))


def test_one_error_lists_missing_unexpected_and_wrongly_shaped(mlm, tmp_path):
    _, src = mlm
    folder = copy_folder(src, tmp_path / "edited")

    def damage(s):
        del s["roberta_prelayernorm.encoder.layer.0.attention.self.query.weight"]
        del s["lm_head.dense.bias"]
        s["roberta_prelayernorm.encoder.layer.7.output.dense.weight"] = np.zeros((2, 2), np.float32)
        s["something.else"] = np.zeros(3, np.float32)
        s["lm_head.layer_norm.weight"] = np.zeros(17, np.float32)
        s["roberta_prelayernorm.embeddings.word_embeddings.weight"] = np.zeros((V + 1, TINY["hidden_size"]), np.float32)
        return s

    edit_weights(folder, damage)
    with pytest.raises(CheckpointError) as info:
        refimpl.from_pretrained(folder, task="masked-lm")
    msg = str(info.value)
    assert "missing (2): roberta_prelayernorm.encoder.layer.0.attention.self.query.weight, lm_head.dense.bias" in msg
    assert "wrong shape (2)" in msg
    assert f"roberta_prelayernorm.embeddings.word_embeddings.weight: file [{V + 1}, 16], config [{V}, 16]" in msg
    assert "lm_head.layer_norm.weight: file [17], config [16]" in msg
    assert "unexpected (2)" in msg and "something.else" in msg and "encoder.layer.7.output.dense.weight" in msg


def to_original(state: dict) -> dict:
    """The original efficient_mlm layout: ``roberta.`` prefix, an unused attention.self.LayerNorm per layer."""
    out = {k.replace("roberta_prelayernorm.", "roberta."): v for k, v in state.items()}
    for i in range(TINY["num_hidden_layers"]):
        for wb in ("weight", "bias"):
            out[f"roberta.encoder.layer.{i}.attention.self.LayerNorm.{wb}"] = np.full(16, 7.0, np.float32)
    return out


def rewrite_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("config_style", ["prelayernorm", "roberta"])
def test_original_prefix_loads(config_style, mlm, tmp_path, caplog):
    model, src = mlm
    folder = copy_folder(src, tmp_path / "prefixed")
    edit_weights(folder, to_original)
    if config_style == "roberta":  # what the Hub's efficient_mlm repos may say
        rewrite_config(folder, model_type="roberta", architectures=["RobertaForMaskedLM"])
    with caplog.at_level(logging.INFO, logger="refimpl"):
        ours = refimpl.from_pretrained(folder, dtype="float64")  # the task from architectures
    [record] = [r for r in caplog.records if r.name == "refimpl"]
    assert "original efficient_mlm layout" in record.getMessage() and "dropped 4 unused attention.self.LayerNorm" in record.getMessage()
    assert ours.task == "masked-lm" and ours.config.to_dict()["model_type"] == "roberta-prelayernorm"
    ref = torch_forward(model, "float64", input_ids=IDS, attention_mask=MASK, labels=LABELS)
    out = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS)
    assert_close(out.logits, ref.logits.numpy(), "float64", "logits")
    assert_close(out.loss, ref.loss.numpy(), "float64", "loss")


def test_prelayernorm_checkpoint_logs_nothing(mlm, caplog):
    with caplog.at_level(logging.DEBUG, logger="refimpl"):
        refimpl.from_pretrained(mlm[1])
    assert not [r for r in caplog.records if r.name == "refimpl"]


def test_roberta_prefix_with_wrong_keys_lists_them(mlm, tmp_path):
    _, src = mlm
    folder = copy_folder(src, tmp_path / "garbage")

    def damage(state):
        state = to_original(state)
        del state["roberta.encoder.layer.1.intermediate.dense.weight"]
        state["roberta.encoder.layer.1.intermediate.dense.kernel"] = np.zeros((32, 16), np.float32)
        state["roberta.something.else"] = np.zeros(3, np.float32)
        return state

    edit_weights(folder, damage)
    with pytest.raises(CheckpointError) as e:
        refimpl.from_pretrained(folder)
    msg = str(e.value)
    assert "missing (1): roberta_prelayernorm.encoder.layer.1.intermediate.dense.weight" in msg
    assert "unexpected (2)" in msg and "roberta_prelayernorm.something.else" in msg
    assert "roberta_prelayernorm.encoder.layer.1.intermediate.dense.kernel" in msg
    assert "after loading did this: converted the original efficient_mlm layout" in msg  # why the names changed


def test_garbage_roberta_keys_are_not_a_layout(tmp_path):
    """Keys under ``roberta.`` that are neither layout: every tensor missing, every key unexpected."""
    folder = tmp_path / "garbage"
    folder.mkdir()
    with open(folder / "config.json", "w") as f:
        json.dump(refimpl.Config(**TINY, architectures=["RobertaForMaskedLM"]).to_dict(), f)
    save_file({"roberta.foo.weight": np.zeros(3, np.float32), "roberta.bar": np.zeros(2, np.float32)},
              str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"masked-lm model with this config:\n  missing \(\d+\): ") as e:
        refimpl.from_pretrained(str(folder))
    msg = str(e.value)
    assert "roberta_prelayernorm.embeddings.word_embeddings.weight" in msg
    assert "unexpected (2): " in msg and "roberta_prelayernorm.foo.weight" in msg and "roberta_prelayernorm.bar" in msg


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_post_layernorm_roberta_refused(fmt, tmp_path):
    hf = build_post_ln_roberta(seed=8)
    folder = save_hf(hf, tmp_path / "roberta-base-like", dtype="float32")
    if fmt == "bin":  # transformers 5 writes safetensors only: the .bin as older versions wrote it
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(hf.float().state_dict(), os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(CheckpointError) as e:
        refimpl.from_pretrained(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder} is a post-LayerNorm RoBERTa (such as roberta-base")
    assert "refimpl is RoBERTa-PreLayerNorm only" in msg and "transformers' RobertaForMaskedLM" in msg
    assert "\n" not in msg


def test_plain_roberta_class_names_map_to_the_same_tasks():
    for task, (cls, _, _) in refimpl.TASKS.items():
        plain = cls.replace("RobertaPreLayerNorm", "Roberta")
        assert refimpl.params.task_from_architectures([plain]) == task
        assert refimpl.params.normalize_task(plain) == task


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------


def _rewrite(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(fn(data))


def _header_file(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: d[:-100], r"does not match its byte range .* \(truncated or corrupt file\)"),
        (lambda d: d[:200], r"header length \d+ does not fit in a 200-byte file \(truncated\?\)"),
        (lambda d: d[:5], r"too short to be a safetensors file \(5 bytes\)"),
        (lambda d: b"", r"too short to be a safetensors file \(0 bytes\)"),
        (lambda d: d[:8] + b"\xff\xfe{x" + d[12:], "the safetensors header is not valid JSON"),
        (lambda d: (10**12).to_bytes(8, "little") + d[8:], "header length 1000000000000 does not fit"),
        (lambda d: _header_file([1, 2]), "the safetensors header is not a JSON object"),
        (lambda d: _header_file({"a": [1]}), "malformed header entry for 'a'"),
        (lambda d: _header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "malformed header entry"),
        (lambda d: _header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4), "data_offsets must be integers"),
        (lambda d: _header_file({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2), "has dtype F8_E4M3, which refimpl cannot read"),
        (lambda d: _header_file({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "which refimpl cannot read"),
        (lambda d: _header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), r"tensor 'a' \(dtype F32, shape \[2\]\) does not match its byte range \[0, 4\)"),
        (lambda d: _header_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "does not match its byte range"),
    ],
    ids=["truncated-data", "truncated-header", "5-bytes", "empty", "bad-json", "huge-length", "not-object",
         "entry-not-object", "short-offsets", "float-offsets", "unknown-dtype", "dtype-list", "size-mismatch", "negative-dim"],
)
def test_damaged_safetensors(mlm, tmp_path, damage, match):
    _, src = mlm
    folder = copy_folder(src, tmp_path / "damaged")
    _rewrite(folder, damage)
    with pytest.raises(CheckpointError, match=match) as info:
        refimpl.from_pretrained(folder)
    assert "model.safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------------
# task and dtype arguments, missing files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, task",
    [
        ("RobertaPreLayerNormForMaskedLM", "masked-lm"), ("RobertaForMaskedLM", "masked-lm"), ("masked_lm", "masked-lm"),
        ("RobertaPreLayerNormModel", "base"), ("Masked-LM", "masked-lm"),
    ],
)
def test_task_names(mlm, name, task):
    assert refimpl.from_pretrained(mlm[1], task=name).task == task


def test_unknown_task(mlm):
    with pytest.raises(ValueError, match="unknown task 'RobertaForPreTraining'; use one of base, masked-lm"):
        refimpl.from_pretrained(mlm[1], task="RobertaForPreTraining")


def test_task_none_takes_architectures(mlm, base, tmp_path):
    assert refimpl.from_pretrained(mlm[1]).task == "masked-lm"
    assert refimpl.from_pretrained(base[1]).task == "base"
    folder = copy_folder(mlm[1], tmp_path / "noarch")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("architectures")
    with open(path, "w") as f:
        json.dump(cfg, f)
    assert refimpl.from_pretrained(folder).task == "base"  # no architectures: the base model
    cfg["architectures"] = ["SomethingElse", "RobertaPreLayerNormForTokenClassification"]
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"token-classification model .*\n  missing \(2\): classifier.weight"):
        refimpl.from_pretrained(folder)  # the first known architecture decides


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", np.float16, "int32", None, "fp32"])
def test_unsupported_compute_dtype(mlm, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float64; got") as info:
        refimpl.from_pretrained(mlm[1], dtype=dtype)
    if dtype in ("float16", "bfloat16"):
        assert "converted on load" in str(info.value)


def test_numpy_dtype_objects_accepted(mlm):
    assert refimpl.from_pretrained(mlm[1], dtype=np.float64).dtype == np.float64
    assert refimpl.from_pretrained(mlm[1], dtype=np.dtype("float32")).dtype == np.float32


def test_folder_without_config(mlm, tmp_path):
    folder = copy_folder(mlm[1], tmp_path / "noconfig")
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*noconfig"):
        refimpl.from_pretrained(folder)


def test_folder_without_weights(mlm, tmp_path):
    folder = copy_folder(mlm[1], tmp_path / "noweights")
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json in .*noweights"):
        refimpl.from_pretrained(folder)


def test_not_a_folder(mlm, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        refimpl.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"config.json' is (not a folder|a file, not a folder)"):
        refimpl.from_pretrained(os.path.join(mlm[1], "config.json"))


def test_bad_config_json_in_folder(mlm, tmp_path):
    folder = copy_folder(mlm[1], tmp_path / "badcfg")
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{nope")
    with pytest.raises(refimpl.ConfigError, match="config.json: the config is not valid JSON"):
        refimpl.from_pretrained(folder)


def test_config_that_does_not_fit_the_weights(mlm, tmp_path):
    folder = copy_folder(mlm[1], tmp_path / "othercfg")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["num_hidden_layers"] = 3
    cfg["intermediate_size"] = 24
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"layers: config.json says num_hidden_layers=3, the tensors hold 2") as info:
        refimpl.from_pretrained(folder)  # (the key table is built for the layers the tensors hold, no more)
    assert "intermediate.dense.weight: file [32, 16], config [24, 16]" in str(info.value)
