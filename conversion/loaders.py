"""Detect a checkpoint's format and load it as a refimpl model.

Formats (``--from``):

* ``hf``: a Hugging Face folder with ``config.json`` + ``model.safetensors`` (or its sharded index);
* ``bin``: a Hugging Face folder with ``config.json`` + ``pytorch_model.bin`` (or its sharded index);
* ``original``: the original efficient_mlm layout (``roberta.`` prefix, unused
  ``attention.self.LayerNorm``), in safetensors or ``.bin``: see :mod:`refimpl.layouts`;

A post-LayerNorm RoBERTa (such as roberta-base) is refused in every format, with the reason.
* ``fairseq``: a fairseq ``.pt`` file, or a folder with ``model.pt`` (+ ``dict.txt``): see
  :mod:`refimpl_conversion.fairseq`.
"""

from __future__ import annotations

import os

from refimpl.config import Config
from refimpl.loading import params_from_state_dict
from refimpl.model import Model
from refimpl.params import BASE_PREFIX, TIED_ALIASES, hf_key_table, normalize_task, task_from_architectures

from refimpl.io import read_weights, weights_format
from refimpl.layouts import convert_original_layout, is_original_layout, refuse_post_layernorm

from .fairseq import load_fairseq
from .hf import dominant_dtype
from .keymap import ConversionError, Loaded, describe_keys

FORMATS = ("auto", "hf", "bin", "original", "fairseq")


def detect_format(src: str) -> str:
    """``hf``, ``bin``, ``original`` or ``fairseq`` for ``src``; raises ConversionError when none fits."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"no such file or folder: {src!r}")
    if os.path.isfile(src):
        if src.endswith(".pt"):
            return "fairseq"
        name = os.path.basename(src)
        if name in ("pytorch_model.bin", "model.safetensors") or name.endswith((".bin", ".safetensors")):
            raise ConversionError(f"{src!r} is a weights file: pass the folder that holds it and its config.json")
        raise ConversionError(f"cannot tell the format of {src!r}: expected a fairseq .pt file or a model folder")
    kind = (weights_format(src) or "-").split("-")[0] or None
    if kind is not None and os.path.isfile(os.path.join(src, "config.json")):
        state, _, _ = read_weights(src, kind)
        refuse_post_layernorm(state, src)
        if is_original_layout(state):
            return "original"
        return "hf" if kind == "safetensors" else "bin"
    if kind is not None:
        raise ConversionError(f"{src!r} has weights but no config.json: a Hugging Face folder needs one")
    if os.path.isfile(os.path.join(src, "model.pt")) or any(n.endswith(".pt") for n in os.listdir(src)):
        return "fairseq"
    raise ConversionError(
        f"cannot tell the format of {src!r}: no config.json with model.safetensors / pytorch_model.bin, and no model.pt"
    )


def _not_converted(config: Config, task: str, state) -> list[str]:
    """Source tensors the task's model has no place for (another task's head), buffers and tied aliases aside."""
    strip = lambda k: k[len(BASE_PREFIX):] if k.startswith(BASE_PREFIX) else k  # noqa: E731
    wanted = {strip(e.key) for e in hf_key_table(config, task, with_pooler=True)} | set(TIED_ALIASES)
    return sorted(k for k in state if strip(k) not in wanted and not k.endswith(("position_ids", "token_type_ids")))


def load(src: str, fmt: str = "auto", task: str | None = None, head: str | None = None, dtype: str = "float32") -> Loaded:
    """Load ``src`` (any format above) as a :class:`~refimpl_conversion.keymap.Loaded` with a model in ``dtype``.

    task: None (from config.json's ``architectures``; for fairseq see :func:`load_fairseq`) or a
    task name; head: a fairseq classification head. dtype: the compute dtype, ``float32`` or
    ``float64``, or ``auto`` (float64 for a float64 source, else float32: exact for every other dtype).
    """
    src = os.fspath(src)
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt == "fairseq":
        return load_fairseq(src, task=task, head=head, dtype=dtype)
    if head is not None:
        raise ConversionError("--head selects a classification head of a fairseq checkpoint; this is a Hugging Face folder")
    if not os.path.isdir(src):
        raise ConversionError(f"{src!r} is not a folder: the {fmt} format is a folder with config.json and weights")
    kind = {"hf": "safetensors", "bin": "bin"}.get(fmt)
    state, dtypes, kind = read_weights(src, kind)
    refuse_post_layernorm(state, src)
    notes: list[str] = []
    if fmt == "original":
        if not is_original_layout(state):
            raise ConversionError(
                f"{src!r} is not in the original efficient_mlm layout (no 'roberta.' keys, no attention.self.LayerNorm)"
            )
        state, dtypes, note = convert_original_layout(state, dtypes)
        notes.append(note)
    elif is_original_layout(state):
        raise ConversionError(f"{src!r} is in the original efficient_mlm layout ('roberta.' prefix): use --from original or auto")
    config = Config.from_pretrained(src)
    task = normalize_task(task) if task is not None else task_from_architectures(config.architectures)
    source_dtype = dominant_dtype(state, dtypes)
    if dtype == "auto":
        dtype = "float64" if source_dtype == "float64" else "float32"
    params = params_from_state_dict(config, task, state, dtype, dtypes, source=src)
    unused = _not_converted(config, task, state)
    if unused:
        notes.append(f"not converted (not part of a {task} model): {describe_keys(unused)}")
    return Loaded(Model(config, params, task), fmt, src, source_dtype, src, notes)


__all__ = ["FORMATS", "detect_format", "load"]
