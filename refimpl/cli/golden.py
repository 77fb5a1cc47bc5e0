"""``refimpl golden`` and ``refimpl compare``: the golden-output oracle from the shell.

The library side (writing, reading and comparing golden files) is :mod:`refimpl.golden`.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ..golden import HIDDEN_STATES_CONVENTIONS, INPUT_PREFIX, PROFILES, compare, write_golden
from ..io import has_tokenizer, read_safetensors
from . import common, corpus


def add_golden_commands(subparsers, add_model_options) -> None:
    p = subparsers.add_parser(
        "golden", help="write a golden file: inputs, every intermediate tensor, metadata",
        description="write a golden file: inputs, every intermediate tensor, metadata",
        epilog='example:\n  refimpl golden --model tiny --text "Hello world" --out golden.safetensors',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(p, "tiny", "float64")
    p.add_argument("--task", default=None, help="task (default: from config.json's architectures)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", action="append", help="input text (repeat for a batch, or for the choices of multiple-choice)")
    src.add_argument("--input-ids", metavar="FILE",
                     help="token ids: .npy, .safetensors (input_ids [+ attention_mask, token_type_ids]), or text "
                          "with one row per line (or ';'), ids separated by spaces or commas")
    p.add_argument("--text-pair", action="append", help="second segment for each --text (question answering)")
    p.add_argument("--out", required=True, help="the golden file to write (.safetensors); with --file, a folder")
    p.add_argument("--gradients", action="store_true",
                   help="also record the gradient of the loss with respect to every intermediate and parameter "
                        "(grad.* names, in backward order); the loss uses --labels or the default labels")
    p.add_argument("--labels", default=None, metavar="INTS",
                   help="labels for --gradients: rows separated by ';', integers by spaces. Per-token tasks: one row "
                        "per text (-100 = ignored); sequence classification: one per text; multiple choice: the right "
                        "choice; question answering: 'start end' per text. Default: the input ids (LM tasks), "
                        "0 per token / text / example, start = end = 0 (QA)")
    p.set_defaults(func=cmd_golden)
    corpus.add_golden_options(p, src)

    p = subparsers.add_parser(
        "compare", help="compare a candidate's tensors with a golden file; report the first divergence",
        description="compare a candidate's tensors with a golden file; report the first divergence. Exit status "
                    "0 when every tensor the candidate shares with the golden is within tolerance and it shares at "
                    "least one traced tensor (inputs do not count); 1 otherwise.",
        epilog="example:\n  refimpl compare golden.safetensors candidate.safetensors --dtype-profile float32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("golden", help="a golden file written by `refimpl golden`")
    p.add_argument("candidate", help="a safetensors file holding any subset of the golden's tensor names")
    p.add_argument("--dtype-profile", choices=list(PROFILES), default=None,
                   help="tolerances for a candidate computing in this dtype (default: the candidate's least precise float dtype)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (overrides the profile's)")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (overrides the profile's)")
    p.add_argument("--hidden-states", choices=list(HIDDEN_STATES_CONVENTIONS), default=None,
                   help="the convention of a candidate's hidden_states.i fields: 5.x (default; the last entry is "
                        "after the final LayerNorm, as refimpl) or 4.x (transformers 4.x: the last block's raw output)")
    p.add_argument("--strict", action="store_true",
                   help="the candidate must hold every golden tensor and no other name (default: any non-empty subset)")
    p.add_argument("--json", action="store_true", help="print the report as one line of JSON")
    p.add_argument("--quiet", action="store_true", help="print the summary only, not the per-tensor table")
    p.set_defaults(func=cmd_compare)


def cmd_golden(args) -> int:
    model = common.load_model(args.model, args.task, args.dtype, args.backend, **common.hub_args(args))
    folder = model.name_or_path or _model_folder(args.model)
    pad = model.config.pad_token_id
    tokenizer_output = None
    if args.text:
        inputs, tokenizer_output = _tokenize(folder, args.text, args.text_pair)
    else:
        if args.text_pair:
            raise ValueError("--text-pair goes with --text")
        inputs = read_input_ids(args.input_ids)
    ids = inputs["input_ids"]
    if "attention_mask" not in inputs:
        inputs["attention_mask"] = (ids != pad).astype(np.int64)
    if model.task == "multiple-choice" and ids.ndim == 2:  # the rows are the choices of one example
        inputs = {k: v[None] for k, v in inputs.items()}
    if args.labels is not None and not args.gradients:
        raise ValueError("--labels goes with --gradients")
    if args.gradients:
        inputs.update(golden_labels(model, inputs, args.labels))
    golden = write_golden(model, args.out, tokenizer_output=tokenizer_output, gradients=args.gradients, **inputs)
    print(f"wrote {args.out}: {len(golden.tensors)} tensors ({golden.dtype}, task {golden.task}), "
          f"inputs {', '.join(f'{k} {list(v.shape)}' for k, v in golden.inputs.items())}")
    return 0


def golden_labels(model, inputs: dict, text: str | None) -> dict:
    """The loss arguments for ``--gradients``: parsed from ``--labels`` or the documented defaults."""
    task, ids, mask = model.task, inputs["input_ids"], inputs["attention_mask"]
    if task == "base":
        raise ValueError("--gradients needs a loss: the base model has none; pass --task with a head")
    rows = None
    if text is not None:
        try:
            rows = [[int(x) for x in r.replace(",", " ").split()] for r in text.split(";") if r.strip()]
        except ValueError:
            raise ValueError(f"--labels must hold integers (rows separated by ';'); got {text!r}") from None
    if task in ("masked-lm", "causal-lm", "token-classification"):
        if rows is None:
            fill = ids if task != "token-classification" else np.zeros_like(ids)
            return {"labels": np.where(mask != 0, fill, -100)}
        labels = np.array(rows, dtype=np.int64) if len({len(r) for r in rows}) == 1 else None
        if labels is None or labels.shape != ids.shape:
            raise ValueError(f"--labels for {task} needs one row of {ids.shape[1]} per text ({ids.shape[0]} rows)")
        return {"labels": labels}
    if task == "question-answering":
        pos = np.zeros((ids.shape[0], 2), dtype=np.int64) if rows is None else np.array(rows, dtype=np.int64)
        if pos.shape != (ids.shape[0], 2):
            raise ValueError(f"--labels for question answering needs 'start end' for each of the {ids.shape[0]} texts")
        return {"start_positions": pos[:, 0], "end_positions": pos[:, 1]}
    n = ids.shape[0]
    flat = [0] * n if rows is None else [x for r in rows for x in r]
    if len(flat) != n:
        raise ValueError(f"--labels for {task} needs {n} label(s), one per {'example' if task == 'multiple-choice' else 'text'}")
    if task == "sequence-classification" and model.config.num_labels == 1:
        return {"labels": np.array(flat, dtype=np.float64)}  # one label: regression
    return {"labels": np.array(flat, dtype=np.int64)}


def _model_folder(name: str) -> str:
    """The local folder of ``--model``: a path, ``tiny``, or (when refimpl.hub is present) a Hub id."""
    folder = common.resolve_model_path(name)
    if os.path.isdir(folder):
        return folder
    try:
        from ..hub import resolve
    except ImportError:  # pragma: no cover - older layouts without Hub support
        return folder
    return os.fspath(resolve(name))


def _tokenize(folder: str, texts: list[str], pairs: list[str] | None):
    from ..tokenizer import Tokenizer

    if not has_tokenizer(folder):
        raise ValueError(f"--text needs tokenizer files (tokenizer.json, or vocab.json + merges.txt) in {folder!r}; "
                         f"pass token ids with --input-ids instead")
    if pairs is not None and len(pairs) != len(texts):
        raise ValueError(f"give one --text-pair per --text ({len(texts)} texts, {len(pairs)} pairs)")
    tok = Tokenizer.from_pretrained(folder)
    enc = tok(texts, pairs, padding=True)
    record = {
        "text": texts, "text_pair": pairs,
        "input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist(),
        "tokens": [tok.convert_ids_to_tokens(row) for row in enc["input_ids"].tolist()],
    }
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, record


def read_input_ids(path: str) -> dict[str, np.ndarray]:
    """Model inputs from a file: .npy (ids), .safetensors (``input_ids`` or ``inputs.input_ids`` and
    optionally the mask and token types), or text rows of integers."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input-ids: no such file {path!r}")
    if path.endswith(".npy"):
        out = {"input_ids": np.load(path, allow_pickle=False)}
    elif path.endswith(".safetensors"):
        raw, _, _ = read_safetensors(path)
        out = {}
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            for key in (name, INPUT_PREFIX + name):
                if key in raw:
                    out[name] = np.array(raw[key])
        if "input_ids" not in out:
            raise ValueError(f"--input-ids: {path} holds no 'input_ids' (or 'inputs.input_ids') tensor")
    else:
        text = common.read_text(path, "--input-ids")
        rows = [r.replace(",", " ").split() for r in text.replace(";", "\n").splitlines() if r.strip()]
        if not rows:
            raise ValueError(f"--input-ids: {path} holds no token ids")
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"--input-ids: every row of {path} must have the same length (pad with the pad id)")
        try:
            out = {"input_ids": np.array([[int(x) for x in r] for r in rows], dtype=np.int64)}
        except ValueError:
            raise ValueError(f"--input-ids: {path} must hold integers") from None
    for k, v in out.items():
        if v.dtype.kind not in "iub":
            raise ValueError(f"--input-ids: {k} must hold integers; got dtype {v.dtype}")
        out[k] = v.astype(np.int64)
    if out["input_ids"].ndim == 1:
        out = {k: v[None] for k, v in out.items()}
    return out


def cmd_compare(args) -> int:
    report = compare(args.golden, args.candidate, rtol=args.rtol, atol=args.atol,
                     profile=args.dtype_profile, strict=args.strict, hidden_states=args.hidden_states)
    if args.json:
        print(json.dumps(report.to_dict()))  # one line: JSON lines, as every --json
    else:
        print(report.format_text(verbose=not args.quiet))
    return 0 if report.passed else 1
