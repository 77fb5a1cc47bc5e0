"""Hugging Face folders as a conversion source: which floating dtype holds a checkpoint's weights.

Finding and reading the weight files (safetensors or ``.bin``, sharded or not, an index confined to
its folder) is :func:`refimpl.io.read_weights`; ``.bin`` files are read by
:mod:`refimpl.torch_pickle` (NumPy only, no code from the file runs), with bfloat16 kept as bits
and labelled ``BF16`` so that the loader converts them exactly and the converter knows the source
dtype.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from refimpl.io import BY_SAFETENSORS, FLOAT_DTYPES


def dominant_dtype(state: dict[str, Any], dtypes: dict[str, str]) -> str:
    """The floating dtype that holds most of the checkpoint's parameters (``"float32"`` when none)."""
    count: Counter = Counter()
    for k, a in state.items():
        entry = BY_SAFETENSORS.get(dtypes.get(k, ""))
        if entry is not None and entry.name in FLOAT_DTYPES:
            count[entry.name] += int(np.prod(a.shape, dtype=np.int64))
    return count.most_common(1)[0][0] if count else "float32"
