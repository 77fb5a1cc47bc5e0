"""The one tolerance table for comparing refimpl with a reference implementation.

A comparison passes when ``max|actual - expected| <= TOL[dtype] * max(1, max|expected|)``: an
absolute bound for values of order one, relative to the tensor's largest magnitude beyond that
(logits over a vocabulary reach tens; LayerNorm outputs and probabilities are of order one).

Why these numbers:

- float64: both sides compute the same formulas in IEEE double; only summation order inside BLAS
  differs, so differences stay within a few hundred ulp of the values (~1e-14 observed across the
  parity suite). 1e-10 leaves four orders of magnitude of margin and still catches every real
  mistake (a tanh GELU for an erf GELU is ~1e-4; an eps of 1e-12 for 1e-5 is ~1e-6).
- float32: torch and NumPy use different GEMM kernels and reduction orders, so each side carries
  its own rounding of ~1e-7 relative per operation, amplified through L layers, LayerNorm (divides
  by a standard deviation) and softmax. The largest difference observed in the parity and property
  suites (weights ~N(0, 0.5^2), up to 3 layers) was ~4e-6 relative to the tensor's scale; 5e-5
  keeps a 10x margin. The decisive checks are the float64 ones.
"""

from __future__ import annotations

import numpy as np

TOL = {"float64": 1e-10, "float32": 5e-5}

# The same formulas in the same order, but BLAS may pick another kernel (blocking, FMA use) for
# another call shape: a half batch instead of the whole one, one row instead of many. Each GEMM
# then rounds differently by a few ulp; through a few tiny layers that stays far below these
# bounds (observed: float32 9e-8 on logits of magnitude ~0.2 on an AVX2 machine, 0 on AVX-512).
# Bitwise equality is asserted only where the BLAS calls are the same.
REORDERED = {"float64": 1e-13, "float32": 2e-6}


def max_scaled_error(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected))) / scale


def assert_close(actual, expected, dtype: str, name: str = "value", table: dict = TOL) -> None:
    """Shape first, then values under ``table[dtype]`` (default :data:`TOL`); the message reports
    the error found."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual) == np.isfinite(expected)), f"{name}: non-finite values differ"
    finite = np.isfinite(expected)
    err = max_scaled_error(actual[finite], expected[finite])
    assert err <= table[dtype], f"{name}: scaled max error {err:.3e} > {table[dtype]:.0e} ({dtype})"


# Central finite differences (L(x+h) - L(x-h)) / 2h in float64 with h = 1e-5, against the
# backward's gradient, scaled like TOL (by max(1, max|gradient of that tensor|)). The difference
# quotient is off by its truncation term h^2 L'''(x) / 6 (~1e-10 for the tests' tiny models with
# O(1) curvature) plus the rounding of L, eps |L| / h (~1e-11); a crossed kink of a relu-like
# activation adds O(h). Observed over tests/test_backward.py's cases: <= 1.1e-10; 1e-8 leaves a
# 90x margin, while a wrong derivative (a missing term, a factor) is off by 1e-3 or more.
FINITE_DIFFERENCE = 1e-8
