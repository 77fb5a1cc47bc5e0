"""The one tolerance table: every threshold refimpl and its tests compare with, named, with its reason.

Three ways of measuring a difference are used, each stated with the entries that use it:

- ``scaled``: ``max|actual - expected| <= bound * max(1, max|expected|)``: an absolute bound for
  values of order one, relative to the tensor's largest magnitude beyond that (logits over a
  vocabulary reach tens; LayerNorm outputs and probabilities are of order one). The tests' parity
  checks use it.
- ``elementwise``: ``|actual - expected| <= bound + bound * |expected|`` for every element (atol =
  rtol = bound): the golden comparison profiles (``refimpl compare``).
- ``ulp``: ``|actual - expected| <= bound * eps(dtype) * scale``, in units in the last place, for
  the kernels against their NumPy definitions (the scale is stated where used).

The float64 entries are the decisive ones; float32 entries are measured maxima with a stated margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Tolerance:
    """A bound per dtype name (``"float64"``, ``"float32"``, ...), how it is measured, and why."""

    bounds: Mapping[str, float]
    kind: str  # "scaled", "elementwise" or "ulp"
    why: str

    def __getitem__(self, dtype) -> float:
        return self.bounds[getattr(dtype, "name", str(dtype))]

    def __contains__(self, dtype) -> bool:
        return getattr(dtype, "name", str(dtype)) in self.bounds


def _t(kind: str, why: str, **bounds: float) -> Tolerance:
    return Tolerance(MappingProxyType(bounds), kind, " ".join(why.split()))


# ---------------------------------------------------------------------------------------------
# refimpl against other implementations
# ---------------------------------------------------------------------------------------------

PARITY = _t("scaled", """
    refimpl against transformers' RobertaPreLayerNorm* (torch) on the same weights and inputs. float64:
    both sides compute the same formulas in IEEE double and only summation order inside BLAS differs,
    ~1e-14 observed across the parity suite: 1e-10 leaves four orders of magnitude of margin and still
    catches every real mistake (a tanh GELU for an erf GELU is ~1e-4; an eps of 1e-12 for 1e-5 is
    ~1e-6). float32: each side carries its own rounding of ~1e-7 relative per operation, amplified
    through L layers, LayerNorm and softmax; the largest difference observed in the parity and
    property suites (weights ~N(0, 0.5^2), up to 3 layers) was ~4e-6: 5e-5 keeps a 10x margin.""",
    float64=1e-10, float32=5e-5)

FAIRSEQ = _t("scaled", """
    refimpl against the outputs fairseq saved for the shipped fairseq checkpoint (tests/data), at
    non-pad positions. fairseq computed them in float32, so both refimpl dtypes are within float32
    rounding of them: 3.6e-7 (float32) and 3.7e-7 (float64) observed; 2e-6 is a 5x margin.""",
    float64=2e-6, float32=2e-6)

FLOAT32_REFERENCE = _t("scaled", """
    refimpl in float64 against an implementation that computed in float32 (transformers' float32
    pipelines): float32 rounding only, ~1e-6 observed on the tiny test models; 5e-6.""",
    float64=5e-6)

ACTIVATION = _t("elementwise", """
    refimpl's activation functions against transformers' ACT2FN in float64 on [-12, 12]: the same
    closed forms evaluated by libm (erf, tanh, exp) on both sides, a few ulp apart: 1e-13 relative
    (atol 1e-15 for values that underflow towards zero).""",
    float64=1e-13)

HUB_INTEGRATION = _t("elementwise", """
    The real andreasmadsen/efficient_mlm_m0.40 against the logits and hidden-state slices that
    transformers' own integration test publishes (rounded to 4 decimals there): atol 1e-4, as that
    test uses.""",
    float32=1e-4)

# ---------------------------------------------------------------------------------------------
# refimpl against itself
# ---------------------------------------------------------------------------------------------

REORDERED = _t("scaled", """
    The same formulas in the same order, but BLAS may pick another kernel (blocking, FMA use) for
    another call shape: a half batch instead of the whole one, one row instead of many, kept
    logits instead of all. Each GEMM then rounds differently by a few ulp; through a few tiny layers
    that stays far below these bounds (observed: float32 9e-8 on logits of magnitude ~0.2 on an AVX2
    machine, 0 on AVX-512). Bitwise equality is asserted only where the BLAS calls are the same.""",
    float64=1e-13, float32=2e-6)

FAST = _t("scaled", """
    The fast path (refimpl.fast) against the reference (refimpl.tasks): the same equations in the same
    order, but other BLAS call shapes (see REORDERED), the kernels' own erf and exp (float64 within 2
    ulp of the truth where libm is within 1; float32 correctly rounded where glibc's erff is within 1
    ulp), and softmax/LayerNorm rounding of a few ulp, compounded through the layers. Observed on
    2-layer random models (tests/test_fast.py, every task, all outputs): float64 1.3e-15, float32
    1.4e-6 relative to the tensor's scale.""",
    float64=1e-13, float32=5e-6)

