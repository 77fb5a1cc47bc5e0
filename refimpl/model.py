"""``Model``: a config, a parameter tree, a task and a backend, callable like a transformers model.

Reading order for the forward pass: :meth:`Model.__call__` validates the inputs
(:func:`refimpl.inputs.validate`) and calls the task's function: :mod:`refimpl.tasks` (the
reference: embeddings -> blocks -> final LayerNorm -> head -> loss) or, on the ``numba`` backend,
:mod:`refimpl.fast.tasks` (the same math with Numba kernels and BLAS scheduling, held to the
reference by tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import tasks
from .backend import CUPY_INSTALL_HINT, is_cupy, namespace, to_numpy
from .config import Config
from .inputs import InputError, validate
from .params import TASKS, Params, map_leaves, normalize_task, num_parameters
from .io import CheckpointError, parse_dtype
from .tracing import Trace

BACKENDS = ("numba", "numpy", "cupy")
AUTO = "auto"  # a backend chosen from the model's config: auto_backend()
# From this hidden size up, "auto" picks the numba fast path; below it the NumPy reference. A small
# model's forward takes milliseconds either way, while the fast path's first call in a process
# pays Numba's compile (seconds with an empty cache, ~1 s to load a warm one).
AUTO_NUMBA_FROM_HIDDEN = 256

__all__ = ["AUTO", "AUTO_NUMBA_FROM_HIDDEN", "BACKENDS", "InputError", "Model", "auto_backend"]


def auto_backend(config: Config) -> str:
    """The CPU backend ``"auto"`` means for a model with this config: ``"numba"`` when
    ``config.hidden_size >= AUTO_NUMBA_FROM_HIDDEN``, else ``"numpy"`` (the reference).

    Decided once per model, from its config alone, never from a call's inputs: a model gives the
    same outputs for the same inputs whatever else it is asked.
    """
    return "numba" if config.hidden_size >= AUTO_NUMBA_FROM_HIDDEN else "numpy"


def _check_backend(backend: str, config: Config) -> str:
    """``backend`` with ``"auto"`` resolved (:func:`auto_backend`); a ValueError for an unknown name."""
    if backend == AUTO:
        return auto_backend(config)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {AUTO}, {', '.join(BACKENDS)}; got {backend!r}")
    return backend


class Model:
    """A RoBERTa-PreLayerNorm model for one task. Pure data plus a ``__call__`` that runs the math.

    Attributes: ``config`` (:class:`Config`), ``params`` (:class:`Params`), ``task`` (a key of
    :data:`refimpl.params.TASKS`), ``backend`` (:data:`BACKENDS`: which code runs the math; an
    ``"auto"`` passed in is resolved here, once, from the config: :func:`auto_backend`),
    ``name_or_path`` (the local folder :func:`refimpl.from_pretrained` loaded, where the tokenizer
    is; None for a model built in memory; kept by :meth:`to` and :meth:`astype`).
    """

    name_or_path: str | None = None

    def __init__(self, config: Config, params: Params, task: str = "base", backend: str = "numpy"):
        backend = _check_backend(backend, config)
        self.config = config
        self.params = params
        self.task = normalize_task(task)
        self._backend = backend
        head = TASKS[self.task][1]
        if head is not None and getattr(params, head) is None:
            raise CheckpointError(f"task {self.task!r} needs the {head} parameters, which these params lack")

    # ---- properties --------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.params.embeddings.word.dtype

    @property
    def xp(self):
        return namespace(self.params.embeddings.word)

    def num_parameters(self) -> int:
        return num_parameters(self.params)

    def astype(self, dtype: str) -> "Model":
        """The same model computing in ``dtype`` ("float32" or "float64"); ties are kept."""
        target = parse_dtype(dtype)
        xp = self.xp
        cache: dict[int, Any] = {}

        def convert(a):
            if id(a) not in cache:
                cache[id(a)] = a if a.dtype == target else xp.astype(a, getattr(xp, np.dtype(target).name))
            return cache[id(a)]

        return self._same_source(Model(self.config, map_leaves(convert, self.params), self.task, self._backend))

    def _same_source(self, other: "Model") -> "Model":
        other.name_or_path = self.name_or_path
        return other

    @property
    def backend(self) -> str:
        """``numba`` (NumPy arrays, the fast path), ``numpy`` (the pure reference) or ``cupy``."""
        return "cupy" if is_cupy(self.xp) else self._backend

    def to(self, backend: str) -> "Model":
        """The same model on another backend (:data:`BACKENDS`, or ``"auto"``: :func:`auto_backend`);
        parameters move once, ties kept.

        ``numpy`` runs the reference (:mod:`refimpl.tasks`) on NumPy arrays; ``numba`` runs the fast
        path (:mod:`refimpl.fast`: Numba kernels for LayerNorm, masked softmax and bias+GELU, batch
        halves on two threads, GEMM orientation for few rows), held to the reference by tests; ``cupy`` moves the parameters to the GPU and runs the reference
        through the Array API namespace. Outputs stay on the model's device.
        """
        backend = _check_backend(backend, self.config)
        if backend == "cupy":
            try:
                import cupy
            except ImportError:
                raise ImportError(f"backend='cupy' needs CuPy: {CUPY_INSTALL_HINT}") from None
            move = cupy.asarray
        else:
            move = to_numpy
        cache: dict[int, Any] = {}

        def convert(a):
            if id(a) not in cache:
                cache[id(a)] = move(a)
            return cache[id(a)]

        return self._same_source(Model(self.config, map_leaves(convert, self.params), self.task, backend))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model(task={self.task!r}, dtype={np.dtype(self.dtype).name if hasattr(self.dtype, 'kind') else self.dtype}, "
            f"layers={c.num_hidden_layers}, hidden={c.hidden_size}, heads={c.num_attention_heads}, "
            f"vocab={c.vocab_size}, backend={self.backend!r}, parameters={self.num_parameters():,})"
        )

    # ---- the forward pass --------------------------------------------------------------------
    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        start_positions=None,
        end_positions=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int | Any = 0,
        past_key_values=None,
        use_cache: bool | None = None,
        cache=None,
        trace: Trace | None = None,
    ):
        """The forward pass, with transformers' arguments and output records.

        Arguments: ``input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels,
        start_positions, end_positions, encoder_hidden_states, encoder_attention_mask,
        output_hidden_states, output_attentions, logits_to_keep`` (causal-lm), and for decoders
        (``config.is_decoder``, tasks base and causal-lm) ``use_cache`` (default
        ``config.use_cache``) and a cache from an earlier call as ``past_key_values=`` or ``cache=``
        (transformers 5.x's name); they return the updated cache in ``past_key_values``. With a
        cache, pass only the new ids and a 2-D ``attention_mask`` covering the cached and the new
        positions, [B, P + T]. See docs/decoder.md.

        ``trace``: a :class:`refimpl.Trace` that records every intermediate tensor by name. A
        traced call always runs the reference (:mod:`refimpl.tasks`), whatever the backend: the
        traced program is the one that writes golden files.
        """
        x = validate(
            self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, labels, start_positions,
            end_positions, encoder_hidden_states, encoder_attention_mask, output_hidden_states, output_attentions,
            logits_to_keep, past_key_values, use_cache, cache,
        )
        if trace is None and self.backend == "numba":
            from .fast.tasks import FORWARD as FAST_FORWARD  # the fast path; imported on first use

            return FAST_FORWARD[self.task](self.params, self.config, x)
        return tasks.FORWARD[self.task](self.params, self.config, x, trace)
