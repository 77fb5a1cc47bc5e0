"""Conversion round trips with transformers, the original efficient_mlm layout, export atomicity, the CLI.

Every round trip: transformers writes a checkpoint (safetensors in float32/float16/bfloat16,
single or sharded; ``.bin`` written with ``torch.save(model.state_dict())`` since transformers 5 no
longer writes it, single or sharded) -> refimpl reads it -> refimpl exports it -> transformers
reloads the export with no missing, unexpected or mismatched keys, the same tensors bit for bit,
and the same outputs (float64, to the tolerance table).
"""

from __future__ import annotations

import copy
import json
import logging
import mmap
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from conftest import TASK_CLASSES, build_hf, build_post_ln_roberta, save_hf  # noqa: E402
from tolerances import assert_close  # noqa: E402

import refimpl_conversion  # noqa: E402
from refimpl_conversion import cli  # noqa: E402
from refimpl_conversion.exporter import export, export_state_dict  # noqa: E402
from refimpl.io import float32_to_bf16_bits  # noqa: E402
from refimpl_conversion.keymap import ConversionError  # noqa: E402
from refimpl_conversion.loaders import detect_format, load  # noqa: E402

TASKS = list(TASK_CLASSES)
# variant -> (writer, torch dtype of the written tensors, safetensors dtype name)
VARIANTS = {
    "st-f32": ("safetensors", "float32", "F32"),
    "st-f32-sharded": ("safetensors-sharded", "float32", "F32"),
    "st-f16": ("safetensors", "float16", "F16"),
    "st-bf16": ("safetensors", "bfloat16", "BF16"),
    "bin-f32": ("bin", "float32", "F32"),
    "bin-f32-sharded": ("bin-sharded", "float32", "F32"),
}
OUTPUTS = {
    "base": ("last_hidden_state", "pooler_output"),
    "masked-lm": ("logits",),
    "causal-lm": ("logits",),
    "sequence-classification": ("logits",),
    "token-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
    "multiple-choice": ("logits",),
}


def hf_kwargs(task: str) -> dict:
    return {"num_labels": 3} if task in ("sequence-classification", "token-classification") else {}


def inputs_for(task: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (2, 3, 7) if task == "multiple-choice" else (2, 7)
    ids = rng.integers(3, 60, size=shape)
    ids[..., 0] = 0
    ids[1, ..., 5:] = 1  # right padding in the second row
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": (ids != 1).astype(np.int64),
        "token_type_ids": rng.integers(0, 2, size=shape).astype(np.int64),
    }


def run_torch(model, inputs: dict) -> dict:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return {k: getattr(out, k).numpy() for k in OUTPUTS[_task_of(model)]}


def run_refimpl(model, inputs: dict) -> dict:
    out = model(**inputs)
    return {k: np.asarray(getattr(out, k)) for k in OUTPUTS[model.task]}


def _task_of(torch_model) -> str:
    return {v: k for k, v in TASK_CLASSES.items()}[type(torch_model).__name__]


def assert_outputs_close(actual: dict, expected: dict, dtype: str, what: str) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert_close(actual[k], expected[k], dtype, f"{what}: {k}")


def write_source(hf, folder, variant: str) -> str:
    """Write ``hf`` the way ``variant`` says; returns the folder."""
    kind, dtype, _ = VARIANTS[variant]
    if kind.startswith("safetensors"):
        kwargs = {"max_shard_size": "2KB"} if kind.endswith("sharded") else {}
        return save_hf(hf, folder, dtype=dtype, **kwargs)
    os.makedirs(folder, exist_ok=True)
    hf.config.save_pretrained(str(folder))
    sd = copy.deepcopy(hf).to(getattr(torch, dtype)).state_dict()  # tied tensors stay shared, as old transformers wrote them
    if kind == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    else:
        keys = list(sd)
        parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
        weight_map = {}
        for name, ks in parts.items():
            torch.save({k: sd[k] for k in ks}, os.path.join(folder, name))
            weight_map.update({k: name for k in ks})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return str(folder)


def reload_hf(folder: str, task: str):
    """transformers' class for ``task`` from ``folder``; asserts a clean load. Returns it in float64."""
    cls = getattr(transformers, TASK_CLASSES[task])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(folder, output_loading_info=True, attn_implementation="eager")
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[k], f"transformers reported {k}: {info[k]}"
    return model


