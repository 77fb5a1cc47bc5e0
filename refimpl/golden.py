"""Golden files: every intermediate tensor of one forward pass, and the comparison that finds where a
candidate implementation first diverges from them.

    import refimpl
    from refimpl.golden import write_golden, read_golden, compare

    model = refimpl.from_pretrained("tiny", dtype="float64")
    write_golden(model, "golden.safetensors", input_ids=ids, attention_mask=mask)
    report = compare("golden.safetensors", "candidate.safetensors")   # profile from the candidate's dtype
    print(report.format_text())

A golden file is a safetensors file (llm.c's debug-state file is the model): the inputs under
``inputs.<name>``, every traced tensor under its trace name (see docs/golden.md for the naming
scheme), and string metadata: ``format`` ("refimpl-golden"), ``format_version`` ("1"),
``refimpl_version``, ``dtype``, ``task``, ``config`` (config.json as JSON), ``order`` (the tensor
names in forward order, JSON), ``inputs`` (the input names, JSON) and, when the inputs came from
text, ``tokenizer`` (the text and the tokenizer's output, JSON).

A comparison walks the golden's tensors in forward order and checks each present in the candidate
elementwise, ``|c - g| <= atol + rtol * |g|``, in float64. The first tensor that fails is the
*first divergence*, reported with a hint keyed by its name. Tolerances come from one table,
:data:`PROFILES` (``refimpl.tolerances.GOLDEN_PROFILES``), justified by the measurements in
docs/golden.md.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from .backend import to_numpy
from .safetensors_io import bf16_bits_to_float32, read_safetensors
from .tolerances import GOLDEN_PROFILES, profile_bound
from .tracing import Trace

FORMAT_NAME = "refimpl-golden"
FORMAT_VERSION = "1"
UNDERSTOOD_VERSIONS = ("1",)
INPUT_PREFIX = "inputs."

# The model arguments a golden file records (arrays only; the call is otherwise the default one).
INPUT_NAMES = (
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels",
    "start_positions", "end_positions", "encoder_hidden_states", "encoder_attention_mask",
)
# Output fields added to a trace when the trace does not already hold them under that name.
OUTPUT_NAMES = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "loss")


class GoldenFormatError(ValueError):
    """A file that is not a golden file this version of refimpl can read; the message says why."""


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------


def trace(model, **inputs) -> dict[str, np.ndarray]:
    """Run ``model(**inputs)`` recording every intermediate; -> ``{name: array}`` in forward order.

    The names are the trace names of docs/golden.md, followed by the output fields that the trace
    does not already hold under that name (``last_hidden_state`` and ``pooler_output`` for the base
    model). ``None`` entries (no loss without labels) are left out. Arrays are NumPy, in the model's
    dtype.
    """
    recorder = Trace()
    out = model(**inputs, trace=recorder)
    tensors: dict[str, np.ndarray] = {}
    for name, value in recorder.tensors.items():
        if value is not None:
            tensors[name] = np.asarray(to_numpy(value))
    fields = out.to_dict() if hasattr(out, "to_dict") else {}
    for name in OUTPUT_NAMES:
        value = fields.get(name)
        if value is not None and name not in tensors:
            tensors[name] = np.asarray(to_numpy(value))
    return tensors


# ---------------------------------------------------------------------------------------------
# safetensors writing (atomic) -- reading is refimpl.safetensors_io's
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {
    np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
    np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("int16"): "I16", np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8", np.dtype("bool"): "BOOL",
}


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                 dtypes: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, in the given order, atomically.

    The file is written to a temporary file in the same folder and moved over ``path`` with
    ``os.replace`` once complete, so a reader never sees a partial file and an interrupted write
    leaves nothing behind. ``dtypes`` may name a tensor's safetensors dtype where NumPy has none
    (``"BF16"`` for raw bfloat16 bits held as uint16).
    """
    path = os.fspath(path)
    dtypes = dict(dtypes or {})
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata values must be strings; not so for {bad}")
        header["__metadata__"] = dict(metadata)
    arrays, offset = [], 0
    for name, value in tensors.items():
        a = np.asarray(to_numpy(value))
        a = a if a.flags.c_contiguous else np.array(a, order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        st = dtypes.get(name) or _ST_DTYPES.get(a.dtype.newbyteorder("="))
        if st is None:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": st, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        arrays.append(a)
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data block, as the reference writer pads
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise _os_error(FileNotFoundError, 2, f"cannot write {path!r}: the folder {os.path.dirname(path) or '.'!r} "
                                              f"does not exist")
    if os.path.isdir(path):
        raise _os_error(IsADirectoryError, 21, f"cannot write {path!r}: it is a folder; give a file name "
                                               f"such as {os.path.join(path, 'golden.safetensors')!r}")
    # A fresh name in the target's folder (same file system, so os.replace is atomic); "x" mode
    # refuses to reuse an existing file and, unlike mkstemp's 0600, the file gets the umask's mode.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        f = open(tmp, "xb")
        try:
            with f:
                f.write(len(blob).to_bytes(8, "little"))
                f.write(blob)
                for a in arrays:
                    _write_array(f, a)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except OSError as e:  # name the file asked for, never the temporary one beside it
        raise _os_error(type(e), e.errno, f"cannot write {path!r}: {e.strerror or e}") from None


def _os_error(kind: type, errno: int | None, message: str) -> OSError:
    """``kind(message)`` with ``errno`` set: ``str()`` is the message alone, one line."""
    err = kind(message)
    err.errno = errno
    return err


def _write_array(f, a: np.ndarray) -> None:
    f.write(memoryview(a.reshape(-1).view(np.uint8)) if a.size else b"")


# ---------------------------------------------------------------------------------------------
# Golden files
# ---------------------------------------------------------------------------------------------


@dataclass
class Golden:
    """A golden file in memory. ``tensors`` in forward order (float arrays), ``inputs`` by argument
    name, ``metadata`` with ``config`` and ``tokenizer`` parsed from JSON."""

    tensors: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    metadata: dict[str, Any]
    path: str | None = None

    @property
    def dtype(self) -> str:
        return self.metadata.get("dtype", "")

    @property
    def task(self) -> str:
        return self.metadata.get("task", "")


def golden_metadata(model, tensors: Mapping[str, Any], inputs: Mapping[str, Any], tokenizer_output=None) -> dict[str, str]:
    from . import __version__

    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "refimpl_version": __version__,
        "dtype": np.dtype(model.dtype).name,
        "task": model.task,
        "config": json.dumps(model.config.to_dict(), sort_keys=True, default=str),
        "order": json.dumps(list(tensors)),
        "inputs": json.dumps(list(inputs)),
    }
    if tokenizer_output is not None:
        meta["tokenizer"] = json.dumps(tokenizer_output, default=_jsonable)
    return meta


