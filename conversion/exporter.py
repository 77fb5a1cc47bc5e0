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

Atomicity: everything is written into a temporary folder beside the destination
(``.DST.refimpl-tmp-HOST-PID-RANDOM``), each file fsynced, and the folder renamed into place at the
end. An existing destination is refused unless ``force``, and ``force`` replaces only a folder
that this tool could have written (nothing but ``config.json``, ``model*.safetensors``, the shard
index and tokenizer files, as regular files) or an empty one; never a symbolic link, a file, a
folder holding anything else, nor a folder that holds the source. The replacement is one step on
Linux (``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically, then the old version is
deleted); elsewhere it is two renames, the old version parked as ``.DST.refimpl-old-...``.

Any exception, Ctrl-C, SIGTERM or SIGHUP removes the temporary folder and any parent folder the
export created, and leaves the destination as it was (a write that fails half-way, such as a full
disk or a file size limit, is an ``OSError`` naming the file). SIGKILL cannot be caught: it leaves
the temporary folder (and, between the two renames of the non-Linux replacement, the old version
under its ``.refimpl-old-`` name with DST missing). The next export into the same parent folder
removes such leftovers of dead processes on the same host (and puts a parked old version back
where DST is missing); it recognises them by name and touches nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from refimpl.backend import to_numpy
from refimpl.io import (
    BF16_BITS,
    BY_NAME,
    FLOAT_DTYPES,
    TOKENIZER_FILES,
    WEIGHT_FORMATS,
    float32_to_bf16_bits,
    interrupt_on_signals,
    os_error,
    short_repr,
    signals_ignored,
    write_safetensors,
)
from refimpl.io import atomic
from refimpl.io.atomic import fsync_dir, fsync_file, remove_tree, stale_temp_owner, swap_in, temp_name
from refimpl.model import Model
from refimpl.params import TASKS, hf_key_table, iter_leaves

from .keymap import ConversionError

OUT_DTYPES = FLOAT_DTYPES  # the dtypes an export may be written in
(_, WEIGHTS_NAME, WEIGHTS_INDEX), = [w for w in WEIGHT_FORMATS if w[0] == "safetensors"]
# The files an export writes: a folder holding only these (or nothing) may be replaced by --force.
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors\Z")
EXPORT_FILES = ("config.json", WEIGHTS_NAME, WEIGHTS_INDEX, *TOKENIZER_FILES)


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


def cast(a: Any, dtype: str, name: str = "tensor") -> np.ndarray:
    """A parameter as a C-contiguous little-endian NumPy array of ``dtype`` (bfloat16: its bits,
    dtype :data:`refimpl.io.BF16_BITS`)."""
    a = to_numpy(a) if not isinstance(a, np.ndarray) else a
    if dtype == "bfloat16":
        out = float32_to_bf16_bits(a).view(BF16_BITS)
        overflow = np.isfinite(a) & ((out & np.uint16(0x7F80)) == np.uint16(0x7F80))
    else:
        target = np.dtype(dtype).newbyteorder("<")
        with np.errstate(over="ignore"):
            out = np.asarray(a, dtype=target, order="C")
        overflow = np.isfinite(a) & ~np.isfinite(out) if out.dtype != a.dtype else None
    if overflow is not None and overflow.any():
        i = np.unravel_index(int(np.argmax(overflow)), a.shape) if a.ndim else ()
        raise ConversionError(f"{name}: the value {float(a[i])!r} overflows {dtype}; export in a wider dtype")
    return out


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


def export(
    model: Model,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    force: bool = False,
    tokenizer_from: str | os.PathLike | None = None,
    progress: bool = False,
    sources: tuple = (),
) -> ExportSummary:
    """Write ``model`` to the folder ``dst`` (see the module docstring); returns what was written.

    dtype: ``float32``, ``float64``, ``float16`` or ``bfloat16`` (default: the model's dtype).
    force: replace ``dst`` if it is a folder this tool could have written (or an empty one).
    sources: the checkpoint files/folders the model was read from: ``force`` never replaces a
    folder holding one of them (nor ``tokenizer_from``). progress: a tqdm bar over the tensors on stderr.
    """
    dst = os.path.abspath(os.fspath(dst))
    dtype = dtype or np.dtype(model.dtype).name
    if dtype not in OUT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(OUT_DTYPES)}; got {dtype!r}")
    limit = parse_size(max_shard_size)
    protected = [os.fspath(p) for p in (*sources, tokenizer_from) if p is not None]
    if os.path.lexists(dst):
        if not force:
            raise FileExistsError(f"{dst} already exists; pass force=True (--force) to replace it")
        check_replaceable(dst, protected)
    state = export_state_dict(model)
    config = export_config(model, dtype)

    from huggingface_hub import split_state_dict_into_shards_factory

    itemsize = BY_NAME[dtype].numpy.itemsize
    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda a: int(np.prod(a.shape, dtype=np.int64)) * itemsize,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=limit,
    )
    parent = os.path.dirname(dst)
    if os.path.isdir(parent):
        sweep_stale(parent)
    created: list[str] = []
    tmp = temp_name(dst)
    committed = False
    try:
        with interrupt_on_signals():
            created = _make_parents(parent)
            os.mkdir(tmp)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(state), unit="tensor", desc="writing", file=sys.stderr, leave=False)
            for filename, names in split.filename_to_tensors.items():
                shard = {k: cast(state[k], dtype, k) for k in names}
                write_safetensors(os.path.join(tmp, filename), shard, {"format": "pt"})
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
                index = {"metadata": {"total_parameters": n_params, **split.metadata},
                         "weight_map": split.tensor_to_filename}
                _write_text(os.path.join(tmp, WEIGHTS_INDEX), json.dumps(index, indent=2, sort_keys=True) + "\n")
            _write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
            if tokenizer_from is not None and os.path.isdir(tokenizer_from):
                for name in TOKENIZER_FILES:
                    src = os.path.join(tokenizer_from, name)
                    if os.path.isfile(src):
                        shutil.copyfile(src, os.path.join(tmp, name))
                        fsync_file(os.path.join(tmp, name))
            files = sorted(os.listdir(tmp))
            fsync_dir(tmp)
            with signals_ignored():  # the commit is not interrupted half-way
                _commit(tmp, dst, protected)
                fsync_dir(parent)
                committed = True
    except BaseException as e:
        if committed:  # a signal right after the commit: DST holds the new export
            e.refimpl_written = dst
            raise
        with signals_ignored():
            remove_tree(tmp)
            for folder in reversed(created):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
        if isinstance(e, OSError) and not isinstance(e, FileExistsError) and tmp in str(e):
            # (disk full, a file size limit, permissions): name the folder asked for, not the temporary one
            reason = os.strerror(e.errno) if e.errno else str(e).replace(tmp, dst)
            raise os_error(type(e), e.errno, f"cannot write {dst!r}: {reason}") from None
        raise
    return ExportSummary(
        path=dst, task=model.task, architecture=TASKS[model.task][0], dtype=dtype, tensors=len(state),
        parameters=n_params, bytes=int(split.metadata["total_size"]), shards=len(split.filename_to_tensors), files=files,
    )


