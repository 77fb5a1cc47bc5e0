"""Adapters: run another implementation of RoBERTa-PreLayerNorm on a golden file's own inputs and
record its tensors under golden names, as a *candidate* file for ``refimpl compare``.

    from refimpl_adapters import dump
    result = dump("transformers", "path/to/hf-folder", "golden.safetensors", dtype="float32")
    result.write("candidate.safetensors")
    print(result.missing)          # golden names this implementation does not provide, with the reason

    refimpl dump --impl transformers --model path/to/hf-folder golden.safetensors --out candidate.safetensors
    refimpl-dump --impl transformers --model path/to/hf-folder golden.safetensors --out candidate.safetensors

This package (the ``adapters/`` folder of the checkout, installed as ``refimpl_adapters``) builds
on refimpl; refimpl never imports it, nor any of the frameworks: ``refimpl dump`` reaches
:mod:`refimpl_adapters.cli` through the ``refimpl.commands`` entry point group. One module per
implementation, each importing its framework only when it runs (the frameworks are optional extras):

    transformers   transformers' RobertaPreLayerNorm* PyTorch classes, 4.x and 5.x (forward hooks)
    flax           transformers 4.x FlaxRobertaPreLayerNorm* (capture_intermediates)
    onnx           an ONNX graph through onnxruntime (intermediate values exposed as graph outputs),
                   or a transformers folder exported with torch.onnx first

With ``outputs_only`` an adapter records only what the model returns (``logits``, ``loss``,
``hidden_states.{i}``, ``attentions.{i}``, ...): what a user of the implementation sees, read by
``refimpl compare`` through the output-field table (docs/golden.md, "Output fields").
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from refimpl.golden import INPUT_PREFIX, Golden, num_layers, output_field_map, read_golden
from refimpl.io import BF16_BITS, FLOAT_DTYPES, float32_to_bf16_bits, write_safetensors


class AdapterError(ValueError):
    """An implementation that cannot be run as asked (a missing framework, an unsupported input);
    the message says what to do."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    module: str
    extra: str
    packages: tuple[str, ...]
    what: str


ADAPTERS: dict[str, AdapterInfo] = {
    "transformers": AdapterInfo(
        "transformers", "refimpl_adapters.transformers_torch", "adapters-torch", ("torch", "transformers"),
        "transformers' RobertaPreLayerNorm* PyTorch classes (4.x and 5.x), through forward hooks"),
    "flax": AdapterInfo(
        "flax", "refimpl_adapters.flax", "adapters-flax", ("jax", "flax", "transformers"),
        "transformers 4.x FlaxRobertaPreLayerNorm* classes, through capture_intermediates"),
    "onnx": AdapterInfo(
        "onnx", "refimpl_adapters.onnx", "adapters-onnx", ("onnxruntime", "onnx"),
        "an ONNX graph through onnxruntime (a .onnx file, or a transformers folder exported with torch.onnx)"),
}


def require(adapter: str, *modules: str, extra: str | None = None):
    """Import ``modules`` for ``adapter``; a missing one is an :class:`AdapterError` naming the extra."""
    info = ADAPTERS[adapter]
    loaded = []
    for name in modules or info.packages:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError as e:
            raise AdapterError(
                f"the {adapter} adapter needs {name.split('.')[0]} ({type(e).__name__}: {e}); "
                f"install it with: pip install '.[{extra or info.extra}]' in a checkout of refimpl"
            ) from None
    return loaded[0] if len(loaded) == 1 else loaded


@dataclass
class Dump:
    """What an adapter recorded: ``tensors`` under golden names (or output-field names), in the
    order computed; ``missing``: every golden tensor it did not provide, with the reason."""

    tensors: dict[str, np.ndarray]
    missing: dict[str, str]
    implementation: str
    dtype: str
    notes: list[str] = field(default_factory=list)

    def write(self, path, dtype: str | None = None) -> None:
        """Write the candidate file (safetensors, atomically), in ``dtype`` (default: the dump's)."""
        meta = {"format": "refimpl-candidate", "implementation": self.implementation,
                "not_provided": json.dumps(self.missing)}
        write_candidate(path, self.tensors, dtype or self.dtype, metadata=meta)


