"""The Numba fast paths (refimpl.kernels) against their NumPy definitions (refimpl.ops).

Tolerances are in ulps of the dtype, from the table below; the kernels are far closer to the
definitions than tests/tolerances.py's model-level table, so they get their own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import ops
from refimpl.fast import elementary, kernels, llvm, packed, reductions, schedule
from refimpl.backend import erf as libm_erf
from tolerances import KERNEL_ULPS

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# Largest difference allowed, in ulps (units in the last place) of the dtype: the one tolerance
# table's kernel entries (refimpl.tolerances.KERNEL_ULPS, each with its measured maximum).
ULPS = {name: {F32: tol["float32"], F64: tol["float64"]} for name, tol in KERNEL_ULPS.items()}
# LayerNorm and the residual add are computed with the very operations, in the very order, of
# the NumPy definitions (including NumPy's pairwise summation), so they must match bitwise.

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None)
DTYPES = st.sampled_from([F32, F64])
# Row lengths around NumPy's pairwise-summation boundaries (8-way unroll, 128-element blocks).
ROW = st.sampled_from([1, 2, 7, 8, 9, 15, 16, 64, 127, 128, 129, 200, 256, 300, 768, 1000])


def _layout(a: np.ndarray, kind: str) -> np.ndarray:
    """The same values as ``a`` in another memory layout (the kernels accept any)."""
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":  # every other element of a twice-as-long last axis
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        wide[..., ::2] = a
        return wide[..., ::2]
    return a


LAYOUTS = st.sampled_from(["c", "fortran", "strided"])


@st.composite
def leading(draw, max_dims=3):
    """Leading (batch-like) axes, size-1 axes included."""
    return tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=0, max_size=max_dims)))


def _assert_max_ulp(actual, desired, maxulp, what):
    assert actual.shape == desired.shape and actual.dtype == desired.dtype, what
    np.testing.assert_array_max_ulp(actual, desired, maxulp=maxulp, dtype=actual.dtype)


# ---------------------------------------------------------------------------------------------
# bias_gelu
# ---------------------------------------------------------------------------------------------


def _assert_gelu_close(got, y, b, dtype):
    z = y + b if b is not None else y
    want = ops.gelu(z)
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = ULPS["gelu"][dtype] * np.finfo(dtype).eps * np.abs(z.astype(np.float64))
    bad = ~(err <= bound)
    assert not bad.any(), f"gelu off at z={z[bad][:5]}: got {got[bad][:5]}, want {want[bad][:5]}"


@SETTINGS
@given(dtype=DTYPES, lead=leading(), h=ROW, scale=st.sampled_from([1e-3, 1.0, 3.0, 30.0]),
       bias=st.booleans(), layout=LAYOUTS, seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_bias_gelu_matches_ops_gelu(dtype, lead, h, scale, bias, layout, seed):
    rng = np.random.default_rng(seed)
    y = (scale * rng.standard_normal(lead + (h,))).astype(dtype)
    b = rng.standard_normal(h).astype(dtype) if bias else None
    got = kernels.bias_gelu(_layout(y, layout), b)
    _assert_gelu_close(got, y, b, dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bias_gelu_dense_grid_and_special_values(dtype):
    y = np.concatenate([
        np.linspace(-12, 12, 200_001, dtype=dtype),  # every branch of erf, both tails
        np.array([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30], dtype),
        np.array([np.finfo(dtype).tiny, np.finfo(dtype).max, -np.finfo(dtype).max], dtype),
    ])  # fmt: skip
    with np.errstate(over="ignore", invalid="ignore"):
        _assert_gelu_close(kernels.bias_gelu(y), y, None, dtype)
    special = np.array([np.inf, -np.inf, np.nan], dtype)
    with np.errstate(invalid="ignore"):
        want = ops.gelu(special)  # inf, nan, nan
        np.testing.assert_array_equal(kernels.bias_gelu(special), want)


def test_bias_gelu_in_place_and_out():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((4, 6, 32)).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    want = kernels.bias_gelu(y, b)
    out = np.empty_like(y)
    assert kernels.bias_gelu(y, b, out=out) is out
    np.testing.assert_array_equal(out, want)
    assert kernels.bias_gelu(y, b, out=y) is y
    np.testing.assert_array_equal(y, want)


# ---------------------------------------------------------------------------------------------
# erf and exp themselves (private helpers, held to libm's erf and NumPy's exp)
# ---------------------------------------------------------------------------------------------


@numba.njit
def _map_erf64(x, out):
    for i in range(x.shape[0]):
        out[i] = elementary._erf_f64(x[i])


@numba.njit
def _map_erf32(x, out):
    for i in range(x.shape[0]):
        out[i] = elementary._erf_f32(x[i])


def _map_erf(x, out):
    (_map_erf64 if x.dtype == F64 else _map_erf32)(x, out)


@numba.njit
def _map_exp(x, out):
    for i in range(x.shape[0]):
        out[i] = elementary._exp(x[i])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_erf_within_ulps_of_libm(dtype):
    x = np.concatenate([np.linspace(-7, 7, 1_400_001), np.geomspace(1e-300, 1e-3, 1000)])
    x = np.concatenate([x, -x]).astype(dtype)
    got = np.empty_like(x)
    _map_erf(x, got)
    _assert_max_ulp(got, libm_erf(x), ULPS["erf"][dtype], "erf")
    assert np.isnan(_erf_nan(dtype))


def _erf_nan(dtype):
    out = np.empty(1, dtype)
    _map_erf(np.array([np.nan], dtype), out)
    return out[0]


def test_erf_float32_is_correctly_rounded():
    x = np.random.default_rng(1).uniform(-4.5, 4.5, 200_000).astype(np.float32)
    got = np.empty_like(x)
    _map_erf(x, got)
    cr = np.array([math.erf(v) for v in x.astype(np.float64)]).astype(np.float32)
    assert np.mean(got == cr) > 0.9999
    np.testing.assert_array_max_ulp(got, cr, maxulp=1)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_exp_within_ulps_of_numpy(dtype):
    lo = -745.5 if dtype == F64 else -104.5
    x = np.concatenate([np.linspace(lo, 0.0, 1_000_001), np.linspace(0, 80, 10_001)]).astype(dtype)
    got = np.empty_like(x)
    _map_exp(x, got)
    _assert_max_ulp(got, np.exp(x), ULPS["exp"][dtype], "exp")
    special = np.array([0.0, -np.inf, np.inf, np.nan, -1e30, 1e30], dtype)
    got = np.empty_like(special)
    _map_exp(special, got)
    np.testing.assert_array_equal(got, [1.0, 0.0, np.inf, np.nan, 0.0, np.inf])


def test_exp_float32_is_correctly_rounded():
    """float32 exp is evaluated in float64 (relative error ~1e-12) and rounded once: the correctly
    rounded value (from an 80-bit or wider exp where NumPy has one) but for a few arguments in a
    million, then one ulp off; subnormal results included."""
    x = np.random.default_rng(2).uniform(-104.0, 89.0, 500_000).astype(np.float32)
    got = np.empty_like(x)
    _map_exp(x, got)
    cr = np.exp(x.astype(np.longdouble)).astype(np.float32)
    assert np.mean(got == cr) > 0.9999
    np.testing.assert_array_max_ulp(got, cr, maxulp=1)


# ---------------------------------------------------------------------------------------------
# layer_norm and residual_layer_norm
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(dtype=DTYPES, lead=leading(), h=ROW, offset=st.sampled_from([0.0, 1.0, 1e2, 1e4]),
       noise=st.sampled_from([1e-3, 1.0, 100.0]), eps=st.sampled_from([1e-12, 1e-5]),
       layout=LAYOUTS, seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_layer_norm_is_bitwise_ops_layer_norm(dtype, lead, h, offset, noise, eps, layout, seed):
    # offset + small noise exercises the cancellation in the variance: the kernel must take the
    # same two-pass route (mean, then centred squares) with the same summation order.
    rng = np.random.default_rng(seed)
    x = (offset + noise * rng.standard_normal(lead + (h,))).astype(dtype)
    w = rng.standard_normal(h).astype(dtype)
    b = rng.standard_normal(h).astype(dtype)
    got = kernels.layer_norm(_layout(x, layout), w, b, eps)
    want = ops.layer_norm(x, w, b, eps)
    assert got.shape == want.shape and got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(got, want)


@SETTINGS
@given(dtype=DTYPES, lead=leading(), h=ROW, with_bias=st.booleans(),
       offset=st.sampled_from([0.0, 1e4]), layout=LAYOUTS,
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_residual_layer_norm_is_bitwise(dtype, lead, h, with_bias, offset, layout, seed):
    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal(lead + (h,))).astype(dtype)
    r = rng.standard_normal(lead + (h,)).astype(dtype)
    rb = rng.standard_normal(h).astype(dtype) if with_bias else None
    w, b = rng.standard_normal(h).astype(dtype), rng.standard_normal(h).astype(dtype)
    got_h, got = kernels.residual_layer_norm(_layout(x, layout), r, w, b, 1e-5, r_bias=rb)
    want_h = x + (r + rb) if with_bias else x + r  # x + linear(...), linear adding its bias last
    np.testing.assert_array_equal(got_h, want_h)
    np.testing.assert_array_equal(got, ops.layer_norm(want_h, w, b, 1e-5))


def test_layer_norm_in_place_read_only_params_and_constant_rows():
    x = np.random.default_rng(0).standard_normal((3, 5, 96))
    x[1, 2] = 7.0  # a constant row: variance 0, output = bias
    w, b = np.full(96, 2.0), np.arange(96.0)
    w.flags.writeable = False  # as parameters mapped from a safetensors file are
    want = ops.layer_norm(x, w, b, 1e-5)
    assert kernels.layer_norm(x, w, b, 1e-5, out=x) is x
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(x[1, 2], b)
    h = np.ones((2, 96))
    got_h, _ = kernels.residual_layer_norm(h, np.ones((2, 96)), w, b, 1e-5, h_out=h)
    assert got_h is h and np.all(h == 2.0)


# ---------------------------------------------------------------------------------------------
# masked_softmax
# ---------------------------------------------------------------------------------------------


def _reference_softmax(s, mask, scale, dtype):
    scaled = s * dtype.type(scale)  # the attention: (q @ k^T) * (1/sqrt(D)), then + mask
    return ops.softmax(scaled + mask if mask is not None else scaled)


@st.composite
def softmax_case(draw):
    dtype = draw(DTYPES)
    b, n = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 4]))
    t = draw(st.sampled_from([1, 2, 5, 16]))
    s_len = draw(st.sampled_from([1, 2, 7, 8, 9, 64, 128, 129, 300]))
    mask_kind = draw(st.sampled_from(["none", "keys", "causal", "rows", "full", "flat"]))
    magnitude = draw(st.sampled_from([1.0, 10.0, 1e4]))
    scale = draw(st.sampled_from([1.0, 0.125, 1 / math.sqrt(48)]))
    return dtype, (b, n, t, s_len), mask_kind, magnitude, scale, draw(LAYOUTS), draw(
        st.integers(0, 2**32 - 1)
    )


def _make_mask(kind, b, t, s, dtype, rng):
    lo = np.finfo(dtype).min
    if kind == "none":
        return None
    if kind == "keys":  # padding: [B, 1, 1, S]
        keep = rng.random((b, 1, 1, s)) < 0.7
        keep[..., 0] = True
        return np.where(keep, 0.0, lo).astype(dtype)
    if kind == "causal":  # [B, 1, T, S], query i sees keys up to S - T + i
        i = np.arange(t)[:, None] + (s - t)
        return np.broadcast_to(np.where(np.arange(s)[None, :] <= i, 0.0, lo), (b, 1, t, s)).astype(
            dtype
        )
    if kind == "rows":  # [B, 1, T, S] with some rows masked everywhere
        m = np.where(rng.random((b, 1, t, s)) < 0.5, 0.0, lo).astype(dtype)
        m[:, :, ::2, :] = lo
        return m
    if kind == "full":  # everything masked: every row uniform
        return np.full((b, 1, t, s), lo, dtype)
    return np.where(rng.random(s) < 0.5, 0.0, lo).astype(dtype)  # "flat": [S]


@SETTINGS
@given(case=softmax_case())
def test_masked_softmax_matches_ops_softmax(case):
    dtype, (b, n, t, s), mask_kind, magnitude, scale, layout, seed = case
    rng = np.random.default_rng(seed)
    scores = (magnitude * rng.standard_normal((b, n, t, s))).astype(dtype)
    mask = _make_mask(mask_kind, b, t, s, dtype, rng)
    got = kernels.masked_softmax(_layout(scores, layout), mask, scale)
    want = _reference_softmax(scores, mask, scale, dtype)
    assert not np.isnan(got).any()
    _assert_max_ulp(got, want, ULPS["softmax"][dtype], "softmax")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_masked_softmax_fully_masked_rows_are_uniform(dtype):
    s = np.random.default_rng(0).standard_normal((2, 3, 4, 10)).astype(dtype) * 1e4
    mask = np.zeros((2, 1, 4, 10), dtype)
    mask[0, :, 1, :] = np.finfo(dtype).min
    mask[1] = np.finfo(dtype).min
    got = kernels.masked_softmax(s, mask, 0.125)
    np.testing.assert_array_equal(got[0, :, 1], np.full((3, 10), dtype.type(0.1)))
    np.testing.assert_array_equal(got[1], np.full((3, 4, 10), dtype.type(0.1)))
    _assert_max_ulp(got, _reference_softmax(s, mask, 0.125, dtype), ULPS["softmax"][dtype], "sm")


def test_masked_softmax_in_place_and_shapes():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 4, 12))
    mask = np.where(rng.random((2, 1, 1, 12)) < 0.5, 0.0, np.finfo(np.float64).min)
    want = kernels.masked_softmax(s, mask, 0.5)
    assert kernels.masked_softmax(s, mask, 0.5, out=s) is s
    np.testing.assert_array_equal(s, want)
    x = rng.standard_normal((5, 7)).astype(np.float32)  # fewer axes: a plain row-wise softmax
    _assert_max_ulp(kernels.masked_softmax(x), ops.softmax(x), ULPS["softmax"][F32], "2-d")
    m1 = np.zeros((2, 1, 4, 1))  # a mask broadcast along the keys
    _assert_max_ulp(
        kernels.masked_softmax(want, m1), ops.softmax(want + m1), ULPS["softmax"][F64], "m1"
    )


def test_masked_softmax_nan_and_inf_follow_numpy():
    s = np.array([[0.0, np.nan, 1.0], [0.0, np.inf, 1.0], [1.0, 2.0, 3.0]])
    with np.errstate(invalid="ignore"):
        want = ops.softmax(s)
    got = kernels.masked_softmax(s)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_max_ulp(got[2], want[2], maxulp=8)


# ---------------------------------------------------------------------------------------------
# attention (per (batch, head): the packed GEMMs around the softmax kernel)
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(dtype=DTYPES, b=st.sampled_from([1, 2]), n=st.sampled_from([1, 3]),
       t=st.sampled_from([1, 4, 33]), s_len=st.sampled_from([1, 8, 40, 129]),
       d=st.sampled_from([1, 8, 16]), mask_kind=st.sampled_from(["none", "keys", "rows", "full"]),
       merged_out=st.booleans(), seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_attention_matches_inline_reference(dtype, b, n, t, s_len, d, mask_kind, merged_out, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, n, t, d)).astype(dtype)
    k = (3 * rng.standard_normal((b, n, s_len, d))).astype(dtype)
    v = rng.standard_normal((b, n, s_len, d)).astype(dtype)
    mask = _make_mask(mask_kind, b, t, s_len, dtype, rng)
    scale = 1 / math.sqrt(d)
    # The reference, written out: scores, scale, mask, ops.softmax, context.
    scores = (q @ k.swapaxes(-1, -2)) * dtype.type(scale)
    probs = ops.softmax(scores + mask if mask is not None else scores)
    want = probs @ v
    out = np.empty((b, t, n, d), dtype).transpose(0, 2, 1, 3) if merged_out else None
    got = kernels.attention(q, k, v, mask, scale, out=out)
    assert got.shape == want.shape and got.dtype == dtype and (out is None or got is out)
    assert np.all(np.abs(got - want) <= _few_bound(q, k, v, probs, scale, dtype))
    # and bitwise the packed GEMMs around the softmax kernel, pair by pair
    np.testing.assert_array_equal(got, _packed_attention(q, k, v, mask, scale))


def _packed_attention(q, k, v, mask, scale, softmax=kernels.masked_softmax):
    """attention() written out: per (batch, head) the scores as packed_linear(q, pack(k)) (each an
    fma chain over D), ``softmax``, the context as packed_linear(p, pack(v^T))."""
    b, n = q.shape[:2]
    scores = np.empty(q.shape[:3] + k.shape[2:3], q.dtype)  # [B, N, T, S]
    for bi, hi in np.ndindex(b, n):
        scores[bi, hi] = packed.packed_linear(np.ascontiguousarray(q[bi, hi]), packed.pack(k[bi, hi]))
    probs = softmax(scores, mask, scale)
    out = np.empty(q.shape, q.dtype)
    for bi, hi in np.ndindex(b, n):
        out[bi, hi] = packed.packed_linear(np.ascontiguousarray(probs[bi, hi]), packed.pack(v[bi, hi].T))
    return out


@pytest.mark.parametrize("name, t", [("attention", 3), ("attention_few", 1)])
def test_attention_bad_shapes(name, t):
    attend = getattr(kernels, name)
    q = np.ones((1, 2, t, 4))
    with pytest.raises(ValueError, match=r"\[B, N, S, D\]"):
        attend(q, np.ones((1, 2, 5, 3)), np.ones((1, 2, 5, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        attend(q, np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 4)), np.zeros((1, 1, 2, 5)))
    assert np.all(attend(q, np.ones((1, 2, 0, 4)), np.ones((1, 2, 0, 4))) == 0)


# ---------------------------------------------------------------------------------------------
# attention_few (a decoding step: one kernel over the (batch, head) pairs, cached keys in place)
# ---------------------------------------------------------------------------------------------


def _few_inputs(dtype, b, n, t, s_len, d, mask_kind, cached, rng):
    """q, k, v as the model makes them: [B, N, T, D] views of [B, T, H] projections; k and v
    either so, or (``cached``) [B, N, S, D] views of a cache's longer buffers."""
    q = rng.standard_normal((b, t, n * d)).astype(dtype).reshape(b, t, n, d).transpose(0, 2, 1, 3)
    if cached:
        k = (3 * rng.standard_normal((b, n, s_len + 5, d))).astype(dtype)[:, :, :s_len]
        v = rng.standard_normal((b, n, s_len + 5, d)).astype(dtype)[:, :, :s_len]
    else:
        k = (3 * rng.standard_normal((b, s_len, n * d))).astype(dtype).reshape(b, s_len, n, d).transpose(0, 2, 1, 3)
        v = rng.standard_normal((b, s_len, n * d)).astype(dtype).reshape(b, s_len, n, d).transpose(0, 2, 1, 3)
    return q, k, v, _make_mask(mask_kind, b, t, s_len, dtype, rng)


