"""The documentation runs: the walkthrough, and every fenced Python and shell block of README.md and
docs/.

Each page's blocks run in document order in one fresh folder: Python blocks in one namespace (as a
reader pastes them into one session), shell blocks with bash (``set -euo pipefail``), the project's
``refimpl``/``python`` first on PATH and ``HF_HUB_OFFLINE=1`` (nothing may touch the network). The
folder holds the checkpoints the pages name, so the examples run as written:

- ``tiny`` is shipped with refimpl;
- ``path/to/<name>`` are small random checkpoints of the task the name says (sst2, mnli and
  classifier: sequence classification; ner: token classification; squad: question answering;
  swag: multiple choice; causal-lm; hf-folder: masked LM), built by tests/pipeline_checkpoints.py
  with the real RoBERTa tokenizer; ``path/to/efficient_mlm`` is one in the original efficient_mlm
  layout;
- ``checkpoints/model.pt`` is the shipped fairseq pre-LN checkpoint with an ``mnli`` head added,
  and ``hf-folder-with-pytorch_model.bin`` the ``tiny`` model saved as a ``.bin``;
- ``scripts/`` and ``benchmarks/`` are the repository's, as from its root.

A line that is one plain ``refimpl``/``refimpl-convert``/``refimpl-dump`` command runs in this process through the
console script's ``main``, and ``python script.py args`` through ``runpy`` (saving a process start
and the imports each); other lines (pipes, redirections, other programs) run in bash. ``tests/test_cli.py`` checks the installed console scripts themselves.

A block that cannot run here is marked on the line before it with ``<!-- not-run: reason -->``;
the reason is required.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tolerances
from refimpl.hub import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PYTHON = ("python", "py")
SHELL = ("bash", "sh", "shell", "console")
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)(?P<rest>.*)$")
PLACEHOLDERS = {  # path in a page -> the pipeline checkpoint it stands for
    "path/to/hf-folder": "mlm", "path/to/sst2": "cls", "path/to/mnli": "cls", "path/to/classifier": "cls",
    "path/to/ner": "ner", "path/to/squad": "qa", "path/to/swag": "mc", "path/to/causal-lm": "causal",
}
SHELL_TIMEOUT_S = 120


def markdown_files() -> list[str]:
    out = [os.path.join(ROOT, "README.md")]
    for dirpath, dirs, files in os.walk(DOCS):
        dirs[:] = sorted(d for d in dirs if d not in ("hooks", "assets"))
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".md")]
    return out


def blocks(path: str) -> list[dict]:
    """The fenced code blocks of a Markdown file: language, code, line, and not-run reason."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group("indent")), m.group("fence"), m.group("lang").lower()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^ {{0,{indent}}}{re.escape(fence)}\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i].startswith(" " * indent) else lines[i].lstrip())
            i += 1
        i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = NOT_RUN.match(prev)
        out.append({"lang": lang, "code": "\n".join(body), "line": start + 1,
                    "not_run": skip.group(1) if skip else None, "marked": prev.startswith("<!-- not-run")})
    return out


def runnable(path: str) -> list[dict]:
    return [b for b in blocks(path) if b["lang"] in PYTHON + SHELL]


PAGES = [os.path.relpath(p, ROOT) for p in markdown_files() if runnable(p)]


# ---------------------------------------------------------------------------------------------
# The extraction itself
# ---------------------------------------------------------------------------------------------


def test_block_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- not-run: needs the Hub -->\n```bash\nrefimpl fill-mask x\n```\n\n"
        "- a list item:\n\n    ```sh\n    echo indented\n    ```\n\n```text\nnot code\n```\n"
        "<!-- not-run: -->\n```python\ny = 2\n```\n"
    )
    got = [(b["lang"], b["code"], b["not_run"], b["marked"]) for b in blocks(str(page))]
    assert got == [("python", "x = 1", None, False), ("bash", "refimpl fill-mask x", "needs the Hub", True),
                   ("sh", "echo indented", None, False), ("text", "not code", None, False),
                   ("python", "y = 2", None, True)]


def test_plain_commands_run_in_process_and_the_rest_in_bash():
    assert in_process('refimpl fill-mask --model tiny "A <mask>."   # comment') == \
        ["refimpl", "fill-mask", "--model", "tiny", "A <mask>."]
    assert in_process("refimpl-convert a b/ --force") == ["refimpl-convert", "a", "b/", "--force"]
    assert in_process("python scripts/x.py --out y") == ["python", "scripts/x.py", "--out", "y"]
    for line in ("printf 'x\\n' | refimpl classify --model m", "refimpl embed --file t.txt > out.json",
                 "HF_HUB_OFFLINE=1 refimpl fill-mask x", "python -m pytest", "refimpl info --model $M", "# a comment"):
        assert in_process(line) is None, line