def dump(impl: str, model: Any, golden, *, dtype: str = "float32", task: str | None = None,
         outputs_only: bool = False, **options) -> Dump:
    """Run implementation ``impl`` (a key of :data:`ADAPTERS`) on ``golden``'s inputs.

    model: what the adapter loads (a transformers folder; for onnx a .onnx file or a folder), or an
    already loaded model object of that framework. golden: a path or a :class:`~refimpl.golden.Golden`.
    dtype: the dtype to run in (the adapter loads the weights in it). task: default the golden's.
    outputs_only: record only the model's output fields, no intermediates.
    """
    if impl not in ADAPTERS:
        raise AdapterError(f"unknown implementation {impl!r}; known: {', '.join(ADAPTERS)}")
    if dtype not in FLOAT_DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r}; use one of {', '.join(FLOAT_DTYPES)}")
    g = golden if isinstance(golden, Golden) else read_golden(golden)
    module = importlib.import_module(ADAPTERS[impl].module)
    return module.run(model, g, dtype=dtype, task=task or g.task, outputs_only=outputs_only, **options)


def finish(golden: Golden, tensors: Mapping[str, np.ndarray], reasons: list[tuple[str, str]], implementation: str,
           dtype: str, *, outputs_only: bool = False, notes: list[str] | None = None, hidden_states: str = "5.x") -> Dump:
    """A :class:`Dump` of ``tensors``, with every golden name they do not cover in ``missing``: the
    reason is the first of ``reasons`` (``(glob pattern, why)``) matching the name, else a default."""
    covered = set(tensors)
    table = output_field_map(num_layers(golden), hidden_states)
    covered |= {table[k] for k in tensors if k in table}
    default = ("the model's outputs do not hold it (outputs only)" if outputs_only else
               "the implementation did not compute it for these inputs")
    missing = {}
    for name in golden.tensors:
        if name not in covered:
            missing[name] = next((why for pattern, why in reasons if fnmatch.fnmatchcase(name, pattern)), default)
    return Dump(dict(tensors), missing, implementation, dtype, list(notes or []))


def golden_inputs(golden: Golden, accepted: tuple[str, ...], impl: str) -> dict[str, np.ndarray]:
    """The golden's inputs that ``impl`` accepts; any other input it holds is an AdapterError (the
    candidate would be run on something else than the golden)."""
    extra = sorted(set(golden.inputs) - set(accepted))
    if extra:
        raise AdapterError(f"the {impl} adapter cannot pass {', '.join(extra)} to the model (it accepts "
                           f"{', '.join(accepted)}); write a golden without them")
    return {k: v for k, v in golden.inputs.items()}


def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """[B, T, H] -> [B, N, T, D], the golden layout of q, k, v and the attention context."""
    b, t, h = x.shape
    return x.reshape(b, t, num_heads, h // num_heads).transpose(0, 2, 1, 3)


def add_fields(tensors: dict, outputs: Mapping[str, Any], to_numpy: Callable[[Any], np.ndarray]) -> None:
    """Record a model output's fields: arrays under their names, tuples (hidden_states, attentions,
    cross_attentions) entry by entry as ``name.{i}``."""
    for name in ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "loss"):
        value = outputs.get(name)
        if value is not None:
            tensors[name] = to_numpy(value)
    for name in ("hidden_states", "attentions", "cross_attentions"):
        value = outputs.get(name)
        if value is not None:
            for i, v in enumerate(value):
                tensors[f"{name}.{i}"] = to_numpy(v)


# ---------------------------------------------------------------------------------------------
# Writing a candidate
# ---------------------------------------------------------------------------------------------


def write_candidate(path, tensors: Mapping[str, Any], dtype: str | None = "float32",
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors candidate in ``dtype`` (float64, float32, float16 or
    bfloat16; None keeps each array's dtype)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise AdapterError(f"unknown dtype {dtype!r}; use one of {', '.join(FLOAT_DTYPES)}")
    arrays = {k: np.asarray(v) for k, v in tensors.items() if not k.startswith(INPUT_PREFIX)}
    if dtype == "bfloat16":
        write_safetensors(path, {k: float32_to_bf16_bits(v).view(BF16_BITS) for k, v in arrays.items()}, metadata)
    elif dtype is None:
        write_safetensors(path, arrays, metadata)
    else:
        write_safetensors(path, {k: v.astype(dtype) for k, v in arrays.items()}, metadata)


__all__ = ["ADAPTERS", "AdapterError", "Dump", "dump", "write_candidate", "float32_to_bf16_bits", "require"]