def write_golden(model, path: str | os.PathLike, *, tokenizer_output: Mapping[str, Any] | None = None,
                 gradients: bool = False, **inputs) -> Golden:
    """Trace ``model(**inputs)`` and write the inputs, every traced tensor and the metadata to
    ``path`` (safetensors, atomically). -> the :class:`Golden` written.

    inputs: array arguments of the model (``input_ids``, ``attention_mask``, ``token_type_ids``,
    ``position_ids``, ``inputs_embeds``, ``labels``, ``start_positions``, ``end_positions``,
    ``encoder_hidden_states``, ``encoder_attention_mask``). tokenizer_output: what the tokenizer
    produced for the text, if any (stored as JSON metadata). The golden's dtype is the model's: load
    it with ``dtype="float64"`` for a reference golden. The tensors are computed by the reference
    (:mod:`refimpl.tasks`; a traced call runs it whatever the model's backend): a golden is the
    definition, not a fast path.

    gradients: also record the gradient of the loss with respect to every traced intermediate and
    every parameter (``grad.*`` names, after the forward's, in backward order: docs/golden.md), from
    :func:`refimpl.backward.gradient_trace`; the inputs must then give a loss (labels).
    """
    unknown = sorted(set(inputs) - set(INPUT_NAMES))
    if unknown:
        raise ValueError(f"write_golden records array inputs only ({', '.join(INPUT_NAMES)}); got {', '.join(unknown)}")
    given = {k: v for k, v in inputs.items() if v is not None}
    tensors = trace(model, **given)
    if gradients:
        from .backward import gradient_trace

        tensors.update(gradient_trace(model, **given))
    arrays = {k: np.asarray(to_numpy(v)) for k, v in given.items()}
    meta = golden_metadata(model, tensors, arrays, tokenizer_output)
    save_tensors(path, {**{INPUT_PREFIX + k: v for k, v in arrays.items()}, **tensors}, meta)
    return Golden(tensors, arrays, _parse_metadata(meta), os.fspath(path))


def read_golden(path: str | os.PathLike) -> Golden:
    """Read a golden file; refuses files of another format or of a format version not understood."""
    path = os.fspath(path)
    raw, dtypes, meta = read_safetensors(path)
    name = meta.get("format")
    if name != FORMAT_NAME:
        raise GoldenFormatError(
            f"{path}: not a refimpl golden file (metadata format is {name!r}, expected {FORMAT_NAME!r}); "
            f"a candidate's tensors are compared with `refimpl compare GOLDEN CANDIDATE`"
        )
    version = meta.get("format_version")
    if version not in UNDERSTOOD_VERSIONS:
        raise GoldenFormatError(
            f"{path}: golden format version {version!r} is not understood by this refimpl; "
            f"understood versions: {', '.join(UNDERSTOOD_VERSIONS)} (write the golden again with this refimpl, "
            f"or upgrade refimpl)"
        )
    order = json.loads(meta.get("order", "[]"))
    inputs = {k[len(INPUT_PREFIX):]: np.array(v) for k, v in raw.items() if k.startswith(INPUT_PREFIX)}
    names = [n for n in order if n in raw] + [n for n in raw if not n.startswith(INPUT_PREFIX) and n not in order]
    tensors = {n: _as_float(raw[n], dtypes[n]) for n in names}
    return Golden(tensors, inputs, _parse_metadata(meta), path)


def _parse_metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(meta)
    for key in ("config", "tokenizer", "order", "inputs"):
        if key in out:
            out[key] = json.loads(out[key])
    return out


