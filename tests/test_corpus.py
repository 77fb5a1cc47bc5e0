"""Corpus runs (refimpl.corpus, refimpl.cluster, `refimpl TASK --file --out DIR`): the same bytes in one
process and on a Dask cluster, for every task; nothing lost when a worker or the client is killed;
unusable inputs listed and the rest kept; one-line errors.

The one-process tests need pyarrow, the cluster tests ``dask[distributed]`` too (the ``scale``
extra); both skip cleanly without them. The cluster tests share one LocalCluster of 2 worker
processes (one Dask thread each), as ``--workers 2`` starts it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import corpus_checkpoints  # noqa: E402
from refimpl import cli, corpus, pipelines  # noqa: E402

threadpoolctl = pytest.importorskip("threadpoolctl")

WORDS = ("the a cat dog sat on mat ran far away quickly slowly blue red green house tree river Paris London "
         "Ada was born in lives near").split()
BATCH, PART = 4, 8  # 5 partitions of the 36-line corpora: the last one partial


def sentence(rng, lo=2, hi=12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(int(rng.integers(lo, hi))))


def corpus_lines(task: str, n: int = 36, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    if task == "fill-mask":
        return [f"{sentence(rng)} <mask> {sentence(rng, 1, 4)}" for _ in range(n)]
    if task == "qa":
        return [f"Where is the {rng.choice(WORDS)}?\t{sentence(rng, 8, 30)}" for _ in range(n)]
    if task == "choose":
        return ["\t".join([sentence(rng)] + [sentence(rng, 1, 6) for _ in range(int(rng.integers(2, 5)))])
                for _ in range(n)]
    return [sentence(rng) for _ in range(n)]


OPTIONS = {"embed": {"pooling": "mean", "normalize": True}, "classify": {"top_k": None}, "fill-mask": {"top_k": 3},
           "tag": {"aggregation_strategy": "simple"}, "qa": {"top_k": 2}, "choose": {}, "golden": {}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus-models")
    out = {}
    for i, (task, (model_task, overrides)) in enumerate(corpus_checkpoints.HEADS.items()):
        out[task] = corpus_checkpoints.write(root / task, model_task, 10 + i, **overrides)
    out["golden"] = out["classify"]  # small outputs: a sequence-classification golden
    return out


def write_lines(path, lines, ending="\n") -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("".join(line + ending for line in lines))
    return os.fspath(path)


def make(task, models, source, out, **kw):
    kw = {"batch_size": BATCH, "partition_size": PART, "options": OPTIONS[task], **kw}
    return corpus.make_job(task, models[task], os.fspath(source), os.fspath(out), **kw)


def outputs(out) -> dict[str, bytes]:
    """Every output file that must be byte-identical between runs: records, arrays, golden files, errors."""
    found = {}
    for sub in ("records", "embeddings", "golden"):
        d = os.path.join(out, sub)
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                with open(os.path.join(d, f), "rb") as fh:
                    found[f"{sub}/{f}"] = fh.read()
    with open(os.path.join(out, "errors.jsonl"), "rb") as fh:
        found["errors.jsonl"] = fh.read()
    return found


def assert_same_outputs(a, b):
    oa, ob = outputs(a), outputs(b)
    assert sorted(oa) == sorted(ob)
    different = [k for k in oa if oa[k] != ob[k]]
    assert not different, f"files differ: {different}"


def pipeline_reference(task, models, lines):
    """The pipeline itself on the same inputs, batch by batch in input order as a corpus run composes
    them, with BLAS on one thread (the corpus run's default)."""
    o = OPTIONS[task]
    with threadpoolctl.threadpool_limits(1):
        if task == "embed":
            return pipelines.Embedding(models[task], batch_size=BATCH, group_by_length=False)(lines, **o)
        if task == "classify":
            return pipelines.TextClassification(models[task], batch_size=BATCH, group_by_length=False)(lines, **o)
        if task == "fill-mask":
            return [[r] for r in pipelines.FillMask(models[task], batch_size=BATCH, group_by_length=False)(lines, **o)]
        if task == "tag":
            return pipelines.TokenClassification(models[task], batch_size=BATCH, group_by_length=False)(lines, **o)
        if task == "qa":
            qs, cs = zip(*(line.split("\t", 1) for line in lines))
            return pipelines.QuestionAnswering(models[task], batch_size=BATCH, group_by_length=False)(list(qs), list(cs), **o)
        if task == "choose":
            groups = [line.split("\t") for line in lines]
            return pipelines.MultipleChoice(models[task], batch_size=BATCH, group_by_length=False)([g[0] for g in groups], [g[1:] for g in groups])
    raise AssertionError(task)


def drop_nulls(x):
    if isinstance(x, dict):
        return {k: drop_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [drop_nulls(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["embed", "classify", "fill-mask", "tag", "qa", "choose"])
def test_one_process_run_equals_the_pipeline(tmp_path, models, task):
    lines = corpus_lines(task)
    src = write_lines(tmp_path / "corpus.txt", lines)
    summary = corpus.run(make(task, models, src, tmp_path / "out"), progress=False)
    assert (summary.partitions, summary.computed, summary.inputs, summary.results, summary.errors) == (5, 5, 36, 36, 0)
    ref = pipeline_reference(task, models, lines)
    records = corpus.read_records(tmp_path / "out")
    assert records.column("index").to_pylist() == list(range(36))
    if task == "embed":
        index, vectors = corpus.read_embeddings(tmp_path / "out")
        assert vectors.shape == (36, 16) and vectors.dtype == np.float32 and list(index) == list(range(36))
        assert np.array_equal(vectors, ref)  # bit for bit
    else:
        got = [drop_nulls(r) for r in records.column("result").to_pylist()]
        assert got == [r if isinstance(r, list) else [r] for r in ref]  # floats exactly equal
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert [(p["start"], p["stop"]) for p in manifest["partitions"]] == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 36)]
    assert set(manifest["model"]["files"]) >= {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    assert all(len(f["sha256"]) == 64 for f in manifest["model"]["files"].values())
    assert not [f for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".tmp")]


def test_partitions_run_concurrently_in_one_process_write_the_same_bytes(tmp_path, models):
    """A worker with several Dask threads runs several partitions at once (with --threads 1): the
    same bytes as one after the other."""
    lines = corpus_lines("tag")
    src = write_lines(tmp_path / "c.txt", lines)
    corpus.run(make("tag", models, src, tmp_path / "seq"), progress=False)
    job, parts = corpus.plan(make("tag", models, src, tmp_path / "par"))
    for sub in ("records", "partitions"):
        os.makedirs(os.path.join(job.out, sub))
    with threadpoolctl.threadpool_limits(1):
        corpus.prepare_worker(job, "test")
        try:
            threads = [threading.Thread(target=corpus.run_partition, args=(job, p)) for p in parts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            corpus.release_worker(job)
    with open(tmp_path / "seq" / "errors.jsonl", "rb") as f:
        (tmp_path / "par" / "errors.jsonl").write_bytes(f.read())  # written by run() at the end, not by partitions
    assert_same_outputs(tmp_path / "seq", tmp_path / "par")


def test_golden_corpus_writes_one_golden_file_per_batch(tmp_path, models):
    from refimpl import from_pretrained
    from refimpl.golden import read_golden, trace
    from refimpl.tokenizer import Tokenizer

    lines = corpus_lines("golden", 10)
    src = write_lines(tmp_path / "c.txt", lines)
    corpus.run(make("golden", models, src, tmp_path / "out", dtype="float64"), progress=False)
    records = corpus.read_records(tmp_path / "out").to_pylist()
    assert [r["result"] for r in records[:5]] == [{"file": "part-000000-b000.safetensors", "row": i} for i in range(4)] + \
        [{"file": "part-000000-b001.safetensors", "row": 0}]
    g = read_golden(tmp_path / "out" / "golden" / "part-000001-b000.safetensors")  # inputs 8, 9
    assert g.task == "sequence-classification" and g.dtype == "float64"
    assert g.metadata["tokenizer"]["text"] == lines[8:10]
    enc = Tokenizer.from_pretrained(models["golden"])(lines[8:10], padding=True)
    assert np.array_equal(g.inputs["input_ids"], enc["input_ids"])
    model = from_pretrained(models["golden"], dtype="float64")
    with threadpoolctl.threadpool_limits(1):
        expected = trace(model, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert list(g.tensors) == list(expected)
    assert all(np.array_equal(g.tensors[k], expected[k]) for k in expected)


def test_jsonl_and_parquet_inputs_give_the_text_run_bytes(tmp_path, models):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = corpus_lines("qa", 20)
    qs, cs = zip(*(line.split("\t", 1) for line in lines))
    write_lines(tmp_path / "c.txt", lines)
    write_lines(tmp_path / "c.jsonl", [json.dumps({"question": q, "context": c}) for q, c in zip(qs, cs)])
    pq.write_table(pa.table({"question": list(qs), "context": list(cs)}), tmp_path / "c.parquet", row_group_size=7)
    for name in ("c.txt", "c.jsonl", "c.parquet"):
        corpus.run(make("qa", models, tmp_path / name, tmp_path / f"out-{name}"), progress=False)
    assert outputs(tmp_path / "out-c.txt") == outputs(tmp_path / "out-c.jsonl") == outputs(tmp_path / "out-c.parquet")
    job = json.load(open(tmp_path / "out-c.parquet" / "job.json"))["job"]
    assert job["input_format"] == "parquet"


def planted_corpus(path) -> tuple[list[str], dict]:
    """12 good fill-mask lines with 5 unusable ones planted among them, CRLF line ends."""
    good = corpus_lines("fill-mask", 12, seed=3)
    planted = {  # index: (raw line, the start of its reason)
        1: (b"", "empty line"),
        4: (b"   \t ", "empty line"),
        6: (b"caf\xe9 <mask> latin-1", "not valid UTF-8 (byte 0xe9 at byte 4 of the line)"),
        9: (("word " * 600 + "<mask>").encode(), "603 tokens long (special tokens included), more than the model's "
                                                 "limit of 512; shorten it or pass --truncate"),
        13: (b"no mask in this one", "no <mask>: fill-mask needs at least one"),
    }
    raw, it = [], iter(good)
    for i in range(len(good) + len(planted)):
        raw.append(planted[i][0] if i in planted else next(it).encode())
    path.write_bytes(b"\r\n".join(raw) + b"\r\n")  # CRLF line ends are read as line ends
    return good, planted


def test_unusable_inputs_are_listed_and_the_rest_kept(tmp_path, models):
    src = tmp_path / "bad.txt"
    good, planted = planted_corpus(src)
    summary = corpus.run(make("fill-mask", models, src, tmp_path / "out"), progress=False)
    assert (summary.inputs, summary.results, summary.errors) == (17, 12, 5)
    errors = corpus.read_errors(tmp_path / "out")
    assert [(e["index"], e["line"]) for e in errors] == [(i, i + 1) for i in sorted(planted)]
    for e in errors:
        assert e["error"].startswith(planted[e["index"]][1]), e
    kept = corpus.read_records(tmp_path / "out")
    assert kept.column("index").to_pylist() == [i for i in range(17) if i not in planted]
    # the usable inputs of each partition, batch_size at a time: partition 0 keeps good[0:5] (batches of
    # 4 and 1), partition 1 good[5:11] (4 and 2), partition 2 good[11:12]
    pipe = pipelines.FillMask(models["fill-mask"], batch_size=BATCH, group_by_length=False)
    with threadpoolctl.threadpool_limits(1):
        expected = [[r] for a, b in ((0, 4), (4, 5), (5, 9), (9, 11), (11, 12)) for r in pipe(good[a:b], top_k=3)]
    assert [drop_nulls(r) for r in kept.column("result").to_pylist()] == expected
    # --strict: the first unusable input stops the job, named by file and line
    with pytest.raises(corpus.CorpusError, match=r"^bad.txt line 2: empty line \(--strict stops"):
        corpus.run(make("fill-mask", models, src, tmp_path / "strict", strict=True), progress=False)


@pytest.mark.parametrize("task, lines, reasons", [
    ("qa", ["Where?\tIn Paris.", "no tab here", "\tcontext only"], {1: "no tab", 2: "'question' is empty"}),
    ("choose", ["p\ta\tb", "p\tonly one", "p\ta\t\t", "p" + "\te" * 257],
     {1: "1 ending(s)", 2: "'ending 2' is empty", 3: "257 endings, more than 256"}),
    ("classify", ["a\tb", "no pair", "c\td"], {1: "no text pair, but this corpus's first input has one"}),
])
def test_task_specific_unusable_lines(tmp_path, models, task, lines, reasons):
    src = write_lines(tmp_path / "c.txt", lines)
    corpus.run(make(task, models, src, tmp_path / "out"), progress=False)
    errors = {e["index"]: e["error"] for e in corpus.read_errors(tmp_path / "out")}
    assert sorted(errors) == sorted(reasons)
    assert all(errors[i].startswith(r) for i, r in reasons.items()), errors


def test_an_input_only_the_pipeline_refuses_is_found_and_the_batch_redone(tmp_path, models):
    """A question that leaves no room for the context in a 32-token window passes the checks made
    before batching; the pipeline refuses its batch, the input is found by running each input of
    that batch alone, and the partition is computed again without it."""
    lines = corpus_lines("qa", 8)
    lines[2] = "why " * 40 + "?\tSome context here."
    src = write_lines(tmp_path / "c.txt", lines)
    job = make("qa", models, src, tmp_path / "out", options={"max_seq_len": 32, "doc_stride": 4})
    summary = corpus.run(job, progress=False)
    errors = corpus.read_errors(tmp_path / "out")
    assert (summary.results, [e["index"] for e in errors]) == (7, [2])
    assert "no room is left for the second sequence" in errors[0]["error"], errors
    kept = [drop_nulls(r) for r in corpus.read_records(tmp_path / "out").column("result").to_pylist()]
    good = lines[:2] + lines[3:]
    qs, cs = zip(*(line.split("\t", 1) for line in good))
    with threadpoolctl.threadpool_limits(1):
        expected = pipelines.QuestionAnswering(models["qa"], batch_size=BATCH, group_by_length=False)(list(qs), list(cs), max_seq_len=32,
                                                                              doc_stride=4)
    assert kept == [r if isinstance(r, list) else [r] for r in expected]


def test_jsonl_unusable_lines(tmp_path, models):
    src = write_lines(tmp_path / "c.jsonl", ['{"text": "fine"}', "{not json", '{"other": 1}', "42", '"a string"',
                                             '{"text": 7}', "[" * 100000])
    corpus.run(make("embed", models, src, tmp_path / "out"), progress=False)
    errors = {e["index"]: e["error"] for e in corpus.read_errors(tmp_path / "out")}
    assert sorted(errors) == [1, 2, 3, 5, 6]
    assert errors[6] == "not valid JSON here (nested too deeply)"
    assert errors[1].startswith("not valid JSON") and errors[2] == "no 'text'"
    assert errors[3].startswith("a JSON int") and errors[5] == "'text' is a int, not a string"
    assert corpus.read_records(tmp_path / "out").column("index").to_pylist() == [0, 4]


def test_rerun_skips_finished_partitions_and_redoes_changed_ones(tmp_path, models):
    lines = corpus_lines("classify")
    src = write_lines(tmp_path / "c.txt", lines)
    out = tmp_path / "out"
    corpus.run(make("classify", models, src, out), progress=False)
    first = outputs(out)
    stamps = {f: os.stat(out / "partitions" / f).st_mtime_ns for f in os.listdir(out / "partitions")}
    again = corpus.run(make("classify", models, src, out), progress=False)
    assert (again.skipped, again.computed) == (5, 0) and outputs(out) == first
    # a lost output file and a changed input line: only their partitions are computed again
    os.unlink(out / "records" / "part-000001.parquet")
    lines[20] = "a changed line"
    write_lines(src, lines)
    third = corpus.run(make("classify", models, src, out), progress=False)
    assert (third.skipped, third.computed) == (3, 2)
    now = {f: os.stat(out / "partitions" / f).st_mtime_ns for f in os.listdir(out / "partitions")}
    assert [f for f in stamps if now[f] != stamps[f]] == ["part-000001.json", "part-000002.json"]
    changed = outputs(out)
    assert changed["records/part-000001.parquet"] == first["records/part-000001.parquet"]
    assert changed["records/part-000002.parquet"] != first["records/part-000002.parquet"]
    # the corpus shrinks: the partitions beyond its end are removed
    write_lines(src, lines[:10])
    fourth = corpus.run(make("classify", models, src, out), progress=False)
    assert (fourth.partitions, fourth.skipped, fourth.computed) == (2, 1, 1)
    assert sorted(os.listdir(out / "records")) == ["part-000000.parquet", "part-000001.parquet"]


def test_a_rerun_with_other_options_or_into_a_foreign_folder_is_refused(tmp_path, models):
    src = write_lines(tmp_path / "c.txt", corpus_lines("embed", 10))
    corpus.run(make("embed", models, src, tmp_path / "out"), progress=False)
    with pytest.raises(corpus.CorpusError, match=r"holds the output of another job \(batch_size 4 -> 2"):
        corpus.run(make("embed", models, src, tmp_path / "out", batch_size=2), progress=False)
    with pytest.raises(corpus.CorpusError, match=r"holds the output of another job \(threads 1 -> 2"):
        corpus.run(make("embed", models, src, tmp_path / "out", threads=2), progress=False)
    other = corpus_checkpoints.write(tmp_path / "other", "base", 99)
    job = dataclasses.replace(make("embed", models, src, tmp_path / "out"), model=other)
    with pytest.raises(corpus.CorpusError, match="was written with another model"):
        corpus.run(job, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(corpus.CorpusError, match="holds other files and no job.json"):
        corpus.run(make("embed", models, src, tmp_path / "foreign"), progress=False)
    assert os.listdir(tmp_path / "foreign") == ["notes.txt"]
    with pytest.raises(corpus.CorpusError, match=r"partition size \(6\) must be a multiple of the batch size \(4\)"):
        make("embed", models, src, tmp_path / "x", partition_size=6)
    # a first run that failed before writing anything leaves a folder a rerun accepts
    write_lines(tmp_path / "empty.txt", [])
    with pytest.raises(corpus.CorpusError, match="no input: .*empty.txt is empty"):
        corpus.run(make("embed", models, tmp_path / "empty.txt", tmp_path / "again"), progress=False)
    assert corpus.run(make("embed", models, src, tmp_path / "again"), progress=False).results == 10


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_corpus_mode(tmp_path, models, capsys):
    src = write_lines(tmp_path / "c.txt", corpus_lines("embed", 10))
    # --out FILE.npy keeps writing one array, and so does any --out for texts from the arguments or stdin;
    # with --file CORPUS, a folder name switches to corpus mode
    assert cli.main(["embed", "--model", models["embed"], "--file", src, "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (10, 16)
    assert cli.main(["embed", "--model", models["embed"], "--out", str(tmp_path / "plain"), "a", "b"]) == 0
    assert np.load(tmp_path / "plain").shape == (2, 16)
    code = cli.main(["embed", "--model", models["embed"], "--file", src, "--out", str(tmp_path / "vecs"),
                     "--batch-size", "4", "--partition-size", "8"])
    err = capsys.readouterr().err
    assert code == 0 and "10 inputs, 10 results in 2 partitions (2 computed, 0 already done)" in err
    assert corpus.read_embeddings(tmp_path / "vecs")[1].shape == (10, 16)
    code = cli.main(["tag", "--model", models["tag"], "--file", src, "--out", str(tmp_path / "tags"),
                     "--aggregation", "first"])
    assert code == 0 and corpus.read_records(tmp_path / "tags").num_rows == 10


@pytest.mark.parametrize("argv, message", [
    (["classify", "--out", "DIR", "just a text"], "corpus mode reads its inputs from --file CORPUS, not from arguments"),
    (["tag", "--out", "DIR", "--file", "-"], "corpus mode needs --file CORPUS"),
    (["embed", "--workers", "2", "just a text"], "corpus mode reads its inputs from --file CORPUS, not from arguments"),
    (["embed", "--file", "SRC", "--out", "DIR", "--partition-size", "6", "--batch-size", "4"],
     "the partition size (6) must be a multiple of the batch size (4)"),
    (["embed", "--file", "missing.txt", "--out", "DIR"], "--file: no such file 'missing.txt'"),
    (["qa", "--file", "SRC", "--out", "DIR", "--question", "Why?"], "corpus mode reads the questions from --file"),
])
def test_cli_corpus_errors_are_one_line(tmp_path, models, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write_lines(tmp_path / "SRC", ["a text"])
    code = cli.main([a for a in argv] + ["--model", models["embed"]])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_workers_without_dask_is_one_line(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the scale extra were not installed
    monkeypatch.setitem(sys.modules, "refimpl.cluster", None)
    src = write_lines(tmp_path / "c.txt", ["a text"])
    code = cli.main(["embed", "--model", models["embed"], "--file", src, "--out", str(tmp_path / "o"), "--workers", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines()[-1].startswith(
        "refimpl embed: error: --workers and --scheduler need Dask: pip install '.[scale]' in a checkout"), err


# ---------------------------------------------------------------------------------------------
# On a Dask cluster
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    from refimpl.cluster import environ_kept

    with environ_kept():  # (see environ_kept: the nannies run in this process)
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                           silence_logs=50)
        client = distributed.Client(cluster)
        yield client
        client.close()
        cluster.close()


@pytest.mark.dask
@pytest.mark.parametrize("task, threads", [("embed", 1), ("classify", 1), ("fill-mask", 1), ("tag", 1), ("qa", 1),
                                           ("choose", 1), ("golden", 1), ("embed", 2)])
def test_two_workers_write_the_one_process_bytes(tmp_path, models, dask_client, task, threads):
    lines = corpus_lines(task)
    lines[5] = ""  # an unusable line in a partition shifts its later batches: the same way everywhere
    src = write_lines(tmp_path / "c.txt", lines)
    one = corpus.run(make(task, models, src, tmp_path / "one", threads=threads), progress=False)
    two = corpus.run(make(task, models, src, tmp_path / "two", threads=threads), client=dask_client, progress=False)
    assert (one.results, one.errors, two.computed) == (35, 1, 5)
    assert_same_outputs(tmp_path / "one", tmp_path / "two")
    workers = {p["worker"] for p in json.load(open(tmp_path / "two" / "manifest.json"))["partitions"]}
    assert len(workers) == 2 and "client" not in workers  # both workers took part


@pytest.mark.dask
def test_each_worker_limits_blas_and_maps_the_weights_once(tmp_path, models, dask_client):
    from refimpl import cluster

    src = write_lines(tmp_path / "c.txt", corpus_lines("classify", 8))
    job, _ = corpus.plan(make("classify", models, src, tmp_path / "out"))
    os.makedirs(job.out)
    with cluster.setup_on_workers(dask_client, corpus.prepare_worker, corpus.release_worker, job, "probe"):
        reports = dask_client.run(corpus.memory_report, job)
        blas = dask_client.run(threadpoolctl.threadpool_info)
    assert len(reports) == 2
    for r in reports.values():
        # every parameter is a view of the weight file's memory map: no copy of the weights
        assert r["arrays"] == r["mapped_arrays"] == 43 and r["copied_bytes"] == 0, r
        if "weights_rss" in r:  # Linux: the pages of the file mapping are the page cache's, not the worker's
            assert r["weights_anonymous"] == 0 and 0 < r["weights_rss"] <= r["weights_file"], r
    for info in blas.values():
        assert {i["num_threads"] for i in info if i["user_api"] == "blas"} == {1}
    # a model a worker cannot read is one clear error naming the worker
    part = corpus.plan(job)[1][0]
    gone = dataclasses.replace(job, model=str(tmp_path / "nowhere"))
    with pytest.raises(corpus.CorpusError, match=r"^worker tcp://\S+ cannot read the model folder '.*nowhere': every "
                                                 r"worker must see the same path"):
        cluster.run_calls([("k", part)], corpus.run_partition, gone, setup=corpus.prepare_worker, name="gone",
                          client=dask_client)


def _double(arg, item, address):
    return 2 * item


@pytest.mark.dask
def test_a_local_cluster_leaves_this_process_environment_as_it_was(monkeypatch):
    """run_calls(workers=N) starts a LocalCluster whose nannies set OMP_NUM_THREADS=1,
    OPENBLAS_NUM_THREADS=1, ... in this process's environment before spawning a worker (Dask's
    pre-spawn-environ); once it returns they are as they were, so a process started afterwards
    still gets every core for its BLAS."""
    pytest.importorskip("distributed")
    from refimpl import cluster

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = dict(os.environ)
    got = []
    cluster.run_calls([("a", 1), ("b", 2)], _double, None, setup=lambda arg, address: None, name="env", workers=1,
                      on_result=got.append)
    assert sorted(got) == [2, 4]
    assert dict(os.environ) == before


@pytest.mark.dask
def test_planted_unusable_lines_on_two_workers(tmp_path, models, dask_client):
    src = tmp_path / "bad.txt"
    _, planted = planted_corpus(src)
    one = corpus.run(make("fill-mask", models, src, tmp_path / "one"), progress=False)
    two = corpus.run(make("fill-mask", models, src, tmp_path / "two"), client=dask_client, progress=False)
    assert (two.inputs, two.results, two.errors) == (one.inputs, one.results, one.errors) == (17, 12, 5)
    assert [e["line"] for e in corpus.read_errors(tmp_path / "two")] == [i + 1 for i in sorted(planted)]
    assert_same_outputs(tmp_path / "one", tmp_path / "two")


@pytest.mark.dask
def test_strict_stops_a_cluster_run_at_an_unusable_line(tmp_path, models, dask_client):
    lines = corpus_lines("embed", 24)
    lines[13] = ""
    src = write_lines(tmp_path / "c.txt", lines)
    with pytest.raises(corpus.CorpusError, match=r"^c.txt line 14: empty line \(--strict stops"):
        corpus.run(make("embed", models, src, tmp_path / "out", strict=True), client=dask_client, progress=False)
    assert not os.path.exists(tmp_path / "out" / "partitions" / "part-000001.json")


@pytest.mark.dask
def test_a_bad_scheduler_address_is_one_line(tmp_path, models, capsys):
    pytest.importorskip("distributed")
    import dask

    src = write_lines(tmp_path / "c.txt", ["a text"])
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = cli.main(["embed", "--model", models["embed"], "--file", src, "--out", str(tmp_path / "o"),
                         "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("refimpl embed: error: cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"), err


# ---------------------------------------------------------------------------------------------
# Nothing lost: a worker killed, the client killed
# ---------------------------------------------------------------------------------------------

KILL_PARTS = 48  # partitions of 8 inputs (two batches of 4): a run lasts long enough to be killed in the middle


@pytest.fixture(scope="module")
def killable(tmp_path_factory, models):
    """A corpus of many small partitions, how to run it, and its one-process run."""
    root = tmp_path_factory.mktemp("corpus-kill")
    src = write_lines(root / "corpus.txt", corpus_lines("embed", KILL_PARTS * PART, seed=7))

    def job(out):
        return corpus.make_job("embed", models["embed"], src, os.fspath(out), batch_size=BATCH, partition_size=PART,
                               options={"pooling": "cls", "normalize": False})  # the CLI's defaults

    corpus.run(job(root / "reference"), progress=False)
    return models["embed"], src, job, root / "reference"


def wait_for(predicate, timeout=120.0, what="condition"):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def finished_records(out) -> dict[str, os.stat_result]:
    d = os.path.join(out, "partitions")
    return {f: os.stat(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".json")} if os.path.isdir(d) else {}


@pytest.mark.dask
def test_a_worker_killed_mid_run_changes_nothing(tmp_path, killable, dask_client):
    _, _, job, reference = killable
    pids = dask_client.run(os.getpid)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        summary=corpus.run(job(tmp_path / "out"), client=dask_client, progress=False)))
    runner.start()
    try:
        wait_for(lambda: len(finished_records(tmp_path / "out")) >= 1, what="a first partition")
        busy = [w for w, keys in dask_client.processing().items() if keys]
        victim = busy[0] if busy else next(iter(pids))
        os.kill(pids[victim], signal.SIGKILL)
        done_at_kill = len(finished_records(tmp_path / "out"))
    finally:
        runner.join(300)
    assert done_at_kill < KILL_PARTS, "the job finished before the kill: nothing was tested"
    summary = result["summary"]
    assert (summary.partitions, summary.computed, summary.results) == (KILL_PARTS, KILL_PARTS, KILL_PARTS * PART)
    assert_same_outputs(reference, tmp_path / "out")
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert [p["name"] for p in manifest["partitions"]] == [f"part-{i:06d}" for i in range(KILL_PARTS)]
    assert not [f for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".tmp")]
    dask_client.wait_for_workers(2, timeout=120)  # the nanny started a new worker in its place


@pytest.mark.dask
def test_a_killed_client_resumes_with_only_the_unfinished_partitions(tmp_path, killable, dask_client):
    model, src, job, reference = killable
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from refimpl.cli import main; sys.exit(main(sys.argv[1:]))", "embed", "--model", model, "--file", src, "--out", str(out),
         "--batch-size", str(BATCH), "--partition-size", str(PART), "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(lambda: len(finished_records(out)) >= 3 or proc.poll() is not None, what="three partitions")
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the client and the cluster it started (its process group)
        except ProcessLookupError:
            pass
        proc.wait()

    def group_gone():
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, timeout=30, what="the killed run's processes to exit")
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = finished_records(out)
    assert 3 <= len(before) < KILL_PARTS, f"{len(before)} partitions finished before the kill"
    summary = corpus.run(job(out), client=dask_client, progress=False)
    assert (summary.skipped, summary.computed) == (len(before), KILL_PARTS - len(before))
    after = finished_records(out)
    for name, st in before.items():  # the finished partitions were not touched
        assert (after[name].st_ino, after[name].st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert_same_outputs(reference, out)
    assert not [f for d, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
