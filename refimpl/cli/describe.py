"""``refimpl info`` and ``refimpl forward``: look at a model and run it on token ids."""

from __future__ import annotations

import json
import os

import numpy as np

from . import common


def cmd_info(args) -> int:
    from ..hub import resolve, weight_files, weights_format
    from ..tokenizer import Tokenizer

    folder = resolve(args.model, **common.hub_args(args))
    model = common.load_model(folder, args.task, args.dtype, args.backend)
    files = weight_files(folder)
    stored = stored_dtypes(folder)
    tokenizer = None
    try:
        tok = Tokenizer.from_pretrained(folder)
        tokenizer = {
            "files": [f for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                  "special_tokens_map.json") if os.path.isfile(os.path.join(folder, f))],
            "vocab_size": tok.vocab_size, "size_with_added_tokens": len(tok),
            "model_max_length": tok.model_max_length,
            "special_tokens": {k: getattr(tok, f"{k}_token") for k in ("bos", "eos", "unk", "pad", "mask")},
        }
    except (OSError, ValueError) as e:
        tokenizer = {"error": " ".join(str(e).split())}
    info = {
        "model": args.model,
        "path": folder,
        "task": model.task,
        "dtype": str(np.dtype(model.dtype)),
        "stored_dtype": " + ".join(stored),
        "stored_parameters": stored,
        "backend": model.backend,
        "parameters": model.num_parameters(),
        "format": weights_format(folder),
        "weight_files": [os.path.basename(f) for f in files],
        "weight_bytes": sum(os.path.getsize(f) for f in files),
        "max_sequence_length": model.config.max_sequence_length,
        "tokenizer": tokenizer,
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, default=str))  # one line: JSON lines, as every --json
        return 0
    c = model.config
    print(model)
    print(f"  path {folder}")
    print(f"  weights {info['format']}: {', '.join(info['weight_files'])} ({info['weight_bytes'] / 1e6:.1f} MB), "
          f"stored as {info['stored_dtype']}, computed in {info['dtype']} ({model.backend} backend)")
    print(f"  max sequence length {c.max_sequence_length}, hidden_act {c.hidden_act}, layer_norm_eps {c.layer_norm_eps}")
    if "error" in tokenizer:
        print(f"  tokenizer: none ({tokenizer['error']})")
    else:
        print(f"  tokenizer: {', '.join(tokenizer['files'])}; vocab {tokenizer['vocab_size']} "
              f"({tokenizer['size_with_added_tokens']} with added tokens), model_max_length "
              f"{tokenizer['model_max_length']}, mask {tokenizer['special_tokens']['mask']!r}")
    if c.num_labels and model.task in ("sequence-classification", "token-classification"):
        print(f"  labels {c.id2label}")
    return 0


_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtypes(folder: str) -> dict[str, int]:
    """``{dtype: parameters}`` as the weight files store them (float16, bfloat16, float32, ...),
    whatever dtype the model computes in."""
    from ..hub import weight_files, weights_format
    from ..safetensors_io import read_hf_safetensors_folder
    from ..torch_pickle import load_state_dict

    counts: dict[str, int] = {}
    if (weights_format(folder) or "").startswith("safetensors"):
        tensors, dtypes = read_hf_safetensors_folder(folder)  # memory-mapped: only the headers are read
        for name, a in tensors.items():
            key = _ST_NAMES.get(dtypes[name], dtypes[name].lower())
            counts[key] = counts.get(key, 0) + int(a.size)
    else:
        for path in weight_files(folder):
            for a in load_state_dict(path, bfloat16="bits").values():  # bfloat16 stays as its uint16 bits
                key = (a.dtype.metadata or {}).get("torch_dtype") or str(a.dtype)
                counts[key] = counts.get(key, 0) + int(a.size)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


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
    model = common.load_model(common.resolve_model_path(args.model), args.task, args.dtype, args.backend,
                               **common.hub_args(args))
    ids = parse_ids(args.ids)
    mask = (ids != model.config.pad_token_id).astype(np.int64)  # [B, T]
    out = model(input_ids=ids, attention_mask=mask)
    result = {k: np.asarray(v).tolist() for k, v in out.to_dict().items()
              if k not in ("hidden_states", "past_key_values")}
    if args.json:
        print(json.dumps(result))
        return 0
    # The last non-padding position of each row (padding may be on either side).
    last = np.array([np.nonzero(m)[0][-1] if m.any() else ids.shape[1] - 1 for m in mask])  # [B]
    for name, value in out.to_dict().items():
        if name == "past_key_values":
            continue
        arr = np.asarray(value)
        print(f"{name}: shape {list(arr.shape)} dtype {arr.dtype}")
        if name == "logits" and arr.ndim == 3 and arr.shape[-1] > 8:  # [B, T, V]: a language-model head
            rows = arr[np.arange(arr.shape[0]), last]  # [B, V]
            top = np.argsort(-rows, axis=-1, kind="stable")[:, :5]
            print(f"  top-5 ids at the last non-padding position (per row: {last.tolist()}): {top.tolist()}")
        else:
            print(f"  {np.array2string(arr, precision=5, threshold=20)}")
    return 0