def _few_bound(q, k, v, probs, scale, dtype):
    """How far attention_few and attention may be from ``probs @ v`` (BLAS scores, ops.softmax):
    the softmax's ulps and the context's S-term sum, plus the scores' own summation order:
    each within 2 D eps (|q| . |k_j|) of BLAS's, which moves p_j by at most p_j (|δ_j| + sum_i p_i |δ_i|)
    (δ: that difference scaled)."""
    eps, d, s_len = np.finfo(dtype).eps, q.shape[-1], k.shape[2]
    delta = scale * 2 * d * eps * (np.abs(q) @ np.abs(k).swapaxes(-1, -2))  # [B, N, T, S]
    spread = probs * (delta + np.sum(probs * delta, axis=-1, keepdims=True))
    return (ULPS["softmax"][dtype] + s_len) * eps * (probs @ np.abs(v)) + spread @ np.abs(v)


@SETTINGS
@given(dtype=DTYPES, b=st.sampled_from([1, 3]), n=st.sampled_from([1, 4]), t=st.sampled_from([1, 2]),
       s_len=st.sampled_from([1, 7, 40, 130]), d=st.sampled_from([1, 12, 64]),
       mask_kind=st.sampled_from(["none", "keys", "rows", "full", "causal"]), cached=st.booleans(),
       seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_attention_few_matches_inline_reference(dtype, b, n, t, s_len, d, mask_kind, cached, seed):
    rng = np.random.default_rng(seed)
    q, k, v, mask = _few_inputs(dtype, b, n, t, s_len, d, mask_kind, cached, rng)
    scale = 1 / math.sqrt(d)
    scores = (q @ k.swapaxes(-1, -2)) * dtype.type(scale)
    probs = ops.softmax(scores + mask if mask is not None else scores)
    want = probs @ v
    out = np.empty((b, t, n, d), dtype).transpose(0, 2, 1, 3)  # the heads merged, as the model's buffer
    got = kernels.attention_few(q, k, v, mask, scale, out=out)
    assert got is out and got.shape == want.shape and got.dtype == dtype
    assert np.all(np.abs(got - want) <= _few_bound(q, k, v, probs, scale, dtype))
    # each pair's values whatever else the batch holds, and from contiguous copies
    m1 = mask[-1:] if mask is not None and mask.shape[0] > 1 else mask
    np.testing.assert_array_equal(kernels.attention_few(q[-1:], k[-1:], v[-1:], m1, scale), got[-1:])
    np.testing.assert_array_equal(kernels.attention_few(*(np.ascontiguousarray(a) for a in (q, k, v)), mask, scale), got)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("b,n,t,s_len,d", [(1, 2, 1, 5, 8), (3, 4, 1, 40, 64), (8, 12, 1, 33, 64), (2, 3, 2, 130, 12)])
def test_attention_few_two_cores_gives_the_same_bits(monkeypatch, dtype, b, n, t, s_len, d):
    """cores=2: the helper thread claims chunks of pairs through refimpl.fast.jobs' board; every pair is
    computed by the same kernel whoever claims it (the split threshold lowered to 0, so that
    every case here runs as a job)."""
    from refimpl.fast import jobs

    monkeypatch.setattr(jobs, "ATTENTION_SPLIT_FROM", 0)
    rng = np.random.default_rng(b * s_len)
    q, k, v, mask = _few_inputs(dtype, b, n, t, s_len, d, "keys", True, rng)
    one = kernels.attention_few(q, k, v, mask, d**-0.5)
    helper = jobs._the_helper(jobs.ATTENTION_LIKE[dtype])
    posted = helper.board[jobs._SEQ]
    for _ in range(3):  # (the helper may be asleep at the first, and claim nothing)
        np.testing.assert_array_equal(kernels.attention_few(q, k, v, mask, d**-0.5, cores=2), one)
    assert helper.board[jobs._SEQ] == posted + 3 or jobs._CPUS < 2  # posted as jobs


def test_attention_few_bad_inputs():
    """attention_few's own checks (the shapes and the empty case: test_attention_bad_shapes)."""
    q = np.ones((1, 2, 1, 4))
    with pytest.raises(TypeError, match="dtype float32 but the input is float64"):
        kernels.attention_few(q, np.ones((1, 2, 5, 4), np.float32), np.ones((1, 2, 5, 4)))
    with pytest.raises(ValueError, match="cores must be 1 or 2"):
        kernels.attention_few(q, np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 4)), cores=3)
    ro = np.empty((1, 2, 1, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        kernels.attention_few(q, np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 4)), out=ro)
    with pytest.raises(ValueError, match="last axis contiguous"):
        kernels.attention_few(q, np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 4)), out=np.empty((1, 2, 1, 8))[..., ::2])
    # read-only and reversed inputs are read (a copy where the last axis is not contiguous)
    k = np.random.default_rng(0).standard_normal((1, 2, 5, 4))
    want = kernels.attention_few(q, k, k)
    k_ro = k.copy()
    k_ro.flags.writeable = False
    np.testing.assert_array_equal(kernels.attention_few(q, k_ro, k_ro), want)
    k_rev = np.ascontiguousarray(k[..., ::-1])[..., ::-1]
    np.testing.assert_array_equal(kernels.attention_few(q, k_rev, k_rev), want)