def test_every_not_run_marker_gives_a_reason():
    bad = [f"{os.path.relpath(p, ROOT)}:{b['line']}" for p in markdown_files() for b in blocks(p)
           if b["marked"] and b["not_run"] is None]
    assert not bad, f"'<!-- not-run: ... -->' without a reason before: {bad}"


def test_the_snippet_pages_are_found():
    assert "README.md" in PAGES and os.path.join("docs", "cli.md") in PAGES
    n = sum(1 for p in PAGES for b in runnable(os.path.join(ROOT, p)) if b["not_run"] is None)
    assert n >= 10, f"only {n} runnable blocks found: the extraction is broken"


# ---------------------------------------------------------------------------------------------
# The checkpoints the pages name
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def doc_checkpoints(tmp_path_factory):
    """Folder -> path of every checkpoint the pages name (built once a session)."""
    import torch
    from safetensors.numpy import load_file

    import pipeline_checkpoints
    from test_conversion import original_layout

    built = pipeline_checkpoints.get(tmp_path_factory)
    root = tmp_path_factory.mktemp("doc-checkpoints")
    out = {name: built[key][1] for name, key in PLACEHOLDERS.items()}
    out["path/to/efficient_mlm"] = original_layout(built["mlm"][0], root / "efficient_mlm", "safetensors")

    fairseq = root / "checkpoints"
    fairseq.mkdir()
    src = os.path.join(ROOT, "tests", "data", "fairseq-prenorm")
    ck = torch.load(os.path.join(src, "model.pt"), weights_only=False)
    h = ck["model"]["encoder.sentence_encoder.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(19)
    head = {"dense.weight": (h, h), "dense.bias": (h,), "out_proj.weight": (3, h), "out_proj.bias": (3,)}
    for k, shape in head.items():
        ck["model"][f"classification_heads.mnli.{k}"] = torch.randn(*shape, generator=g)
    torch.save(ck, fairseq / "model.pt")
    shutil.copy(os.path.join(src, "dict.txt"), fairseq / "dict.txt")
    out["checkpoints"] = str(fairseq)

    tiny = resolve("tiny")
    binary = root / "hf-folder-with-pytorch_model.bin"
    shutil.copytree(tiny, binary, ignore=shutil.ignore_patterns("model.safetensors"))
    state = {k: torch.from_numpy(np.array(v)) for k, v in load_file(os.path.join(tiny, "model.safetensors")).items()}
    torch.save(state, binary / "pytorch_model.bin")
    out["hf-folder-with-pytorch_model.bin"] = str(binary)

    merges_only = root / "vocab-merges-only"  # judge.md 5.4: RoBERTa's BPE files alone, no tokenizer.json
    merges_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(ROOT, "tests", "data", "roberta-tokenizer", name), merges_only / name)
    out["vocab-merges-only"] = str(merges_only)
    return out


def page_folder(tmp_path, checkpoints: dict) -> str:
    for name, target in checkpoints.items():
        link = tmp_path / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
    for name in ("scripts", "benchmarks"):
        (tmp_path / name).symlink_to(os.path.join(ROOT, name), target_is_directory=True)
    return str(tmp_path)


# ---------------------------------------------------------------------------------------------
# Every block runs
# ---------------------------------------------------------------------------------------------


def run_python(code: str, namespace: dict, where: str) -> None:
    tree = ast.parse(code, where)
    exec(compile(tree, where, "exec"), namespace)


ENTRY_POINTS = {"refimpl": "refimpl.cli", "refimpl-convert": "refimpl_conversion.cli",
                "refimpl-dump": "refimpl_adapters.cli"}  # pyproject's scripts
OPERATORS = set("|&;<>()")


def in_process(line: str) -> list[str] | None:
    """argv of a line that is one plain ``refimpl``/``refimpl-convert``/``refimpl-dump`` command (no pipe,
    redirection, list or substitution), which runs in this process through the console script's own
    ``main``: the same code without a process start per line. Anything else goes to bash."""
    if "$" in line or "`" in line:
        return None
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        argv = list(lexer)
    except ValueError:
        return None
    if any(set(t) <= OPERATORS for t in argv):
        return None
    if argv and (argv[0] in ENTRY_POINTS or (argv[0] == "python" and len(argv) > 1 and argv[1].endswith(".py"))):
        return argv
    return None


