#!/usr/bin/env python3
"""Dump a transformers RobertaPreLayerNorm forward pass as a refimpl *candidate* file.

A thin wrapper kept for old command lines: the adapter lives in ``refimpl_adapters.transformers_torch``
(the ``adapters/`` folder, installed with refimpl) and the command is ``refimpl dump --impl
transformers``, also installed as ``refimpl-dump`` (docs/judge.md):

    refimpl golden --model tiny --text "Hello world" --out golden.safetensors
    refimpl dump --impl transformers --model refimpl/data/tiny-random-mlm golden.safetensors --out candidate.safetensors
    refimpl compare golden.safetensors candidate.safetensors

This script takes the same options as before (``--model --golden --out [--task] [--dtype]``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's refimpl
from refimpl_adapters import float32_to_bf16_bits, write_candidate  # noqa: E402,F401  (re-exported)
from refimpl_adapters.transformers_torch import capture, load_transformers, torch_inputs  # noqa: E402,F401


def main(argv=None) -> int:
    import argparse

    from refimpl_adapters.cli import main as dump_main

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face folder (config.json + weights)")
    ap.add_argument("--golden", required=True, help="the golden file whose inputs to run")
    ap.add_argument("--out", required=True, help="the candidate safetensors file to write")
    ap.add_argument("--task", default=None, help="default: the golden's task")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    args = ap.parse_args(argv)
    argv = ["dump", "--impl", "transformers", "--model", args.model, args.golden, "--out", args.out, "--dtype", args.dtype]
    return dump_main(argv[1:] + (["--task", args.task] if args.task else []))


if __name__ == "__main__":
    sys.exit(main())
