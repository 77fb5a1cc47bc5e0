"""Bad configs and bad inputs: every one is a clear error naming the field or argument and the fix.

Errors are :class:`refimpl.ConfigError` / :class:`refimpl.InputError` (both ``ValueError``) or
``FileNotFoundError``, never a NumPy broadcasting traceback, an ``IndexError``, a ``KeyError`` or a
NaN. The models here are built from random arrays through the HF key table (no torch needed), so
the file stays fast; only the config round trip imports transformers.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import refimpl
from tolerances import REORDERED, assert_close
from conftest import TINY
from refimpl import Config, ConfigError, InputError
from refimpl.params import hf_key_table

V, H, MAXPOS, PAD = TINY["vocab_size"], TINY["hidden_size"], TINY["max_position_embeddings"], 1
LIMIT = MAXPOS - PAD - 1  # the longest sequence: positions run pad+1 .. max_position_embeddings-1
IDS = np.array([[0, 5, 6, 2], [0, 7, 2, PAD]])  # [B=2, T=4]
B, T = IDS.shape

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_model(task: str, dtype: str = "float32", **config) -> refimpl.Model:
    """A tiny model with random weights for ``task`` (through ``params_from_state_dict``)."""
    if task == "causal-lm":
        config.setdefault("is_decoder", True)
    cfg = Config.from_dict({**TINY, **config})
    rng = np.random.default_rng(0)
    state = {
        e.key: rng.normal(scale=0.5, size=e.shape).astype(dtype)
        for e in hf_key_table(cfg, task)
        if e.key != "lm_head.decoder.weight"
    }
    return refimpl.Model(cfg, refimpl.params_from_state_dict(cfg, task, state, dtype), task)


_MODELS: dict = {}


def model(task: str, **config) -> refimpl.Model:
    key = (task, tuple(sorted(config.items())))
    if key not in _MODELS:
        _MODELS[key] = make_model(task, **config)
    return _MODELS[key]


def config_error(match: str, **fields):
    with pytest.raises(ConfigError, match=match) as info:
        Config.from_dict({**TINY, **fields})
    return info.value


def input_error(m, match: str, exc=InputError, **inputs):
    with pytest.raises(exc, match=match) as info:
        m(**inputs)
    return info.value


def mc_ids(choices: int = 3) -> np.ndarray:
    return np.stack([IDS] * choices, axis=1)  # [B, C, T]


# ---------------------------------------------------------------------------------------------
# 1. Config
# ---------------------------------------------------------------------------------------------


def test_config_error_types():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(InputError, ValueError)
    assert issubclass(refimpl.CheckpointError, ValueError)


def test_hidden_size_not_divisible_by_heads():
    config_error(r"hidden_size \(18\) is not a multiple of num_attention_heads \(4\)", hidden_size=18)


@pytest.mark.parametrize("act", ["swishy", "GELU", ""])
def test_unknown_hidden_act_lists_the_supported_ones(act):
    e = config_error(r"unknown hidden_act", hidden_act=act)
    assert "gelu_new" in str(e) and "relu" in str(e)


@pytest.mark.parametrize("act", ["prelu", "xielu"])
def test_learnable_activations_refused_with_reason(act):
    e = config_error(rf"hidden_act='{act}' is not supported", hidden_act=act)
    assert "learnable" in str(e)


def test_hidden_act_not_a_string():
    config_error("hidden_act must be a string", hidden_act=None)


@pytest.mark.parametrize("pad", [-1, V, V + 7])
def test_pad_token_outside_vocabulary(pad):
    config_error(rf"pad_token_id={pad} is outside the vocabulary \[0, {V}\)", pad_token_id=pad)


def test_pad_token_none():
    config_error("pad_token_id must be set", pad_token_id=None)


@pytest.mark.parametrize("pad", [1.5, "1", True])
def test_pad_token_not_an_integer(pad):
    config_error("pad_token_id must be an integer", pad_token_id=pad)


def test_max_positions_leave_no_room():
    config_error("max_position_embeddings=2 leaves no room", max_position_embeddings=2)


@pytest.mark.parametrize(
    "field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"],
)
@pytest.mark.parametrize("value", [0, -3, 2.0, True, "8"])
def test_non_positive_or_non_integer_sizes(field, value):
    config_error(rf"{field} must be a positive integer, got {value!r}", **{field: value})


@pytest.mark.parametrize("eps", [0, -1e-5, float("nan"), float("inf"), "1e-5", None, True])
def test_bad_layer_norm_eps(eps):
    config_error("layer_norm_eps must be a positive finite number", layer_norm_eps=eps)


def test_bad_problem_type():
    e = config_error("problem_type='classification' is not one of", problem_type="classification")
    assert "multi_label_classification" in str(e)


def test_single_label_with_one_label():
    config_error("needs num_labels > 1", problem_type="single_label_classification", num_labels=1)


def test_num_labels_disagrees_with_id2label():
    config_error(r"num_labels=3 disagrees with id2label, which has 2 entries", num_labels=3, id2label={0: "a", 1: "b"})


@pytest.mark.parametrize("n", [0, -1, 2.5, "3"])
def test_bad_num_labels(n):
    config_error("num_labels must be a positive integer", num_labels=n)


def test_empty_id2label():
    config_error("num_labels must be at least 1", id2label={})


def test_cross_attention_without_decoder():
    config_error("add_cross_attention=True needs is_decoder=True", add_cross_attention=True)


@pytest.mark.parametrize("field", ["is_decoder", "add_cross_attention", "tie_word_embeddings"])
def test_boolean_fields_must_be_booleans(field):
    config_error(rf"{field} must be true or false, got 'no'", **{field: "no"})


def test_invalid_json(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{'vocab_size': 10,}")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Config.from_json_file(p)
    with pytest.raises(ConfigError, match="is not valid JSON"):
        Config.from_pretrained(tmp_path)


def test_json_not_an_object(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, not list"):
        Config.from_json_file(p)


def test_invalid_values_in_json_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**TINY, "hidden_size": 15}))
    with pytest.raises(ConfigError, match="hidden_size"):
        Config.from_json_file(p)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file at"):
        Config.from_json_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*" + tmp_path.name):
        Config.from_pretrained(tmp_path)


# ---- round trip against transformers ----------------------------------------------------------

NON_DEFAULT = dict(
    vocab_size=99, hidden_size=24, num_hidden_layers=3, num_attention_heads=3, intermediate_size=40,
    hidden_act="gelu_new", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3, max_position_embeddings=77,
    type_vocab_size=3, initializer_range=0.05, layer_norm_eps=1e-5, pad_token_id=3, bos_token_id=None,
    eos_token_id=[2, 5], use_cache=False, classifier_dropout=0.4, is_decoder=True, add_cross_attention=True,
    tie_word_embeddings=False, id2label={0: "neg", 1: "neu", 2: "pos"}, problem_type="multi_label_classification",
    architectures=["RobertaPreLayerNormForCausalLM"], my_custom_key={"nested": [1, 2]},
)


@pytest.mark.parametrize(
    "kwargs",
    [{}, NON_DEFAULT, {"num_labels": 5}, {"id2label": {0: "x", 1: "y"}, "label2id": {"x": 0, "y": 1}}],
    ids=["defaults", "non-default", "num_labels", "labels"],
)
def test_config_round_trip_with_transformers(kwargs):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.RobertaPreLayerNormConfig(**kwargs)
    ours = Config.from_dict(theirs.to_dict())
    for f in dataclasses.fields(Config):
        if f.name != "extra":
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    assert ours.num_labels == theirs.num_labels
    # unknown keys are kept in `extra` and written back; the JSON forms agree key by key
    assert "transformers_version" in ours.extra
    if "my_custom_key" in kwargs:
        assert ours.extra["my_custom_key"] == {"nested": [1, 2]}
    expected = json.loads(theirs.to_json_string(use_diff=False))
    written = json.loads(json.dumps(ours.to_dict()))
    assert written == expected
    # and transformers reads our dict back to the same config
    again = transformers.RobertaPreLayerNormConfig.from_dict(ours.to_dict())
    assert again.to_dict() == theirs.to_dict()


def test_config_defaults_match_transformers():
    transformers = pytest.importorskip("transformers")
    theirs, ours = transformers.RobertaPreLayerNormConfig(), Config()
    for f in dataclasses.fields(Config):
        if f.name != "extra":
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name


def test_config_json_file_round_trip(tmp_path):
    cfg = Config.from_dict({**TINY, "custom": 1, "architectures": ["RobertaPreLayerNormForMaskedLM"]})
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    again = Config.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict() and again.extra["custom"] == 1


# ---------------------------------------------------------------------------------------------
# 2. Inputs
# ---------------------------------------------------------------------------------------------

ALL_TASKS = ["base", "masked-lm", "causal-lm", "sequence-classification", "token-classification", "question-answering"]


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("bad", [-1, V, V + 100])
def test_ids_outside_vocabulary(task, bad):
    ids = IDS.copy()
    ids[1, 2] = bad
    input_error(model(task), rf"input_ids contains {bad}, outside the vocabulary \[0, {V}\)", input_ids=ids)


def test_ids_outside_vocabulary_multiple_choice():
    ids = mc_ids()
    ids[0, 1, 1] = V
    input_error(model("multiple-choice"), rf"input_ids contains {V}, outside the vocabulary", input_ids=ids)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_float_ids(task):
    input_error(model(task), "input_ids must hold integers; got dtype float64", input_ids=IDS.astype(float))
    input_error(model(task), "input_ids must hold integers; got dtype float", input_ids=[[0.0, 4.0, 2.0]])


def test_bool_ids_refused():
    input_error(model("base"), "input_ids must hold integers; got dtype bool", input_ids=IDS > 3)


def test_dtype_kinds_are_isdtype():
    """inputs._isdtype answers NumPy dtypes from their kind letter: as np.isdtype, for every one."""
    from refimpl.inputs import _isdtype

    dtypes = [np.dtype(c) for c in "?bBhHiIlLqQefdgFDGSUVOMm"]
    for kind in ("bool", "integral", "real floating"):
        for dt in dtypes:
            assert _isdtype(np, dt, kind) == np.isdtype(dt, kind), (dt, kind)


@pytest.mark.parametrize("ids", [[[0, 5, 2], [0, 2]], [[0, 5, 2], 7]])
def test_ragged_ids(ids):
    input_error(model("masked-lm"), "input_ids is ragged", input_ids=ids)


def test_non_numbers_in_ids():
    input_error(model("base"), "input_ids is ragged or holds non-numbers", input_ids=[[0, None, 2]])
    input_error(model("base"), "input_ids must hold integers", input_ids=[["a", "b"]])


@pytest.mark.parametrize("task", ALL_TASKS)
def test_one_dimensional_ids_suggest_wrapping(task):
    input_error(model(task), r"input_ids must be 2-D \[batch, length\]; got shape \(4,\) \(wrap a single sequence in a list\)", input_ids=IDS[0])
    input_error(model(task), r"input_ids must be 2-D \[batch, length\]; got shape \(1, 2, 4\)", input_ids=IDS[None, :2])


@pytest.mark.parametrize(
    "ids", [np.zeros((0, 4), np.int64), np.zeros((2, 0), np.int64), [[]]], ids=["no-batch", "no-length", "[[]]"],
)
def test_empty_inputs(ids):
    input_error(model("masked-lm"), r"the inputs are empty", input_ids=ids)
    input_error(model("masked-lm"), r"input_ids must be 2-D \[batch, length\]; got shape \(0,\)", input_ids=[])


def test_empty_embeds():
    input_error(model("base"), r"the inputs are empty \(batch 1, length 0\)", inputs_embeds=np.zeros((1, 0, H), np.float32))


@pytest.mark.parametrize("task", ["base", "masked-lm", "sequence-classification"])
def test_sequence_length_limit(task):
    m = model(task)
    ok = np.full((2, LIMIT), 5)
    assert m(input_ids=ok) is not None  # exactly at the limit: positions end at max_position_embeddings - 1
    e = input_error(m, rf"at most max_position_embeddings - pad_token_id - 1 = {LIMIT} tokens", input_ids=np.full((2, LIMIT + 1), 5))
    assert "truncate" in str(e)
    # pads do not count towards positions: a full-length row plus pads still fits
    assert m(input_ids=np.concatenate([ok, np.full((2, 3), PAD)], axis=1)) is not None
    # sequential positions from inputs_embeds obey the same limit
    assert m(inputs_embeds=np.zeros((1, LIMIT, H), np.float32)) is not None
    input_error(m, f"= {LIMIT} tokens", inputs_embeds=np.zeros((1, LIMIT + 1, H), np.float32))


def test_sequence_length_limit_multiple_choice():
    m = model("multiple-choice")
    assert m(input_ids=np.full((1, 2, LIMIT), 5)).logits.shape == (1, 2)
    input_error(m, f"= {LIMIT} tokens", input_ids=np.full((1, 2, LIMIT + 1), 5))


@pytest.mark.parametrize("task", ALL_TASKS)
def test_attention_mask_wrong_shape(task):
    m = model(task)
    input_error(m, r"attention_mask must have shape \[2, 4\] \(batch, key length\); got \[2, 3\]", input_ids=IDS, attention_mask=np.ones((2, 3)))
    input_error(m, r"attention_mask must have shape \[2, 4\]", input_ids=IDS, attention_mask=np.ones((1, 4)))
    input_error(m, r"attention_mask must be 2-D \[batch, key length\] or 4-D; got 1-D", input_ids=IDS, attention_mask=np.ones(4))
    input_error(m, r"attention_mask must be 2-D \[batch, key length\] or 4-D; got 3-D", input_ids=IDS, attention_mask=np.ones((2, 4, 4)))


def test_attention_mask_4d():
    m = model("base")
    ok = np.zeros((2, 1, 4, 4), np.float32)
    m(input_ids=IDS, attention_mask=ok)
    m(input_ids=IDS, attention_mask=np.ones((1, 4, 1, 4), bool))
    input_error(m, r"a 4-D attention_mask must have shape \[2 or 1, 1 or 4, 4 or 1, 4\]; got \[2, 1, 4, 5\]", input_ids=IDS, attention_mask=np.zeros((2, 1, 4, 5), np.float32))
    input_error(m, r"got \[2, 3, 4, 4\]", input_ids=IDS, attention_mask=np.zeros((2, 3, 4, 4), np.float32))
    input_error(m, r"got \[3, 1, 4, 4\]", input_ids=IDS, attention_mask=np.zeros((3, 1, 4, 4), np.float32))
    input_error(m, r"a 4-D attention_mask is an additive bias and must be bool or the model's dtype \(float32\); got float64", input_ids=IDS, attention_mask=ok.astype(np.float64))
    input_error(m, r"got int64", input_ids=IDS, attention_mask=ok.astype(np.int64))


def test_attention_mask_non_numbers():
    input_error(model("base"), "attention_mask must hold numbers", input_ids=IDS, attention_mask=[["a"] * 4] * 2)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_token_types(task):
    m = model(task)
    input_error(m, r"token_type_ids must have shape \[2, 4\] like the inputs; got \[2, 3\]", input_ids=IDS, token_type_ids=np.zeros((2, 3), int))
    input_error(m, r"token_type_ids must have shape \[2, 4\]", input_ids=IDS, token_type_ids=np.zeros(4, int))
    input_error(m, r"token_type_ids contains 2, outside \[0, type_vocab_size=2\)", input_ids=IDS, token_type_ids=np.full((2, 4), 2))
    input_error(m, r"token_type_ids contains -1", input_ids=IDS, token_type_ids=np.full((2, 4), -1))
    input_error(m, "token_type_ids must hold integers", input_ids=IDS, token_type_ids=np.zeros((2, 4)))


@pytest.mark.parametrize("task", ALL_TASKS)
def test_position_ids(task):
    m = model(task)
    input_error(m, rf"position_ids contains {MAXPOS}, outside \[0, {MAXPOS}\)", input_ids=IDS, position_ids=np.full((2, 4), MAXPOS))
    input_error(m, r"position_ids contains -1", input_ids=IDS, position_ids=np.full((2, 4), -1))
    input_error(m, r"position_ids must have shape \[2, 4\] like the inputs; got \[4\]", input_ids=IDS, position_ids=np.arange(4))
    input_error(m, "position_ids must hold integers", input_ids=IDS, position_ids=np.zeros((2, 4)))
    assert m(input_ids=IDS, position_ids=np.full((2, 4), MAXPOS - 1)) is not None  # the last row is usable


@pytest.mark.parametrize("task", ALL_TASKS + ["multiple-choice"])
def test_both_or_neither_of_ids_and_embeds(task):
    m = model(task)
    ids, embeds = (mc_ids(), np.zeros((2, 3, 4, H), np.float32)) if task == "multiple-choice" else (IDS, np.zeros((2, 4, H), np.float32))
    input_error(m, "pass exactly one of input_ids and inputs_embeds", input_ids=ids, inputs_embeds=embeds)
    input_error(m, "pass exactly one of input_ids and inputs_embeds")


@pytest.mark.parametrize("task", ALL_TASKS)
def test_inputs_embeds(task):
    m = model(task)
    input_error(m, rf"inputs_embeds must have shape \[batch, length, {H}\]; got \(2, 4, 8\)", inputs_embeds=np.zeros((2, 4, 8), np.float32))
    input_error(m, rf"inputs_embeds must have shape \[batch, length, {H}\]; got \(4, {H}\)", inputs_embeds=np.zeros((4, H), np.float32))
    input_error(m, "inputs_embeds has dtype float64 but the model computes in float32; cast it first", inputs_embeds=np.zeros((2, 4, H)))
    input_error(m, "inputs_embeds has dtype float16", inputs_embeds=np.zeros((2, 4, H), np.float16))
    input_error(m, "inputs_embeds must be a floating-point array; got dtype int64", inputs_embeds=np.zeros((2, 4, H), np.int64))
    assert m(inputs_embeds=np.zeros((2, 4, H), np.float32).tolist()) is not None  # lists take the model dtype


def test_inputs_embeds_float64_model():
    m = make_model("base", "float64")
    input_error(m, "inputs_embeds has dtype float32 but the model computes in float64", inputs_embeds=np.zeros((1, 4, H), np.float32))
    assert m(inputs_embeds=np.zeros((1, 4, H))).last_hidden_state.dtype == np.float64


# ---- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["masked-lm", "causal-lm", "token-classification"])
def test_token_labels(task):
    m = model(task, num_labels=3)
    k = 3 if task == "token-classification" else V
    input_error(m, r"labels must have shape \[2, 4\]; got \[2, 3\]", input_ids=IDS, labels=np.zeros((2, 3), int))
    input_error(m, r"labels must have shape \[2, 4\]; got \[2\]", input_ids=IDS, labels=np.zeros(2, int))
    input_error(m, r"labels must have shape \[2, 4\]; got \[2, 4, 1\]", input_ids=IDS, labels=np.zeros((2, 4, 1), int))
    input_error(m, "labels must hold integers; got dtype float64", input_ids=IDS, labels=np.zeros((2, 4)))
    for bad in (k, -1, -99):
        lab = np.zeros((2, 4), int)
        lab[1, 1] = bad
        input_error(m, rf"labels must lie in \[0, {k}\) or be -100 \(ignored\); found {bad}", input_ids=IDS, labels=lab)
    lab = np.full((2, 4), k - 1)
    lab[0, :2] = -100
    loss = m(input_ids=IDS, labels=lab).loss
    assert np.isfinite(loss)


@pytest.mark.parametrize("problem_type", [None, "single_label_classification"])
def test_single_label_classification_labels(problem_type):
    m = model("sequence-classification", num_labels=3, problem_type=problem_type)
    input_error(m, r"single-label classification labels must have shape \[2\]; got \[3\]", input_ids=IDS, labels=[0, 1, 2])
    input_error(m, r"single-label classification labels must have shape \[2\]; got \[2, 2\]", input_ids=IDS, labels=[[0, 1], [1, 1]])
    input_error(m, r"labels must lie in \[0, 3\) or be -100 \(ignored\); found 3", input_ids=IDS, labels=[0, 3])
    input_error(m, r"found -1", input_ids=IDS, labels=[-1, 0])
    input_error(m, "labels must hold numbers; got dtype <U1", input_ids=IDS, labels=["a", "b"])
    assert np.isfinite(m(input_ids=IDS, labels=[[2], [0]]).loss)  # [B, 1] is accepted, as in transformers
    if problem_type is not None:
        input_error(m, "single-label classification needs integer labels", input_ids=IDS, labels=[0.0, 1.0])


def test_multi_label_classification_labels():
    m = model("sequence-classification", num_labels=3, problem_type="multi_label_classification")
    input_error(m, r"multi-label classification labels must have shape \[2, 3\] \(0/1 per label\); got \[2\]", input_ids=IDS, labels=[0, 1])
    input_error(m, r"got \[2, 2\]", input_ids=IDS, labels=np.zeros((2, 2)))
    assert np.isfinite(m(input_ids=IDS, labels=np.ones((2, 3))).loss)
    # inferred (problem_type unset): float labels of the wrong shape get the multi-label message
    input_error(model("sequence-classification", num_labels=3), r"multi-label classification labels must have shape \[2, 3\]", input_ids=IDS, labels=[0.0, 1.0])


def test_regression_labels():
    m = model("sequence-classification", num_labels=3, problem_type="regression")
    input_error(m, r"regression labels must have shape \[2, 3\]; got \[2\]", input_ids=IDS, labels=[0.5, 1.0])
    m1 = model("sequence-classification", num_labels=1)
    input_error(m1, r"regression labels must have 2 values \(one per sequence\); got shape \[3\]", input_ids=IDS, labels=[0.5, 1.0, 2.0])
    assert np.isfinite(m1(input_ids=IDS, labels=[[0.5], [1.0]]).loss)


def test_question_answering_positions():
    m = model("question-answering")
    input_error(m, "pass both start_positions and end_positions, or neither", input_ids=IDS, start_positions=[0, 1])
    input_error(m, "pass both start_positions and end_positions, or neither", input_ids=IDS, end_positions=[0, 1])
    input_error(m, r"start_positions must have shape \[2\]; got \[3\]", input_ids=IDS, start_positions=[0, 1, 2], end_positions=[1, 2, 3])
    input_error(m, r"end_positions must have shape \[2\]; got \[2, 2\]", input_ids=IDS, start_positions=[0, 1], end_positions=[[1, 1], [2, 2]])
    input_error(m, r"start_positions must have shape \[2\]; got \[\]", input_ids=IDS, start_positions=0, end_positions=1)
    input_error(m, "start_positions must hold integers", input_ids=IDS, start_positions=[0.0, 1.0], end_positions=[1, 2])
    input_error(m, "question answering takes start_positions and end_positions, not labels", input_ids=IDS, labels=[0, 1])
    # out-of-range positions are clamped and ignored, as in transformers: not an error
    assert np.isfinite(m(input_ids=IDS, start_positions=[[1], [99]], end_positions=[[2], [-3]]).loss)


def test_question_answering_needs_two_labels():
    with pytest.raises(refimpl.CheckpointError, match="question answering needs num_labels=2"):
        model("question-answering", num_labels=3)(input_ids=IDS)


def test_multiple_choice_inputs_and_labels():
    m = model("multiple-choice")
    ids = mc_ids(3)
    input_error(m, r"multiple choice takes input_ids \[batch, choices, length\]; got shape \(2, 4\)", input_ids=IDS)
    input_error(m, r"multiple choice takes inputs_embeds \[batch, choices, length, hidden\]; got shape \(2, 4, 16\)", inputs_embeds=np.zeros((2, 4, H), np.float32))
    input_error(m, r"attention_mask must have shape \[2, 3, \.\.\.\] like the inputs; got \(2, 4\)", input_ids=ids, attention_mask=np.ones((2, 4)))
    input_error(m, r"token_type_ids must have shape \[2, 3, \.\.\.\] like the inputs; got \(2, 2, 4\)", input_ids=ids, token_type_ids=np.zeros((2, 2, 4), int))
    input_error(m, r"labels must have shape \[2\]; got \[3\]", input_ids=ids, labels=[0, 1, 2])
    input_error(m, r"labels must lie in \[0, 3\) or be -100 \(ignored\); found 3", input_ids=ids, labels=[0, 3])
    input_error(m, "inputs_embeds has dtype float64", inputs_embeds=np.zeros((2, 3, 4, H)))
    input_error(m, "logits_to_keep is for causal-lm", input_ids=ids, logits_to_keep=1)
    input_error(m, "start_positions/end_positions are for question answering", input_ids=ids, start_positions=[0, 1], end_positions=[0, 1])
    input_error(m, "multiple choice has no cross-attention", input_ids=ids, encoder_hidden_states=np.zeros((2, 3, H), np.float32))
    # float and bool [B, C, T] masks are accepted, as for the other tasks
    mask = (ids != PAD).astype(np.float32)
    ref = m(input_ids=ids, attention_mask=mask.astype(np.int64)).logits
    np.testing.assert_array_equal(m(input_ids=ids, attention_mask=mask).logits, ref)
    np.testing.assert_array_equal(m(input_ids=ids, attention_mask=mask > 0).logits, ref)


def test_labels_to_the_base_model():
    input_error(model("base"), "the base model has no head and takes no labels", input_ids=IDS, labels=np.zeros((2, 4), int))


@pytest.mark.parametrize("task", ["base", "masked-lm", "sequence-classification", "token-classification"])
def test_start_end_positions_outside_question_answering(task):
    input_error(model(task), "start_positions/end_positions are for question answering", input_ids=IDS, end_positions=[0, 1])


def test_cross_attention_inputs_without_cross_attention():
    m = model("masked-lm")
    input_error(m, "encoder_hidden_states need cross-attention layers", input_ids=IDS, encoder_hidden_states=np.zeros((2, 3, H), np.float32))
    input_error(m, "encoder_attention_mask was given without encoder_hidden_states", input_ids=IDS, encoder_attention_mask=np.ones((2, 3)))


# ---- logits_to_keep ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["base", "masked-lm", "token-classification", "question-answering"])
def test_logits_to_keep_outside_causal_lm(task):
    input_error(model(task), f"logits_to_keep is for causal-lm, not '{task}'", input_ids=IDS, logits_to_keep=1)
    input_error(model(task), "logits_to_keep is for causal-lm", input_ids=IDS, logits_to_keep=np.array([0]))
    assert model(task)(input_ids=IDS, logits_to_keep=None) is not None  # None means "all", like 0


def test_logits_to_keep_misuse():
    m = model("causal-lm")
    full = m(input_ids=IDS).logits
    assert m(input_ids=IDS, logits_to_keep=None).logits.shape == full.shape
    # (GEMMs of other shapes round differently: compare within tolerances.REORDERED)
    assert_close(m(input_ids=IDS, logits_to_keep=1).logits, full[:, -1:], str(m.dtype), "last", REORDERED)
    assert_close(m(input_ids=IDS, logits_to_keep=np.array([0, 3])).logits, full[:, [0, 3]], str(m.dtype), "kept", REORDERED)
    input_error(m, "logits_to_keep must be >= 0; got -1", input_ids=IDS, logits_to_keep=-1)
    input_error(m, r"logits_to_keep contains 4, outside \[0, 4\)", input_ids=IDS, logits_to_keep=np.array([0, 4]))
    input_error(m, r"logits_to_keep contains -1", input_ids=IDS, logits_to_keep=[-1])
    input_error(m, "logits_to_keep must be an int or a 1-D array of positions", input_ids=IDS, logits_to_keep=np.array([[0]]))
    input_error(m, "logits_to_keep must hold integers; got dtype bool", input_ids=IDS, logits_to_keep=True)
    input_error(m, "logits_to_keep must hold integers", input_ids=IDS, logits_to_keep=1.5)
    input_error(m, "leave logits_to_keep at 0 when passing labels", input_ids=IDS, labels=IDS, logits_to_keep=1)


# ---- no error may leak as a NumPy/Python internals error ---------------------------------------


@pytest.mark.parametrize("task", ALL_TASKS + ["multiple-choice"])
def test_garbage_never_leaks_internal_errors(task):
    """A sweep of wrong shapes and types: each is an InputError (never IndexError, KeyError, ...)."""
    m = model(task)
    ids = mc_ids() if task == "multiple-choice" else IDS
    bad_arrays = [np.zeros(()), np.zeros((1,)), np.zeros((5, 5, 5, 5, 5)), np.zeros((2, 4), bool), "text", 3.5, [[1, [2]]]]
    for name in ("attention_mask", "token_type_ids", "position_ids", "labels"):
        if task == "base" and name == "labels":
            continue
        for bad in bad_arrays:
            try:
                m(input_ids=ids, **{name: bad})
            except InputError:
                pass
            except Exception as e:  # pragma: no cover - the failure message shows what leaked
                pytest.fail(f"{task} {name}={bad!r}: {type(e).__name__}: {e}")
