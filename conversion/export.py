"""Export a refimpl :class:`~refimpl.model.Model` as a folder that transformers loads.

What is written (as transformers' ``save_pretrained`` writes it):

* ``config.json``: the config with ``architectures`` (the task's RobertaPreLayerNorm* class),
  ``model_type`` (``roberta-prelayernorm``) and ``dtype``;
* ``model.safetensors``, written with the ``safetensors`` library (metadata ``{"format": "pt"}``),
  or, above ``max_shard_size``, shards ``model-00001-of-0000N.safetensors`` and
  ``model.safetensors.index.json`` (``{"metadata": {"total_parameters", "total_size"},
  "weight_map"}``) split by huggingface_hub's splitter, the one transformers uses;
* the keys of the task's transformers class: the pooler only where that class builds one; a tied
  decoder weight (``lm_head.decoder.weight``) and its bias alias omitted, an untied one written
  with ``lm_head.decoder.bias`` as transformers writes it;
* the tokenizer files of ``tokenizer_from`` (a folder), when it has any.

Dtypes: float32 and float64 are written as they are; float16 by IEEE round-to-nearest-even
(NumPy's cast); bfloat16 by round-to-nearest-even of the float32 value to its top 16 bits, as
torch does (NaN stays a quiet NaN). A finite value that overflows the target dtype is an error.

Atomicity: everything is written into a temporary folder beside the destination, which is renamed
into place at the end. An existing destination is refused unless ``force``; then the old one is
moved aside, the new one renamed in, and the old one deleted (two renames: no moment without a
complete folder under one of the two names). Any exception, KeyboardInterrupt included, removes
the temporary folder and leaves the destination as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from refimpl.backend import to_numpy
from refimpl.model import Model
from refimpl.params import TASKS, hf_key_table, iter_leaves

from .hf import TOKENIZER_FILES
from .keymap import ConversionError

OUT_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}
_ST_NAMES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}  # TensorSpec names
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
WEIGHTS_NAME, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


@dataclass
class ExportSummary:
    path: str
    task: str
    architecture: str
    dtype: str
    tensors: int
    parameters: int  # distinct parameters (what transformers' num_parameters() counts)
    bytes: int  # tensor bytes written (the index's total_size)
    shards: int
    files: list[str]

    def line(self) -> str:
        return (
            f"wrote {self.path}: {self.architecture} ({self.task}), {self.tensors} tensors, "
            f"{self.parameters:,} parameters, {self.bytes:,} bytes in {self.shards} "
            f"shard{'s' if self.shards != 1 else ''}, {self.dtype}"
        )


# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch does. [...] -> [...]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # keep it a (quiet) NaN
    return out


def cast(a: Any, dtype: str, name: str = "tensor") -> np.ndarray:
    """A parameter as a C-contiguous little-endian NumPy array of ``dtype`` (bfloat16: uint16 bits)."""
    a = to_numpy(a) if not isinstance(a, np.ndarray) else a
    if dtype == "bfloat16":
        out = float32_to_bfloat16_bits(a)
        overflow = np.isfinite(a) & ((out & np.uint16(0x7F80)) == np.uint16(0x7F80))
    else:
        target = np.dtype(dtype).newbyteorder("<")
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(a, dtype=target)
        overflow = np.isfinite(a) & ~np.isfinite(out) if out.dtype != a.dtype else None
    if overflow is not None and overflow.any():
        i = np.unravel_index(int(np.argmax(overflow)), a.shape) if a.ndim else ()
        raise ConversionError(f"{name}: the value {float(a[i])!r} overflows {dtype}; export in a wider dtype")
    return out


def _write_safetensors(path: str, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str]) -> None:
    """Write ``{name: (safetensors dtype, array)}`` with the safetensors library (any dtype, BF16 included)."""
    import safetensors

    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.7: zero-copy specs
        specs = {
            k: safetensors.TensorSpec(dtype=_ST_NAMES[dt], shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
            for k, (dt, a) in tensors.items()
        }
    else:  # older safetensors: dicts with the bytes
        specs = {k: {"dtype": _ST_NAMES[dt], "shape": list(a.shape), "data": a.tobytes()} for k, (dt, a) in tensors.items()}
    safetensors.serialize_file(specs, path, metadata=metadata)


def parse_size(size: int | str) -> int:
    """``5GB`` (10^9), ``500MiB`` (2^20), ``1KB``, ``123`` -> bytes, as huggingface_hub reads max_shard_size."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ConversionError(f"max_shard_size {size!r} is not a size such as 5GB, 500MB or 1000000")
        unit = (m.group(2) or "B").upper()
        mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ConversionError(f"max_shard_size must be positive, got {size!r}")
    return n