def header_dtypes(folder: str) -> set[str]:
    out = set()
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            out |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return out


@pytest.fixture(scope="module")
def hf_models():
    cache = {}

    def get(task: str):
        if task not in cache:
            cache[task] = build_hf(task, seed=TASKS.index(task), **hf_kwargs(task))
        return cache[task]

    return get


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", TASKS)
def test_round_trip(task, variant, hf_models, tmp_path):
    kind, dtype, st_dtype = VARIANTS[variant]
    hf = hf_models(task)
    src = write_source(hf, tmp_path / "src", variant)
    # The reference: the transformers model with its weights rounded as they were written.
    ref_model = copy.deepcopy(hf).to(getattr(torch, dtype)).double()
    inputs = inputs_for(task)
    expected = run_torch(ref_model, inputs)

    # refimpl reads the source: through refimpl.from_pretrained (safetensors and .bin folders) and refimpl_conversion.load.
    assert detect_format(src) == ("hf" if kind.startswith("safetensors") else "bin")
    loaded = load(src, dtype="float64")
    assert loaded.source_dtype == dtype and loaded.model.task == task
    assert_outputs_close(run_refimpl(loaded.model, inputs), expected, "float64", f"refimpl_conversion.load({variant})")
    direct = refimpl.from_pretrained(src, dtype="float64")
    assert_outputs_close(run_refimpl(direct, inputs), expected, "float64", f"refimpl.from_pretrained({variant})")

    # Export (the source's dtype by default; sharded when the source was) and reload in transformers.
    dst = str(tmp_path / "dst")
    summary = refimpl_conversion.convert(src, dst, max_shard_size="2KB" if kind.endswith("sharded") else "5GB")
    assert summary.dtype == dtype and header_dtypes(dst) == {st_dtype}
    assert (summary.shards > 1) == kind.endswith("sharded")
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json" if summary.shards > 1 else "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [TASK_CLASSES[task]] and cfg["model_type"] == "roberta-prelayernorm"
    back = reload_hf(dst, task)
    # The same tensors, bit for bit, in the written dtype.
    want = copy.deepcopy(hf).to(getattr(torch, dtype)).state_dict()
    got = back.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert_outputs_close(run_torch(back.double(), inputs), expected, "float64", f"transformers reload ({variant})")
    # refimpl reads its own export too.
    again = refimpl.from_pretrained(dst, dtype="float64")
    assert_outputs_close(run_refimpl(again, inputs), expected, "float64", "refimpl reading the export")


