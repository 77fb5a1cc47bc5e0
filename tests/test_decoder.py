"""Decoder mode: the KV cache, cross-attention with a cache, and generation, against transformers.

- A left-padded batch run in k chunks through the cache equals one full pass (same positions), and
  equals transformers run in the same chunks with its own cache (``cache=``, transformers 5.x).
- Greedy :func:`refimpl.generate` equals a step-by-step greedy loop over transformers' full forward.
- ``position_style="zero-based"`` equals transformers' ``model.generate()`` token for token.
- Sampling is reproducible with a seed; top-k / top-p filter as documented; EOS stops per row.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

import refimpl
from conftest import TINY, build_hf, save_hf
from refimpl.cache import KVCache, append, copy_cache, empty_cache
from refimpl.encoder import position_ids_from_input_ids
from refimpl.generate import GenerationError, filter_logits, generate, sample
from refimpl.model import InputError
from tolerances import CACHED, assert_close, max_scaled_error

pytestmark = pytest.mark.usefixtures("fast_by_default")  # loading's default backend is the fast path here

PAD, EOS = 1, 2
V, H = TINY["vocab_size"], TINY["hidden_size"]
DTYPES = ["float64", "float32"]


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """``get(layers, cross, seed) -> (hf float64, folder)``, built once per module."""
    made = {}

    def get(layers: int = 2, cross: bool = False, seed: int = 0):
        key = (layers, cross, seed)
        if key not in made:
            hf = build_hf("causal-lm", seed=seed, num_hidden_layers=layers, add_cross_attention=cross)
            made[key] = (hf, save_hf(hf, tmp_path_factory.mktemp(f"dec-{layers}-{int(cross)}-{seed}")))
        return made[key]

    return get


def left_padded(rng, lengths, total):
    """ids [B, total] with each row's ``lengths[b]`` random tokens on the right, pads on the left."""
    b = len(lengths)
    ids = np.full((b, total), PAD, dtype=np.int64)
    mask = np.zeros((b, total), dtype=np.int64)
    for i, n in enumerate(lengths):
        ids[i, total - n :] = rng.integers(3, V, size=n)
        mask[i, total - n :] = 1
    return ids, mask


def random_chunks(rng, total, k):
    cuts = sorted(rng.choice(np.arange(1, total), size=k - 1, replace=False).tolist()) if k > 1 else []
    bounds = [0, *cuts, total]
    return list(zip(bounds[:-1], bounds[1:]))


def ours_in_chunks(model, ids, mask, chunks, positions=None, enc=None, emask=None, output_attentions=False):
    """Feed the chunks through the cache; the encoder states only on the first call (they are cached)."""
    cache, outs = None, []
    for a, b in chunks:
        out = model(
            input_ids=ids[:, a:b], attention_mask=mask[:, :b],
            position_ids=None if positions is None else positions[:, a:b],
            encoder_hidden_states=enc if a == 0 else None, encoder_attention_mask=emask if a == 0 else None,
            past_key_values=cache, use_cache=True, output_attentions=output_attentions,
        )
        assert isinstance(out.past_key_values, KVCache)
        assert out.cache is out.past_key_values
        cache = out.past_key_values
        outs.append(out)
    return outs, cache


def hf_in_chunks(hf, dtype, ids, mask, chunks, positions=None, enc=None, emask=None):
    """transformers with its own cache (passed back as ``cache=``), encoder states on every call as it needs."""
    m = hf.to(getattr(torch, dtype))
    t = lambda a: None if a is None else torch.from_numpy(a if a.dtype.kind != "f" else a.astype(dtype))
    cache, outs = None, []
    with torch.no_grad():
        for a, b in chunks:
            out = m(
                input_ids=t(ids[:, a:b]), attention_mask=t(mask[:, :b]),
                position_ids=None if positions is None else t(positions[:, a:b]),
                encoder_hidden_states=t(enc), encoder_attention_mask=t(emask),
                cache=cache, use_cache=True, output_attentions=True,
            )
            cache = out.cache
            outs.append(out)
    hf.double()
    return outs


# ---------------------------------------------------------------------------------------------
# The cache data structure
# ---------------------------------------------------------------------------------------------