# ---------------------------------------------------------------------------------------------
# Errors, warm-up, lazy compilation
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    f32, f64 = np.ones((2, 4), np.float32), np.ones((2, 4))
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.bias_gelu(np.ones((2, 4), np.int64))
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.layer_norm(np.ones((2, 4), np.float16), np.ones(4), np.ones(4), 1e-5)
    with pytest.raises(TypeError, match="never up- or downcast"):
        kernels.bias_gelu(f32, np.ones(4))
    with pytest.raises(TypeError, match="never up- or downcast"):
        kernels.masked_softmax(f64, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="NumPy array"):
        kernels.bias_gelu([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        kernels.layer_norm(f64, np.ones(3), np.ones(4), 1e-5)
    with pytest.raises(ValueError, match="same shape"):
        kernels.residual_layer_norm(f64, np.ones((4, 2)), np.ones(4), np.ones(4), 1e-5)
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.masked_softmax(np.ones((2, 3, 4, 5)), np.zeros((2, 1, 3, 5)))
    with pytest.raises(ValueError, match="1 to 4 axes"):
        kernels.masked_softmax(np.ones((1, 2, 3, 4, 5)))
    with pytest.raises(ValueError, match="out must be"):
        kernels.bias_gelu(f64, out=np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.bias_gelu(f64, out=np.empty((4, 2)).T)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.warmup(np.float16)


def test_empty_inputs():
    assert kernels.bias_gelu(np.ones((0, 4))).shape == (0, 4)
    assert kernels.masked_softmax(np.ones((2, 0, 3, 4))).shape == (2, 0, 3, 4)
    assert kernels.layer_norm(np.ones((0, 4)), np.ones(4), np.ones(4), 1e-5).shape == (0, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_warmup_compiles_one_specialisation_per_kernel(dtype):
    kernels.warmup(dtype)
    before = {k: len(k.signatures) for k in _KERNELS}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 16)).astype(dtype)
    v = rng.standard_normal(16).astype(dtype)
    v.flags.writeable = False
    kernels.bias_gelu(x[:, :, ::1], v)
    kernels.bias_gelu(np.asfortranarray(x))
    kernels.layer_norm(x.transpose(1, 0, 2), v, v, 1e-5)
    kernels.residual_layer_norm(x, x, v, v, 1e-5)
    kernels.masked_softmax(x, None, 2.0)
    ro = x.copy()
    ro.flags.writeable = False
    kernels.bias_gelu(ro, v)
    kernels.masked_softmax(ro[None], np.broadcast_to(v, (1, 1, 3, 16)), 0.5)  # read-only mask
    kv = rng.standard_normal((2, 3, 9, 16)).astype(dtype)
    kernels.attention_few(x[:, :, None, :], kv[:, :, :5], ro[..., None, :].repeat(5, 2), None, 0.5, cores=2)
    kernels.attention_few(ro[:1, :, None, :], kv[:1], kv[:1], np.zeros((1, 9), dtype), 0.5)  # (its _layout may add one)
    assert {k: len(k.signatures) for k in _KERNELS} == before  # nothing new compiled


_KERNELS = [
    kernels.bias_gelu_inplace_kernel,
    kernels._layer_norm_kernel,
    kernels._residual_layer_norm_kernel,
    kernels._masked_softmax_kernel,
    kernels._gelu_full_run,
    kernels._gelu_main_run,
    kernels.attention_few_kernel,
    reductions.pairwise_sum_div_at,
]


def test_import_compiles_nothing():
    code = (
        "import refimpl, refimpl.fast.kernels as k, refimpl.fast.reductions as r, refimpl.fast.elementary as e\n"
        "fs = [k.bias_gelu_inplace_kernel, k._layer_norm_kernel, k._residual_layer_norm_kernel,"
        " k._masked_softmax_kernel, r.pairwise_sum, e._erf_f64]\n"
        "assert not any(f.signatures for f in fs), [f.signatures for f in fs]\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---------------------------------------------------------------------------------------------
# The steps of numba_kernels() that schedule BLAS and the kernels (no kernel of their own)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("h", [1, 7, 128, 300, 3072])
def test_bias_gelu_in_place_is_bitwise_out_of_place(dtype, h):
    rng = np.random.default_rng(h)
    y = (3 * rng.standard_normal((5, h))).astype(dtype)
    b = rng.standard_normal(h).astype(dtype)
    for bias in (b, None):
        want = kernels.bias_gelu(y, bias)
        got = y.copy()
        assert kernels.bias_gelu(got, bias, out=got) is got
        np.testing.assert_array_equal(got, want)
        _assert_gelu_close(got, y, bias, dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), (64,), (65,), (2, 100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_ops_linear(dtype, lead, with_bias):
    """schedule.linear: packed weights up to TWO_CORE_ROWS rows (tests/test_packed.py; up to
    PACKED_ROWS on one core where OpenBLAS runs on one thread), (W x^T)^T
    for at most THIN_ROWS rows, x W^T above, bias added in place. Bitwise the same call written
    out; against ops.linear (always x W^T) within the bound of another GEMM kernel's rounding."""
    from refimpl.fast.packed import pack, packed_linear
    from tolerances import REORDERED, assert_close

    rng = np.random.default_rng(len(lead))
    x = rng.standard_normal(lead + (24,)).astype(dtype)
    w = rng.standard_normal((40, 24)).astype(dtype)
    b = rng.standard_normal(40).astype(dtype) if with_bias else None
    got = schedule.linear(x, w, b)
    rows = x.reshape(-1, 24)
    same_calls = (w @ rows.T).T if rows.shape[0] <= schedule.THIN_ROWS else rows @ w.T
    same_calls = same_calls.reshape(*lead, 40) + (0 if b is None else b)
    if schedule.packed_cores(rows, True):  # (1-48 rows; up to PACKED_ROWS where BLAS has one thread)
        same_calls = packed_linear(x, pack(w), b)
    want = ops.linear(x, w, b)
    assert got.shape == want.shape == lead + (40,) and got.dtype == want.dtype == dtype
    np.testing.assert_array_equal(got, same_calls)
    assert_close(got, want, np.dtype(dtype).name, "linear", REORDERED)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("lead", [(1,), (2, 4), (3, 11), (1, 48), (2, 40)])
@pytest.mark.parametrize("one_thread", [False, True])
def test_linears_is_each_linear(monkeypatch, dtype, lead, one_thread):
    """schedule.linears: q, k, v of one input as one GEMM with the weights stacked where linear()
    would use packed weights (two cores, or a part of a split), else one linear() each: bitwise
    the separate calls either way, as views of the right shapes."""
    monkeypatch.setattr(schedule._here, "one_thread", one_thread, raising=False)
    rng = np.random.default_rng(sum(lead))
    x = rng.standard_normal(lead + (24,)).astype(dtype)
    ws = [rng.standard_normal((n, 24)).astype(dtype) for n in (40, 40, 33)]
    bs = [rng.standard_normal(n).astype(dtype) for n in (40, 40, 33)]
    got = schedule.linears(x, ws, bs)
    for y, w, b in zip(got, ws, bs):
        assert y.shape == lead + (w.shape[0],) and y.dtype == dtype
        np.testing.assert_array_equal(y, schedule.linear(x, w, b))
    assert schedule.packed_weight(*ws) is schedule.packed_weight(*ws)  # packed once, stacked


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "rows", "full"])
@pytest.mark.parametrize("b,n,t,s_len", [(1, 1, 1, 1), (3, 4, 1, 20), (2, 3, 5, 5), (2, 3, 4, 9), (1, 2, 33, 40)])
def test_attention_context_matches_ops(monkeypatch, dtype, per_head, mask_kind, b, n, t, s_len):
    monkeypatch.setattr(schedule, "PER_HEAD_FROM", 1 if per_head else 10**9)
    rng = np.random.default_rng(t * s_len)
    d = 8
    # q, k, v as the model makes them: [B, N, T, D] views of [B, T, H] projections
    q = rng.standard_normal((b, t, n * d)).astype(dtype).reshape(b, t, n, d).transpose(0, 2, 1, 3)
    k = (3 * rng.standard_normal((b, s_len, n * d))).astype(dtype).reshape(b, s_len, n, d).transpose(0, 2, 1, 3)
    v = rng.standard_normal((b, s_len, n * d)).astype(dtype).reshape(b, s_len, n, d).transpose(0, 2, 1, 3)
    mask = _make_mask(mask_kind, b, t, s_len, dtype, rng)
    scale = d**-0.5
    got = schedule.attention_context(q, k, v, mask, scale)
    want = ops.softmax(q @ k.swapaxes(-1, -2) * scale + (0 if mask is None else mask)) @ v  # the reference's steps
    assert got.shape == want.shape == (b, n, t, d) and got.dtype == dtype
    probs = ops.softmax(q @ k.swapaxes(-1, -2) * scale + (0 if mask is None else mask))
    bound = (ULPS["softmax"][dtype] + s_len) * np.finfo(dtype).eps * (probs @ np.abs(v))
    few, own = t <= schedule.FEW_QUERIES, t >= schedule.PER_HEAD_FROM
    if few or own:  # (their scores in another summation order than BLAS's)
        bound = _few_bound(q, k, v, probs, scale, dtype)
    assert np.all(np.abs(got - want) <= bound)
    # the heads merge without a copy: [B, N, T, D] -> [B, T, N, D] is C-contiguous
    assert got.transpose(0, 2, 1, 3).flags.c_contiguous
    if few:  # a decoding step's attention: its own kernel (both cores)
        np.testing.assert_array_equal(got, kernels.attention_few(q, k, v, mask, scale))
    elif own:  # per (batch, head): the packed GEMMs around the softmax kernel
        np.testing.assert_array_equal(got, _packed_attention(q, k, v, mask, scale))
    else:  # bitwise the schedule that keeps the probabilities (softmax kernel, then @ v)
        np.testing.assert_array_equal(got, kernels.masked_softmax(q @ k.swapaxes(-1, -2), mask, scale) @ v)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [2, 3, 5])
@pytest.mark.parametrize("piece", [None, 1])
def test_split_batch_forward_matches_the_whole_batch(monkeypatch, dtype, batch, piece):
    """The fast forward runs a batch as two halves on two threads (single-threaded OpenBLAS);
    every sequence is computed on its own either way, so the outputs agree up to the rounding of
    BLAS kernels picked for the other call shapes (tolerances.REORDERED; bitwise on machines where
    BLAS picks the same kernel for both shapes, which no test may assume)."""
    import refimpl
    import refimpl.fast.tasks
    from tolerances import REORDERED, assert_close

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model = refimpl.from_pretrained(os.path.join(root, "refimpl", "data", "tiny-random-mlm"), dtype=dtype, backend="numba")
    assert model.backend == "numba"
    rng = np.random.default_rng(batch)
    ids = rng.integers(3, model.config.vocab_size, size=(batch, 11))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0  # a padded row: the per-row attention bias is sliced with the batch
    ids[0, 7:] = model.config.pad_token_id
    calls = []
    split_batch = schedule.split_batch
    monkeypatch.setattr(refimpl.fast.tasks, "SPLIT_MIN_WORK", 0)  # split even a tiny model's batch
    monkeypatch.setattr(refimpl.fast.tasks, "SPLIT_MIN_ROWS", 0)
    monkeypatch.setattr(refimpl.fast.tasks, "split_batch", lambda fn, n, piece=None: calls.append(n) or split_batch(fn, n, piece))
    monkeypatch.setattr(refimpl.fast.tasks, "pieces", lambda params, x: piece)  # halves, or one sequence a turn
    for kwargs in ({}, {"output_hidden_states": True, "output_attentions": True}):
        a = model(input_ids=ids, attention_mask=mask, **kwargs)
        with monkeypatch.context() as m:  # the whole batch in one stream
            m.setattr(refimpl.fast.tasks, "split_batch", lambda fn, n, piece=None: [fn(slice(0, n))])
            b = model(input_ids=ids, attention_mask=mask, **kwargs)
        assert a.logits.dtype == b.logits.dtype == np.dtype(dtype)
        assert_close(a.logits, b.logits, dtype, "logits", REORDERED)
        for name in ("hidden_states", "attentions"):
            if kwargs:
                assert len(getattr(a, name)) == len(getattr(b, name))
                for i, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
                    assert_close(x, y, dtype, f"{name}[{i}]", REORDERED)
            else:
                assert getattr(a, name) is None
    assert calls == [batch, batch]  # the split path ran, once per call


def test_split_batch_restores_blas_threads_and_covers_the_batch():
    blas = schedule.openblas_threads()
    before = blas[0]() if blas else None
    seen = []
    parts = schedule.split_batch(lambda rows: seen.append(rows) or rows, 5)
    assert sorted((s.start, s.stop) for s in seen) == [(0, 3), (3, 5)] or parts == [slice(0, 5)]
    assert schedule.split_batch(lambda rows: rows, 1) == [slice(0, 1)]
    parts = schedule.split_batch(lambda rows: rows, 7, 2)  # pieces of 2 taken in turn: results in order
    assert parts == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 7)] or parts == [slice(0, 7)]
    assert schedule.split_batch(lambda rows: rows, 5, 3) in ([slice(0, 3), slice(3, 5)], [slice(0, 5)])  # >= half

    ran = []

    def fails(rows):
        ran.append(rows.start)
        if rows.start == 0:
            raise ValueError("piece 0")
        time.sleep(0.005)  # (lets the failing thread run: 40 pieces would take 0.1 s on one thread)
        return rows

    if blas and blas[0]() >= 2 and (os.cpu_count() or 1) >= 2:  # (else one stream: fails sees slice(0, n))
        with pytest.raises(ValueError, match="piece 0"):  # whichever thread ran it
            schedule.split_batch(fails, 40, 1)
        assert len(ran) < 20  # the other thread stopped taking pieces
    if blas:
        assert blas[0]() == before


