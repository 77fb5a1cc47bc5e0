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
import threading

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


def records(out: str) -> list[dict]:
    """The --json records: one per input, in input order, each with its index."""
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in recs] == list(range(len(recs))), out
    return recs


def json_lines_plain(out: str) -> list:
    """Output without --json that is JSON per line anyway (embed's vectors)."""
    return [json.loads(line) for line in out.splitlines()]


def json_lines(out: str) -> list:
    """The results of the --json records (every input has one: no blank lines here)."""
    return [r["result"] for r in records(out)]


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
    recs = records(out)
    assert len(recs) == 4 and recs[3] == {"index": 3, "error": "empty line"}  # the blank last line has its record
    results = [r["result"] for r in recs[:3]]
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
    np.testing.assert_allclose(np.array(json_lines_plain(out)), want, rtol=0, atol=JSON_FLOATS["float32"])
    code, out, _ = run(capsys, monkeypatch, ["embed", "--model", mlm, "--pooling", "mean", "--normalize", "--json",
                                             *CLS_TEXTS])
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
        (["fill-mask", "--model", "tiny", "--file", str(tmp_path / "nothing.txt")], None, "--file: no such file"),
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


# ---------------------------------------------------------------------------------------------
# One output per input, streamed
# ---------------------------------------------------------------------------------------------


def test_blank_lines_keep_outputs_aligned_with_inputs(ck, capsys, monkeypatch):
    """Line N of the --json output is input N: a blank line gets an error record, not a gap; the
    other results are those of the pipeline on the non-blank texts (same batches: same bits)."""
    _, folder = ck["cls"]
    lines = [CLS_TEXTS[0], "", CLS_TEXTS[1], "   ", "", CLS_TEXTS[2]]
    code, out, err = run(capsys, monkeypatch, ["classify", "--model", folder, "--json", "--batch-size", "2"],
                         stdin="\n".join(lines) + "\n")
    assert code == 0, err
    recs = records(out)
    assert len(recs) == len(lines)
    assert [("error" in r) for r in recs] == [not t.strip() for t in lines]
    assert all(r["error"] == "empty line" for r in recs if "error" in r)
    want = P.TextClassification(folder, batch_size=2)(CLS_TEXTS)
    assert [r["result"] for r in recs if "result" in r] == want
    code, out, _ = run(capsys, monkeypatch, ["classify", "--model", folder], stdin="\n".join(lines))
    assert code == 0 and out.count("(empty line)") == 3
    # Arguments come first, then the lines; the index counts both.
    code, out, _ = run(capsys, monkeypatch, ["fill-mask", "--model", "tiny", "--json", "--top-k", "1", "--file", "-",
                                             "A <mask>."], stdin="\nB <mask>.\n")
    assert [sorted(r) for r in records(out)] == [["index", "result"], ["error", "index"], ["index", "result"]]


class LazyStdin:
    """A piped stdin that records, each time a line is read, how many output lines exist already;
    it can raise KeyboardInterrupt at a given line (an interrupted job)."""

    def __init__(self, lines, stdout, interrupt_at=None):
        self.lines, self.stdout, self.interrupt_at = lines, stdout, interrupt_at
        self.printed_before = []

    def isatty(self):
        return False

    @property
    def buffer(self):
        for i, line in enumerate(self.lines):
            if i == self.interrupt_at:
                raise KeyboardInterrupt
            self.printed_before.append(self.stdout.getvalue().count("\n"))
            yield (line + "\n").encode("utf-8")


