"""The written-out backward pass (refimpl.backward) held to torch autograd and to finite differences.

1. Each backward function beside its forward, against torch on the same op: every activation (at
   the kinks too), linear, LayerNorm, the masked softmax (fully masked rows), attention, the
   embedding lookup with its padding row, every loss.
2. Property-based (hypothesis, the ``ci`` profile): random small configs, every task and
   problem_type, padding, token types, every activation, tied and untied decoders, inputs_embeds,
   cross-attention: every parameter gradient (under transformers' names) and the input
   gradients match torch autograd, float64 within TOL["float64"] and float32 within TOL["float32"].
3. Independently of torch: central finite differences in float64 on random coordinates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import refimpl
from refimpl import backward as bw
from refimpl.ops import ACTIVATIONS, layer_norm, linear, log_softmax, softmax
from refimpl.params import iter_leaves
from backward_oracle import build, torch_gradients
from conftest import ALL_TASKS
from tolerances import FINITE_DIFFERENCE, TOL, assert_close, max_scaled_error

ACTS = sorted(set(ACTIVATIONS) & set(transformers.activations.ACT2CLS))
LOSS_TASKS = [t for t in ALL_TASKS if t != "base"]


def t64(a, requires_grad=True):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=requires_grad)


# =============================================================================================
# 1. Each backward function against torch
# =============================================================================================


def test_every_activation_has_a_derivative():
    assert set(bw.ACTIVATION_GRADS) == set(ACTIVATIONS)


# The grid, plus the points where torch picks a one-sided derivative or switches formula.
KINKS = [0.0, -3.0, 3.0, 6.0, 20.0, -20.0, 20.5, 10.0, 9.9, 0.707107, 1e-300, -1e-300]


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_activation_derivative_matches_torch(name, dtype):
    x = np.concatenate([np.linspace(-12.0, 12.0, 4001), KINKS, [-30.0, 30.0, 40.0]]).astype(dtype)
    if name == "sqrtsoftplus":
        x = x[x > -30]  # sqrt(softplus) at 0: torch and refimpl both divide by ~0 (inf * 0)
    xt = torch.tensor(x, requires_grad=True)
    transformers.activations.ACT2FN[name](xt).backward(torch.ones_like(xt))
    ours = bw.ACTIVATION_GRADS[name](x)
    assert ours.dtype == np.dtype(dtype) and ours.shape == x.shape
    assert_close(ours, xt.grad.numpy(), dtype, f"{name}'")
    # the one-sided choices exactly: relu'(0) = 0, relu6'(6) = 0, hardswish'(-3) = 0, ...
    k = np.array(KINKS, dtype=dtype)
    kt = torch.tensor(k, requires_grad=True)
    transformers.activations.ACT2FN[name](kt).backward(torch.ones_like(kt))
    np.testing.assert_allclose(bw.ACTIVATION_GRADS[name](k), kt.grad.numpy(), rtol=TOL[dtype], atol=TOL[dtype])


def test_linear_and_layer_norm_backward_match_torch():
    rng = np.random.default_rng(0)
    x, w, b, dy = rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5)), rng.normal(size=4), rng.normal(size=(2, 3, 4))
    xt, wt, bt = t64(x), t64(w), t64(b)
    torch.nn.functional.linear(xt, wt, bt).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(linear(x, w, b), torch.nn.functional.linear(xt, wt, bt).detach().numpy(), atol=1e-14)
    for ours, theirs in zip(bw.linear_backward(dy, x, w), (xt.grad, wt.grad, bt.grad)):
        assert_close(ours, theirs.numpy(), "float64")
    for eps, scale in ((1e-5, 1.0), (1e-12, 1e-4), (1e-3, 10.0)):  # near-constant rows with a tiny eps too
        x, g, beta, dy = rng.normal(size=(3, 4, 8)) * scale, rng.normal(size=8), rng.normal(size=8), rng.normal(size=(3, 4, 8))
        xt, gt, bt = t64(x), t64(g), t64(beta)
        torch.nn.functional.layer_norm(xt, (8,), gt, bt, eps).backward(torch.from_numpy(dy))
        dx, dg, db = bw.layer_norm_backward(dy, x, g, eps)
        assert_close(dx, xt.grad.numpy(), "float64", "dx")
        assert_close(dg, gt.grad.numpy(), "float64", "dgamma")
        assert_close(db, bt.grad.numpy(), "float64", "dbeta")
        assert_close(layer_norm(x, g, beta, eps), torch.nn.functional.layer_norm(xt, (8,), gt, bt, eps).detach().numpy(), "float64")


def test_attention_backward_matches_torch_with_fully_masked_rows():
    """softmax(q k^T * D^-0.5 + bias) v with a finfo.min bias; row (0, t=1) is fully masked."""
    rng = np.random.default_rng(1)
    b, n, t, s, d = 2, 3, 4, 5, 4
    q, k, v = rng.normal(size=(b, n, t, d)), rng.normal(size=(b, n, s, d)), rng.normal(size=(b, n, s, d))
    keep = rng.random((b, 1, t, s)) > 0.3
    keep[0, 0, 1, :] = False  # every key masked
    bias = np.where(keep, 0.0, np.finfo(np.float64).min)
    dctx = rng.normal(size=(b, n, t, d))
    qt, kt, vt = t64(q), t64(k), t64(v)
    scores = torch.matmul(qt, kt.transpose(2, 3)) * d**-0.5
    scores.retain_grad()
    probs = torch.softmax(scores + torch.from_numpy(bias), dim=-1)
    probs.retain_grad()
    torch.matmul(probs, vt).backward(torch.from_numpy(dctx))
    ours_probs = softmax(q @ k.swapaxes(-1, -2) * d**-0.5 + bias)
    np.testing.assert_allclose(ours_probs[0, :, 1], 1.0 / s)  # uniform, finite
    g = bw.scaled_dot_product_attention_backward(dctx, q, k, v, ours_probs)
    for name, ours, theirs in (("dq", g.dq, qt.grad), ("dk", g.dk, kt.grad), ("dv", g.dv, vt.grad),
                               ("dprobs", g.dprobs, probs.grad), ("dscores", g.dscores, scores.grad)):
        assert np.all(np.isfinite(ours)), name
        assert_close(ours, theirs.numpy(), "float64", name)


def test_lookup_backward_scatter_adds_and_skips_the_padding_row():
    rng = np.random.default_rng(2)
    table = rng.normal(size=(6, 3))
    ids = np.array([[1, 4, 4, 0], [4, 1, 2, 2]])
    dy = rng.normal(size=(2, 4, 3))
    for pad in (None, 1):
        tt = t64(table)
        torch.nn.functional.embedding(torch.from_numpy(ids), tt, padding_idx=pad).backward(torch.from_numpy(dy))
        ours = bw.lookup_backward(dy, ids, 6, padding_idx=pad)
        assert_close(ours, tt.grad.numpy(), "float64")
    assert np.all(bw.lookup_backward(dy, ids, 6, padding_idx=1)[1] == 0)


def test_loss_backwards_match_torch():
    rng = np.random.default_rng(3)
    F = torch.nn.functional
    logits = rng.normal(size=(7, 5)) * 3
    labels = np.array([0, -100, 4, 2, -100, 1, 4])
    lt = t64(logits)
    F.cross_entropy(lt, torch.from_numpy(labels), ignore_index=-100).backward()
    assert_close(bw.cross_entropy_backward(logits, labels), lt.grad.numpy(), "float64", "cross_entropy")
    # every label ignored: the loss is NaN (0/0) and torch's gradient is 0
    lt = t64(logits)
    loss = F.cross_entropy(lt, torch.full((7,), -100), ignore_index=-100)
    loss.backward()
    assert math.isnan(loss.item()) and np.all(lt.grad.numpy() == 0)
    assert np.all(bw.cross_entropy_backward(logits, np.full(7, -100)) == 0)
    # causal LM: shifted by one
    logits3, lab = rng.normal(size=(2, 4, 6)), np.array([[1, 2, -100, 3], [0, 5, 5, -100]])
    lt = t64(logits3)
    F.cross_entropy(lt[:, :-1].reshape(-1, 6), torch.from_numpy(lab[:, 1:].reshape(-1)), ignore_index=-100).backward()
    assert_close(bw.causal_lm_loss_backward(logits3, lab), lt.grad.numpy(), "float64", "causal_lm")
    # MSE and BCE with logits
    x, y = rng.normal(size=(3, 2)) * 4, rng.normal(size=(3, 2))
    xt = t64(x)
    F.mse_loss(xt, torch.from_numpy(y)).backward()
    assert_close(bw.mse_backward(x, y), xt.grad.numpy(), "float64", "mse")
    yb = (rng.random((3, 2)) > 0.5).astype(np.float64)
    xt = t64(x * 10)
    F.binary_cross_entropy_with_logits(xt, torch.from_numpy(yb)).backward()
    assert_close(bw.bce_with_logits_backward(x * 10, yb), xt.grad.numpy(), "float64", "bce")
    # span loss: positions clamped to [0, T], T ignored (transformers' QA loss)
    st_, en = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    sp, ep = np.array([-2, 3, 9]), np.array([5, 0, 2])
    stt, ent = t64(st_), t64(en)
    t = 5
    ((F.cross_entropy(stt, torch.from_numpy(sp).clamp(0, t), ignore_index=t)
      + F.cross_entropy(ent, torch.from_numpy(ep).clamp(0, t), ignore_index=t)) / 2).backward()
    d_start, d_end = bw.span_loss_backward(st_, en, sp, ep)
    assert_close(d_start, stt.grad.numpy(), "float64", "start")
    assert_close(d_end, ent.grad.numpy(), "float64", "end")
    assert np.all(d_start[2] == 0)  # position 9 -> clamped to T=5 -> ignored


def test_log_softmax_backward_is_the_derivative_of_log_softmax():
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(3, 6)) * 5, rng.normal(size=(3, 6))
    xt = t64(x)
    torch.log_softmax(xt, -1).backward(torch.from_numpy(dy))
    assert_close(bw.log_softmax_backward(dy, log_softmax(x)), xt.grad.numpy(), "float64")


# =============================================================================================
# 2. Whole models against torch autograd, property-based
# =============================================================================================


@st.composite
def grad_cases(draw):
    """(task, config kwargs, inputs, seed, dtype) for a random small model and batch."""
    task = draw(st.sampled_from(LOSS_TASKS))
    heads = draw(st.sampled_from([1, 2, 4]))
    pad = draw(st.integers(0, 3))
    cfg = dict(
        vocab_size=draw(st.integers(12, 30)), hidden_size=heads * draw(st.sampled_from([2, 4])),
        num_attention_heads=heads, num_hidden_layers=draw(st.integers(1, 3)),
        intermediate_size=draw(st.sampled_from([4, 8, 16])), hidden_act=draw(st.sampled_from(ACTS)),
        layer_norm_eps=draw(st.sampled_from([1e-12, 1e-5, 1e-3])), type_vocab_size=draw(st.integers(1, 3)),
        pad_token_id=pad, bos_token_id=None, eos_token_id=None, max_position_embeddings=pad + 12,
        is_decoder=task == "causal-lm" or (task != "masked-lm" and draw(st.booleans())),
    )
    if task in ("masked-lm", "causal-lm"):
        cfg["tie_word_embeddings"] = draw(st.booleans())
    if task == "causal-lm":
        cfg["add_cross_attention"] = draw(st.booleans())
    k = 2
    if task in ("sequence-classification", "token-classification"):
        k = draw(st.integers(1, 3))
    cfg["num_labels"] = k
    if task == "sequence-classification":
        cfg["problem_type"] = draw(st.sampled_from([None, "regression", "single_label_classification", "multi_label_classification"]))
        if cfg["problem_type"] == "single_label_classification" and k == 1:
            cfg["problem_type"] = None
    b, t = draw(st.integers(1, 3)), draw(st.integers(2, 8))
    c = draw(st.integers(1, 3)) if task == "multiple-choice" else None
    rows = b * (c or 1)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    v = cfg["vocab_size"]
    ids = rng.integers(0, v, size=(rows, t))
    ids = np.where(ids == pad, (pad + 1) % v, ids)
    lengths = rng.integers(1, t + 1, size=rows)
    left = draw(st.booleans())
    mask = np.zeros((rows, t), dtype=np.int64)
    for i, n in enumerate(lengths):
        if left:
            mask[i, t - n:] = 1
        else:
            mask[i, :n] = 1
    ids = np.where(mask == 1, ids, pad)
    types = rng.integers(0, cfg["type_vocab_size"], size=(rows, t))
    inputs = {"attention_mask": mask, "token_type_ids": types}
    if draw(st.booleans()):
        inputs["inputs_embeds"] = rng.normal(size=(rows, t, cfg["hidden_size"]))
    else:
        inputs["input_ids"] = ids
    if task in ("masked-lm", "causal-lm", "token-classification"):
        n_cls = v if task != "token-classification" else k
        labels = np.where(rng.random((b, t)) < 0.25, -100, rng.integers(0, n_cls, size=(b, t)))
        labels[0, -1] = n_cls - 1  # at least one counted label (the shifted causal loss too)
        inputs["labels"] = labels
    elif task == "sequence-classification":
        problem = cfg["problem_type"] or ("regression" if k == 1 else draw(st.sampled_from(["single", "multi"])))
        if problem in ("single", "single_label_classification"):
            inputs["labels"] = rng.integers(0, k, size=b)
        elif problem == "regression":
            inputs["labels"] = rng.normal(size=b if k == 1 else (b, k))
        else:
            inputs["labels"] = (rng.random((b, k)) > 0.5).astype(np.float64)
    elif task == "question-answering":
        inputs["start_positions"] = rng.integers(-1, t + 3, size=b)
        inputs["end_positions"] = rng.integers(-1, t + 3, size=b)
    else:
        inputs["labels"] = rng.integers(0, c, size=b)
        inputs = {key: (val.reshape(b, c, *val.shape[1:]) if key != "labels" else val) for key, val in inputs.items()}
    if cfg.get("add_cross_attention"):
        s = draw(st.integers(1, 5))
        inputs["encoder_hidden_states"] = rng.normal(size=(b, s, cfg["hidden_size"]))
        enc_mask = np.ones((b, s), dtype=np.int64)
        enc_mask[0, s // 2:] = 0 if s > 1 else 1
        inputs["encoder_attention_mask"] = enc_mask
    return task, cfg, inputs, draw(st.integers(0, 2**16)), draw(st.sampled_from(["float64", "float64", "float32"]))


def check_against_torch(task, cfg, inputs, seed, dtype) -> float:
    """-> the largest scaled error over every gradient; asserts names, shapes, dtypes and values."""
    hf, model = build(task, cfg, seed)
    model = model.astype(dtype)
    ours_in = {k: (v.astype(dtype) if k in ("inputs_embeds", "encoder_hidden_states") else v) for k, v in inputs.items()}
    with np.errstate(invalid="ignore"):  # every QA position ignored: the loss is 0/0 = NaN, as in torch
        loss, grads = refimpl.grad(model, **ours_in)
    want_loss, want = torch_gradients(hf, task, inputs, dtype)
    assert set(grads) == set(want), set(grads) ^ set(want)
    assert_close(loss, want_loss, dtype, "loss")
    worst = 0.0
    for name, w in want.items():
        if w is None:
            assert grads[name] is None, f"{name}: torch has no gradient, refimpl has one"
            continue
        assert grads[name] is not None, f"{name}: torch has a gradient, refimpl none"
        assert grads[name].dtype == np.dtype(dtype), name
        assert_close(grads[name], w, dtype, name)
        worst = max(worst, max_scaled_error(grads[name], w))
    return worst


@settings(max_examples=30)
@given(grad_cases())
def test_gradients_match_torch_autograd(case):
    check_against_torch(*case)


@pytest.mark.slow
@settings(max_examples=600)
@given(grad_cases())
def test_gradients_match_torch_autograd_many(case):
    check_against_torch(*case)


@pytest.mark.parametrize("task", LOSS_TASKS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_task_on_the_shared_batch(task, dtype):
    """The conftest batch (full, right- and left-padded rows, token types): every task, both dtypes."""
    from conftest import TINY, task_inputs

    cfg = {**TINY, "num_labels": 2, "is_decoder": task == "causal-lm"}
    inputs = task_inputs(task, refimpl.Config.from_dict(cfg), np.random.default_rng(5))
    check_against_torch(task, cfg, inputs, 11, dtype)


# =============================================================================================
# 3. Finite differences (no torch)
# =============================================================================================


def finite_difference_check(model, inputs: dict, rng, per_tensor: int = 2, h: float = 1e-5):
    """Central differences ``(L(x + h) - L(x - h)) / 2h`` at ``per_tensor`` random coordinates of every
    parameter (tied ones perturbed once, so both uses move) and of inputs_embeds. -> worst scaled error."""
    loss, grads = refimpl.grad(model, **inputs)
    leaves = dict(iter_leaves(model.params))
    arrays = {name: leaves[path] for path, name in bw.parameter_names(model.config, model.task).items()}
    if "inputs_embeds" in inputs:
        arrays["inputs_embeds"] = inputs["inputs_embeds"]

    def f():
        return float(model(**inputs).loss)

    worst = 0.0
    for name, arr in arrays.items():
        g = grads[name]
        for _ in range(per_tensor):
            idx = tuple(int(rng.integers(0, n)) for n in arr.shape)
            old = arr[idx]
            arr[idx] = old + h
            up = f()
            arr[idx] = old - h
            down = f()
            arr[idx] = old
            fd = (up - down) / (2 * h)
            if g is None:  # a parameter the loss does not read
                assert up == down, f"{name}: no gradient, but the loss moves"
                continue
            err = abs(fd - g[idx]) / max(1.0, float(np.max(np.abs(g))))
            assert err <= FINITE_DIFFERENCE["float64"], f"{name}{list(idx)}: finite difference {fd:.10g}, backward {g[idx]:.10g}"
            worst = max(worst, err)
    assert float(model(**inputs).loss) == float(loss)  # every coordinate restored
    return worst


FD_CASES = [
    ("masked-lm", "gelu", dict(tie_word_embeddings=True)),
    ("masked-lm", "gelu_new", dict(tie_word_embeddings=False)),
    ("causal-lm", "silu", dict(is_decoder=True)),
    ("causal-lm", "gelu", dict(is_decoder=True, add_cross_attention=True)),
    ("sequence-classification", "tanh", dict(num_labels=3)),
    ("sequence-classification", "mish", dict(num_labels=1)),
    ("sequence-classification", "quick_gelu", dict(num_labels=2, problem_type="multi_label_classification")),
    ("token-classification", "relu", dict(num_labels=3)),
    ("question-answering", "gelu_fast", dict(num_labels=2)),
    ("multiple-choice", "sigmoid", dict()),
]


@pytest.mark.parametrize("task,act,extra", FD_CASES, ids=[f"{t}-{a}" for t, a, _ in FD_CASES])
def test_gradients_match_finite_differences(task, act, extra):
    """No torch: central differences in float64 at random coordinates of every parameter. Inputs
    avoid fully masked attention rows, where the computed function does not depend on the scores
    at all (docs/backward.md) while the gradient formula, as torch's, does."""
    from conftest import TINY

    cfg = {**TINY, "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 12, "vocab_size": 20,
           "hidden_act": act, **extra}
    _, model = build(task, cfg, seed=3, std=0.3)
    rng = np.random.default_rng(7)
    b, t = 2, 6
    ids = rng.integers(3, 20, size=(b, t))
    mask = np.ones((b, t), dtype=np.int64)
    ids[1, 4:], mask[1, 4:] = 1, 0  # right padding (no row is fully masked, causal or not)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": (np.arange(t) > 2).astype(np.int64)[None].repeat(b, 0)}
    if task in ("masked-lm", "causal-lm", "token-classification"):
        inputs["labels"] = np.where(mask == 1, rng.integers(0, cfg.get("num_labels", 2) if task == "token-classification" else 20, size=(b, t)), -100)
    elif task == "sequence-classification":
        k = cfg["num_labels"]
        inputs["labels"] = rng.normal(size=b) if k == 1 else (
            (rng.random((b, k)) > 0.5).astype(np.float64) if "problem_type" in cfg else rng.integers(0, k, size=b))
    elif task == "question-answering":
        inputs["start_positions"], inputs["end_positions"] = np.array([1, 9]), np.array([3, 2])
    elif task == "multiple-choice":
        inputs = {k: np.stack([v, v[::-1]], axis=1) for k, v in inputs.items()}
        inputs["labels"] = np.array([1, 0])
    if cfg.get("add_cross_attention"):
        inputs["encoder_hidden_states"] = rng.normal(size=(b, 3, 8))
    if task == "sequence-classification" and act == "tanh":  # inputs_embeds, whose gradient is checked too
        inputs["inputs_embeds"] = rng.normal(size=(b, t, 8))
        del inputs["input_ids"]
    finite_difference_check(model, inputs, np.random.default_rng(8))