def run_in_process(argv: list[str], where: str, monkeypatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "python":  # a script, as `python path/to/script.py args` runs it
                monkeypatch.setattr(sys, "argv", argv[1:])
                monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(argv[1])))
                runpy.run_path(argv[1], run_name="__main__")
                code = 0
            else:
                code = importlib.import_module(ENTRY_POINTS[argv[0]]).main(argv[1:])
        except SystemExit as e:  # argparse's exits, and a script's sys.exit(main())
            code = e.code
    assert code in (0, None), f"{where}: {shlex.join(argv)} exited with {code}\n--- stdout\n{out.getvalue()}\n" \
                              f"--- stderr\n{err.getvalue()}"


def run_bash(code: str, cwd: str, where: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=SHELL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{where} exited with {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"


def offline(monkeypatch) -> None:
    """Nothing may touch the network: HF_HUB_OFFLINE in the environment and in huggingface_hub's
    constants (read once at import), for the Python blocks too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def run_shell(code: str, cwd: str, where: str, monkeypatch) -> None:
    """The block's lines in order: plain refimpl commands in process, runs of other lines in bash."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    pending: list[str] = []
    for line in code.splitlines() + [""]:
        argv = in_process(line) if line.strip() else None
        if argv is None and line.strip():
            pending.append(line)
            continue
        if pending:
            run_bash("\n".join(pending), cwd, where)
            pending = []
        if argv is not None:
            run_in_process(argv, where, monkeypatch)


REQUIRES = {"docs/scale.md": ("pyarrow", "distributed", "threadpoolctl")}  # page -> the extra's modules it runs


@pytest.mark.parametrize("page", PAGES)
def test_every_snippet_runs(page, tmp_path, monkeypatch, doc_checkpoints):
    for module in REQUIRES.get(page, ()):
        pytest.importorskip(module, reason=f"{page} runs with the scale extra: pip install '.[scale]'")
    folder = page_folder(tmp_path, doc_checkpoints)
    monkeypatch.chdir(folder)
    offline(monkeypatch)
    namespace = {"__name__": "__main__"}
    ran = 0
    for b in runnable(os.path.join(ROOT, page)):
        if b["not_run"] is not None:
            continue
        where = f"{page}:{b['line']}"
        if b["lang"] in PYTHON:
            with contextlib.redirect_stdout(io.StringIO()):
                run_python(b["code"], namespace, where)
        else:
            run_shell(b["code"], folder, where, monkeypatch)
        ran += 1
    if ran == 0:
        pytest.skip(f"every block of {page} is marked not-run")


# ---------------------------------------------------------------------------------------------
# The walkthrough
# ---------------------------------------------------------------------------------------------


WALKTHROUGH = os.path.join(DOCS, "walkthrough.py")


def test_walkthrough_runs_and_recomputes_every_traced_tensor(capsys):
    ns = runpy.run_path(WALKTHROUGH, run_name="__main__")
    out = capsys.readouterr().out
    assert ns["checked"] == set(ns["trace"]), "the walkthrough left traced tensors unchecked"
    assert len(ns["trace"]) >= 30 and f"all {len(ns['trace'])} traced tensors recomputed" in out
    # Its tolerance is an entry of the one table, not a number of its own.
    assert ns["TOL"] == tolerances.REORDERED["float64"]


def test_walkthrough_check_catches_a_wrong_equation():
    ns = runpy.run_path(WALKTHROUGH, run_name="__main__")
    trace = ns["trace"]
    wrong = trace["embeddings.position"] + 1e-6  # e.g. BERT-style positions read other rows
    with pytest.raises(AssertionError, match="embeddings.position"):
        ns["check"]("embeddings.position", wrong)
    with pytest.raises(AssertionError, match="shape"):
        ns["check"]("logits", trace["logits"][:, :-1])


def test_walkthrough_cells_are_jupytext_percent_format():
    """The site's renderer splits the script into the same cells as jupytext (when installed)."""
    jupytext = pytest.importorskip("jupytext", reason="jupytext comes with the docs extra: pip install '.[docs]'")
    hooks = runpy.run_path(os.path.join(DOCS, "hooks", "refimpl_docs.py"))
    with open(WALKTHROUGH, encoding="utf-8") as f:
        text = f.read()
    ours = hooks["cells"](text)
    nb = jupytext.reads(text, fmt="py:percent")
    theirs = [(c.cell_type, c.source.strip("\n")) for c in nb.cells if c.source.strip()]
    assert [k for k, _ in ours] == [k for k, _ in theirs]
    assert [t for _, t in ours] == [t for _, t in theirs]
    assert sum(k == "code" for k, _ in ours) >= 8


def test_readme_stays_short():
    """README.md is the front door: what it is, the two commands, an example each, links into the
    site. Everything else lives on the site."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= 150, f"README.md has {n} lines; move detail into docs/ (at most 150)"
