"""The documentation tells the truth: the command-line page's options table is the parser's, its
commands run as written on the shipped checkpoints, the golden workflow runs, docs/golden.md's Python example runs, and every install hint in
the code and the docs can work (refimpl is installed from a checkout, not from the package index).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from refimpl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CLI_PAGE = os.path.join(ROOT, "docs", "cli.md")  # the options table and the command examples
GOLDEN_PAGE = os.path.join(ROOT, "docs", "golden.md")
MODEL_OPTIONS = ("--model", "--dtype", "--backend", "--revision", "--cache-dir")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def section(text: str, heading: str) -> str:
    """The text of a ``## heading`` section, up to the next one."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def options_rows() -> list[str]:
    """docs/cli.md's options table, as the parser defines it (one row per subcommand)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = []
    for name, p in sub.choices.items():
        own, model = [], []
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            if not a.option_strings:
                own.append(f"`{a.metavar or a.dest.upper()}`" + ("..." if a.nargs in ("*", "+") else ""))
                continue
            long = max(a.option_strings, key=len)
            (model if long in MODEL_OPTIONS else own).append(long)
        which = "all" if model == list(MODEL_OPTIONS) else ", ".join(f"`{m}`" for m in model) or "none"
        rows.append(f"| `{name}` | {which} | {', '.join(x if x.startswith('`') else f'`{x}`' for x in own)} |")
    return rows


def test_cli_page_options_table_is_the_parsers():
    text = section(read(CLI_PAGE), "What every command shares")
    table = [line for line in text.splitlines() if re.match(r"\| `[a-z-]+` \|", line)]
    expected = options_rows()
    assert table == expected, "docs/cli.md's options table is stale; the parser gives:\n" + "\n".join(expected)


def run_command(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8")), encoding="utf-8"))
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def shell_lines(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_cli_page_examples_run_on_the_shipped_checkpoints(tmp_path, monkeypatch, capsys):
    """Every command of docs/cli.md's example block, in-process, offline, as written."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "article.txt").write_text("Ada Lovelace was born in London. She lives in Paris now.\n")
    (tmp_path / "questions.txt").write_text("Where was she born?\nWhere does she live?\n")
    (tmp_path / "texts.txt").write_text("a first text\na second text\n")
    block = code_blocks(section(read(CLI_PAGE), "What every command shares"), "bash")[0]
    ran = 0
    for line in shell_lines(block):
        stdin = ""
        if "|" in line.split("#")[0]:
            producer, line = line.split("|", 1)
            stdin = subprocess.run(["bash", "-c", producer], capture_output=True, text=True, check=True).stdout
        argv = shlex.split(line, comments=True)
        assert argv[0] == "refimpl", line
        code, out, err = run_command(argv[1:], stdin, monkeypatch, capsys)
        assert code == 0, (line, err)
        if "--out" in argv:  # embed: the vectors went to the file, the summary to stderr
            assert np.load(tmp_path / "vectors.npy").shape == (2, 16) and "wrote 2 x 16" in err
        else:
            assert out.strip(), line
        ran += 1
    assert ran >= 11


def test_golden_workflow_runs(tmp_path, monkeypatch, capsys):
    """docs/golden.md's first block: refimpl golden, refimpl dump (transformers), refimpl compare."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import dump_transformers_golden

    block = code_blocks(read(GOLDEN_PAGE), "bash")[0]
    for line in shell_lines(block):
        argv = shlex.split(line, comments=True)
        if argv[0] == "python":
            assert argv[1] == "scripts/dump_transformers_golden.py"
            assert dump_transformers_golden.main(argv[2:]) == 0
            capsys.readouterr()
            continue
        code, out, err = run_command(argv[1:], "", monkeypatch, capsys)
        assert code == 0, (line, out, err)
    assert "compared 38 of 38 golden tensors" in out and out.rstrip().endswith("PASS")


def test_golden_md_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_command(["golden", "--model", "tiny", "--text", "Hello world", "--out", "golden.safetensors"],
                               "", monkeypatch, capsys)
    assert code == 0, err
    text = read(os.path.join(ROOT, "docs", "golden.md"))
    example = next(b for b in code_blocks(text, "python") if "capture(" in b and "load_transformers" in b)
    saved = list(sys.path)
    try:
        exec(compile(example, "docs/golden.md", "exec"), {"__name__": "golden_md_example"})
    finally:
        sys.path[:] = saved
    out = capsys.readouterr().out
    assert "compared 38 of 38 golden tensors" in out and out.rstrip().endswith("PASS")


def test_dump_says_what_it_needs_in_one_line(tmp_path):
    """Without torch (README command 1 installs no torch) `refimpl dump` and the old script name the
    extra to install, in one line."""
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no-torch"), "HF_HUB_OFFLINE": "1"}
    golden = subprocess.run([sys.executable, "-m", "refimpl", "golden", "--model", "tiny", "--text", "hi", "--out",
                             "g.safetensors"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert golden.returncode == 0, golden.stderr
    for argv in (["-m", "refimpl", "dump", "--impl", "transformers", "--model", "tiny", "g.safetensors", "--out",
                  "c.safetensors"],
                 [os.path.join(ROOT, "scripts", "dump_transformers_golden.py"), "--model", "tiny", "--golden",
                  "g.safetensors", "--out", "c.safetensors"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env,
                              cwd=tmp_path)
        assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "pip install '.[adapters-torch]' in a checkout" in done.stderr


INSTALL_HINT = re.compile(r"pip install[^\n`\"]*")


def test_every_install_hint_can_work():
    """refimpl is installed from a checkout: a hint may name a PyPI package (cupy-cuda12x, ...) or an
    extra of the checkout ('.[gpu]'), never 'refimpl[...]' from the package index."""
    hints = []
    for folder in ("refimpl", "conversion", "scripts", "benchmarks", "docs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".md", ".sh")):
                    text = read(os.path.join(dirpath, name))
                    hints += [(os.path.join(dirpath, name), h) for h in INSTALL_HINT.findall(text)]
    hints += [(README, h) for h in INSTALL_HINT.findall(read(README))]
    assert hints
    bad = [(p, h) for p, h in hints if re.search(r"refimpl\[|install refimpl\b", h)]
    assert bad == []
    from refimpl.backend import CUPY_INSTALL_HINT

    assert "pip install cupy-cuda12x" in CUPY_INSTALL_HINT and "pip install '.[gpu]'" in CUPY_INSTALL_HINT
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        assert 'gpu = ["cupy-cuda12x' in f.read()  # the wheel the hint names is the extra's


def test_cupy_error_names_a_working_install(monkeypatch):
    import refimpl

    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    model = refimpl.from_pretrained("tiny")
    with pytest.raises(ImportError, match=r"pip install cupy-cuda12x") as e:
        model.to("cupy")
    assert "refimpl[" not in str(e.value)


def test_json_is_json_lines_everywhere(monkeypatch, capsys):
    """Every --json output is one JSON value per line (info, forward, compare included)."""
    for argv in (["info", "--model", "tiny", "--json"], ["forward", "--model", "tiny", "--ids", "0 5 2", "--json"]):
        code, out, err = run_command(argv, "", monkeypatch, capsys)
        assert code == 0, err
        assert out.count("\n") == 1 and isinstance(json.loads(out), dict)