CACHED = _t("scaled", """
    Decoding in chunks with the KV cache against one full pass, float64: the cached keys and values are
    the very arrays the full pass computes, and only the attention GEMMs see other shapes (a chunk of
    queries against all keys); ~2e-15 observed. 1e-12 is far tighter than PARITY: a cache that drops,
    repeats or misplaces a position moves the logits by far more.""",
    float64=1e-12)

SCALED_SCORES = _t("elementwise", """
    The traced attention scores against q k^T / sqrt(D) recomputed from the traced q and k: the
    reference multiplies by D**-0.5, the check divides by sqrt(D): one rounding apart (1e-14).""",
    float64=1e-14)

JSON_FLOATS = _t("elementwise", """
    Scores and vectors printed by the CLI as JSON against the arrays: printed with enough digits that
    the float32 values survive to ~1e-8; 1e-7 absolute.""",
    float32=1e-7)

FINITE_DIFFERENCE = _t("scaled", """
    The written-out backward (refimpl.backward) against central finite differences
    (L(x + h) - L(x - h)) / 2h of the float64 reference forward, h = 1e-5, at random coordinates of
    every parameter and of inputs_embeds, scaled by the largest gradient of that tensor. The quotient
    itself is off by its truncation term, h^2/6 times the third derivative (~1e-10 on the tests' tiny
    models), plus the rounding of L over h (~1e-11); crossing a kink of a relu-like activation adds
    O(h). Observed: <= 1.1e-10 (tests/test_backward.py): 1e-8 keeps a 90x margin, while a wrong
    derivative (a missing term, a factor) is off by 1e-3 or more.""",
    float64=1e-8)

# The kernels against their NumPy definitions, in ulps (measured maxima on the tests' inputs in why).
KERNEL_ULPS = {
    "gelu": _t("ulp", """
        |bias_gelu - ops.gelu(y + b)| <= bound * eps * |y + b|: the error of erf propagated through
        x/2 * (1 + erf) (for negative inputs the result is tiny while its rounding is not); measured
        1.0 (float32) / 1.8 (float64).""", float32=2, float64=4),
    "erf": _t("ulp", """
        erf against libm's (glibc: ~1 ulp from the truth on both sides; the kernels': float32 correctly
        rounded, float64 within 2 ulp); measured 1 / 2.""", float32=1, float64=3),
    "exp": _t("ulp", """
        exp against NumPy's (NumPy uses its own SIMD exp; the kernels' is within 1 ulp of the truth);
        measured 1 / 1.""", float32=2, float64=2),
    "softmax": _t("ulp", """
        softmax probabilities: exp, the sum and the division each round (and NumPy's exp differs from
        the kernels' by an ulp or two), on identical inputs in identical summation order; measured
        6 / 4.""", float32=8, float64=8),
    "dot": _t("ulp", """
        the packed GEMM (refimpl.fast.packed) against the exact x @ W^T + b, per element:
        |y - exact| <= bound * eps * K * (|x| @ |W|^T + |b|), the classical worst-case bound of a
        K-term dot product in any summation order (Higham's gamma_K, with the bias add), so the
        bound holds whatever order BLAS would have used too; measured (37 x 70 outputs, 5 seeds) at
        most 0.1 / 0.17 of it (float32 / float64) at K = 13, 0.0025 / 0.0022 at K = 768.""",
        float32=1, float64=1),
}

# ---------------------------------------------------------------------------------------------
# The golden comparison profiles (refimpl compare): a candidate computing in <dtype> against a
# float64 golden, elementwise. Measured in docs/golden.md ("Accuracy table"); every number there
# is reproduced by scripts/accuracy_table.py.
# ---------------------------------------------------------------------------------------------

GOLDEN_PROFILES: dict[str, Tolerance] = {
    "float64": _t("elementwise", """
        the same formulas in IEEE double; only BLAS summation order differs: torch float64 needs 6e-15
        on every traced tensor. 1e-10 keeps four orders of margin and still catches every real mistake
        (a LayerNorm eps of 1e-12 for 1e-5 moves values by ~1e-6).""", float64=1e-10),
    "float32": _t("elementwise", """
        torch float32 and refimpl float32 need <= 4.7e-6 on every traced tensor (tiny std-0.5 and
        roberta-base-shaped models, with and without padding): 1e-4 leaves a 20x margin for deeper
        models, and still catches tanh GELU for erf GELU (up to 4.7x over tolerance at |x| ~ 2.7).""",
        float32=1e-4),
    "float16": _t("elementwise", """
        torch float16 needs 1.9e-2 on a roberta-base-shaped model (2.6x margin). Models with saturated
        attention (tiny std-0.5 weights, scores in the tens) need ~8e-2: pass --rtol/--atol.""",
        float16=5e-2),
    "bfloat16": _t("elementwise", """
        torch bfloat16 (8-bit significand) needs 2.9e-2 on a roberta-base-shaped model (3.4x margin);
        the tiny std-0.5 models need ~0.15: pass --rtol/--atol.""", bfloat16=1e-1),
}


def profile_bound(profile: str) -> float:
    """The elementwise bound (rtol = atol) of a golden comparison profile."""
    return GOLDEN_PROFILES[profile][profile]
