"""Commands that packages add to ``refimpl`` through the ``refimpl.commands`` entry point group:
``refimpl dump`` (from refimpl_adapters, which refimpl never imports), the same command as the
``refimpl-dump`` console script, and what a broken plugin may and may not break.

None of these tests needs torch: the adapters run here only as far as their one-line errors.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from refimpl import cli


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return dict(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def options(parser: argparse.ArgumentParser) -> list[tuple]:
    return [(tuple(a.option_strings), a.dest, a.required, a.default, tuple(a.choices or ()), a.nargs)
            for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def script(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    assert path, f"the {name} console script is not installed (pip install -e .)"
    return path


def test_dump_comes_from_the_entry_point_group():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=cli.PLUGIN_GROUP)}
    assert eps.get("dump") == "refimpl_adapters.cli:add_command", \
        f"stale install: rerun pip install -e . ({cli.PLUGIN_GROUP}: {eps})"
    full, light = commands(cli.build_parser()), commands(cli.build_parser(heavy=False))
    assert "dump" in full and "dump" not in light


def test_refimpl_dump_and_refimpl_dump_script_take_the_same_options(capsys, monkeypatch):
    from refimpl_adapters.cli import build_parser, main

    monkeypatch.setenv("COLUMNS", "400")  # --help unwrapped
    dump = commands(cli.build_parser())["dump"]
    assert options(dump) == options(build_parser())
    with pytest.raises(SystemExit) as e:
        cli.main(["dump", "--help"])
    assert e.value.code == 0 and "example: refimpl dump --impl transformers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "example: refimpl-dump --impl transformers" in out and "pip install '.[adapters-torch]'" in out


def test_refimpl_dump_errors_are_one_line_with_exit_status_2(tmp_path, capsys, monkeypatch):
    from refimpl_adapters.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["--impl", "transformers", "--model", "tiny", "missing.safetensors", "--out", "c.safetensors"]
    for run, prog in ((lambda a: cli.main(["dump", *a]), "refimpl dump"), (main, "refimpl-dump")):
        assert run(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "missing.safetensors" in err, err
        assert run([*argv[:-1], "c", "--onnx-save", "g.onnx"]) == 2  # read the golden first: the same error
        capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--impl", "jax"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("refimpl-dump: error: argument --impl")


def test_refimpl_dump_console_script():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([script("refimpl-dump"), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and "example: refimpl-dump" in done.stdout, done.stderr
    done = subprocess.run([script("refimpl-dump"), "--version"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and done.stdout.startswith("refimpl-dump (refimpl ")
    done = subprocess.run([script("refimpl"), "dump", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and "example: refimpl dump" in done.stdout, done.stderr


def test_task_commands_never_look_for_plugins(capsys, monkeypatch):
    def no(*args, **kwargs):
        raise AssertionError("a task command looked for plugins")

    monkeypatch.setattr(importlib.metadata, "entry_points", no)
    assert cli.main(["fill-mask", "--model", "tiny", "--json", "Hello <mask>!"]) == 0
    assert capsys.readouterr().out


def test_a_broken_plugin_breaks_only_its_own_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m == "refimpl_adapters" or m.startswith("refimpl_adapters.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "refimpl_adapters", None)  # import refimpl_adapters -> ImportError
    assert cli.main(["golden", "--model", "tiny", "--text", "Hello world", "--out", "g.safetensors"]) == 0
    assert cli.main(["compare", "g.safetensors", "g.safetensors", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["dump", "--impl", "transformers", "--model", "tiny", "g.safetensors", "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refimpl dump: error: the dump command could not be loaded "
                                                   "(refimpl_adapters.cli:add_command, entry point of refimpl: "), err
    assert "ModuleNotFoundError" in err and "reinstall refimpl from its checkout: pip install ." in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "dump" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # the other commands still reject unknown words
        cli.main(["compare", "g.safetensors", "g.safetensors", "--no-such-option"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def _add_hello(sub) -> None:
    p = sub.add_parser("hello", help="say hello")
    p.add_argument("--name", default="world")
    p.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)


def _add_golden(sub) -> None:
    raise AssertionError("a plugin named like a command of refimpl's was loaded")


def _add_broken(sub) -> None:
    sub.add_parser("half")
    raise RuntimeError("half-way")


def test_plugins_of_other_packages(capsys, monkeypatch):
    group = cli.PLUGIN_GROUP
    eps = importlib.metadata.EntryPoints([
        importlib.metadata.EntryPoint("hello", f"{__name__}:_add_hello", group),
        importlib.metadata.EntryPoint("golden", f"{__name__}:_add_golden", group),  # refimpl's own name wins
        importlib.metadata.EntryPoint("missing", "no_such_module_anywhere:add", group),
        importlib.metadata.EntryPoint("half", f"{__name__}:_add_broken", group),
    ])
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps.select(group=group))
    assert cli.main(["hello", "--name", "plugin"]) == 0 and capsys.readouterr().out == "hello plugin\n"
    assert "golden" in commands(cli.build_parser())
    assert cli.main(["missing", "--any", "words"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the missing command could not be loaded (no_such_module_anywhere:add" in err
    assert "No module named 'no_such_module_anywhere'" in err and "reinstall the package that provides it" in err
    assert cli.main(["half", "x"]) == 2  # it added its command before failing: that command fails
    assert "the half command could not be loaded" in capsys.readouterr().err
    assert cli.main(["info", "--model", "tiny"]) == 0