def _as_float(a: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return bf16_bits_to_float32(np.asarray(a))
    return np.array(a)  # a copy: the file may be replaced while the arrays are in use


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# Tolerances: the profiles of the one tolerance table (refimpl.tolerances)
# ---------------------------------------------------------------------------------------------

# A candidate computing in <dtype> passes when every element satisfies |c - g| <= atol + rtol*|g|
# against a float64 golden, with rtol = atol = the profile's bound.
PROFILES = GOLDEN_PROFILES

_ST_TO_PROFILE = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_PRECISION_RANK = ["float64", "float32", "float16", "bfloat16"]


# ---------------------------------------------------------------------------------------------
# Hints: the likely mistake behind a first divergence, keyed by tensor name (first match wins)
# ---------------------------------------------------------------------------------------------

# A gradient grad.X that diverges while every gradient computed before it (the tensors after X in
# the forward) agrees points at the backward of the step that reads X.
_LN_WEIGHT = ("check LayerNorm's backward: dgamma = sum over positions of dy * xhat, with xhat the normalised "
              "input recomputed with the forward's eps")
_LN_BIAS = "check LayerNorm's backward: dbeta = sum over positions of dy"
GRAD_HINTS: list[tuple[str, str]] = [
    ("grad.loss", "the gradient of the loss with respect to itself is 1"),
    ("grad.logits", "check the loss's backward: (softmax - onehot) / n over the counted labels (-100 ignored, "
                    "all ignored: 0); the causal LM shifts labels by one; regression 2 (x - y) / n; multi-label "
                    "(sigmoid(x) - y) / n over every element"),
    ("grad.*_logits", "question answering: each of start and end gets its cross-entropy gradient halved; positions "
                      "are clamped to [0, T] and T is ignored"),
    ("grad.*word_embeddings.weight", "scatter-add the word rows' gradient at their ids, nothing into the padding_idx "
                                     "row; a tied LM decoder adds its own dW = dlogits^T x"),
    ("grad.*position_embeddings.weight", "scatter-add at the RoBERTa position ids; pads (position pad_token_id) add "
                                         "nothing (padding_idx)"),
    ("grad.*token_type_embeddings.weight", "scatter-add at the token-type ids (zeros when not given)"),
    ("grad.*LayerNorm.weight", _LN_WEIGHT),
    ("grad.*layer_norm.weight", _LN_WEIGHT),
    ("grad.*LayerNorm.bias", _LN_BIAS),
    ("grad.*layer_norm.bias", _LN_BIAS),
    ("grad.*.weight", "check the linear layer's weight gradient: dW = dy^T x summed over every position ([out, in])"),
    ("grad.*.bias", "check the bias gradient: the sum of dy over every position"),
    ("grad.encoder_hidden_states", "the encoder states' gradient sums every layer's cross-attention k and v "
                                   "projections' backward (no LayerNorm on that side)"),
    ("grad.embeddings.word", "the embedding sum passes its gradient to each term unchanged"),
    ("grad.embeddings.token_type", "the embedding sum passes its gradient to each term unchanged"),
    ("grad.embeddings.position", "the embedding sum passes its gradient to each term unchanged"),
    ("grad.embeddings.sum", "check the embedding LayerNorm's backward: dx = rstd (g - mean(g) - xhat mean(g xhat)), "
                            "g = dy * gamma"),
    ("grad.embeddings.output", "check block 0's backward: the skip path plus its attention LayerNorm's backward"),
    ("grad.*attention.layer_norm", "LN(x) feeds q, k and v (cross-attention: q only): add the three projections' "
                                   "dx = dy W"),
    ("grad.*attention.[qk]", "check dq = (dscores * D^-0.5) k and dk = (dscores * D^-0.5)^T q"),
    ("grad.*attention.v", "check dv = probs^T dcontext"),
    ("grad.*attention.scores", "check the softmax backward: probs * (dprobs - sum(dprobs * probs)) over keys; the "
                               "mask is a constant and passes the gradient unchanged"),
    ("grad.*attention.probs", "check dprobs = dcontext v^T"),
    ("grad.*attention.context", "check the output projection's backward (dx = dy W_o) and the head split [B, T, H] "
                                "-> [B, N, T, D]"),
    ("grad.*.output", "the residual add passes its gradient to the branch unchanged"),
    ("grad.*.residual", "check the backward of what reads the residual stream: the skip path plus the next "
                        "LayerNorm's backward (or the final LayerNorm's)"),
    ("grad.*ffn.activation", "check the FFN's second projection backward: dx = dy W_2"),
    ("grad.*ffn.pre_activation", "check the activation's derivative (exact erf GELU: Phi(x) + x phi(x); relu'(0) = 0; "
                                 "the one hidden_act names)"),
    ("grad.*ffn.layer_norm", "check the FFN's first projection backward: dx = dy W_1"),
    ("grad.final_layer_norm", "check the head's backward into the sequence (the classification heads and the pooler "
                              "read token 0 only)"),
    ("grad.head.pooler", "check the choice classifier's backward: [B, C] -> [B*C, 1], dx = dy W"),
    ("grad.head.tanh", "check out_proj's backward: dx = dy W"),
    ("grad.head.dense", "check the derivative after the head's dense: exact GELU for the LM head, 1 - y^2 for tanh"),
    ("grad.head.gelu", "check the LM head LayerNorm's backward"),
    ("grad.head.layer_norm", "check the decoder's backward: dx = dlogits W_dec (the tied word embeddings)"),
]

HINTS: list[tuple[str, str]] = GRAD_HINTS + [
    ("inputs.*", "the candidate was run on other inputs than the golden's: feed it the golden's inputs.* tensors"),
    ("embeddings.word", "check the word-embedding lookup (input ids, the embedding table, its dtype conversion)"),
    ("embeddings.token_type", "check token_type_ids: zeros when not given, rows of the token-type table"),
    ("embeddings.position", "check position ids: RoBERTa counts from pad_token_id+1, pads get pad_token_id "
                            "(BERT-style 0..T-1 is wrong)"),
    ("embeddings.sum", "check the embedding sum: (word + token_type) + position"),
    ("embeddings.output", "check the embedding LayerNorm (the pre-LN model still has it) and its eps "
                          "(config layer_norm_eps, usually 1e-5, not 1e-12)"),
    ("*attention.layer_norm", "check pre-LN vs post-LN ordering (LayerNorm on the block input, before attention; "
                              "none after the residual add) / LayerNorm eps"),
    ("layers.*.crossattention.[kv]", "cross-attention keys/values come from the encoder states as given, "
                                     "without a LayerNorm"),
    ("*attention.[qkv]", "check the q/k/v projections (W is [out, in]: x @ W.T + b) and the head split "
                         "[B, T, H] -> [B, N, T, D]"),
    ("*attention.scores", "check the scores: q k^T scaled by 1/sqrt(D) with D the head size (recorded before the mask)"),
    ("*attention.probs", "check the mask and softmax: additive finfo(dtype).min at masked keys, added after the "
                         "1/sqrt(D) scale; the causal mask for decoders; softmax over the key axis"),
    ("*attention.context", "check probs @ v"),
    ("*attention.output", "check the head merge [B, N, T, D] -> [B, T, H] and the output projection"),
    ("*.residual", "check pre-LN vs post-LN ordering: the residual adds the sub-block output to the "
                   "un-normalised block input, with no LayerNorm after the add"),
    ("*ffn.layer_norm", "check pre-LN vs post-LN ordering (a LayerNorm before the FFN) / LayerNorm eps"),
    ("*ffn.pre_activation", "check the FFN's first projection (intermediate.dense, W is [I, H])"),
    ("*ffn.activation", "check the activation: exact erf GELU vs tanh approximation (hidden_act 'gelu' is "
                        "the erf form; 'gelu_new' the tanh one)"),
    ("*ffn.output", "check the FFN's second projection (output.dense, W is [H, I])"),
    ("final_layer_norm", "is the final LayerNorm applied? Pre-LN models have one after the last block "
                         "(transformers: roberta_prelayernorm.LayerNorm)"),
    ("last_hidden_state", "last_hidden_state is taken after the final LayerNorm"),
    ("head.pooler", "check the pooler: tanh(W h_0 + b) on token 0 of the final-LayerNorm output"),
    ("head.dense", "check what the head reads: the final-LayerNorm output (the classification head reads token 0)"),
    ("head.gelu", "the LM head's GELU is the exact erf form, whatever hidden_act says"),
    ("head.layer_norm", "check the LM head's LayerNorm and its eps"),
    ("head.tanh", "the classification head is dense -> tanh -> out_proj on token 0 (not the pooler)"),
    ("pooler_output", "check the pooler: tanh(W h_0 + b) on token 0"),
    ("logits", "check the output projection: the MLM decoder is tied to the word embeddings with bias "
               "lm_head.bias; multiple choice scores the pooler output"),
    ("*_logits", "question answering: qa_outputs gives [B, T, 2], start is index 0, end index 1"),
    ("loss", "check the loss: labels -100 are ignored, the causal-LM loss shifts labels by one, QA averages "
             "start and end, sequence classification follows problem_type"),
]


def hint_for(name: str) -> str:
    for pattern, hint in HINTS:
        if fnmatch.fnmatchcase(name, pattern):
            return hint
    return ""


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


@dataclass
class TensorResult:
    name: str
    status: str  # "pass", "fail", "shape", "missing"
    shape: list
    candidate_shape: list | None = None
    candidate_dtype: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    worst_index: list | None = None
    golden_value: float | None = None
    candidate_value: float | None = None
    failing: int = 0  # elements over tolerance
    source: str | None = None  # the candidate's name for it, when not the golden name (an output field)

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "missing")


