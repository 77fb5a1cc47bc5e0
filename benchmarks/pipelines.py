"""refimpl's pipelines against transformers' pipelines: fill-mask, classify and embed, interleaved.

    python benchmarks/pipelines.py                          # tiny and base-sized, JSON to results/
    python benchmarks/pipelines.py --sizes tiny --rounds 3

Models: ``tiny`` is the random checkpoint shipped with refimpl (``refimpl/data/tiny-random-mlm``,
copied with the RoBERTa tokenizer of ``tests/data/roberta-tokenizer``, whose ``tokenizer.json``
both libraries read alike; and ``tiny-random-sequence-classification``, with its own vocabulary,
for classify). ``base`` is roberta-base-sized (hidden
768, 12 layers, 12 heads, vocabulary 50,265) with random weights, built with transformers'
``RobertaPreLayerNorm*`` classes and written with ``save_pretrained`` to a temporary folder, which
both sides load. Both run float32; refimpl on its default backend (``numba``), transformers with
torch's default thread count.

Tasks, same texts and same ``batch_size`` on both sides:

* fill-mask: ``refimpl.pipelines.FillMask(top_k=5)`` vs ``pipeline("fill-mask", top_k=5)``;
* classify: ``TextClassification(top_k=1)`` vs ``pipeline("text-classification", top_k=1)``;
* embed: ``Embedding(pooling="cls")`` vs ``pipeline("feature-extraction", return_tensors=True)``
  followed by the same pooling (the ``<s>`` vector of each text), stacked into one array.

Before timing, the outputs are compared: the same top-k tokens and labels, scores and vectors
within float32 tolerance (refimpl.tolerances.PARITY). Candidates then take turns in rounds (the
order reversing each round); in a round each runs one untimed call (its warm-up, which also absorbs
the threads the other left spinning) and one timed call over all texts. Each side runs twice:
with its default threads (refimpl: the batch in two halves on two threads, torch: its default
thread count) and on one thread (refimpl with NumPy's BLAS limited to one thread; torch with
``set_num_threads(1)``): on a 2-core machine that other work also uses, one thread can be faster
than two that wait on each other. Two ratios, transformers' time over refimpl's (refimpl's
throughput in multiples of transformers'; higher is better for refimpl), from the medians of one
run: default threads on both sides, and the faster configuration of each. Peak memory: each side's
pipeline loaded and run once over the texts in a fresh process, its peak resident memory
(``VmHWM``, interpreter and libraries included). The JSON also keeps every timed call
(``rounds``) and the CPU seconds the hypervisor stole during it (``steal_s``, Linux).

Not a test: the numbers depend on the machine; quote ratios from one run, never bare times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(os.path.dirname(HERE), "tests", "data", "roberta-tokenizer")
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
WORDS = ("the a one cat dog house city river music film book story old new big small green blue quickly "
         "slowly runs reads sings walks over under near Paris France London Python machine learning "
         "people world day night").split()


def texts(n: int, seed: int, mask: bool) -> list[str]:
    """``n`` sentences of 4-16 words (deterministic); with ``mask``, one ``<mask>`` each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        if mask:
            words[rng.randrange(len(words))] = "<mask>"
        out.append(" ".join(words).capitalize() + ".")
    return out


def with_tokenizer(model_folder: str, folder: str) -> str:
    """A copy of a checkpoint folder with the RoBERTa tokenizer of tests/data (its ``tokenizer.json``
    gives ``<mask>`` its ``lstrip``, so transformers and refimpl tokenize alike) -> the copy."""
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(model_folder):
        if f in ("config.json", "model.safetensors") and os.path.abspath(model_folder) != os.path.abspath(folder):
            shutil.copy(os.path.join(model_folder, f), folder)
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), folder)
    return folder


