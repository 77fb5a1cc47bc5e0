"""The fast path (refimpl.fast, the ``numba`` backend) held to the reference (refimpl.tasks).

Step by step (the attention and feed-forward blocks) and task by task, on the same weights and
inputs. The two compute the same equations in the same order but with other BLAS call shapes
((W x^T)^T for few rows, attention per head), the kernels' own erf/exp (within 1-2 ulp of libm)
and the batch in two halves, so they agree to rounding: tolerances.FAST, not bitwise.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

import refimpl
import refimpl.fast.tasks as fast
from conftest import ALL_TASKS, task_inputs
from refimpl import attention, encoder, tasks
from refimpl.cache import empty_cache
from refimpl.inputs import validate
from refimpl.params import build_params, hf_key_table
from tolerances import FAST, REORDERED, assert_close

DTYPES = ["float64", "float32"]


def random_model(task: str, seed: int, **config) -> refimpl.Model:
    """A model with N(0, 0.3^2) weights (LayerNorm scales 1 + N(0, 0.1^2)), numba backend."""
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=40, pad_token_id=1, type_vocab_size=2, layer_norm_eps=1e-5,
                num_labels=2 if task == "question-answering" else 3)
    cfg = refimpl.Config.from_dict({**base, **config})
    rng = np.random.default_rng(seed)
    leaves = {}
    for e in hf_key_table(cfg, task):
        scale = 0.1 if "layer_norm.weight" in e.path else 0.3
        leaves[e.path] = (1.0 if "layer_norm.weight" in e.path else 0.0) + rng.normal(scale=scale, size=e.shape)
    return refimpl.Model(cfg, build_params(cfg, task, leaves), task).astype("float64").to("numba")


def assert_outputs_match(got, want, dtype: str) -> int:
    """Every field of ``want`` in ``got`` within FAST; -> the number of arrays compared."""
    n = 0
    for name, value in want.to_dict().items():
        if name == "past_key_values":
            continue
        pairs = zip(getattr(got, name), value) if isinstance(value, tuple) else [(getattr(got, name), value)]
        for i, (a, b) in enumerate(pairs):
            assert a.dtype == b.dtype == np.dtype(dtype), name
            assert_close(a, b, dtype, f"{name}[{i}]", FAST)
            n += 1
    return n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", ALL_TASKS)
def test_fast_forward_matches_the_reference_for_every_task(task, dtype):
    model = random_model(task, seed=ALL_TASKS.index(task), is_decoder=task == "causal-lm").astype(dtype)
    reference = model.to("numpy")
    inputs = task_inputs(task, model.config, np.random.default_rng(1))
    for extra in ({}, {"output_hidden_states": True, "output_attentions": True}):
        got, want = model(**inputs, **extra), reference(**inputs, **extra)
        assert type(got) is type(want)
        n = assert_outputs_match(got, want, dtype)
        assert n >= (2 if not extra else 2 + 2 * model.config.num_hidden_layers)
        assert (getattr(got, "loss", None) is None) == (getattr(want, "loss", None) is None) == (task == "base")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_fast_blocks_match_the_reference_blocks(dtype, act):
    """The fast attention block (with and without probabilities) and feed-forward block against
    refimpl.attention.attention_block and refimpl.encoder.feed_forward_block, for several
    activations (the exact GELU is fused with the bias add; the others are the NumPy definitions)."""
    model = random_model("base", seed=3, hidden_act=act).astype(dtype)
    p, c = model.params.layers[0], model.config
    rng = np.random.default_rng(2)
    for b, t in ((1, 3), (2, 9), (3, 70)):  # few rows ((W x^T)^T) and many (x W^T)
        x = rng.standard_normal((b, t, c.hidden_size)).astype(dtype)
        keep = np.ones((b, t), bool)
        keep[0, t // 2:] = False
        bias = attention.keep_to_bias(keep[:, None, None, :], np.dtype(dtype))
        ref, ref_probs, _ = attention.attention_block(x, p.attention, bias, num_heads=c.num_attention_heads,
                                                      eps=c.layer_norm_eps)
        for need_probs in (True, False):
            got, probs = fast.attention_block(x, p.attention, bias, num_heads=c.num_attention_heads,
                                              eps=c.layer_norm_eps, need_probs=need_probs)
            assert_close(got, ref, dtype, "attention block", FAST)
            if need_probs:
                assert_close(probs, ref_probs, dtype, "probabilities", FAST)
            else:
                assert probs is None
        got = fast.feed_forward_block(x, p, act=act, eps=c.layer_norm_eps)
        assert_close(got, encoder.feed_forward_block(x, p, act=act, eps=c.layer_norm_eps), dtype, "ffn", FAST)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probs,two_cores", [(True, False), (False, False), (False, True)])
def test_fast_cached_decoding_matches_the_reference(monkeypatch, dtype, probs, two_cores):
    """Token by token with a KV cache (and cross-attention over encoder states): the fast path's
    logits and cache equal the reference's at every step. Without the probabilities a step's
    self- and cross-attention run kernels.attention_few (``two_cores``: its pairs shared with the
    helper thread, the split threshold lowered to 0 for this tiny model)."""
    from refimpl.fast import jobs

    if two_cores:
        monkeypatch.setattr(jobs, "ATTENTION_SPLIT_FROM", 0)
    model = random_model("causal-lm", seed=4, is_decoder=True, add_cross_attention=True).astype(dtype)
    reference = model.to("numpy")
    rng = np.random.default_rng(5)
    ids = rng.integers(3, model.config.vocab_size, size=(2, 6))
    enc = rng.standard_normal((2, 5, model.config.hidden_size)).astype(dtype)
    enc_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    caches = [None, None]
    for step in range(ids.shape[1]):
        outs = []
        for i, m in enumerate((model, reference)):
            kwargs = dict(encoder_hidden_states=enc, encoder_attention_mask=enc_mask) if step == 0 else {}
            out = m(input_ids=ids[:, step:step + 1], attention_mask=np.ones((2, step + 1), int),
                    past_key_values=caches[i], use_cache=True, output_attentions=probs, **kwargs)
            caches[i] = out.past_key_values
            outs.append(out)
        assert_outputs_match(outs[0], outs[1], dtype)
        assert caches[0].length == caches[1].length == step + 1
        assert_close(caches[0].layers[1].keys[:, :, : step + 1], caches[1].layers[1].keys[:, :, : step + 1],
                     dtype, "cached keys", FAST)


def _decode_steps(model, ids, mask, steps: int, plain: bool, monkeypatch):
    """Greedy decoding by hand (a prompt, then ``steps`` single tokens with the cache) -> the logits of
    every call and the final cache; ``plain``: with refimpl.fast.decoding switched off."""
    from refimpl.fast import decoding

    with monkeypatch.context() as m:
        if plain:
            m.setattr(decoding, "run", lambda *a: False)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for _ in range(steps):
            tok = np.argmax(out.logits[:, -1], axis=-1)[:, None]  # [B, 1]
            mask = None if mask is None else np.concatenate([mask, np.ones_like(tok)], axis=1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        return logits, cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("cores", ["two", "two, attention too", "one"])
def test_decoding_step_in_one_call_is_the_step_call_by_call(monkeypatch, dtype, batch, cores):
    """refimpl.fast.decoding runs a step's blocks in one compiled call: bitwise the logits and the
    cache of the same steps through encode's calls (left padding, a mask and none, a partial last
    panel in every GEMM (I = 37), 6 rows through a padded whole tile; the GEMMs as jobs on both
    cores with the attention as a job or not, or everything on this core), and within FAST of the
    reference."""
    from refimpl.fast import decoding, jobs, packed, schedule

    if cores != "one":  # (this tiny model's GEMMs as two-core jobs, on both paths)
        monkeypatch.setattr(packed, "SPLIT_FROM", 0)
    if cores == "two, attention too":
        monkeypatch.setattr(jobs, "ATTENTION_SPLIT_FROM", 0)
    if cores == "one":  # (a thread that keeps to its core: both paths)
        monkeypatch.setattr(schedule, "_here", type("", (), {"one_thread": True})())
    runs = []
    real = decoding.run
    monkeypatch.setattr(decoding, "run", lambda *a: runs.append(real(*a)) or runs[-1])
    model = random_model("causal-lm", seed=11, is_decoder=True).astype(dtype)
    rng = np.random.default_rng(12)
    ids = rng.integers(3, model.config.vocab_size, size=(batch, 5))
    for mask in (None, np.ones((batch, 5), np.int64)):
        if mask is not None:
            mask[1:, :2] = 0  # left padding in every row but the first
            ids[1:, :2] = model.config.pad_token_id
        fused, fused_cache = _decode_steps(model, ids, mask, 6, False, monkeypatch)
        assert runs.count(True) == 6, runs
        runs.clear()
        plain, plain_cache = _decode_steps(model, ids, mask, 6, True, monkeypatch)
        for a, b in zip(fused, plain):
            np.testing.assert_array_equal(a, b)
        for la, lb in zip(fused_cache.layers, plain_cache.layers):
            assert la.length == lb.length == 11
            np.testing.assert_array_equal(la.keys[:, :, :11], lb.keys[:, :, :11])
            np.testing.assert_array_equal(la.values[:, :, :11], lb.values[:, :, :11])
        reference, _ = _decode_steps(model.to("numpy"), ids, mask, 6, True, monkeypatch)
        for i, (a, b) in enumerate(zip(fused, reference)):
            assert_close(a, b, dtype, f"logits of call {i}", FAST)


def test_decoding_step_in_one_call_follows_replaced_weights_and_steps_aside(monkeypatch):
    """The packed weights it reads are the model's current arrays (a weight replaced in the
    parameters is packed again); where the call-by-call step would keep to this core (a thread
    that keeps to its own core, one core, the job board held by another caller) the same call runs
    every GEMM and the attention here (the same bits); and it leaves the step to encode where it
    does not apply: hidden states or probabilities asked for, another activation, a cache without
    room."""
    from refimpl.fast import decoding, jobs

    runs = []
    real = decoding.run
    monkeypatch.setattr(decoding, "run", lambda *a: runs.append(real(*a)) or runs[-1])
    model = random_model("causal-lm", seed=13, is_decoder=True).astype("float32")
    ids = np.random.default_rng(14).integers(3, model.config.vocab_size, size=(2, 4))
    before, _ = _decode_steps(model, ids, None, 2, False, monkeypatch)
    layer = model.params.layers[1]
    layer.output.weight = layer.output.weight * np.float32(2)  # a new array in its place
    after, _ = _decode_steps(model, ids, None, 2, False, monkeypatch)
    plain, _ = _decode_steps(model, ids, None, 2, True, monkeypatch)
    assert runs == [False, True, True] * 2  # (the prompts: several tokens)
    assert not np.array_equal(before[1], after[1])
    for a, b in zip(after, plain):
        np.testing.assert_array_equal(a, b)
    runs.clear()
    out = model(input_ids=ids, use_cache=True)
    step = dict(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    model(**step, output_hidden_states=True)
    model(**step, output_attentions=True)
    assert runs == [False], "asked for the prompt only (not with hidden states or probabilities)"
    runs.clear()
    one_core = [lambda m: m.setattr(decoding, "this_core_only", lambda: True),  # a thread keeping to its core
                lambda m: m.setattr(jobs, "_CPUS", 1),  # one core: no board
                lambda m: m.setattr(decoding, "held_board", lambda like: contextlib.nullcontext())]  # the board held

    def prompted():  # a cache with room, the prompt in it
        cache = empty_cache(model.config, 2, model.dtype, model.xp, capacity=8)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache

    for condition in one_core:  # (then every GEMM and the attention run on this core, in the same call)
        got = []
        for plain in (False, True):
            cache = prompted()
            with monkeypatch.context() as m:
                condition(m)
                if plain:
                    m.setattr(decoding, "run", lambda *a: False)
                got.append(model(**dict(step, past_key_values=cache)).logits)
        np.testing.assert_array_equal(got[0], got[1])
    assert runs.count(True) == 3
    with jobs._the_helper(jobs.ATTENTION_LIKE[np.dtype(np.float32)]).lock:  # another caller's jobs on the board
        assert real(model.params, model.config, np.zeros((2, 1, 32), np.float32), prompted(), None)
    assert not real(model.params, model.config.replace(hidden_act="relu"), np.zeros((2, 1, 32), np.float32),
                    out.past_key_values, None)
    full = empty_cache(model.config, 2, model.dtype, model.xp, capacity=1)
    full.layers = [type(lc)(keys=lc.keys, values=lc.values, length=1) for lc in full.layers]
    assert not real(model.params, model.config, np.zeros((2, 1, 32), np.float32), full, None)


def test_fast_path_runs_only_untraced_on_numpy_arrays():
    """A traced call runs the reference (the traced program is the program); the numba backend
    otherwise runs refimpl.fast.tasks, and the numpy backend never does."""
    model = random_model("masked-lm", seed=6)
    inputs = task_inputs("masked-lm", model.config, np.random.default_rng(7))
    x = validate(model, **inputs)
    called = []
    original = fast.FORWARD["masked-lm"]
    try:
        fast.FORWARD["masked-lm"] = lambda *a: called.append(1) or original(*a)
        model(**inputs)
        assert called == [1]
        model(**inputs, trace=refimpl.Trace())
        model.to("numpy")(**inputs)
        assert called == [1]
    finally:
        fast.FORWARD["masked-lm"] = original
    traced = refimpl.Trace()
    want = tasks.masked_lm(model.params, model.config, x, traced)
    np.testing.assert_array_equal(model(**inputs, trace=refimpl.Trace()).logits, want.logits)


def test_fast_decoding_cache_is_the_reference_cache_type():
    model = random_model("causal-lm", seed=8, is_decoder=True)
    out = model(input_ids=[[0, 5, 6]], use_cache=True)
    assert isinstance(out.past_key_values, type(empty_cache(model.config, 1, model.dtype, model.xp)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("heads", [4, 1])
def test_one_sequence_in_token_halves_matches_the_reference(monkeypatch, task, dtype, heads):
    """One sequence runs as two token halves on two threads that meet at the attention (each
    thread half the heads); held to the reference, padded rows and the causal mask included."""
    from refimpl.fast import schedule

    monkeypatch.setattr(fast, "TOKEN_SPLIT_FROM", 2)
    monkeypatch.setattr(fast, "SPLIT_MIN_WORK", 0)  # a tiny model's work is too small otherwise
    monkeypatch.setattr(fast, "SPLIT_MIN_ROWS", 0)
    calls = []
    run_two = schedule.run_two
    monkeypatch.setattr(fast, "run_two", lambda fn: calls.append(1) or run_two(fn))
    model = random_model(task, seed=3, is_decoder=task == "causal-lm", num_attention_heads=heads).astype(dtype)
    reference = model.to("numpy")
    inputs = task_inputs(task, model.config, np.random.default_rng(2))
    for row in (0, 1, 2):  # full, right-padded, left-padded
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        if task == "multiple-choice":  # one choice of one question: one sequence
            one = {k: v[:, :1] if v.ndim == 3 else np.zeros(1, np.int64) for k, v in one.items()}
        for extra in ({}, {"output_hidden_states": True}):
            n = assert_outputs_match(model(**one, **extra), reference(**one, **extra), dtype)
            assert n >= (2 if not extra else 2 + model.config.num_hidden_layers)
    assert calls  # the split was tried (it runs where OpenBLAS's threads can be set)


def test_token_halves_a_failing_part_raises_and_does_not_hang(monkeypatch):
    from refimpl.fast import schedule

    monkeypatch.setattr(fast, "TOKEN_SPLIT_FROM", 2)
    monkeypatch.setattr(fast, "SPLIT_MIN_WORK", 0)
    monkeypatch.setattr(fast, "SPLIT_MIN_ROWS", 0)
    model = random_model("base", seed=4)
    real = fast.feed_forward_block
    calls = []

    def fails_in_one_thread(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(fast, "feed_forward_block", fails_in_one_thread)
    if schedule.run_two(lambda part: part) is None:
        pytest.skip("no two-thread split here")
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=np.arange(3, 14)[None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_first_token_states_match_the_full_encoders_first_position(monkeypatch, dtype, act):
    """The reference's and the fast path's first-position shortcut (the last block on position 0
    only, what a classifier or an <s> embedding reads) against the full encoder's
    ``last_hidden_state[:, 0]``: a padded batch with token types, whole and in two halves."""
    model = random_model("base", seed=7, hidden_act=act).astype(dtype)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 99, size=(5, 11))
    mask = np.ones_like(ids)
    for i, n in enumerate([11, 7, 3, 11, 1]):
        mask[i, n:] = 0
        ids[i, n:] = model.config.pad_token_id
    x = validate(model, input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, size=ids.shape))
    want = tasks.encoder_forward(model.params, model.config, x).last_hidden_state[:, 0]  # [B, H]
    got = tasks.first_token_states(model.params, model.config, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    # Only the GEMMs' row counts differ: float64 to ~1e-15, float32 within rounding.
    assert_close(got, want, dtype, "reference first_token_states", REORDERED)
    monkeypatch.setattr(fast, "worth_splitting", lambda *a, **k: True)
    assert_close(fast.first_token_states(model.params, model.config, x), want, dtype, "fast first_token_states", FAST)


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_pieces_fit_the_packed_rows_and_balance_the_two_threads(monkeypatch, isa):
    """A split batch's pieces: at most PIECE_TOKENS tokens each (fewer where the packed kernel's ISA
    keeps PACKED_ROWS lower), as
    many as make an even count where the batch divides (32 sequences of 20 tokens: 4 pieces of 8,
    not 12, 12 and 8, which left one thread the last piece alone); halves when a half fits; one
    sequence a piece for longer sequences up to PACKED_ROWS; None beyond."""
    from types import SimpleNamespace

    from refimpl.fast import schedule

    rows_by_dtype = schedule._PACKED_ROWS_BY_ISA[isa]
    monkeypatch.setattr(fast, "PACKED_ROWS", rows_by_dtype)
    model = random_model("base", seed=1).astype("float32")
    rows = rows_by_dtype[np.dtype(np.float32)]
    piece_rows = min(fast.PIECE_TOKENS, rows)

    def pieces(b, t):
        return fast.pieces(model.params, SimpleNamespace(position_ids=np.zeros((b, t), np.int64)))

    if isa in ("avx512", "avx2"):  # pieces of up to 256 tokens (float32)
        assert [pieces(32, 20), pieces(8, 15), pieces(8, 128), pieces(32, 128), pieces(5, 100)] == [8, 4, 2, 2, 2]
    if isa == "avx512":  # single sequences up to 512 tokens a piece
        assert [pieces(4, 257), pieces(4, 512), pieces(2, 384)] == [1, 1, 1]
    if isa == "avx2":
        assert pieces(8, 257) is None  # (halves through OpenBLAS)
    if isa == "generic":  # 16 rows: pieces of one sequence up to 16 tokens, halves beyond
        assert [pieces(8, 8), pieces(8, 16), pieces(8, 17)] == [2, 1, None]
    assert pieces(3, rows + 1) is None and pieces(3, 0) is None
    for b in range(2, 41):
        for t in range(1, rows + 1, 7):
            p = pieces(b, t)
            assert 1 <= p and (p * t <= piece_rows or p == 1 and t <= rows), (b, t, p)


def padded_batch(model, rng, lengths, t: int, left=()):
    """Random ids [B, T] with the given real lengths, padded on the right (rows in ``left`` on the
    left), pads set to pad_token_id; -> (ids, mask)."""
    ids = rng.integers(3, 99, size=(len(lengths), t))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(t - n, t) if i in left else slice(0, n)
        mask[i, cols] = 1
    ids[mask == 0] = model.config.pad_token_id
    return ids, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
def test_states_at_match_the_full_encoders_states(monkeypatch, dtype, split):
    """fast.token_states (padding left out of every block, the last block on the kept positions
    only) against the reference encoder's ``last_hidden_state[keep]``: right- and left-padded rows,
    a key masked inside a row, a row with every key masked, a row with nothing kept, kept positions
    on padding (computed as the full encoder computes them), one and several kept per row; whole and
    split over two threads."""
    model = random_model("base", seed=13).astype(dtype)
    rng = np.random.default_rng(8)
    ids, mask = padded_batch(model, rng, [12, 7, 3, 12, 5, 9, 1], 12, left={2})
    mask[3, 4] = 0  # a key masked inside the row
    mask[5] = 0  # every key masked
    x = validate(model, input_ids=ids, attention_mask=mask, token_type_ids=rng.integers(0, 2, size=ids.shape))
    full = tasks.encoder_forward(model.params, model.config, x).last_hidden_state  # [B, T, H]
    keep = np.zeros(ids.shape, bool)
    keep[:, 0] = True  # <s> of the right-padded rows; padding of the left-padded row 2
    keep[0, [3, 5, 11]] = keep[1, 6] = keep[2, 11] = keep[3, 4] = keep[5, 2] = keep[6, 7] = True
    keep[4] = False  # a row nothing is read from
    if split:
        monkeypatch.setattr(fast, "worth_splitting", lambda *a, **k: True)
    rows, real_ffn = [], fast.feed_forward_block
    monkeypatch.setattr(fast, "feed_forward_block", lambda h, *a, **k: rows.append(h.shape[0]) or real_ffn(h, *a, **k))
    got = fast.token_states(model.params, model.config, x, keep)
    assert got.shape == (int(keep.sum()), model.config.hidden_size) and got.dtype == full.dtype
    # The FFNs ran on the needed tokens only: the real ones of the rows read and the padding kept
    # (12 + 7 + 3 + 1 [a pad kept] + 12 + 12 [every key masked] + 0 + 1 + 1 [a pad kept]); the last
    # one on the kept positions (each half its share, when split).
    assert model.config.num_hidden_layers == 2 and sum(rows) == 49 + int(keep.sum()), rows
    assert_close(got, full[keep], dtype, "states at keep", FAST)
    every = mask != 0
    assert_close(fast.token_states(model.params, model.config, x, every), full[every], dtype, "real tokens", FAST)


def test_needed_tokens_leave_out_what_no_kept_state_depends_on():
    """Padding (a key every head masks) is needed only where kept; a row that masks every key, any
    bias that is not a padding mask, or no bias, needs every position of a row something is kept in."""
    low = np.finfo(np.float32).min
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    bias = np.where(mask != 0, 0, low).astype(np.float32)[:, None, None, :]  # [B, 1, 1, S]
    keep = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    want = np.array([[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(fast.needed_tokens(bias, keep), want)
    rows = np.array([[1] * 4, [1] * 4, [1] * 4, [0] * 4], bool)
    np.testing.assert_array_equal(fast.needed_tokens(None, keep), rows)
    causal = np.broadcast_to(bias, (4, 1, 4, 4))  # a bias per query: nothing left out
    np.testing.assert_array_equal(fast.needed_tokens(causal, keep), rows)
    other = np.where(mask != 0, 0, -1e4).astype(np.float32)[:, None, None, :]  # an additive float mask
    np.testing.assert_array_equal(fast.needed_tokens(other, keep), rows)
    heads = np.concatenate([bias, np.zeros_like(bias)], axis=1)  # [B, 2, 1, S]: one head sees every key
    np.testing.assert_array_equal(fast.needed_tokens(heads, keep), rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_states_at_with_a_bias_per_query(dtype):
    """A 4-D mask (a bias row per query): nothing is left out, and each kept query attends with its
    own row of the bias."""
    model = random_model("base", seed=17).astype(dtype)
    rng = np.random.default_rng(9)
    ids = rng.integers(3, 99, size=(3, 8))
    allowed = rng.random((3, 1, 8, 8)) < 0.6
    allowed[..., 0] = True  # every query sees at least one key
    x = validate(model, input_ids=ids, attention_mask=allowed)
    full = tasks.encoder_forward(model.params, model.config, x).last_hidden_state  # [B, T, H]
    keep = np.zeros(ids.shape, bool)
    keep[0, [1, 6]] = keep[1, 0] = keep[2, [2, 3, 7]] = True
    assert_close(fast.token_states(model.params, model.config, x, keep), full[keep], dtype, "states at keep", FAST)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_parts_multiply_with_packed_weights_and_match_the_reference(monkeypatch, dtype):
    """In a part of a split (one thread per core) the GEMMs of up to PACKED_ROWS rows use the weights
    packed once (refimpl.fast.packed); the outputs stay within FAST of the reference."""
    from refimpl.fast import schedule

    model = random_model("masked-lm", seed=11).astype(dtype)
    reference = model.to("numpy")
    calls = []
    real = schedule.packed_linear
    monkeypatch.setattr(schedule, "packed_linear",
                        lambda x, p, b=None, cores=1: calls.append((x.shape[0], cores)) or real(x, p, b, cores=cores))
    monkeypatch.setattr(fast, "worth_splitting", lambda *a, **k: True)
    ids = np.random.default_rng(5).integers(3, 99, size=(4, 9))
    got, want = model(input_ids=ids), reference(input_ids=ids)
    if schedule.run_two(lambda i: i) is None:
        pytest.skip("no split here (one core, or no control over OpenBLAS's threads)")
    # parts of 2 x 9 rows (pieces of one sequence where PACKED_ROWS < 18: the generic tiles'), one core each
    assert calls and set(calls) == {(min(18, schedule.PACKED_ROWS[np.dtype(dtype)] // 9 * 9), 1)}
    assert_close(got.logits, want.logits, dtype, "logits", FAST)


def test_packed_weights_are_made_once_per_array_and_forgotten_with_it():
    from refimpl.fast import schedule

    w = np.random.default_rng(0).standard_normal((40, 24)).astype(np.float32)
    p = schedule.packed_weight(w)
    assert schedule.packed_weight(w) is p and schedule.packed_weight(w.copy()) is not p
    key = id(w)
    del w
    assert key not in schedule._packed


def test_packing_a_mapped_weight_releases_its_resident_pages(tmp_path):
    """A weight mapped from a checkpoint file is released from memory once packed (the packed copy
    replaces it in the split schedule; other schedules fault it back in): resident memory grows by
    about nothing, not by the weight's size, and the weight still reads the same."""
    from refimpl.fast import schedule
    from refimpl.io import read_safetensors, write_safetensors

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))

    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: resident memory is not readable here")
    want = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)  # 16 MiB
    write_safetensors(tmp_path / "w.safetensors", {"w": want})
    w = read_safetensors(tmp_path / "w.safetensors")[0]["w"]
    assert float(w.sum()) == float(want.sum())  # every page resident now
    before = rss_mib()
    schedule.packed_weight(w)
    assert rss_mib() - before < 8  # +16 MiB packed, -16 MiB of the map's pages
    np.testing.assert_array_equal(w, want)  # faulted back in from the file
    assert schedule.release_mapped_pages(want) is False  # an array in memory: left alone
