"""fairseq RoBERTa checkpoints with pre-LayerNorm blocks -> a refimpl :class:`~refimpl.model.Model`.

Which fairseq models are RoBERTa-PreLayerNorm
---------------------------------------------
fairseq's ``roberta`` model with ``--encoder-normalize-before`` and an embedding LayerNorm
(``layernorm_embedding``, on by default) computes exactly what transformers' RobertaPreLayerNorm
computes: embeddings -> LayerNorm, then per layer ``x + attn(LN(x))`` and ``x + ffn(LN(x))``, then
a final LayerNorm. Refused, with a message saying why:

* post-LN checkpoints (``encoder_normalize_before`` false: standard RoBERTa, use transformers'
  RobertaModel), including old ``TransformerSentenceEncoder`` checkpoints, where
  ``encoder_normalize_before`` only meant the embedding LayerNorm and no final LayerNorm exists;
* pre-LN checkpoints without an embedding LayerNorm (fairseq's ``roberta_prenorm`` arch);
* sinusoidal or absent position embeddings, adaptive input, pruned layers, and activations or
  classification-head activations that transformers' heads do not compute.

The config
----------
From the checkpoint's model args (new-style ``cfg["model"]``, an ``argparse.Namespace`` or a dict;
or old-style ``args``) and the tensors: hidden size, layers, heads and FFN size; position rows
``max_positions + pad + 1`` (checked against ``embed_positions``); ``activation_fn`` ->
``hidden_act``; LayerNorm eps 1e-5 (fairseq's); ``type_vocab_size=1`` with a zero token-type
embedding (fairseq has none; adding zeros is exact); the vocabulary size from the embedding
matrix; pad/bos/eos from the fairseq dictionary (``<s>``=0, ``<pad>``=1, ``</s>``=2).

The keys
--------
:data:`FAIRSEQ_TABLE` names refimpl's tree paths in fairseq's terms; the converter maps paths to
Hugging Face keys through refimpl's one key table. Checkpoints written before fairseq renamed its
modules are upgraded first, as fairseq's own ``upgrade_state_dict_named`` does: ``decoder.`` ->
``encoder.``, ``emb_layer_norm`` -> ``layernorm_embedding``, and a fused ``in_proj_weight``/``bias``
split into q, k, v thirds.

The LM head keeps its tie: tied when ``encoder.lm_head.weight`` is the embedding's storage or
equal to it, untied (``tie_word_embeddings=false``) otherwise. ``classification_heads.{name}``
becomes the sequence-classification head: the only one, or the one named by ``head``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

import numpy as np

from refimpl.config import Config
from refimpl.io import FLOAT_DTYPES, dtype_name_of, parse_dtype, safetensors_name_of, short_repr, to_compute_dtype
from refimpl.loading import params_from_state_dict
from refimpl.model import Model
from refimpl.params import TASKS, normalize_task
from refimpl.torch_pickle import Namespace, OpaqueObject, load_torch_file

from .keymap import ConversionError, Loaded, apply_table, describe_keys, hf_state

SE = "encoder.sentence_encoder."
# fairseq key -> refimpl tree path (refimpl.params.hf_key_table names the same paths for transformers).
FAIRSEQ_TABLE: list[tuple[str, str]] = [
    (SE + "embed_tokens.weight", "embeddings.word"),
    (SE + "embed_positions.weight", "embeddings.position"),
    (SE + "layernorm_embedding.{wb}", "embeddings.layer_norm.{wb}"),
    (SE + "layers.{i}.self_attn_layer_norm.{wb}", "layers.{i}.attention.layer_norm.{wb}"),  # pre-attention LN
    (SE + "layers.{i}.self_attn.q_proj.{wb}", "layers.{i}.attention.query.{wb}"),
    (SE + "layers.{i}.self_attn.k_proj.{wb}", "layers.{i}.attention.key.{wb}"),
    (SE + "layers.{i}.self_attn.v_proj.{wb}", "layers.{i}.attention.value.{wb}"),
    (SE + "layers.{i}.self_attn.out_proj.{wb}", "layers.{i}.attention.output.{wb}"),
    (SE + "layers.{i}.final_layer_norm.{wb}", "layers.{i}.ffn_layer_norm.{wb}"),  # pre-FFN LN
    (SE + "layers.{i}.fc1.{wb}", "layers.{i}.intermediate.{wb}"),
    (SE + "layers.{i}.fc2.{wb}", "layers.{i}.output.{wb}"),
    (SE + "layer_norm.{wb}", "final_layer_norm.{wb}"),
    ("encoder.lm_head.dense.{wb}", "lm_head.dense.{wb}"),
    ("encoder.lm_head.layer_norm.{wb}", "lm_head.layer_norm.{wb}"),
    ("encoder.lm_head.weight", "lm_head.decoder_weight"),
    ("encoder.lm_head.bias", "lm_head.bias"),
    ("classification_heads.{head}.dense.{wb}", "classifier.dense.{wb}"),
    ("classification_heads.{head}.out_proj.{wb}", "classifier.out_proj.{wb}"),
]
# Known keys that carry no parameters.
FAIRSEQ_IGNORED = (SE + "version", "encoder.version", SE + "embed_positions._float_tensor")

# fairseq activation_fn -> transformers hidden_act (the same formula on both sides).
ACTIVATIONS = {
    "gelu": "gelu",  # exact erf form (torch.nn.functional.gelu)
    "gelu_accurate": "gelu_new",  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu_fast": "gelu_new",  # fairseq's deprecated alias of gelu_accurate
    "relu": "relu",
    "tanh": "tanh",
    "linear": "linear",
    "swish": "silu",
}
# fairseq's Dictionary puts these first: <s>=0, <pad>=1, </s>=2, <unk>=3.
BOS, PAD, EOS, N_SPECIALS = 0, 1, 2, 4
FAIRSEQ_TASKS = ("masked-lm", "base", "sequence-classification")
_LAYER_INDEX = re.compile(re.escape(SE) + r"layers\.(\d{1,7})\.")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def find_checkpoint(path: str) -> tuple[str, str | None]:
    """A ``.pt`` file or a folder holding one -> (checkpoint file, its ``dict.txt`` or None)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model.pt")):
            ckpt = os.path.join(path, "model.pt")
        else:
            pts = sorted(n for n in os.listdir(path) if n.endswith(".pt"))
            if len(pts) != 1:
                raise ConversionError(
                    f"{path!r} holds {'no' if not pts else len(pts)} .pt files and no model.pt: "
                    + ("pass the checkpoint file itself" if pts else "not a fairseq model folder")
                )
            ckpt = os.path.join(path, pts[0])
    elif os.path.isfile(path):
        ckpt = path
    else:
        raise FileNotFoundError(f"no such file or folder: {path!r}")
    d = os.path.join(os.path.dirname(ckpt), "dict.txt")
    return ckpt, d if os.path.isfile(d) else None


