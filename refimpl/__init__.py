"""refimpl: a NumPy/Numba reference implementation of RoBERTa-PreLayerNorm.

    import refimpl
    model = refimpl.from_pretrained("path/to/hf-folder", dtype="float64")
    out = model(input_ids=[[0, 31414, 232, 2]], output_hidden_states=True)
"""

from .cache import KVCache
from .config import Config, ConfigError
from .generate import generate
from .loading import from_pretrained, params_from_state_dict, state_dict
from .model import InputError, Model
from .params import TASKS, Params
from .safetensors_io import CheckpointError
from .tracing import Trace
from .backward import grad  # refimpl.grad(model, **inputs) -> (loss, {transformers name: gradient})
from .golden import trace  # refimpl.trace(model, **inputs) -> {name: array}; the recorder is refimpl.tracing

__version__ = "0.1.0"


__all__ = [
    "Config", "ConfigError", "InputError", "CheckpointError", "Model", "Params", "TASKS", "Trace",
    "from_pretrained", "params_from_state_dict", "trace", "state_dict", "__version__", "generate", "KVCache", "grad",
]
