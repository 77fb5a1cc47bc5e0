"""The ``refimpl`` command line. Each subcommand is one function; errors print one line, exit 2.

    refimpl info    --model tiny
    refimpl forward --model tiny --ids "0 31414 232 2"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SHIPPED = {"tiny": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny-random-mlm")}


def resolve_model_path(name: str) -> str:
    """``tiny`` names the small random checkpoint shipped with refimpl; anything else is a path."""
    return SHIPPED.get(name, name)


def load_model(name: str, task: str | None, dtype: str):
    import refimpl

    return refimpl.from_pretrained(resolve_model_path(name), task=task, dtype=dtype)


def cmd_info(args) -> int:
    model = load_model(args.model, args.task, args.dtype)
    info = {
        "path": resolve_model_path(args.model),
        "task": model.task,
        "dtype": str(np.dtype(model.dtype)),
        "parameters": model.num_parameters(),
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(model)
        c = model.config
        print(f"  max sequence length {c.max_sequence_length}, hidden_act {c.hidden_act}, layer_norm_eps {c.layer_norm_eps}")
    return 0


def parse_ids(text: str) -> np.ndarray:
    """``"0 5 6 2; 0 7 2 1"`` -> [[0, 5, 6, 2], [0, 7, 2, 1]] (rows separated by ';')."""
    rows = [r.replace(",", " ").split() for r in text.split(";") if r.strip()]
    if not rows:
        raise ValueError("--ids is empty: give token ids such as \"0 31414 232 2\"")
    if len({len(r) for r in rows}) != 1:
        raise ValueError("every row of --ids must have the same length (pad with the pad id, 1)")
    try:
        return np.array([[int(x) for x in r] for r in rows], dtype=np.int64)
    except ValueError:
        raise ValueError(f"--ids must hold integers, got {text!r}") from None


def cmd_forward(args) -> int:
    model = load_model(args.model, args.task, args.dtype)
    ids = parse_ids(args.ids)
    mask = (ids != model.config.pad_token_id).astype(np.int64)
    out = model(input_ids=ids, attention_mask=mask)
    result = {k: np.asarray(v).tolist() for k, v in out.to_dict().items() if k != "hidden_states"}
    if args.json:
        print(json.dumps(result))
        return 0
    for name, value in out.to_dict().items():
        arr = np.asarray(value)
        print(f"{name}: shape {list(arr.shape)} dtype {arr.dtype}")
        if arr.ndim >= 2 and arr.shape[-1] > 8:
            top = np.argsort(-arr[..., -1, :] if arr.ndim == 3 else -arr, axis=-1)[..., :5]
            print(f"  top-5 ids at the last position: {top.tolist()}")
        else:
            print(f"  {np.array2string(arr, precision=5, threshold=20)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refimpl", description="RoBERTa-PreLayerNorm reference implementation")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="tiny", help="model folder, or 'tiny' for the shipped random checkpoint")
        p.add_argument("--task", default=None, help="task (default: from config.json's architectures)")
        p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("info", help="describe a model", epilog="example: refimpl info --model tiny")
    common(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "forward", help="run a forward pass on token ids",
        epilog='example: refimpl forward --model tiny --ids "0 31414 232 2; 0 20920 2 1"',
    )
    common(p)
    p.add_argument("--ids", required=True, help="token ids, rows separated by ';'")
    p.set_defaults(func=cmd_forward)
    from .golden import add_golden_commands  # refimpl golden, refimpl compare

    add_golden_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"refimpl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