def test_append_grows_geometrically_and_returns_views():
    cfg = refimpl.Config(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    cache = empty_cache(cfg, 2, np.float64, np)
    layer = cache.layers[0]
    rng = np.random.default_rng(0)
    ref_k = np.zeros((2, 2, 0, 4))
    buffers = []  # the arrays themselves: an id() of a freed buffer can be reused
    for step in range(100):
        k = rng.normal(size=(2, 2, 1 if step else 5, 4))
        keys, values = append(layer, k, 2 * k)
        ref_k = np.concatenate([ref_k, k], axis=2)
        if not any(layer.keys is b for b in buffers):
            buffers.append(layer.keys)
        assert keys.shape == (2, 2, ref_k.shape[2], 4) and np.shares_memory(keys, layer.keys)
        np.testing.assert_array_equal(keys, ref_k)
        np.testing.assert_array_equal(values, 2 * ref_k)
    assert cache.length == 104 and layer.capacity == 128
    assert len(buffers) == 4  # 16 -> 32 -> 64 -> 128: log2 reallocations, not one per step
    branch = copy_cache(cache)
    append(branch.layers[0], np.ones((2, 2, 1, 4)), np.ones((2, 2, 1, 4)))
    assert cache.length == 104 and branch.length == 105


def test_preallocated_cache_never_reallocates():
    cfg = refimpl.Config(hidden_size=8, num_attention_heads=2, num_hidden_layers=2)
    cache = empty_cache(cfg, 1, np.float32, np, capacity=10)
    buf = cache.layers[1].keys
    for _ in range(10):
        append(cache.layers[1], np.ones((1, 2, 1, 4), np.float32), np.ones((1, 2, 1, 4), np.float32))
    assert cache.layers[1].keys is buf and buf.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Chunks through the cache == one full pass == transformers with its cache
# ---------------------------------------------------------------------------------------------

CASES = [(1, False, 11), (2, False, 12), (3, False, 13), (1, True, 21), (2, True, 22), (3, True, 23)]


@pytest.mark.parametrize("layers,cross,seed", CASES)
def test_chunks_through_cache(decoders, layers, cross, seed):
    hf, folder = decoders(layers, cross, seed)
    rng = np.random.default_rng(seed)
    total = 11
    ids, mask = left_padded(rng, [total, total - 4, 3], total)
    enc = emask = None
    if cross:
        enc = rng.normal(size=(3, 5, H))
        emask = np.ones((3, 5), dtype=np.int64)
        emask[1, 3:] = 0
    positions = position_ids_from_input_ids(ids, PAD)  # what one full pass gives every token
    real = mask.astype(bool)
    for dtype in DTYPES:
        model = refimpl.from_pretrained(folder, dtype=dtype)
        e = None if enc is None else enc.astype(dtype)
        full = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=e, encoder_attention_mask=emask)
        for k in (2, 3, 4):
            chunks = random_chunks(rng, total, k)
            outs, cache = ours_in_chunks(model, ids, mask, chunks, positions, e, emask)
            assert cache.length == total and cache.layers[0].keys.dtype == np.dtype(dtype)
            assert cache.layers[0].keys.shape[:2] == (3, TINY["num_attention_heads"])
            logits = np.concatenate([o.logits for o in outs], axis=1)  # [B, T, V]
            assert logits.dtype == np.dtype(dtype)
            # Padding queries see no key at all: their softmax is uniform over however many keys the
            # call has, so their (meaningless) outputs depend on the chunking. Compare real tokens.
            assert_close(logits[real], full.logits[real], dtype, f"chunks {chunks} vs full")
            if dtype == "float64":
                err = max_scaled_error(logits[real], full.logits[real])
                assert err <= CACHED["float64"], f"observed {err:.1e}"

        # transformers with its own cache, same chunks: default positions (cumsum + cache length,
        # computed from each call's ids) and explicit ones, every position, every output.
        chunks = random_chunks(rng, total, 3)
        for pos in (None, positions):
            ours, _ = ours_in_chunks(model, ids, mask, chunks, pos, e, emask, output_attentions=True)
            theirs = hf_in_chunks(hf, dtype, ids, mask, chunks, pos, enc, emask)
            for o, t in zip(ours, theirs):
                assert_close(o.logits, t.logits.numpy(), dtype, "logits vs transformers cache")
                for i in range(layers):
                    assert_close(o.attentions[i], t.attentions[i].numpy(), dtype, f"attentions[{i}]")
                    if cross:
                        assert o.cross_attentions[i].shape == (3, TINY["num_attention_heads"], o.logits.shape[1], 5)
                        assert_close(o.cross_attentions[i], t.cross_attentions[i].numpy(), dtype, f"cross_attentions[{i}]")
                    else:
                        assert o.cross_attentions is None


