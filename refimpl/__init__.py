"""refimpl: a NumPy/Numba reference implementation of RoBERTa-PreLayerNorm.

    import refimpl
    model = refimpl.from_pretrained("path/to/hf-folder", dtype="float64")
    out = model(input_ids=[[0, 31414, 232, 2]], output_hidden_states=True)

The names below are imported on first use (``refimpl --version`` loads none of them), and so is
any submodule reached as an attribute (``refimpl.ops``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# refimpl.generate is both a function and the module defining it: imported here, the function is
# bound after the module, so later imports of the module do not shadow it (a lazy name would be).
from .generate import generate

__version__ = "0.1.0"

_EXPORTS = {  # name -> the module that defines it
    "KVCache": "cache",
    "Config": "config", "ConfigError": "config",
    "from_pretrained": "loading", "params_from_state_dict": "loading", "state_dict": "loading",
    "InputError": "model", "Model": "model",
    "TASKS": "params", "Params": "params",
    "CheckpointError": "io",
    "Trace": "tracing",
    "grad": "backward",  # refimpl.grad(model, **inputs) -> (loss, {transformers name: gradient})
    "trace": "golden",  # refimpl.trace(model, **inputs) -> {name: array}; the recorder is refimpl.tracing
}

if TYPE_CHECKING:  # what static readers see (type checkers, the API pages); at run time: __getattr__
    from .backward import grad
    from .cache import KVCache
    from .config import Config, ConfigError
    from .golden import trace
    from .io import CheckpointError
    from .loading import from_pretrained, params_from_state_dict, state_dict
    from .model import InputError, Model
    from .params import TASKS, Params
    from .tracing import Trace

__all__ = [
    "Config", "ConfigError", "InputError", "CheckpointError", "Model", "Params", "TASKS", "Trace",
    "from_pretrained", "params_from_state_dict", "trace", "state_dict", "__version__", "generate", "KVCache", "grad",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    try:
        return importlib.import_module(f".{name}", __name__)  # a submodule: refimpl.ops, refimpl.fast...
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