# ---------------------------------------------------------------------------------------------
# Model arguments: file content, read with their types checked
# ---------------------------------------------------------------------------------------------


def _arg_int(args: Mapping[str, Any], name: str, source: str, default: Any = None) -> Any:
    v = args.get(name, default)
    if v is None:
        return None
    if type(v) is float and v.is_integer() and abs(v) < 2**53:
        v = int(v)
    if type(v) is not int or abs(v) >= 2**62:
        raise ConversionError(f"{source}: the model argument {name}={short_repr(v)} is not an integer")
    return v


def _arg_float(args: Mapping[str, Any], name: str, source: str, default: float) -> float:
    v = args.get(name, default)
    if v is None:
        return default
    if type(v) not in (int, float) or not math.isfinite(float(v)):
        raise ConversionError(f"{source}: the model argument {name}={short_repr(v)} is not a number")
    return float(v)


def _arg_str(args: Mapping[str, Any], name: str, source: str, default: str | None) -> str | None:
    v = args.get(name)
    if v is None or v == "":
        return default
    if type(v) is not str:
        raise ConversionError(f"{source}: the model argument {name}={short_repr(v)} is not a string")
    return v


def model_args(ckpt: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The model's arguments as a dict: new-style ``cfg["model"]`` or old-style ``args``."""
    cfg = ckpt.get("cfg")
    args = None
    if isinstance(cfg, Mapping) and cfg.get("model") is not None:
        args = cfg["model"]
    elif ckpt.get("args") is not None:
        args = ckpt["args"]
    if args is None:
        raise ConversionError(f"{source}: no model arguments (neither cfg['model'] nor args): not a fairseq checkpoint")
    if isinstance(args, Namespace):
        return dict(vars(args))
    if isinstance(args, Mapping):
        if not all(isinstance(k, str) for k in args):
            raise ConversionError(f"{source}: the model arguments have keys that are not names")
        return dict(args)
    if isinstance(args, OpaqueObject):
        raise ConversionError(
            f"{source}: the model arguments are a {args.global_name} object, which is not read without "
            "running its code; re-save the checkpoint with cfg['model'] as a plain dict or Namespace"
        )
    raise ConversionError(f"{source}: the model arguments are a {type(args).__name__}, not a Namespace or dict")


def check_state_dict(state: Any, source: str) -> None:
    """The ``model`` entry must map tensor names to tensors (it is file content)."""
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise ConversionError(
                f"{source}: the 'model' state dict maps {short_repr(key)} to a {type(value).__name__}, not a tensor")


def upgrade_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Old fairseq names -> current ones, as fairseq's ``upgrade_state_dict_named`` does.

    Returns (the upgraded dict, one note per kind of change made).
    """
    out: dict[str, Any] = {}
    notes: set[str] = set()
    for key, value in state.items():
        new = key
        if new.startswith("decoder."):
            new, _ = "encoder." + new[len("decoder."):], notes.add("renamed decoder.* -> encoder.*")
        if ".emb_layer_norm." in new:
            new, _ = new.replace(".emb_layer_norm.", ".layernorm_embedding."), notes.add("renamed emb_layer_norm -> layernorm_embedding")
        for kind in ("weight", "bias"):
            suffix = f"self_attn.in_proj_{kind}"
            if new.endswith(suffix):
                dim = value.shape[0] // 3 if value.ndim else 0
                if not value.ndim or value.shape[0] != 3 * dim:
                    raise ConversionError(f"{key}: a fused q/k/v projection needs 3*H rows, got {value.shape[0]}")
                base = new[: -len(suffix)] + "self_attn."
                for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{base}{name}.{kind}"] = value[j * dim : (j + 1) * dim]
                notes.add("split fused in_proj q/k/v")
                break
        else:
            out[new] = value
    return out, sorted(notes)


def _read_dict(path: str) -> int:
    """The number of symbols a fairseq ``dict.txt`` adds after the 4 specials."""
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    n += 1
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text (byte {e.start}): not a fairseq dict.txt") from None
    return n


# ---------------------------------------------------------------------------------------------
# Checks and the config
# ---------------------------------------------------------------------------------------------


def _flag(args: Mapping[str, Any], name: str, default: bool, source: str) -> bool:
    v = args.get(name, default)
    if v is None:
        return default
    if type(v) is bool or (type(v) is int and v in (0, 1)):
        return bool(v)
    if type(v) is str and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise ConversionError(f"{source}: the model argument {name}={short_repr(v)} is not true or false")


def check_prenorm(args: Mapping[str, Any], state: Mapping[str, Any], source: str) -> None:
    """Refuse what RoBERTa-PreLayerNorm cannot represent, saying why."""
    arch = _arg_str(args, "arch", source, None) or _arg_str(args, "_name", source, "roberta")
    has = lambda k: SE + k in state  # noqa: E731
    if not any(k.startswith(SE) for k in state):
        raise ConversionError(f"{source}: no {SE}* tensors: not a fairseq RoBERTa checkpoint")
    if not _flag(args, "encoder_normalize_before", False, source):
        raise ConversionError(
            f"{source} is a post-LayerNorm RoBERTa (encoder_normalize_before is false, arch {arch}): "
            "RoBERTa-PreLayerNorm normalizes before each block; convert it to transformers' RobertaModel instead"
        )
    if not has("layer_norm.weight"):
        raise ConversionError(
            f"{source} sets encoder_normalize_before but has no final LayerNorm ({SE}layer_norm.*): "
            "in old fairseq (TransformerSentenceEncoder) that flag only added the embedding LayerNorm and the "
            "blocks stayed post-LayerNorm, which RoBERTa-PreLayerNorm cannot represent"
        )
    if not _flag(args, "layernorm_embedding", True, source) or not has("layernorm_embedding.weight"):
        raise ConversionError(
            f"{source} is a pre-LayerNorm RoBERTa without an embedding LayerNorm (layernorm_embedding is false"
            f"{', as in fairseq' + chr(39) + 's roberta_prenorm arch' if arch == 'roberta_prenorm' else ''}): "
            "RoBERTa-PreLayerNorm always normalizes the embeddings, so this model cannot be represented"
        )
    if _flag(args, "no_token_positional_embeddings", False, source) or not has("embed_positions.weight"):
        raise ConversionError(f"{source} has no learned position embeddings ({SE}embed_positions.weight); RoBERTa needs them")
    if not _flag(args, "encoder_learned_pos", True, source):
        raise ConversionError(f"{source} uses sinusoidal position embeddings; RoBERTa-PreLayerNorm learns them")
    if _flag(args, "adaptive_input", False, source):
        raise ConversionError(f"{source} uses adaptive input embeddings, which RoBERTa-PreLayerNorm does not have")
    if args.get("encoder_layers_to_keep") not in (None, "", [], ()):
        raise ConversionError(
            f"{source} prunes layers on load (encoder_layers_to_keep={short_repr(args['encoder_layers_to_keep'])}); "
            "load and re-save it with fairseq first"
        )
    if _flag(args, "spectral_norm_classification_head", False, source):
        raise ConversionError(f"{source} uses spectral normalization in its classification heads, which transformers' head does not")


def classification_heads(state: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(".")[1] for k in state if k.startswith("classification_heads.")})


def choose_task(state: Mapping[str, Any], task: str | None, head: str | None, source: str) -> tuple[str, str | None]:
    """-> (task, classification head name or None), with the rules in the module docstring."""
    heads = classification_heads(state)
    if task is not None:
        task = normalize_task(task)
        if task not in FAIRSEQ_TASKS:
            raise ConversionError(
                f"a fairseq RoBERTa checkpoint has weights for {', '.join(FAIRSEQ_TASKS)}, not {task!r}"
            )
    if head is not None:
        if task not in (None, "sequence-classification"):
            raise ConversionError(f"--head selects a classification head; it does not go with task {task!r}")
        task = "sequence-classification"
    elif task is None:
        task = "sequence-classification" if heads else "masked-lm" if "encoder.lm_head.bias" in state else "base"
    if task == "sequence-classification":
        if not heads:
            raise ConversionError(f"{source} has no classification_heads.*: there is no sequence-classification head to convert")
        if head is None:
            if len(heads) > 1:
                raise ConversionError(
                    f"{source} has {len(heads)} classification heads ({describe_keys(heads)}): choose one with --head NAME"
                    " (or --task masked-lm / base)"
                )
            head = heads[0]
        elif head not in heads:
            raise ConversionError(f"{source} has no classification head {short_repr(head)}; it has: {describe_keys(heads) or 'none'}")
    if task == "masked-lm" and "encoder.lm_head.bias" not in state:
        raise ConversionError(f"{source} has no LM head (encoder.lm_head.*); use --task base")
    return task, head


def fairseq_config(
    args: Mapping[str, Any], state: Mapping[str, Any], task: str, head: str | None, tied: bool,
    dict_path: str | None, source: str,
) -> Config:
    """The transformers config of a checked pre-LN fairseq RoBERTa (see the module docstring)."""
    def tensor(key: str, ndim: int) -> np.ndarray:
        if key not in state:
            raise ConversionError(f"{source}: the checkpoint lacks {key}")
        if state[key].ndim != ndim:
            raise ConversionError(f"{source}: {key} has shape {list(state[key].shape)}; expected {ndim} dimensions")
        return state[key]

    V, H = (int(d) for d in tensor(SE + "embed_tokens.weight", 2).shape)
    P = int(tensor(SE + "embed_positions.weight", 2).shape[0])
    indices = set()
    for k in state:
        if k.startswith(SE + "layers."):
            m = _LAYER_INDEX.match(k)
            if m is None:
                raise ConversionError(f"{source}: {short_repr(k)} is not a layer's tensor (layers.<index>.<name>)")
            indices.add(int(m.group(1)))
    layers = sorted(indices)
    L = len(layers)
    if layers != list(range(L)):
        raise ConversionError(f"{source}: layer indices {short_repr(layers)} are not 0..{L - 1}")
    I = int(tensor(SE + "layers.0.fc1.weight", 2).shape[0]) if L else 0  # noqa: E741

    def agree(name: str, value: int) -> None:
        given = _arg_int(args, name, source)
        if given is not None and given != value:
            raise ConversionError(f"{source}: {name}={given} in the model args, but the tensors say {value}")

    agree("encoder_embed_dim", H)
    agree("encoder_layers", L)
    agree("encoder_ffn_embed_dim", I)
    heads_n = _arg_int(args, "encoder_attention_heads", source)
    if heads_n is None:
        raise ConversionError(f"{source}: the model args lack encoder_attention_heads")
    pad = _arg_int(args, "pad", source)
    if pad is not None and pad != PAD:
        raise ConversionError(f"{source}: pad={pad} in the args; fairseq dictionaries put <pad> at {PAD}")
    max_positions = _arg_int(args, "max_positions", source)
    if max_positions is None:
        max_positions = _arg_int(args, "max_source_positions", source)
    if max_positions is not None and P != max_positions + PAD + 1:
        raise ConversionError(
            f"{source}: embed_positions has {P} rows; max_positions={max_positions} implies "
            f"{max_positions + PAD + 1} (max_positions + pad + 1)"
        )
    if dict_path is not None:
        n = _read_dict(dict_path)
        if N_SPECIALS + n > V:
            raise ConversionError(
                f"{dict_path} has {n} symbols (+{N_SPECIALS} specials) but the embedding has only {V} rows: "
                "the dictionary does not belong to this checkpoint"
            )
    act = _arg_str(args, "activation_fn", source, "gelu")
    if act not in ACTIVATIONS:
        raise ConversionError(f"{source}: activation_fn={short_repr(act)} has no transformers equivalent ({', '.join(ACTIVATIONS)} do)")
    if task == "masked-lm" and act != "gelu":
        raise ConversionError(
            f"{source}: fairseq's LM head uses activation_fn={short_repr(act)}, transformers' uses exact GELU; "
            "the MLM logits would differ (convert with --task base)"
        )
    kwargs: dict[str, Any] = {}
    if task == "sequence-classification":
        pact = _arg_str(args, "pooler_activation_fn", source, "tanh")
        if pact != "tanh":
            raise ConversionError(
                f"{source}: the classification head uses pooler_activation_fn={short_repr(pact)}; transformers' head uses tanh"
            )
        dense = tensor(f"classification_heads.{head}.dense.weight", 2)
        if int(dense.shape[0]) != H:
            raise ConversionError(
                f"{source}: classification head {short_repr(head)} has inner dim {dense.shape[0]}; transformers' head needs {H}"
            )
        n_labels = int(tensor(f"classification_heads.{head}.out_proj.weight", 2).shape[0])
        kwargs["num_labels"] = n_labels
        if args.get("pooler_dropout") is not None:
            kwargs["classifier_dropout"] = _arg_float(args, "pooler_dropout", source, 0.0)
    return Config.from_dict(
        dict(
            vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=int(heads_n), intermediate_size=I,
            hidden_act=ACTIVATIONS[act], max_position_embeddings=P, type_vocab_size=1, layer_norm_eps=1e-5,
            hidden_dropout_prob=_arg_float(args, "dropout", source, 0.1),
            attention_probs_dropout_prob=_arg_float(args, "attention_dropout", source, 0.1),
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=tied,
            architectures=[TASKS[task][0]], **kwargs,
        )
    )


def _same_tensor(a: np.ndarray, b: np.ndarray) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides:
        return True
    return bool(np.array_equal(a, b))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_fairseq(path: str, task: str | None = None, head: str | None = None, dtype: str = "float32") -> Loaded:
    """A fairseq pre-LN RoBERTa checkpoint (``.pt`` file, or a folder with ``model.pt`` + ``dict.txt``).

    task: None (the only classification head if there is one, else masked-lm), ``masked-lm``,
    ``base`` or ``sequence-classification``; head: the classification head to convert.
    dtype: the compute dtype of the returned model (``float32``, ``float64``, or ``auto``: float64
    for a float64 checkpoint, else float32).
    """
    ckpt_path, dict_path = find_checkpoint(path)
    ckpt = load_torch_file(ckpt_path, bfloat16="bits", unknown_globals="opaque")
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ConversionError(f"{ckpt_path}: no 'model' state dict: not a fairseq checkpoint")
    args = model_args(ckpt, ckpt_path)
    check_state_dict(ckpt["model"], ckpt_path)
    state, notes = upgrade_state_dict(ckpt["model"])
    check_prenorm(args, state, ckpt_path)
    task, head = choose_task(state, task, head, ckpt_path)

    leaves, unmatched = apply_table(state, FAIRSEQ_TABLE, FAIRSEQ_IGNORED, values={"head": head or ""})
    unmatched = [k for k in unmatched if not k.startswith("classification_heads.")]  # other heads: not chosen
    if unmatched:
        raise ConversionError(f"{ckpt_path}: tensors this converter does not know: {describe_keys(unmatched)}")
    not_float = [p for p, a in leaves.items() if dtype_name_of(a) not in FLOAT_DTYPES]
    if not_float:
        raise ConversionError(f"{ckpt_path}: weights that are not floating point: "
                              + ", ".join(f"{p} ({leaves[p].dtype})" for p in not_float[:5]))
    src_names = {p: safetensors_name_of(a) for p, a in leaves.items()}
    counts: dict[str, int] = {}
    for p, a in leaves.items():
        name = dtype_name_of(a)
        counts[name] = counts.get(name, 0) + int(a.size)
    source_dtype = max(counts, key=counts.get) if counts else "float32"
    if dtype == "auto":
        dtype = "float64" if source_dtype == "float64" else "float32"
    target = np.dtype(parse_dtype(dtype))
    leaves = {p: to_compute_dtype(np.asarray(a), src_names[p], target) for p, a in leaves.items()}

    word = leaves["embeddings.word"]
    tied = True
    if "lm_head.decoder_weight" in leaves:
        tied = _same_tensor(leaves["lm_head.decoder_weight"], word)
        if tied:
            del leaves["lm_head.decoder_weight"]
    if not _flag(args, "no_scale_embedding", True, ckpt_path):
        # fairseq multiplies the token embeddings by sqrt(H); transformers does not, so fold the
        # factor into the table (the same product, in the same precision). The LM head keeps the
        # unscaled matrix, so a tied head becomes untied.
        scale = math.sqrt(word.shape[1])
        if tied and "lm_head.bias" in leaves:
            leaves["lm_head.decoder_weight"] = word
            tied = False
        leaves["embeddings.word"] = word * target.type(scale)
        notes.append(f"folded fairseq's embedding scale sqrt({word.shape[1]}) into the word embeddings")
    leaves["embeddings.token_type"] = np.zeros((1, word.shape[1]), dtype=target)  # fairseq has no token types

    config = fairseq_config(args, state, task, head, tied, dict_path, ckpt_path)
    hf, other = hf_state(config, task, leaves)
    if other:
        notes.append(f"not converted (not part of a {task} model): {describe_keys(other)}")
    others = [h for h in classification_heads(state) if h != head]
    if others:
        notes.append(f"classification heads not converted: {', '.join(others)}")
    params = params_from_state_dict(config, task, hf, dtype, source=ckpt_path)
    model = Model(config, params, task)
    return Loaded(model, "fairseq", ckpt_path, source_dtype, os.path.dirname(ckpt_path), notes)