# =============================================================================================
# 4. The interface
# =============================================================================================


def test_grad_names_match_named_parameters_and_tie_like_torch():
    """Tied: one word-embedding gradient (lookup + decoder); untied 5.x: lm_head.decoder.* used,
    lm_head.bias unused (None, as torch's .grad)."""
    from conftest import TINY

    for tie in (True, False):
        cfg = {**TINY, "tie_word_embeddings": tie}
        hf, model = build("masked-lm", cfg, seed=1)
        ids = np.array([[0, 5, 9, 2, 1]])
        labels = np.array([[-100, 7, 9, -100, -100]])
        loss, grads = refimpl.grad(model, input_ids=ids, labels=labels)
        assert list(grads) == [n for n, _ in hf.named_parameters()] or set(grads) == {n for n, _ in hf.named_parameters()}
        word = grads["roberta_prelayernorm.embeddings.word_embeddings.weight"]
        if tie:
            assert "lm_head.decoder.weight" not in grads
            assert np.any(word[1] != 0)  # the pad row: no lookup gradient (padding_idx), but the decoder's
        else:
            assert grads["lm_head.bias"] is None and grads["lm_head.decoder.bias"] is not None
            assert np.all(word[1] == 0)  # the pad token's row: padding_idx, and no decoder reads it
        assert loss.shape == () and loss.dtype == np.float64