def build_base(folder: str) -> dict[str, str]:
    """Random roberta-base-sized masked-LM and classifier checkpoints -> {task: folder}."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.RobertaPreLayerNormConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
                                          bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                                          layer_norm_eps=1e-5, num_labels=2,
                                          id2label={0: "negative", 1: "positive"},
                                          label2id={"negative": 0, "positive": 1}, **BASE)
    out = {}
    for task, cls in (("mlm", tf.RobertaPreLayerNormForMaskedLM),
                      ("classify", tf.RobertaPreLayerNormForSequenceClassification)):
        path = os.path.join(folder, "base-" + task)
        cls(config).eval().save_pretrained(path)
        out[task] = with_tokenizer(path, path)
    return out


def build(task: str, impl: str, folders: dict[str, str], batch_size: int):
    """One candidate: ``impl`` ("refimpl" or "transformers")'s pipeline for ``task``, as a callable
    mapping the texts to its outputs."""
    if impl == "refimpl":
        from refimpl import pipelines as P

        if task == "fill-mask":
            pipe, kwargs = P.FillMask(folders["mlm"], batch_size=batch_size), dict(top_k=5)
        elif task == "classify":
            pipe, kwargs = P.TextClassification(folders["classify"], batch_size=batch_size), dict(top_k=1)
        else:
            pipe, kwargs = P.Embedding(folders["mlm"], batch_size=batch_size), dict(pooling="cls")

        def run(xs):
            return pipe(xs, **kwargs)

        run.backend = pipe.model.backend
        return run
    import torch
    import transformers as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task == "fill-mask":
            hf_fill = tf.pipeline("fill-mask", model=folders["mlm"], tokenizer=folders["mlm"], top_k=5)
            return lambda xs: hf_fill(xs, batch_size=batch_size)
        if task == "classify":
            hf_cls = tf.pipeline("text-classification", model=folders["classify"], tokenizer=folders["classify"],
                                 top_k=1)
            return lambda xs: hf_cls(xs, batch_size=batch_size)
        hf_emb = tf.pipeline("feature-extraction", model=folders["mlm"], tokenizer=folders["mlm"],
                             return_tensors=True)

    def hf_embed(xs):
        with torch.inference_mode():
            return np.stack([t[0, 0].numpy() for t in hf_emb(xs, batch_size=batch_size)])

    return hf_embed


TASKS = ("fill-mask", "classify", "embed")


def candidates(folders: dict[str, str], batch_size: int):
    """{task: (refimpl callable, transformers callable, inputs have a mask)}, and refimpl's backend."""
    cands = {task: (build(task, "refimpl", folders, batch_size), build(task, "transformers", folders, batch_size),
                    task == "fill-mask") for task in TASKS}
    return cands, cands["fill-mask"][0].backend


