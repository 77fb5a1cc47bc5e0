"""Hugging Face model folders: safetensors (single or sharded) and ``pytorch_model.bin`` (single or sharded).

``.bin`` files are read by :mod:`refimpl.torch_pickle` (NumPy only, no code from the file runs).
bfloat16 tensors are kept as their raw bits and labelled ``BF16`` so that the loader converts them
exactly and the converter knows the source dtype.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np

from refimpl.safetensors_io import read_hf_safetensors_folder

from .keymap import ConversionError
from refimpl.torch_pickle import load_state_dict

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files a tokenizer may consist of; copied next to an export when the source folder has them.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt",
)

_NUMPY_TO_SAFETENSORS = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
                         "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
SAFETENSORS_TO_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def weights_kind(folder: str) -> str | None:
    """``"safetensors"`` or ``"bin"`` (safetensors wins when a folder has both), or None."""
    for kind, names in (("safetensors", SAFETENSORS), ("bin", BIN)):
        if any(os.path.isfile(os.path.join(folder, n)) for n in names):
            return kind
    return None


def _shard_files(folder: str, index: str) -> list[str]:
    path = os.path.join(folder, index)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{path}: not a weight index with a weight_map ({e})") from None
    for name in files:
        if not isinstance(name, str) or not os.path.isfile(os.path.join(folder, name)):
            raise ConversionError(f"{path} lists the shard {name!r}, which is not in {folder!r}")
    return [os.path.join(folder, n) for n in files]


def read_bin_folder(folder: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of ``pytorch_model.bin`` or of the shards of ``pytorch_model.bin.index.json``."""
    single = os.path.join(folder, BIN[0])
    files = [single] if os.path.isfile(single) else _shard_files(folder, BIN[1])
    state: dict[str, np.ndarray] = {}
    for path in files:
        part = load_state_dict(path, bfloat16="bits")
        clash = sorted(set(part) & set(state))
        if clash:
            raise ConversionError(f"{path} repeats tensors found in another shard: {', '.join(clash[:5])}")
        state.update(part)
    return state, {k: bin_dtype_name(a) for k, a in state.items()}


def bin_dtype_name(a: np.ndarray) -> str:
    """The safetensors dtype name of an array read by torch_pickle (bfloat16 bits -> ``BF16``)."""
    meta = a.dtype.metadata or {}
    if meta.get("torch_dtype") == "bfloat16":
        return "BF16"
    return _NUMPY_TO_SAFETENSORS.get(a.dtype.name, a.dtype.name)


def read_folder(folder: str, kind: str | None = None) -> tuple[dict[str, Any], dict[str, str], str]:
    """-> (state dict of read-only arrays, safetensors dtype names, ``"safetensors"`` or ``"bin"``)."""
    kind = kind or weights_kind(folder)
    if kind == "safetensors":
        state, dtypes = read_hf_safetensors_folder(folder)
        return state, dtypes, kind
    if kind == "bin":
        if not any(os.path.isfile(os.path.join(folder, n)) for n in BIN):
            raise ConversionError(f"no {BIN[0]} or {BIN[1]} in {folder!r}")
        state, dtypes = read_bin_folder(folder)
        return state, dtypes, kind
    raise ConversionError(
        f"no weights in {folder!r}: looked for {', '.join(SAFETENSORS + BIN)}"
    )


def dominant_dtype(state: dict[str, Any], dtypes: dict[str, str]) -> str:
    """The floating dtype that holds most of the checkpoint's parameters (``"float32"`` when none)."""
    count: Counter = Counter()
    for k, a in state.items():
        name = SAFETENSORS_TO_NAME.get(dtypes.get(k, ""))
        if name:
            count[name] += int(np.prod(a.shape, dtype=np.int64))
    return count.most_common(1)[0][0] if count else "float32"
