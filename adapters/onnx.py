"""An ONNX graph through onnxruntime as a candidate. Needs onnxruntime and onnx (``pip install
'.[adapters-onnx]'`` in a checkout of refimpl); exporting a transformers folder first also needs torch, transformers
and onnxscript (``adapters-torch``), all imported only here.

    tensors, missing = run_graph("model.onnx", golden)          # {golden name: array}, {name: why}
    export_transformers("path/to/hf-folder", golden, "model.onnx")    # torch.onnx, on the golden's inputs

Intermediate values become golden tensors by the module that computed them. Both torch exporters
record it: the dynamo exporter in each node's ``pkg.torch.onnx.name_scopes`` metadata, the
TorchScript exporter in the node names (``/roberta_prelayernorm/encoder/layer.0/attention/LayerNorm/...``).
A module's *output* is a value computed inside its scope and used outside it; its *input* a value
used inside and computed outside. The table :data:`MODULE_MAP` (the same as the PyTorch hooks')
names which module gives which tensor; the attention scores and probabilities are found from the
``Softmax`` node of each attention scope. Every mapped value is added to the graph's outputs, and
the graph runs once. Graph outputs named like golden tensors or output fields (``logits``,
``hidden_states.3``, ...) are taken as they are; graphs from other exporters, or whose scopes an
optimiser fused away, give what their names give, and the rest is listed as not provided.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from refimpl.golden import output_field_map, num_layers
from . import AdapterError, Dump, finish, require, split_heads

# Forward-changing inputs: when the graph does not take one, the golden's must be the default.
DEFAULTS = {"attention_mask": 1, "token_type_ids": 0}
LABELS = ("labels", "start_positions", "end_positions")

# golden name -> ("out" | "in", module path relative to the model; {b} the base model, {a} an attention block)
MODULE_MAP = [
    ("embeddings.word", "out", "{b}.embeddings.word_embeddings"),
    ("embeddings.token_type", "out", "{b}.embeddings.token_type_embeddings"),
    ("embeddings.position", "out", "{b}.embeddings.position_embeddings"),
    ("embeddings.sum", "in", "{b}.embeddings.LayerNorm"),
    ("embeddings.output", "out", "{b}.embeddings.LayerNorm"),
]
ATTENTION_MAP = [
    ("layer_norm", "out", "{a}.LayerNorm"),
    ("q", "out", "{a}.self.query"),
    ("k", "out", "{a}.self.key"),
    ("v", "out", "{a}.self.value"),
    ("context", "in", "{a}.output.dense"),
    ("output", "out", "{a}.output.dense"),
    ("residual", "out", "{a}.output"),
]
FFN_MAP = [
    ("layer_norm", "out", "{l}.intermediate.LayerNorm"),
    ("pre_activation", "out", "{l}.intermediate.dense"),
    ("activation", "out", "{l}.intermediate"),
    ("output", "out", "{l}.output.dense"),
    ("residual", "out", "{l}.output"),
]
HEAD_MAP = [
    ("final_layer_norm", "out", "{b}.LayerNorm"),
    ("head.pooler", "out", "{b}.pooler"),
    ("head.dense", "out", "lm_head.dense"),
    ("head.gelu", "in", "lm_head.layer_norm"),
    ("head.layer_norm", "out", "lm_head.layer_norm"),
    ("head.dense", "out", "classifier.dense"),
    ("head.tanh", "in", "classifier.out_proj"),
]
HEADS_SPLIT = ("q", "k", "v", "context")


class Scopes:
    """Which module computed each value of an ONNX graph, from the torch exporters' records."""

    def __init__(self, graph):
        self.graph = graph
        self.constants = {i.name for i in graph.initializer}
        self.scope = {}  # node index -> dotted module path ('' when unknown)
        self.producer = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            self.scope[i] = node_scope(node)
            if node.op_type == "Constant":
                self.constants.update(node.output)
            for v in node.output:
                self.producer[v] = i
            for v in node.input:
                self.consumers.setdefault(v, []).append(i)
        self.outputs = {o.name for o in graph.output}
        self.all = set()  # every scope and its enclosing modules (a module whose nodes all sit in submodules)
        for s in set(self.scope.values()):
            parts = s.split(".") if s else []
            self.all.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))

    def find(self, path: str) -> str | None:
        """The graph's scope for a module path relative to the model (a wrapper may prefix it)."""
        if path in self.all:
            return path
        hits = sorted(s for s in self.all if s.endswith("." + path))
        return hits[0] if hits else None

    def inside(self, i: int, scope: str) -> bool:
        s = self.scope.get(i, "")
        return s == scope or s.startswith(scope + ".")

    def output_of(self, scope: str) -> str | None:
        """The last value computed in ``scope`` and used outside it (or a graph output)."""
        found = None
        for i, node in enumerate(self.graph.node):
            if not self.inside(i, scope):
                continue
            for v in node.output:
                if v in self.outputs or any(not self.inside(j, scope) for j in self.consumers.get(v, [])):
                    found = v
        return found

    def input_of(self, scope: str) -> str | None:
        """The first non-constant value used in ``scope`` and computed outside it."""
        for i, node in enumerate(self.graph.node):
            if not self.inside(i, scope):
                continue
            for v in node.input:
                if v and v not in self.constants and not (v in self.producer and self.inside(self.producer[v], scope)):
                    if v in self.producer and self.graph.node[self.producer[v]].op_type in ("Constant", "ConstantOfShape"):
                        continue
                    return v
        return None

    def softmax(self, scope: str):
        """-> (scores, probs) of the attention in ``scope``: the Softmax output, and the scaled
        product before the mask is added (Softmax <- Add(mask) <- Mul/Div(scale))."""
        for i, node in enumerate(self.graph.node):
            if node.op_type == "Softmax" and self.inside(i, scope):
                scores, v = None, node.input[0]
                for _ in range(3):  # through the mask's Add, to the scaling Mul/Div
                    p = self.producer.get(v)
                    if p is None or not self.inside(p, scope):
                        break
                    op = self.graph.node[p]
                    if op.op_type in ("Mul", "Div"):
                        scores = v
                        break
                    if op.op_type != "Add":
                        break
                    v = next((x for x in op.input if x in self.producer and self.graph.node[self.producer[x]].op_type in ("Mul", "Div")), op.input[0])
                return scores, node.output[0]
        return None, None


