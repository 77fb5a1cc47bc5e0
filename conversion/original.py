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
"""

from __future__ import annotations

from typing import Any, Mapping

# The table of this format: (original prefix, transformers prefix) ...
ORIGINAL_PREFIXES = (("roberta.", "roberta_prelayernorm."),)
# ... and the tensors that the original model carries but never uses (dropped by suffix).
ORIGINAL_UNUSED_SUFFIXES = (".self.LayerNorm.weight", ".self.LayerNorm.bias")


def is_original_layout(keys) -> bool:
    """True for state dicts in the original layout (``roberta.`` prefix or unused self.LayerNorm)."""
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