def test_results_are_printed_batch_by_batch_while_input_is_read(monkeypatch):
    texts = [f"text {i} <mask>." for i in range(7)]
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    stdin = LazyStdin(texts, out)
    monkeypatch.setattr(sys, "stdin", stdin)
    in_order = ["fill-mask", "--model", "tiny", "--json", "--top-k", "1", "--batch-size", "2", "--no-group-by-length"]
    assert cli.main(in_order) == 0
    # The first line is read before the model loads (to check there is input); each later batch is
    # read only after the previous batch's results were printed.
    assert stdin.printed_before == [0, 0, 2, 2, 4, 4, 6]
    assert len(records(out.getvalue())) == 7
    # Interrupted at line 5: the two finished batches stay printed, exit status 130.
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stdin", LazyStdin(texts, out, interrupt_at=5))
    assert cli.main(in_order) == 130
    assert [r["index"] for r in records(out.getvalue())] == [0, 1, 2, 3]
    # Grouped by length (the default): 8 batches (here 16 lines) are read, then their results printed.
    texts = [f"text {i} <mask>." for i in range(20)]
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    stdin = LazyStdin(texts, out)
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(in_order[:-1]) == 0
    assert stdin.printed_before == [0] * 16 + [16] * 4
    assert [r["index"] for r in records(out.getvalue())] == list(range(20))


def test_console_script_streams_through_a_pipe(tmp_path):
    """A real process: the first result arrives while stdin is still open (read lazily, flushed)."""
    script = shutil.which("refimpl", path=os.path.dirname(sys.executable)) or shutil.which("refimpl")
    proc = subprocess.Popen([script, "fill-mask", "--model", "tiny", "--json", "--top-k", "1", "--batch-size", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    killer = threading.Timer(120, proc.kill)  # a non-streaming CLI would block readline forever
    killer.start()
    try:
        proc.stdin.write("First <mask>.\n")
        proc.stdin.flush()
        first = json.loads(proc.stdout.readline())  # stdin is still open
        assert first["index"] == 0 and "result" in first
        proc.stdin.write("Second <mask>.\n")
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["index"] == 1
        assert proc.wait() == 0
    finally:
        killer.cancel()
        proc.kill()
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()


def test_closed_pipe_ends_quietly(tmp_path):
    """`refimpl ... | head -1`: no 'Broken pipe' message, the status a pipe's writer gets (141)."""
    script = shutil.which("refimpl", path=os.path.dirname(sys.executable)) or shutil.which("refimpl")
    path = tmp_path / "many.txt"
    path.write_text("".join(f"text {i} <mask>.\n" for i in range(300)))
    done = subprocess.run(["bash", "-c", f"set -o pipefail; '{script}' fill-mask --model tiny --json --batch-size 1 "
                                         f"--file '{path}' | head -1; echo status=$?"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stderr == ""
    assert done.stdout.count("\n") == 2 and done.stdout.endswith("status=141\n"), done.stdout


# ---------------------------------------------------------------------------------------------
# Files: embed --out, non-UTF-8 input, temporary files
# ---------------------------------------------------------------------------------------------


def test_embed_out_writes_exactly_the_path_given(capsys, monkeypatch, tmp_path):
    target = tmp_path / "vecs"  # no .npy suffix: numpy would add one, we do not
    code, _, err = run(capsys, monkeypatch, ["embed", "--model", "tiny", "--out", str(target), "a", "b"])
    assert code == 0 and f"to {target}" in err
    assert sorted(os.listdir(tmp_path)) == ["vecs"] and np.load(target).shape == (2, 16)
    folder = tmp_path / "folder"
    folder.mkdir()
    code, out, err = run(capsys, monkeypatch, ["embed", "--model", "tiny", "--out", str(folder), "a"])
    assert "is a folder: give the file to write" in error_line(code, out, err) and os.listdir(folder) == []
    code, out, err = run(capsys, monkeypatch, ["embed", "--model", "tiny", "--out", str(tmp_path / "no" / "v.npy"), "a"])
    assert "does not exist" in error_line(code, out, err)
    code, out, err = run(capsys, monkeypatch, ["embed", "--model", "tiny", "--out", str(tmp_path / "v.npy")],
                         stdin="a\n\nb\n")
    assert "input 2 (stdin line 2) is empty: --out writes one row per input line" in error_line(code, out, err)
    assert sorted(os.listdir(tmp_path)) == ["folder", "vecs"]  # nothing half-written


def test_non_utf8_input_is_one_line_naming_file_and_line(capsys, monkeypatch, tmp_path):
    bad = b"fine <mask>\nPar\xeds <mask>\n"  # latin-1
    path = tmp_path / "latin1.txt"
    path.write_bytes(bad)
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", "tiny", "--file", str(path)])
    assert f"{path} line 2 is not valid UTF-8 (byte 0xed" in error_line(code, out, err)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bad), encoding="utf-8"))
    code = cli.main(["fill-mask", "--model", "tiny"])
    assert "stdin line 2 is not valid UTF-8" in error_line(code, *capsys.readouterr())
    ctx = tmp_path / "context.txt"
    ctx.write_bytes(b"She lives in \xe9vry.\n")
    code, out, err = run(capsys, monkeypatch, ["qa", "--model", "tiny-qa", "--question", "Where?", "--context-file",
                                               str(ctx)])
    assert f"--context-file {ctx} line 1 is not valid UTF-8" in error_line(code, out, err)
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"0 5 \xff 2\n")
    code, out, err = run(capsys, monkeypatch, ["golden", "--model", "tiny", "--input-ids", str(ids), "--out",
                                               str(tmp_path / "g.safetensors")])
    assert f"--input-ids {ids} line 1 is not valid UTF-8" in error_line(code, out, err)
    # A UTF-8 byte-order mark is not part of the first text.
    path.write_bytes("\ufeffHello <mask>!\n".encode("utf-8"))
    code, out, _ = run(capsys, monkeypatch, ["fill-mask", "--model", "tiny", "--json", "--file", str(path)])
    assert code == 0 and json_lines(out)[0][0]["sequence"].startswith("Hello")