def test_grad_runs_the_reference_whatever_the_backend_and_keeps_the_dtype():
    from conftest import TINY

    _, model = build("sequence-classification", dict(TINY), seed=2)
    inputs = {"input_ids": [[0, 5, 6, 2]], "labels": [1]}  # lists are accepted as by the forward
    loss64, g64 = refimpl.grad(model, **inputs)
    loss_nb, g_nb = refimpl.grad(model.to("numba"), **inputs)
    for name in g64:
        np.testing.assert_array_equal(g64[name], g_nb[name])  # the same NumPy reference computation
    loss32, g32 = refimpl.grad(model.astype("float32"), **inputs)
    assert all(v.dtype == np.float32 for v in g32.values()) and loss32.dtype == np.float32
    for name in g64:
        assert_close(g32[name], g64[name], "float32", name)


@pytest.mark.parametrize("call,message", [
    (lambda m: refimpl.grad(m, input_ids=[[0, 5, 2]]), "needs labels"),
    (lambda m: refimpl.grad(m.__class__(m.config, m.params, "base"), input_ids=[[0, 5, 2]]), "base model has no loss"),
    (lambda m: refimpl.grad(m, input_ids=[[0, 5, 2]], labels=[7]), "labels must lie in"),
])
def test_grad_errors_are_clear(call, message):
    from conftest import TINY

    _, model = build("sequence-classification", dict(TINY), seed=2)
    with pytest.raises(ValueError, match=message):
        call(model)


def test_question_answering_needs_positions():
    from conftest import TINY

    _, model = build("question-answering", {**TINY, "num_labels": 2}, seed=2)
    with pytest.raises(bw.GradientError, match="needs start_positions and end_positions"):
        refimpl.grad(model, input_ids=[[0, 5, 2]])
    with pytest.raises(ValueError, match="pass both start_positions and end_positions"):
        refimpl.grad(model, input_ids=[[0, 5, 2]], start_positions=[1])
