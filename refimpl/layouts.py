"""The original ``andreasmadsen/efficient_mlm`` layout -> RoBERTa-PreLayerNorm.

The original checkpoints were written by a modified RoBERTa: the same module names as
transformers' RobertaPreLayerNorm* classes, but

* the base model is called ``roberta.`` instead of ``roberta_prelayernorm.``, and
* every attention block carries an unused ``attention.self.LayerNorm`` (the LayerNorm that is
  applied is ``attention.LayerNorm``).

This mirrors transformers' own conversion script
(``convert_roberta_prelayernorm_original_pytorch_checkpoint_to_pytorch.py``) exactly: keys starting
with ``roberta.`` get the prefix ``roberta_prelayernorm.``, keys ending in ``.self.LayerNorm.weight``
or ``.self.LayerNorm.bias`` are dropped, and everything else is kept as it is (then checked,
key by key and shape by shape, against refimpl's one key table by ``params_from_state_dict``).

:func:`normalize_layout` is the one place that decides, from the tensor names alone, what a
Hugging Face-style state dict is: a post-LayerNorm RoBERTa (such as ``roberta-base``, which
refimpl does not implement: refused), the original layout (converted), or already
RoBERTa-PreLayerNorm (kept). ``refimpl.from_pretrained`` and ``refimpl-convert`` both use it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .io import CheckpointError, short_repr

# The table of this format: (original prefix, transformers prefix) ...
ORIGINAL_PREFIXES = (("roberta.", "roberta_prelayernorm."),)
# ... and the tensors that the original model carries but never uses (dropped by suffix).
ORIGINAL_UNUSED_SUFFIXES = (".self.LayerNorm.weight", ".self.LayerNorm.bias")


# Tell-tale tensor names (under any prefix) -> the LayerNorm placement they prove. Post-LN RoBERTa
# (transformers' Roberta*, fairseq's default) normalises after each residual add: the LayerNorms
# sit in attention.output and output. Pre-LN normalises each sub-block's input: the LayerNorms sit
# in attention and intermediate.
LAYERNORM_TELLS = (
    (re.compile(r"(^|\.)encoder\.layer\.\d+\.(cross)?attention\.output\.LayerNorm\.(weight|bias)$"), "post-LN"),
    (re.compile(r"(^|\.)encoder\.layer\.\d+\.output\.LayerNorm\.(weight|bias)$"), "post-LN"),
    (re.compile(r"(^|\.)encoder\.layer\.\d+\.(cross)?attention\.LayerNorm\.(weight|bias)$"), "pre-LN"),
    (re.compile(r"(^|\.)encoder\.layer\.\d+\.intermediate\.LayerNorm\.(weight|bias)$"), "pre-LN"),
)


class PostLayerNormError(CheckpointError):
    """A post-LayerNorm RoBERTa (such as roberta-base): not the architecture refimpl implements."""


def layernorm_placement(keys) -> set[str]:
    """``{"post-LN", "pre-LN"}``, or the part of it that the tell-tale names in ``keys`` prove."""
    return {kind for k in keys for rx, kind in LAYERNORM_TELLS if rx.search(k)}


def is_post_layernorm(keys) -> bool:
    """True for a post-LayerNorm RoBERTa: post-LN LayerNorm names and no pre-LN ones."""
    return layernorm_placement(keys) == {"post-LN"}


def refuse_post_layernorm(keys, source: str = "the checkpoint") -> None:
    """Raise :class:`PostLayerNormError` (with the fix) when ``keys`` are a post-LayerNorm RoBERTa's."""
    keys = list(keys)
    if not is_post_layernorm(keys):
        return
    example = next(k for k in keys if any(rx.search(k) for rx, kind in LAYERNORM_TELLS if kind == "post-LN"))
    raise PostLayerNormError(
        f"{source} is a post-LayerNorm RoBERTa (such as roberta-base: a LayerNorm after each residual add, "
        f"e.g. {short_repr(example)}), which refimpl does not implement: refimpl is RoBERTa-PreLayerNorm only. "
        "Load it with transformers' RobertaForMaskedLM (or another Roberta* class) instead"
    )


def is_original_layout(keys) -> bool:
    """True for state dicts in the original layout (``roberta.`` prefix or unused self.LayerNorm).

    A post-LayerNorm RoBERTa has the ``roberta.`` prefix too: ask :func:`is_post_layernorm` first
    (:func:`normalize_layout` does).
    """
    keys = list(keys)
    return any(k.startswith(ORIGINAL_PREFIXES[0][0]) for k in keys) or any(
        k.endswith(ORIGINAL_UNUSED_SUFFIXES) for k in keys
    )


def original_to_hf_key(key: str) -> str | None:
    """An original key under transformers' name, or None for the unused tensors that are dropped."""
    for old, new in ORIGINAL_PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
    return None if key.endswith(ORIGINAL_UNUSED_SUFFIXES) else key


def convert_original_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """-> (the state dict under transformers' names, the original keys dropped as unused)."""
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in state.items():
        new = original_to_hf_key(key)
        if new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, dropped


def convert_original_layout(
    state: Mapping[str, Any], dtypes: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str], str]:
    """The original layout under transformers' names, without copying a tensor.

    -> (state dict, ``dtypes`` keyed by the new names (dropped tensors left out), one line saying
    what was done).
    """
    out, dropped = convert_original_state_dict(state)
    renamed = sum(1 for k in state if original_to_hf_key(k) not in (None, k))
    new_dtypes = {new: v for k, v in (dtypes or {}).items() if (new := original_to_hf_key(k)) is not None}
    note = (
        f"converted the original efficient_mlm layout: renamed {renamed} 'roberta.' keys to 'roberta_prelayernorm.', "
        f"dropped {len(dropped)} unused attention.self.LayerNorm tensors (as transformers' conversion script does)"
    )
    return out, new_dtypes, note


def normalize_layout(
    state: Mapping[str, Any], dtypes: Mapping[str, str] | None = None, source: str = "the checkpoint"
) -> tuple[Mapping[str, Any], Mapping[str, str] | None, str | None]:
    """Any Hugging Face-style state dict -> RoBERTa-PreLayerNorm names: ``(state, dtypes, note)``.

    A post-LayerNorm RoBERTa raises :class:`PostLayerNormError`; the original layout is converted
    (``note`` says how); anything else comes back as it is with ``note=None`` (and is then checked
    key by key by ``params_from_state_dict``).
    """
    refuse_post_layernorm(state, source)
    if is_original_layout(state):
        return convert_original_layout(state, dtypes)
    return state, dtypes, None