@dataclass
class Report:
    results: list[TensorResult]
    rtol: float
    atol: float
    profile: str | None
    strict: bool
    unexpected: list[tuple[str, str | None]] = field(default_factory=list)  # (name, closest golden name)
    hidden_states: str | None = None  # the convention the output fields were read with (stated), see read_fields
    notes: list[str] = field(default_factory=list)  # what the comparison recognised (conventions, output fields)
    diagnosis: str | None = None  # a hint that knows (float32 rounding, a convention), replacing the name's hint

    @property
    def missing(self) -> list[str]:
        return [r.name for r in self.results if r.status == "missing"]

    @property
    def hint(self) -> str:
        """The hint for the first divergence: the diagnosis when there is one, else the name's."""
        fd = self.first_divergence
        if fd is None:
            return ""
        return self.diagnosis or hint_for(fd.name)

    @property
    def first_divergence(self) -> TensorResult | None:
        return next((r for r in self.results if r.status in ("fail", "shape")), None)

    @property
    def golden_tensors(self) -> int:
        """The golden's traced tensors (its inputs not counted)."""
        return len({r.name for r in self.results if not r.name.startswith(INPUT_PREFIX)})

    @property
    def compared(self) -> int:
        """The golden's traced tensors the candidate gave, under their name or as an output field
        (compared; inputs not counted)."""
        return _compared(self.results)

    @property
    def passed(self) -> bool:
        """Every shared tensor within tolerance, and at least one traced tensor shared: a candidate
        that shares nothing (a weights file, a dump with other names) compared nothing and fails.
        ``strict``: also every golden tensor present and no other name."""
        if self.first_divergence is not None or self.compared == 0:
            return False
        return not (self.strict and (self.missing or self.unexpected))

    def to_dict(self) -> dict[str, Any]:
        fd = self.first_divergence
        return {
            "passed": self.passed,
            "profile": self.profile, "rtol": self.rtol, "atol": self.atol, "strict": self.strict,
            "compared": self.compared, "golden_tensors": self.golden_tensors,
            "first_divergence": None if fd is None else {"name": fd.name, "hint": self.hint, **_result_dict(fd)},
            "hidden_states": self.hidden_states, "notes": list(self.notes), "diagnosis": self.diagnosis,
            "missing": self.missing,
            "unexpected": [{"name": n, "closest": c} for n, c in self.unexpected],
            "tensors": [_result_dict(r) for r in self.results],
        }

    def format_text(self, verbose: bool = True) -> str:
        lines = [f"tolerance: |c - g| <= {self.atol:g} + {self.rtol:g} * |g|"
                 + (f" (profile {self.profile})" if self.profile else "")]
        if verbose:
            lines.append(f"{'tensor':<36} {'shape':<18} {'max abs err':>11} {'max rel err':>11}  {'worst index':<18} status")
            for r in self.results:
                shape = "x".join(map(str, r.shape)) or "scalar"
                label = r.name if r.source is None else f"{r.name} <- {r.source}"
                if r.status == "missing":
                    lines.append(f"{label:<36} {shape:<18} {'':>11} {'':>11}  {'':<18} missing")
                    continue
                if r.status == "shape":
                    lines.append(f"{label:<36} {shape:<18} {'':>11} {'':>11}  {'':<18} "
                                 f"FAIL shape {'x'.join(map(str, r.candidate_shape))}")
                    continue
                status = "ok" if r.status == "pass" else f"FAIL ({r.failing} elements)"
                lines.append(f"{label:<36} {shape:<18} {r.max_abs:>11.3e} {r.max_rel:>11.3e}  "
                             f"{str(tuple(r.worst_index)):<18} {status}")
        inputs = sum(r.name.startswith(INPUT_PREFIX) for r in self.results)
        lines.append(f"compared {self.compared} of {self.golden_tensors} golden tensors"
                     + (f" (and {inputs} inputs)" if inputs else ""))
        if self.missing and self.compared:
            lines.append(f"missing from the candidate ({len(self.missing)}): {', '.join(self.missing[:12])}"
                         + (" ..." if len(self.missing) > 12 else "") + (" [fails under --strict]" if self.strict else ""))
        for name, close in self.unexpected[:20]:
            lines.append(f"not in the golden: {name}" + (f" (did you mean {close}?)" if close else ""))
        if len(self.unexpected) > 20:
            lines.append(f"... and {len(self.unexpected) - 20} more names not in the golden")
        lines += [f"note: {n}" for n in self.notes]
        fd = self.first_divergence
        if fd is None:
            if self.compared == 0:
                lines.append("FAIL: the candidate holds none of the golden's traced tensors, so nothing was compared "
                             "(its names must be the golden's, see docs/golden.md)")
            else:
                lines.append("PASS" if self.passed else
                             "FAIL (--strict: the candidate does not hold exactly the golden's tensors)")
            return "\n".join(lines)
        where = fd.name if fd.source is None else f"{fd.name} (the candidate's {fd.source})"
        if fd.status == "shape":
            lines.append(f"first divergence: {where}: shape {fd.candidate_shape} != golden {fd.shape}")
        else:
            lines.append(
                f"first divergence: {where}: max abs err {fd.max_abs:.3e}, max rel err {fd.max_rel:.3e}; "
                f"worst at index {tuple(fd.worst_index)}: golden {fd.golden_value:.9g}, candidate {fd.candidate_value:.9g} "
                f"({fd.failing} of {int(np.prod(fd.shape))} elements over tolerance)"
            )
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        lines.append("FAIL")
        return "\n".join(lines)


