"""``refimpl dump`` and ``refimpl-dump``: run another implementation on a golden file's inputs and
write a candidate file with golden names, for ``refimpl compare``.

One command under two names. ``refimpl-dump`` is this package's console script; ``refimpl dump``
is the same command added to refimpl's command line by :func:`add_command`, which refimpl finds
through the ``refimpl.commands`` entry point group (pyproject.toml), so refimpl itself never
imports this package. Errors are one line on stderr with exit status 2. The adapters are
:mod:`refimpl_adapters`; each imports its framework only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from refimpl import __version__
from refimpl.io import FLOAT_DTYPES

from . import ADAPTERS, AdapterError, dump

PROG = "refimpl-dump"
HELP = "run another implementation on a golden file's inputs; write a candidate with golden names"
EXAMPLE = "example: {prog} --impl transformers --model path/to/hf-folder golden.safetensors --out candidate.safetensors"


def _implementations() -> str:
    impls = "; ".join(f"{a.name}: {a.what} (pip install '.[{a.extra}]' in a checkout of refimpl)"
                      for a in ADAPTERS.values())
    return f"Implementations: {impls}."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments, the same under both names."""
    p.add_argument("golden", help="the golden file whose inputs to run (written by `refimpl golden`)")
    p.add_argument("--impl", required=True, choices=list(ADAPTERS), help="the implementation to run")
    p.add_argument("--model", required=True,
                   help="a transformers folder (config.json + weights), a Hub id (as for the other commands; "
                        "'tiny' for the shipped one), or for --impl onnx also a .onnx file")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")
    p.add_argument("--out", required=True, help="the candidate safetensors file to write")
    p.add_argument("--task", default=None, help="default: the golden's task")
    p.add_argument("--dtype", default="float32", choices=list(FLOAT_DTYPES), help="the dtype to run in (default float32)")
    p.add_argument("--outputs-only", action="store_true",
                   help="record only the model's outputs (logits, loss, hidden_states.i, attentions.i), no intermediates")
    p.add_argument("--onnx-exporter", default="dynamo", choices=["dynamo", "torchscript"],
                   help="--impl onnx with a folder: torch.onnx.export's exporter (default dynamo)")
    p.add_argument("--onnx-save", default=None, metavar="FILE",
                   help="--impl onnx with a folder: keep the exported graph in FILE")
    p.set_defaults(func=run)


def add_command(subparsers) -> None:
    """Add ``dump`` to refimpl's subcommands (the ``refimpl.commands`` entry point in pyproject.toml)."""
    p = subparsers.add_parser("dump", help=HELP, description=_implementations(),
                              epilog=EXAMPLE.format(prog="refimpl dump"))
    add_arguments(p)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``refimpl-dump`` parser (``refimpl dump``'s arguments, plus ``--version``)."""
    p = _Parser(prog=PROG, description=f"Run another implementation of RoBERTa-PreLayerNorm on a golden file's "
                f"inputs and write a candidate file with golden names, for `refimpl compare` (the same command as "
                f"`refimpl dump`). {_implementations()}", epilog=EXAMPLE.format(prog=PROG))
    add_arguments(p)
    p.add_argument("--version", action="version", version=f"{PROG} (refimpl {__version__})")
    return p


def run(args) -> int:
    """Run the adapter the arguments name and write the candidate; print what it wrote and what it left out."""
    from refimpl.hub import resolve

    if args.impl == "onnx" and args.model.endswith(".onnx"):
        model = args.model
        if not os.path.isfile(model):
            raise FileNotFoundError(f"--model: no such file {args.model!r}")
    else:  # a folder, a shipped name or a Hub id (downloaded, or from the cache when offline)
        model = resolve(args.model, revision=args.revision, cache_dir=args.cache_dir)
    options = {}
    if args.impl == "onnx":
        options = dict(exporter=args.onnx_exporter, save=args.onnx_save)
    elif args.onnx_save or args.onnx_exporter != "dynamo":
        raise AdapterError("--onnx-exporter and --onnx-save go with --impl onnx")
    result = dump(args.impl, model, args.golden, dtype=args.dtype, task=args.task, outputs_only=args.outputs_only,
                  **options)
    result.write(args.out)
    print(f"wrote {args.out}: {len(result.tensors)} tensors from {result.implementation}")
    for note in result.notes:
        print(f"note: {note}")
    if result.missing:
        print(f"not provided ({len(result.missing)} golden tensors):")
        for reason in dict.fromkeys(result.missing.values()):
            names = [n for n, r in result.missing.items() if r == reason]
            print(f"  {_abbreviate(names)}: {reason}")
    return 0


def _abbreviate(names: list[str]) -> str:
    """layers.0.attention.scores, layers.1.attention.scores -> layers.{0,1}.attention.scores"""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        parts = n.split(".")
        if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
            groups.setdefault(("layers", ".".join(parts[2:])), []).append(parts[1])
        else:
            groups.setdefault((n, ""), [])
    out = []
    for (head, tail), idx in groups.items():
        out.append(head if not tail else f"layers.{idx[0]}.{tail}" if len(idx) == 1 else f"layers.{{{','.join(idx)}}}.{tail}")
    return ", ".join(out)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, ImportError) as e:  # AdapterError, a missing file or model, ...
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
