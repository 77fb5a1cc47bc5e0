"""Fine-tuning a sequence classifier without a framework: data, training loop, evaluation, checkpoints.

    import refimpl
    from refimpl.finetune import FinetuneConfig, read_examples, finetune

    train = read_examples("train.tsv")
    dev = read_examples("dev.tsv")
    for epoch in finetune("path/to/model", train, dev, "out/", FinetuneConfig(epochs=3)):
        print(epoch)

One step is: the loss and gradients of the batch from the written-out backward
(:func:`refimpl.grad`), global-norm clipping, the learning rate from the linear warm-up/decay
schedule, one AdamW step (:mod:`refimpl.optim`). Dropout is not part of the reference, so training
runs without it (transformers with dropout probabilities 0). After every epoch the dev accuracy is
measured and the model is written to ``out`` atomically (a complete folder beside it, then a
rename): an interrupted run leaves the last complete checkpoint in place. The checkpoint is a
transformers folder (``config.json`` with ``architectures`` and ``id2label``, ``model.safetensors``,
the tokenizer files) that ``RobertaPreLayerNormForSequenceClassification.from_pretrained`` and
:func:`refimpl.from_pretrained` load.

Data files are tab-separated, one example a line: ``text<TAB>label`` or
``text<TAB>pair<TAB>label``; blank lines are skipped. Seeds are fixed numbers and the shuffling is
``numpy.random.default_rng(seed)``: the same command gives the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np

from .backward import grad
from .io import TOKENIZER_FILES
from .io.atomic import signals_ignored, swap_in
from .loading import load_folder, params_from_state_dict, state_dict
from .model import Model
from .optim import AdamWState, adamw_step, clip_grad_norm, linear_schedule
from .params import ClassificationHead, Linear

TASK = "sequence-classification"
ARCHITECTURE = "RobertaPreLayerNormForSequenceClassification"
MAX_FILE_BYTES = 1 << 30  # a training file larger than 1 GiB is refused rather than read into memory


class FinetuneError(ValueError):
    """Bad training data or settings; the message names the file and line, or the option, and the fix."""


class Example(NamedTuple):
    text: str
    pair: str | None
    label: str
    line: int  # 1-based line number in its file


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5
    warmup_ratio: float = 0.1  # share of all optimiser steps spent warming up
    weight_decay: float = 0.01  # not on biases and LayerNorm parameters (refimpl.optim.decays)
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    seed: int = 0  # shuffling and a new head's initialisation
    max_length: int = 128  # tokens per example, special tokens included (longer ones are cut)
    dtype: str = "float32"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FinetuneError(f"{name} must be a positive integer; got {v!r}")
        for name in ("lr", "eps", "max_grad_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise FinetuneError(f"{name} must be a positive number; got {v!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise FinetuneError(f"warmup_ratio must lie in [0, 1]; got {self.warmup_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise FinetuneError(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        if self.dtype not in ("float32", "float64"):
            raise FinetuneError(f"dtype must be float32 or float64; got {self.dtype!r}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def read_examples(path: str | os.PathLike, labels: list[str] | None = None) -> list[Example]:
    """Examples from a TSV file: ``text<TAB>label`` or ``text<TAB>pair<TAB>label`` per line.

    Blank lines are skipped. A line without a tab, with more than three fields, with an empty text
    or label, or (when ``labels`` is given) a label outside ``labels`` raises :class:`FinetuneError`
    naming the file and line; so do a missing, empty, oversized or non-UTF-8 file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise FinetuneError(f"{path}: {size} bytes is more than the {MAX_FILE_BYTES} a data file may hold; split it")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line = text_line_of_byte(path, e.start)
        raise FinetuneError(f"{path}:{line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    known = None if labels is None else set(labels)
    examples = []
    for n, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        where = f"{path}:{n}"
        if len(fields) == 1:
            raise FinetuneError(f"{where}: no tab: each line is 'text<TAB>label' or 'text<TAB>pair<TAB>label'")
        if len(fields) > 3:
            raise FinetuneError(f"{where}: {len(fields)} tab-separated fields; expected 'text<TAB>label' or "
                                f"'text<TAB>pair<TAB>label' (a tab inside a text?)")
        label = fields[-1].strip()
        if not label:
            raise FinetuneError(f"{where}: the label (the last field) is empty")
        if not fields[0].strip():
            raise FinetuneError(f"{where}: the text (the first field) is empty")
        if known is not None and label not in known:
            raise FinetuneError(f"{where}: label {label!r} is not one of the labels {sorted(known)}")
        examples.append(Example(fields[0], fields[1] if len(fields) == 3 else None, label, n))
    if not examples:
        raise FinetuneError(f"{path}: no examples (the file is empty or blank)")
    if len({e.pair is None for e in examples}) > 1:
        first = next(e for e in examples if (e.pair is None) != (examples[0].pair is None))
        raise FinetuneError(f"{path}:{first.line}: mixes single texts and text pairs; use one form throughout")
    return examples


def text_line_of_byte(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def label_set(train: list[Example], labels: list[str] | None = None) -> list[str]:
    """The labels in order (their ids): ``labels`` as given, else the training labels sorted."""
    if labels is not None:
        return validate_labels(labels)
    found = sorted({e.label for e in train})
    if len(found) < 2:
        raise FinetuneError(f"the training data has {len(found)} distinct label(s) {found}; a classifier needs at least two")
    return found


def validate_labels(labels: list[str]) -> list[str]:
    if len(set(labels)) != len(labels) or len(labels) < 2 or not all(labels):
        raise FinetuneError(f"--labels must name at least two distinct, non-empty labels; got {labels}")
    return list(labels)


def check_labels(examples: list[Example], labels: list[str], path: str) -> None:
    known = set(labels)
    for e in examples:
        if e.label not in known:
            raise FinetuneError(f"{path}:{e.line}: label {e.label!r} is not one of the labels {labels} "
                                f"(the labels come from the training data or --labels)")


def encode(tokenizer, examples: list[Example], max_length: int) -> dict[str, np.ndarray]:
    """Token ids and mask for a batch, padded to its longest row and cut to ``max_length``."""
    texts = [e.text for e in examples]
    pairs = None if examples[0].pair is None else [e.pair for e in examples]
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length)
    return {"input_ids": np.asarray(enc["input_ids"]), "attention_mask": np.asarray(enc["attention_mask"])}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def classifier_model(model: Model, labels: list[str], seed: int) -> Model:
    """``model`` as a sequence classifier over ``labels`` (reference backend, no pooler).

    A sequence-classification checkpoint whose ``id2label`` names exactly these labels keeps its
    head; any other model gets a new head initialised as transformers initialises one
    (weights ~ N(0, initializer_range^2), biases 0) from ``seed``.
    """
    c = model.config
    same = model.task == TASK and [c.id2label[i] for i in range(c.num_labels)] == list(labels)
    config = c.replace(
        architectures=[ARCHITECTURE], id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
        num_labels=len(labels), problem_type="single_label_classification",
    )
    head = model.params.classifier if same else None
    if head is None:
        rng = np.random.default_rng(seed)
        dtype, h, k = model.dtype, c.hidden_size, len(labels)

        def normal(*shape):
            return (rng.standard_normal(shape) * c.initializer_range).astype(dtype)

        head = ClassificationHead(Linear(normal(h, h), np.zeros(h, dtype)), Linear(normal(k, h), np.zeros(k, dtype)))
    params = dataclasses.replace(model.params, pooler=None, lm_head=None, classifier=head, token_classifier=None,
                                 qa_outputs=None, choice_classifier=None)
    return Model(config, params, TASK).to("numpy")


def with_parameters(model: Model, named: dict[str, Any]) -> Model:
    """The same model with parameters ``{transformers name: array}`` (through the one key table)."""
    params = params_from_state_dict(model.config, model.task, named, np.dtype(model.dtype).name)
    return Model(model.config, params, model.task)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class StepResult(NamedTuple):
    model: Model
    state: AdamWState
    loss: float
    grad_norm: float
    lr: float


def train_step(model: Model, batch: dict, state: AdamWState, step: int, total_steps: int, cfg: FinetuneConfig) -> StepResult:
    """One optimiser step (``step`` counts from 0): gradients of the batch's loss, clipping, the
    scheduled learning rate, AdamW. -> the updated model and optimiser state."""
    loss, grads = grad(model, **batch)
    loss = float(loss)
    if not math.isfinite(loss):
        raise FinetuneError(f"training diverged: the loss is {loss} at step {step + 1}; lower the learning rate")
    grads, norm = clip_grad_norm(grads, cfg.max_grad_norm)
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    lr = cfg.lr * linear_schedule(step, warmup, total_steps)
    params = state_dict(model)
    params, state = adamw_step(params, grads, state, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    return StepResult(with_parameters(model, params), state, loss, float(norm), lr)


def predict(model: Model, tokenizer, examples: list[Example], batch_size: int, max_length: int) -> np.ndarray:
    """The predicted label id of every example. -> [len(examples)] int64."""
    out = []
    for i in range(0, len(examples), batch_size):
        logits = model(**encode(tokenizer, examples[i:i + batch_size], max_length)).logits  # [b, K]
        out.append(np.argmax(np.asarray(logits), axis=-1))
    return np.concatenate(out)


def accuracy(model: Model, tokenizer, examples: list[Example], batch_size: int, max_length: int) -> float:
    label2id = model.config.label2id
    want = np.array([label2id[e.label] for e in examples])
    return float(np.mean(predict(model, tokenizer, examples, batch_size, max_length) == want))


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float  # mean over the epoch's steps
    dev_accuracy: float
    dev_examples: int
    steps: int  # optimiser steps so far
    checkpoint: str

    def __str__(self) -> str:
        return (f"epoch {self.epoch}/{self.epochs}: train loss {self.train_loss:.4f}, dev accuracy "
                f"{self.dev_accuracy:.4f} ({self.dev_examples} examples), checkpoint {self.checkpoint}")


def finetune(model_dir: str | os.PathLike, train: list[Example], dev: list[Example], out: str | os.PathLike,
             cfg: FinetuneConfig = FinetuneConfig(), *, labels: list[str] | None = None,
             train_path: str = "train", dev_path: str = "dev", progress: bool = True) -> Iterator[EpochReport]:
    """Fine-tune the model in ``model_dir`` (a folder with config.json, weights and tokenizer files)
    on ``train``; after each epoch, evaluate on ``dev``, write the checkpoint to ``out`` and yield an
    :class:`EpochReport`. ``out`` must not exist or be empty: refimpl only replaces what it wrote."""
    from .tokenizer import Tokenizer

    cfg.validate()
    model_dir = os.fspath(model_dir)
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FinetuneError(f"--out {out} exists and is not an empty folder; choose a new folder")
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.json")):
        raise FinetuneError(f"{model_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    labels = label_set(train, labels)
    check_labels(train, labels, train_path)
    check_labels(dev, labels, dev_path)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    base = load_folder(model_dir, dtype=cfg.dtype)
    max_length = min(cfg.max_length, base.config.max_sequence_length)
    model = classifier_model(base, labels, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    state, step = AdamWState(), 0
    from tqdm import tqdm  # imported when a run starts: the CLI loads this module for its defaults

    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(len(train))
        losses = []
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", file=sys.stderr,
                   disable=not progress, leave=False)
        try:
            for i in range(0, len(train), cfg.batch_size):
                batch_examples = [train[j] for j in order[i:i + cfg.batch_size]]
                batch = encode(tokenizer, batch_examples, max_length)
                batch["labels"] = np.array([model.config.label2id[e.label] for e in batch_examples])
                r = train_step(model, batch, state, step, total, cfg)
                model, state, step = r.model, r.state, step + 1
                losses.append(r.loss)
                bar.set_postfix(loss=f"{r.loss:.4f}", lr=f"{r.lr:.2e}")
                bar.update(1)
        finally:
            bar.close()
        acc = accuracy(model, tokenizer, dev, cfg.batch_size, max_length)
        save_checkpoint(model, out, tokenizer_folder=model_dir)
        yield EpochReport(epoch, cfg.epochs, float(np.mean(losses)), acc, len(dev), step, out)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def write_safetensors(path: str, tensors: dict[str, Any]) -> None:
    """The checkpoint's weights file, by refimpl's one safetensors writer (metadata format "pt" as
    transformers writes it)."""
    from .io import write_safetensors as write

    write(path, tensors, {"format": "pt"})


def save_checkpoint(model: Model, out: str | os.PathLike, *, tokenizer_folder: str | None = None) -> None:
    """Write ``model`` as a transformers folder at ``out``, atomically.

    Everything goes into a new folder beside ``out`` first (config.json, model.safetensors, the
    tokenizer files of ``tokenizer_folder``); then a previous ``out`` is moved aside, the new folder
    renamed to ``out``, and the previous one removed. Interrupted before the renames, ``out`` is
    untouched and the new folder is removed; between them (a few microseconds), the previous
    checkpoint is put back.
    """
    out = os.path.abspath(os.fspath(out))
    parent, name = os.path.dirname(out), os.path.basename(out)
    tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            f.write(model.config.to_json_string())
        write_safetensors(os.path.join(tmp, "model.safetensors"), state_dict(model))
        if tokenizer_folder is not None:
            for fname in TOKENIZER_FILES:
                src = os.path.join(tokenizer_folder, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, fname))
        for fname in os.listdir(tmp):
            with open(os.path.join(tmp, fname), "rb") as f:
                os.fsync(f.fileno())
        if not os.path.exists(out) or not os.listdir(out):
            os.rename(tmp, out)  # (a rename replaces an empty folder)
            return
        with signals_ignored():
            swap_in(tmp, out)  # one step where the OS offers it; else two renames, the old one restored on failure
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
