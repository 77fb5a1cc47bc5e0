"""The tests' view of the one tolerance table (:mod:`refimpl.tolerances`, where every entry has
its reason) and the two helpers that apply its ``scaled`` entries.

``TOL`` is the parity entry (refimpl against transformers); the others are imported by name.
"""

from __future__ import annotations

import numpy as np

from refimpl.tolerances import (  # noqa: F401  (re-exported for the tests)
    ACTIVATION,
    CACHED,
    FAIRSEQ,
    FAST,
    FINITE_DIFFERENCE,
    FLOAT32_REFERENCE,
    GOLDEN_PROFILES,
    HUB_INTEGRATION,
    JSON_FLOATS,
    KERNEL_ULPS,
    PARITY,
    REORDERED,
    SCALED_SCORES,
)

TOL = PARITY


def max_scaled_error(actual, expected) -> float:
    """``max|actual - expected| / max(1, max|expected|)`` (the ``scaled`` measure)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.size == 0:
        return 0.0
    scale = max(1.0, float(np.max(np.abs(expected))))
    return float(np.max(np.abs(actual - expected))) / scale


def assert_close(actual, expected, dtype: str, name: str = "value", table=TOL) -> None:
    """Shape first, then values under ``table[dtype]`` (a ``scaled`` entry, default :data:`TOL`);
    the message reports the error found."""
    assert table.kind == "scaled", table
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual) == np.isfinite(expected)), f"{name}: non-finite values differ"
    finite = np.isfinite(expected)
    err = max_scaled_error(actual[finite], expected[finite])
    assert err <= table[dtype], f"{name}: scaled max error {err:.3e} > {table[dtype]:.0e} ({dtype})"

