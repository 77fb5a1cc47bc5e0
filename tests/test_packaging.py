"""pyproject.toml lists every package folder (setuptools installs only the packages it is told)."""

from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_lists_every_package():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    dirs = setuptools.get("package-dir", {})
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in {"refimpl": "refimpl", **{k: v for k, v in dirs.items()}}.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, base)
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert found == listed, f"packages in the tree but not in pyproject.toml: {sorted(found - listed)}; " \
                            f"listed but absent: {sorted(listed - found)}"
