"""One pipeline per task, text in and plain Python out, without torch or transformers.

    from refimpl import pipelines
    pipelines.fill_mask("tiny", "The capital of France is <mask>.", top_k=3)
    clf = pipelines.TextClassification("path/to/classifier")     # load once, call many times
    clf(["great film", "dull film"], top_k=None)

Every pipeline is a class (load once, call many times) with a function of the same task for one-off
use. ``model`` is a local folder, ``"tiny"`` (or another shipped random checkpoint, see
:data:`refimpl.hub.SHIPPED`), a Hub id (see :func:`refimpl.hub.resolve`) or a :class:`refimpl.Model`.
The tokenizer comes from the same place; a Model loaded by :func:`refimpl.from_pretrained`
remembers its folder (``model.name_or_path``), so it needs no ``tokenizer=`` either. ``tokenizer=``
(a :class:`refimpl.tokenizer.Tokenizer`, a folder, ``"tiny"`` or a Hub id) overrides it, and is
needed for a Model built in memory. Loading arguments: ``dtype``, ``backend`` (``"auto"``, the
default, ``"numba"`` or ``"numpy"``, see :meth:`refimpl.Model.to`), ``revision``, ``cache_dir``, ``token``;
running arguments: ``batch_size`` (texts per forward pass), ``truncate`` (cut inputs longer than
the model's limit ``max_position_embeddings - pad_token_id - 1`` instead of raising),
``progress`` (a tqdm bar on stderr; None = only when stderr is a terminal and there is more than
one batch, or an unknown number of inputs), ``group_by_length`` (default True: the inputs are read
``GROUP_WINDOW`` (8) batches at a time and batched in order of length, so that short texts are not
padded to long ones; the results still come in input order. False: batches in input order).

Streaming: ``pipe.stream(inputs, **options)`` takes any iterable (a generator, a file's lines)
and returns an iterator of results, one per input and in order, computed batch by batch as the
inputs are read: the results of a batch are available as soon as it finishes, and memory does
not grow with the number of inputs (with ``group_by_length``, results come 8 batches at a
time). Calling a text pipeline with an iterator (not a list), ``pipe(generator)``, does the same,
as transformers' pipelines do. The batches are those of a list of the same inputs, so the results
are identical to ``pipe(list(inputs))``.

Outputs follow transformers' pipelines (``FillMaskPipeline``, ``TextClassificationPipeline``,
``TokenClassificationPipeline``, and the ``QuestionAnsweringPipeline`` of transformers 4.x, which
transformers 5 removed): the same keys, the same scores and the same character offsets, as
Python floats, ints and strings. A string input gives one result, a list of strings a list of
results. Where we differ, on purpose:

- an input longer than the model's limit raises :class:`PipelineError` unless ``truncate=True``
  (transformers' token classification truncates silently; its other pipelines crash in the model);
- ``TextClassification`` always returns, per input, a list of ``{label, score}`` sorted by score
  (``top_k`` long; ``None`` = every label); transformers' legacy call without ``top_k`` returns a
  bare dict per input of a batch;
- inputs are batched and padded (``batch_size``), grouped by length within 8 batches
  (``group_by_length``); transformers runs one text at a time by default, and batches in input
  order. Padding changes nothing but float rounding (masked keys get ``finfo.min``);
- empty texts, a batch with no texts and a fill-mask text without ``<mask>`` raise
  :class:`PipelineError` with the position of the input (``err.index``, 0-based; the message
  says "input N", 1-based);
- the subword heuristic for first/average/max aggregation (RoBERTa's BPE has no
  continuing-subword prefix) is used silently, as documented here. A fill-mask target that is
  not one token is replaced by its first token with a warning on the ``"refimpl"`` logger, as
  transformers warns.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import heads
from .backend import to_numpy
from .blas import blas_threads
from .model import AUTO_NUMBA_FROM_HIDDEN, Model
from .tokenizer import Tokenizer, max_length_for

__all__ = [
    "PipelineError", "Pipeline", "FillMask", "TextClassification", "TokenClassification",
    "QuestionAnswering", "MultipleChoice", "Embedding", "TextGeneration", "pipeline", "load",
    "fill_mask", "classify", "tag", "answer", "choose", "embed", "generate", "AGGREGATIONS",
]

AGGREGATIONS = ("none", "simple", "first", "average", "max")
logger = logging.getLogger("refimpl")


class PipelineError(ValueError):
    """A bad pipeline input or a model that cannot do the task; the message is one line.

    ``PipelineError(reason, index=i)`` is about input ``i`` (0-based): its message reads
    ``"input {i + 1} {reason}"``; ``index`` and ``reason`` stay available to callers that number
    their inputs otherwise (the command line counts blank lines too).
    """

    def __init__(self, reason: str, index: int | None = None):
        self.reason, self.index = reason, index
        super().__init__(reason if index is None else f"input {index + 1} {reason}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load(model, task: str, tokenizer=None, *, dtype: str = "float32", revision=None, cache_dir=None,
         token=None, backend: str | None = None) -> tuple[Model, Tokenizer]:
    """(Model for ``task``, Tokenizer) from a name/folder/Hub id, or from a Model.

    A :class:`Model` for another task is accepted when ``task`` is ``"base"`` (its encoder is used).
    The tokenizer: ``tokenizer`` when given (a :class:`Tokenizer`, a folder, a shipped name such as
    ``"tiny"`` or a Hub id), else the model's own folder (``model.name_or_path`` for a Model).
    ``backend``: None keeps a Model's backend and loads a name with the default (``"auto"``).
    """
    from . import from_pretrained
    from .config import Config
    from .hub import SHIPPED, resolve
    from .params import task_from_architectures

    if isinstance(model, Model):
        if tokenizer is None:
            tokenizer = getattr(model, "name_or_path", None)
            if tokenizer is None:
                raise PipelineError("this Model was not loaded from a folder, so it has no tokenizer: pass "
                                    "tokenizer= (a refimpl Tokenizer, a tokenizer folder, 'tiny' or a Hub id)")
        if task == "base" and model.task != "base":
            model = _with_task(model, "base")
        elif model.task != task:
            raise PipelineError(f"this pipeline needs a {task} model; the Model given is a {model.task} model")
        if backend is not None and backend != model.backend:
            model = model.to(backend)
    else:
        folder = resolve(model, revision=revision, cache_dir=cache_dir, token=token)
        if task != "base":
            found = task_from_architectures(Config.from_pretrained(folder).architectures)
            if found not in (task, "base"):
                shipped = next((name for name in SHIPPED
                                if task_from_architectures(Config.from_pretrained(SHIPPED[name]).architectures) == task),
                               None)
                hint = f" (the random {task} checkpoint shipped with refimpl is {shipped!r})" if shipped else ""
                raise PipelineError(
                    f"{os.fspath(model)!r} is a {found} checkpoint (config.json architectures); this "
                    f"pipeline needs a {task} checkpoint{hint}")
        try:
            model = from_pretrained(folder, task=task, dtype=dtype, backend=backend or "auto")
        except ValueError as e:  # CheckpointError: keys missing for this task
            raise PipelineError(" ".join(str(e).split())) from e
        if tokenizer is None:
            tokenizer = folder
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(resolve(tokenizer, revision=revision, cache_dir=cache_dir, token=token))
    return model, tokenizer


def _with_task(model: Model, task: str) -> Model:
    """The same parameters as a model for ``task`` (a head's model as the base model); keeps its folder."""
    other = Model(model.config, model.params, task, model.backend)
    other.name_or_path = getattr(model, "name_or_path", None)
    return other


def _texts(inputs, name: str = "texts") -> tuple[list[str], bool]:
    """(list of non-empty strings, whether a single string was given)."""
    if isinstance(inputs, str):
        items, single = [inputs], True
    elif isinstance(inputs, (list, tuple)):
        items, single = list(inputs), False
    else:
        raise PipelineError(f"{name} must be a string or a list of strings, got {type(inputs).__name__}")
    if not items:
        raise PipelineError(f"no input: {name} is empty")
    for i, t in enumerate(items):
        _check_text(t, i, name)
    return items, single


def _check_text(t, i: int, name: str = "texts") -> None:
    if not isinstance(t, str):
        raise PipelineError(f"{name}[{i}] is a {type(t).__name__}, not a string")
    if not t.strip():
        raise PipelineError("is an empty text", i)


def _checked_text(t, i: int) -> str:
    _check_text(t, i)
    return t


def _is_stream(inputs) -> bool:
    """An iterable that is not a string, list or tuple (a generator, a file, ...): stream it."""
    return not isinstance(inputs, (str, bytes, list, tuple, dict)) and isinstance(inputs, Iterable)


GROUP_WINDOW = 8  # batches read at a time and grouped by length (group_by_length=True)


def _length(item) -> int:
    """The characters of an input (a text, or the texts of a tuple/list): the key of grouping."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, (tuple, list)):
        return sum(_length(x) for x in item)
    return 0


def _softmax(x: np.ndarray) -> np.ndarray:
    """transformers' numpy softmax over the last axis (max-shifted exp over its sum)."""
    e = x - np.max(x, axis=-1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def top_k_indices(x: np.ndarray, k: int, chunks: int = 256) -> np.ndarray:
    """The indices of the ``k`` largest values of each row, largest first, equal values by index:
    exactly ``np.argsort(-x, axis=-1, kind="stable")[:, :k]``, without sorting whole rows.

    x: [M, V] -> [M, k]. A row is cut into ``chunks`` pieces; the k-th largest of their maxima, t,
    is at most the row's k-th largest value (k distinct entries reach it), so every entry of the top
    k is ``>= t``: those few candidates, ties included, are sorted by (value descending, index
    ascending) and the first k kept. Rows with NaN, and k > chunks, take the full sort.
    """
    m, v = x.shape
    if k > chunks or chunks >= v or m == 0:
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    maxima = np.maximum.reduceat(x, _chunk_starts(v, chunks), axis=-1)  # [M, c]
    if np.isnan(maxima).any():  # a NaN (its chunk's maximum) would count as a value
        return np.argsort(-x, axis=-1, kind="stable")[:, :k]
    t = np.partition(maxima, chunks - k, axis=-1)[:, chunks - k, None]  # [M, 1]
    # the candidates, row-major: indices ascending within a row (NumPy's nonzero on a 2-D array takes
    # ~9x the time of a flat one: 0.7 ms against 0.08 for [8, 50265])
    r, c = np.divmod(np.flatnonzero(x >= t), v)  # [C] each
    counts = np.bincount(r, minlength=m)  # [M], each >= k
    order = np.lexsort((c, -x[r, c], r))  # by row, then value descending, then index
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [M]
    return c[order][starts[:, None] + np.arange(k)]  # [M, k]


@functools.lru_cache(maxsize=16)
def _chunk_starts(v: int, chunks: int) -> np.ndarray:
    """Where each of ``chunks`` nearly equal pieces of ``range(v)`` starts, [chunks] (read-only)."""
    starts = np.linspace(0, v, chunks, endpoint=False).astype(np.intp)
    starts.flags.writeable = False
    return starts


def mask_logits(model: Model, enc: dict, where: np.ndarray):
    """The masked-LM logits at the positions ``where`` [B, T] marks: ``model(**enc).logits[where]``,
    [M, V], with the LM head run on those M rows only (the encoder on the whole batch).

    The ``numba`` backend runs :func:`refimpl.fast.tasks.masked_lm_at`; the others the reference
    encoder (:func:`refimpl.tasks.encoder_forward`) and :func:`refimpl.heads.lm_head` on the rows.
    """
    from .inputs import validate

    x = validate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if model.backend == "numba":
        from .fast.tasks import masked_lm_at

        return masked_lm_at(model.params, model.config, x, where)
    from . import tasks

    seq = tasks.encoder_forward(model.params, model.config, x).last_hidden_state  # [B, T, H]
    rows, cols = (model.xp.asarray(a) for a in np.nonzero(where))  # [M] each
    return heads.lm_head(seq[rows, cols], model.params.lm_head, eps=model.config.layer_norm_eps)  # [M, V]


def first_token_states(model: Model, enc: dict):
    """The final hidden state of each row's first token (``<s>``): ``model(**enc).last_hidden_state[:, 0]``
    of the base model, [B, H], for a classifier, an ``<s>`` embedding or a multiple-choice pooler,
    which read nothing else (a multiple-choice model's [B, C, T] inputs give [B*C, H]).

    The ``numba`` backend runs :func:`refimpl.fast.tasks.first_token_states`, the others
    :func:`refimpl.tasks.first_token_states`: the last block's query, FFN and final LayerNorm on
    that position only.
    """
    from .inputs import validate

    x = validate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if model.backend == "numba":
        from .fast.tasks import first_token_states as fast_first_token_states

        return fast_first_token_states(model.params, model.config, x)
    from . import tasks

    return tasks.first_token_states(model.params, model.config, x)  # [B, H]


def token_states(model: Model, enc: dict, keep: np.ndarray):
    """The final hidden states at the positions ``keep`` [B, T] (bool) marks: the base model's
    ``model(**enc).last_hidden_state[keep]``, [M, H] in row-major order (mean pooling and a
    token classifier read the real tokens only).

    The ``numba`` backend runs :func:`refimpl.fast.tasks.token_states`: the tokens no kept state
    depends on (a batch's padding) are left out of every block. The others run the reference
    encoder and index its output.
    """
    from .inputs import validate

    x = validate(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    if model.backend == "numba":
        from .fast.tasks import token_states as fast_token_states

        return fast_token_states(model.params, model.config, x, keep)
    from . import tasks

    seq = tasks.encoder_forward(model.params, model.config, x).last_hidden_state  # [B, T, H]
    rows, cols = (model.xp.asarray(a) for a in np.nonzero(keep))  # [M] each
    return seq[rows, cols]  # [M, H]


def _scatter(rows: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """[M, C] rows at the positions ``keep`` [B, T] marks (row-major) -> [B, T, C], zeros elsewhere."""
    out = np.zeros(keep.shape + rows.shape[1:], rows.dtype)
    out[keep] = rows
    return out


class Pipeline:
    """Holds a model and its tokenizer; subclasses implement ``__call__`` for one task."""

    task = "base"  # the refimpl task the pipeline loads

    def __init__(self, model, tokenizer=None, *, dtype: str = "float32", revision=None, cache_dir=None,
                 token=None, batch_size: int = 8, truncate: bool = False, progress: bool | None = None,
                 backend: str | None = None, group_by_length: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise PipelineError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(group_by_length, bool):
            raise PipelineError(f"group_by_length must be True or False, got {group_by_length!r}")
        self.group_by_length = group_by_length
        self.model, self.tokenizer = load(model, self.task, tokenizer, dtype=dtype, revision=revision,
                                          cache_dir=cache_dir, token=token, backend=backend)
        self.batch_size, self.truncate, self.progress = batch_size, bool(truncate), progress
        c = self.model.config
        limit = max_length_for(c.max_position_embeddings, c.pad_token_id if c.pad_token_id is not None else -1)
        if self.tokenizer.model_max_length is not None:
            limit = min(limit, self.tokenizer.model_max_length)
        self.max_length = limit  # the longest input, special tokens included

    # ---- helpers shared by the tasks ---------------------------------------------------------
    def _batches(self, items: Iterable, desc: str, bs: int) -> Iterator[tuple[int, list]]:
        """(index of the first item, items) per ``bs`` items, read lazily from ``items``, with a
        progress bar on stderr when wanted (it counts the inputs whose results have been taken)."""
        n = len(items) if isinstance(items, Sequence) else None
        show = self.progress
        if show is None:
            show = (n is None or n > self.batch_size) and sys.stderr.isatty()
        bar = None
        if show:
            from tqdm.auto import tqdm

            # Shown automatically for an unknown count, the bar waits a second, so that a short stream
            # never flashes one; asked for (progress=True), it shows at once.
            delay = 1.0 if n is None and self.progress is None else 0.0
            bar = tqdm(total=n, desc=desc, unit="input", file=sys.stderr, leave=False, delay=delay)
        source = iter(items)
        start = 0
        try:
            while True:
                batch = list(itertools.islice(source, bs))
                if not batch:
                    return
                yield start, batch
                start += len(batch)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()

    def _run(self, items: Iterable, desc: str, run_batch: Callable[[list, int], list],
             check: Callable[[Any, int], Any] | None = None, *, group: bool = True) -> Iterator:
        """The results of ``run_batch(batch, first)`` for each batch, one result per input, in order.

        ``check(item, index)`` validates (and may normalise) each item as it is read. ``group``:
        the task's batches may be grouped by length (see :meth:`_window`).
        """
        grouped = group and self.group_by_length and self.batch_size > 1
        read = self.batch_size * GROUP_WINDOW if grouped else self.batch_size
        for first, chunk in self._batches(items, desc, read):
            checked, error = [], None
            for j, item in enumerate(chunk):
                try:
                    checked.append(item if check is None else check(item, first + j))
                except PipelineError as e:
                    error = e  # the results of the inputs before it come first
                    break
            yield from self._window(checked, first, run_batch, grouped)
            if error is not None:
                raise error

    def _window(self, items: list, first: int, run_batch: Callable[[list, int], list], grouped: bool) -> Iterator:
        """The results of ``items`` (inputs ``first``, ``first + 1``, ...) in order, ``batch_size``
        at a time; with ``grouped``, the batches are taken in order of length (characters, a cheap
        stand-in for tokens; ties in input order), so that each batch pads to a length near its
        rows' own: measured on short texts of 4-16 words, a fifth fewer tokens and a third less
        attention work than batches in input order. Only float rounding can differ: a row's
        padding masks keys that get weight 0.

        If an input fails, the results of the inputs before it come first (computed anew, as if the
        input before it were the last), then its error; an earlier failing input is found first.
        """
        grouped = grouped and len(items) > self.batch_size  # (one batch: nothing to group)
        order = sorted(range(len(items)), key=lambda j: _length(items[j])) if grouped else range(len(items))
        # A small model on the NumPy reference: its GEMMs take microseconds, and waking OpenBLAS's
        # second thread for each costs more than the product (measured: a tiny classifier 8x faster
        # on one BLAS thread). The batch runs on one; the results are the same.
        small = self.model.backend == "numpy" and self.model.config.hidden_size < AUTO_NUMBA_FROM_HIDDEN
        results: list = [None] * len(items)
        bs = self.batch_size
        for a in range(0, len(items), bs):
            rows = order[a:a + bs]
            batch = [items[j] for j in rows]
            try:
                with blas_threads(1) if small else contextlib.nullcontext():
                    out = run_batch(batch, 0)  # error indices: positions in this batch
            except PipelineError as e:
                if e.index is None:
                    raise
                bad = rows[e.index]  # the failing input's position in items
                yield from self._window(items[:bad], first, run_batch, grouped)  # (they may fail first)
                raise PipelineError(e.reason, first + bad) from e.__cause__
            for j, r in zip(rows, out):
                results[j] = r
        yield from results

    def stream(self, inputs: Iterable, **options) -> Iterator:
        """An iterator of results, one per input, computed batch by batch as ``inputs`` is read.

        The inputs are those of one call of the pipeline (a text; for ``TextClassification`` a
        text or a ``(text, pair)`` tuple; for ``QuestionAnswering`` a ``(question, context)``
        tuple; for ``MultipleChoice`` a ``(prompt, endings)`` tuple), the options its keyword
        arguments. Options are checked at once; inputs as they are read.
        """
        raise NotImplementedError  # each task's class defines it

    def _encode(self, texts: list[str], pairs: list[str] | None = None, first: int = 0, **kw) -> dict:
        """Tokenize a batch (padded right); over-long rows raise unless ``truncate`` (longest_first)."""
        tok = self.tokenizer
        try:
            enc = tok(texts, pairs, padding=True, max_length=2**31 - 1, **kw)  # no limit: we check below
            lengths = enc["attention_mask"].sum(axis=1)
            if int(lengths.max()) > self.max_length:
                if not self.truncate:
                    i = int(np.argmax(lengths > self.max_length))
                    raise PipelineError(
                        f"is {int(lengths[i])} tokens long (special tokens included), "
                        f"more than this model's limit of {self.max_length} (max_position_embeddings - "
                        f"pad_token_id - 1); shorten it or allow truncation (truncate=True, --truncate)", first + i)
                enc = tok(texts, pairs, padding=True, truncation=True, max_length=self.max_length, **kw)
        except PipelineError:
            raise
        except (ValueError, TypeError) as e:
            raise PipelineError(str(e)) from e
        return enc

    def _forward(self, enc: dict, model: Model | None = None):
        model = model or self.model
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])


# ---------------------------------------------------------------------------------------------
# fill-mask
# ---------------------------------------------------------------------------------------------


class FillMask(Pipeline):
    """Masked-token prediction (transformers' ``FillMaskPipeline`` output).

    ``__call__(texts, top_k=5, targets=None)``: per text with one ``<mask>``, a list of ``top_k``
    ``{"score", "token", "token_str", "sequence"}`` (best first); with several masks, one such list
    per mask (then ``sequence`` keeps the special tokens, as in transformers). ``targets``: restrict
    the candidates to these tokens (a token not in the vocabulary is replaced by its first BPE
    token, as transformers does).
    """

    task = "masked-lm"

    def __call__(self, texts, top_k: int = 5, targets=None):
        if _is_stream(texts):
            return self.stream(texts, top_k=top_k, targets=targets)
        items, single = _texts(texts)
        results = list(self.stream(items, top_k=top_k, targets=targets))
        return results[0] if single else results

    def stream(self, inputs: Iterable, top_k: int = 5, targets=None) -> Iterator:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise PipelineError(f"top_k must be a positive integer, got {top_k!r}")
        target_ids = self._target_ids(targets) if targets is not None else None
        tok = self.tokenizer
        mask_id, pad_id = tok.mask_token_id, tok.pad_token_id

        def run_batch(batch: list[str], first: int) -> list:
            enc = self._encode(batch, first=first)
            ids, attn = enc["input_ids"], enc["attention_mask"]  # [B, T]
            where = (ids == mask_id) & (attn == 1)  # [B, T]: the masks
            has = where.any(axis=1)
            if not has.all():
                raise PipelineError(f"has no {tok.mask_token}: fill-mask needs at least one (e.g. \"The capital "
                                    f"of France is {tok.mask_token}.\")", first + int(np.argmin(has)))
            probs = _softmax(to_numpy(mask_logits(self.model, enc, where)))  # [M, V]: mask rows only
            if target_ids is not None:
                probs = probs[:, target_ids]  # [M, V']
            return self._postprocess(ids, attn, where, probs, min(top_k, probs.shape[-1]), target_ids, pad_id)

        return self._run(inputs, "fill-mask", run_batch, _checked_text)

    def _postprocess(self, ids, attn, where, probs, k, target_ids, pad_id) -> list:
        """Per text, the ``k`` best tokens per mask. ids, attn, where: [B, T]; probs: [M, V'] (M masks)."""
        tok = self.tokenizer
        rows, cols = np.nonzero(where)  # [M] each, the masks in text order
        best = top_k_indices(probs, k)  # [M, k]
        scores = np.take_along_axis(probs, best, axis=-1).tolist()  # [M, k] Python floats
        token_ids = best if target_ids is None else target_ids[best]  # [M, k]
        single = (where.sum(axis=1) == 1)[rows]  # [M]: the text has one mask
        # The filled sequences: the text's tokens with the mask replaced, padding dropped.
        filled = np.repeat(ids[rows][:, None, :], k, axis=1)  # [M, k, T]
        filled[np.arange(len(rows))[:, None], np.arange(k)[None, :], cols[:, None]] = token_ids
        keep = (attn[rows] == 1)[:, None, :] & (filled != pad_id)  # [M, k, T]
        sequences = np.empty(filled.shape[:2], dtype=object)  # [M, k]
        for flag in (True, False):  # one batched decode per skip_special_tokens value
            picked = np.nonzero(single == flag)[0]
            if len(picked):
                texts = tok.batch_decode([f[m] for fm, mm in zip(filled[picked], keep[picked]) for f, m in zip(fm, mm)],
                                         skip_special_tokens=flag)
                sequences[picked] = np.array(texts, dtype=object).reshape(len(picked), k)
        distinct = np.unique(token_ids).tolist()
        token_strs = dict(zip(distinct, tok.batch_decode([[t] for t in distinct])))  # id -> decode([id])
        token_ids = token_ids.tolist()
        out: list = [[] for _ in range(ids.shape[0])]
        for m, r in enumerate(rows.tolist()):
            out[r].append([{"score": s, "token": t, "token_str": token_strs[t], "sequence": q}
                           for s, t, q in zip(scores[m], token_ids[m], sequences[m].tolist())])
        return [masks[0] if len(masks) == 1 else masks for masks in out]

    def _target_ids(self, targets) -> np.ndarray:
        if isinstance(targets, str):
            targets = [targets]
        vocab = self.tokenizer.get_vocab()
        ids = []
        for t in targets:
            if t in vocab:
                ids.append(vocab[t])
                continue
            pieces = self.tokenizer(t, add_special_tokens=False)["input_ids"][0]
            if len(pieces) == 1:  # e.g. " Paris" is the one token "ĠParis"
                ids.append(int(pieces[0]))
            elif len(pieces):
                first = int(pieces[0])
                # transformers' FillMaskPipeline warns too (and scores the first piece).
                logger.warning("the target %r is not one token of the vocabulary but %d (%s); scoring its "
                               "first token %r instead", t, len(pieces),
                               " ".join(self.tokenizer.convert_ids_to_tokens([int(x) for x in pieces])),
                               self.tokenizer.convert_ids_to_tokens(first))
                ids.append(first)
            else:
                logger.warning("the target %r gives no token; it is ignored", t)
        if not ids:
            raise PipelineError("none of the targets gives a token")
        return np.array(sorted(set(ids)), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# classify
# ---------------------------------------------------------------------------------------------


class TextClassification(Pipeline):
    """Sequence classification (transformers' ``TextClassificationPipeline`` scores).

    ``__call__(texts, text_pairs=None, top_k=1, function_to_apply=None)``: per text, a list of
    ``{"label", "score"}`` sorted by score, ``top_k`` long (None: every label). ``text_pairs``: a
    second text per input (a string when ``texts`` is one string). ``function_to_apply``: None
    chooses as transformers does: ``problem_type == "regression"`` -> ``"none"``; multi-label or
    ``num_labels == 1`` -> ``"sigmoid"``; otherwise ``"softmax"``.
    """

    task = "sequence-classification"

    def __call__(self, texts, text_pairs=None, top_k: int | None = 1, function_to_apply: str | None = None):
        if _is_stream(texts) and text_pairs is None:
            return self.stream(texts, top_k=top_k, function_to_apply=function_to_apply)
        items, single = _texts(texts)
        inputs: list = items
        if text_pairs is not None:
            pairs, pair_single = _texts(text_pairs, "text_pairs")
            if pair_single != single or len(pairs) != len(items):
                raise PipelineError(f"text_pairs must match texts: {len(items)} texts, {len(pairs)} pairs")
            inputs = list(zip(items, pairs))
        results = list(self.stream(inputs, top_k=top_k, function_to_apply=function_to_apply))
        return results[0] if single else results

    def stream(self, inputs: Iterable, top_k: int | None = 1, function_to_apply: str | None = None) -> Iterator:
        """``inputs``: texts, or ``(text, pair)`` tuples (all of them, or none)."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise PipelineError(f"top_k must be a positive integer or None, got {top_k!r}")
        fn = function_to_apply or self.default_function()
        if fn not in ("softmax", "sigmoid", "none"):
            raise PipelineError(f"function_to_apply must be softmax, sigmoid or none, got {fn!r}")
        id2label = self.model.config.id2label
        paired: list[bool] = []  # whether the first input was a pair: every other must agree

        def check(item, i: int) -> tuple[str, str | None]:
            text, pair = (item if isinstance(item, tuple) and len(item) == 2 else (item, None))
            _check_text(text, i)
            if pair is not None:
                _check_text(pair, i, "text_pairs")
            if not paired:
                paired.append(pair is not None)
            elif paired[0] != (pair is not None):
                raise PipelineError("has " + ("no pair" if paired[0] else "a pair") + " and the first input "
                                    + ("has one" if paired[0] else "does not") + ": give every input a pair or none", i)
            return text, pair

        def run_batch(batch: list[tuple[str, str | None]], first: int) -> list:
            texts = [t for t, _ in batch]
            pairs = [p for _, p in batch] if paired[0] else None
            enc = self._encode(texts, pairs, first=first)
            states = first_token_states(self.model, enc)  # [B, H]: the head reads <s> only
            with blas_threads(1):  # microseconds of GEMM: a woken second BLAS thread would spin into the next batch
                logits = to_numpy(heads.classification_head(states[:, None, :], self.model.params.classifier))  # [B, K]
            scores = {"softmax": _softmax, "sigmoid": _sigmoid, "none": lambda x: x}[fn](logits)
            order = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]  # [B, k]: best first, ties by label id
            ranked = np.take_along_axis(scores, order, axis=-1).tolist()
            labels = [id2label[k] for k in range(scores.shape[-1])]
            return [[{"label": labels[k], "score": s} for k, s in zip(ks, ss)] for ks, ss in zip(order.tolist(), ranked)]

        return self._run(inputs, "classify", run_batch, check)

    def default_function(self) -> str:
        c = self.model.config
        if c.problem_type == "regression":
            return "none"
        if c.problem_type == "multi_label_classification" or c.num_labels == 1:
            return "sigmoid"
        return "softmax"


# ---------------------------------------------------------------------------------------------
# tag
# ---------------------------------------------------------------------------------------------


class TokenClassification(Pipeline):
    """Token classification / NER (transformers' ``TokenClassificationPipeline``).

    ``__call__(texts, aggregation_strategy="none", ignore_labels=("O",))``: per text, a list of
    entities. "none": ``{"entity", "score", "index", "word", "start", "end"}`` per token (``word``
    is the raw BPE token, e.g. ``"ĠParis"``); "simple", "first", "average", "max":
    ``{"entity_group", "score", "word", "start", "end"}`` per group of adjacent tokens (B-/I- tags
    merged as transformers merges them; ``word`` decoded). ``start``/``end`` are character offsets
    into the text. For first/average/max a token continues a word when the character before it is
    not a space (transformers' fallback for tokenizers without a continuing-subword prefix).
    """

    task = "token-classification"

    def __call__(self, texts, aggregation_strategy: str = "none", ignore_labels=("O",)):
        if _is_stream(texts):
            return self.stream(texts, aggregation_strategy, ignore_labels)
        items, single = _texts(texts)
        results = list(self.stream(items, aggregation_strategy, ignore_labels))
        return results[0] if single else results

    def stream(self, inputs: Iterable, aggregation_strategy: str = "none", ignore_labels=("O",)) -> Iterator:
        strategy = (aggregation_strategy or "none").lower()
        if strategy not in AGGREGATIONS:
            raise PipelineError(f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}, got {aggregation_strategy!r}")
        ignore = set(ignore_labels or ())

        def run_batch(batch: list[str], first: int) -> list:
            enc = self._encode(batch, first=first, return_offsets_mapping=True, return_special_tokens_mask=True)
            real = np.asarray(enc["attention_mask"]) != 0  # [B, T]: the head reads these tokens only
            states = token_states(self.model, enc, real)  # [M, H]
            logits = _scatter(to_numpy(heads.token_classification_head(states, self.model.params.token_classifier)),
                              real)  # [M, K] -> [B, T, K], zeros at padding (never read)
            scores = _softmax(logits)
            out = []
            for i, sentence in enumerate(batch):
                pre = self._gather(sentence, enc["input_ids"][i], scores[i], enc["offset_mapping"][i],
                                   enc["special_tokens_mask"][i], strategy)
                entities = self._aggregate(pre, strategy)
                out.append([e for e in entities
                            if e.get("entity") not in ignore and e.get("entity_group") not in ignore])
            return out

        return self._run(inputs, "tag", run_batch, _checked_text)

    def _gather(self, sentence, input_ids, scores, offsets, special, strategy) -> list[dict]:
        tok = self.tokenizer
        word_aware = bool(getattr(tok.backend.model, "continuing_subword_prefix", None))
        pre = []
        for idx, token_scores in enumerate(scores):
            if special[idx]:
                continue  # <s>, </s> and padding
            word = tok.convert_ids_to_tokens(int(input_ids[idx]))
            start, end = int(offsets[idx][0]), int(offsets[idx][1])
            word_ref = sentence[start:end]
            if word_aware:
                is_subword = len(word) != len(word_ref)
            else:
                is_subword = start > 0 and " " not in sentence[start - 1:start + 1]
            if int(input_ids[idx]) == tok.unk_token_id:
                word, is_subword = word_ref, False
            pre.append({"word": word, "scores": token_scores, "start": start, "end": end, "index": idx,
                        "is_subword": is_subword})
        return pre

    def _aggregate(self, pre: list[dict], strategy: str) -> list[dict]:
        id2label = self.model.config.id2label
        if strategy in ("none", "simple"):
            entities = []
            for p in pre:
                k = int(p["scores"].argmax())
                entities.append({"entity": id2label[k], "score": float(p["scores"][k]), "index": p["index"],
                                 "word": p["word"], "start": p["start"], "end": p["end"]})
        else:
            entities = self._aggregate_words(pre, strategy)
        if strategy == "none":
            return entities
        return self._group_entities(entities)

    def _aggregate_word(self, group: list[dict], strategy: str) -> dict:
        id2label = self.model.config.id2label
        if strategy == "first":
            scores = group[0]["scores"]
        elif strategy == "max":
            scores = max(group, key=lambda e: e["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([e["scores"] for e in group]), axis=0)
        k = int(scores.argmax())
        return {"entity": id2label[k], "score": float(scores[k]), "word": self._to_string([e["word"] for e in group]),
                "start": group[0]["start"], "end": group[-1]["end"]}

    def _aggregate_words(self, pre: list[dict], strategy: str) -> list[dict]:
        words, group = [], None
        for p in pre:
            if group is None:
                group = [p]
            elif p["is_subword"]:
                group.append(p)
            else:
                words.append(self._aggregate_word(group, strategy))
                group = [p]
        if group is not None:
            words.append(self._aggregate_word(group, strategy))
        return words

    @staticmethod
    def _tag(name: str) -> tuple[str, str]:
        if name.startswith("B-"):
            return "B", name[2:]
        if name.startswith("I-"):
            return "I", name[2:]
        return "I", name  # not in B-/I- form: a continuation

    def _group(self, group: list[dict]) -> dict:
        return {"entity_group": group[0]["entity"].split("-", 1)[-1],
                "score": float(np.mean(np.nanmean([e["score"] for e in group]))),
                "word": self._to_string([e["word"] for e in group]),
                "start": group[0]["start"], "end": group[-1]["end"]}

    def _group_entities(self, entities: list[dict]) -> list[dict]:
        groups, current = [], []
        for e in entities:
            if not current:
                current.append(e)
                continue
            bi, tag = self._tag(e["entity"])
            _, last_tag = self._tag(current[-1]["entity"])
            if tag == last_tag and bi != "B":
                current.append(e)
            else:
                groups.append(self._group(current))
                current = [e]
        if current:
            groups.append(self._group(current))
        return groups

    def _to_string(self, tokens: list[str]) -> str:
        """BPE tokens -> text (transformers' ``convert_tokens_to_string``: the byte-level decoder)."""
        return self.tokenizer.backend.decoder.decode(tokens)


# ---------------------------------------------------------------------------------------------
# qa
# ---------------------------------------------------------------------------------------------


class QuestionAnswering(Pipeline):
    """Extractive question answering (the scoring of transformers 4.x ``QuestionAnsweringPipeline``).

    ``__call__(question, context, top_k=1, doc_stride=None, max_answer_len=15, max_seq_len=None,
    handle_impossible_answer=False, align_to_words=True)``: per (question, context), the best span
    ``{"score", "start", "end", "answer"}`` (character offsets into the context), or a list of the
    ``top_k`` best. A context too long for ``max_seq_len`` (default ``min(384, model limit)``) is
    cut into windows that overlap by ``doc_stride`` tokens (default ``min(max_seq_len // 2, 128)``).

    Scoring, per window: start and end logits of every token that is not context (question,
    separators, padding) are set to -10000 (``<s>`` is kept), both are softmaxed, ``<s>`` is then
    zeroed (its product is the "no answer" score, reported only with handle_impossible_answer),
    and a span scores ``p_start[s] * p_end[e]`` for ``s <= e < s + max_answer_len``. Spans are
    widened to whole words (``align_to_words``); answers with the same text (ignoring case) found
    in several windows add their scores; the best ``top_k`` are returned.
    """

    task = "question-answering"

    def __call__(self, question, context, top_k: int = 1, doc_stride: int | None = None, max_answer_len: int = 15,
                 max_seq_len: int | None = None, handle_impossible_answer: bool = False,
                 align_to_words: bool = True):
        questions, single = _texts(question, "question")
        contexts, ctx_single = _texts(context, "context")
        if len(contexts) != len(questions):
            if ctx_single:
                contexts = contexts * len(questions)
            else:
                raise PipelineError(f"{len(questions)} questions but {len(contexts)} contexts")
        results = list(self.stream(list(zip(questions, contexts)), top_k=top_k, doc_stride=doc_stride,
                                   max_answer_len=max_answer_len, max_seq_len=max_seq_len,
                                   handle_impossible_answer=handle_impossible_answer, align_to_words=align_to_words))
        return results[0] if single else results

    def stream(self, inputs: Iterable, top_k: int = 1, doc_stride: int | None = None, max_answer_len: int = 15,
               max_seq_len: int | None = None, handle_impossible_answer: bool = False,
               align_to_words: bool = True) -> Iterator:
        """``inputs``: ``(question, context)`` tuples."""
        for name, v in (("top_k", top_k), ("max_answer_len", max_answer_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PipelineError(f"{name} must be a positive integer, got {v!r}")
        if max_seq_len is None:
            max_seq_len = min(self.max_length, 384)
        if max_seq_len > self.max_length:
            raise PipelineError(f"max_seq_len={max_seq_len} is more than this model's limit of {self.max_length}")
        if doc_stride is None:
            doc_stride = min(max_seq_len // 2, 128)
        if doc_stride > max_seq_len:
            raise PipelineError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len})")

        def check(item, i: int) -> tuple[str, str]:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise PipelineError(f"is a {type(item).__name__}: question answering streams (question, context) "
                                    f"tuples", i)
            _check_text(item[0], i, "question")
            _check_text(item[1], i, "context")
            return item

        def run_batch(batch: list[tuple[str, str]], first: int) -> list:
            qs, cs = [q for q, _ in batch], [c for _, c in batch]
            try:
                enc = self.tokenizer(qs, cs, padding=True, truncation="only_second", max_length=max_seq_len,
                                     stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                                     return_word_ids=True, return_sequence_ids=True)
            except ValueError as e:
                raise PipelineError(f"{e} (lower doc_stride or raise max_seq_len)") from e
            windows = enc["overflow_to_sample_mapping"]
            start_logits, end_logits = [], []
            for w0 in range(0, len(windows), self.batch_size):  # windows, batch_size at a time
                part = {k: enc[k][w0:w0 + self.batch_size] for k in ("input_ids", "attention_mask")}
                real = np.asarray(part["attention_mask"]) != 0  # [w, T]: padding is never part of an answer
                states = token_states(self.model, part, real)[:, None, :]  # [M, 1, H]
                with blas_threads(1):  # microseconds of GEMM (see TextClassification)
                    span = heads.question_answering_head(states, self.model.params.qa_outputs)  # [M, 1] each
                span = _scatter(np.concatenate([to_numpy(a) for a in span], axis=1), real)  # [w, T, 2], 0 at padding
                start_logits.append(span[..., 0])
                end_logits.append(span[..., 1])
            starts, ends = np.concatenate(start_logits), np.concatenate(end_logits)  # [W, T]
            return [self._postprocess(enc, np.nonzero(windows == i)[0], starts, ends, ctx, top_k,
                                      handle_impossible_answer, max_answer_len, align_to_words)
                    for i, ctx in enumerate(cs)]

        return self._run(inputs, "qa", run_batch, check)

    def _postprocess(self, enc, rows, starts, ends, context, top_k, handle_impossible, max_answer_len, align):
        min_null_score = 1000000.0
        answers: list[dict] = []
        for r in rows:
            seq_ids, attn = enc["sequence_ids"][r], enc["attention_mask"][r]
            # p_mask: 1 where a token cannot be part of the answer (anything but the context), <s> kept.
            p_mask = np.array([s != 1 for s in seq_ids], dtype=np.int64)
            p_mask[enc["input_ids"][r] == self.tokenizer.cls_token_id] = 0
            undesired = np.abs(p_mask - 1) & attn  # 1 = may be part of the answer (inverse of its name)
            start = np.where(undesired == 0, -10000.0, starts[r])[None]  # [1, T]
            end = np.where(undesired == 0, -10000.0, ends[r])[None]
            start = np.exp(start - start.max(axis=-1, keepdims=True))
            start = start / start.sum()
            end = np.exp(end - end.max(axis=-1, keepdims=True))
            end = end / end.sum()
            if handle_impossible:
                min_null_score = min(min_null_score, float(start[0, 0] * end[0, 0]))
            start[0, 0] = end[0, 0] = 0.0
            for s, e, score in zip(*_decode_spans(start, end, top_k, max_answer_len, undesired)):
                a, b = self._char_span(enc, r, int(s), int(e), align)
                text = context[a:b]
                same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
                if same is not None:
                    same["score"] += float(score)
                else:
                    answers.append({"score": float(score), "start": a, "end": b, "answer": text})
        if handle_impossible:
            answers.append({"score": min_null_score, "start": 0, "end": 0, "answer": ""})
        answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
        return answers[0] if len(answers) == 1 else answers

    @staticmethod
    def _char_span(enc, r: int, s: int, e: int, align: bool) -> tuple[int, int]:
        """Character span of tokens s..e of window r in the context; whole words when ``align``.

        ``tokenizers``' ``word_to_chars``: the first and last token of the word (in the context,
        within this window) give its start and end; special tokens have no word: token offsets then.
        """
        offsets, words, seqs = enc["offset_mapping"][r], enc["word_ids"][r], enc["sequence_ids"][r]
        if align and words[s] is not None and words[e] is not None:
            def word_span(w):
                toks = [t for t, (wi, si) in enumerate(zip(words, seqs)) if wi == w and si == 1]
                return (int(offsets[toks[0]][0]), int(offsets[toks[-1]][1])) if toks else None

            ws, we = word_span(words[s]), word_span(words[e])
            if ws is not None and we is not None:
                return ws[0], we[1]
        return int(offsets[s][0]), int(offsets[e][1])


def _decode_spans(start, end, top_k: int, max_answer_len: int, undesired):
    """The ``top_k`` best (start, end, score) with ``start <= end < start + max_answer_len``.

    start, end: [1, T] probabilities. Candidates are the outer product with the lower triangle and
    everything beyond ``max_answer_len - 1`` above the diagonal zeroed, then kept only when both
    ends may be part of the answer (transformers' ``decode_spans``).
    """
    outer = np.matmul(start[..., None], end[:, None, :])  # [1, T, T]
    candidates = np.tril(np.triu(outer), max_answer_len - 1)
    flat = candidates.flatten()
    if top_k == 1:
        idx = [np.argmax(flat)]
    elif len(flat) < top_k:
        idx = np.argsort(-flat)
    else:
        part = np.argpartition(-flat, top_k)[0:top_k]
        idx = part[np.argsort(-flat[part])]
    s, e = np.unravel_index(idx, candidates.shape)[1:]
    allowed = undesired.nonzero()
    keep = np.isin(s, allowed) & np.isin(e, allowed)
    s, e = s[keep], e[keep]
    return s, e, candidates[0, s, e]


# ---------------------------------------------------------------------------------------------
# choose
# ---------------------------------------------------------------------------------------------


class MultipleChoice(Pipeline):
    """Multiple choice: a prompt and N candidate endings, scored by a ``...ForMultipleChoice`` head.

    ``__call__(prompts, endings)``: ``endings`` is a list of strings for one prompt, or a list of
    such lists for a list of prompts. Per prompt: ``[{"index", "ending", "score"}, ...]`` in the
    order given, scores softmaxed over the endings. Each (prompt, ending) pair is encoded as
    ``<s> prompt </s></s> ending </s>``, as ``tokenizer(prompt, ending)`` does.
    """

    task = "multiple-choice"

    def __call__(self, prompts, endings):
        items, single = _texts(prompts, "prompts")
        groups = [endings] if single else list(endings)
        if len(groups) != len(items):
            raise PipelineError(f"{len(items)} prompts but {len(groups)} lists of endings")
        results = list(self.stream(list(zip(items, groups))))
        return results[0] if single else results

    def stream(self, inputs: Iterable) -> Iterator:
        """``inputs``: ``(prompt, endings)`` tuples, ``endings`` a list of at least two strings."""

        def check(item, i: int) -> tuple[str, list[str]]:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise PipelineError(f"is a {type(item).__name__}: multiple choice streams (prompt, endings) tuples", i)
            prompt, ends = item
            _check_text(prompt, i, "prompts")
            ends, _ = _texts(ends if isinstance(ends, (list, tuple)) else [ends], f"endings of prompt {i + 1}")
            if len(ends) < 2:
                raise PipelineError(f"prompt {i + 1} has {len(ends)} ending; give at least two to choose from")
            return prompt, ends

        def run_batch(batch: list[tuple[str, list[str]]], first: int) -> list:
            out = []
            for j, (prompt, ends) in enumerate(batch):  # one forward of the C choices per prompt: C may differ
                enc = self._encode([prompt] * len(ends), ends, first=first + j)
                inputs = {k: enc[k][None] for k in ("input_ids", "attention_mask")}  # [1, C, T]
                states = first_token_states(self.model, inputs)  # [C, H] (choices as rows): the pooler reads <s> only
                p = self.model.params
                with blas_threads(1):  # microseconds of GEMM (see TextClassification)
                    pooled = heads.pooler(states[:, None, :], p.pooler)  # [C, H]
                    logits = heads.multiple_choice_head(pooled, p.choice_classifier, len(ends))  # [1, C]
                scores = _softmax(to_numpy(logits))[0]  # [C]
                out.append([{"index": c, "ending": e, "score": float(s)} for c, (e, s) in enumerate(zip(ends, scores))])
            return out

        return self._run(inputs, "choose", run_batch, check, group=False)  # one forward per prompt


# ---------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------


class Embedding(Pipeline):
    """Sentence embeddings from ``last_hidden_state`` (any checkpoint: only the encoder is used).

    ``__call__(texts, pooling="cls", normalize=False)``: an ``np.ndarray`` [N, H] (or [H] for one
    string) in the model's dtype. pooling "cls": the first token (``<s>``); "mean": the average over
    the attention mask. normalize: divide by the L2 norm (at least 1e-12, as torch's normalize).
    """

    task = "base"

    def __call__(self, texts, pooling: str = "cls", normalize: bool = False) -> np.ndarray:
        if _is_stream(texts):
            return self.stream(texts, pooling=pooling, normalize=normalize)
        items, single = _texts(texts)
        out = np.stack(list(self.stream(items, pooling=pooling, normalize=normalize)))  # [N, H]
        return out[0] if single else out

    def stream(self, inputs: Iterable, pooling: str = "cls", normalize: bool = False) -> Iterator[np.ndarray]:
        """One vector [H] per text."""
        if pooling not in ("cls", "mean"):
            raise PipelineError(f"pooling must be 'cls' or 'mean', got {pooling!r}")

        def run_batch(batch: list[str], first: int) -> list:
            enc = self._encode(batch, first=first)
            if pooling == "cls":
                v = to_numpy(first_token_states(self.model, enc))  # [B, H]: <s> only
            else:
                real = np.asarray(enc["attention_mask"]) != 0  # [B, T]
                h = _scatter(to_numpy(token_states(self.model, enc, real)), real)  # [B, T, H], zeros at padding
                m = enc["attention_mask"][..., None].astype(h.dtype)  # [B, T, 1]
                v = (h * m).sum(axis=1) / m.sum(axis=1)  # [B, H]
            if normalize:
                v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
            return list(v)  # B rows [H]

        return self._run(inputs, "embed", run_batch, _checked_text)


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


class TextGeneration(Pipeline):
    """Text continuation with :func:`refimpl.generate` (a causal-LM checkpoint, ``is_decoder=True``).

    ``__call__(texts, max_new_tokens=20, do_sample=False, temperature=1.0, top_k=None, top_p=None,
    seed=None)``: per text ``{"generated_text": text + continuation}`` (transformers'
    text-generation output). A prompt is ``<s>`` + its tokens (no ``</s>``: that is the end-of-text
    token), padded on the left within a batch; the continuation stops at ``</s>``.
    """

    task = "causal-lm"

    def __call__(self, texts, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        if _is_stream(texts):
            return self.stream(texts, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed)
        items, single = _texts(texts)
        results = list(self.stream(items, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed))
        return results[0] if single else results

    def stream(self, inputs: Iterable, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> Iterator:
        from .generate import generate as _generate

        tok = self.tokenizer

        def run_batch(batch: list[str], first: int) -> list:
            enc = self._encode(batch, first=first, add_special_tokens=False)
            rows = [[tok.bos_token_id] + [int(t) for t in ids[m == 1]]
                    for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
            n = max(len(r) for r in rows)
            ids = np.full((len(rows), n), tok.pad_token_id, dtype=np.int64)  # [B, T], padded on the left
            mask = np.zeros((len(rows), n), dtype=np.int64)
            for i, r in enumerate(rows):
                ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed)
            out = to_numpy(_generate(self.model, ids, attention_mask=mask, **kwargs))  # [B, T + new]
            results = []
            for i, text in enumerate(batch):
                new = [int(t) for t in out[i, n:]]
                if tok.eos_token_id in new:
                    new = new[:new.index(tok.eos_token_id)]
                results.append({"generated_text": text + tok.decode(new, skip_special_tokens=True)})
            return results

        return self._run(inputs, "generate", run_batch, _checked_text, group=False)  # sampling: batches in order


# ---------------------------------------------------------------------------------------------
# Functions and the factory
# ---------------------------------------------------------------------------------------------

_CLASSES = {
    "fill-mask": FillMask, "classify": TextClassification, "text-classification": TextClassification,
    "sentiment-analysis": TextClassification, "tag": TokenClassification,
    "token-classification": TokenClassification, "ner": TokenClassification, "qa": QuestionAnswering,
    "question-answering": QuestionAnswering, "choose": MultipleChoice, "multiple-choice": MultipleChoice,
    "embed": Embedding, "feature-extraction": Embedding, "generate": TextGeneration,
    "text-generation": TextGeneration,
}
_LOAD_ARGS = ("tokenizer", "dtype", "revision", "cache_dir", "token", "batch_size", "truncate", "progress", "backend")


def pipeline(task: str, model, **kwargs) -> Pipeline:
    """The pipeline object for ``task`` (refimpl's command names or transformers' task names)."""
    if task not in _CLASSES:
        raise PipelineError(f"unknown task {task!r}; one of {', '.join(sorted(_CLASSES))}")
    return _CLASSES[task](model, **kwargs)


def _split(kwargs: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in kwargs.items() if k in _LOAD_ARGS},
            {k: v for k, v in kwargs.items() if k not in _LOAD_ARGS})


def fill_mask(model, texts, top_k: int = 5, **kwargs):
    """``FillMask(model, **load_args)(texts, top_k=top_k, targets=...)``."""
    load_args, call_args = _split(kwargs)
    return FillMask(model, **load_args)(texts, top_k=top_k, **call_args)


def classify(model, texts, text_pairs=None, top_k: int | None = 1, **kwargs):
    """``TextClassification(model, **load_args)(texts, text_pairs, top_k, function_to_apply=...)``."""
    load_args, call_args = _split(kwargs)
    return TextClassification(model, **load_args)(texts, text_pairs, top_k=top_k, **call_args)


def tag(model, texts, aggregation_strategy: str = "none", **kwargs):
    """``TokenClassification(model, **load_args)(texts, aggregation_strategy, ignore_labels=...)``."""
    load_args, call_args = _split(kwargs)
    return TokenClassification(model, **load_args)(texts, aggregation_strategy, **call_args)


def answer(model, question, context, **kwargs):
    """``QuestionAnswering(model, **load_args)(question, context, top_k=..., doc_stride=..., ...)``."""
    load_args, call_args = _split(kwargs)
    return QuestionAnswering(model, **load_args)(question, context, **call_args)


def choose(model, prompts, endings, **kwargs):
    """``MultipleChoice(model, **load_args)(prompts, endings)``."""
    load_args, _ = _split(kwargs)
    return MultipleChoice(model, **load_args)(prompts, endings)


def embed(model, texts, pooling: str = "cls", normalize: bool = False, **kwargs) -> np.ndarray:
    """``Embedding(model, **load_args)(texts, pooling, normalize)``."""
    load_args, _ = _split(kwargs)
    return Embedding(model, **load_args)(texts, pooling=pooling, normalize=normalize)


def generate(model, texts, **kwargs):
    """``TextGeneration(model, **load_args)(texts, max_new_tokens=..., do_sample=..., ...)``."""
    load_args, call_args = _split(kwargs)
    return TextGeneration(model, **load_args)(texts, **call_args)