# ---------------------------------------------------------------------------------------------
# Bitwise against the previous kernels. The GELU and softmax kernels were restructured for speed
# (erf's tail only where it is needed, a fused scale/mask/max pass, vector reductions, exp without
# subnormal arithmetic); every value must stay the one the plain scalar formulas below give, a
# frozen copy of the kernels before that change (one element at a time, in the same operations).
# ---------------------------------------------------------------------------------------------

# The coefficient tables the frozen formulas read from refimpl.kernels, pinned (sha256 prefixes).
_TABLES = {
    "_ERF64_A": "a00e2ea048693850", "_ERF64_G": "e804c94a01fb8598", "_EXPM1_64": "ac75cdc550036973",
    "_ERF32_A": "bc7c550ba660d79d", "_ERF32_D": "6062abba0325f64a", "_EXPM1_32": "afb2a8b580ba9fc8",
}  # fmt: skip
_OLD_ERF64_A, _OLD_ERF64_G, _OLD_EXPM1_64 = elementary._ERF64_A, elementary._ERF64_G, elementary._EXPM1_64
_OLD_ERF32_A, _OLD_ERF32_D, _OLD_EXPM1_32 = elementary._ERF32_A, elementary._ERF32_D, elementary._EXPM1_32
_OLD_LOG2E, _OLD_LN2_HI, _OLD_LN2_LO = 1.4426950408889634, 0.6931471803691238, 1.9082149292705877e-10
_OLD_LN2, _OLD_SQRT2 = 0.6931471805599453, 1.4142135623730951
_fma, _bits = llvm.fma, llvm.f64_from_bits