def is_export_file(name: str) -> bool:
    """A file name an export writes (config, weights, shard index, tokenizer files)."""
    return name in EXPORT_FILES or bool(_SHARD.match(name))


def check_replaceable(dst: str, protected=()) -> None:
    """Raise FileExistsError unless ``dst`` may be replaced by ``force``: a real folder holding only
    files an export writes (or nothing), and no source (``protected``)."""
    how = ("--force only replaces a folder written by refimpl-convert (config.json, model*.safetensors, "
           "the shard index, tokenizer files) or an empty folder; choose another DST or empty it yourself")
    if os.path.islink(dst):
        raise FileExistsError(f"{dst} is a symbolic link, not a model folder: {how}")
    if not os.path.isdir(dst):
        raise FileExistsError(f"{dst} is a file, not a model folder: {how}")
    real = os.path.realpath(dst)
    for p in protected:
        rp = os.path.realpath(p)
        if rp == real or rp.startswith(real.rstrip(os.sep) + os.sep):
            raise FileExistsError(f"{dst} holds the source {p}: --force never replaces the folder being converted")
    foreign = []
    for name in sorted(os.listdir(dst)):
        path = os.path.join(dst, name)
        if not is_export_file(name) or os.path.islink(path) or not os.path.isfile(path):
            foreign.append(name)
    if foreign:
        listed = ", ".join(short_repr(n, 60) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{dst} holds what refimpl-convert does not write ({listed}): {how}")


def sweep_stale(parent: str) -> list[str]:
    """Remove the leftovers of exports into ``parent`` that were killed (SIGKILL, power loss).

    Only folders named by :func:`refimpl.io.atomic.temp_name` for a process of this host that no
    longer runs, and holding only files an export writes, are touched: a temporary folder is
    removed; a parked old version (``.DST.refimpl-old-...``) is renamed back to DST when DST is
    missing (a replace killed between its two renames), else removed. Returns what was done."""
    done = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return done
    for entry in entries:
        owner = stale_temp_owner(entry)
        path = os.path.join(parent, entry)
        if owner is None or os.path.islink(path) or not os.path.isdir(path) or not _only_export_files(path):
            continue
        name, kind = owner
        target = os.path.join(parent, name)
        if kind == "old" and not os.path.lexists(target):
            os.rename(path, target)
            done.append(f"restored {target}")
        else:
            remove_tree(path)
            done.append(f"removed {path}")
    return done


def _only_export_files(folder: str) -> bool:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path):
            return False
        if not (is_export_file(name) or stale_temp_owner(name) is not None or name.startswith(".tmp")
                or ".refimpl-tmp-" in name):
            return False
    return True


def _make_parents(parent: str) -> list[str]:
    """Create ``parent`` and its missing ancestors; -> the folders created, outermost first."""
    missing = []
    folder = parent
    while not os.path.isdir(folder):
        missing.append(folder)
        up = os.path.dirname(folder)
        if up == folder:
            break
        folder = up
    created = []
    for folder in reversed(missing):
        os.mkdir(folder)
        created.append(folder)
    return created


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: str, dst: str, protected) -> None:
    """Put the finished ``tmp`` at ``dst``: a rename, or (``dst`` existing) a swap in one step.
    (Called with SIGINT/SIGTERM/SIGHUP ignored.)"""
    if not os.path.lexists(dst):
        if not atomic.renameat2(tmp, dst, atomic.RENAME_NOREPLACE):
            if os.path.lexists(dst):
                raise FileExistsError(f"{dst} appeared while the export was written; nothing was replaced")
            os.rename(tmp, dst)
        return
    check_replaceable(dst, protected)  # again: it may have changed while the export was written
    swap_in(tmp, dst)