def test_default_positions_follow_transformers_not_the_full_pass(decoders):
    """With a cache, positions are ``(cumsum(ids != pad) + P) * (ids != pad) + pad``, P counting the
    cached pads: a left-padded row then gets other positions than in one full pass (docs/decoder.md)."""
    hf, folder = decoders(2, False, 12)
    model = refimpl.from_pretrained(folder, dtype="float64")
    ids, mask = left_padded(np.random.default_rng(0), [6, 3], 6)
    full = model(input_ids=ids, attention_mask=mask)
    outs, _ = ours_in_chunks(model, ids, mask, [(0, 4), (4, 6)])
    step = outs[1].logits  # [B, 2, V]
    assert max_scaled_error(step[0], full.logits[0, 4:]) <= CACHED["float64"]  # no padding
    assert max_scaled_error(step[1], full.logits[1, 4:]) > 1e-3  # positions 3 + 4 + ... instead of 3, 4


def test_cache_arguments(decoders):
    hf, folder = decoders(2, False, 12)
    model = refimpl.from_pretrained(folder, dtype="float64")
    ids = [[0, 5, 6, 7]]
    out = model(input_ids=ids)  # use_cache defaults to config.use_cache for decoders
    assert isinstance(out.past_key_values, KVCache) and out.past_key_values.length == 4
    assert model(input_ids=ids, use_cache=False).past_key_values is None
    assert model(input_ids=ids, labels=ids).past_key_values is None  # as transformers: no cache with labels
    step = model(input_ids=[[9]], cache=out.past_key_values)  # transformers 5.x's name
    assert step.past_key_values.length == 5
    ref = model(input_ids=[[0, 5, 6, 7, 9]]).logits[:, -1]
    assert max_scaled_error(step.logits[:, -1], ref) <= CACHED["float64"]
    with pytest.raises(InputError, match="not both"):
        model(input_ids=[[9]], cache=step.past_key_values, past_key_values=step.past_key_values)
    with pytest.raises(InputError, match=r"covers the cached and the new positions: shape \[1, 6\]"):
        model(input_ids=[[9]], attention_mask=[[1]], past_key_values=step.past_key_values)
    with pytest.raises(InputError, match="must be a refimpl KVCache"):
        model(input_ids=[[9]], past_key_values=((np.zeros(1), np.zeros(1)),))
    with pytest.raises(InputError, match="batch 1"):
        model(input_ids=[[9], [9]], past_key_values=step.past_key_values)
    # Encoders never return a cache and refuse one.
    encoder = refimpl.Model(dataclasses.replace(model.config, is_decoder=False), model.params, "base")
    assert encoder(input_ids=ids, use_cache=True).past_key_values is None
    with pytest.raises(InputError, match="needs a decoder"):
        encoder(input_ids=ids, past_key_values=out.past_key_values)
    masked = refimpl.Model(model.config, model.params, "masked-lm")
    with pytest.raises(InputError, match="base and causal-lm tasks"):
        masked(input_ids=ids, past_key_values=out.past_key_values)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def hf_greedy_loop(hf, dtype, ids, mask, max_new, eos=EOS, pad=PAD, enc=None, emask=None):
    """Greedy by full recompute: transformers' forward (RoBERTa positions from the ids), mask + 1s."""
    m = hf.to(getattr(torch, dtype))
    cur, cm = ids.copy(), mask.copy()
    unfinished = np.ones(len(ids), dtype=bool)
    t = lambda a: None if a is None else torch.from_numpy(a if a.dtype.kind != "f" else a.astype(dtype))
    with torch.no_grad():
        for _ in range(max_new):
            logits = m(input_ids=t(cur), attention_mask=t(cm), encoder_hidden_states=t(enc),
                       encoder_attention_mask=t(emask), use_cache=False).logits[:, -1].numpy()
            tok = np.where(unfinished, logits.argmax(-1), pad)
            cur = np.concatenate([cur, tok[:, None]], axis=1)
            cm = np.concatenate([cm, np.ones((len(ids), 1), dtype=np.int64)], axis=1)
            if eos is not None:
                unfinished &= tok != eos
                if not unfinished.any():
                    break
    hf.double()
    return cur


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cross", [False, True])
def test_greedy_equals_full_recompute_loop(decoders, dtype, cross):
    hf, folder = decoders(2, cross, 31)
    model = refimpl.from_pretrained(folder, dtype=dtype)
    rng = np.random.default_rng(31)
    ids, mask = left_padded(rng, [7, 4, 2, 5], 7)
    enc = rng.normal(size=(4, 3, H)) if cross else None
    emask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]) if cross else None
    ours = generate(model, ids, mask, max_new_tokens=12,
                    encoder_hidden_states=None if enc is None else enc.astype(dtype), encoder_attention_mask=emask)
    theirs = hf_greedy_loop(hf, dtype, ids, mask, 12, enc=enc, emask=emask)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cross", [False, True])
