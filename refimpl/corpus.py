"""Corpus runs: one task over every input of a file, written to an output folder, in one process or
on a Dask cluster (:mod:`refimpl.cluster`), with the same bytes either way.

    from refimpl import corpus
    job = corpus.make_job("embed", "tiny", "texts.txt", "out/", batch_size=8)
    corpus.run(job)                    # one process
    corpus.run(job, workers=4)         # a Dask LocalCluster of 4 worker processes
    index, vectors = corpus.read_embeddings("out/")

Tasks: the pipelines ``embed``, ``classify``, ``fill-mask``, ``tag``, ``qa``, ``choose`` and
``golden`` (golden files of the model's own task). Inputs: a text file (one input per line, fields
separated by tabs as on the command line), JSON lines (a JSON string, or an object with the fields
named below) or a Parquet file (the same fields as columns). The text field is ``column``
(default ``text``); the others are ``text_pair`` (classify, golden), ``question`` and ``context``
(qa), ``prompt`` and ``endings`` (choose, a list of strings).

The output folder::

    job.json                 what was asked: task, options, batch and partition size, threads,
                             the model's identity (a rerun must ask the same, or it is refused)
    records/part-000000.parquet   one row per usable input of the partition: index, result
    embeddings/part-000000.npy    embed: the vectors [rows, H], in the order of the records
    golden/part-000000-b000.safetensors   golden: one golden file per batch
    partitions/part-000000.json   a partition's commit record: input range and sha256, output
                             files with sizes and sha256, unusable lines, worker, seconds
    errors.jsonl             every unusable input: {"index", "line", "error"}, by index
    manifest.json            at the end: the job, the model's identity, every partition's record

How the same bytes come out whatever the worker count or the order partitions finish in:

- The input is cut into partitions of ``partition_size`` inputs (a multiple of ``batch_size``).
  In a partition the usable inputs are taken in order, ``batch_size`` at a time, so every batch is
  composed the same way in every run; each pipeline call is one batch.
- Every process computes with the same threads (``threads``, default 1): BLAS (and OpenMP) are
  limited to it for the run, and with 2 or more the numba backend runs each batch as two halves
  on two threads; with 1 it runs the whole batch on one. A process runs one partition at a time
  when ``threads`` > 1 (the halves need the process's BLAS to themselves).
- Outputs are written atomically (a temporary file in the same folder, then a rename), the
  partition's commit record last. A rerun skips a partition whose record matches its input's
  sha256 and whose files are all there, and computes the rest; a partition computed twice (a
  worker that died after writing) writes the same bytes again.

Bit-for-bit equality holds between processes that run the same refimpl, NumPy and BLAS build on
the same kind of CPU (BLAS picks its kernels by CPU); the commit records name each worker's BLAS.

The model's identity is the sha256 of every file the model is read from (config.json, the
tokenizer files, the weights), computed once by the client (a rerun reuses it while a file's size
and mtime are unchanged) and recorded in job.json and the manifest. Workers check that the files
they read have the client's sizes and config.json its sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

__all__ = [
    "CorpusError", "Job", "Partition", "Summary", "TASKS", "FORMATS", "make_job", "plan", "run",
    "run_partition", "prepare_worker", "release_worker", "memory_report", "model_identity", "read_records",
    "read_embeddings", "read_errors",
]

FORMAT_NAME = "refimpl-corpus"
FORMAT_VERSION = 1
TASKS = ("embed", "classify", "fill-mask", "tag", "qa", "choose", "golden")
FORMATS = ("text", "jsonl", "parquet")
DEFAULT_PARTITION_SIZE = 1024  # inputs; rounded up to a multiple of the batch size
MAX_LINE_BYTES = 8 << 20  # a longer line is an unusable input, never read whole into memory
MAX_ENDINGS = 256  # choose: the endings of one prompt are one [1, C, T] forward pass
_PIPELINES = {"embed": "Embedding", "classify": "TextClassification", "fill-mask": "FillMask",
              "tag": "TokenClassification", "qa": "QuestionAnswering", "choose": "MultipleChoice"}
# The call arguments each task takes (the pipeline's __call__ keywords; golden: the model's task).
OPTIONS = {
    "embed": ("pooling", "normalize"),
    "classify": ("top_k", "function_to_apply", "text_pair"),
    "fill-mask": ("top_k", "targets"),
    "tag": ("aggregation_strategy", "ignore_labels"),
    "qa": ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "handle_impossible_answer", "context"),
    "choose": (),
    "golden": ("model_task", "text_pair"),
}
_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # the temporary files this module writes


class CorpusError(ValueError):
    """A bad corpus job (input, output folder, options, model on a worker); the message is one line."""


class _Unusable(Exception):
    """An input that cannot be run (its reason goes to the errors file)."""


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything a worker needs to run a partition (small and picklable).

    ``options``: the task's call arguments (see :data:`OPTIONS`). ``pairs``: whether the inputs of
    classify/golden are text pairs (decided by :func:`plan` from the first input unless given).
    """

    task: str
    model: str  # an absolute folder every worker can read
    source: str  # the input file, absolute
    out: str  # the output folder, absolute
    format: str = "text"
    column: str = "text"
    options: dict = field(default_factory=dict)
    dtype: str = "float32"
    backend: str = "auto"
    batch_size: int = 8
    truncate: bool = False
    partition_size: int = DEFAULT_PARTITION_SIZE
    threads: int = 1
    strict: bool = False
    pairs: bool | None = None
    model_check: dict = field(default_factory=dict)  # {file: bytes} and config.json's sha256, for workers

    def identity(self) -> dict:
        """What must be equal for two runs to write the same bytes (job.json; a rerun must match)."""
        from . import __version__

        return {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "refimpl_version": __version__,
            "task": self.task, "options": _jsonable(self.options), "input_format": self.format,
            "column": self.column, "dtype": self.dtype, "backend": self.backend, "batch_size": self.batch_size,
            "truncate": self.truncate,
            "partition_size": self.partition_size, "threads": self.threads, "pairs": self.pairs,
        }

    @property
    def key(self) -> str:
        """A short name of this job (plugin and task names on a cluster)."""
        blob = json.dumps([self.identity(), self.model, self.source, self.out], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Partition:
    """Inputs ``[start, stop)`` (0-based indices); for text and JSON lines also their byte range."""

    number: int
    start: int
    stop: int
    offset: int  # first byte (text/jsonl), or -1
    end: int  # one past the last byte (text/jsonl), or -1
    sha256: str  # of the input: the raw bytes of its lines, or (Parquet) its values

    @property
    def name(self) -> str:
        return f"part-{self.number:06d}"


@dataclass
class Summary:
    """What a :func:`run` did."""

    out: str
    partitions: int
    skipped: int  # finished by an earlier run (input hash matched)
    computed: int
    inputs: int
    results: int
    errors: int
    seconds: float
    where: str  # "one process", "LocalCluster of 2 workers", "scheduler tcp://..."

    def line(self, task: str) -> str:
        rate = (f", {self.inputs_run / self.seconds:.1f} inputs/s" if self.seconds > 0 and self.inputs_run else "")
        errs = f"; {self.errors} unusable (listed in {os.path.join(self.out, 'errors.jsonl')})" if self.errors else ""
        return (f"refimpl {task}: {_n(self.inputs, 'input')}, {_n(self.results, 'result')} in "
                f"{_n(self.partitions, 'partition')} ({self.computed} computed, {self.skipped} already done){errs}; "
                f"{self.seconds:.1f} s ({self.where}){rate}; wrote {self.out}")

    inputs_run: int = 0


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def make_job(task: str, model: str, source: str, out: str, *, format: str = "auto", column: str = "text",
             options: dict | None = None, dtype: str = "float32", backend: str = "auto", batch_size: int = 8,
             truncate: bool = False,
             partition_size: int | None = None, threads: int = 1, strict: bool = False, pairs: bool | None = None,
             revision=None, cache_dir=None) -> Job:
    """A :class:`Job`, checked: the model resolved to a local folder (``tiny``, a folder or a Hub id),
    paths made absolute, the format guessed from the file name when ``"auto"`` (``.jsonl``/``.ndjson``:
    JSON lines, ``.parquet``/``.pq``: Parquet, else text)."""
    if task not in TASKS:
        raise CorpusError(f"unknown corpus task {task!r}; one of {', '.join(TASKS)}")
    for name, v, low in (("batch_size", batch_size, 1), ("threads", threads, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise CorpusError(f"{name} must be a positive integer, got {v!r}")
    if partition_size is None:
        partition_size = -(-DEFAULT_PARTITION_SIZE // batch_size) * batch_size
    if isinstance(partition_size, bool) or not isinstance(partition_size, int) or partition_size < 1:
        raise CorpusError(f"partition_size must be a positive integer, got {partition_size!r}")
    if partition_size % batch_size:
        raise CorpusError(f"the partition size ({partition_size}) must be a multiple of the batch size ({batch_size}), "
                          f"so that every batch is composed the same way in every run")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS[task]))
    if unknown:
        raise CorpusError(f"{task} takes no option {', '.join(unknown)} (it takes: {', '.join(OPTIONS[task]) or 'none'})")
    if dtype not in ("float32", "float64"):
        raise CorpusError(f"dtype must be float32 or float64, got {dtype!r}")
    if not os.path.isfile(source):
        raise CorpusError(f"--file: no such file {source!r}" if not os.path.isdir(source)
                          else f"--file: {source!r} is a folder, not a file")
    if format == "auto":
        low = source.lower()
        format = ("jsonl" if low.endswith((".jsonl", ".ndjson", ".jsonl.txt")) else
                  "parquet" if low.endswith((".parquet", ".pq")) else "text")
    if format not in FORMATS:
        raise CorpusError(f"unknown input format {format!r}; one of {', '.join(FORMATS)}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CorpusError(f"--out {out!r} is a file; a corpus run writes a folder")
    folder = _model_folder(model, revision=revision, cache_dir=cache_dir)
    if task == "golden":
        from .config import Config
        from .params import normalize_task, task_from_architectures

        given = options.get("model_task")
        try:
            options["model_task"] = (normalize_task(given) if given is not None else
                                     task_from_architectures(Config.from_pretrained(folder).architectures))
        except ValueError as e:
            raise CorpusError(" ".join(str(e).split())) from None
    return Job(task=task, model=folder, source=os.path.abspath(source), out=os.path.abspath(out), format=format,
               column=column, options=options, dtype=dtype, backend=backend, batch_size=batch_size, truncate=bool(truncate),
               partition_size=partition_size, threads=threads, strict=bool(strict), pairs=pairs)


def _model_folder(model: str, revision=None, cache_dir=None) -> str:
    from .hub import resolve

    folder = os.fspath(resolve(model, revision=revision, cache_dir=cache_dir))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CorpusError(f"{folder!r} has no config.json: not a model folder")
    return os.path.abspath(folder)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# The model's identity
# ---------------------------------------------------------------------------------------------


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(folder: str) -> list[str]:
    """The files a model is read from: config.json, the tokenizer files present, the weight files."""
    from .io import tokenizer_files, weight_files

    names = ["config.json"] + tokenizer_files(folder)
    return [os.path.join(folder, n) for n in names] + list(weight_files(folder))


def model_identity(folder: str, known: dict | None = None) -> dict:
    """``{"files": {name: {"bytes", "mtime_ns", "sha256"}}}`` for every file of the model.

    ``known``: an earlier identity; a file whose size and mtime are unchanged keeps its sha256
    instead of being read again (hashing a base model's 500 MB takes ~1 s).
    """
    old = (known or {}).get("files", {})
    files = {}
    for path in model_files(folder):
        st = os.stat(path)
        name = os.path.relpath(path, folder)
        prev = old.get(name)
        if prev and prev.get("bytes") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns:
            digest = prev["sha256"]
        else:
            digest = _sha256_file(path)
        files[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return {"files": files}


def _same_model(a: dict, b: dict) -> list[str]:
    fa, fb = a.get("files", {}), b.get("files", {})
    return sorted(n for n in set(fa) | set(fb) if (fa.get(n) or {}).get("sha256") != (fb.get(n) or {}).get("sha256"))


# ---------------------------------------------------------------------------------------------
# Reading the input
# ---------------------------------------------------------------------------------------------


def _raw_lines(f, end: int | None) -> Iterator[tuple[bytes | None, int, bytes]]:
    """(line without its line end, or None when longer than MAX_LINE_BYTES; its length in bytes;
    every byte read for it) from the current position up to byte ``end`` (None: the end).

    A line over the limit is read in pieces and never held whole."""
    pos = f.tell()
    while end is None or pos < end:
        piece = f.readline(MAX_LINE_BYTES + 2)
        if not piece:
            return
        n, chunks, too_long = len(piece), [piece], False
        while not piece.endswith(b"\n"):
            if n > MAX_LINE_BYTES + 2:
                too_long = True
                chunks = [b""]
            piece = f.readline(1 << 20)
            if not piece:
                break
            n += len(piece)
            if not too_long:
                chunks.append(piece)
        pos += n
        raw = b"".join(chunks)
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if too_long or len(line) > MAX_LINE_BYTES:
            yield None, n, raw
        else:
            yield line, n, raw


def _decode(line: bytes, number: int) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Unusable(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} of the line)") from None
    if number == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark
    return text


def _parquet_columns(job: Job) -> list[str]:
    if job.task in ("embed", "fill-mask", "tag"):
        return [job.column]
    if job.task in ("classify", "golden"):
        return [job.column, "text_pair"]
    if job.task == "qa":
        return ["question", "context"]
    return ["prompt", "endings"]


def plan(job: Job) -> tuple[Job, list[Partition]]:
    """Cut the input into partitions (one pass over the file: byte ranges and sha256 of each) and
    decide ``pairs`` for classify/golden from the first input. -> (the job, its partitions)."""
    if job.format == "parquet":
        return _plan_parquet(job)
    parts: list[Partition] = []
    first_fields = None
    with open(job.source, "rb") as f:
        index, offset = 0, 0
        start, start_offset, h = 0, 0, hashlib.sha256()
        for line, n, raw in _raw_lines(f, None):
            h.update(raw)
            if first_fields is None and line is not None and line.strip():
                first_fields = line
            index += 1
            offset += n
            if index - start == job.partition_size:
                parts.append(Partition(len(parts), start, index, start_offset, offset, h.hexdigest()))
                start, start_offset, h = index, offset, hashlib.sha256()
        if index > start:
            parts.append(Partition(len(parts), start, index, start_offset, offset, h.hexdigest()))
    if not parts:
        raise CorpusError(f"no input: {job.source} is empty")
    if job.pairs is None and job.task in ("classify", "golden"):
        pairs = False
        if "text_pair" in job.options and job.options["text_pair"] is not None:
            pairs = True
        elif first_fields is not None:
            if job.format == "text":
                pairs = b"\t" in first_fields
            else:
                try:
                    obj = json.loads(first_fields)
                    pairs = isinstance(obj, dict) and obj.get("text_pair") is not None
                except ValueError:
                    pairs = False
        job = dataclasses.replace(job, pairs=pairs)
    return job, parts


def _parquet_file(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow: pip install '.[scale]' in a checkout") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError subclasses
        raise CorpusError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())})") from None


def _hash_rows(h, columns: dict) -> None:
    """Add each row's values (JSON, one line per row) to ``h``: a stable hash of Parquet values."""
    names = list(columns)
    for values in zip(*(columns[n] for n in names)):
        h.update(json.dumps(values, ensure_ascii=False).encode("utf-8") + b"\n")


def _plan_parquet(job: Job) -> tuple[Job, list[Partition]]:
    pf = _parquet_file(job.source)
    have = set(pf.schema_arrow.names)
    wanted = _parquet_columns(job)
    cols = [c for c in wanted if c in have]
    if wanted[0] not in have:
        raise CorpusError(f"{job.source} has no column {wanted[0]!r} (it has: {', '.join(sorted(have))}); "
                          f"name the text column with --column")
    if job.task in ("qa", "choose") and len(cols) < 2 and not (job.task == "qa" and job.options.get("context")):
        raise CorpusError(f"{job.source} needs the columns {' and '.join(map(repr, wanted))} for {job.task}")
    parts: list[Partition] = []
    start, index, h = 0, 0, hashlib.sha256()
    first_pair = None
    for batch in pf.iter_batches(batch_size=min(job.partition_size, 65536), columns=cols):
        columns = {c: batch.column(c).to_pylist() for c in cols}
        n = batch.num_rows
        if first_pair is None and "text_pair" in columns and n:
            first_pair = columns["text_pair"][0] is not None
        done = 0
        while done < n:
            take = min(n - done, job.partition_size - (index - start))
            _hash_rows(h, {c: v[done:done + take] for c, v in columns.items()})
            done += take
            index += take
            if index - start == job.partition_size:
                parts.append(Partition(len(parts), start, index, -1, -1, h.hexdigest()))
                start, h = index, hashlib.sha256()
    if index > start:
        parts.append(Partition(len(parts), start, index, -1, -1, h.hexdigest()))
    if not parts:
        raise CorpusError(f"no input: {job.source} has no rows")
    if job.pairs is None and job.task in ("classify", "golden"):
        job = dataclasses.replace(job, pairs=bool(job.options.get("text_pair") is not None or first_pair))
    return job, parts


_PARQUET_CACHE: dict = {}  # (path, mtime_ns, row group) -> columns: one row group kept per process
_PARQUET_LOCK = threading.Lock()


def _read_parquet_rows(job: Job, part: Partition) -> tuple[list[dict], str]:
    pf = _parquet_file(job.source)
    cols = [c for c in _parquet_columns(job) if c in set(pf.schema_arrow.names)]
    st = os.stat(job.source)
    rows: dict[str, list] = {c: [] for c in cols}
    first = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        a, b = max(part.start, first), min(part.stop, first + n)
        if a < b:
            key = (job.source, st.st_mtime_ns, g)
            with _PARQUET_LOCK:
                data = _PARQUET_CACHE.get(key)
                if data is None:
                    table = pf.read_row_group(g, columns=cols)
                    data = {c: table.column(c).to_pylist() for c in cols}
                    _PARQUET_CACHE.clear()  # a large row group is read once per process, not per partition
                    _PARQUET_CACHE[key] = data
            for c in cols:
                rows[c].extend(data[c][a - first:b - first])
        first += n
    h = hashlib.sha256()
    _hash_rows(h, rows)
    return [dict(zip(cols, values)) for values in zip(*(rows[c] for c in cols))], h.hexdigest()


def _read_inputs(job: Job, part: Partition) -> list[tuple[int, Any]]:
    """``[(index, item or _Unusable), ...]`` for the partition's inputs, after checking that the
    input still has the sha256 it was planned with."""
    out: list[tuple[int, Any]] = []
    if job.format == "parquet":
        rows, digest = _read_parquet_rows(job, part)
        for i, row in enumerate(rows):
            out.append((part.start + i, _catch(_parse_fields, job, row)))
    else:
        h = hashlib.sha256()
        with open(job.source, "rb") as f:
            f.seek(part.offset)
            for i, (line, n, raw) in enumerate(_raw_lines(f, part.end)):
                h.update(raw)
                index = part.start + i
                if line is None:
                    out.append((index, _Unusable(f"longer than {MAX_LINE_BYTES >> 20} MiB ({n} bytes)")))
                else:
                    out.append((index, _catch(_parse_line, job, line, index + 1)))
        digest = h.hexdigest()
    if digest != part.sha256 or len(out) != part.stop - part.start:
        raise CorpusError(f"{job.source} changed while the job ran (inputs {part.start + 1}-{part.stop} are not what "
                          f"was planned); run the job again")
    return out


def _catch(fn, *args):
    try:
        return fn(*args)
    except _Unusable as e:
        return e


def _need_text(value, name: str) -> str:
    if value is None:
        raise _Unusable(f"no {name!r}")
    if not isinstance(value, str):
        raise _Unusable(f"{name!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise _Unusable("empty line" if name == "text" else f"{name!r} is empty")
    return value


def _parse_line(job: Job, line: bytes, number: int):
    text = _decode(line, number)
    if not text.strip():
        raise _Unusable("empty line")
    if job.format == "jsonl":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise _Unusable(f"not valid JSON ({e})") from None
        except RecursionError:
            raise _Unusable("not valid JSON here (nested too deeply)") from None
        if isinstance(obj, str):
            obj = {job.column: obj}
        if not isinstance(obj, dict):
            raise _Unusable(f"a JSON {type(obj).__name__}; expected a string or an object with a {job.column!r} field")
        return _parse_fields(job, obj)
    task = job.task
    if task in ("embed", "fill-mask", "tag"):
        return text
    if task in ("classify", "golden"):
        if task == "golden" and job.options.get("model_task") == "multiple-choice":
            return _choice_item(text.split("\t"))
        if job.options.get("text_pair") is not None:
            return text, job.options["text_pair"]
        if "\t" in text:
            a, b = text.split("\t", 1)
            return _pair_item(job, _need_text(a, "text"), _need_text(b, "text_pair"))
        return _pair_item(job, text, None)
    if task == "qa":
        if "\t" in text:
            q, c = text.split("\t", 1)
        elif job.options.get("context") is not None:
            q, c = text, job.options["context"]
        else:
            raise _Unusable("no tab: expected 'question<TAB>context' (or give --context / --context-file)")
        return _need_text(q, "question"), _need_text(c, "context")
    return _choice_item(text.split("\t"))


def _pair_item(job: Job, text: str, pair: str | None):
    if job.pairs and pair is None:
        raise _Unusable("no text pair, but this corpus's first input has one: give every input a pair or none")
    if not job.pairs and pair is not None:
        raise _Unusable("a text pair, but this corpus's first input has none: give every input a pair or none")
    return text, pair


def _choice_item(fields: list):
    if len(fields) < 3:
        raise _Unusable(f"{max(len(fields) - 1, 0)} ending(s): give a prompt and at least two endings")
    if len(fields) - 1 > MAX_ENDINGS:
        raise _Unusable(f"{len(fields) - 1} endings, more than {MAX_ENDINGS} (they are scored in one forward pass)")
    prompt = _need_text(fields[0], "prompt")
    return prompt, [_need_text(e, f"ending {i + 1}") for i, e in enumerate(fields[1:])]


def _parse_fields(job: Job, obj: dict):
    task = job.task
    if task in ("embed", "fill-mask", "tag"):
        return _need_text(obj.get(job.column), job.column)
    if task in ("classify", "golden"):
        if task == "golden" and job.options.get("model_task") == "multiple-choice":
            endings = obj.get("endings")
            if not isinstance(endings, list):
                raise _Unusable("no 'endings' list")
            return _choice_item([obj.get("prompt")] + endings)
        text = _need_text(obj.get(job.column), job.column)
        pair = job.options.get("text_pair")
        if pair is None and obj.get("text_pair") is not None:
            pair = _need_text(obj.get("text_pair"), "text_pair")
        return _pair_item(job, text, pair)
    if task == "qa":
        context = obj.get("context")
        if context is None:
            context = job.options.get("context")
        return _need_text(obj.get("question"), "question"), _need_text(context, "context")
    endings = obj.get("endings")
    if not isinstance(endings, list):
        raise _Unusable("no 'endings' list" if endings is None else f"'endings' is a {type(endings).__name__}, not a list")
    return _choice_item([obj.get("prompt")] + endings)


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------


class _Threads:
    """Limit BLAS/OpenMP to ``n`` threads in this process (threadpoolctl when installed, else NumPy's
    OpenBLAS directly); ``restore()`` puts the previous limits back."""

    def __init__(self, n: int):
        self._restore: Callable[[], None] = lambda: None
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            from .blas import openblas_threads

            blas = openblas_threads()
            if blas is not None:
                get, set_ = blas
                before = get()
                set_(n)
                self._restore = lambda: set_(before)
            return
        limiter = threadpool_limits(limits=n)
        self._restore = limiter.restore_original_limits

    def restore(self) -> None:
        self._restore()


def blas_description() -> str:
    """``"openblas 0.3.31 Haswell, 1 thread"``-like: what computes this process's GEMMs."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    parts = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''}".strip()
             + f", {i.get('num_threads')} thread(s)" for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(parts) or "unknown"


# ---------------------------------------------------------------------------------------------
# The worker side: a runner per process (the model loaded once), one partition per call
# ---------------------------------------------------------------------------------------------


class _Runner:
    """The loaded pipeline (or model and tokenizer, for golden) of a job, in one process."""

    def __init__(self, job: Job):
        from . import pipelines

        self.job = job
        self.lock = threading.Lock() if job.threads > 1 else None
        if job.task == "golden":
            from . import from_pretrained
            from .tokenizer import Tokenizer, max_length_for

            self.model = from_pretrained(job.model, task=job.options.get("model_task"), dtype=job.dtype,
                                         backend=job.backend)
            self.tokenizer = Tokenizer.from_pretrained(job.model)
            c = self.model.config
            limit = max_length_for(c.max_position_embeddings, c.pad_token_id if c.pad_token_id is not None else -1)
            if self.tokenizer.model_max_length is not None:
                limit = min(limit, self.tokenizer.model_max_length)
            self.max_length = limit
            self.pipe = None
        else:
            cls = getattr(pipelines, _PIPELINES[job.task])
            self.pipe = cls(job.model, dtype=job.dtype, batch_size=job.batch_size, truncate=job.truncate, progress=False,
                            backend=job.backend, group_by_length=False)  # each call is one batch, in input order
            self.tokenizer, self.max_length = self.pipe.tokenizer, self.pipe.max_length
            self._warm(self.pipe.model)

    def _warm(self, model) -> None:
        """One forward on ``<s></s>``: the kernels are compiled (or loaded from Numba's cache) now,
        once per process, not inside the first partition."""
        tok = self.tokenizer
        ids = np.array([[tok.cls_token_id, tok.sep_token_id]], dtype=np.int64)  # [1, 2]
        if model.task == "multiple-choice":
            ids = np.stack([ids, ids], axis=1)  # [1, 2 choices, 2]
        model(input_ids=ids, attention_mask=np.ones_like(ids))

    # ---- checks that find unusable inputs before they are batched ----------------------------
    def unusable(self, items: list) -> list[str | None]:
        """Per item, why the pipeline would refuse it (None: usable). Tokenizes batch_size at a time."""
        task, tok, limit = self.job.task, self.tokenizer, self.max_length
        reasons: list[str | None] = [None] * len(items)
        if task == "qa":
            return reasons  # long contexts become windows; anything else is found by running it
        bs = self.job.batch_size
        if task == "choose" or (task == "golden" and self.job.options.get("model_task") == "multiple-choice"):
            for i, (prompt, ends) in enumerate(items):
                reasons[i] = self._length_reason(tok([prompt] * len(ends), ends, padding=True, max_length=2**31 - 1))
            return reasons
        for a in range(0, len(items), bs):
            chunk = items[a:a + bs]
            texts = [x if isinstance(x, str) else x[0] for x in chunk]
            pairs = [x[1] for x in chunk] if chunk and not isinstance(chunk[0], str) and chunk[0][1] is not None else None
            try:
                enc = tok(texts, pairs, padding=True, max_length=2**31 - 1)
            except ValueError:
                for j in range(len(chunk)):  # find the one the tokenizer refuses
                    try:
                        tok([texts[j]], None if pairs is None else [pairs[j]], padding=True, max_length=2**31 - 1)
                    except ValueError as e:
                        reasons[a + j] = " ".join(str(e).split())
                continue
            lengths = enc["attention_mask"].sum(axis=1)
            for j, n in enumerate(lengths):
                if n > limit and not self.job.truncate:
                    reasons[a + j] = (f"{int(n)} tokens long (special tokens included), more than the model's limit "
                                      f"of {limit}; shorten it or pass --truncate")
            if task == "fill-mask":
                if self.job.truncate and int(lengths.max()) > limit:
                    enc = tok(texts, pairs, padding=True, truncation=True, max_length=limit)
                for j, row in enumerate(enc["input_ids"]):
                    if reasons[a + j] is None and not np.any(row == tok.mask_token_id):
                        reasons[a + j] = (f"no {tok.mask_token}" + (" left after truncation" if self.job.truncate and
                                          lengths[j] > limit else "") + ": fill-mask needs at least one")
        return reasons

    def _length_reason(self, enc) -> str | None:
        n = int(enc["attention_mask"].sum(axis=1).max())
        if n > self.max_length and not self.job.truncate:
            return (f"{n} tokens long (special tokens included), more than the model's limit of {self.max_length}; "
                    f"shorten it or pass --truncate")
        return None

    # ---- one batch ---------------------------------------------------------------------------
    def call(self, items: list):
        """The pipeline on one batch -> one result per item (embed: an array [b, H])."""
        job, o = self.job, self.job.options
        t = job.task
        if t == "embed":
            return self.pipe(items, pooling=o.get("pooling", "cls"), normalize=bool(o.get("normalize", False)))
        if t == "classify":
            texts = [x[0] for x in items]
            pairs = [x[1] for x in items] if job.pairs else None
            return self.pipe(texts, pairs, top_k=o.get("top_k", 1), function_to_apply=o.get("function_to_apply"))
        if t == "fill-mask":
            out = self.pipe(items, top_k=o.get("top_k", 5), targets=o.get("targets"))
            return [r if r and isinstance(r[0], list) else [r] for r in out]  # one list per mask, always
        if t == "tag":
            return self.pipe(items, aggregation_strategy=o.get("aggregation_strategy", "none"),
                             ignore_labels=o.get("ignore_labels", ["O"]))
        if t == "qa":
            kw = {k: o[k] for k in ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "handle_impossible_answer")
                  if k in o}
            out = self.pipe([q for q, _ in items], [c for _, c in items], **kw)
            return [r if isinstance(r, list) else [r] for r in out]
        if t == "choose":
            return self.pipe([p for p, _ in items], [e for _, e in items])
        raise AssertionError(t)

    def golden_inputs(self, items: list) -> tuple[dict, dict]:
        """(model inputs, the tokenizer's output as golden metadata) of one golden batch."""
        tok, job = self.tokenizer, self.job
        cut = dict(truncation=True, max_length=self.max_length) if job.truncate else dict(max_length=2**31 - 1)
        if job.options.get("model_task") == "multiple-choice":
            (prompt, ends), = items
            enc = tok([prompt] * len(ends), ends, padding=True, **cut)
            inputs = {k: enc[k][None] for k in ("input_ids", "attention_mask")}  # [1, C, T]
            record = {"text": [prompt] * len(ends), "text_pair": ends}
        else:
            texts = [x[0] for x in items]
            pairs = [x[1] for x in items] if job.pairs else None
            enc = tok(texts, pairs, padding=True, **cut)
            inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}  # [B, T]
            record = {"text": texts, "text_pair": pairs}
        record.update({k: v.tolist() for k, v in inputs.items()})
        record["tokens"] = [tok.convert_ids_to_tokens(r) for r in enc["input_ids"].tolist()]
        return inputs, record

    def golden_batch(self, items: list, path: str | None) -> None:
        """Write the golden file of one batch to ``path`` (None: only run it, to find a bad input)."""
        from .golden import trace, write_golden

        inputs, record = self.golden_inputs(items)
        if path is None:
            trace(self.model, **inputs)
        else:
            write_golden(self.model, path, tokenizer_output=record, **inputs)


_RUNNERS: dict[str, _Runner] = {}  # job key -> runner: the model of a job is loaded once per process
_RUNNERS_LOCK = threading.Lock()


def _runner(job: Job) -> _Runner:
    with _RUNNERS_LOCK:
        r = _RUNNERS.get(job.key)
        if r is None:
            r = _RUNNERS[job.key] = _Runner(job)
        return r


def prepare_worker(job: Job, where: str) -> None:
    """Run once in each worker process (a Dask worker plugin's setup): limit the threads, check that
    this process reads the same model and input as the client and can write the output, and load
    the model. Raises :class:`CorpusError` naming ``where`` otherwise."""
    _Threads(job.threads)  # process-wide, for the life of the worker (refimpl's Numba kernels are serial)
    for path, what in ((job.model, "the model folder"), (job.out, "the output folder")):
        if not os.path.isdir(path):
            raise CorpusError(f"worker {where} cannot read {what} {path!r}: every worker must see the same path "
                              f"(a shared file system)")
    if not os.path.isfile(job.source):
        raise CorpusError(f"worker {where} cannot read the input {job.source!r}: every worker must see the same path "
                          f"(a shared file system)")
    for name, size in job.model_check.get("bytes", {}).items():
        path = os.path.join(job.model, name)
        if not os.path.isfile(path):
            raise CorpusError(f"worker {where} has no {name} in the model folder {job.model!r}: every worker must "
                              f"read the same model")
        if os.path.getsize(path) != size:
            raise CorpusError(f"worker {where}: {path} is {os.path.getsize(path)} bytes, not {size} as on the client: "
                              f"every worker must read the same model")
    config_sha = job.model_check.get("config_sha256")
    if config_sha and _sha256_file(os.path.join(job.model, "config.json")) != config_sha:
        raise CorpusError(f"worker {where}: {job.model}/config.json differs from the client's: every worker must read "
                          f"the same model")
    if not os.access(job.out, os.W_OK):
        raise CorpusError(f"worker {where} cannot write to the output folder {job.out!r}")
    import pyarrow.parquet  # noqa: F401 - imported now, not inside the first partition

    try:
        _runner(job)
    except (ValueError, OSError) as e:
        raise CorpusError(f"worker {where} cannot load the model {job.model!r}: {' '.join(str(e).split())}") from None


def memory_report(job: Job) -> dict:
    """How this process holds the weights of ``job``'s model (loaded by :func:`prepare_worker`).

    ``arrays``/``mapped_arrays``/``copied_bytes``: the parameter arrays, how many are views of a
    memory map of a weight file, and the bytes of the others (copies). From ``/proc/self/smaps``
    (Linux; absent elsewhere), in bytes: ``weights_file`` (the weight files' size), ``weights_rss``
    and ``weights_pss`` (their mapped pages resident, and this process's share of them: pages that
    several workers map are counted once across them), ``weights_anonymous`` (pages of those
    mappings copied into private memory: 0 when nothing wrote to them), and the process's own
    ``rss``, ``pss`` and ``anonymous``.
    """
    import mmap

    from .params import iter_leaves

    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(job.key)
    if runner is None:
        raise CorpusError("the job's model is not loaded in this process (prepare_worker first)")
    model = runner.model if runner.pipe is None else runner.pipe.model
    seen, arrays, mapped, copied = set(), 0, 0, 0
    for _, leaf in iter_leaves(model.params):
        if id(leaf) in seen or not isinstance(leaf, np.ndarray):
            continue
        seen.add(id(leaf))
        arrays += 1
        base, is_mapped = leaf, False
        while base is not None:
            if isinstance(base, (np.memmap, mmap.mmap)):
                is_mapped = True
                break
            base = getattr(base, "base", None)
        mapped += is_mapped
        copied += 0 if is_mapped else leaf.nbytes
    from .io import weight_files

    files = {os.path.realpath(p) for p in weight_files(job.model)}
    report = {"arrays": arrays, "mapped_arrays": mapped, "copied_bytes": copied,
              "weights_file": sum(os.path.getsize(p) for p in files)}
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            smaps = f.read().splitlines()
    except OSError:
        return report
    totals = {"weights_rss": 0, "weights_pss": 0, "weights_anonymous": 0, "rss": 0, "pss": 0, "anonymous": 0}
    current = False
    for line in smaps:
        head = line.split()
        if not head:
            continue
        if not head[0].endswith(":") or "-" in head[0]:  # a mapping's header: address perms offset dev inode path
            current = len(head) >= 6 and os.path.realpath(head[5]) in files
            continue
        key, value = head[0][:-1], int(head[1]) * 1024 if len(head) > 1 and head[1].isdigit() else 0
        for name, field_ in (("rss", "Rss"), ("pss", "Pss"), ("anonymous", "Anonymous")):
            if key == field_:
                totals[name] += value
                if current:
                    totals["weights_" + name] += value
    report.update(totals)
    return report


def release_worker(job: Job) -> None:
    """Forget a job's model (and a cached Parquet row group) in this process (a worker plugin's teardown)."""
    with _RUNNERS_LOCK:
        _RUNNERS.pop(job.key, None)
    with _PARQUET_LOCK:
        _PARQUET_CACHE.clear()


def run_partition(job: Job, part: Partition, where: str = "") -> dict:
    """Compute one partition, write its outputs and then its commit record. -> the record.

    Deterministic: the same job and partition give the same output bytes in any process.
    """
    t0 = time.perf_counter()
    runner = _runner(job)
    if runner.lock is not None:
        with runner.lock:
            return _run_partition(job, part, runner, where, t0)
    return _run_partition(job, part, runner, where, t0)


def _run_partition(job: Job, part: Partition, runner: _Runner, where: str, t0: float) -> dict:
    inputs = _read_inputs(job, part)
    errors: dict[int, str] = {i: str(x) for i, x in inputs if isinstance(x, _Unusable)}
    usable = [(i, x) for i, x in inputs if not isinstance(x, _Unusable)]
    for (i, _), reason in zip(usable, runner.unusable([x for _, x in usable])):
        if reason is not None:
            errors[i] = reason
    while True:  # run the usable inputs batch by batch; an input the pipeline still refuses joins the errors
        usable = [(i, x) for i, x in inputs if i not in errors]
        if job.strict and errors:
            first = min(errors)
            raise CorpusError(f"{_where(job, first)}: {errors[first]} (--strict stops at an unusable input; without "
                              f"it the input is listed in errors.jsonl and the job goes on)")
        try:
            results, files = _compute(job, part, runner, usable)
            break
        except _BatchError as e:
            if not e.found:  # no input is refused on its own: not an input's fault
                raise e.error from None
            errors.update(e.found)
    record = {
        "format": FORMAT_NAME, "partition": part.number, "name": part.name, "start": part.start, "stop": part.stop,
        "input_sha256": part.sha256, "rows": len(usable),
        "errors": [{"index": i, "line": i + 1 if job.format != "parquet" else None, "error": errors[i]} for i in sorted(errors)],
        "files": files, "worker": where or "client", "blas": blas_description(),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_atomic(os.path.join(job.out, "partitions", part.name + ".json"),
                  (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return record


class _BatchError(Exception):
    """A batch the pipeline refused (``error``); ``found``: {index: reason} for the inputs that the
    pipeline refuses on their own."""

    def __init__(self, found: dict, error: Exception):
        super().__init__(str(error))
        self.found, self.error = found, error


def _where(job: Job, index: int) -> str:
    name = os.path.basename(job.source)
    return f"{name} row {index}" if job.format == "parquet" else f"{name} line {index + 1}"


def _culprits(runner: _Runner, batch: list[tuple[int, Any]], error: Exception) -> dict:
    """Which inputs of a refused batch the pipeline refuses on their own (error.index when it says)."""
    idx = getattr(error, "index", None)
    if isinstance(idx, int) and 0 <= idx < len(batch):
        return {batch[idx][0]: getattr(error, "reason", None) or str(error)}
    from .pipelines import PipelineError

    found = {}
    for i, x in batch:
        try:
            if runner.pipe is None:
                runner.golden_batch([x], None)
            else:
                runner.call([x])
        except (PipelineError, ValueError) as e:
            found[i] = " ".join(str(e).split())
    return found


def _compute(job: Job, part: Partition, runner: _Runner, usable: list) -> tuple[Any, list]:
    from .pipelines import PipelineError

    bs = job.batch_size
    files: list[dict] = []
    if job.task == "golden":
        mc = job.options.get("model_task") == "multiple-choice"
        step = 1 if mc else bs
        rows = []
        for b, a in enumerate(range(0, len(usable), step)):
            batch = usable[a:a + step]
            rel = os.path.join("golden", f"{part.name}-b{b:03d}.safetensors")
            try:
                runner.golden_batch([x for _, x in batch], os.path.join(job.out, rel))
            except ValueError as e:
                raise _BatchError(_culprits(runner, batch, e), e) from None
            files.append(_file_entry(job.out, rel))
            rows += [{"index": i, "result": {"file": os.path.basename(rel), "row": r}} for r, (i, _) in enumerate(batch)]
        files.insert(0, _write_records(job, part, rows))
        return rows, files
    results, vectors = [], []
    for a in range(0, len(usable), bs):
        batch = usable[a:a + bs]
        try:
            out = runner.call([x for _, x in batch])
        except PipelineError as e:
            raise _BatchError(_culprits(runner, batch, e), e) from None
        if job.task == "embed":
            vectors.append(out)
            results += [{"index": i} for i, _ in batch]
        else:
            results += [{"index": i, "result": r} for (i, _), r in zip(batch, out)]
    if job.task == "embed":
        dim = runner.pipe.model.config.hidden_size
        arr = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.dtype(job.dtype))
        rel = os.path.join("embeddings", part.name + ".npy")
        _write_atomic(os.path.join(job.out, rel), _npy_bytes(arr))
        files.append(_file_entry(job.out, rel))
    files.insert(0, _write_records(job, part, results))
    return results, files


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Records (Parquet)
# ---------------------------------------------------------------------------------------------


def record_schema(job: Job):
    """The Parquet schema of a task's records: ``index`` (int64) and ``result`` (typed per task)."""
    import pyarrow as pa

    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    result = {
        "embed": None,
        "classify": pa.list_(pa.struct([("label", s), ("score", f64)])),
        "fill-mask": pa.list_(pa.list_(pa.struct([("score", f64), ("token", i64), ("token_str", s), ("sequence", s)]))),
        "qa": pa.list_(pa.struct([("score", f64), ("start", i64), ("end", i64), ("answer", s)])),
        "choose": pa.list_(pa.struct([("index", i64), ("ending", s), ("score", f64)])),
        "golden": pa.struct([("file", s), ("row", i64)]),
    }
    if job.task == "tag":
        if job.options.get("aggregation_strategy", "none") == "none":
            fields = [("entity", s), ("score", f64), ("index", i64), ("word", s), ("start", i64), ("end", i64)]
        else:
            fields = [("entity_group", s), ("score", f64), ("word", s), ("start", i64), ("end", i64)]
        result["tag"] = pa.list_(pa.struct(fields))
    kind = result[job.task]
    return pa.schema([("index", i64)] + ([("result", kind)] if kind is not None else []))


def _write_records(job: Job, part: Partition, rows: list[dict]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=record_schema(job))
    rel = os.path.join("records", part.name + ".parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _write_atomic(os.path.join(job.out, rel), sink.getvalue().to_pybytes())
    return _file_entry(job.out, rel)


def _file_entry(out: str, rel: str) -> dict:
    path = os.path.join(out, rel)
    return {"path": rel, "bytes": os.path.getsize(path), "sha256": _sha256_file(path)}


def _write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# The client side: the output folder, what is done, running the rest
# ---------------------------------------------------------------------------------------------

_SUBFOLDERS = ("records", "embeddings", "golden", "partitions")


def _open_out(job: Job) -> dict | None:
    """Create the output folder (or check that it holds this job's output). -> the job.json found."""
    out = job.out
    if os.path.isdir(out) and [f for f in os.listdir(out) if f != ".lock" and not _TEMP.match(f)]:
        path = os.path.join(out, "job.json")
        if not os.path.isfile(path):
            raise CorpusError(f"--out {out!r} is a folder that holds other files and no job.json: give a new or an "
                              f"empty folder")
        try:
            with open(path, encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError) as e:
            raise CorpusError(f"{path} cannot be read ({e}); give a new --out folder") from None
        if not isinstance(found, dict) or found.get("format") != FORMAT_NAME:
            raise CorpusError(f"{path} is not a refimpl corpus job file; give a new --out folder")
        return found
    os.makedirs(out, exist_ok=True)
    return None


def _check_same_job(job: Job, found: dict, identity: dict) -> None:
    was, now = found.get("job", {}), job.identity()
    differ = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if differ:
        what = ", ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in differ[:4])
        raise CorpusError(f"{job.out} holds the output of another job ({what}); rerun with the same options to "
                          f"finish it, or give a new --out folder")
    changed = _same_model(found.get("model", {}), identity)
    if changed:
        raise CorpusError(f"{job.out} was written with another model ({', '.join(changed)} differ); give a new --out "
                          f"folder")


def _finished(job: Job, part: Partition) -> dict | None:
    """The partition's commit record when it is finished for this input (and its files are there)."""
    path = os.path.join(job.out, "partitions", part.name + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("input_sha256") != part.sha256 or \
            (rec.get("start"), rec.get("stop")) != (part.start, part.stop):
        return None
    for entry in rec.get("files", []):
        p = os.path.join(job.out, entry.get("path", ""))
        if not os.path.isfile(p) or os.path.getsize(p) != entry.get("bytes"):
            return None
    return rec


def _remove_ours(job: Job, names: list[str]) -> None:
    """Remove output files of partitions that no longer exist (the input shrank) or will be redone."""
    for name in names:
        for sub, ext in (("partitions", ".json"), ("records", ".parquet"), ("embeddings", ".npy")):
            p = os.path.join(job.out, sub, name + ext)
            if os.path.isfile(p):
                os.unlink(p)
        gold = os.path.join(job.out, "golden")
        if os.path.isdir(gold):
            for f in os.listdir(gold):
                if re.fullmatch(re.escape(name) + r"-b\d+\.safetensors", f):
                    os.unlink(os.path.join(gold, f))


def _stale_names(job: Job, count: int) -> list[str]:
    names = set()
    for sub in _SUBFOLDERS:
        d = os.path.join(job.out, sub)
        if os.path.isdir(d):
            for f in os.listdir(d):
                m = re.match(r"(part-(\d{6,}))[.-]", f)
                if m and int(m.group(2)) >= count:
                    names.add(m.group(1))
    return sorted(names)


def _clean_temps(job: Job) -> None:
    for sub in ("",) + _SUBFOLDERS:
        d = os.path.join(job.out, sub)
        if os.path.isdir(d):
            for f in os.listdir(d):
                if _TEMP.match(f):
                    try:
                        os.unlink(os.path.join(d, f))
                    except FileNotFoundError:
                        pass


class _Lock:
    """An exclusive lock on the output folder for the run (two runs must not write one folder)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, ".lock")
        self.f = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except OSError:
            self.f.close()
            raise CorpusError(f"another run is writing to {out!r}; wait for it to finish") from None

    def release(self) -> None:
        self.f.close()


class _Progress:
    """Progress on stderr: a tqdm bar on a terminal, else a line at most every 10 s."""

    def __init__(self, task: str, total: int, show: bool | None):
        self.task, self.total, self.done, self.t0, self.last = task, total, 0, time.perf_counter(), 0.0
        self.tty = sys.stderr.isatty()
        self.show = self.tty if show is None else show
        self.bar = None
        if self.show and self.tty and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=task, unit="input", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show:
            now = time.perf_counter()
            if now - self.last >= 10 or self.done == self.total:
                self.last = now
                rate = self.done / max(now - self.t0, 1e-9)
                print(f"refimpl {self.task}: {self.done}/{self.total} inputs ({rate:.1f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(job: Job, *, workers: int | None = None, scheduler: str | None = None, client=None,
        progress: bool | None = None, timeout: float | None = None, log: Callable[[str], None] | None = None) -> Summary:
    """Run ``job``: skip the partitions an earlier run finished, compute the rest, write the manifest.

    One process unless ``workers`` (a Dask ``LocalCluster`` of that many worker processes),
    ``scheduler`` (the address of a running Dask scheduler) or ``client`` (a ``distributed.Client``)
    is given. ``log``: where status lines go (default: stderr when ``progress`` is not False).
    """
    if sum(x is not None for x in (workers, scheduler, client)) > 1:
        raise CorpusError("give one of workers, scheduler and client")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise CorpusError(f"workers must be a positive integer, got {workers!r}")
    if log is None:
        log = (lambda s: print(s, file=sys.stderr, flush=True)) if progress is not False else (lambda s: None)
    t0 = time.perf_counter()
    found = _open_out(job)
    lock = _Lock(job.out)
    try:
        identity = model_identity(job.model, found.get("model") if found else None)
        job, parts = plan(job)
        if found is not None:
            _check_same_job(job, found, identity)
        check = {"bytes": {n: f["bytes"] for n, f in identity["files"].items()},
                 "config_sha256": identity["files"]["config.json"]["sha256"]}
        job = dataclasses.replace(job, model_check=check)
        _write_atomic(os.path.join(job.out, "job.json"), _dumps({
            "format": FORMAT_NAME, "job": job.identity(), "model": identity, "model_path": job.model,
            "input": job.source}))
        for sub in ("records", "partitions") + (("embeddings",) if job.task == "embed" else ()) + \
                (("golden",) if job.task == "golden" else ()):
            os.makedirs(os.path.join(job.out, sub), exist_ok=True)
        _remove_ours(job, _stale_names(job, len(parts)))
        records: dict[int, dict] = {}
        todo = []
        for p in parts:
            rec = _finished(job, p)
            if rec is not None:
                records[p.number] = rec
            else:
                todo.append(p)
        _remove_ours(job, [p.name for p in todo])
        n_todo = sum(p.stop - p.start for p in todo)
        bar = _Progress(job.task, n_todo, progress)

        def done(rec: dict) -> None:
            records[rec["partition"]] = rec
            bar.update(rec["stop"] - rec["start"])

        try:
            if not todo:
                where = "nothing left to compute"
            elif workers is None and scheduler is None and client is None:
                where = "one process"
                log(f"refimpl {job.task}: {_n(len(parts), 'partition')} of up to {job.partition_size} inputs, "
                    f"{len(todo)} to compute in one process with {_n(job.threads, 'thread')}"
                    + (" (--workers N runs N processes)" if (os.cpu_count() or 1) > job.threads else ""))
                threads = _Threads(job.threads)
                try:
                    runner_ready = _runner(job)
                    del runner_ready
                    for p in todo:
                        done(run_partition(job, p))
                finally:
                    threads.restore()
                    release_worker(job)
            else:
                try:
                    from . import cluster
                except ImportError as e:
                    raise CorpusError(f"--workers and --scheduler need Dask: pip install '.[scale]' in a checkout "
                                      f"({' '.join(str(e).split())})") from None
                where = cluster.run_calls(
                    [(f"refimpl-{job.task}-{p.name}-{job.key}", p) for p in todo], run_partition, job,
                    setup=prepare_worker, teardown=release_worker, name=f"refimpl-{job.key}", threads=job.threads,
                    workers=workers, scheduler=scheduler, client=client, on_result=done, timeout=timeout, log=log)
        finally:
            bar.close()
        ordered = [records[p.number] for p in parts]
        errors = [e for r in ordered for e in r["errors"]]
        _write_atomic(os.path.join(job.out, "errors.jsonl"),
                      "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in errors).encode())
        total = parts[-1].stop
        _write_atomic(os.path.join(job.out, "manifest.json"), _dumps({
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "job": job.identity(), "model": identity,
            "model_path": job.model, "input": {"path": job.source, "inputs": total},
            "results": sum(r["rows"] for r in ordered), "errors": len(errors),
            "partitions": [{k: r[k] for k in ("name", "start", "stop", "input_sha256", "rows", "files", "worker", "blas",
                                              "seconds")} | {"errors": len(r["errors"])} for r in ordered],
        }))
        _clean_temps(job)
    finally:
        lock.release()
    return Summary(job.out, len(parts), len(parts) - len(todo), len(todo), total,
                   sum(r["rows"] for r in ordered), len(errors), time.perf_counter() - t0, where,
                   inputs_run=n_todo)


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------------------------------------
# Reading an output folder
# ---------------------------------------------------------------------------------------------


def _manifest(out: str) -> dict:
    path = os.path.join(out, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CorpusError(f"{out!r} has no manifest.json: not a finished corpus run (run the job again to finish it)") from None


def read_records(out: str):
    """The records of a finished run as one ``pyarrow.Table`` (index, result), in input order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    m = _manifest(out)
    tables = [pq.read_table(os.path.join(out, p["files"][0]["path"])) for p in m["partitions"]]
    return pa.concat_tables(tables)


def read_embeddings(out: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(index [N] int64, vectors [N, H])`` of a finished embed run, in input order (the vectors
    memory-mapped per partition when ``mmap`` and concatenated)."""
    m = _manifest(out)
    if m["job"]["task"] != "embed":
        raise CorpusError(f"{out!r} holds {m['job']['task']} output, not embeddings")
    index = read_records(out).column("index").to_numpy()
    arrays = [np.load(os.path.join(out, f["path"]), mmap_mode="r" if mmap else None, allow_pickle=False)
              for p in m["partitions"] for f in p["files"] if f["path"].endswith(".npy")]
    return index, np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)


def read_errors(out: str) -> list[dict]:
    """The unusable inputs of a finished run: ``[{"index", "line", "error"}, ...]`` by index."""
    with open(os.path.join(out, "errors.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