def node_scope(node) -> str:
    """A node's module path: the dynamo exporter's name_scopes metadata, else the TorchScript
    exporter's node name '/a/b.0/c/Op' (-> 'a.b.0.c')."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            import ast

            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            scopes = [s for s in scopes[:-1] if s]  # the last entry is the operation itself
            return scopes[-1] if scopes else ""
    if node.name.startswith("/"):
        parts = node.name.strip("/").split("/")[:-1]
        return ".".join(parts)
    return ""


def map_graph(graph, config: dict, golden_names) -> tuple[dict[str, tuple[str, bool]], dict[str, str]]:
    """-> ({golden name: (value name, split into heads)}, {golden name: why not mapped})."""
    scopes = Scopes(graph)
    found: dict[str, tuple[str, bool]] = {}
    why: dict[str, str] = {}
    word = next((s for s in sorted(scopes.all) if s.endswith("embeddings.word_embeddings")), None)
    if word is None:
        reason = ("the graph records no module scopes (not exported by torch.onnx from transformers' classes, "
                  "or its names were rewritten); only graph outputs named like golden tensors are read")
        return {}, {name: reason for name in golden_names}
    base = word[: -len(".embeddings.word_embeddings")]
    prefix = base.rsplit(".", 1)[0] + "." if "." in base else ""

    def look(name, kind, path, heads=False):
        scope = scopes.find(path) or (scopes.find(prefix + path) if prefix else None)
        if scope is None:
            why.setdefault(name, f"no module {path} in the graph")
            return
        value = scopes.output_of(scope) if kind == "out" else scopes.input_of(scope)
        if value is None:
            why.setdefault(name, f"no {kind}put value of {scope} in the graph")
            return
        found.setdefault(name, (value, heads))
        why.pop(name, None)

    fmt = dict(b=base)
    for name, kind, path in MODULE_MAP:
        look(name, kind, path.format(**fmt))
    for i in range(int(config.get("num_hidden_layers", 0))):
        layer = f"{base}.encoder.layer.{i}"
        for kind in ("attention", "crossattention"):
            a = f"{layer}.{kind}"
            if scopes.find(a + ".LayerNorm") is None:
                continue
            for sub, io, path in ATTENTION_MAP:
                look(f"layers.{i}.{kind}.{sub}", io, path.format(a=a), heads=sub in HEADS_SPLIT)
            scores, probs = scopes.softmax(scopes.find(a + ".self"))
            if probs is not None:
                found[f"layers.{i}.{kind}.probs"] = (probs, False)
            else:
                why[f"layers.{i}.{kind}.probs"] = f"no Softmax in {a}.self (a fused attention operator?)"
            if scores is not None:
                found[f"layers.{i}.{kind}.scores"] = (scores, False)
            else:
                why[f"layers.{i}.{kind}.scores"] = f"no scaled product before the Softmax of {a}.self"
        for sub, io, path in FFN_MAP:
            look(f"layers.{i}.ffn.{sub}", io, path.format(l=layer))
    for name, kind, path in HEAD_MAP:
        look(name, kind, path.format(**fmt))
    found = {k: v for k, v in found.items() if k in golden_names}
    return found, {k: v for k, v in why.items() if k in golden_names and k not in found}


def run_graph(model, golden, *, outputs_only: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Run an ONNX graph (a path or a ModelProto) on the golden's inputs with onnxruntime.
    -> ({golden name or output field: array}, {golden name: why not provided}, a description)."""
    ort, onnx = require("onnx", "onnxruntime", "onnx")
    proto = onnx.load(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else model
    graph = proto.graph
    config = golden.metadata.get("config") or {}
    n_heads = int(config.get("num_attention_heads", 1))
    mapped, why = ({}, {}) if outputs_only else map_graph(graph, config, set(golden.tensors))
    # graph outputs read by name: golden names and output fields
    fields = output_field_map(num_layers(golden))
    named = [o.name for o in graph.output if o.name in golden.tensors or o.name in fields]
    wanted = list(dict.fromkeys([v for v, _ in mapped.values()] + named))
    existing = {o.name for o in graph.output}
    types = _value_types(onnx, proto)
    for v in wanted:
        if v not in existing:
            graph.output.append(types.get(v) or onnx.helper.make_empty_tensor_value_info(v))
    feeds, skipped = _feeds(graph, golden, proto)
    try:
        with _serialised(onnx, proto) as graph:
            session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        values = dict(zip(wanted, session.run(wanted, feeds)))
    except Exception as e:  # onnxruntime's own error types; its message names the node
        message = " ".join(str(e).split())
        raise AdapterError(f"onnxruntime {ort.__version__} cannot run this graph: {message}"
                           + ("; its CPU provider lacks some float64 kernels (Erf, Gelu): run the graph in float32"
                              if "double" in message or "Could not find an implementation" in message else "")) from None
    tensors: dict[str, np.ndarray] = {}
    order = list(golden.tensors)
    for name in sorted(mapped, key=order.index):
        value, heads = mapped[name]
        a = values[value]
        tensors[name] = split_heads(a, n_heads) if heads and a.ndim == 3 else a
    for name in named:
        if name not in tensors:
            tensors[name] = values[name]
    for name in skipped:
        why.setdefault("loss", f"the graph takes no {name}")
    what = f"ONNX graph ({proto.producer_name or 'unknown producer'} {proto.producer_version}) on onnxruntime {ort.__version__}"
    return tensors, why, what


def _value_types(onnx, proto) -> dict:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shape inference is a convenience; ORT infers what it needs
        inferred = proto
    return {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}


_INLINE_LIMIT = 2**31 - 2**20  # bytes: a larger graph reaches onnxruntime as a file (protobuf's 2 GB limit)


@contextlib.contextmanager
def _serialised(onnx, proto):
    """Bytes for onnxruntime; a graph over 2 GB goes through a file with external data, in a
    temporary folder removed when the block ends (onnxruntime has read it by then)."""
    if proto.ByteSize() < _INLINE_LIMIT:
        yield proto.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="refimpl-onnx-", ignore_cleanup_errors=True) as folder:
        path = os.path.join(folder, "model.onnx")
        onnx.save(proto, path, save_as_external_data=True, location="model.onnx.data")
        yield path