def _compared(results: list[TensorResult]) -> int:
    """How many golden tensors (not inputs) the candidate gave, under their name or as an output field."""
    return len({r.name for r in results if r.status != "missing" and not r.name.startswith(INPUT_PREFIX)})


def _result_dict(r: TensorResult) -> dict[str, Any]:
    d = {k: v for k, v in r.__dict__.items()}
    for k in ("max_abs", "max_rel", "golden_value", "candidate_value"):
        if d[k] is not None and not np.isfinite(d[k]):
            d[k] = str(d[k])  # JSON has no inf/nan
    return d


@dataclass
class Candidate:
    """A candidate's tensors as float64 (integers kept), with the safetensors dtype each came in."""

    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]


def read_candidate(source) -> Candidate:
    """A candidate from a safetensors path (any tensor subset; F64/F32/F16/BF16), a :class:`Golden`,
    or a dict of arrays."""
    if isinstance(source, Candidate):
        return source
    if isinstance(source, Golden):
        tensors = {**{INPUT_PREFIX + k: v for k, v in source.inputs.items()}, **source.tensors}
        return Candidate(tensors, {k: _st_name(v) for k, v in tensors.items()})
    if isinstance(source, Mapping):
        tensors = {k: np.asarray(to_numpy(v)) for k, v in source.items()}
        return Candidate(tensors, {k: _st_name(v) for k, v in tensors.items()})
    raw, dtypes, _ = read_safetensors(source)
    return Candidate({k: _as_float(v, dtypes[k]) for k, v in raw.items()}, dict(dtypes))


def _st_name(a: np.ndarray) -> str:
    return _ST_DTYPES.get(np.dtype(a.dtype).newbyteorder("="), str(a.dtype))


def profile_for(candidate: Candidate) -> str:
    """The profile of the candidate's least precise floating-point tensor (float64 if it has none)."""
    names = {_ST_TO_PROFILE[d] for k, d in candidate.dtypes.items() if d in _ST_TO_PROFILE and not k.startswith(INPUT_PREFIX)}
    return max(names, key=_PRECISION_RANK.index) if names else "float64"


def compare(golden, candidate, *, rtol: float | None = None, atol: float | None = None,
            profile: str | None = None, strict: bool = False, hidden_states: str | None = None) -> Report:
    """Compare ``candidate`` with ``golden`` tensor by tensor in the golden's forward order.

    golden: a :class:`Golden` or a path. candidate: a path, a :class:`Golden` or a dict of arrays,
    holding any subset of the golden's names, or a model's output fields (``hidden_states.{i}``,
    ``attentions.{i}``, ... see :func:`output_field_map`). Tolerances: ``profile`` (a key of
    :data:`PROFILES`; default: from the candidate's least precise float dtype), with ``rtol``/``atol``
    overriding it. ``hidden_states``: ``"5.x"`` (refimpl's and transformers 5.x's convention, the
    default) or ``"4.x"`` (transformers 4.x: the last entry is the last block's raw output). Missing
    tensors are reported and fail only with ``strict`` (as do names the golden lacks); a candidate
    holding none of the golden's traced tensors fails (``Report.compared`` is 0).
    """
    g = golden if isinstance(golden, Golden) else read_golden(golden)
    c = read_candidate(candidate)
    if hidden_states is not None and hidden_states not in HIDDEN_STATES_CONVENTIONS:
        raise ValueError(f"unknown hidden_states convention {hidden_states!r}; known: {', '.join(HIDDEN_STATES_CONVENTIONS)}")
    if profile is None:
        profile = profile_for(c)
    if profile not in PROFILES:
        raise ValueError(f"unknown dtype profile {profile!r}; known: {', '.join(PROFILES)}")
    rtol = profile_bound(profile) if rtol is None else float(rtol)
    atol = profile_bound(profile) if atol is None else float(atol)
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0; got rtol={rtol}, atol={atol}")
    results = []
    for name, value in g.inputs.items():  # inputs first, exactly, and only when the candidate has them
        key = INPUT_PREFIX + name
        if key in c.tensors:
            results.append(_compare_one(key, value, c.tensors[key], c.dtypes.get(key), 0.0, 0.0))
    fields = read_fields(g, c, hidden_states)  # golden name -> the candidate's output fields holding it
    for name, value in g.tensors.items():
        sources = ([name] if name in c.tensors else []) + fields.get(name, [])
        if not sources:
            results.append(TensorResult(name, "missing", list(value.shape)))
        for src in sources:
            r = _compare_one(name, value, c.tensors[src], c.dtypes.get(src), rtol, atol)
            r.source = None if src == name else src
            results.append(r)
    known = set(g.tensors) | {INPUT_PREFIX + k for k in g.inputs} | {f for fs in fields.values() for f in fs}
    unexpected = []
    for name in c.tensors:
        if name not in known:
            close = difflib.get_close_matches(name, list(g.tensors), n=1, cutoff=0.6)
            unexpected.append((name, close[0] if close else None))
    report = Report(results, rtol, atol, profile, strict, unexpected, hidden_states=hidden_states)
    diagnose(report, g, c)
    return report