def test_errors_never_name_temporary_files(capsys, monkeypatch, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    for target, expected in ((tmp_path / "missing" / "g.safetensors", "the folder"), (folder, "it is a folder")):
        code, out, err = run(capsys, monkeypatch, ["golden", "--model", "tiny", "--text", "hi", "--out", str(target)])
        line = error_line(code, out, err)
        assert f"cannot write {str(target)!r}: {expected}" in line and ".tmp" not in line
    assert os.listdir(folder) == []


# ---------------------------------------------------------------------------------------------
# Smaller things: --version, python -m refimpl, --backend, forward, info, --target
# ---------------------------------------------------------------------------------------------


def test_version_and_python_m_refimpl(capsys):
    import refimpl

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"refimpl {refimpl.__version__}\n"
    done = subprocess.run([sys.executable, "-m", "refimpl", "forward", "--model", "tiny", "--ids", "0 31414 232 2",
                           "--json"], capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert np.asarray(json.loads(done.stdout)["logits"]).shape == (1, 4, 50265)


def test_backend_option(ck, capsys, monkeypatch):
    """--backend numpy runs the pure reference: the same answers as numba within float rounding."""
    _, folder = ck["cls"]
    results = {}
    for backend in ("numba", "numpy"):
        code, out, err = run(capsys, monkeypatch, ["classify", "--model", folder, "--json", "--top-k", "0",
                                                   "--backend", backend, *CLS_TEXTS])
        assert code == 0, err
        results[backend] = json_lines(out)
    assert_same(results["numpy"], results["numba"], "backends")
    code, out, err = run(capsys, monkeypatch, ["info", "--model", "tiny", "--backend", "numpy", "--json"])
    assert json.loads(out)["backend"] == "numpy"
    with pytest.raises(SystemExit):
        cli.main(["info", "--model", "tiny", "--backend", "cuda"])
    assert "invalid choice" in capsys.readouterr().err


def test_forward_top5_is_at_the_last_non_padding_position(capsys, monkeypatch):
    import refimpl

    ids = [[0, 31414, 232, 2], [0, 20920, 2, 1]]  # the second row is padded at the end
    code, out, err = run(capsys, monkeypatch, ["forward", "--model", "tiny", "--ids", "0 31414 232 2; 0 20920 2 1"])
    assert code == 0, err
    model = refimpl.from_pretrained("tiny")
    ids = np.array(ids)
    logits = model(input_ids=ids, attention_mask=(ids != 1).astype(np.int64)).logits
    want = [np.argsort(-logits[0, 3], kind="stable")[:5].tolist(), np.argsort(-logits[1, 2], kind="stable")[:5].tolist()]
    assert f"top-5 ids at the last non-padding position (per row: [3, 2]): {want}" in out


def test_info_reports_stored_and_compute_dtype(capsys, monkeypatch, tmp_path):
    import refimpl
    from refimpl_conversion.exporter import export

    export(refimpl.from_pretrained("tiny"), str(tmp_path / "half"), dtype="float16")
    code, out, err = run(capsys, monkeypatch, ["info", "--model", str(tmp_path / "half"), "--json"])
    info = json.loads(out)
    assert (info["stored_dtype"], info["dtype"]) == ("float16", "float32") and list(info["stored_parameters"]) == ["float16"]
    code, out, err = run(capsys, monkeypatch, ["info", "--model", str(tmp_path / "half")])
    assert "stored as float16, computed in float32" in out
    # A bfloat16 .bin: read without torch; NumPy has no bfloat16, the report still says what the file holds.
    model = refimpl.from_pretrained("tiny")
    os.makedirs(tmp_path / "bf16")
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(os.path.join(model.name_or_path, name), tmp_path / "bf16" / name)
    state = {k: torch.from_numpy(np.array(v)).to(torch.bfloat16) for k, v in refimpl.state_dict(model).items()}
    torch.save(state, tmp_path / "bf16" / "pytorch_model.bin")
    code, out, err = run(capsys, monkeypatch, ["info", "--model", str(tmp_path / "bf16"), "--json"])
    assert code == 0, err
    assert (json.loads(out)["stored_dtype"], json.loads(out)["dtype"]) == ("bfloat16", "float32")


def test_fill_mask_target_of_several_tokens_warns(capsys, monkeypatch, caplog):
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", "tiny", "--json", "--target", " Parisian",
                                               "--target", " Paris", "I live in <mask>."])
    assert code == 0
    assert err == ("refimpl fill-mask: warning: the target ' Parisian' is not one token of the vocabulary but 2 "
                   "(ĠParis ian); scoring its first token 'ĠParis' instead\n")
    assert {p["token_str"] for p in json_lines(out)[0]} == {" Paris"}  # both targets are ' Paris' now
    code, out, err = run(capsys, monkeypatch, ["fill-mask", "--model", "tiny", "--target", " Paris", "A <mask>."])
    assert code == 0 and err == ""  # one token (ĠParis): no warning