def peak_memory(task: str, impl: str, folders: dict[str, str], n: int, batch_size: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads ``impl``'s pipeline for ``task`` and
    runs it once over the ``n`` texts: what a script doing that needs (interpreter and libraries
    included)."""
    # VmHWM, the process's own high-water mark: ru_maxrss would start from the parent's resident size
    # (Linux carries it over the fork and exec), and the parent here holds both libraries.
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import pipelines as B; "
            "task, impl, folders, n, bs = sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]), "
            "int(sys.argv[6]); B.build(task, impl, folders, bs)(B.texts(n, seed=1, mask=task == 'fill-mask')); "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) / 1024)")
    proc = subprocess.run([sys.executable, "-c", code, HERE, task, impl, json.dumps(folders), str(n), str(batch_size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peak memory of {impl} {task} failed: {proc.stderr.strip()[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def check(task: str, ours, theirs) -> float:
    """Same tokens/labels; the largest score or vector difference (it must be within PARITY float32)."""
    from refimpl.tolerances import PARITY

    if task == "embed":
        err = float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))
    else:
        flat_o = [p for r in ours for p in r]
        flat_t = [p for r in theirs for p in r]
        key = "token" if task == "fill-mask" else "label"
        if [p[key] for p in flat_o] != [p[key] for p in flat_t]:
            raise SystemExit(f"{task}: refimpl and transformers disagree on the {key}s")
        err = max(abs(p["score"] - q["score"]) for p, q in zip(flat_o, flat_t))
    if err > PARITY["float32"]:
        raise SystemExit(f"{task}: refimpl and transformers differ by {err:.2e} > {PARITY['float32']:.0e}")
    return err


def torch_one_thread(fn):
    """``fn`` with torch on one thread (restored after)."""
    import torch

    def run(xs):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(xs)
        finally:
            torch.set_num_threads(before)

    return run


def blas_one_thread(fn):
    """``fn`` with NumPy's BLAS on one thread: refimpl then runs each batch as one stream."""
    from threadpoolctl import threadpool_limits

    def run(xs):
        with threadpool_limits(1, user_api="blas"):
            return fn(xs)

    return run


def steal_seconds() -> float | None:
    """CPU time the hypervisor gave to others so far, all CPUs together (Linux ``/proc/stat``'s
    steal column; None elsewhere): on a VM, a round with much steal was slowed by the host, and a
    two-thread candidate waits for a held-back core more than a one-thread one."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def measure(size: str, folders: dict[str, str], n: int, batch_size: int, rounds: int) -> dict:
    cands, backend = candidates(folders, batch_size)
    results = {}
    for task, (ours, theirs, mask) in cands.items():
        xs = texts(n, seed=1, mask=mask)
        err = check(task, ours(xs), theirs(xs))
        runs = [("refimpl", ours), ("transformers", theirs),
                ("refimpl-1-thread", blas_one_thread(ours)), ("transformers-1-thread", torch_one_thread(theirs))]
        times: dict[str, list] = {name: [] for name, _ in runs}
        steal: dict[str, list] = {name: [] for name, _ in runs}
        for r in range(rounds):
            for name, fn in (runs if r % 2 == 0 else runs[::-1]):
                fn(xs[:batch_size])  # warm-up: steady state, and the other side's spinning threads absorbed
                s0, t0 = steal_seconds(), time.perf_counter()
                fn(xs)
                times[name].append(time.perf_counter() - t0)
                s1 = steal_seconds()
                steal[name].append(None if s0 is None or s1 is None else round(s1 - s0, 2))
        med = {k: statistics.median(v) for k, v in times.items()}
        ours_best = min(med["refimpl"], med["refimpl-1-thread"])
        theirs_best = min(med["transformers"], med["transformers-1-thread"])
        peak = {impl: peak_memory(task, impl, folders, n, batch_size) for impl in ("refimpl", "transformers")}
        results[task] = dict(texts=n, batch_size=batch_size, median_s=med,
                             ratio_default_threads=med["transformers"] / med["refimpl"],
                             ratio_best=theirs_best / ours_best, max_difference=err, rounds=times, steal_s=steal,
                             peak_rss_mib=peak)
        print(f"{size:5s} {task:10s} {n:4d} texts  " + "  ".join(f"{k} {v:.3f} s" for k, v in med.items())
              + f"  ratio (default threads) {med['transformers'] / med['refimpl']:.2f}x"
              + f"  ratio (best of each) {theirs_best / ours_best:.2f}x"
              + f"  peak MiB refimpl {peak['refimpl']:.0f} transformers {peak['transformers']:.0f}", flush=True)
    return dict(backend=backend, tasks=results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    ap.add_argument("--tiny-texts", type=int, default=500)
    ap.add_argument("--base-texts", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "pipelines.json"))
    args = ap.parse_args(argv)

    import torch
    import transformers

    from refimpl.hub import SHIPPED

    out = dict(machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                            python=sys.version.split()[0], numpy=np.__version__, torch=torch.__version__,
                            torch_threads=torch.get_num_threads(), transformers=transformers.__version__),
               rounds=args.rounds, sizes={})
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            if size == "tiny":
                folders = {"mlm": with_tokenizer(SHIPPED["tiny"], os.path.join(tmp, "tiny-mlm")),
                           "classify": SHIPPED["tiny-classify"]}  # its own 1,000-token vocabulary
                n = args.tiny_texts
            else:
                folders = build_base(tmp)
                n = args.base_texts
            out["sizes"][size] = measure(size, folders, n, args.batch_size, args.rounds)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
