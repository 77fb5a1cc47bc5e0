"""refimpl: a NumPy/Numba reference implementation of RoBERTa-PreLayerNorm.

    import refimpl
    model = refimpl.from_pretrained("path/to/hf-folder", dtype="float64")
    out = model(input_ids=[[0, 31414, 232, 2]], output_hidden_states=True)
"""

from .config import Config, ConfigError
from .model import InputError, Model, params_from_state_dict, state_dict
from .params import TASKS, Params
from .safetensors_io import CheckpointError
from .trace import Trace
from .golden import trace  # refimpl.trace(model, **inputs) -> {name: array}; shadows the submodule's name

__version__ = "0.1.0"


def from_pretrained(path, task=None, dtype="float32"):
    """Load a model from a Hugging Face folder (``config.json`` + safetensors).

    task: None (from ``config.json``'s ``architectures``), a task name such as ``"masked-lm"``, or a
    transformers class name. dtype: ``"float32"`` or ``"float64"``.
    """
    from .model import load_folder

    return load_folder(path, task=task, dtype=dtype)


__all__ = [
    "Config", "ConfigError", "InputError", "CheckpointError", "Model", "Params", "TASKS", "Trace",
    "from_pretrained", "params_from_state_dict", "trace", "state_dict", "__version__",
]