# ---------------------------------------------------------------------------------------------
# compare: nothing compared is no pass
# ---------------------------------------------------------------------------------------------


def test_compare_fails_when_nothing_is_compared(capsys, monkeypatch, tmp_path):
    import refimpl
    from refimpl.io import write_safetensors as save_tensors

    golden = str(tmp_path / "g.safetensors")
    code, _, err = run(capsys, monkeypatch, ["golden", "--model", "tiny", "--text", "Hello world", "--out", golden])
    assert code == 0, err
    weights = os.path.join(refimpl.from_pretrained("tiny").name_or_path, "model.safetensors")
    code, out, err = run(capsys, monkeypatch, ["compare", golden, weights, "--quiet"])
    assert code == 1 and err == ""
    assert "compared 0 of 38 golden tensors" in out and out.rstrip().splitlines()[-1].startswith(
        "FAIL: the candidate holds none of the golden's traced tensors")
    code, out, _ = run(capsys, monkeypatch, ["compare", golden, weights, "--json"])
    report = json.loads(out)
    assert code == 1 and out.count("\n") == 1 and report["passed"] is False
    assert (report["compared"], report["golden_tensors"]) == (0, 38)
    # The golden's own inputs alone are not a comparison either; one traced tensor is.
    from refimpl.golden import read_golden

    g = read_golden(golden)
    only_inputs = str(tmp_path / "inputs.safetensors")
    save_tensors(only_inputs, {f"inputs.{k}": v for k, v in g.inputs.items()})
    assert run(capsys, monkeypatch, ["compare", golden, only_inputs])[0] == 1
    one = str(tmp_path / "one.safetensors")
    save_tensors(one, {"logits": g.tensors["logits"].astype(np.float32)})
    code, out, _ = run(capsys, monkeypatch, ["compare", golden, one])
    assert code == 0 and "compared 1 of 38 golden tensors" in out and out.rstrip().endswith("PASS")
    assert run(capsys, monkeypatch, ["compare", golden, one, "--strict"])[0] == 1
