"""Parity with transformers' RobertaPreLayerNorm* classes: every task, every output field.

Each test builds a transformers model with random weights, saves it with ``save_pretrained``, loads
it with ``refimpl.from_pretrained`` and runs both on the same inputs, in float64 (tolerance ~1e-10)
and float32 (the tolerance table in tests/tolerances.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import refimpl
from conftest import TINY, torch_forward
from tolerances import assert_close

pytestmark = pytest.mark.usefixtures("fast_by_default")  # loading's default backend is the fast path here

PAD = 1
V = TINY["vocab_size"]
DTYPES = ["float64", "float32"]


def make_inputs(kind: str, rng: np.random.Generator, batch: int = 3, length: int = 9):
    """Inputs for one scenario: ``right``/``left`` padding, ``token_types``, ``positions``, ``embeds``."""
    ids = rng.integers(3, V, size=(batch, length))
    ids[:, 0] = 0
    lengths = [length, length - 3, 2][:batch]
    mask = np.zeros((batch, length), dtype=np.int64)
    for b, n in enumerate(lengths):
        if kind == "left":
            ids[b, : length - n] = PAD
            ids[b, length - n] = 0
            ids[b, -1] = 2
            mask[b, length - n :] = 1
        else:
            ids[b, n:] = PAD
            ids[b, n - 1] = 2
            mask[b, :n] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "token_types":
        inputs["token_type_ids"] = (np.arange(length)[None, :] >= length // 2).astype(np.int64).repeat(batch, 0) * mask
    if kind == "positions":
        inputs["position_ids"] = rng.integers(0, TINY["max_position_embeddings"], size=(batch, length))
    if kind == "embeds":
        inputs["inputs_embeds"] = rng.normal(size=(batch, length, TINY["hidden_size"]))
        del inputs["input_ids"]
    return inputs


def labels_for(task: str, inputs, rng: np.random.Generator, config_kwargs):
    ref = inputs.get("input_ids", inputs.get("inputs_embeds"))
    b, t = ref.shape[:2]
    mask = inputs["attention_mask"]
    if task in ("masked-lm", "causal-lm"):
        lab = rng.integers(0, V, size=(b, t))
        lab = np.where(mask == 1, lab, -100)
        lab[0, 1] = -100
        return {"labels": lab}
    if task == "token-classification":
        lab = rng.integers(0, config_kwargs.get("num_labels", 2), size=(b, t))
        return {"labels": np.where(mask == 1, lab, -100)}
    if task == "question-answering":
        # one position past the end (clamped to T and ignored) and one negative (clamped to 0)
        return {"start_positions": np.array([1, t + 5, 0])[:b], "end_positions": np.array([3, 2, -4])[:b]}
    if task == "sequence-classification":
        return {"labels": rng.integers(0, config_kwargs.get("num_labels", 2), size=(b,))}
    return {}


def cast_inputs(inputs, dtype):
    return {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in inputs.items()}


MAIN_FIELDS = {
    "base": ["last_hidden_state", "pooler_output"],
    "masked-lm": ["logits", "loss"],
    "causal-lm": ["logits"],  # loss: see test_causal_lm_loss_is_computed_in_model_dtype
    "sequence-classification": ["logits", "loss"],
    "token-classification": ["logits", "loss"],
    "question-answering": ["start_logits", "end_logits", "loss"],
    "multiple-choice": ["logits", "loss"],
}


def compare_main_outputs(ours, theirs, dtype, fields):
    for f in fields:
        t = getattr(theirs, f)
        if t is None:
            assert getattr(ours, f) is None, f
            continue
        o = getattr(ours, f)
        assert isinstance(o, np.ndarray) or np.isscalar(o) or np.ndim(o) == 0, f
        assert np.asarray(o).dtype == np.dtype(dtype), f"{f}: dtype {np.asarray(o).dtype}"
        assert_close(o, t.numpy(), dtype, f)


def compare_outputs(ours, theirs, dtype, task):
    compare_main_outputs(ours, theirs, dtype, MAIN_FIELDS[task])
    assert len(ours.hidden_states) == len(theirs.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (o, t) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(o, t.numpy(), dtype, f"hidden_states[{i}]")
    assert len(ours.attentions) == len(theirs.attentions) == TINY["num_hidden_layers"]
    for i, (o, t) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert_close(o, t.numpy(), dtype, f"attentions[{i}]")


TASKS = ["base", "masked-lm", "causal-lm", "sequence-classification", "token-classification", "question-answering"]
KINDS = ["right", "left", "token_types", "positions", "embeds"]


BACKENDS = ["numba", "numpy"]  # the Numba kernels and the pure NumPy reference (forced: "auto" picks numpy here)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", TASKS)
def test_task_parity(hf_factory, task, kind, dtype, backend):
    config_kwargs = {"num_labels": 3} if task in ("sequence-classification", "token-classification") else {}
    hf, folder = hf_factory(task, seed=TASKS.index(task) * 10 + KINDS.index(kind), **config_kwargs)
    rng = np.random.default_rng(0)
    inputs = make_inputs(kind, rng)
    inputs.update(labels_for(task, inputs, rng, config_kwargs))
    inputs = cast_inputs(inputs, dtype)
    theirs = torch_forward(hf, dtype, **inputs, output_hidden_states=True, output_attentions=True)
    model = refimpl.from_pretrained(folder, dtype=dtype, backend=backend)
    assert model.task == task and model.backend == backend
    ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    compare_outputs(ours, theirs, dtype, task)
    # without output_attentions the kernels may skip the probabilities (numba: attention_context)
    plain = model(**inputs)
    assert plain.attentions is None
    compare_main_outputs(plain, theirs, dtype, MAIN_FIELDS[task])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["right", "left", "token_types", "embeds"])
def test_multiple_choice_parity(hf_factory, kind, dtype, backend):
    hf, folder = hf_factory("multiple-choice", seed=7)
    rng = np.random.default_rng(1)
    b, c, t = 2, 3, 7
    flat = make_inputs(kind, rng, batch=3, length=t)
    # [B, C, T]: tile the three scenario rows over two batch entries with different ids
    inputs = {k: np.stack([v, v[::-1]], axis=0) for k, v in flat.items()}
    inputs["labels"] = np.array([2, 0])
    inputs = cast_inputs(inputs, dtype)
    theirs = torch_forward(hf, dtype, **inputs, output_hidden_states=True, output_attentions=True)
    model = refimpl.from_pretrained(folder, dtype=dtype, backend=backend)
    ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert ours.logits.shape == (b, c)
    compare_outputs(ours, theirs, dtype, "multiple-choice")
    plain = model(**inputs)  # no probabilities kept
    assert plain.attentions is None
    compare_main_outputs(plain, theirs, dtype, MAIN_FIELDS["multiple-choice"])


@pytest.mark.parametrize("problem", ["regression", "single_label_classification", "multi_label_classification", None])
@pytest.mark.parametrize("num_labels", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_classification_losses(hf_factory, problem, num_labels, dtype):
    if problem == "single_label_classification" and num_labels == 1:
        pytest.skip("transformers refuses single-label classification with one label")
    hf, folder = hf_factory("sequence-classification", seed=3, num_labels=num_labels, problem_type=problem)
    rng = np.random.default_rng(2)
    inputs = cast_inputs(make_inputs("right", rng), dtype)
    b = inputs["input_ids"].shape[0]
    effective = problem or ("regression" if num_labels == 1 else "single_label_classification")
    if effective == "regression":
        labels = rng.normal(size=(b,) if num_labels == 1 else (b, num_labels)).astype(dtype)
    elif effective == "single_label_classification":
        labels = rng.integers(0, num_labels, size=(b,))
    else:
        labels = (rng.random((b, num_labels)) > 0.5).astype(dtype)
    theirs = torch_forward(hf, dtype, **inputs, labels=labels)
    ours = refimpl.from_pretrained(folder, dtype=dtype)(**inputs, labels=labels)
    assert_close(ours.logits, theirs.logits.numpy(), dtype, "logits")
    assert_close(ours.loss, theirs.loss.numpy(), dtype, "loss")


def test_multi_label_inferred_from_float_labels(hf_factory):
    hf, folder = hf_factory("sequence-classification", seed=4, num_labels=3)
    rng = np.random.default_rng(3)
    inputs = make_inputs("right", rng)
    labels = (rng.random((3, 3)) > 0.5).astype(np.float64)
    theirs = torch_forward(hf, "float64", **inputs, labels=labels)
    ours = refimpl.from_pretrained(folder, dtype="float64")(**inputs, labels=labels)
    assert_close(ours.loss, theirs.loss.numpy(), "float64", "loss")


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_lm_loss_is_computed_in_model_dtype(hf_factory, dtype):
    """transformers' causal-LM loss casts logits to float32 before the cross-entropy, so in a float64
    model its loss carries float32 rounding. refimpl computes it in the model's dtype; the float64
    reference is torch's own cross-entropy on torch's float64 logits with the same shift."""
    hf, folder = hf_factory("causal-lm", seed=5)
    rng = np.random.default_rng(4)
    inputs = make_inputs("right", rng)
    inputs.update(labels_for("causal-lm", inputs, rng, {}))
    inputs = cast_inputs(inputs, dtype)
    theirs = torch_forward(hf, dtype, **inputs)
    ours = refimpl.from_pretrained(folder, dtype=dtype)(**inputs)
    shifted = torch.from_numpy(np.concatenate([inputs["labels"][:, 1:], np.full((3, 1), -100)], axis=1))
    exact = F.cross_entropy(theirs.logits.reshape(-1, V), shifted.reshape(-1), ignore_index=-100)
    assert_close(ours.loss, exact.numpy(), dtype, "loss vs F.cross_entropy in the model dtype")
    assert_close(ours.loss, theirs.loss.numpy(), "float32", "loss vs transformers (float32 upcast)")


@pytest.mark.parametrize("keep", [1, 3, np.array([0, 4, 8])])
def test_logits_to_keep(hf_factory, keep):
    hf, folder = hf_factory("causal-lm", seed=6)
    rng = np.random.default_rng(5)
    inputs = make_inputs("right", rng)
    theirs = torch_forward(hf, "float64", **inputs, logits_to_keep=keep if isinstance(keep, int) else torch.from_numpy(keep))
    ours = refimpl.from_pretrained(folder, dtype="float64")(**inputs, logits_to_keep=keep)
    assert_close(ours.logits, theirs.logits.numpy(), "float64", "logits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_4d_and_float_masks(hf_factory, dtype):
    """2-D float masks act through their non-zero entries; 4-D float masks are additive biases."""
    hf, folder = hf_factory("base", seed=8)
    rng = np.random.default_rng(6)
    inputs = make_inputs("right", rng)
    model = refimpl.from_pretrained(folder, dtype=dtype)
    mask = inputs.pop("attention_mask")
    for m in (mask.astype(dtype), mask.astype(bool)):
        theirs = torch_forward(hf, dtype, **inputs, attention_mask=m)
        assert_close(model(**inputs, attention_mask=m).last_hidden_state, theirs.last_hidden_state.numpy(), dtype, "2-D mask")
    bias = np.where(mask[:, None, None, :] == 1, 0.0, np.finfo(dtype).min).astype(dtype)
    bias = np.broadcast_to(bias, (3, 1, 9, 9)).copy()
    bias[:, :, :, 0] += -0.5  # an arbitrary additive term
    theirs = torch_forward(hf, dtype, **inputs, attention_mask=bias)
    assert_close(model(**inputs, attention_mask=bias).last_hidden_state, theirs.last_hidden_state.numpy(), dtype, "4-D bias")


def test_no_mask_and_fully_masked_row(hf_factory):
    """No mask means full attention; a row whose keys are all masked stays finite (uniform), as transformers."""
    hf, folder = hf_factory("base", seed=9)
    rng = np.random.default_rng(7)
    inputs = make_inputs("right", rng)
    model = refimpl.from_pretrained(folder, dtype="float64")
    theirs = torch_forward(hf, "float64", input_ids=inputs["input_ids"])
    assert_close(model(input_ids=inputs["input_ids"]).last_hidden_state, theirs.last_hidden_state.numpy(), "float64", "no mask")
    mask = inputs["attention_mask"].copy()
    mask[1] = 0
    theirs = torch_forward(hf, "float64", input_ids=inputs["input_ids"], attention_mask=mask, output_attentions=True)
    ours = model(input_ids=inputs["input_ids"], attention_mask=mask, output_attentions=True)
    assert np.all(np.isfinite(ours.last_hidden_state))
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), "float64", "fully masked row")
    assert_close(ours.attentions[0][1], np.full((4, 9, 9), 1 / 9), "float64", "uniform probabilities")


def test_bidirectional_decoder_flag_and_causal_mask(hf_factory):
    """``is_decoder`` switches the causal mask on for every task, as in transformers."""
    for task in ("base", "causal-lm"):
        hf, folder = hf_factory(task, seed=10, is_decoder=True)
        rng = np.random.default_rng(8)
        for kind in ("right", "left"):
            inputs = make_inputs(kind, rng)
            theirs = torch_forward(hf, "float64", **inputs, output_attentions=True)
            ours = refimpl.from_pretrained(folder, task=task, dtype="float64")(**inputs, output_attentions=True)
            assert_close(ours.attentions[1], theirs.attentions[1].numpy(), "float64", f"{task}/{kind} causal probs")


def test_backends_agree_and_switch(hf_factory):
    """``to("numpy")`` and ``to("numba")`` move nothing on the CPU (same arrays, ties kept)."""
    _, folder = hf_factory("masked-lm", seed=12)
    fast = refimpl.from_pretrained(folder, dtype="float64", backend="numba")
    assert fast.backend == "numba"
    ref = fast.to("numpy")
    assert ref.backend == "numpy" and ref.params.embeddings.word is fast.params.embeddings.word
    assert ref.params.lm_head.decoder_weight is ref.params.embeddings.word
    ids = np.array([[0, 5, 6, 7, 2]])
    assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, "float64", "numba vs numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        fast.to("torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["right", "left"])
def test_numba_per_head_attention_schedule_parity(hf_factory, monkeypatch, kind, dtype):
    """The per-(batch, head) schedule that the Numba backend uses for long inputs, forced on."""
    from refimpl.fast import schedule

    monkeypatch.setattr(schedule, "PER_HEAD_FROM", 1)
    hf, folder = hf_factory("base", seed=100 + ["right", "left"].index(kind))
    inputs = cast_inputs(make_inputs(kind, np.random.default_rng(1)), dtype)
    theirs = torch_forward(hf, dtype, **inputs)
    ours = refimpl.from_pretrained(folder, dtype=dtype, backend="numba")(**inputs)
    compare_main_outputs(ours, theirs, dtype, MAIN_FIELDS["base"])
