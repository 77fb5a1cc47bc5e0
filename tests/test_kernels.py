"""The Numba fast paths (refimpl.kernels) against their NumPy definitions (refimpl.ops).

Tolerances are in ulps of the dtype, from the table below; the kernels are far closer to the
definitions than tests/tolerances.py's model-level table, so they get their own.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl import kernels, ops
from refimpl.backend import erf as libm_erf

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# Largest difference allowed, in ulps (units in the last place) of the dtype. Measured maxima
# on this code's test inputs are in the comments.
ULPS = {
    # |gelu_kernel - ops.gelu| <= ULPS * eps * |y + b|: the error of erf propagated through
    # x/2 * (1 + erf) (for negative inputs the result is tiny while its rounding is not).
    "gelu": {F32: 2, F64: 4},  # measured 1.0 / 1.8
    # erf itself, against libm's (glibc: ~1 ulp from the truth on both sides; ours: float32
    # correctly rounded, float64 within 2 ulp).
    "erf": {F32: 1, F64: 3},  # measured 1 / 2
    # exp against NumPy's (NumPy uses its own SIMD exp; ours is within 1 ulp of the truth).
    "exp": {F32: 2, F64: 2},  # measured 1 / 1
    # softmax probabilities: exp, the sum and the division each round (and NumPy's exp differs
    # from ours by an ulp or two), on identical inputs in identical summation order.
    "softmax": {F32: 8, F64: 8},  # measured 6 / 4
}
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
        out[i] = kernels._erf_f64(x[i])


@numba.njit
def _map_erf32(x, out):
    for i in range(x.shape[0]):
        out[i] = kernels._erf_f32(x[i])


def _map_erf(x, out):
    (_map_erf64 if x.dtype == F64 else _map_erf32)(x, out)


@numba.njit
def _map_exp(x, out):
    for i in range(x.shape[0]):
        out[i] = kernels._exp(x[i])


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
# attention (per-head schedule around BLAS GEMMs and the softmax kernel)
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
    # probs differ by <= ULPS ulps; the GEMM then rounds each side differently by <= S ulps.
    bound = (ULPS["softmax"][dtype] + s_len) * np.finfo(dtype).eps * (probs @ np.abs(v))
    assert np.all(np.abs(got - want) <= bound)
    # and bitwise equal to the batched schedule with the softmax kernel
    batched = q @ k.swapaxes(-1, -2)
    kernels.masked_softmax(batched, mask, scale, out=batched)
    np.testing.assert_array_equal(got, batched @ v)


def test_attention_bad_shapes():
    q = np.ones((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, N, S, D\]"):
        kernels.attention(q, np.ones((1, 2, 5, 3)), np.ones((1, 2, 5, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.attention(q, np.ones((1, 2, 5, 4)), np.ones((1, 2, 5, 4)), np.zeros((1, 1, 2, 5)))
    assert np.all(kernels.attention(q, np.ones((1, 2, 0, 4)), np.ones((1, 2, 0, 4))) == 0)


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
    assert {k: len(k.signatures) for k in _KERNELS} == before  # nothing new compiled


_KERNELS = [
    kernels._bias_gelu_kernel,
    kernels._bias_gelu_inplace_kernel,
    kernels._layer_norm_kernel,
    kernels._residual_layer_norm_kernel,
    kernels._masked_softmax_kernel,
]


def test_import_compiles_nothing():
    code = (
        "import refimpl.kernels as k\n"
        "fs = [k._bias_gelu_kernel, k._layer_norm_kernel, k._residual_layer_norm_kernel,"
        " k._masked_softmax_kernel, k._pairwise_sum, k._erf_f64]\n"
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
def test_linear_is_bitwise_ops_linear(dtype, lead, with_bias):
    rng = np.random.default_rng(len(lead))
    x = rng.standard_normal(lead + (24,)).astype(dtype)
    w = rng.standard_normal((40, 24)).astype(dtype)
    b = rng.standard_normal(40).astype(dtype) if with_bias else None
    got = kernels.numba_kernels().linear(x, w, b)
    want = ops.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "keys", "rows", "full"])
@pytest.mark.parametrize("b,n,t,s_len", [(1, 1, 1, 1), (2, 3, 5, 5), (2, 3, 4, 9), (1, 2, 33, 40)])
def test_attention_context_matches_ops(monkeypatch, dtype, per_head, mask_kind, b, n, t, s_len):
    monkeypatch.setattr(kernels, "PER_HEAD_FROM", 1 if per_head else 10**9)
    rng = np.random.default_rng(t * s_len)
    d = 8
    # q, k, v as the model makes them: [B, N, T, D] views of [B, T, H] projections
    q = rng.standard_normal((b, t, n * d)).astype(dtype).reshape(b, t, n, d).transpose(0, 2, 1, 3)
    k = (3 * rng.standard_normal((b, s_len, n * d))).astype(dtype).reshape(b, s_len, n, d).transpose(0, 2, 1, 3)
    v = rng.standard_normal((b, s_len, n * d)).astype(dtype).reshape(b, s_len, n, d).transpose(0, 2, 1, 3)
    mask = _make_mask(mask_kind, b, t, s_len, dtype, rng)
    scale = d**-0.5
    got = kernels.numba_kernels().attention_context(q, k, v, mask, scale)
    want = ops.attention_context(q, k, v, mask, scale)
    assert got.shape == want.shape == (b, n, t, d) and got.dtype == dtype
    probs = ops.scaled_masked_softmax(q @ k.swapaxes(-1, -2), mask, scale)
    bound = (ULPS["softmax"][dtype] + s_len) * np.finfo(dtype).eps * (probs @ np.abs(v))
    assert np.all(np.abs(got - want) <= bound)
    # the heads merge without a copy: [B, N, T, D] -> [B, T, N, D] is C-contiguous
    assert got.transpose(0, 2, 1, 3).flags.c_contiguous
    # and bitwise the schedule that keeps the probabilities (softmax kernel, then @ v)
    np.testing.assert_array_equal(got, kernels.masked_softmax(q @ k.swapaxes(-1, -2), mask, scale) @ v)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [2, 3, 5])
def test_split_batch_forward_is_bitwise_the_whole_batch(dtype, batch):
    """numba_kernels().split_batch runs the batch as two halves on two threads (single-threaded
    OpenBLAS); every sequence is computed on its own either way, so the outputs are identical."""
    import dataclasses

    import refimpl

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    split = refimpl.from_pretrained(os.path.join(root, "refimpl", "data", "tiny-random-mlm"), dtype=dtype)
    assert split.kernels.split_batch is not None
    whole = refimpl.Model(split.config, split.params, split.task, dataclasses.replace(split.kernels, split_batch=None))
    rng = np.random.default_rng(batch)
    ids = rng.integers(3, split.config.vocab_size, size=(batch, 11))
    mask = np.ones_like(ids)
    mask[0, 7:] = 0  # a padded row: the per-row attention bias is sliced with the batch
    ids[0, 7:] = split.config.pad_token_id
    for kwargs in ({}, {"output_hidden_states": True, "output_attentions": True}):
        a = split(input_ids=ids, attention_mask=mask, **kwargs)
        b = whole(input_ids=ids, attention_mask=mask, **kwargs)
        np.testing.assert_array_equal(a.logits, b.logits)
        for name in ("hidden_states", "attentions"):
            if kwargs:
                assert len(getattr(a, name)) == len(getattr(b, name))
                for x, y in zip(getattr(a, name), getattr(b, name)):
                    np.testing.assert_array_equal(x, y)
            else:
                assert getattr(a, name) is None


def test_split_batch_restores_blas_threads_and_covers_the_batch():
    blas = kernels._openblas_threads()
    before = blas[0]() if blas else None
    seen = []
    parts = kernels._split_batch(lambda rows: seen.append(rows) or rows, 5)
    assert sorted((s.start, s.stop) for s in seen) == [(0, 3), (3, 5)] or parts == [slice(0, 5)]
    assert kernels._split_batch(lambda rows: rows, 1) == [slice(0, 1)]
    if blas:
        assert blas[0]() == before