def test_frozen_reference_tables_are_the_kernels_tables():
    import hashlib

    for name, digest in _TABLES.items():
        assert hashlib.sha256(getattr(elementary, name).tobytes()).hexdigest()[:16] == digest, name


@numba.njit
def _old_horner(table, w):
    p = table[0]
    for k in range(1, table.shape[0]):
        p = _fma(p, w, table[k])
    return p


@numba.njit
def _old_exp64(x):
    xc = min(max(x, -746.0), 710.0)
    kf = np.floor(xc * _OLD_LOG2E + 0.5)
    r = _fma(-kf, _OLD_LN2_LO, _fma(-kf, _OLD_LN2_HI, xc))
    p = _fma(r, _old_horner(_OLD_EXPM1_64, r), 1.0)
    k = np.int64(kf)
    k1 = k >> 1
    y = p * _bits((k1 + 1023) << 52) * _bits((k - k1 + 1023) << 52)
    return y if x == x else x


@numba.njit
def _old_exp32(x):
    xd = np.float64(x)
    xc = min(max(xd, -150.0), 90.0)
    kf = np.floor(xc * _OLD_LOG2E + 0.5)
    r = _fma(-kf, _OLD_LN2, xc)
    p = _fma(r, _old_horner(_OLD_EXPM1_32, r), 1.0)
    y = np.float32(p * _bits((np.int64(kf) + 1023) << 52))
    return y if x == x else x


