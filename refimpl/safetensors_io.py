"""Reading safetensors files as memory-mapped NumPy arrays, and Hugging Face folders.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and a data
block. Every tensor is a view into one read-only ``numpy.memmap`` of the file: nothing is copied
until a dtype conversion asks for it. The header is validated before any view is made.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be; the message says why."""


# safetensors dtype -> NumPy dtype. BF16 has no NumPy dtype: its raw bits are read as uint16.
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits up. Exact. [...] -> [...] float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """-> (tensors as read-only memmap views, their safetensors dtype names, the file's metadata)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) if data_size else np.zeros(0, np.uint8)
    tensors, dtypes = {}, {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}: {info!r}") from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
            raise CheckpointError(f"{path}: malformed header entry for {name!r}: data_offsets must be integers, got {info!r}")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype_name}, which refimpl cannot read")
        dtype = DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(d < 0 for d in shape) or not (0 <= begin <= end <= data_size) or end - begin != count * dtype.itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} (dtype {dtype_name}, shape {shape}) does not match its byte range "
                f"[{begin}, {end}) in a {data_size}-byte data block (truncated or corrupt file)"
            )
        tensors[name] = mm[begin:end].view(dtype).reshape(shape)
        dtypes[name] = dtype_name
    return tensors, dtypes, metadata


def to_compute_dtype(array: np.ndarray, source_dtype: str, dtype: np.dtype) -> np.ndarray:
    """A checkpoint tensor in the compute dtype; the same (mmap) array when it already matches."""
    if source_dtype == "BF16":
        array = bf16_bits_to_float32(array)
    if array.dtype == dtype:
        return array
    return array.astype(dtype)


def read_hf_safetensors_folder(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    folder = os.fspath(folder)
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        tensors, dtypes, _ = read_safetensors(single)
        return tensors, dtypes
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        tensors, dtypes = {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"{index} lists the shard {shard!r}, which is not in {folder!r}")
            t, d, _ = read_safetensors(shard_path)
            tensors.update(t)
            dtypes.update(d)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensors listed but absent from their shards: {', '.join(missing[:10])}")
        return tensors, dtypes
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder!r}")


def metadata_of(path: str | os.PathLike) -> dict[str, Any]:
    return read_safetensors(path)[2]


# The dtypes refimpl computes in (checkpoints in other dtypes are converted on load).
COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64}


def parse_dtype(dtype) -> type:
    """``"float32"``/``"float64"`` (or the NumPy dtype) -> the NumPy scalar type refimpl computes in;
    anything else is a ``ValueError`` that says which dtypes exist."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name if dtype is not None else None
    except TypeError:
        name = None
    if name not in COMPUTE_DTYPES:
        why = (
            " (float16/bfloat16 checkpoints are converted on load; refimpl computes in float32 or float64)"
            if name in ("float16", "bfloat16", "half") else ""
        )
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {dtype!r}{why}")
    return COMPUTE_DTYPES[name]
