"""Corpus runs: texts per second in one process and on W Dask workers, the fixed costs (cluster
start, model hash, model load per worker), the per-partition overhead of the engine, and the memory
a worker holds. The numbers docs/scale.md's throughput model is built from.

    python benchmarks/corpus.py                              # base-size random model, 2000 texts, 2 workers
    python benchmarks/corpus.py --config small --texts 200   # a quick check that it runs
    python benchmarks/corpus.py --workers 4 --json corpus.json

Needs the scale extra (``pip install '.[scale]'``). The model is a random checkpoint of the chosen
size written with NumPy (tests/corpus_checkpoints.py) into a temporary folder; texts are 8-24
random words (~12-30 tokens). Runs, each into a fresh output folder, on a cluster started
beforehand (its start is timed on its own):

* ``1 process, 1 thread`` and ``1 process, 2 threads`` (each batch as two halves on two threads);
* ``W workers x 1 thread``, and ``W workers x 2 threads`` when ``2 W`` does not exceed the cores;
* the per-partition overhead: the shipped tiny model (whose forward costs next to nothing) with
  partitions of one batch against partitions of 512 inputs, in one process and on the workers:
  ``(t_small - t_large) / (partitions_small - partitions_large)``.

Not a test: the numbers depend on the machine and on what else runs on it; quote them from one run
on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the NumPy-only random checkpoint writer

CONFIGS = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
}
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be has had it "
         "not but they have their one new after first two who been its also more time into other over only "
         "city river house music school film war game team world year people state family history").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(8, 25)))) for _ in range(n)]


def timed_run(job, **where) -> tuple[float, dict]:
    from refimpl import corpus

    t0 = time.perf_counter()
    summary = corpus.run(job, progress=False, **where)
    seconds = time.perf_counter() - t0
    with open(os.path.join(job.out, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert summary.errors == 0 and summary.computed == summary.partitions
    return seconds, manifest


def memory_during(client, job, out: str, min_records: int, result: dict) -> threading.Thread:
    """Ask every worker for corpus.memory_report once ``min_records`` partitions are finished."""
    from refimpl import corpus

    def poll():
        folder = os.path.join(out, "partitions")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            if os.path.isdir(folder) and len(os.listdir(folder)) >= min_records:
                try:
                    result.update(client.run(corpus.memory_report, job))
                except Exception as e:  # noqa: BLE001 - a worker between jobs; reported, not fatal
                    result["error"] = repr(e)
                return
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="base")
    p.add_argument("--texts", type=int, default=2000, help="texts per run (default 2000)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--partition-size", type=int, default=128, help="inputs per partition in the throughput runs")
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    p.add_argument("--overhead-texts", type=int, default=2000, help="texts of the per-partition overhead runs")
    p.add_argument("--model", default=None, help="a model folder to use instead of a random one")
    p.add_argument("--keep", default=None, help="keep the outputs in this folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args()

    import corpus_checkpoints
    import distributed
    from refimpl import corpus
    from refimpl.hub import SHIPPED

    root = args.keep or tempfile.mkdtemp(prefix="refimpl-corpus-bench-")
    os.makedirs(root, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "processor": platform.processor(), "python": platform.python_version()},
                     "args": vars(args)}
    try:
        model = args.model
        if model is None:
            t0 = time.perf_counter()
            model = corpus_checkpoints.write(os.path.join(root, "model"), "base", 0, **CONFIGS[args.config])
            print(f"wrote a random {args.config} model in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        weights = sum(os.path.getsize(f) for f in corpus.model_files(model) if f.endswith(".safetensors"))
        src = os.path.join(root, "texts.txt")
        with open(src, "w", encoding="utf-8") as f:
            f.write("\n".join(texts(args.texts)) + "\n")
        results["model"] = {"path": model, "config": args.config if args.model is None else "given",
                            "weights_bytes": weights}

        def job(name, threads=1, partition_size=None, model_=model, source=src):
            return corpus.make_job("embed", model_, source, os.path.join(root, name), batch_size=args.batch_size,
                                   partition_size=partition_size or args.partition_size, threads=threads)

        t0 = time.perf_counter()
        corpus.model_identity(model)
        results["model_hash_s"] = time.perf_counter() - t0

        runs = []

        def record(label, seconds, manifest, workers, threads):
            parts = manifest["partitions"]
            busy = sum(p["seconds"] for p in parts)
            row = {"run": label, "workers": workers, "threads": threads, "texts": args.texts, "seconds": seconds,
                   "texts_per_s": args.texts / seconds, "partitions": len(parts),
                   "compute_s": busy, "texts_per_s_per_busy_process": args.texts / busy}
            runs.append(row)
            print(f"{label:<28} {seconds:8.2f} s  {row['texts_per_s']:8.1f} texts/s  (partition compute {busy:.2f} s "
                  f"in all: {row['texts_per_s_per_busy_process']:.1f} texts/s per busy process)", file=sys.stderr)

        # ---- one process ------------------------------------------------------------------
        for threads in (1, 2):
            s, m = timed_run(job(f"one-{threads}", threads))
            record(f"1 process, {threads} thread(s)", s, m, 1, threads)

        # ---- W workers ----------------------------------------------------------------------
        w = args.workers
        t0 = time.perf_counter()
        cluster = distributed.LocalCluster(n_workers=w, threads_per_worker=1, processes=True, dashboard_address=None,
                                           silence_logs=50, env={k: "1" for k in ("OMP_NUM_THREADS",
                                                                                   "OPENBLAS_NUM_THREADS")})
        client = distributed.Client(cluster)
        results["cluster_start_s"] = time.perf_counter() - t0
        print(f"LocalCluster of {w} workers started in {results['cluster_start_s']:.1f} s", file=sys.stderr)
        try:
            from refimpl import cluster as rcluster

            probe = job("setup-probe")
            probe, _ = corpus.plan(probe)
            os.makedirs(probe.out, exist_ok=True)
            t0 = time.perf_counter()
            with rcluster.setup_on_workers(client, corpus.prepare_worker, corpus.release_worker, probe, "probe"):
                results["worker_setup_s"] = time.perf_counter() - t0  # model load + warm-up, all workers at once
            print(f"model loaded on every worker in {results['worker_setup_s']:.1f} s", file=sys.stderr)

            for threads in ((1, 2) if 2 * w <= (os.cpu_count() or 1) else (1,)):
                j = job(f"workers-{threads}", threads)
                memory: dict = {}
                poller = memory_during(client, j, j.out, w, memory) if threads == 1 else None
                s, m = timed_run(j, client=client)
                record(f"{w} workers x {threads} thread(s)", s, m, w, threads)
                if poller is not None:
                    poller.join(5)
                    results["worker_memory"] = memory
            # the same bytes as one process (the benchmark would mean nothing otherwise)
            for a, b in (("one-1", "workers-1"),):
                for sub in ("embeddings", "records"):
                    for name in os.listdir(os.path.join(root, a, sub)):
                        with open(os.path.join(root, a, sub, name), "rb") as fa, \
                                open(os.path.join(root, b, sub, name), "rb") as fb:
                            assert fa.read() == fb.read(), f"{a}/{sub}/{name} differs from {b}"
            results["same_bytes_one_process_vs_workers"] = True

            # ---- per-partition overhead (the tiny model) ----------------------------------------
            small_src = os.path.join(root, "overhead.txt")
            with open(small_src, "w", encoding="utf-8") as f:
                f.write("\n".join(texts(args.overhead_texts, seed=1)) + "\n")
            bs = 4
            overhead = {}
            for where, kw in (("one process", {}), (f"{w} workers", {"client": client})):
                times = {}
                for size in (bs, 512):
                    j = corpus.make_job("embed", SHIPPED["tiny"], small_src, os.path.join(root, f"ovh-{len(overhead)}-{size}"),
                                        batch_size=bs, partition_size=size)
                    times[size] = timed_run(j, **kw)
                n_small, n_large = times[bs][1]["partitions"], times[512][1]["partitions"]
                per = (times[bs][0] - times[512][0]) / (len(n_small) - len(n_large))
                overhead[where] = {"partitions": [len(n_small), len(n_large)], "seconds": [times[bs][0], times[512][0]],
                                   "per_partition_s": per}
                print(f"per-partition overhead, {where}: {per * 1e3:.1f} ms ({len(n_small)} partitions of {bs} in "
                      f"{times[bs][0]:.2f} s, {len(n_large)} of 512 in {times[512][0]:.2f} s)", file=sys.stderr)
            results["overhead"] = overhead
        finally:
            client.close()
            cluster.close()
        results["runs"] = runs
        mem = results.get("worker_memory", {})
        for addr, r in mem.items():
            if isinstance(r, dict) and "rss" in r:
                print(f"worker {addr}: rss {r['rss'] / 2**20:.0f} MiB, pss {r['pss'] / 2**20:.0f} MiB, anonymous "
                      f"{r['anonymous'] / 2**20:.0f} MiB; weights file {r['weights_file'] / 2**20:.0f} MiB mapped, "
                      f"resident {r['weights_rss'] / 2**20:.0f} MiB, its share (pss) {r['weights_pss'] / 2**20:.0f} MiB, "
                      f"copied {r['weights_anonymous'] / 2**20:.0f} MiB; {r['mapped_arrays']}/{r['arrays']} parameter "
                      f"arrays are views of the file", file=sys.stderr)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
        print(json.dumps({k: results[k] for k in ("model_hash_s", "cluster_start_s", "worker_setup_s")}, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
