"""Checkpoint files: the one place for each fact about them.

* :mod:`refimpl.io.base`: :class:`CheckpointError`; the dtype table (:data:`DTYPES`: torch/NumPy
  name, NumPy storage dtype, safetensors name); the bfloat16 converters; :func:`parse_dtype` (the
  dtypes refimpl computes in); :func:`read_json`, the one reader that turns a malformed JSON file
  into the caller's project error naming the path; :func:`short_repr`, the bounded quoting of file
  content in messages.
* :mod:`refimpl.io.safetensors_files`: :func:`read_safetensors` (memory-mapped, zero-copy, validated
  by the ``safetensors`` library too) and :func:`write_safetensors` (the one writer: the library,
  a temporary file, fsync, rename).
* :mod:`refimpl.io.folders`: the one weight-file locator (:func:`locate_weights`, confined to the
  folder), :func:`read_weights` (safetensors or ``.bin``, sharded or not) and the one list of
  tokenizer files (:data:`TOKENIZER_FILES`).
* :mod:`refimpl.io.atomic`: SIGTERM/SIGHUP handled like Ctrl-C during writes, fsync, recognisable
  temporary names.

``.bin``/``.pt`` pickles are read by :mod:`refimpl.torch_pickle`, which builds on
:mod:`refimpl.io.base`.
"""

from .atomic import Interrupted, interrupt_on_signals, signals_ignored
from .base import (
    BF16_BITS,
    BY_NAME,
    BY_SAFETENSORS,
    COMPUTE_DTYPES,
    DTYPES,
    FLOAT_DTYPES,
    CheckpointError,
    DType,
    bf16_bits_to_float32,
    dtype_name_of,
    float32_to_bf16_bits,
    is_float_weight,
    loads_json,
    os_error,
    parse_dtype,
    read_json,
    safetensors_name_of,
    short_repr,
    to_compute_dtype,
)
from .folders import (
    TOKENIZER_FILES,
    WEIGHT_FORMATS,
    WeightFiles,
    has_tokenizer,
    locate_weights,
    read_shard_index,
    read_weights,
    tokenizer_files,
    weight_files,
    weights_format,
)
from .safetensors_files import read_safetensors, safetensors_metadata, write_safetensors

__all__ = [
    "BF16_BITS", "BY_NAME", "BY_SAFETENSORS", "COMPUTE_DTYPES", "DTYPES", "FLOAT_DTYPES", "CheckpointError", "DType",
    "Interrupted", "TOKENIZER_FILES", "WEIGHT_FORMATS", "WeightFiles", "bf16_bits_to_float32", "dtype_name_of",
    "float32_to_bf16_bits", "has_tokenizer", "interrupt_on_signals", "is_float_weight", "loads_json",
    "locate_weights", "os_error", "parse_dtype", "read_json", "read_safetensors", "read_shard_index", "read_weights",
    "safetensors_metadata", "safetensors_name_of", "short_repr", "signals_ignored", "to_compute_dtype",
    "tokenizer_files", "weight_files", "weights_format", "write_safetensors",
]
