"""Corpus mode of the task commands: ``refimpl TASK --model M --file CORPUS --out DIR [--workers N |
--scheduler ADDRESS]`` writes an output folder instead of printing (:mod:`refimpl.corpus`).

Corpus mode is chosen when ``--workers`` or ``--scheduler`` is given, or when ``--out`` names a
folder: for ``embed`` reading ``--file CORPUS``, an existing folder or a path without the ``.npy``
suffix (``--out FILE.npy``, and any ``--out`` for texts from the arguments or stdin, still writes
one array); for the other tasks any ``--out``; for ``golden``, ``--file``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from . import common

_HELP = textwrap.fill("Corpus mode (writes a folder: Parquet records, .npy embeddings, manifest, errors.jsonl): --file CORPUS "
         "(text, .jsonl or .parquet) --out DIR, in one process or with --workers N / --scheduler ADDRESS (Dask: "
         "pip install '.[scale]' in a checkout). See docs/scale.md.", 78)


def add_options(p: argparse.ArgumentParser, task: str) -> None:
    """The corpus options of a task command, and the switch to corpus mode before its own function."""
    g = p.add_argument_group("corpus mode", _HELP)
    if task != "embed":  # embed already has --out (a .npy file, or a folder in corpus mode)
        g.add_argument("--out", default=None, metavar="DIR", help="write the results to this folder (corpus mode)")
    _common_options(g)
    plain = p.get_default("func")
    p.set_defaults(func=lambda args: run_command(args, task) if wanted(args, task) else plain(args))


def add_golden_options(p: argparse.ArgumentParser, sources) -> None:
    """``refimpl golden --file CORPUS --out DIR``: one golden file per batch of the corpus."""
    sources.add_argument("--file", default=None, help="corpus mode: a golden file per batch of this corpus "
                         "(text, .jsonl or .parquet); --out is then a folder")
    g = p.add_argument_group("corpus mode", _HELP)
    g.add_argument("--batch-size", type=int, default=8, help="inputs per golden file (default 8)")
    g.add_argument("--truncate", action="store_true", help="cut inputs longer than the model's limit instead of "
                   "listing them as unusable")
    _common_options(g)
    plain = p.get_default("func")
    p.set_defaults(func=lambda args: run_command(args, "golden") if wanted(args, "golden") else plain(args))


def _common_options(g) -> None:
    where = g.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run on a local Dask cluster of N worker processes")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run on the Dask cluster of this scheduler (e.g. tcp://host:8786)")
    g.add_argument("--partition-size", type=int, default=None, metavar="N",
                   help="inputs per partition, a multiple of --batch-size (default: 1024 rounded up to one)")
    g.add_argument("--threads", type=int, default=1, metavar="N",
                   help="compute threads per process (default 1; 2 runs each batch as two halves on two threads). "
                        "Outputs are identical for the same --threads and --batch-size")
    g.add_argument("--strict", action="store_true", help="stop at the first unusable input instead of listing it")
    g.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                   help="input format (default: from the file name: .jsonl, .parquet, else text)")
    g.add_argument("--column", default="text", help="the text field of JSON lines / column of Parquet (default text)")


def wanted(args, task: str) -> bool:
    if getattr(args, "workers", None) is not None or getattr(args, "scheduler", None) is not None:
        return True
    if task == "golden":
        return getattr(args, "file", None) is not None
    out = getattr(args, "out", None)
    if out is None:
        return False
    if task == "embed":  # --out FILE writes one .npy array; with --file CORPUS a folder makes it a corpus run
        from_file = getattr(args, "file", None) not in (None, "-") and not getattr(args, "texts", None)
        return from_file and (os.path.isdir(out) or not out.endswith(".npy"))
    return True


def _options(args, task: str) -> dict:
    if task == "embed":
        return {"pooling": args.pooling, "normalize": args.normalize}
    if task == "classify":
        return {"top_k": args.top_k or None, "function_to_apply": args.function, "text_pair": args.pair}
    if task == "fill-mask":
        return {"top_k": args.top_k, "targets": args.targets}
    if task == "tag":
        return {"aggregation_strategy": args.aggregation,
                "ignore_labels": [x for x in args.ignore_labels.split(",") if x]}
    if task == "qa":
        if args.question is not None:
            raise common.CommandError("corpus mode reads the questions from --file; --question is for one question")
        context = args.context
        if args.context_file is not None:
            if context is not None:
                raise common.CommandError("give --context or --context-file, not both")
            context = common.read_text(args.context_file, "--context-file")
        return {"top_k": args.top_k, "doc_stride": args.doc_stride, "max_answer_len": args.max_answer_len,
                "max_seq_len": args.max_seq_len, "handle_impossible_answer": args.handle_impossible_answer,
                "context": context}
    if task == "golden":
        return {"model_task": args.task}
    return {}


def run_command(args, task: str) -> int:
    from .. import corpus

    if getattr(args, "texts", None):
        raise common.CommandError("corpus mode reads its inputs from --file CORPUS, not from arguments")
    if getattr(args, "file", None) in (None, "-"):
        raise common.CommandError("corpus mode needs --file CORPUS (a file every worker can read; not stdin)")
    if getattr(args, "out", None) is None:
        raise common.CommandError("corpus mode needs --out DIR (the output folder)")
    if task == "embed" and args.out.endswith(".npy") and not os.path.isdir(args.out):
        raise common.CommandError(f"--out {args.out!r} names a .npy file; corpus mode writes a folder: give a folder "
                                  f"name (without .npy)")
    job = corpus.make_job(
        task, common.resolve_model_path(args.model), args.file, args.out, format=args.format, column=args.column,
        options=_options(args, task), dtype=args.dtype, backend=getattr(args, "backend", "auto"),
        batch_size=args.batch_size, truncate=args.truncate,
        partition_size=args.partition_size, threads=args.threads, strict=args.strict, **common.hub_args(args))
    summary = corpus.run(job, workers=args.workers, scheduler=args.scheduler, progress=True)
    print(summary.line(task), file=sys.stderr)
    return 0