def test_zero_based_equals_transformers_generate(decoders, dtype, cross):
    import transformers

    hf, folder = decoders(2, cross, 41)
    model = refimpl.from_pretrained(folder, dtype=dtype)
    rng = np.random.default_rng(41)
    ids, mask = left_padded(rng, [6, 3, 5], 6)
    kw, ours_kw = {}, {}
    if cross:
        enc = rng.normal(size=(3, 4, H))
        emask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
        ours_kw = dict(encoder_hidden_states=enc.astype(dtype), encoder_attention_mask=emask)
        # transformers' generate makes a DynamicCache, which its cross-attention cannot use: pass
        # the encoder-decoder cache it needs.
        kw = dict(encoder_hidden_states=torch.from_numpy(enc.astype(dtype)), encoder_attention_mask=torch.from_numpy(emask),
                  cache=transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache()))
    ours = generate(model, ids, mask, max_new_tokens=10, position_style="zero-based", **ours_kw)
    m = hf.to(getattr(torch, dtype))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = m.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                            max_new_tokens=10, do_sample=False, **kw).numpy()
    hf.double()
    np.testing.assert_array_equal(ours, theirs)


def test_position_styles_differ(decoders):
    """transformers' generate numbers positions from 0; RoBERTa's forward from pad + 1."""
    hf, folder = decoders(2, False, 41)
    model = refimpl.from_pretrained(folder, dtype="float64")
    ids, mask = left_padded(np.random.default_rng(41), [6, 3, 5], 6)
    roberta_pos = position_ids_from_input_ids(ids, PAD)
    zero_pos = np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1)
    np.testing.assert_array_equal(roberta_pos[0], [2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(zero_pos[1], [0, 0, 0, 0, 1, 2])
    a = model(input_ids=ids, attention_mask=mask, position_ids=roberta_pos, logits_to_keep=1).logits[:, -1]
    b = model(input_ids=ids, attention_mask=mask, position_ids=zero_pos, logits_to_keep=1).logits[:, -1]
    assert max_scaled_error(a, b) > 0.1  # first-step logits differ measurably (docs/decoder.md)
    g_roberta = generate(model, ids, mask, max_new_tokens=10)
    g_zero = generate(model, ids, mask, max_new_tokens=10, position_style="zero-based")
    assert not np.array_equal(g_roberta, g_zero)


def test_eos_stops_each_row(decoders):
    hf, folder = decoders(2, False, 31)
    model = refimpl.from_pretrained(folder, dtype="float64")
    ids, mask = left_padded(np.random.default_rng(31), [7, 4, 2, 5], 7)
    free = generate(model, ids, mask, max_new_tokens=12, eos_token_id=None)
    assert free.shape == (4, 19)
    eos = int(free[0, 7 + 2])  # row 0's third new token becomes the EOS
    got = generate(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=59)
    stops = []
    for row in range(4):
        new = free[row, 7:]
        hit = np.flatnonzero(new == eos)
        stop = hit[0] + 1 if hit.size else 12
        stops.append(stop)
        np.testing.assert_array_equal(got[row, 7 : 7 + stop], new[:stop])  # same tokens up to and with EOS
        assert np.all(got[row, 7 + stop :] == 59)  # then pad
    assert got.shape[1] == 7 + max(stops)  # generation ends when every row has finished
    # A list of EOS ids: stopping at any of them.
    got2 = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[57, eos], pad_token_id=59)
    assert got2.shape[1] <= got.shape[1]


def test_sampling_is_reproducible(decoders):
    hf, folder = decoders(2, False, 31)
    model = refimpl.from_pretrained(folder, dtype="float32")
    ids, mask = left_padded(np.random.default_rng(31), [7, 4, 2], 7)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=3.0, top_k=20, top_p=0.95, eos_token_id=None)
    a = generate(model, ids, mask, seed=123, **kw)
    b = generate(model, ids, mask, seed=123, **kw)
    c = generate(model, ids, mask, seed=124, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (3, 17)


def test_filter_logits_by_hand():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.0]])
    ninf = -np.inf
    np.testing.assert_array_equal(filter_logits(logits, top_k=2), [[ninf, 3.0, ninf, 3.0, ninf]])
    np.testing.assert_array_equal(filter_logits(logits, top_k=3), [[ninf, 3.0, 2.0, 3.0, ninf]])  # ties kept
    np.testing.assert_array_equal(filter_logits(logits, top_k=99), logits)
    p = np.log(np.array([[0.05, 0.5, 0.15, 0.3]]))
    np.testing.assert_array_equal(np.isfinite(filter_logits(p, top_p=0.45)), [[False, True, False, False]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(p, top_p=0.7)), [[False, True, False, True]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(p, top_p=0.85)), [[False, True, True, True]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(p, top_p=1.0)), [[True, True, True, True]])
    # top-k first, then top-p renormalised over what is left: {0.5, 0.3} -> {0.625, 0.375}
    np.testing.assert_array_equal(np.isfinite(filter_logits(p, top_k=2, top_p=0.6)), [[False, True, False, False]])
    np.testing.assert_array_equal(np.isfinite(filter_logits(p, top_k=2, top_p=0.65)), [[False, True, False, True]])
    with pytest.raises(GenerationError, match="top_p"):
        filter_logits(p, top_p=0.0)
    with pytest.raises(GenerationError, match="top_k"):
        filter_logits(p, top_k=0)