def _compare_one(name: str, golden: np.ndarray, cand: np.ndarray, cand_dtype, rtol: float, atol: float) -> TensorResult:
    res = TensorResult(name, "pass", list(golden.shape), list(cand.shape), cand_dtype)
    if tuple(cand.shape) != tuple(golden.shape):
        res.status = "shape"
        return res
    g = np.asarray(golden, dtype=np.float64)
    x = np.asarray(cand, dtype=np.float64)
    if g.size == 0:
        res.max_abs = res.max_rel = 0.0
        res.worst_index = [0] * g.ndim
        return res
    same = (g == x) | (np.isnan(g) & np.isnan(x))  # equal infinities and NaN where the golden has NaN agree
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.where(same, 0.0, np.abs(x - g))
        diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only: infinitely wrong
        allowed = atol + rtol * np.abs(g)
        excess = np.where(np.isfinite(allowed), diff - allowed, np.where(diff > 0, np.inf, 0.0))
        rel = np.where(diff == 0, 0.0, diff / np.abs(g))  # inf where the golden is 0
    bad = excess > 0
    worst = np.unravel_index(int(np.argmax(excess)), g.shape)
    res.max_abs = float(np.max(diff))
    res.max_rel = float(np.max(np.where(np.isnan(rel), np.inf, rel)))
    res.worst_index = [int(i) for i in worst]
    res.golden_value = float(g[worst])
    res.candidate_value = float(x[worst])
    res.failing = int(np.count_nonzero(bad))
    res.status = "fail" if res.failing else "pass"
    return res


# ---------------------------------------------------------------------------------------------
# Output fields: a model's hidden_states / attentions as golden tensors, and the two conventions
# ---------------------------------------------------------------------------------------------

# What the last entry of ``hidden_states`` (index L, for L layers) holds.
HIDDEN_STATES_CONVENTIONS: dict[str, str] = {
    "5.x": "taken after the final LayerNorm (transformers 5.x and refimpl): it is final_layer_norm",
    "4.x": "the last block's raw output, before the final LayerNorm (transformers 4.x, PyTorch and Flax; "
           "fairseq's inner_states): it is layers.{L-1}.ffn.residual",
}


def output_field_map(num_layers: int, hidden_states: str = "5.x") -> dict[str, str]:
    """Candidate names taken from a model's output fields -> the golden names they hold.

    ``hidden_states.{i}`` is entry i of the ``hidden_states`` tuple (L + 1 entries): 0 is the
    embedding output, i in 1..L-1 the output of block i-1, and L depends on the convention
    (:data:`HIDDEN_STATES_CONVENTIONS`). ``attentions.{i}`` / ``cross_attentions.{i}`` are the
    attention probabilities of block i. ``last_hidden_state`` and ``pooler_output`` stand for
    ``final_layer_norm`` and ``head.pooler`` where the golden has no tensor of that name (every head
    but the base model).
    """
    if hidden_states not in HIDDEN_STATES_CONVENTIONS:
        raise ValueError(f"unknown hidden_states convention {hidden_states!r}; known: {', '.join(HIDDEN_STATES_CONVENTIONS)}")
    n = int(num_layers)
    table = {"hidden_states.0": "embeddings.output"}
    for i in range(1, n):
        table[f"hidden_states.{i}"] = f"layers.{i - 1}.ffn.residual"
    table[f"hidden_states.{n}"] = "final_layer_norm" if hidden_states == "5.x" else f"layers.{n - 1}.ffn.residual"
    for i in range(n):
        table[f"attentions.{i}"] = f"layers.{i}.attention.probs"
        table[f"cross_attentions.{i}"] = f"layers.{i}.crossattention.probs"
    table["last_hidden_state"] = "final_layer_norm"
    table["pooler_output"] = "head.pooler"
    return table


def num_layers(golden: Golden) -> int:
    """L, from the golden's config (or, failing that, from its tensor names)."""
    n = (golden.metadata.get("config") or {}).get("num_hidden_layers")
    if isinstance(n, int) and n > 0:
        return n
    found = [int(k.split(".")[1]) for k in golden.tensors if k.startswith("layers.") and k.split(".")[1].isdigit()]
    return max(found) + 1 if found else 0


def read_fields(golden: Golden, candidate: Candidate, hidden_states: str | None = None) -> dict[str, list[str]]:
    """-> {golden name: [the candidate's output fields that hold it]}, for candidate names that are
    output fields (:func:`output_field_map`) rather than golden names."""
    table = output_field_map(num_layers(golden), hidden_states or "5.x")
    out: dict[str, list[str]] = {}
    for name in candidate.tensors:
        target = table.get(name)
        if name not in golden.tensors and target is not None and target in golden.tensors:
            out.setdefault(target, []).append(name)
    return out


