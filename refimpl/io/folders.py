"""Model folders: which files hold the weights and the tokenizer, and reading every weight in one call.

A Hugging Face model folder holds ``config.json``, the weights (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``; else ``pytorch_model.bin`` or its shards and
``pytorch_model.bin.index.json``; safetensors wins when both are present) and tokenizer files.
An index is file content, so it is read as hostile: every shard it names must be a plain file name
in the folder (no ``/``, no ``..``, no absolute path), so a weight file is never opened outside it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from .base import CheckpointError, read_json, safetensors_name_of, short_repr
from .safetensors_files import read_safetensors

__all__ = [
    "WEIGHT_FORMATS", "TOKENIZER_FILES", "WeightFiles", "weights_format", "locate_weights", "weight_files",
    "read_shard_index", "read_weights", "tokenizer_files", "has_tokenizer",
]

# (format, single file, index of shards), in order of preference.
WEIGHT_FORMATS = (
    ("safetensors", "model.safetensors", "model.safetensors.index.json"),
    ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
)
# Every file a tokenizer may consist of: downloaded with a model, copied beside an export, listed by
# `refimpl info`. A tokenizer needs tokenizer.json, or vocab.json + merges.txt (:func:`has_tokenizer`).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt",
)
# A shard name: one path component, no drive letter, no glob characters (names go into download patterns).
_SHARD_NAME = re.compile(r"[^/\\:*?\[\]\x00]+\Z")


@dataclass
class WeightFiles:
    """Where a folder's weights are: ``kind`` (``"safetensors"``/``"bin"``), the files (paths), and
    for a sharded checkpoint its index (path) and ``weight_map`` (tensor name -> shard file name)."""

    kind: str
    files: list[str]
    index: str | None = None
    weight_map: dict[str, str] | None = None

    @property
    def format(self) -> str:
        """``"safetensors"``, ``"safetensors-sharded"``, ``"bin"`` or ``"bin-sharded"``."""
        return self.kind + ("-sharded" if self.index else "")


def weights_format(folder: str | os.PathLike) -> str | None:
    """``"safetensors"``, ``"safetensors-sharded"``, ``"bin"``, ``"bin-sharded"``, or None (no weights)."""
    for kind, single, index in WEIGHT_FORMATS:
        if os.path.isfile(os.path.join(folder, single)):
            return kind
        if os.path.isfile(os.path.join(folder, index)):
            return f"{kind}-sharded"
    return None


def read_shard_index(path: str | os.PathLike, kind: str = "safetensors") -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: tensor names -> plain file names in the folder."""
    path = os.fspath(path)
    index = read_json(path, what="the shard index", expect=None)
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{path}: not a {kind} index (a JSON object with a weight_map)")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: weight_map must map tensor names to shard file names, got {short_repr(weight_map)}")
    for name in set(weight_map.values()):
        if not _SHARD_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(
                f"{path} names the shard {short_repr(name)}, which is not a file name in the model folder: an index "
                "may only name files beside it (no folders, no '..', no absolute paths)")
    return weight_map


def locate_weights(folder: str | os.PathLike, kind: str | None = None, *, must_exist: bool = True) -> WeightFiles:
    """The weight files of ``folder`` (safetensors preferred; ``kind`` restricts to one format).

    Raises FileNotFoundError when there are none, :class:`CheckpointError` for a malformed index or
    (with ``must_exist``) one that lists a shard the folder lacks.
    """
    folder = os.fspath(folder)
    for fmt, single, index in WEIGHT_FORMATS:
        if kind is not None and fmt != kind:
            continue
        if os.path.isfile(os.path.join(folder, single)):
            return WeightFiles(fmt, [os.path.join(folder, single)])
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            weight_map = read_shard_index(index_path, fmt)
            names = sorted(set(weight_map.values()))
            if must_exist:
                for name in names:
                    if not os.path.isfile(os.path.join(folder, name)):
                        raise CheckpointError(f"{index_path} lists the shard {short_repr(name)}, which is not in {folder!r}")
            return WeightFiles(fmt, [os.path.join(folder, n) for n in names], index_path, weight_map)
    groups = [" or ".join(names) for fmt, *names in WEIGHT_FORMATS if kind in (None, fmt)]
    raise FileNotFoundError(f"no {groups[0]} in {folder!r}" + "".join(f" (nor {g})" for g in groups[1:]))


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The weight files :func:`weights_format` chose, as paths (a sharded index lists its shards)."""
    return locate_weights(folder).files


def read_weights(folder: str | os.PathLike, kind: str | None = None) -> tuple[dict[str, Any], dict[str, str], str]:
    """Every tensor of a model folder -> ``(state dict of read-only arrays, safetensors dtype names, kind)``.

    safetensors tensors are memory-mapped; ``.bin`` files are read by the restricted reader
    (:mod:`refimpl.torch_pickle`) with bfloat16 kept as bits (dtype name ``BF16``). A tensor found
    in two shards, or listed in the index and found in none, is a :class:`CheckpointError`.
    """
    from ..torch_pickle import load_state_dict  # (torch_pickle builds on refimpl.io.base)

    found = locate_weights(folder, kind)
    state: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    for path in found.files:
        if found.kind == "safetensors":
            part, part_dtypes, _ = read_safetensors(path)
        else:
            part = load_state_dict(path, bfloat16="bits")
            part_dtypes = {k: safetensors_name_of(a) or a.dtype.name for k, a in part.items()}
        clash = sorted(set(part) & set(state))
        if clash:
            raise CheckpointError(f"{path} repeats tensors found in another shard: {', '.join(map(short_repr, clash[:5]))}")
        state.update(part)
        dtypes.update(part_dtypes)
    if found.weight_map is not None:
        missing = sorted(set(found.weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{found.index}: tensors listed but absent from their shards: "
                                  f"{', '.join(map(short_repr, missing[:10]))}")
    return state, dtypes, found.kind


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The names of :data:`TOKENIZER_FILES` present in ``folder``."""
    return [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a loadable tokenizer's files: tokenizer.json, or vocab.json + merges.txt."""
    present = set(tokenizer_files(folder))
    return "tokenizer.json" in present or {"vocab.json", "merges.txt"} <= present