def test_filter_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)) * 3
    for k, p in [(5, None), (None, 0.9), (10, 0.5), (None, 0.3)]:
        t = torch.from_numpy(logits.copy())
        if k is not None:
            t = TopKLogitsWarper(k)(None, t)
        if p is not None:
            t = TopPLogitsWarper(p)(None, t)
        np.testing.assert_array_equal(np.isfinite(filter_logits(logits, k, p)), np.isfinite(t.numpy()))


def test_sample_follows_the_distribution_and_never_draws_filtered():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    logits = np.log(np.where(probs > 0, probs, 1e-300))[None, :].repeat(20000, 0)
    logits[:, 1] = -np.inf
    draws = sample(logits, np.random.default_rng(0))
    freq = np.bincount(draws, minlength=4) / draws.size
    assert freq[1] == 0
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_generate_errors(decoders):
    hf, folder = decoders(2, False, 12)
    model = refimpl.from_pretrained(folder, dtype="float64")
    with pytest.raises(GenerationError, match="pad prompts on the LEFT"):
        generate(model, [[0, 5, 1], [0, 5, 6]], attention_mask=[[1, 1, 0], [1, 1, 1]])
    with pytest.raises(GenerationError, match="position_style"):
        generate(model, [[0, 5]], position_style="bert")
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        generate(model, [[0, 5]], max_new_tokens=100)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [[0, 5]], do_sample=True, temperature=0)
    with pytest.raises(GenerationError, match="2-D"):
        generate(model, [0, 5])
    mlm = refimpl.Model(model.config, model.params, "base")
    with pytest.raises(GenerationError, match="causal-lm"):
        generate(mlm, [[0, 5]])
    # The pad mask is inferred from the ids when none is given, as transformers does.
    ids = np.array([[1, 1, 0, 5], [0, 7, 8, 9]])
    np.testing.assert_array_equal(
        generate(model, ids, max_new_tokens=4), generate(model, ids, (ids != 1).astype(int), max_new_tokens=4)
    )
    assert generate(model, ids, max_new_tokens=0).shape == (2, 4)


def test_help_of_generate_shows_readable_defaults():
    """help(refimpl.generate) names the config default, not an object address."""
    import inspect
    import pydoc

    text = pydoc.render_doc(refimpl.generate, renderer=pydoc.plaintext)
    assert "object at 0x" not in text and "eos_token_id=FROM_CONFIG" in text
    assert "object at" not in str(inspect.signature(refimpl.generate))
