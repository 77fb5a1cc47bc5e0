"""``refimpl-convert SRC DST``: any supported checkpoint -> a folder transformers loads.

Exit status 0 with a one-line summary on stdout; 2 with a one-line error on stderr for every
problem with the input (a project error or an OSError); 130/143/129 when interrupted by SIGINT,
SIGTERM or SIGHUP (the export cleans up after each: see :mod:`refimpl_conversion.exporter`). An
unexpected internal error (a bug) shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from refimpl import __version__
from refimpl.io import Interrupted, interrupt_on_signals
from refimpl.params import TASKS, normalize_task

from .exporter import OUT_DTYPES, export, parse_size
from .keymap import ConversionError
from .loaders import FORMATS, load

PROG = "refimpl-convert"
PROGRESS_BYTES = 100 * 2**20  # show a progress bar for checkpoints above this size

EPILOG = f"""\
formats (--from):
  hf        folder with config.json + model.safetensors (or a sharded model.safetensors.index.json)
  bin       folder with config.json + pytorch_model.bin (or pytorch_model.bin.index.json)
  original  the original efficient_mlm layout: 'roberta.' prefix, unused attention.self.LayerNorm
  fairseq   fairseq pre-LN RoBERTa: a .pt file, or a folder with model.pt (+ dict.txt)
  auto      tell them apart from the files and tensor names (default)

tasks (--task): {', '.join(TASKS)}, or a transformers class name. Default: config.json's
architectures; for fairseq, the classification head if the checkpoint has one, else masked-lm.

--dtype float16/bfloat16 writes half-precision safetensors (round to nearest even; bfloat16 as
torch rounds it). refimpl itself computes in float32/float64. Default: the source's dtype.

examples:
  {PROG} tiny out/tiny                                   # the random checkpoint shipped with refimpl
  {PROG} andreasmadsen/efficient_mlm_m0.40 out/m040      # a Hub id (downloaded into the Hugging Face cache)
  {PROG} path/to/efficient_mlm path/to/out
  {PROG} checkpoints/model.pt out --from fairseq --head mnli --dtype float16
  {PROG} hf-folder out --max-shard-size 500MB --force
"""


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConversionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Convert a RoBERTa-PreLayerNorm checkpoint (Hugging Face safetensors or .bin, the original "
        "efficient_mlm layout, or fairseq pre-LN RoBERTa) into a folder that transformers' "
        "RobertaPreLayerNorm* classes load with no missing or unexpected keys.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="the checkpoint: a model folder, a fairseq .pt file, 'tiny' (the "
                   "random checkpoint shipped with refimpl) or a Hugging Face Hub id")
    p.add_argument("dst", metavar="DST", help="the folder to write (must not exist unless --force)")
    p.add_argument("--from", dest="fmt", choices=FORMATS, default="auto", help="the source format (default: auto)")
    p.add_argument("--dtype", choices=list(OUT_DTYPES), default=None, help="the dtype to write (default: the source's)")
    p.add_argument("--task", default=None, help="the head to export (default: from the source)")
    p.add_argument("--head", default=None, metavar="NAME", help="fairseq: the classification head to convert")
    p.add_argument("--max-shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="split the weights into shards above this size (default: 5GB)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if it is a folder written by refimpl-convert (or an empty folder)")
    p.add_argument("--revision", default=None, help="Hub revision of SRC (branch, tag or commit)")
    p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: huggingface_hub's)")
    p.add_argument("--version", action="version", version=f"{PROG} (refimpl {__version__})")
    return p


def _source(src: str, revision: str | None, cache_dir: str | None) -> str:
    """SRC as a path: an existing file or folder as it is, else a shipped name or a Hub id (downloaded into
    the Hugging Face cache, as ``refimpl --model`` does)."""
    if os.path.exists(src) or os.path.isabs(src) or src.startswith((".", "~")) or src.endswith((".pt", ".bin",
                                                                                                ".safetensors")):
        return src  # a path (a missing one is reported by the loader, which knows files from folders)
    from refimpl.hub import resolve

    return resolve(src, revision=revision, cache_dir=cache_dir)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with interrupt_on_signals():
            return _convert(args)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        written = getattr(e, "refimpl_written", None)
        what = f"after {written} was written" if written else "nothing was written"
        print(f"{PROG}: interrupted ({signal.Signals(signum).name}); {what}", file=sys.stderr)
        return 128 + int(signum)
    except (ValueError, OSError) as e:  # ConversionError, CheckpointError, ConfigError, ... are ValueErrors
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _convert(args) -> int:
    task = normalize_task(args.task) if args.task is not None else None
    compute = "float64" if args.dtype == "float64" else "auto" if args.dtype is None else "float32"
    src = _source(args.src, args.revision, args.cache_dir)
    loaded = load(src, args.fmt, task=task, head=args.head, dtype=compute)
    model = loaded.model
    dtype = args.dtype or loaded.source_dtype
    for note in loaded.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if model.task == "base" and model.params.pooler is None:
        print(f"{PROG}: note: the source has no pooler weights; transformers' base model will initialize "
              "pooler.dense randomly (last_hidden_state is unaffected)", file=sys.stderr)
    big = model.num_parameters() * 4 >= PROGRESS_BYTES
    summary = export(model, args.dst, dtype=dtype, max_shard_size=args.max_shard_size, force=args.force,
                     tokenizer_from=loaded.folder, progress=big, sources=(src, loaded.source))
    print(summary.line() + f" (from {loaded.format}: {loaded.source})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
