"""Checkpoint formats other than a Hugging Face safetensors folder, and export to one.

* :mod:`refimpl_conversion.hf`: Hugging Face folders with safetensors or ``pytorch_model.bin`` (sharded or not);
* :mod:`refimpl_conversion.fairseq`: fairseq pre-LN RoBERTa checkpoints;
* :mod:`refimpl_conversion.exporter`: a refimpl Model -> a folder transformers loads;
* :mod:`refimpl_conversion.cli`: the ``refimpl-convert`` command.

The torch-free ``.bin``/``.pt`` reader (:mod:`refimpl.torch_pickle`) and the original efficient_mlm
layout (:mod:`refimpl.layouts`) live in refimpl, because ``refimpl.from_pretrained`` reads both.

This folder installs as the package ``refimpl_conversion`` (a top-level ``conversion`` would collide
with other distributions). It builds on refimpl; refimpl never imports it. Importing it is cheap:
the submodules load on first use.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "load": "loaders", "detect_format": "loaders", "FORMATS": "loaders",
    "export": "exporter", "ExportSummary": "exporter", "export_state_dict": "exporter",
    "load_fairseq": "fairseq", "ConversionError": "keymap", "Loaded": "keymap",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'refimpl_conversion' has no attribute {name!r}")


def convert(src, dst, *, fmt: str = "auto", task=None, head=None, dtype=None, max_shard_size="5GB", force=False):
    """Load ``src`` in any supported format and export it to ``dst``; returns the ExportSummary."""
    from .exporter import export as _export
    from .loaders import load as _load

    compute = "float64" if dtype == "float64" else "auto" if dtype is None else "float32"
    loaded = _load(src, fmt, task=task, head=head, dtype=compute)
    return _export(loaded.model, dst, dtype=dtype or loaded.source_dtype, max_shard_size=max_shard_size,
                   force=force, tokenizer_from=loaded.folder, sources=(src, loaded.source))


__all__ = sorted([*_LAZY, "convert"])
