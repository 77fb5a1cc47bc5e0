"""MkDocs hooks: the pages pull what they show from the code at build time, so they cannot drift.

Markers, each alone on a line of a Markdown page (outside code blocks), are replaced before the
page is rendered:

    ::: source refimpl.ops.layer_norm      the source of a function or class, with its file and line
    ::: cli refimpl                        the --help of a command line and of each of its subcommands
    ::: file tests/tolerances.py           a whole file of the repository, as a code block
    ::: modules refimpl                    a table of a package's modules and their first docstring line
    ::: bench benchmarks/results/x.json    the table of one benchmarks/bench.py --json run
    ::: tolerances refimpl.tolerances      every entry of the tolerance table: bounds, kind and reason

A name, command or file that does not exist fails the build (one error listing every such marker
of the site), so a renamed function cannot leave a page behind.

The walkthrough, ``docs/walkthrough.py`` (jupytext's percent format), is executed cell by cell at
build time and rendered as the page ``walkthrough.md`` with every cell's output under it; an
exception in it fails the build.

(``::: name`` without a keyword is mkdocstrings' API documentation, rendered from docstrings.)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import logging
import os
import re
import sys
import textwrap
import traceback

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.refimpl_docs")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
MARKER = re.compile(r"^::: (source|cli|file|modules|bench|tolerances) +(\S+) *$", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
if ROOT not in sys.path:  # document this tree's refimpl, also where another copy is installed
    sys.path.insert(0, ROOT)
CLI_PARSERS = {"refimpl": "refimpl.cli", "refimpl-convert": "refimpl_conversion.cli", "refimpl-dump": "refimpl_adapters.cli"}  # command -> module with build_parser()
HELP_WIDTH = "100"  # argparse wraps --help to $COLUMNS; fixed so the page does not depend on the terminal
WALKTHROUGH = "walkthrough.py"


# ---------------------------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------------------------


def markers(markdown: str):
    """(kind, argument, match) for every marker outside fenced code blocks."""
    fenced = [m.span() for m in FENCE.finditer(markdown)]
    for m in MARKER.finditer(markdown):
        if not any(a <= m.start() < b for a, b in fenced):
            yield m.group(1), m.group(2), m


def resolve(dotted: str):
    """The object a dotted name refers to: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise LookupError(f"{'.'.join(parts[:i])} has no attribute {'.'.join(parts[i:])!r}")
            obj = getattr(obj, attr)
        return obj
    raise LookupError(f"no module {parts[0]!r} can be imported")


def repo_path(path: str) -> str:
    return os.path.relpath(os.path.abspath(path), ROOT).replace(os.sep, "/")


def source_path(obj) -> str:
    """The repository path of an object's file (``conversion/x.py`` for ``refimpl_conversion.x``),
    also when the package was imported from an installed copy rather than this tree."""
    top = obj.__module__.split(".")[0]
    package_dir = os.path.dirname(importlib.import_module(top).__file__)
    rel = os.path.relpath(inspect.getsourcefile(obj), package_dir).replace(os.sep, "/")
    return f"{PACKAGE_FOLDERS.get(top, top)}/{rel}"


def source_block(dotted: str) -> str:
    obj = inspect.unwrap(resolve(dotted))
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        raise LookupError(f"{dotted} is a {type(obj).__name__}, not a function or class")
    lines, start = inspect.getsourcelines(obj)
    path = source_path(obj)
    code = textwrap.dedent("".join(lines)).rstrip("\n")
    title = f"{path}, line {start}: {obj.__qualname__}"
    return f'```python title="{title}" linenums="{start}"\n{code}\n```'


def parser_of(command: str) -> argparse.ArgumentParser:
    if command not in CLI_PARSERS:
        raise LookupError(f"unknown command {command!r}; known: {', '.join(CLI_PARSERS)}")
    return importlib.import_module(CLI_PARSERS[command]).build_parser()


