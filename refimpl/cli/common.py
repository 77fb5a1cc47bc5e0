"""What every ``refimpl`` subcommand shares: the model argument, reading inputs, printing results.

Inputs are read lazily, one line at a time, and results are printed (and flushed) as each batch
finishes: a long job shows its first results after the first batch, and an interrupted one keeps
what it printed. Every input gets exactly one output: with ``--json`` one JSON object per input,
``{"index": i, "result": ...}``, in input order (``index`` counts from 0 over the arguments, then
the lines); a blank line gets ``{"index": i, "error": "empty line"}`` instead of a result.
"""

from __future__ import annotations

import collections
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from ..hub import SHIPPED

DEFAULT_MODEL = "andreasmadsen/efficient_mlm_m0.40"
EMPTY = "empty line"  # the error of a blank input line


class CommandError(ValueError):
    """A bad command line (missing input, conflicting options); printed as one line."""


def resolve_model_path(name: str) -> str:
    """``tiny`` (and the other shipped names) map to the random checkpoints shipped with refimpl."""
    return SHIPPED.get(name, name)


def hub_args(args) -> dict:
    return dict(revision=getattr(args, "revision", None), cache_dir=getattr(args, "cache_dir", None))


def load_model(name: str, task: str | None, dtype: str, backend: str = "auto", **hub):
    import refimpl

    return refimpl.from_pretrained(name, task=task, dtype=dtype, backend=backend, **hub)


def pipeline(cls, args):
    return cls(args.model, dtype=args.dtype, batch_size=args.batch_size, truncate=args.truncate,
               backend=args.backend, group_by_length=getattr(args, "group_by_length", True), **hub_args(args))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One input: its position (0-based, arguments first, then lines), its text (None when the line
    is blank) and where it came from, for messages ("argument 2", "texts.txt line 7")."""

    index: int
    text: str | None
    where: str

    def label(self) -> str:
        return f"input {self.index + 1} ({self.where})"


def _decode(raw: bytes, source: str, number: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CommandError(f"{source} line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                           f"{e.start + 1} of the line); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if number == 1 and text.startswith("\ufeff"):
        text = text[1:]  # a UTF-8 byte-order mark
    return text


def _lines_of(stream, source: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its end of line) from a binary or text stream, lazily."""
    for number, raw in enumerate(stream, 1):
        if isinstance(raw, bytes):
            raw = _decode(raw, source, number)
        elif number == 1 and raw.startswith("\ufeff"):
            raw = raw[1:]
        yield number, raw.rstrip("\n").rstrip("\r")


def read_text(path: str, what: str) -> str:
    """A whole (small) text file as UTF-8; a missing file or a non-UTF-8 line is one clear error."""
    try:
        with open(path, "rb") as f:
            return "".join(_decode(raw, f"{what} {path}", n) for n, raw in enumerate(f, 1))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such file {path!r}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what}: {path!r} is a folder, not a file") from None


def _check_argument(text: str, n: int) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv arrive as lone surrogates
        raise CommandError(f"argument {n} is not valid UTF-8 text") from None
    return text


def input_lines(args) -> Iterator[Line]:
    """The inputs, lazily: the positional texts, then the lines of ``--file`` (``-`` = stdin), or of
    stdin when it is piped and neither was given. A blank line is a :class:`Line` with text None."""
    texts = list(getattr(args, "texts", None) or [])
    for n, t in enumerate(texts, 1):
        yield Line(n - 1, _check_argument(t, n) if t.strip() else None, f"argument {n}")
    source = getattr(args, "file", None)
    if source is None and not texts and not sys.stdin.isatty():
        source = "-"
    if source is None:
        return
    first = len(texts)
    if source == "-":
        stream = getattr(sys.stdin, "buffer", sys.stdin)  # bytes, to report non-UTF-8 input ourselves
        for number, line in _lines_of(stream, "stdin"):
            yield Line(first + number - 1, line if line.strip() else None, f"stdin line {number}")
        return
    try:
        f = open(source, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"--file: no such file {source!r}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"--file: {source!r} is a folder, not a file") from None
    with f:
        for number, line in _lines_of(f, source):
            yield Line(first + number - 1, line if line.strip() else None, f"{source} line {number}")


def first_input(lines: Iterator[Line], what: str = "texts") -> Iterator[Line]:
    """``lines`` again, after checking (by reading up to the first non-blank line) that there is an
    input at all: "no input" is reported before a model is loaded."""
    seen = []
    for line in lines:
        seen.append(line)
        if line.text is not None:
            break
    if not seen or seen[-1].text is None:
        raise CommandError(f"no input: give {what} as arguments, with --file FILE, or as lines on stdin")
    return _chain(seen, lines)


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _write(text: str) -> None:
    """Print a line and flush it now (a reader of the pipe sees each batch as it finishes), keeping
    a progress bar on the same terminal intact."""
    if sys.stderr.isatty() and sys.stdout.isatty():
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stdout):
            print(text, flush=True)
    else:
        print(text, flush=True)


def record(index: int, result: Any = None, error: str | None = None) -> str:
    """The ``--json`` line of one input."""
    body = {"index": index, "error": error} if error is not None else {"index": index, "result": result}
    return json.dumps(body, ensure_ascii=False)


def run(args, lines: Iterable[Line], stream: Callable[[Iterator], Iterator], parse: Callable[[Line], Any],
        human: Callable[[Line, Any, Any], str], blank: str = "(empty line)") -> int:
    """Feed the inputs to ``stream`` (a pipeline's :meth:`stream`) and print each result as it comes.

    ``parse(line)`` turns a non-blank line into the pipeline's input; ``human(line, item, result)``
    is the text printed without ``--json``; ``blank`` is printed for a blank line. A pipeline error
    about one input is re-worded to name that input as the user counts it.
    """
    from ..pipelines import PipelineError

    queue: collections.deque = collections.deque()  # (line, item or None), read but not yet printed
    fed = [0]  # inputs handed to the pipeline so far
    done = 0  # inputs whose results are printed

    def feed() -> Iterator:
        for line in lines:
            if line.text is None:
                queue.append((line, None))
                continue
            item = parse(line)
            queue.append((line, item))
            fed[0] += 1
            yield item

    def flush_blanks() -> None:
        while queue and queue[0][1] is None:
            line, _ = queue.popleft()
            _write(record(line.index, error=EMPTY) if args.json else blank)

    try:
        for result in stream(feed()):
            flush_blanks()
            line, item = queue.popleft()
            _write(record(line.index, result) if args.json else human(line, item, result))
            done += 1
        flush_blanks()
    except PipelineError as e:
        if e.index is None:
            raise
        pending = [line for line, item in queue if item is not None]
        k = e.index - done  # the failing input among those read but not yet printed
        if not 0 <= k < len(pending):
            raise
        raise CommandError(f"{pending[k].label()} {e.reason}") from None
    return 0
