"""Every CLI turns every project error into one line and exit status 2; a real bug keeps its traceback.

Hostile inputs reach the command lines here as files (golden files whose metadata has the wrong
types, fairseq checkpoints whose args have the wrong types, one of them a shared-list DAG whose
repr has 2^40 elements) and as arguments (a 23-digit token id). Each file case runs in a child
process under a memory cap and a timeout (tests/hostile_harness.py): at most 2 s of CPU and 256 MiB
beyond the file's own bytes.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from hostile_harness import Cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAIRSEQ = os.path.join(ROOT, "tests", "data", "fairseq-prenorm")


def one_line_exit_2(argv: list[str], prog: str, main: str = "from refimpl.cli import main") -> str:
    """Child code: run a CLI in-process; it must print one line starting with ``prog: error:`` and return 2."""
    return (
        "import contextlib, io\n"
        f"{main}\n"
        "err = io.StringIO()\n"
        "with contextlib.redirect_stderr(err):\n"
        f"    rc = main({argv!r})\n"
        "text = err.getvalue()\n"
        "assert rc == 2, (rc, text[-500:])\n"
        f"assert text.count(chr(10)) == 1 and text.startswith({prog + ': error:'!r}), text[-500:]\n"
        "assert len(text) < 2000, len(text)\n"
    )


def golden_with(d, **metadata) -> dict:
    from safetensors.numpy import save_file

    path = d / "golden.safetensors"
    meta = {"format": "refimpl-golden", "format_version": "1", "dtype": "float64", "task": "masked-lm",
            "order": '["logits"]', "inputs": "[]", "config": "{}", **metadata}
    save_file({"logits": np.zeros((1, 2, 3))}, str(path), metadata=meta)
    p = str(path)
    return {"path": p, "mapped": os.path.getsize(path),
            "code": one_line_exit_2(["compare", p, p], "refimpl compare")}


def fairseq_with(d, **args) -> dict:
    """The fairseq fixture re-saved with some model args replaced (torch: the test-only oracle)."""
    torch = pytest.importorskip("torch")
    ck = torch.load(os.path.join(FAIRSEQ, "model.pt"), weights_only=False)
    for name, value in args.items():
        setattr(ck["cfg"]["model"], name, value)
    torch.save(ck, d / "model.pt")
    shutil.copyfile(os.path.join(FAIRSEQ, "dict.txt"), d / "dict.txt")
    p = str(d / "model.pt")
    return {"path": p, "mapped": os.path.getsize(p),
            "code": one_line_exit_2([p, str(d / "out")], "refimpl-convert",
                                    "from refimpl_conversion.cli import main")}


def shared_list_dag(depth: int = 40) -> list:
    node: list = ["x"]
    for _ in range(depth):
        node = [node, node]
    return node


case = Cases(None)  # every case: the command itself returns 2 after one line (checked inside the case)
CASES = {
    "golden-order-not-a-list": lambda d: golden_with(d, order='{"logits": 1}'),
    "golden-order-not-json": lambda d: golden_with(d, order="[logits"),
    "golden-order-of-numbers": lambda d: golden_with(d, order="[1, 2]"),
    "golden-config-a-list": lambda d: golden_with(d, config="[1]"),
    "golden-inputs-an-object": lambda d: golden_with(d, inputs='{"input_ids": 1}'),
    "golden-dtype-unknown": lambda d: golden_with(d, dtype="float8"),
    "golden-tokenizer-100k-deep": lambda d: golden_with(d, tokenizer="[" * 100_000 + "]" * 100_000),
    "forward-23-digit-id": lambda d: {"code": one_line_exit_2(
        ["forward", "--model", "tiny", "--ids", "0 12345678901234567890123 2"], "refimpl forward")},
    "fairseq-heads-a-string": lambda d: fairseq_with(d, encoder_attention_heads="four"),
    "fairseq-dim-a-list": lambda d: fairseq_with(d, encoder_embed_dim=[16]),
    "fairseq-activation-a-list": lambda d: fairseq_with(d, activation_fn=["gelu"]),
    "fairseq-dropout-a-dict": lambda d: fairseq_with(d, dropout={"p": 0.1}),
    "fairseq-flag-a-list": lambda d: fairseq_with(d, encoder_normalize_before=[True]),
    "fairseq-layers-to-keep-a-dag": lambda d: fairseq_with(d, encoder_layers_to_keep=shared_list_dag()),
}


for _name, _build in CASES.items():
    case(_name)(_build)


@pytest.mark.parametrize("name", case.names())
def test_hostile_input_is_one_line_and_exit_2(name, hostile_outcomes):  # (the fixture: tests/conftest.py)
    case.check(hostile_outcomes, name)


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    """Only project errors (ValueErrors) and OSErrors become one line: a KeyError or TypeError from
    a bug in refimpl propagates, so that the bug is seen."""
    import refimpl.cli.describe as describe
    import refimpl_conversion.cli as convert_cli
    from refimpl.cli import main

    def bug(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(describe, "parse_ids", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["forward", "--model", "tiny", "--ids", "0 5 2"])
    monkeypatch.setattr(convert_cli, "load", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        convert_cli.main([os.path.join(ROOT, "refimpl", "data", "tiny-random-mlm"), "dst"])