def help_text(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    # argparse has no public accessor for the subparsers; its action object holds them.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_block(command: str) -> str:
    parser = parser_of(command)
    out = [f"```text\n$ {command} --help\n{help_text(parser)}\n```"]
    for name, sub in subcommands(parser).items():
        out.append(f"### {command} {name}\n\n```text\n$ {command} {name} --help\n{help_text(sub)}\n```")
    return "\n\n".join(out)


def file_block(path: str) -> str:
    full = os.path.join(ROOT, path)
    if os.path.commonpath([ROOT, os.path.abspath(full)]) != ROOT or not os.path.isfile(full):
        raise LookupError(f"no file {path!r} in the repository")
    with open(full, encoding="utf-8") as f:
        text = f.read().rstrip("\n")
    lang = "python" if path.endswith(".py") else "text"
    return f'```{lang} title="{path}" linenums="1"\n{text}\n```'


PACKAGE_FOLDERS = {"refimpl": "refimpl", "refimpl_conversion": "conversion", "refimpl_adapters": "adapters"}


def modules_block(package: str) -> str:
    if package not in PACKAGE_FOLDERS:
        raise LookupError(f"unknown package {package!r}; known: {', '.join(PACKAGE_FOLDERS)}")
    base = os.path.join(ROOT, PACKAGE_FOLDERS[package])
    rows = []
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, base)[:-3].replace(os.sep, ".")
            mod = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
            with open(full, encoding="utf-8") as fh:
                doc = ast.get_docstring(ast.parse(fh.read())) or ""
            first = " ".join(doc.strip().split("\n\n")[0].split()) if doc else "(no docstring)"
            rows.append((mod, repo_path(full), first.replace("|", "\\|")))
    rows.sort()
    table = ["| module | file | what it holds (its docstring's first paragraph) |", "|---|---|---|"]
    table += [f"| `{m}` | `{p}` | {d} |" for m, p, d in rows]
    return "\n".join(table)


def bench_block(path: str) -> str:
    """A benchmarks/bench.py --json file as a table: ratios of medians (lower is faster for refimpl)."""
    import json

    full = os.path.join(ROOT, path)
    if not path.startswith("benchmarks/results/") or not os.path.isfile(full):
        raise LookupError(f"no benchmark result {path!r} (expected under benchmarks/results/)")
    with open(full, encoding="utf-8") as f:
        run = json.load(f)
    has_ort = all("ort" in r["median_s"] for r in run["results"])
    head = ["batch x length", "refimpl numba / transformers eager", "/ transformers sdpa"]
    head += ["/ onnxruntime"] if has_ort else []
    head += ["refimpl numpy / eager", "achieved GFLOP/s", "GEMM GFLOP/s, same shapes", "share of GEMM throughput",
             "the GEMMs alone / eager"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in run["results"]:
        t = r["median_s"]
        cells = [f"{r['shape'][0]}x{r['shape'][1]}", f"{t['numba'] / t['eager']:.2f}", f"{t['numba'] / t['sdpa']:.2f}"]
        cells += [f"{t['numba'] / t['ort']:.2f}"] if has_ort else []
        cells += [f"{t['numpy'] / t['eager']:.2f}", f"{r['gflops']:.0f}", f"{r['gemm_gflops']:.0f}",
                  f"{100 * r['share_of_gemm']:.0f}%", f"{t['gemm'] / t['eager']:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    caption = (f"`{path}`: {run['config']} config, {run['dtype']}; machine as recorded: {run['machine']}; "
               f"onnxruntime: {run['onnxruntime']}.")
    return caption + "\n\n" + "\n".join(rows)


def tolerances_block(module: str) -> str:
    """A table of every Tolerance a module defines (alone or in a dict of them), in source order."""
    mod = importlib.import_module(module)
    kind = getattr(mod, "Tolerance", None)
    if kind is None:
        raise LookupError(f"{module} defines no Tolerance class")
    rows = []
    for name, value in vars(mod).items():
        entries = [(name, value)] if isinstance(value, kind) else []
        if isinstance(value, dict):
            entries = [(f'{name}["{k}"]', v) for k, v in value.items() if isinstance(v, kind)]
        for label, t in entries:
            bounds = ", ".join(f"{d} `{b:g}`" for d, b in t.bounds.items())
            rows.append(f"| `{label}` | {t.kind} | {bounds} | {t.why.replace('|', '&#124;')} |")
    if not rows:
        raise LookupError(f"{module} defines no tolerance entries")
    return "\n".join(["| entry | measure | bound | why |", "|---|---|---|---|", *rows])


RENDER = {"source": source_block, "cli": cli_block, "file": file_block, "modules": modules_block,
          "bench": bench_block, "tolerances": tolerances_block}


def expand(markdown: str) -> str:
    out, last = [], 0
    for kind, arg, m in markers(markdown):
        out.append(markdown[last:m.start()])
        out.append(RENDER[kind](arg))
        last = m.end()
    out.append(markdown[last:])
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# The walkthrough: percent-format cells, executed
# ---------------------------------------------------------------------------------------------

CELL = re.compile(r"^# %%(.*)$")


def cells(source: str) -> list[tuple[str, str]]:
    """[(kind, text)] with kind "markdown" or "code", as jupytext reads the percent format: a line
    ``# %%`` starts a code cell, ``# %% [markdown]`` a Markdown cell whose lines are comments."""
    out: list[tuple[str, list[str]]] = []
    kind, lines = None, []
    for line in source.splitlines():
        m = CELL.match(line)
        if m:
            if kind is not None:
                out.append((kind, lines))
            kind, lines = ("markdown" if "[markdown]" in m.group(1) else "code"), []
        elif kind is not None:
            lines.append(line)
    if kind is not None:
        out.append((kind, lines))
    result = []
    for kind, lines in out:
        if kind == "markdown":
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines]
        text = "\n".join(lines).strip("\n")
        if text:
            result.append((kind, text))
    return result