# ---------------------------------------------------------------------------------------------
# Diagnosis: hints that look at the values, not only at the name of the first divergence
# ---------------------------------------------------------------------------------------------


def diagnose(report: Report, golden: Golden, candidate: Candidate) -> None:
    """Fill ``report.notes`` (which hidden_states convention the candidate follows, which output
    fields were read) and ``report.diagnosis`` (a hint that replaces the name's hint when the values
    say more: a hidden_states convention, float32 rounding, a per-unit offset)."""
    report.notes += _field_notes(report, golden, candidate)
    fd = report.first_divergence
    if fd is None or fd.status != "fail" or fd.name not in golden.tensors:
        return
    report.diagnosis = (_convention_diagnosis(report, golden, candidate)
                        or _float32_diagnosis(report, golden, candidate)
                        or _offset_diagnosis(report, golden, candidate))


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> bool:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all((np.abs(a - b) <= atol + rtol * np.abs(b)) | (a == b)))


def hidden_states_followed(golden: Golden, candidate: Candidate, rtol: float, atol: float, name: str | None = None) -> str | None:
    """Which convention the candidate's last hidden state follows: ``"5.x"`` when it matches
    ``final_layer_norm``, ``"4.x"`` when it matches the last block's raw output, else None. ``name``:
    the candidate tensor to look at (default ``hidden_states.{L}``)."""
    n = num_layers(golden)
    name = name or f"hidden_states.{n}"
    raw, final = golden.tensors.get(f"layers.{n - 1}.ffn.residual"), golden.tensors.get("final_layer_norm")
    value = candidate.tensors.get(name)
    if value is None or raw is None or final is None:
        return None
    after, before = _close(value, final, rtol, atol), _close(value, raw, rtol, atol)
    return "5.x" if after and not before else "4.x" if before and not after else None


def _field_notes(report: Report, golden: Golden, candidate: Candidate) -> list[str]:
    fields = sorted({r.source for r in report.results if r.source}, key=_natural)
    if not fields:
        return []
    notes = [f"read {len(fields)} output fields as golden tensors ({_abbreviate(fields)}; docs/golden.md, "
             f"'Output fields')"]
    n = num_layers(golden)
    if f"hidden_states.{n}" in candidate.tensors:
        followed = hidden_states_followed(golden, candidate, report.rtol, report.atol)
        stated = report.hidden_states
        if followed is None:
            notes.append(f"hidden_states.{n} matches neither final_layer_norm (the 5.x convention) nor "
                         f"layers.{n - 1}.ffn.residual (the 4.x convention)")
        else:
            target = "final_layer_norm" if followed == "5.x" else f"layers.{n - 1}.ffn.residual"
            said = ("as stated" if stated == followed else
                    f"but {stated} was stated" if stated else
                    "the default" if followed == "5.x" else "not stated: pass --hidden-states 4.x")
            notes.append(f"hidden_states: the candidate follows the transformers {followed} convention "
                         f"(hidden_states.{n} matches {target}; {said})")
    return notes


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _abbreviate(names: list[str]) -> str:
    groups: dict[str, list[str]] = {}
    for n in names:
        head, _, tail = n.rpartition(".")
        key = head if tail.isdigit() else n
        groups.setdefault(key, []).append(tail if tail.isdigit() else "")
    parts = []
    for key, idx in groups.items():
        idx = [i for i in idx if i]
        parts.append(key if not idx else f"{key}.{idx[0]}" if len(idx) == 1 else f"{key}.{idx[0]}-{idx[-1]}")
    return ", ".join(parts)


def _later_outputs_pass(report: Report, fd: TensorResult) -> bool | None:
    """Do the tensors computed after ``fd`` (later in forward order, not themselves hidden states)
    pass? None when the candidate has none."""
    i = report.results.index(fd)
    later = [r for r in report.results[i + 1:] if r.status != "missing" and r.name != fd.name
             and not r.name.startswith(("layers.", "last_hidden_state"))]
    if not later:
        return None
    return all(r.status == "pass" for r in later)


def _convention_diagnosis(report: Report, golden: Golden, candidate: Candidate) -> str | None:
    fd = report.first_divergence
    n = num_layers(golden)
    raw = f"layers.{n - 1}.ffn.residual"
    src = fd.source or fd.name
    if fd.name == "final_layer_norm" and src != "last_hidden_state":
        if hidden_states_followed(golden, candidate, report.rtol, report.atol, src) != "4.x":
            return None
        later = _later_outputs_pass(report, fd)
        if later is False:  # the head fails too: the final LayerNorm really is missing
            return (f"is the final LayerNorm applied? The candidate's {src} equals the last block's raw output "
                    f"({raw}) and what is computed from it fails too (pre-LN models have a LayerNorm after the last "
                    f"block; transformers: roberta_prelayernorm.LayerNorm)")
        convention = ("it follows the transformers 4.x hidden_states convention: 4.x (PyTorch and Flax) ends "
                      "hidden_states with the last block's raw output, 5.x and refimpl with the output of the "
                      "final LayerNorm (= last_hidden_state)")
        if src == f"hidden_states.{n}":
            tail = ("" if later else " (or the final LayerNorm is missing: the candidate has nothing computed after it)")
            return (f"{src} is the last block's raw output (it matches {raw}), not the final LayerNorm's: "
                    f"{convention}. State it: refimpl compare --hidden-states 4.x{tail}")
        return (f"the candidate's final_layer_norm is the last block's raw output (it matches {raw}): if it was "
                f"taken from hidden_states[{n}], {convention}; record it as hidden_states.{n} and pass "
                f"--hidden-states 4.x, or record last_hidden_state as final_layer_norm"
                + ("" if later else "; otherwise the final LayerNorm is not applied"))
    if fd.name == raw and fd.source == f"hidden_states.{n}" and report.hidden_states == "4.x":
        if hidden_states_followed(golden, candidate, report.rtol, report.atol) == "5.x":
            return (f"hidden_states.{n} is taken after the final LayerNorm (it matches final_layer_norm): the candidate "
                    f"follows the transformers 5.x convention, not the 4.x one stated; drop --hidden-states 4.x")
    return None


