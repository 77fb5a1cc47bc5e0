"""fairseq pre-LN RoBERTa: the real checkpoint in tests/data/fairseq-prenorm reproduces fairseq's own
outputs; its export loads in transformers with the same outputs; what cannot be represented is refused.

Why only non-pad positions are compared: fairseq multiplies the embedding output by
``1 - padding_mask`` (pad rows become exact zeros, visible in the reference's first inner state);
transformers and refimpl do not. Pad positions are masked out as attention keys, so the non-pad
positions are unaffected, but every hidden state *at* a pad position differs from fairseq's.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import refimpl  # noqa: E402
from tolerances import FAIRSEQ, TOL, assert_close, max_scaled_error  # noqa: E402

from refimpl_conversion import cli  # noqa: E402
from refimpl_conversion.exporter import export  # noqa: E402
from refimpl_conversion.fairseq import load_fairseq  # noqa: E402
from refimpl_conversion.keymap import ConversionError  # noqa: E402
from refimpl_conversion.loaders import detect_format, load  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "fairseq-prenorm")
SE = "encoder.sentence_encoder."


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(FIXTURE, "reference_outputs.json")) as f:
        ref = json.load(f)
    ids = np.array(ref["input_ids"], dtype=np.int64)
    return {
        "input_ids": ids,
        "attention_mask": (ids != ref["pad"]).astype(np.int64),
        "nonpad": ids != ref["pad"],
        "features": np.array(ref["features"]),  # [B, T, H], after the final LayerNorm
        "logits": np.array(ref["logits"]),  # [B, T, V]
        "inner": np.array(ref["inner_states_TxBxC"]).transpose(0, 2, 1, 3),  # [L+1, B, T, H], before the final LayerNorm
    }


def refimpl_outputs(model, reference) -> dict:
    """features, logits and the inner states (embedding output, each layer's output) from refimpl's trace."""
    trace = refimpl.Trace()
    out = model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"],
                output_hidden_states=True, trace=trace)
    L = model.config.num_hidden_layers
    inner = [trace.tensors["embeddings.output"]] + [trace.tensors[f"layers.{i}.ffn.residual"] for i in range(L)]
    return {"features": out.hidden_states[-1], "logits": out.logits, "inner": np.stack(inner)}


def errors_vs_fairseq(got: dict, reference) -> dict:
    m = reference["nonpad"]
    return {
        "features": max_scaled_error(got["features"][m], reference["features"][m]),
        "logits": max_scaled_error(got["logits"][m], reference["logits"][m]),
        **{f"inner[{j}]": max_scaled_error(got["inner"][j][m], reference["inner"][j][m]) for j in range(len(got["inner"]))},
    }


def torch_checkpoint():
    """The fixture as torch objects, to edit and torch.save (our own file: a full unpickle is fine)."""
    return torch.load(os.path.join(FIXTURE, "model.pt"), weights_only=False)


def save_checkpoint(ck, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    torch.save(ck, os.path.join(folder, "model.pt"))
    shutil.copyfile(os.path.join(FIXTURE, "dict.txt"), os.path.join(folder, "dict.txt"))
    return str(folder)


def reload_hf(folder, cls_name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True)
    for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[k], f"transformers reported {k}: {info[k]}"
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The real checkpoint against fairseq's outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reproduces_fairseq(dtype, reference):
    loaded = load(FIXTURE, dtype=dtype)
    assert detect_format(FIXTURE) == "fairseq" and loaded.format == "fairseq"
    model = loaded.model
    c = model.config
    assert model.task == "masked-lm" and loaded.source_dtype == "float32"
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (65, 16, 2, 4, 32)
    assert (c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps, c.pad_token_id) == (34, 1, 1e-5, 1)
    assert c.hidden_act == "gelu" and c.tie_word_embeddings
    assert model.params.lm_head.decoder_weight is model.params.embeddings.word
    assert not np.any(model.params.embeddings.token_type)

    got = refimpl_outputs(model, reference)
    errors = errors_vs_fairseq(got, reference)
    # Observed (scaled max error, non-pad positions): ~3.6e-7 in float32, ~3.7e-7 in float64 (fairseq's
    # own float32 rounding): float32 precision. The table's float32 bound is 5e-5.
    for name, err in errors.items():
        assert err <= TOL["float32"], f"{name}: {err:.2e} ({dtype})"
    assert max(errors.values()) <= FAIRSEQ[dtype]
    # The reason for comparing non-pad positions only: fairseq zeroed the pad rows, we do not.
    pad = ~reference["nonpad"]
    assert np.all(reference["inner"][0][pad] == 0) and np.all(np.abs(got["inner"][0][pad]).max(axis=-1) > 0)


def test_export_loads_in_transformers(reference, tmp_path, capsys):
    assert cli.main([FIXTURE, str(tmp_path / "hf")]) == 0
    line = capsys.readouterr().out
    assert "RobertaPreLayerNormForMaskedLM" in line and "from fairseq" in line
    hf = reload_hf(tmp_path / "hf", "AutoModelForMaskedLM")
    assert type(hf).__name__ == "RobertaPreLayerNormForMaskedLM"
    ours = load_fairseq(FIXTURE, dtype="float64").model
    ids, mask = reference["input_ids"], reference["attention_mask"]
    with torch.no_grad():
        out = hf.double()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    r = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    # transformers and refimpl: the same model, everywhere (pad positions included), to float64 precision.
    assert_close(out.logits.numpy(), r.logits, "float64", "logits")
    for j, (a, b) in enumerate(zip(out.hidden_states, r.hidden_states)):
        assert_close(a.numpy(), b, "float64", f"hidden_states[{j}]")
    # transformers and fairseq: float32 precision at non-pad positions.
    m = reference["nonpad"]
    assert max_scaled_error(out.logits.numpy()[m], reference["logits"][m]) <= FAIRSEQ["float32"]
    assert max_scaled_error(out.hidden_states[-1].numpy()[m], reference["features"][m]) <= FAIRSEQ["float32"]


@pytest.mark.parametrize("dtype, st", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_export(dtype, st, tmp_path, reference):
    assert cli.main([FIXTURE, str(tmp_path / "hf"), "--dtype", dtype]) == 0
    with open(tmp_path / "hf" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {st}
    hf = reload_hf(tmp_path / "hf", "RobertaPreLayerNormForMaskedLM")
    sd = torch_checkpoint()["model"]
    assert torch.equal(hf.roberta_prelayernorm.embeddings.word_embeddings.weight, sd[SE + "embed_tokens.weight"].to(getattr(torch, dtype)))


# ---------------------------------------------------------------------------------------------
# Checkpoint variants
# ---------------------------------------------------------------------------------------------


def test_old_style_args(reference, tmp_path):
    ck = torch_checkpoint()
    ck["args"], ck["cfg"] = ck["cfg"]["model"], None
    got = refimpl_outputs(load(save_checkpoint(ck, tmp_path / "fs"), dtype="float32").model, reference)
    want = refimpl_outputs(load(FIXTURE, dtype="float32").model, reference)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_cfg_model_as_dict(reference, tmp_path):
    ck = torch_checkpoint()
    ck["cfg"]["model"] = dict(vars(ck["cfg"]["model"]))
    model = load_fairseq(save_checkpoint(ck, tmp_path / "fs")).model
    assert model.config.num_hidden_layers == 2


def test_legacy_key_names(tmp_path):
    """decoder.* prefix, emb_layer_norm and a fused in_proj, as fairseq itself upgrades them."""
    ck = torch_checkpoint()
    sd = ck["model"]
    old = {}
    for k, v in sd.items():
        k2 = "decoder." + k[len("encoder."):] if k.startswith("encoder.") else k
        old[k2.replace(".layernorm_embedding.", ".emb_layer_norm.")] = v
    for i in range(2):
        p = f"decoder.sentence_encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            old[p + f"in_proj_{kind}"] = torch.cat([old.pop(p + f"{n}_proj.{kind}") for n in "qkv"])
    ck["model"] = old
    got = load_fairseq(save_checkpoint(ck, tmp_path / "fs"))
    want = load_fairseq(FIXTURE)
    assert any("in_proj" in n for n in got.notes)
    from refimpl.params import iter_leaves

    a, b = dict(iter_leaves(got.model.params)), dict(iter_leaves(want.model.params))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_untied_lm_head(reference, tmp_path):
    ck = torch_checkpoint()
    ck["cfg"]["model"].untie_weights_roberta = True
    g = torch.Generator().manual_seed(3)
    ck["model"]["encoder.lm_head.weight"] = torch.randn(ck["model"]["encoder.lm_head.weight"].shape, generator=g)
    src = save_checkpoint(ck, tmp_path / "fs")
    model = load_fairseq(src, dtype="float64").model
    assert not model.config.tie_word_embeddings
    assert np.array_equal(model.params.lm_head.decoder_weight, ck["model"]["encoder.lm_head.weight"].double().numpy())
    export(load_fairseq(src).model, tmp_path / "hf")
    hf = reload_hf(tmp_path / "hf", "AutoModelForMaskedLM").double()
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(reference["input_ids"]), attention_mask=torch.from_numpy(reference["attention_mask"])).logits
    assert_close(logits.numpy(), model(input_ids=reference["input_ids"], attention_mask=reference["attention_mask"]).logits, "float64", "untied logits")


def test_tied_by_equal_values(tmp_path):
    """A head weight that is an equal copy (not the same storage) still counts as tied."""
    ck = torch_checkpoint()
    ck["model"]["encoder.lm_head.weight"] = ck["model"][SE + "embed_tokens.weight"].clone()
    assert load_fairseq(save_checkpoint(ck, tmp_path / "fs")).model.config.tie_word_embeddings


def test_embedding_scale_is_folded(tmp_path):
    ck = torch_checkpoint()
    ck["cfg"]["model"].no_scale_embedding = False
    loaded = load_fairseq(save_checkpoint(ck, tmp_path / "fs"))
    emb = ck["model"][SE + "embed_tokens.weight"]
    p = loaded.model.params
    assert np.array_equal(p.embeddings.word, (emb * 4.0).numpy())  # sqrt(16), as fairseq computes it in float32
    assert np.array_equal(p.lm_head.decoder_weight, emb.numpy()) and not loaded.model.config.tie_word_embeddings


def _add_heads(ck, heads: dict[str, int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    H = 16
    for name, n in heads.items():
        ck["model"][f"classification_heads.{name}.dense.weight"] = torch.randn(H, H, generator=g)
        ck["model"][f"classification_heads.{name}.dense.bias"] = torch.randn(H, generator=g)
        ck["model"][f"classification_heads.{name}.out_proj.weight"] = torch.randn(n, H, generator=g)
        ck["model"][f"classification_heads.{name}.out_proj.bias"] = torch.randn(n, generator=g)


def test_classification_heads(reference, tmp_path, capsys):
    ck = torch_checkpoint()
    _add_heads(ck, {"mnli": 3, "sst2": 2})
    src = save_checkpoint(ck, tmp_path / "fs")
    with pytest.raises(ConversionError, match=r"2 classification heads \(mnli, sst2\).*--head"):
        load_fairseq(src)
    assert cli.main([src, str(tmp_path / "x")]) == 2
    assert "mnli, sst2" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="no classification head 'cola'; it has: mnli, sst2"):
        load_fairseq(src, head="cola")

    loaded = load_fairseq(src, head="mnli", dtype="float64")
    model = loaded.model
    assert model.task == "sequence-classification" and model.config.num_labels == 3
    assert any("sst2" in n for n in loaded.notes)
    ids, mask = reference["input_ids"], reference["attention_mask"]
    # fairseq's RobertaClassificationHead: out_proj(tanh(dense(features[:, 0]))) (dropout off).
    features = load_fairseq(FIXTURE, dtype="float64").model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    w = {k: v.double().numpy() for k, v in ck["model"].items() if k.startswith("classification_heads.mnli.")}
    h = np.tanh(features[:, 0] @ w["classification_heads.mnli.dense.weight"].T + w["classification_heads.mnli.dense.bias"])
    want = h @ w["classification_heads.mnli.out_proj.weight"].T + w["classification_heads.mnli.out_proj.bias"]
    assert_close(model(input_ids=ids, attention_mask=mask).logits, want, "float64", "classification logits")

    assert cli.main([src, str(tmp_path / "hf"), "--head", "mnli"]) == 0
    hf = reload_hf(tmp_path / "hf", "AutoModelForSequenceClassification").double()
    assert type(hf).__name__ == "RobertaPreLayerNormForSequenceClassification"
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert_close(logits, want, "float64", "transformers classification logits")
    # --task masked-lm on the same checkpoint keeps the LM head and drops the heads.
    assert load_fairseq(src, task="masked-lm").model.task == "masked-lm"


def test_single_head_is_chosen(tmp_path):
    ck = torch_checkpoint()
    _add_heads(ck, {"rte": 2})
    model = load_fairseq(save_checkpoint(ck, tmp_path / "fs")).model
    assert model.task == "sequence-classification" and model.config.num_labels == 2


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def _post_ln(ck):
    ck["cfg"]["model"].encoder_normalize_before = False
    for k in [k for k in ck["model"] if k.startswith(SE + "layer_norm.")]:
        del ck["model"][k]  # a post-LN fairseq encoder has no final LayerNorm


def _no_embedding_ln(ck):
    ck["cfg"]["model"].layernorm_embedding = False
    ck["cfg"]["model"].arch = ck["cfg"]["model"]._name = "roberta_prenorm"
    for k in [k for k in ck["model"] if ".layernorm_embedding." in k]:
        del ck["model"][k]


def _old_sentence_encoder(ck):
    for k in [k for k in ck["model"] if k.startswith(SE + "layer_norm.")]:
        del ck["model"][k]  # the flag is set but the blocks were post-LN: no final LayerNorm


def _flag_only_no_embedding_ln(ck):
    ck["cfg"]["model"].layernorm_embedding = False


def _sinusoidal(ck):
    ck["cfg"]["model"].encoder_learned_pos = False


def _lm_activation(ck):
    ck["cfg"]["model"].activation_fn = "relu"


@pytest.mark.parametrize(
    "edit, message",
    [
        (_post_ln, "post-LayerNorm RoBERTa"),
        (_no_embedding_ln, "without an embedding LayerNorm.*roberta_prenorm"),
        (_flag_only_no_embedding_ln, "without an embedding LayerNorm"),
        (_old_sentence_encoder, "no final LayerNorm"),
        (_sinusoidal, "sinusoidal"),
        (_lm_activation, "LM head uses activation_fn='relu'"),
    ],
)
def test_refused(edit, message, tmp_path, capsys):
    ck = torch_checkpoint()
    edit(ck)
    src = save_checkpoint(ck, tmp_path / "fs")
    with pytest.raises(ConversionError, match=message):
        load_fairseq(src)
    assert cli.main([src, str(tmp_path / "out"), "--from", "fairseq"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refimpl-convert: error:")
    assert not os.path.exists(tmp_path / "out")


def test_relu_base_model_is_allowed(tmp_path):
    ck = torch_checkpoint()
    _lm_activation(ck)
    model = load_fairseq(save_checkpoint(ck, tmp_path / "fs"), task="base").model
    assert model.task == "base" and model.config.hidden_act == "relu" and model.params.lm_head is None


def test_unknown_tensor_refused(tmp_path):
    ck = torch_checkpoint()
    ck["model"][SE + "layers.0.self_attn.bias_k"] = torch.zeros(1, 1, 16)
    with pytest.raises(ConversionError, match="does not know.*bias_k"):
        load_fairseq(save_checkpoint(ck, tmp_path / "fs"))


def test_wrong_dictionary_refused(tmp_path):
    src = save_checkpoint(torch_checkpoint(), tmp_path / "fs")
    with open(os.path.join(src, "dict.txt"), "a") as f:
        f.writelines(f"{1000 + i} 1\n" for i in range(10))
    with pytest.raises(ConversionError, match="does not belong"):
        load_fairseq(src)


def test_fairseq_tasks(tmp_path):
    with pytest.raises(ConversionError, match="not 'question-answering'"):
        load_fairseq(FIXTURE, task="question-answering")
    with pytest.raises(ConversionError, match="no classification_heads"):
        load_fairseq(FIXTURE, task="sequence-classification")
    assert load_fairseq(os.path.join(FIXTURE, "model.pt"), task="base").model.task == "base"



def _strings(obj, path=""):
    """(path, string) for every string inside a checkpoint object (dicts, lists, namespaces)."""
    if isinstance(obj, str):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, f"{path}[{k!r}] (key)")
            yield from _strings(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _strings(v, f"{path}[{i}]")
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor):
        yield from _strings(vars(obj), path)


def test_shipped_checkpoint_holds_no_absolute_path():
    """The fixture is redistributed: its cfg/args must not carry paths of the machine that trained it
    (fairseq stores `task.data`, `common.plasma_path`, ...)."""
    ck = torch_checkpoint()
    absolute = [(p, s) for p, s in _strings({k: v for k, v in ck.items() if k != "model"})
                if s.startswith(("/", "~", "\\")) or (len(s) > 2 and s[1] == ":" and s[2] in "/\\")]
    assert absolute == []