@numba.njit
def _old_gelu64(z):
    u = z / _OLD_SQRT2
    a = abs(u)
    small = a * _old_horner(_OLD_ERF64_A, a * a - 2.0)
    ac = min(max(a, 2.0), 6.0)
    tail = 1.0 - _old_exp64(-(ac * ac)) * _old_horner(_OLD_ERF64_G, ac - 4.0)
    r = tail if a >= 2.0 else small
    return z * 0.5 * (1.0 + math.copysign(r, u))


@numba.njit
def _old_gelu32(z):
    ud = np.float64(z / np.float32(_OLD_SQRT2))
    a = abs(ud)
    small = a * _old_horner(_OLD_ERF32_A, a * a - 3.125)
    tail = _old_horner(_OLD_ERF32_D, min(a, 4.0) - 3.25)
    r = tail if a >= 2.5 else small
    return z * np.float32(0.5) * (np.float32(1.0) + np.float32(math.copysign(r, ud)))


@numba.njit
def _old_map(fn, x, out):
    for i in range(x.size):
        out.flat[i] = fn(x.flat[i])


def _old(fn32, fn64, x):
    out = np.empty_like(x)
    _old_map(fn32 if x.dtype == F32 else fn64, x, out)
    return out


@numba.njit
def _old_pairwise_sum(a):  # the scalar code NumPy's pairwise_sum is written in, as it was
    n = a.shape[0]
    if n < 8:
        res = a.dtype.type(0.0)
        for i in range(n):
            res += a[i]
        return res
    if n <= 128:
        r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        m = n - n % 8
        for i in range(8, m, 8):
            r0 += a[i]
            r1 += a[i + 1]
            r2 += a[i + 2]
            r3 += a[i + 3]
            r4 += a[i + 4]
            r5 += a[i + 5]
            r6 += a[i + 6]
            r7 += a[i + 7]
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        for i in range(m, n):
            res += a[i]
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return _old_pairwise_sum(a[:n2]) + _old_pairwise_sum(a[n2:])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_pairwise_sums_are_bitwise_numpys_order(dtype):
    """pairwise_sum and pairwise_sum_centred_sq (two leaves side by side where both halves of a
    node are leaves) give the bits of the scalar code NumPy's pairwise sum is written in, and of
    np.sum, at every length up to 1100."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(1100) * 10 ** rng.uniform(-3, 3, 1100)).astype(dtype)
    for n in range(1, 1101):
        x = a[:n].copy()
        assert reductions.pairwise_sum(x) == _old_pairwise_sum(x) == np.sum(x), n
        mean = dtype.type(np.mean(x))
        d = x - mean
        assert reductions.pairwise_sum_centred_sq(x, mean) == _old_pairwise_sum(d * d), n


@numba.njit
def _old_softmax_rows(rows, mask_rows, has_mask, scale, exp):  # rows, mask_rows: [R, S]
    out = np.empty_like(rows)
    for i in range(rows.shape[0]):
        v = rows[i] * scale + mask_rows[i] if has_mask else rows[i] * scale
        m = v[0]
        for j in range(v.shape[0]):
            m = max(m, v[j])  # exact: the order does not matter (nor which of +-0)
        for j in range(v.shape[0]):
            v[j] = exp(v[j] - m)
        total = _old_pairwise_sum(v)
        for j in range(v.shape[0]):
            out[i, j] = v[j] / total
    return out


def _old_masked_softmax(s, mask, scale):
    dtype = s.dtype
    m = np.broadcast_to(mask if mask is not None else np.zeros(1, dtype), s.shape)
    rows = np.ascontiguousarray(s).reshape(-1, s.shape[-1])
    mrows = np.ascontiguousarray(m).reshape(-1, s.shape[-1])
    exp = _old_exp32 if dtype == F32 else _old_exp64
    return _old_softmax_rows(rows, mrows, mask is not None, dtype.type(scale), exp).reshape(s.shape)


def _gelu_inputs(dtype, h, rng):
    """Rows of length h that exercise every path of the blocked kernel: all quiet, all beyond
    erf's first branch, alternating stretches of both, isolated large values, specials."""
    n_rows = 12
    y = (0.5 * rng.standard_normal((n_rows, h))).astype(dtype)
    y[1] = (-1 + 2 * rng.standard_normal(h)).astype(dtype)  # about a fifth need the tail
    y[2] = (6 * rng.standard_normal(h)).astype(dtype)
    for period in (16, 64, 256):  # stretches of quiet and loud blocks
        loud = (np.arange(h) // period) % 2 == 1
        y[3 + period.bit_length() % 3, loud] = -4.0
    y[6, rng.integers(0, h, 3)] = 3.6  # isolated values just past the bound
    specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0], dtype)
    y[7, ::97] = specials[np.arange(len(y[7, ::97])) % 6]
    edges = np.array([3.4, 3.5, 3.53, 3.5355, 3.54, 2.8, 2.82, 2.83, 2.85, 5.66, 8.5], dtype)
    y[8, : min(h, 2 * len(edges))] = np.concatenate([edges, -edges])[:h]
    y[9] = np.nextafter(y[9], np.inf)
    y[10] = -y[1]
    y[11] = 0.0
    return y


