"""What every ``refimpl`` subcommand shares: the model argument, reading inputs, printing results."""

from __future__ import annotations

import json
import sys

from ..hub import SHIPPED

DEFAULT_MODEL = "andreasmadsen/efficient_mlm_m0.40"


class CommandError(ValueError):
    """A bad command line (missing input, conflicting options); printed as one line."""


def resolve_model_path(name: str) -> str:
    """``tiny`` names the small random checkpoint shipped with refimpl; anything else is unchanged."""
    return SHIPPED.get(name, name)


def hub_args(args) -> dict:
    return dict(revision=getattr(args, "revision", None), cache_dir=getattr(args, "cache_dir", None))


def load_model(name: str, task: str | None, dtype: str, **hub):
    import refimpl

    return refimpl.from_pretrained(name, task=task, dtype=dtype, **hub)


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------


def read_lines(args) -> list[str]:
    """Texts from the positional arguments, ``--file`` (``-`` = stdin), or stdin when piped."""
    texts = list(getattr(args, "texts", None) or [])
    source = getattr(args, "file", None)
    if source is None and not texts and not sys.stdin.isatty():
        source = "-"
    if source is not None:
        if source == "-":
            data = sys.stdin.read()
        else:
            with open(source, encoding="utf-8") as f:
                data = f.read()
        texts += [line.rstrip("\r") for line in data.split("\n") if line.strip()]
    return texts


def need_input(texts: list, what: str = "texts") -> list:
    if not texts:
        raise CommandError(f"no input: give {what} as arguments, with --file FILE, or as lines on stdin")
    return texts


def emit(args, results: list, human) -> None:
    """JSON lines with --json, else ``human(index, result)`` for each result."""
    for i, r in enumerate(results):
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            human(i, r)


def pipeline(cls, args):
    return cls(args.model, dtype=args.dtype, batch_size=args.batch_size, truncate=args.truncate, **hub_args(args))
