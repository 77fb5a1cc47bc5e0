"""Property-based parity: random small configs and inputs, refimpl vs transformers in float64.

Hypothesis draws the config (1-3 layers, heads dividing hidden, every supported activation, eps,
type vocabulary size, pad id, encoder or decoder) and the inputs (batch, length, left/right padding,
token types, labels with -100). The ``ci`` profile (tests/conftest.py) keeps it derandomized.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

import refimpl
from conftest import randomize_
from tolerances import ACTIVATION, assert_close

# Every hidden_act refimpl supports that transformers also accepts.
ACTS = sorted(set(refimpl.ops.ACTIVATIONS) & set(transformers.activations.ACT2CLS))


@st.composite
def configs(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    head_size = draw(st.sampled_from([2, 4, 8]))
    pad = draw(st.integers(0, 3))
    return dict(
        vocab_size=draw(st.integers(12, 40)),
        hidden_size=heads * head_size,
        num_attention_heads=heads,
        num_hidden_layers=draw(st.integers(1, 3)),
        intermediate_size=draw(st.sampled_from([4, 8, 24])),
        hidden_act=draw(st.sampled_from(ACTS)),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 1e-3])),
        type_vocab_size=draw(st.integers(1, 3)),
        pad_token_id=pad,
        bos_token_id=None,
        eos_token_id=None,
        max_position_embeddings=pad + 12,
        is_decoder=draw(st.booleans()),
    )


@st.composite
def cases(draw):
    cfg = draw(configs())
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 8))
    v, pad = cfg["vocab_size"], cfg["pad_token_id"]
    ids = np.array(draw(st.lists(st.lists(st.integers(0, v - 1), min_size=t, max_size=t), min_size=b, max_size=b)))
    ids = np.where(ids == pad, (pad + 1) % v, ids)  # real tokens are not the pad id
    lengths = draw(st.lists(st.integers(1, t), min_size=b, max_size=b))
    left = draw(st.booleans())
    mask = np.zeros((b, t), dtype=np.int64)
    for i, n in enumerate(lengths):
        if left:
            mask[i, t - n :] = 1
        else:
            mask[i, :n] = 1
    ids = np.where(mask == 1, ids, pad)
    token_types = np.array(draw(st.lists(st.lists(st.integers(0, cfg["type_vocab_size"] - 1), min_size=t, max_size=t), min_size=b, max_size=b)))
    labels = np.array(draw(st.lists(st.lists(st.sampled_from([-100, 0, 1, v - 1]), min_size=t, max_size=t), min_size=b, max_size=b)))
    labels[0, 0] = 0  # at least one label counts
    return cfg, ids, mask, token_types, labels, draw(st.integers(0, 2**16))


def hf_and_refimpl(cfg: dict, seed: int, task_class: str, task: str):
    config = transformers.RobertaPreLayerNormConfig(**cfg)
    config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = getattr(transformers, task_class)(config)
    randomize_(hf, seed)
    hf = hf.eval().double()
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    rconfig = refimpl.Config.from_dict(config.to_dict())
    model = refimpl.Model(rconfig, refimpl.params_from_state_dict(rconfig, task, state, "float64"), task)
    return hf, model


@given(cases())
def test_masked_lm_matches_transformers(case):
    cfg, ids, mask, token_types, labels, seed = case
    hf, model = hf_and_refimpl(cfg, seed, "RobertaPreLayerNormForMaskedLM", "masked-lm")
    with torch.no_grad():
        theirs = hf(
            torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), token_type_ids=torch.from_numpy(token_types),
            labels=torch.from_numpy(labels), output_hidden_states=True,
        )
    ours = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=labels, output_hidden_states=True)
    assert ours.logits.dtype == np.float64 and ours.logits.shape == tuple(theirs.logits.shape)
    assert_close(ours.logits, theirs.logits.numpy(), "float64", "logits")
    assert_close(ours.loss, theirs.loss.numpy(), "float64", "loss")
    for i, (o, t) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(o, t.numpy(), "float64", f"hidden_states[{i}]")


@given(cases(), st.sampled_from(["float32", "float64"]))
def test_base_model_matches_transformers(case, dtype):
    cfg, ids, mask, token_types, _, seed = case
    hf, model = hf_and_refimpl(cfg, seed, "RobertaPreLayerNormModel", "base")
    model = model.astype(dtype)
    hf = hf.to(getattr(torch, dtype))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), token_type_ids=torch.from_numpy(token_types))
    ours = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    assert ours.last_hidden_state.dtype == np.dtype(dtype)
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), dtype, "last_hidden_state")
    assert_close(ours.pooler_output, theirs.pooler_output.numpy(), dtype, "pooler_output")


@given(cases())
def test_batch_equals_each_sequence_alone(case):
    """A padded batch gives, at every real position, what each sequence gives alone (no padding)."""
    cfg, ids, mask, token_types, _, seed = case
    _, model = hf_and_refimpl(cfg, seed, "RobertaPreLayerNormForMaskedLM", "masked-lm")
    batch = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, output_attentions=True)
    for i in range(ids.shape[0]):
        keep = mask[i] == 1
        alone = model(input_ids=ids[i : i + 1, keep], token_type_ids=token_types[i : i + 1, keep])
        assert_close(batch.logits[i, keep], alone.logits[0], "float64", f"row {i}")


@pytest.mark.parametrize("act", ACTS)
def test_every_activation_matches_transformers(act):
    """float64: equal to torch's to ~1e-13. float32: no less accurate than torch's float32.

    In float32 both compute ``0.5 x (1 + erf(x / sqrt 2))``-style formulas whose ``1 + erf`` cancels
    for negative x, so the two differ by up to ~1e-6 absolute; what matters for a reference is the
    distance to the true value (the float64 result), which must not exceed torch's.
    """
    x = np.linspace(-12, 12, 2001)
    fn = transformers.activations.ACT2FN[act]
    expected = fn(torch.from_numpy(x)).numpy()
    ours = refimpl.ops.activation(act)(x)
    np.testing.assert_allclose(ours, expected, rtol=ACTIVATION["float64"], atol=1e-15, err_msg=act)
    x32 = x.astype(np.float32)
    truth = refimpl.ops.activation(act)(x32.astype(np.float64))
    ours32 = refimpl.ops.activation(act)(x32)
    assert ours32.dtype == np.float32, act
    torch32 = fn(torch.from_numpy(x32)).numpy()
    ours_err = np.max(np.abs(ours32 - truth))
    torch_err = np.max(np.abs(torch32 - truth))
    assert ours_err <= max(torch_err, 4 * np.finfo(np.float32).eps * np.max(np.abs(truth))), (act, ours_err, torch_err)
