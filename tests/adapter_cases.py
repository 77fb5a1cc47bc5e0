"""Shared by the adapter tests (tests/test_adapters*.py): a tiny checkpoint of a head, built with the
installed transformers, and a refimpl float64 golden written from it on inputs with padding, token
types and labels."""

from __future__ import annotations

import json
import os
import shutil

import refimpl
from conftest import build_hf, save_hf
from refimpl.golden import write_golden
from test_golden import TASKS, make_inputs  # noqa: F401  (TASKS re-exported for the adapter tests)

LM_TASKS = ("masked-lm", "causal-lm")


def golden_case(tmp_path, task: str, *, saved: str | None = None, seed: int = 3, **config):
    """-> (golden, transformers model in float64, folder). ``saved``: the checkpoint's dtype
    (default float64, as built)."""
    hf = build_hf(task, seed, **config)
    folder = save_hf(hf, tmp_path / f"{task}-{saved or 'float64'}", dtype=saved)
    model = refimpl.from_pretrained(folder, task=task, dtype="float64")
    golden = write_golden(model, tmp_path / f"{task}-{saved or 'float64'}.golden.safetensors", **make_inputs(task))
    return golden, hf, folder


def with_config(folder: str, dest, **changes) -> str:
    """A copy of a checkpoint folder with config.json fields changed (a seeded bug)."""
    dest = str(dest)
    shutil.copytree(folder, dest)
    path = os.path.join(dest, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)
    return dest
