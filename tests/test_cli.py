"""The ``refimpl`` command line: task commands against transformers, input sources, errors, --help.

Commands run in-process through ``refimpl.cli.main`` (capsys); one test runs the installed console
script in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from tolerances import JSON_FLOATS

import pipeline_checkpoints
from refimpl import cli
from refimpl import pipelines as P
from test_pipelines import CLS_TEXTS, FILL_TEXTS, NER_TEXTS, QA, assert_same, hf_pipeline, hf_question_answering

pytestmark = pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")

COMMANDS = ["fill-mask", "classify", "tag", "qa", "choose", "embed", "generate", "info", "forward"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return pipeline_checkpoints.get(tmp_path_factory)


def run(capsys, monkeypatch, argv, stdin=None):
    """(exit code, stdout, stderr) of ``refimpl argv``; stdin is a string (or an empty pipe)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out: str) -> list:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"refimpl {command}" in out.split("example:")[1]


# ---------------------------------------------------------------------------------------------
# Results equal transformers'
# ---------------------------------------------------------------------------------------------


def test_fill_mask_json_stdin_and_file(ck, capsys, monkeypatch, tmp_path):
    model, folder = ck["mlm"]
    hf = hf_pipeline("fill-mask", model, ck["tokenizer"])
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", folder, "--json", "--top-k", "3",
                                               "--batch-size", "2"], stdin="\n".join(FILL_TEXTS) + "\n\n")
    assert code == 0, err
    results = json_lines(out)
    assert len(results) == 3
    for text, got in zip(FILL_TEXTS, results):
        assert_same(got, hf(text, top_k=3), text)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(FILL_TEXTS) + "\n")
    code, out2, _ = run(capsys, monkeypatch, ["fill-mask", "--model", folder, "--json", "--top-k", "3", "--file", str(path),
                                                "--batch-size", "2"])  # same batches: same rounding
    assert code == 0 and json_lines(out2) == results
    targets = [" Paris", " London", "Berlin"]
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", folder, "--json", "--top-k", "2",
                                               *[a for t in targets for a in ("--target", t)], FILL_TEXTS[0]])
    assert code == 0, err
    assert_same(json_lines(out)[0], hf(FILL_TEXTS[0], top_k=2, targets=targets), "targets")
    code, out3, _ = run(capsys, monkeypatch, ["fill-mask", "--model", folder, "--top-k", "2", FILL_TEXTS[0]])
    assert code == 0 and FILL_TEXTS[0] in out3 and results[0][0]["sequence"] in out3  # human-readable


def test_classify_pairs_from_tabs(ck, capsys, monkeypatch):
    model, folder = ck["cls"]
    hf = hf_pipeline("text-classification", model, ck["tokenizer"])
    code, out, err = run(capsys, monkeypatch, ["classify", "--model", folder, "--json", "--top-k", "0", *CLS_TEXTS])
    assert code == 0, err
    assert_same(json_lines(out), hf(CLS_TEXTS, top_k=None), "classify")
    code, out, err = run(capsys, monkeypatch, ["classify", "--model", folder, "--json"],
                         stdin="A man plays.\tSomeone makes music.\n")
    assert code == 0, err
    assert_same(json_lines(out)[0], hf({"text": "A man plays.", "text_pair": "Someone makes music."}, top_k=1), "pair")
    code, out2, _ = run(capsys, monkeypatch, ["classify", "--model", folder, "--json", "--pair", "Someone makes music.",
                                              "A man plays."])
    assert out2 == out


@pytest.mark.parametrize("strategy", ["none", "average"])
def test_tag(ck, capsys, monkeypatch, strategy):
    model, folder = ck["ner"]
    hf = hf_pipeline("token-classification", model, ck["tokenizer"], aggregation_strategy=strategy)
    code, out, err = run(capsys, monkeypatch, ["tag", "--model", folder, "--json", "--aggregation", strategy, *NER_TEXTS])
    assert code == 0, err
    for text, got, want in zip(NER_TEXTS, json_lines(out), hf(NER_TEXTS)):
        assert_same(got, want, text)
    code, out, err = run(capsys, monkeypatch, ["tag", "--model", folder, "--json", "--aggregation", strategy,
                                               "--ignore-labels", "", NER_TEXTS[0]])
    assert code == 0, err
    assert_same(json_lines(out)[0], hf(NER_TEXTS[0], ignore_labels=[]), "every label kept")


def test_qa(ck, capsys, monkeypatch, tmp_path):
    model, folder = ck["qa"]
    (q0, c0), (q1, c1) = QA
    code, out, err = run(capsys, monkeypatch, ["qa", "--model", folder, "--json", "--question", q0, "--context", c0])
    assert code == 0, err
    assert_same(json_lines(out)[0], hf_question_answering(model, ck["tokenizer"], q0, c0), "qa")
    opts = ["--top-k", "2", "--max-seq-len", "48", "--doc-stride", "16"]
    code, out, err = run(capsys, monkeypatch, ["qa", "--model", folder, "--json", *opts], stdin=f"{q0}\t{c0}\n{q1}\t{c1}\n")
    assert code == 0, err
    for (q, c), got in zip(QA, json_lines(out)):
        assert_same(got, hf_question_answering(model, ck["tokenizer"], q, c, top_k=2, max_seq_len=48, doc_stride=16), q)
    ctx = tmp_path / "context.txt"
    ctx.write_text(c1)
    code, out2, _ = run(capsys, monkeypatch, ["qa", "--model", folder, "--json", *opts, "--context-file", str(ctx)],
                        stdin=f"{q1}\n")
    assert json_lines(out2)[0] == json_lines(out)[1]


