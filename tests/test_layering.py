"""The architecture's rules, checked on the source with ``ast`` (no import is executed).

1. ``refimpl`` never imports ``refimpl_conversion`` (the ``conversion/`` folder): conversion builds
   on refimpl, never the reverse.
2. No import cycles between the modules of ``refimpl``, ``refimpl_conversion`` and
   ``refimpl_adapters`` (imports inside functions count: a lazy import is still a dependency).
3. No private name (``_x``) of one module is used by another, whether imported
   (``from m import _x``) or reached through the module (``m._x``).
4. Command-line code (``argparse``) lives only in the command-line modules.
5. The reference math modules never import the fast path (Numba kernels, scheduling), so that a
   reader of the reference meets the math alone and the fast path can only be held to it by tests.
6. ``refimpl`` and ``refimpl_conversion`` never import ``refimpl_adapters`` (the ``adapters/``
   folder): the adapters build on refimpl, which reaches ``refimpl dump`` only through the
   ``refimpl.commands`` entry point group.
7. ``refimpl`` and ``refimpl_conversion`` never import a framework (torch, transformers, jax, flax,
   tensorflow, onnx, onnxruntime): torch and transformers are test-only oracles, and the other
   implementations run only in ``refimpl_adapters``. Both ``import x`` / ``from x import y`` and a
   call of an import function (``importlib.import_module``, ``__import__``, ``find_spec``, a
   ``require(...)``-style helper: any function whose name contains "import", or ``require``) with
   a string naming one count.

``violations()`` is also run on planted examples below, so a rule that stopped matching anything
would fail here too. The last test checks rule 7 at run time as well: refimpl's everyday paths run
with the frameworks made unimportable.
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# installed package name -> folder in the repository
PACKAGES = {"refimpl": "refimpl", "refimpl_conversion": "conversion", "refimpl_adapters": "adapters"}
CLI_MODULES = ("refimpl.cli", "refimpl_conversion.cli", "refimpl_adapters.cli")
CORE = ("refimpl", "refimpl_conversion")  # the packages that run without any framework (rules 6 and 7)
FRAMEWORKS = ("torch", "transformers", "jax", "flax", "tensorflow", "onnx", "onnxruntime")
# The reference: the math a learner reads. The fast path and the scheduling must stay out of it.
REFERENCE = ("refimpl.ops", "refimpl.attention", "refimpl.encoder", "refimpl.heads",
             "refimpl.losses", "refimpl.tasks", "refimpl.params", "refimpl.config", "refimpl.tracing",
             "refimpl.cache", "refimpl.backward")
FAST = ("refimpl.fast", "refimpl.kernels", "refimpl.split")


def _modules(packages=PACKAGES, root=ROOT) -> dict[str, str]:
    """Module name -> source text for every ``.py`` file of the packages."""
    out = {}
    for name, folder in packages.items():
        base = os.path.join(root, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                mod = name if rel == "__init__" else f"{name}.{rel.removesuffix('.__init__')}"
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    out[mod] = fh.read()
    return out


def _is_package(mod: str, sources: dict) -> bool:
    return any(m.startswith(mod + ".") for m in sources)


def _resolve(mod: str, node: ast.ImportFrom, sources: dict) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``mod``)."""
    if not node.level:
        return node.module or ""
    parts = mod.split(".") if _is_package(mod, sources) else mod.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _imports(mod: str, tree: ast.AST, sources: dict):
    """Yield ``(imported module, names taken from it or None, line)`` for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(mod, node, sources)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in sources:  # ``from . import tasks``: the submodule itself
                    yield sub, None, node.lineno
                else:
                    yield base, a.name, node.lineno


def _owner(name: str, sources: dict) -> str | None:
    """The module of ours that ``name`` (a dotted module path) is, or lies in."""
    while name:
        if name in sources:
            return name
        name = name.rpartition(".")[0]
    return None


def _named_imports(tree: ast.AST):
    """Yield ``(module named by a string, line)`` for every call of an import function with string
    arguments: ``importlib.import_module("torch")``, ``__import__("jax")``,
    ``require("transformers", "torch")``, ``find_spec("onnx")``, ..."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if "import" not in name.lower() and name not in ("require", "find_spec"):
            continue
        for arg in node.args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value, node.lineno


