"""pyproject.toml lists every package folder (setuptools installs only the packages it is told), and
every console script and entry point it declares names a function of one of those packages."""

from __future__ import annotations

import importlib
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_pyproject_lists_every_package():
    setuptools = pyproject()["tool"]["setuptools"]
    dirs = setuptools.get("package-dir", {})
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in {"refimpl": "refimpl", **{k: v for k, v in dirs.items()}}.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, base)
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert {"refimpl", "refimpl.cli", "refimpl_conversion", "refimpl_adapters"} <= found  # the walk saw every folder
    assert dirs == {"refimpl_conversion": "conversion", "refimpl_adapters": "adapters"}
    data = {"refimpl.data"}  # no code: the shipped checkpoints, package data that setuptools wants listed
    assert all(os.path.isdir(os.path.join(ROOT, *name.split("."))) for name in data)
    assert found | data == listed, f"packages in the tree but not in pyproject.toml: {sorted(found - listed)}; " \
                                   f"listed but absent: {sorted(listed - found - data)}"


def test_every_script_and_entry_point_names_a_function_of_a_listed_package():
    project = pyproject()["project"]
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    targets = dict(project["scripts"])
    for group, eps in project.get("entry-points", {}).items():
        targets.update({f"{group}: {name}": value for name, value in eps.items()})
    assert targets["refimpl-dump"] == "refimpl_adapters.cli:main"
    assert targets["refimpl.commands: dump"] == "refimpl_adapters.cli:add_command"
    for name, value in targets.items():
        module, _, attr = value.partition(":")
        assert module.rpartition(".")[0] in listed or module in listed, f"{name}: {module} is in no listed package"
        assert callable(getattr(importlib.import_module(module), attr)), f"{name}: {value} is not a function"