_ONNX_TO_NUMPY = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}


def _feeds(graph, golden, proto) -> tuple[dict[str, np.ndarray], list[str]]:
    initializers = {i.name for i in graph.initializer}
    takes = [i for i in graph.input if i.name not in initializers]
    feeds = {}
    for i in takes:
        np_type = _ONNX_TO_NUMPY.get(i.type.tensor_type.elem_type)
        if i.name in golden.inputs:
            feeds[i.name] = np.asarray(golden.inputs[i.name]).astype(np_type or golden.inputs[i.name].dtype)
        elif i.name in DEFAULTS and "input_ids" in golden.inputs:
            feeds[i.name] = np.full(golden.inputs["input_ids"].shape, DEFAULTS[i.name], dtype=np_type or np.int64)
        else:
            raise AdapterError(f"the graph takes an input {i.name!r} that the golden file does not hold "
                               f"(it holds {', '.join(golden.inputs)})")
    skipped = []
    for name, value in golden.inputs.items():
        if name in feeds:
            continue
        if name in LABELS:
            skipped.append(name)
        elif name in DEFAULTS and np.all(np.asarray(value) == DEFAULTS[name]):
            continue
        else:
            raise AdapterError(f"the graph takes no {name!r} input, but the golden's {name} changes the forward pass; "
                               f"export the graph with it as an input")
    return feeds, skipped