def test_gelu_tail_bound_is_below_erfs_branch_point():
    # |z| below the bound => |u| = |z / sqrt 2| (rounded as the kernel rounds it) below erf's
    # branch point (rounding is monotonic, so the bound itself decides)
    assert abs(np.float64(np.float32(3.5) / np.float32(math.sqrt(2.0)))) < 2.5
    assert abs(2.8 / math.sqrt(2.0)) < 2.0
    assert kernels._GELU_PLAN_F32[0] % 64 == 0 and kernels._GELU_PLAN_F64[0] % 64 == 0  # flags size


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "h", [1, 7, 15, 16, 17, 63, 64, 65, 200, 255, 256, 257, 300, 768, 1000, 3072, 3100]
)
def test_bias_gelu_is_bitwise_the_previous_kernel(dtype, h):
    rng = np.random.default_rng(h)
    y = _gelu_inputs(dtype, h, rng)
    b = (0.5 * rng.standard_normal(h)).astype(dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        for bias in (None, b):
            z = y + bias if bias is not None else y
            want = _old(_old_gelu32, _old_gelu64, z)
            np.testing.assert_array_equal(kernels.bias_gelu(y, bias), want)
            got = y.copy()
            kernels.bias_gelu(got, bias, out=got)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_bias_gelu_dense_grid_is_bitwise_the_previous_kernel(dtype):
    y = np.concatenate([np.linspace(-12, 12, 400_001), np.geomspace(1e-30, 1e3, 10_001)])
    y = np.concatenate([y, -y]).astype(dtype)
    np.testing.assert_array_equal(kernels.bias_gelu(y), _old(_old_gelu32, _old_gelu64, y))
    if dtype == F32:  # every 251st float32 bit pattern: all exponents, both signs, NaN and inf
        x = np.arange(0, 2**32, 251, dtype=np.uint64).astype(np.uint32).view(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            np.testing.assert_array_equal(kernels.bias_gelu(x), _old(_old_gelu32, _old_gelu64, x))


@numba.njit
def _map_gelu_main(x, out):
    for i in range(x.shape[0]):
        out[i] = elementary.gelu_main(x[i])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_gelu_main_is_bitwise_gelu_below_the_bound(dtype):
    # _gelu_main (erf's first branch, written as u * P(u*u)) wherever the kernels use it: |z| < 3.5
    # (float32: every 61st bit pattern there, both signs) or |z| < 2.8 (float64)
    if dtype == F32:
        x = np.arange(0, np.float32(3.5).view(np.uint32), 61, dtype=np.uint32).view(np.float32)
    else:
        rng = np.random.default_rng(0)
        x = np.concatenate([
            np.linspace(0, 2.8, 2_000_001, endpoint=False), rng.uniform(0, 2.8, 2_000_000),
            np.geomspace(1e-300, 1.0, 10_001),
        ])  # fmt: skip
    x = np.concatenate([x, -x]).astype(dtype)
    got = np.empty_like(x)
    _map_gelu_main(x, got)
    np.testing.assert_array_equal(got, _old(_old_gelu32, _old_gelu64, x))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_exp_is_bitwise_the_previous_formula(dtype):
    x = np.concatenate([
        np.linspace(-800, 800, 2_000_001), np.linspace(-746.5, -744.5, 200_001),  # around 2**-1075
        np.linspace(-110, -80, 100_001), -np.geomspace(1e-30, 1e30, 10_001),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan]),
    ]).astype(dtype)  # fmt: skip
    want = _old(_old_exp32, _old_exp64, x)
    got = np.empty_like(x)
    _map_exp(x, got)
    np.testing.assert_array_equal(got, want)
    nonpos = x[~(x > 0)]
    _map_exp_nonpos(nonpos, got[: nonpos.size])
    np.testing.assert_array_equal(got[: nonpos.size], want[~(x > 0)])