def run_cell(code: str, namespace: dict, filename: str) -> str:
    """Execute one code cell; its printed output, then the repr of a final bare expression (as a
    notebook shows it)."""
    tree = ast.parse(code, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
            if value is not None:
                print(repr(value))
    return buf.getvalue().rstrip("\n")


def render_walkthrough(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        source = f.read()
    namespace = {"__name__": "__main__", "__file__": path}
    parts = []
    for i, (kind, text) in enumerate(cells(source)):
        if kind == "markdown":
            parts.append(text)
            continue
        try:
            output = run_cell(text, namespace, f"{WALKTHROUGH} (cell {i})")
        except Exception:
            raise PluginError(f"docs/{WALKTHROUGH} failed in cell {i}:\n{traceback.format_exc()}") from None
        parts.append(f"```python\n{text}\n```")
        if output:
            parts.append(f'```text title="output"\n{output}\n```')
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# MkDocs events
# ---------------------------------------------------------------------------------------------


def on_files(files, config):
    """Check every marker of the site first (one error naming all that are broken), then add the
    executed walkthrough as a page."""
    broken = []
    for f in files.documentation_pages():
        with open(f.abs_src_path, encoding="utf-8") as fh:
            text = fh.read()
        for kind, arg, m in markers(text):
            try:
                RENDER[kind](arg)
            except (LookupError, OSError, TypeError, KeyError, ValueError) as e:
                line = text.count("\n", 0, m.start()) + 1
                broken.append(f"  docs/{f.src_uri}:{line}: ::: {kind} {arg}: {e}")
    if broken:
        raise PluginError("markers that name nothing in the code:\n" + "\n".join(broken))
    script = os.path.join(config["docs_dir"], WALKTHROUGH)
    if os.path.exists(script):
        files.append(File.generated(config, "walkthrough.md", content=render_walkthrough(script)))
    return files


def on_page_markdown(markdown, page, config, files):
    return expand(markdown)