def test_choose_and_embed(ck, capsys, monkeypatch, tmp_path):
    _, mc = ck["mc"]
    args = ["The chef opened the oven", "and took out the bread.", "and flew to the moon."]
    code, out, err = run(capsys, monkeypatch, ["choose", "--model", mc, "--json", *args])
    assert code == 0, err
    assert json_lines(out) == [P.choose(mc, args[0], args[1:])]
    code, out, _ = run(capsys, monkeypatch, ["choose", "--model", mc, "--json"], stdin="\t".join(args) + "\n")
    assert json_lines(out) == [P.choose(mc, args[0], args[1:])]

    _, mlm = ck["mlm"]
    want = P.embed(mlm, CLS_TEXTS, pooling="mean", normalize=True)
    target = tmp_path / "v.npy"
    code, out, err = run(capsys, monkeypatch, ["embed", "--model", mlm, "--pooling", "mean", "--normalize", "--out",
                                               str(target)], stdin="\n".join(CLS_TEXTS))
    assert code == 0 and "wrote 3 x 32 float32" in err
    np.testing.assert_array_equal(np.load(target), want)
    code, out, _ = run(capsys, monkeypatch, ["embed", "--model", mlm, "--pooling", "mean", "--normalize", *CLS_TEXTS])
    np.testing.assert_allclose(np.array(json_lines(out)), want, rtol=0, atol=JSON_FLOATS["float32"])


def test_generate(ck, capsys, monkeypatch):
    pytest.importorskip("refimpl.generate", reason="refimpl.generate (the KV-cache decoder) is not in this tree")
    _, causal = ck["causal"]
    code, out, err = run(capsys, monkeypatch, ["generate", "--model", causal, "--json", "--max-new-tokens", "4",
                                               "Once upon a time", "Hi"])
    assert code == 0, err
    results = json_lines(out)
    assert [r["generated_text"][:len(p)] for r, p in zip(results, ["Once upon a time", "Hi"])] == ["Once upon a time", "Hi"]
    # Greedy: the same as generating each prompt alone (left padding is invisible).
    code, alone, _ = run(capsys, monkeypatch, ["generate", "--model", causal, "--json", "--max-new-tokens", "4", "Hi"])
    assert json_lines(alone)[0] == results[1]


def test_info(ck, capsys, monkeypatch, tmp_path):
    model, folder = ck["mlm"]
    bin_dir = tmp_path / "bin"
    shutil.copytree(folder, bin_dir)
    os.remove(bin_dir / "model.safetensors")
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    code, out, err = run(capsys, monkeypatch, ["info", "--model", str(bin_dir), "--json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "bin" and info["task"] == "masked-lm" and info["parameters"] > 1_000_000
    assert info["tokenizer"]["vocab_size"] == 50265 and info["config"]["hidden_size"] == 32
    code, out, _ = run(capsys, monkeypatch, ["info", "--model", "tiny"])
    assert code == 0 and "safetensors" in out and "tokenizer" in out


# ---------------------------------------------------------------------------------------------
# Errors: exit code 2 and one line on stderr
# ---------------------------------------------------------------------------------------------


def error_line(code, out, err) -> str:
    assert code == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_errors_are_one_line_with_exit_code_2(ck, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    _, mlm = ck["mlm"]
    _, cls = ck["cls"]
    long = "word " * 600 + "<mask>."
    cases = [
        (["fill-mask", "--model", str(tmp_path / "missing"), "a <mask>"], None, "does not exist"),
        (["fill-mask", "--model", "tiny"], "", "no input"),
        (["fill-mask", "--model", "tiny", "--file", str(tmp_path / "nothing.txt")], None, "No such file"),
        (["fill-mask", "--model", "tiny", "no mask"], None, "has no <mask>"),
        (["fill-mask", "--model", mlm, long], None, "--truncate"),
        (["classify", "--model", cls], "\n\n", "no input"),
        (["classify", "--model", cls, "This film is long. " * 120], None, "limit of 512"),
        (["classify", "a text"], None, "required: --model"),
        (["classify", "--model", mlm, "a text"], None, "is a masked-lm checkpoint"),
        (["tag", "--model", ck["ner"][1], "x " * 600], None, "--truncate"),
        (["qa", "--model", ck["qa"][1], "--question", "Where?"], None, "--context"),
        (["qa", "--model", ck["qa"][1]], "no tab here\n", "no tab"),
        (["choose", "--model", ck["mc"][1], "prompt", "one ending"], None, "at least two"),
        (["embed", "--model", "tiny", "--pooling", "max", "x"], None, "invalid choice"),
        (["fill-mask", "--model", "org/uncached", "a <mask>"], None, "not in the Hugging Face cache"),
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for argv, stdin, expected in cases:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        line = error_line(code, *capsys.readouterr())
        assert expected in line, (argv, line)
    # --truncate turns the over-long error into a result.
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", mlm, "--truncate", "--json", "word " * 600 + "<mask>."])
    assert code == 2 and "has no <mask>" in err  # the mask was cut away: said so, in one line
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", mlm, "--truncate", "--json", "<mask> " + "word " * 600])
    assert code == 0 and len(json_lines(out)[0]) == 5


def test_console_script_subprocess():
    script = shutil.which("refimpl", path=os.path.dirname(sys.executable)) or shutil.which("refimpl")
    assert script, "the refimpl console script is not installed (pip install -e .)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([script, "fill-mask", "--model", "tiny", "--json", "--top-k", "2", "Hello <mask>!"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 2
    done = subprocess.run([script, "fill-mask", "--model", "tiny", "Hello"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "has no <mask>" in done.stderr