@numba.njit
def _map_exp_nonpos(x, out):
    for i in range(x.shape[0]):
        out[i] = elementary.exp_nonpos(x[i])


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "s_len", [1, 2, 7, 8, 9, 15, 16, 17, 100, 127, 128, 129, 136, 255, 256, 257, 300, 512, 1000]
)
def test_masked_softmax_is_bitwise_the_previous_kernel(dtype, s_len):
    rng = np.random.default_rng(s_len)
    b, n, t = 2, 3, 5
    lo = np.finfo(dtype).min
    for magnitude in (1.0, 30.0, 3e3):  # 3e3: exps down in the subnormals and zeros
        s = (magnitude * rng.standard_normal((b, n, t, s_len))).astype(dtype)
        s[0, 0, 1, rng.integers(0, s_len)] = np.nan
        s[0, 1, 2, rng.integers(0, s_len)] = np.inf
        s[1, 2, 3, :] = -np.inf
        keys = np.where(rng.random((b, 1, 1, s_len)) < 0.7, 0.0, lo).astype(dtype)
        keys[..., 0] = 0.0
        rows = np.where(rng.random((b, 1, t, s_len)) < 0.5, 0.0, lo).astype(dtype)
        rows[:, :, ::2] = lo  # rows masked everywhere
        for mask in (None, keys, rows, np.full((b, n, t, s_len), lo, dtype)):
            with np.errstate(invalid="ignore", over="ignore"):
                want = _old_masked_softmax(s, mask, 0.125)
                np.testing.assert_array_equal(kernels.masked_softmax(s, mask, 0.125), want)
                got = s.copy()
                kernels.masked_softmax(got, mask, 0.125, out=got)
                np.testing.assert_array_equal(got, want)


def test_attention_softmax_is_bitwise_the_previous_kernel():
    rng = np.random.default_rng(0)
    for dtype in (F32, F64):
        q, k, v = rng.standard_normal((3, 2, 3, 130, 16)).astype(dtype)
        k *= dtype.type(40.0)  # wide scores: exps down to the subnormals and zeros
        mask = np.where(rng.random((2, 1, 1, 130)) < 0.8, 0.0, np.finfo(dtype).min).astype(dtype)
        want = _packed_attention(q, k, v, mask, 0.25, softmax=_old_masked_softmax)
        np.testing.assert_array_equal(kernels.attention(q, k, v, mask, 0.25), want)


def test_kernels_load_from_the_numba_cache(tmp_path):
    """Compiled once into an empty cache, then loaded from it in a fresh process: the same
    results (a cached kernel calling a recursive helper once crashed on load: numba#6061; so did
    attention_few's while it passed that helper literal offsets). attention, which compiles the
    packed GEMM's driver into itself, and a decoding step's blocks in one call (S = 141 keys: the
    recursive sum) run too."""
    code = (
        "import numpy as np\n"
        "from refimpl.fast import kernels as k\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((2, 3, 5, 300)).astype(np.float32)\n"
        "w = np.ones(300, np.float32)\n"
        "print(k.masked_softmax(x, None, 0.5).sum(), k.layer_norm(x, w, w, 1e-5).sum(),\n"
        "      k.bias_gelu(x, w).sum())\n"
        "q, kv = x[:, :, :1, :16], x[..., :16].repeat(26, axis=2)  # [2, 3, 1, 16], [2, 3, 130, 16]\n"
        "print(k.attention_few(q, kv, kv).sum(), k.attention_few(q, kv[:, :, :5], kv[:, :, :5]).sum())\n"
        "print(k.attention(kv, kv, kv).sum(), k.attention(q, kv, kv).sum())  # (the packed GEMM inside)\n"
        "import refimpl\n"  # a decoding step's blocks in one call (refimpl.fast.decoding), which calls both
        "from refimpl.fast import decoding\n"
        "from refimpl.params import build_params, hf_key_table\n"
        "c = refimpl.Config.from_dict(dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,\n"
        "    intermediate_size=37, max_position_embeddings=200, is_decoder=True))\n"
        "leaves = {e.path: rng.normal(scale=0.3, size=e.shape) for e in hf_key_table(c, 'causal-lm')}\n"
        "m = refimpl.Model(c, build_params(c, 'causal-lm', leaves), 'causal-lm').astype('float32').to('numba')\n"
        "runs, run = [], decoding.run\n"
        "decoding.run = lambda *a: runs.append(run(*a)) or runs[-1]\n"
        "print(refimpl.generate(m, [[0] + [5] * 140] * 2, max_new_tokens=3, eos_token_id=None)[:, -3:].tolist(), runs)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [
        subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout.rstrip().endswith("[False, True, True]")  # (the prompt, then two steps in one call)


@pytest.mark.parametrize("task", ["base", "masked-lm", "causal-lm", "sequence-classification", "token-classification",
                                  "question-answering", "multiple-choice"])
def test_split_batch_heads_match_the_whole_batch(monkeypatch, task):
    """The fast forward runs encoder *and* head over the halves of the batch (one thread hop, BLAS
    single-threaded for the whole forward); every output field equals the unsplit forward to
    rounding: a half of one row takes BLAS's GEMV where the whole batch takes its GEMM (another
    summation order), so not always bitwise."""
    import refimpl
    import refimpl.fast.tasks
    from conftest import task_inputs
    from refimpl.params import build_params, hf_key_table
    from tolerances import REORDERED, assert_close

    config = refimpl.Config.from_dict(dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=40, pad_token_id=1,
                            type_vocab_size=2, num_labels=3 if task != "question-answering" else 2,
                            is_decoder=task == "causal-lm"))  # fmt: skip
    rng = np.random.default_rng(0)
    leaves = {e.path: rng.normal(scale=0.3, size=e.shape) for e in hf_key_table(config, task)}
    model = refimpl.Model(config, build_params(config, task, leaves), task).astype("float64").to("numba")
    inputs = task_inputs(task, config, rng)
    calls = []
    split_batch = schedule.split_batch
    monkeypatch.setattr(refimpl.fast.tasks, "SPLIT_MIN_WORK", 0)  # split even a tiny model's batch
    monkeypatch.setattr(refimpl.fast.tasks, "SPLIT_MIN_ROWS", 0)
    monkeypatch.setattr(refimpl.fast.tasks, "split_batch", lambda fn, n, piece=None: calls.append(n) or split_batch(fn, n, piece))
    a = model(**inputs)
    assert calls, "the split path did not run"
    monkeypatch.setattr(refimpl.fast.tasks, "split_batch", lambda fn, n, piece=None: [fn(slice(0, n))])
    b = model(**inputs)
    checked = 0
    for name in ("logits", "start_logits", "end_logits", "pooler_output", "last_hidden_state", "loss"):
        if getattr(b, name, None) is not None:
            assert_close(getattr(a, name), getattr(b, name), "float64", name, REORDERED)
            checked += 1
    assert checked >= 2