# ---------------------------------------------------------------------------------------------
# Exporting a transformers folder with torch.onnx, on the golden's own inputs
# ---------------------------------------------------------------------------------------------


def export_transformers(model, golden, path: str, *, task: str | None = None, dtype: str = "float32",
                        exporter: str = "dynamo", outputs_only: bool = False) -> list[str]:
    """Export transformers' class for the golden's task (a folder or a loaded model) with
    ``torch.onnx.export`` to ``path``, traced on the golden's inputs (static shapes), graph inputs
    named like the golden's inputs and outputs like the model's output fields. -> the output names."""
    from .transformers_torch import load_transformers, torch_inputs

    torch = require("transformers", "torch", extra="adapters-torch")
    if exporter == "dynamo":
        require("onnx", "onnxscript")
    if isinstance(model, (str, os.PathLike)):
        model = load_transformers(os.fspath(model), task or golden.task, dtype)
    names = list(golden.inputs)
    extra = {"use_cache": False} if getattr(model.config, "is_decoder", False) else {}
    if outputs_only:
        extra.update(output_hidden_states=True, output_attentions=True)
    args = tuple(torch_inputs(golden.inputs, next(model.parameters()).dtype)[k] for k in names)
    with torch.no_grad():
        out = model(**dict(zip(names, args)), **extra)
    fields = []
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            fields.append(k)
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            fields += [f"{k}.{i}" for i in range(len(v))]

    class Positional(torch.nn.Module):  # positional inputs in the golden's order, outputs flattened by field
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, *xs):
            o = self.model(**dict(zip(names, xs)), **extra)
            flat = []
            for k, v in o.items():
                flat += list(v) if isinstance(v, tuple) else [v]
            return tuple(flat)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=names, output_names=fields, dynamo=exporter == "dynamo")
        if exporter == "dynamo":
            kwargs.update(optimize=True, verbose=False)
        else:
            kwargs.update(opset_version=17)
        _quietly(lambda: torch.onnx.export(Positional(model).eval(), args, path, **kwargs))
    return fields


def _quietly(fn):
    """Run ``fn`` with the exporter's progress lines (printed to stdout) and logging held back."""
    import contextlib
    import io
    import logging

    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


def run(model, golden, *, dtype: str, task: str, outputs_only: bool = False, exporter: str = "dynamo",
        save: str | None = None) -> Dump:
    """The adapter: ``model`` is a .onnx file (run as it is) or a transformers folder / loaded model
    (exported with torch.onnx first, to ``save`` if given)."""
    require("onnx", "onnxruntime", "onnx")
    notes = []
    exported = not (isinstance(model, (str, os.PathLike)) and os.path.isfile(model))
    if exported and exporter not in ("dynamo", "torchscript"):
        raise AdapterError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    with contextlib.ExitStack() as stack:
        if not exported:
            graph_path = os.fspath(model)
        else:  # to ``save``, or to a temporary folder removed after the run
            folder = None if save else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="refimpl-onnx-", ignore_cleanup_errors=True))
            graph_path = save or os.path.join(folder, "model.onnx")
            export_transformers(model, golden, graph_path, task=task, dtype=dtype, exporter=exporter,
                                outputs_only=outputs_only)
            notes.append(f"exported with torch.onnx ({exporter} exporter)" + (f" to {save}" if save else ""))
        tensors, why, what = run_graph(graph_path, golden, outputs_only=outputs_only)
    reasons = [(name, reason) for name, reason in why.items()]
    floats = sorted({str(a.dtype) for a in tensors.values() if np.asarray(a).dtype.kind == "f"})
    return finish(golden, tensors, reasons, what + f" ({'/'.join(floats)})", floats[0] if len(floats) == 1 else dtype,
                  outputs_only=outputs_only, notes=notes)
