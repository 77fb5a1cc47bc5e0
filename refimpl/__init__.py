"""refimpl: a NumPy/Numba reference implementation of RoBERTa-PreLayerNorm.

    import refimpl
    model = refimpl.from_pretrained("path/to/hf-folder", dtype="float64")
    out = model(input_ids=[[0, 31414, 232, 2]], output_hidden_states=True)
"""

from .cache import KVCache
from .config import Config, ConfigError
from .generate import generate
from .model import InputError, Model, params_from_state_dict, state_dict
from .params import TASKS, Params
from .safetensors_io import CheckpointError
from .trace import Trace
from .golden import trace  # refimpl.trace(model, **inputs) -> {name: array}; shadows the submodule's name

__version__ = "0.1.0"


def from_pretrained(path_or_id, task=None, dtype="float32", revision=None, cache_dir=None, token=None, backend="numba"):
    """Load a model from a local Hugging Face folder, ``"tiny"``, or a Hub id (downloaded and cached).

    path_or_id: a folder with ``config.json`` and weights (``model.safetensors``, a sharded
    ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``);
    ``"tiny"`` (the random checkpoint shipped with refimpl); or a Hub id such as
    ``"andreasmadsen/efficient_mlm_m0.40"``, resolved by :func:`refimpl.hub.resolve` (revision,
    cache_dir and token go there; ``HF_HUB_OFFLINE=1`` reads from the cache only).
    task: None (from ``config.json``'s ``architectures``), a task name such as ``"masked-lm"``, or a
    transformers class name. dtype: ``"float32"`` or ``"float64"``. backend: ``"numba"`` (the CPU
    default: NumPy arrays with the Numba kernels), ``"numpy"`` (the pure NumPy reference) or
    ``"cupy"`` (the GPU); see :meth:`refimpl.Model.to`.

    safetensors is preferred when a folder has both formats. A ``.bin`` checkpoint is read by
    ``conversion.torch_pickle`` (NumPy only: no torch, no code from the file runs; bfloat16 becomes
    float32 exactly). Checkpoints in the original efficient_mlm layout (``roberta.`` instead of
    ``roberta_prelayernorm.``, an unused ``attention.self.LayerNorm`` per layer, a config.json that
    may say ``"model_type": "roberta"`` and ``RobertaForMaskedLM``), as the Hub's
    ``andreasmadsen/efficient_mlm_*`` repositories ship them, are converted in memory as
    transformers' conversion script does (no tensor is copied) and one line is logged (INFO) to
    the ``"refimpl"`` logger. A post-LayerNorm RoBERTa (such as ``roberta-base``) is refused with a
    :class:`CheckpointError`: refimpl implements RoBERTa-PreLayerNorm only. This loader is an entry
    point and may use ``conversion``; the math modules of refimpl never import it.
    """
    from conversion.original import normalize_layout  # entry point: allowed to use conversion

    from .hub import resolve, weight_files, weights_format
    from .model import load_folder

    folder = resolve(path_or_id, revision=revision, cache_dir=cache_dir, token=token)
    state = source_dtypes = None  # safetensors: load_folder memory-maps the file
    if (weights_format(folder) or "").startswith("bin"):
        from conversion.torch_pickle import load_state_dict

        state, source_dtypes = {}, {}
        for path in weight_files(folder):
            state.update(load_state_dict(path))
    return load_folder(folder, task=task, dtype=dtype, state=state, source_dtypes=source_dtypes,
                       layout=normalize_layout).to(backend)


__all__ = [
    "Config", "ConfigError", "InputError", "CheckpointError", "Model", "Params", "TASKS", "Trace",
    "from_pretrained", "params_from_state_dict", "trace", "state_dict", "__version__", "generate", "KVCache",
]