# ---------------------------------------------------------------------------------------------
# What to write
# ---------------------------------------------------------------------------------------------


def export_state_dict(model: Model) -> dict[str, Any]:
    """The model's tensors under the names transformers' class for ``model.task`` saves.

    The pooler only where that class has one; the tied decoder weight omitted; an untied decoder
    written with its bias alias ``lm_head.decoder.bias``. Arrays are the model's own (no copy).
    """
    task = model.task
    has_pooler = TASKS[task][2]
    if has_pooler and model.params.pooler is None and task == "multiple-choice":
        raise ConversionError("multiple choice scores the pooler output and this model has no pooler weights")
    leaves = dict(iter_leaves(model.params))
    out: dict[str, Any] = {}
    for e in hf_key_table(model.config, task, with_pooler=has_pooler and model.params.pooler is not None):
        if e.path == "lm_head.decoder_weight" and model.config.tie_word_embeddings:
            continue
        out[e.key] = leaves[e.path]
    if "lm_head.decoder.weight" in out:
        out["lm_head.decoder.bias"] = leaves["lm_head.bias"]  # transformers writes the alias of an untied head
    return out


def export_config(model: Model, dtype: str) -> dict[str, Any]:
    d = model.config.to_dict()
    d.pop("torch_dtype", None)
    d["architectures"] = [TASKS[model.task][0]]
    d["dtype"] = dtype
    return d


# ---------------------------------------------------------------------------------------------
# Writing, atomically
# ---------------------------------------------------------------------------------------------


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def export(
    model: Model,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    tokenizer_from: str | os.PathLike | None = None,
    progress: bool = False,
) -> ExportSummary:
    """Write ``model`` to the folder ``dst`` (see the module docstring); returns what was written.

    dtype: ``float32``, ``float64``, ``float16`` or ``bfloat16`` (default: the model's dtype).
    progress: a tqdm bar over the tensors on stderr.
    """
    dst = os.path.abspath(os.fspath(dst))
    dtype = dtype or np.dtype(model.dtype).name
    if dtype not in OUT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(OUT_DTYPES)}; got {dtype!r}")
    limit = parse_size(max_shard_size)
    if os.path.lexists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; pass force=True (--force) to replace it")
    state = export_state_dict(model)
    config = export_config(model, dtype)

    from huggingface_hub import split_state_dict_into_shards_factory

    itemsize = _ITEMSIZE[dtype]
    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda a: int(np.prod(a.shape, dtype=np.int64)) * itemsize,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=limit,
    )
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    except OSError as e:  # name the folder asked for, not the temporary one beside it
        raise type(e)(f"cannot write {dst!r}: {e.strerror or e}") from None
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(state), unit="tensor", desc="writing", file=sys.stderr, leave=False)
        for filename, names in split.filename_to_tensors.items():
            shard = {k: (OUT_DTYPES[dtype], cast(state[k], dtype, k)) for k in names}
            _write_safetensors(os.path.join(tmp, filename), shard, {"format": "pt"})
            del shard
            if bar is not None:
                bar.update(len(names))
        if bar is not None:
            bar.close()
        seen: set[int] = set()
        n_params = 0
        for a in state.values():
            if id(a) not in seen:
                seen.add(id(a))
                n_params += int(np.prod(a.shape, dtype=np.int64))
        if split.is_sharded:
            index = {"metadata": {"total_parameters": n_params, **split.metadata}, "weight_map": split.tensor_to_filename}
            with open(os.path.join(tmp, WEIGHTS_INDEX), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_from is not None and os.path.isdir(tokenizer_from):
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_from, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
        files = sorted(os.listdir(tmp))
        for name in files:  # mkdtemp and safetensors create owner-only files; give them a normal folder's modes
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        _commit(tmp, dst, force)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError) and tmp in str(e):
            # (disk full, permissions): name the folder asked for, not the temporary one beside it
            raise type(e)(f"cannot write {dst!r}: {e.strerror or e}") from None
        raise
    return ExportSummary(
        path=dst, task=model.task, architecture=TASKS[model.task][0], dtype=dtype, tensors=len(state),
        parameters=n_params, bytes=int(split.metadata["total_size"]), shards=len(split.filename_to_tensors), files=files,
    )


def _commit(tmp: str, dst: str, force: bool) -> None:
    """Rename the finished ``tmp`` to ``dst``; with ``force``, swap out an existing ``dst``."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if not force:
        raise FileExistsError(f"{dst} already exists; pass force=True (--force) to replace it")
    old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _remove(old)