def test_sharded_index_matches_transformers(hf_models, tmp_path):
    """The sharded export's index has the same shape, shards and totals as save_pretrained's."""
    hf = hf_models("masked-lm")
    theirs = save_hf(hf, tmp_path / "theirs", dtype="float32", max_shard_size="2KB")
    model = refimpl.from_pretrained(theirs)
    summary = export(model, tmp_path / "ours", max_shard_size="2KB")
    idx = [json.load(open(os.path.join(d, "model.safetensors.index.json"))) for d in (theirs, tmp_path / "ours")]
    assert idx[0]["metadata"] == idx[1]["metadata"]
    assert idx[0]["weight_map"].keys() == idx[1]["weight_map"].keys()
    assert sorted(set(idx[0]["weight_map"].values())) == sorted(set(idx[1]["weight_map"].values()))
    assert summary.bytes == idx[1]["metadata"]["total_size"] and summary.parameters == hf.num_parameters()
    # every shard holds what the index says
    for name in set(idx[1]["weight_map"].values()):
        with open(os.path.join(tmp_path / "ours", name), "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        assert header.pop("__metadata__") == {"format": "pt"}
        assert set(header) == {k for k, v in idx[1]["weight_map"].items() if v == name}


def test_untied_lm_head_round_trip(tmp_path):
    hf = build_hf("masked-lm", seed=7, tie_word_embeddings=False)
    src = save_hf(hf, tmp_path / "src")
    model = refimpl.from_pretrained(src, dtype="float64")
    state = export_state_dict(model)
    assert "lm_head.decoder.weight" in state and "lm_head.decoder.bias" in state  # as transformers writes an untied head
    export(model, tmp_path / "dst")
    back = reload_hf(str(tmp_path / "dst"), "masked-lm")
    assert not back.config.tie_word_embeddings
    inputs = inputs_for("masked-lm")
    assert_outputs_close(run_torch(back.double(), inputs), run_torch(hf, inputs), "float64", "untied")


def test_tied_weights_written_as_transformers_writes_them(hf_models, tmp_path):
    hf = hf_models("masked-lm")
    theirs = save_hf(hf, tmp_path / "theirs")
    export(refimpl.from_pretrained(theirs, dtype="float64"), tmp_path / "ours")
    from refimpl.io import read_safetensors

    theirs_keys = set(read_safetensors(os.path.join(theirs, "model.safetensors"))[0])
    ours_keys = set(read_safetensors(os.path.join(tmp_path / "ours", "model.safetensors"))[0])
    assert ours_keys == theirs_keys and "lm_head.decoder.weight" not in ours_keys


def test_export_copies_tokenizer_files(hf_models, tmp_path):
    src = save_hf(hf_models("masked-lm"), tmp_path / "src")
    tok = os.path.join(os.path.dirname(__file__), "data", "roberta-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        with open(os.path.join(tok, name), "rb") as a, open(os.path.join(src, name), "wb") as b:
            b.write(a.read())
    refimpl_conversion.convert(src, tmp_path / "dst")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(tmp_path / "dst", name), "rb") as b:
            assert a.read() == b.read()
    assert "dict.txt" not in os.listdir(tmp_path / "dst")


def test_task_override_drops_other_head(hf_models, tmp_path):
    src = save_hf(hf_models("masked-lm"), tmp_path / "src")
    # masked-lm -> base: the LM head is not written; the base model has no pooler weights to write.
    loaded = load(src, task="base")
    assert any("not converted (not part of a base model): lm_head.bias" in n for n in loaded.notes)
    state = export_state_dict(loaded.model)
    assert not any(k.startswith("lm_head") for k in state) and not any(k.startswith("pooler") for k in state)


# ---------------------------------------------------------------------------------------------
# The original efficient_mlm layout
# ---------------------------------------------------------------------------------------------


def original_layout(hf, folder, fmt: str, seed: int = 0) -> str:
    """``hf``'s weights laid out as the original efficient_mlm checkpoints are: ``roberta.`` prefix,
    unused ``attention.self.LayerNorm`` weights, the decoder weight and bias written out, the
    position_ids buffer, and a RoBERTa config."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in copy.deepcopy(hf).float().state_dict().items():
        sd[("roberta." + k[len("roberta_prelayernorm."):]) if k.startswith("roberta_prelayernorm.") else k] = v
    H = hf.config.hidden_size
    for i in range(hf.config.num_hidden_layers):
        sd[f"roberta.encoder.layer.{i}.attention.self.LayerNorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        sd[f"roberta.encoder.layer.{i}.attention.self.LayerNorm.bias"] = torch.randn(H, generator=g)
    sd["roberta.embeddings.position_ids"] = torch.arange(hf.config.max_position_embeddings)[None]
    os.makedirs(folder, exist_ok=True)
    cfg = hf.config.to_dict()
    cfg.update(model_type="roberta", architectures=["RobertaForMaskedLM"])
    cfg.pop("dtype", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if fmt == "bin":
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_original_layout(fmt, hf_models, tmp_path, capsys, caplog):
    hf = hf_models("masked-lm")
    src = original_layout(hf, tmp_path / "orig", fmt)
    cfg = json.load(open(os.path.join(src, "config.json")))
    assert cfg["model_type"] == "roberta" and cfg["architectures"] == ["RobertaForMaskedLM"]  # as the Hub repos ship it
    assert detect_format(src) == "original"
    inputs = inputs_for("masked-lm")
    expected = run_torch(copy.deepcopy(hf).float().double(), inputs)
    L = hf.config.num_hidden_layers
    # every roberta_prelayernorm.* tensor and the position_ids buffer were written as roberta.*
    renamed = len({k for k in hf.state_dict() if k.startswith("roberta_prelayernorm.")} | {"roberta_prelayernorm.embeddings.position_ids"})

    # refimpl.from_pretrained converts it in memory: the task from "RobertaForMaskedLM", one log line
    with caplog.at_level(logging.INFO, logger="refimpl"):
        model = refimpl.from_pretrained(src, dtype="float64")
    records = [r for r in caplog.records if r.name == "refimpl"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    line = records[0].getMessage()
    assert "\n" not in line and "original efficient_mlm layout" in line
    assert f"renamed {renamed} 'roberta.' keys" in line and f"dropped {2 * L} unused attention.self.LayerNorm tensors" in line
    assert model.task == "masked-lm" and model.config.to_dict()["model_type"] == "roberta-prelayernorm"
    assert_outputs_close(run_refimpl(model, inputs), expected, "float64", "original layout, from_pretrained")

    loaded = load(src, dtype="float64")
    assert loaded.format == "original" and loaded.model.task == "masked-lm"
    assert loaded.notes == [line.split(": ", 1)[1]]  # refimpl-convert's note is the same line
    assert_outputs_close(run_refimpl(loaded.model, inputs), expected, "float64", "original layout")

    assert cli.main([src, str(tmp_path / "dst")]) == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and "from original" in out.out and "RobertaPreLayerNormForMaskedLM" in out.out
    back = reload_hf(str(tmp_path / "dst"), "masked-lm")
    assert_outputs_close(run_torch(back.double(), inputs), expected, "float64", "original -> transformers")
    # What transformers' conversion script keeps: the renamed keys minus the unused LayerNorms
    # (and minus the tied decoder weight/bias and the position_ids buffer, which save_pretrained omits).
    from refimpl.io import read_safetensors

    written = set(read_safetensors(os.path.join(tmp_path / "dst", "model.safetensors"))[0])
    want = set(hf.state_dict()) - {"lm_head.decoder.weight", "lm_head.decoder.bias"}
    assert written == want


def test_original_layout_safetensors_stays_memory_mapped(hf_models, tmp_path):
    src = original_layout(hf_models("masked-lm"), tmp_path / "orig", "safetensors")
    model = refimpl.from_pretrained(src, dtype="float32")
    for path, leaf in refimpl.params.iter_leaves(model.params):
        a = leaf
        while isinstance(a, np.ndarray):  # down the .base chain to the file's mmap: renamed, not copied
            a = a.base
        assert isinstance(a, mmap.mmap) and not leaf.flags.owndata and not leaf.flags.writeable, path


def post_ln_roberta(folder, fmt: str) -> str:
    """transformers' post-LayerNorm RobertaForMaskedLM (roberta-base's architecture), written as ``fmt``."""
    hf = build_post_ln_roberta(seed=7)
    folder = save_hf(hf, folder, dtype="float32")
    if fmt == "bin":  # transformers 5 writes safetensors only: the .bin as older versions wrote it
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(hf.float().state_dict(), os.path.join(folder, "pytorch_model.bin"))
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_post_layernorm_roberta_refused_by_convert(fmt, tmp_path, capsys):
    src = post_ln_roberta(tmp_path / "roberta", fmt)
    assert json.load(open(os.path.join(src, "config.json")))["architectures"] == ["RobertaForMaskedLM"]
    what = r"is a post-LayerNorm RoBERTa \(such as roberta-base.*RoBERTa-PreLayerNorm only.*transformers' RobertaForMaskedLM"
    with pytest.raises(refimpl.CheckpointError, match=what):  # the same refusal as from_pretrained's
        detect_format(src)
    for from_ in ("auto", "hf" if fmt == "safetensors" else "bin", "original"):
        with pytest.raises(refimpl.CheckpointError, match=what):
            load(src, fmt=from_)
    capsys.readouterr()
    assert cli.main([src, str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "post-LayerNorm RoBERTa" in err and "RobertaForMaskedLM" in err, err
    assert not os.path.exists(tmp_path / "dst")


def test_layernorm_placement_from_key_names(hf_models):
    from refimpl.layouts import is_post_layernorm, layernorm_placement

    pre = list(hf_models("masked-lm").state_dict())
    post = list(build_post_ln_roberta().state_dict())
    base_post = [k[len("roberta."):] for k in post if k.startswith("roberta.")]  # RobertaModel: no prefix
    original = [k.replace("roberta_prelayernorm.", "roberta.") for k in pre] + ["roberta.encoder.layer.0.attention.self.LayerNorm.weight"]
    assert layernorm_placement(pre) == layernorm_placement(original) == {"pre-LN"}
    assert layernorm_placement(post) == layernorm_placement(base_post) == {"post-LN"}
    assert is_post_layernorm(post) and is_post_layernorm(base_post)
    assert not is_post_layernorm(pre) and not is_post_layernorm(original) and not is_post_layernorm(["roberta.foo"])
    assert not is_post_layernorm(pre + post)  # both: not a post-LN model; the key check lists what is wrong


def test_original_layout_refused_as_hf(hf_models, tmp_path):
    src = original_layout(hf_models("masked-lm"), tmp_path / "orig", "bin")
    with pytest.raises(ConversionError, match="--from original"):
        load(src, fmt="bin")
    plain = save_hf(hf_models("masked-lm"), tmp_path / "plain")
    with pytest.raises(ConversionError, match="not in the original"):
        load(plain, fmt="original")


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bfloat16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 10000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45, 1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float32),
        (np.arange(1 << 16, dtype=np.uint32) << 16 | 0x8000).view(np.float32),  # every exact tie
        ])
    ours = float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.all(np.isnan((ours[nan].astype(np.uint32) << 16).view(np.float32)))


def test_float16_overflow_is_refused(hf_models, tmp_path):
    model = refimpl.from_pretrained(save_hf(hf_models("base"), tmp_path / "src"))
    model.params.embeddings.word = np.array(model.params.embeddings.word)
    model.params.embeddings.word[3, 2] = 1e6
    with pytest.raises(ConversionError, match="overflows float16"):
        export(model, tmp_path / "dst", dtype="float16")
    assert not os.path.exists(tmp_path / "dst")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_export_dtype_conversion(dtype, hf_models, tmp_path):
    hf = hf_models("sequence-classification")
    src = save_hf(hf, tmp_path / "src", dtype="float32")
    assert cli.main([src, str(tmp_path / "dst"), "--dtype", dtype]) == 0
    assert header_dtypes(str(tmp_path / "dst")) == {{"float16": "F16", "bfloat16": "BF16", "float64": "F64"}[dtype]}
    back = reload_hf(str(tmp_path / "dst"), "sequence-classification")
    want = copy.deepcopy(hf).float().to(getattr(torch, dtype)).state_dict()  # torch's own rounding
    for k, v in back.state_dict().items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k


# ---------------------------------------------------------------------------------------------
# Atomicity and --force
# ---------------------------------------------------------------------------------------------


def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".") or "refimpl-tmp" in n or "refimpl-old" in n]


@pytest.fixture
def small_model(hf_models, tmp_path):
    return refimpl.from_pretrained(save_hf(hf_models("masked-lm"), tmp_path / "src", dtype="float32"))


def test_existing_destination_refused_without_force(small_model, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="force"):
        export(small_model, dst)
    assert os.listdir(dst) == ["keep.txt"] and not _leftovers(tmp_path)


def test_force_replaces_destination(small_model, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()  # an empty folder is replaced ...
    export(small_model, dst, force=True)
    (dst / "vocab.json").write_text("{}")  # ... and so is a folder holding only what an export writes
    (dst / "model-00001-of-00002.safetensors").write_text("old")
    summary = export(small_model, dst, force=True)
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"] == summary.files
    assert not _leftovers(tmp_path)
    (tmp_path / "a-file").write_text("x")  # a file in the way is never replaced (tests/test_hostile_convert.py)
    with pytest.raises(FileExistsError, match="is a file, not a model folder"):
        export(small_model, tmp_path / "a-file", force=True)
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_nothing(exc, existing, small_model, tmp_path, monkeypatch):
    import refimpl_conversion.exporter as ex

    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "config.json").write_text("{}")  # an earlier export: --force may replace it
    real, calls = ex.write_safetensors, []

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:  # the first shard is on disk, the second fails mid-way
            with open(path, "wb") as f:
                f.write(b"partial")
            raise exc
        real(path, tensors, metadata)

    monkeypatch.setattr(ex, "write_safetensors", failing)
    with pytest.raises(type(exc)):
        export(small_model, dst, max_shard_size="2KB", force=existing)
    assert len(calls) == 2
    assert os.listdir(dst) == ["config.json"] if existing else not os.path.exists(dst)
    assert not _leftovers(tmp_path)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "refimpl_conversion.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for word in ("SRC", "DST", "--from", "--dtype", "--task", "--head", "--max-shard-size", "--force", "fairseq", "original", "bfloat16"):
        assert word in r.stdout


def test_cli_summary(hf_models, tmp_path, capsys):
    src = save_hf(hf_models("question-answering"), tmp_path / "src", dtype="float32")
    capsys.readouterr()
    assert cli.main([src, str(tmp_path / "dst"), "--dtype", "bfloat16", "--max-shard-size", "3KB"]) == 0
    out = capsys.readouterr()
    line = out.out.strip()
    assert "\n" not in line and line.startswith(f"wrote {tmp_path / 'dst'}")
    idx = json.load(open(tmp_path / "dst" / "model.safetensors.index.json"))
    n_shards = len(set(idx["weight_map"].values()))
    for part in ("RobertaPreLayerNormForQuestionAnswering", f"{len(idx['weight_map'])} tensors",
                 f"{idx['metadata']['total_parameters']:,} parameters", f"{idx['metadata']['total_size']:,} bytes",
                 f"{n_shards} shards", "bfloat16", "from hf"):
        assert part in line, part


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t, src: [str(t / "nope"), str(t / "dst")], "no such file or folder"),
        (lambda t, src: [src, src], "already exists; pass force"),
        (lambda t, src: [src, str(t / "dst"), "--task", "translation"], "unknown task"),
        (lambda t, src: [src, str(t / "dst"), "--head", "mnli"], "--head selects"),
        (lambda t, src: [src, str(t / "dst"), "--from", "fairseq"], "holds no .pt files"),
        (lambda t, src: [src, str(t / "dst"), "--from", "bin"], "no pytorch_model.bin"),
        (lambda t, src: [src, str(t / "dst"), "--task", "multiple-choice"], "pooler"),
        (lambda t, src: [os.path.join(src, "model.safetensors"), str(t / "dst")], "pass the folder"),
    ],
)
def test_cli_errors(make_args, message, hf_models, tmp_path, capsys):
    src = save_hf(hf_models("masked-lm"), tmp_path / "src", dtype="float32")
    capsys.readouterr()
    assert cli.main(make_args(tmp_path, src)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("refimpl-convert: error:") and message in err, err
    assert not os.path.exists(tmp_path / "dst") and not _leftovers(tmp_path)


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path), str(tmp_path / "d"), "--max-shard-size", "lots"])
    assert e.value.code == 2 and "max_shard_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path), str(tmp_path / "d"), "--dtype", "int8"])
    assert e.value.code == 2


def test_cli_takes_shipped_names_and_hub_ids_like_refimpl(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    assert cli.main(["tiny", str(tmp_path / "tiny")]) == 0
    assert "(from hf: " in capsys.readouterr().out
    assert refimpl.from_pretrained(str(tmp_path / "tiny")).num_parameters() == refimpl.from_pretrained("tiny").num_parameters()
    assert cli.main(["tiny-classify", str(tmp_path / "cls")]) == 0
    assert "RobertaPreLayerNormForSequenceClassification" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert cli.main(["org/uncached", str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'org/uncached' is not in the Hugging Face cache" in err


def test_cli_argument_error_is_one_line(capsys):
    """Like refimpl's: one line naming the problem and --help, not the whole usage."""
    for argv in ([], ["only-src"], ["a", "b", "--from", "onnx"], ["a", "b", "--bogus"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("refimpl-convert: error: ") and err.rstrip().endswith("(see refimpl-convert --help)")
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("refimpl-convert (refimpl ")


def test_export_errors_name_the_destination_not_the_temporary_folder(tmp_path, monkeypatch, capsys):
    import refimpl_conversion.exporter as export_module

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(export_module, "write_safetensors", disk_full)
    dst = tmp_path / "out"
    assert cli.main(["tiny", str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {str(dst)!r}: No space left on device" in err and ".tmp" not in err
    assert os.listdir(tmp_path) == []  # the temporary folder is gone too


def test_package_export_stays_the_function_after_the_submodules_load():
    """``refimpl_conversion.export`` is the export function, also after the CLI (or anything else)
    imported the exporting submodule: the submodule is named ``exporter`` so that importing it
    cannot rebind the package attribute."""
    import importlib

    import refimpl_conversion

    importlib.import_module("refimpl_conversion.exporter")
    importlib.import_module("refimpl_conversion.cli")
    from refimpl_conversion.exporter import export as the_function

    assert refimpl_conversion.export is the_function and callable(refimpl_conversion.export)
    assert refimpl_conversion.load is importlib.import_module("refimpl_conversion.loaders").load