# Errors of a tensor computed in float32 sit within a few float32 ulps of the value at its first
# rounding step (the tests' float32 candidates: 0.1-2 ulps median); a float64 computation's are
# ~1e-9 ulps, and a wrong LayerNorm eps (1e-12 for 1e-5) on the tests' models tens of ulps.
FLOAT32_ROUNDING_ULPS = (0.01, 8.0)  # median |c - g| in float32 ulps of g that reads as float32 rounding
WELL_CONDITIONED = 1e-3  # elements with |g| >= this * max|g| (values that cancel to ~0 say nothing)


def _ulps32(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """|x - g| in units of float32's spacing at g (float64 arrays, finite g within float32's range)."""
    return np.abs(x - g) / np.spacing(np.abs(g).astype(np.float32)).astype(np.float64)


def float32_evidence(golden_value: np.ndarray, candidate_value: np.ndarray) -> str | None:
    """Why ``candidate_value`` looks computed in float32 against a float64 ``golden_value``, or None.

    Two signs: the candidate's values are exactly representable in float32 wherever the golden's are
    not (computed or stored in float32, then widened), or the errors sit at float32's rounding
    (median between 0.01 and 8 float32 ulps of the golden value over its well-conditioned elements,
    |g| >= 1e-3 max|g|). A formula mistake moves values by far more; a float64 summation order by far
    less (~1e-16).
    """
    g = np.asarray(golden_value, dtype=np.float64)
    x = np.asarray(candidate_value, dtype=np.float64)
    if g.shape != x.shape or g.size == 0:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(g) & np.isfinite(x) & (np.abs(g) < float(np.finfo(np.float32).max))
        g, x = g[ok], x[ok]
        exact32 = g.astype(np.float32).astype(np.float64) == g
        free = ~exact32  # where the golden itself is not a float32 number
        if free.any() and np.all(x[free].astype(np.float32).astype(np.float64) == x[free]):
            return (f"its values are exactly representable in float32 ({int(free.sum())} of {int(free.sum())} "
                    f"where the golden's are not)")
        wide = np.abs(g) >= WELL_CONDITIONED * np.max(np.abs(g)) if g.size else g
        if not np.any(wide):
            return None
        median = float(np.median(_ulps32(x[wide], g[wide])))
    low, high = FLOAT32_ROUNDING_ULPS
    if low <= median <= high:
        return f"its errors sit at float32's rounding (median {median:.2g} float32 ulps of the golden value)"
    return None


def _float32_diagnosis(report: Report, golden: Golden, candidate: Candidate) -> str | None:
    f32 = profile_bound("float32")
    if report.rtol >= f32 / 10:  # the tolerance cannot see float32 rounding anyway
        return None
    fd = report.first_divergence
    value = candidate.tensors[fd.source or fd.name]
    evidence = float32_evidence(golden.tensors[fd.name], value)
    if evidence is None:
        return None
    as32 = [_compare_one(r.name, golden.tensors[r.name], candidate.tensors[r.source or r.name], None, f32, f32)
            for r in report.results if r.status == "fail" and r.name in golden.tensors]
    if not all(r.status == "pass" for r in as32) and as32[0].status != "pass":
        return None  # wrong by more than float32 rounding: the name's hint applies
    i = report.results.index(fd)
    before = [r for r in report.results[:i] if r.status == "pass" and not r.name.startswith(INPUT_PREFIX)
              and (r.max_abs or 0) > 0]
    verdict = ("passes the float32 profile" if all(r.status == "pass" for r in as32) else
               f"still fails the float32 profile at {next(r.name for r in as32 if r.status != 'pass')}")
    if before:
        return (f"{fd.name} looks computed in float32 while the tensors before it agree to float64 precision: "
                f"{evidence}. Look for a float32 cast or a float32 operation at this step (the candidate {verdict})")
    return (f"this looks computed in float32, not float64: {fd.name} is the first tensor the candidate computes and "
            f"{evidence}. Compute in float64 (parameters and computation dtype: a module's dtype, a default dtype, "
            f"a cast), or judge it as float32 with --dtype-profile float32 (the candidate {verdict})")


def _offset_diagnosis(report: Report, golden: Golden, candidate: Candidate) -> str | None:
    """A first divergence whose error is one constant per output unit, at every position: a bias."""
    fd = report.first_divergence
    g = np.asarray(golden.tensors[fd.name], dtype=np.float64)
    x = np.asarray(candidate.tensors[fd.source or fd.name], dtype=np.float64)
    if g.ndim < 2 or g.ndim > 3 or int(np.prod(g.shape[:-1])) < 2 or g.shape != x.shape:
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        d = (x - g).reshape(-1, g.shape[-1])
        if not np.all(np.isfinite(d)):
            return None
        offset = d.mean(axis=0)  # [U]
        rest = d - offset
        allowed = report.atol + report.rtol * np.abs(g.reshape(d.shape))
    if not np.all(np.abs(rest) <= allowed) or not np.any(np.abs(offset) > report.atol + report.rtol * np.abs(g).max()):
        return None
    units = int(np.count_nonzero(np.abs(offset) > report.atol))
    hint = (f"the error at {fd.name} is one constant per output unit, the same at every position ({units} of "
            f"{g.shape[-1]} units offset, by up to {np.abs(offset).max():.3g}): a bias is wrong or missing there")
    if fd.name == "logits" and golden.task in ("masked-lm", "causal-lm"):
        hint += ("; for the LM head that is lm_head.bias (the decoder's bias, tied to it). transformers 4.46.3's "
                 "PyTorch classes load it as zeros when the file has no lm_head.decoder.bias and is loaded in its "
                 "own dtype (docs/judge.md)")
    return hint