def violations(sources: dict) -> list[str]:
    found = []
    graph = defaultdict(set)
    for mod, text in sorted(sources.items()):
        tree = ast.parse(text)
        top = mod.split(".")[0]
        module_aliases = {}  # local name -> our module it is bound to
        for named, line in _named_imports(tree):
            if top in CORE and named.split(".")[0] in FRAMEWORKS:
                found.append(f"rule 7: {mod}:{line} imports {named} by name ({top} never imports a framework)")
            if top in CORE and named.split(".")[0] == "refimpl_adapters":
                found.append(f"rule 6: {mod}:{line} imports {named} by name ({top} never imports the adapters)")
        for target, names, line in _imports(mod, tree, sources):
            where = f"{mod}:{line}"
            if top == "refimpl" and target.split(".")[0] in ("refimpl_conversion", "conversion"):
                found.append(f"rule 1: {where} imports {target} (refimpl never imports conversion)")
            if top in CORE and target.split(".")[0] == "refimpl_adapters":
                found.append(f"rule 6: {where} imports {target} ({top} never imports the adapters)")
            if top in CORE and target.split(".")[0] in FRAMEWORKS:
                found.append(f"rule 7: {where} imports {target} ({top} never imports a framework)")
            if target.split(".")[0] == "argparse" and not mod.startswith(CLI_MODULES):
                found.append(f"rule 4: {where} imports argparse outside the command-line modules")
            own = _owner(target, sources)
            if own is None:
                continue
            if own != mod:
                graph[mod].add(own)
            if names is not None and names.startswith("_") and not names.startswith("__") and own != mod:
                found.append(f"rule 3: {where} imports the private name {names} from {own}")
            if mod.startswith(REFERENCE) and own.startswith(FAST):
                found.append(f"rule 5: {where} (reference) imports the fast path {own}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node, sources)
                for a in node.names:
                    if f"{base}.{a.name}" in sources:
                        module_aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in sources:
                        module_aliases[(a.asname or a.name).split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in module_aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and module_aliases[node.value.id] != mod):
                found.append(f"rule 3: {mod}:{node.lineno} uses the private name "
                             f"{module_aliases[node.value.id]}.{node.attr}")
    # rule 2: cycles (a depth-first search over the module graph; a package's own __init__
    # importing its submodules, and those importing siblings, is the usual package shape, so a
    # package is not counted as depending on its submodules)
    def deps(m):
        return {d for d in graph[m] if not d.startswith(m + ".")}

    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                found.append("rule 2: import cycle " + " -> ".join(cycle))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(sources):
        if m not in state:
            visit(m)
    return found


def test_the_packages_keep_the_layering_rules():
    sources = _modules()
    assert {"refimpl", "refimpl_conversion.cli", "refimpl_adapters.cli"} <= set(sources)  # the walk found the packages
    problems = violations(sources)
    assert not problems, "\n".join(problems)


def test_each_rule_catches_a_planted_violation():
    """The checker on a small planted tree: every rule must fire where it is broken."""
    planted = {
        "refimpl": "",
        "refimpl.ops": "from .kernels import fast_gelu\n",  # rule 5
        "refimpl.kernels": "import numpy\n",
        "refimpl.model": "from refimpl_conversion.exporter import export\nfrom .golden import x\n",  # rule 1, cycle
        "refimpl.golden": "from . import model\nimport argparse\n",  # rule 2 (cycle), rule 4
        "refimpl.loading": "from .losses import _first\nfrom . import losses\nlosses._other\n",  # rule 3 twice
        "refimpl.losses": "def _first(): pass\n",
        "refimpl.cli": "import argparse\n",  # allowed
        "refimpl.hub": "import importlib\nimportlib.import_module('refimpl_adapters.cli')\n",  # rule 6
        "refimpl.backend": "def f():\n    import torch.nn\n",  # rule 7 (a lazy import)
        "refimpl.pipelines": "import importlib\nimportlib.import_module('transformers')\n__import__('jax')\n"
                             "require('adapter', 'onnxruntime')\n",  # rule 7 three times
        "refimpl.torch_pickle": "marker('torch.Tensor')\n",  # allowed: a string, not an import
        "refimpl_conversion": "",
        "refimpl_conversion.exporter": "from refimpl.loading import params_from_state_dict\n",  # allowed
        "refimpl_conversion.hf": "from refimpl_adapters import dump\nfrom flax import linen\n",  # rules 6 and 7
        "refimpl_adapters": "from refimpl.golden import read_golden\n",  # allowed
        "refimpl_adapters.transformers_torch": "def run():\n    import torch\n",  # allowed: the adapters may
        "refimpl_adapters.cli": "import argparse\nfrom . import _private\n",  # allowed; rule 3
    }
    problems = violations(planted)
    text = "\n".join(problems)
    assert "rule 1: refimpl.model:1 imports refimpl_conversion.export" in text
    assert any(p.startswith("rule 2: import cycle") and "refimpl.golden" in p and "refimpl.model" in p for p in problems)
    assert "rule 3: refimpl.loading:1 imports the private name _first from refimpl.losses" in text
    assert "rule 3: refimpl.loading:3 uses the private name refimpl.losses._other" in text
    assert "rule 4: refimpl.golden:2 imports argparse" in text
    assert "rule 5: refimpl.ops:1 (reference) imports the fast path refimpl.kernels" in text
    assert "rule 6: refimpl.hub:2 imports refimpl_adapters.cli by name" in text
    assert "rule 6: refimpl_conversion.hf:1 imports refimpl_adapters (refimpl_conversion never" in text
    assert "rule 7: refimpl.backend:2 imports torch.nn (refimpl never imports a framework)" in text
    assert "rule 7: refimpl.pipelines:2 imports transformers by name" in text
    assert "rule 7: refimpl.pipelines:3 imports jax by name" in text
    assert "rule 7: refimpl.pipelines:4 imports onnxruntime by name" in text
    assert "rule 7: refimpl_conversion.hf:2 imports flax" in text
    assert "rule 3: refimpl_adapters.cli:2 imports the private name _private from refimpl_adapters" in text
    allowed = ("refimpl.cli:", "refimpl_conversion.exporter:", "refimpl.torch_pickle:", "refimpl_adapters:",
               "refimpl_adapters.transformers_torch:")
    assert not any(p.split(": ")[1].startswith(allowed) for p in problems)
    assert len(problems) == 14, text


# The reference path of a masked-LM forward, as a reader follows it from the task function (input
# validation aside, in refimpl/inputs.py): every function and record it reaches, per module.
MASKED_LM_PATH = {
    "refimpl.tasks": ["masked_lm", "encoder_forward", "extras"],
    "refimpl.encoder": ["lookup", "embed", "feed_forward_block", "LayerOutput", "transformer_layer",
                        "EncoderOutput", "encode"],
    "refimpl.attention": ["split_heads", "merge_heads", "scaled_dot_product_attention", "attention_block",
                          "keys_values"],
    "refimpl.heads": ["lm_head"],
    "refimpl.losses": ["cross_entropy", "first_flagged"],
    "refimpl.ops": ["linear", "layer_norm", "softmax", "log_softmax", "gelu", "activation"],
}


def test_the_reference_forward_reads_in_one_sitting():
    """A masked-LM forward on the reference path reads in at most ~350 lines (docstrings and
    comments included) across at most 6 modules, and each listed function calls no function of
    refimpl outside the list (so the count cannot silently leave part of the path out)."""
    sources = _modules()
    listed = {(m, n) for m, names in MASKED_LM_PATH.items() for n in names}
    total = 0
    for mod, names in MASKED_LM_PATH.items():
        tree = ast.parse(sources[mod])
        defs = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        imported = {}  # local name -> (our module, name)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, node, sources)
                for a in node.names:
                    imported[a.asname or a.name] = (base, a.name)
        for name in names:
            node = defs[name]
            total += node.end_lineno - node.lineno + 1
            for call in ast.walk(node):
                if isinstance(call, ast.Call):
                    f = call.func
                    target = None
                    if isinstance(f, ast.Name) and f.id in defs:
                        target = (mod, f.id)
                    elif isinstance(f, ast.Name) and f.id in imported:
                        target = imported[f.id]
                    elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in imported:
                        base, sub = imported[f.value.id]
                        target = (f"{base}.{sub}", f.attr)
                    if target and target[0] in MASKED_LM_PATH and target not in listed:
                        raise AssertionError(f"{mod}.{name} calls {target[0]}.{target[1]}, which the count leaves out")
    assert len(MASKED_LM_PATH) <= 6
    assert total <= 350, f"the masked-LM reference path is {total} lines"


# ---------------------------------------------------------------------------------------------
# Rule 7 at run time
# ---------------------------------------------------------------------------------------------

# Run in a fresh interpreter: a finder first on sys.meta_path makes every framework unimportable
# (as where none is installed) and records each attempt made from refimpl's or conversion's own
# code, even one that caught the ImportError.
WITHOUT_FRAMEWORKS = r'''
import importlib.abc, importlib.util, json, os, sys, tempfile

BLOCKED = set(sys.argv[1].split(","))
# where refimpl and refimpl_conversion are imported from (a checkout or an installed copy)
OURS = tuple(os.path.dirname(importlib.util.find_spec(p).origin) + os.sep for p in ("refimpl", "refimpl_conversion"))
attempts = []


class NoFrameworks(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in BLOCKED:
            return None
        frame = sys._getframe(1)
        while frame and (frame.f_code.co_filename.startswith("<frozen") or "importlib" in frame.f_code.co_filename):
            frame = frame.f_back  # the import machinery: the importer is the first frame outside it
        if frame and frame.f_code.co_filename.startswith(OURS):
            attempts.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno}")
        raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by the test)", name=name)


sys.meta_path.insert(0, NoFrameworks())

import numpy as np

import refimpl
from refimpl.cli import main
from refimpl.pipelines import FillMask

model = refimpl.from_pretrained("tiny")
out = model(input_ids=[[0, 31414, 232, 2]])
assert out.logits.shape[:2] == (1, 4) and np.isfinite(out.logits).all()
assert len(FillMask("tiny")("Hello <mask>!")) == 5
work = tempfile.mkdtemp()
golden = os.path.join(work, "golden.safetensors")
assert main(["fill-mask", "--model", "tiny", "Hello <mask>"]) == 0
assert main(["golden", "--model", "tiny", "--text", "Hello world", "--out", golden]) == 0
assert main(["compare", golden, golden, "--quiet"]) == 0
# the adapters load (refimpl dump is a plugin command) and fail in one line when their framework is absent
assert main(["dump", "--impl", "transformers", "--model", "tiny", golden, "--out", os.path.join(work, "c")]) == 2

import refimpl_conversion
from refimpl_conversion.cli import main as convert

assert convert(["tiny", os.path.join(work, "converted")]) == 0
print(json.dumps({"attempts": attempts, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
'''


def test_refimpl_and_conversion_run_without_any_framework(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_FRAMEWORKS, ",".join(FRAMEWORKS)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pip install '.[adapters-torch]'" in done.stderr  # refimpl dump's one line: the adapter ran and said why
    report = json.loads(done.stdout.splitlines()[-1])
    assert report == {"attempts": [], "loaded": []}, report
