"""Loading: a checkpoint folder (or ``"tiny"``, or a Hub id) -> a :class:`~refimpl.model.Model`.

:func:`from_pretrained` is the entry point. :func:`params_from_state_dict` maps a state dict onto
the parameter tree through the one key table (:func:`refimpl.params.hf_key_table`), checking every
key and shape; :func:`state_dict` is its inverse. ``.bin`` files are read by the restricted reader
(:mod:`refimpl.torch_pickle`), the original efficient_mlm layout is renamed by
:mod:`refimpl.layouts`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Mapping

import numpy as np

from .config import Config
from .layouts import normalize_layout
from .model import Model
from .params import (
    BASE_PREFIX,
    Params,
    TASKS,
    TIED_ALIASES,
    build_params,
    hf_key_table,
    iter_leaves,
    normalize_task,
    task_from_architectures,
)
from .io import CheckpointError, is_float_weight, parse_dtype, read_weights, short_repr, to_compute_dtype

logger = logging.getLogger("refimpl")
# Buffers some checkpoints carry that hold no parameters.
_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
# A layer's tensors: ``encoder.layer.<i>.`` (a bounded index: a key is file content).
_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d{1,7})\.")


def from_pretrained(path_or_id, task=None, dtype="float32", revision=None, cache_dir=None, token=None, backend="auto"):
    """Load a model from a local Hugging Face folder, ``"tiny"``, or a Hub id (downloaded and cached).

    path_or_id: a folder with ``config.json`` and weights (``model.safetensors``, a sharded
    ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``);
    ``"tiny"`` (the random checkpoint shipped with refimpl); or a Hub id such as
    ``"andreasmadsen/efficient_mlm_m0.40"``, resolved by :func:`refimpl.hub.resolve` (revision,
    cache_dir and token go there; ``HF_HUB_OFFLINE=1`` reads from the cache only).
    task: None (from ``config.json``'s ``architectures``), a task name such as ``"masked-lm"``, or a
    transformers class name. dtype: ``"float32"`` or ``"float64"``. backend: ``"auto"`` (the
    default: ``"numba"`` from hidden size 256 up, else ``"numpy"``, decided once from the config:
    :func:`refimpl.model.auto_backend`), ``"numba"`` (NumPy arrays with the Numba kernels),
    ``"numpy"`` (the pure NumPy reference) or ``"cupy"`` (the GPU); see :meth:`refimpl.Model.to`.

    safetensors is preferred when a folder has both formats. A ``.bin`` checkpoint is read by
    ``refimpl.torch_pickle`` (NumPy only: no torch, no code from the file runs; bfloat16 becomes
    float32 exactly). Checkpoints in the original efficient_mlm layout (``roberta.`` instead of
    ``roberta_prelayernorm.``, an unused ``attention.self.LayerNorm`` per layer, a config.json that
    may say ``"model_type": "roberta"`` and ``RobertaForMaskedLM``), as the Hub's
    ``andreasmadsen/efficient_mlm_*`` repositories ship them, are converted in memory as
    transformers' conversion script does (no tensor is copied) and one line is logged (INFO) to
    the ``"refimpl"`` logger. A post-LayerNorm RoBERTa (such as ``roberta-base``) is refused with a
    :class:`CheckpointError`: refimpl implements RoBERTa-PreLayerNorm only.
    """
    from .hub import resolve

    folder = resolve(path_or_id, revision=revision, cache_dir=cache_dir, token=token)
    return load_folder(folder, task=task, dtype=dtype, layout=normalize_layout).to(backend)


def params_from_state_dict(
    config: Config,
    task: str,
    state: Mapping[str, Any],
    dtype="float32",
    source_dtypes: Mapping[str, str] | None = None,
    source: str = "the checkpoint",
) -> Params:
    """Map a Hugging Face state dict (``name -> array``) onto the tree, checking every key and shape.

    Keys may carry the ``roberta_prelayernorm.`` prefix or not. The decoder weight comes from the
    word embeddings when tied. Arrays are converted to ``dtype`` only when their dtype differs (so a
    memory-mapped float32 file loads into float32 without a copy). Raises :class:`CheckpointError`
    listing every missing, unexpected and mis-shaped tensor at once.
    """
    task = normalize_task(task)
    target = parse_dtype(dtype)
    source_dtypes = source_dtypes or {}
    prefixed = any(k.startswith(BASE_PREFIX) for k in state)

    def canonical(key: str) -> str:  # the key as the base model (no prefix) or the heads name it
        return key[len(BASE_PREFIX):] if key.startswith(BASE_PREFIX) else key

    by_key = {canonical(k): k for k in state}
    # The key table grows with num_hidden_layers: build it for no more layers than the tensors
    # hold, so that a config claiming millions of layers costs nothing (and is reported plainly).
    held = 1 + max((int(m.group(1)) for k in state if isinstance(k, str) and (m := _LAYER_KEY.search(k))), default=-1)
    layers_note = None
    if config.num_hidden_layers > held:
        layers_note = (f"layers: config.json says num_hidden_layers={config.num_hidden_layers}, the tensors hold "
                       f"{held} (encoder.layer.0-{held - 1})" if held else
                       f"layers: config.json says num_hidden_layers={config.num_hidden_layers}, the tensors hold none")
        config = dataclasses.replace(config, num_hidden_layers=held)
    table = hf_key_table(config, task, with_pooler=True)
    known_other = {canonical(e.key) for t in TASKS for e in hf_key_table(config, t, with_pooler=True)}
    leaves: dict[str, Any] = {}
    missing, wrong_shape, wrong_dtype, used = [], [], [], set()
    for e in table:
        ck = canonical(e.key)
        if ck == "lm_head.decoder.weight" and (config.tie_word_embeddings or ck not in by_key):
            if not config.tie_word_embeddings:
                missing.append(e.key)
            if ck in by_key:
                used.add(by_key[ck])  # tied: transformers overwrites it with the embeddings too
            continue
        if ck not in by_key:
            if ck.startswith("pooler.") and task != "multiple-choice":
                continue  # a missing pooler is allowed (pooler_output is then None), except where it is scored
            missing.append(e.key if prefixed or task == "base" else ck)
            continue
        arr = state[by_key[ck]]
        used.add(by_key[ck])
        if not hasattr(arr, "shape") or tuple(arr.shape) != e.shape:
            wrong_shape.append(f"{by_key[ck]}: file {list(getattr(arr, 'shape', ['not an array']))}, config {list(e.shape)}")
            continue
        arr = np.asarray(arr)
        if not is_float_weight(arr, source_dtypes.get(by_key[ck], "")):
            wrong_dtype.append(f"{by_key[ck]}: {source_dtypes.get(by_key[ck]) or arr.dtype}")
            continue
        leaves[e.path] = to_compute_dtype(arr, source_dtypes.get(by_key[ck], ""), np.dtype(target))
    if "lm_head.bias" in {canonical(e.key) for e in table} and "lm_head.decoder_weight" not in leaves and "embeddings.word" in leaves:
        leaves["lm_head.decoder_weight"] = leaves["embeddings.word"]
    for alias, src in TIED_ALIASES.items():
        if alias in by_key:
            used.add(by_key[alias])
    if not config.tie_word_embeddings and "lm_head.bias" in leaves and "lm_head.decoder.bias" in by_key:
        # Untied (transformers 5.x): the decoder's bias is untied too and is the one the forward adds.
        arr = state[by_key["lm_head.decoder.bias"]]
        if not is_float_weight(np.asarray(arr), source_dtypes.get(by_key["lm_head.decoder.bias"], "")):
            wrong_dtype.append(f"{by_key['lm_head.decoder.bias']}: {np.asarray(arr).dtype}")
        elif tuple(arr.shape) == (config.vocab_size,):
            leaves["lm_head.bias"] = to_compute_dtype(np.asarray(arr), source_dtypes.get(by_key["lm_head.decoder.bias"], ""), np.dtype(target))
        else:
            wrong_shape.append(f"{by_key['lm_head.decoder.bias']}: file {list(arr.shape)}, config [{config.vocab_size}]")
    unexpected = []
    for k in state:
        if k in used:
            continue
        ck = canonical(k)
        if ck in _IGNORED_KEYS or ck in known_other or ck.startswith("embeddings.position_ids"):
            continue  # another task's head, or a buffer: not needed here
        unexpected.append(short_repr(k, 120)[1:-1] if isinstance(k, str) else short_repr(k, 120))
    if missing or wrong_shape or wrong_dtype or unexpected or layers_note:
        parts = []
        if missing:
            parts.append(f"missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if wrong_shape:
            parts.append(f"wrong shape ({len(wrong_shape)}): " + "; ".join(wrong_shape[:20]))
        if wrong_dtype:
            parts.append(f"not floating point ({len(wrong_dtype)}; a weight is F64, F32, F16 or BF16): "
                         + "; ".join(wrong_dtype[:20]))
        if unexpected:
            parts.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if layers_note:
            parts.append(layers_note)
        raise CheckpointError(
            f"{source} does not match a RoBERTa-PreLayerNorm {task} model with this config:\n  "
            + "\n  ".join(parts)
            + "\nCheck that config.json belongs to these weights and that the task is right"
            + (" (the original efficient_mlm layout uses the 'roberta.' prefix: refimpl.from_pretrained and refimpl-convert "
               "convert it, refimpl.layouts.convert_original_layout converts a state dict)"
               if any(isinstance(k, str) and k.startswith("roberta.") for k in state) else "")
        )
    return build_params(config, task, leaves)


def load_folder(
    folder: str | os.PathLike, task: str | None = None, dtype="float32", state=None, source_dtypes=None, layout=None
) -> Model:
    """A model from a local Hugging Face folder: ``config.json`` + weights (safetensors or ``.bin``, sharded or not).

    ``state``/``source_dtypes`` let a caller pass tensors it read from another format. ``layout``
    (``(state, source_dtypes, source) -> (state, source_dtypes, note or None)``) may refuse or rename
    the tensors before they are checked: :func:`refimpl.from_pretrained` passes
    :func:`refimpl.layouts.normalize_layout`. Its note,
    one line saying what was changed, is logged to the ``"refimpl"`` logger.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder")
    config = Config.from_pretrained(folder)
    task = normalize_task(task) if task is not None else task_from_architectures(config.architectures)
    if state is None:
        state, source_dtypes, _ = read_weights(folder)
    note = None
    if layout is not None:
        state, source_dtypes, note = layout(state, source_dtypes, folder)
        if note is not None:
            logger.info("%s: %s", folder, note)
    try:
        params = params_from_state_dict(config, task, state, dtype, source_dtypes, source=folder)
    except CheckpointError as e:
        if note is None:
            raise
        raise CheckpointError(f"{e}\n(the names above are after loading did this: {note})") from None
    model = Model(config, params, task)
    model.name_or_path = folder  # where its tokenizer is (pipelines look there), as transformers' name_or_path
    return model


def state_dict(model: Model, task: str | None = None) -> dict[str, Any]:
    """The model's parameters under transformers' names (tied decoder weight omitted, as transformers writes)."""
    task = normalize_task(task or model.task)
    leaves = dict(iter_leaves(model.params))
    out = {}
    for e in hf_key_table(model.config, task, with_pooler=model.params.pooler is not None):
        if e.path == "lm_head.decoder_weight" and model.config.tie_word_embeddings:
            continue
        out[e.key] = leaves[e.path]
    if "lm_head.bias" in out and not model.config.tie_word_embeddings:
        out["lm_head.decoder.bias"] = out["lm_head.bias"]  # untied, transformers 5.x reads the decoder's own bias
    return out
