"""How long the first answer takes: ``refimpl fill-mask --model tiny "Hello <mask> world"`` as a whole process.

    python benchmarks/cli_latency.py [--rounds 5] [--json benchmarks/results/cli_latency.json]

Each candidate is a fresh process, timed by wall clock from start to exit; candidates take turns in
rounds (so whatever else the machine does falls on all of them) and the table reports medians and
ratios to transformers' warm pipeline measured in the same run, and the CPU time each process used
(user + system; on a machine shared with other work it says what wall clock would be unshared)
and its peak resident memory (``ru_maxrss``; Linux starts it from the launching process's resident
size, this script's, which is printed: a smaller figure than that is not measured).

- cold: an empty Numba cache (a fresh ``NUMBA_CACHE_DIR``), Python bytecode present: the first
  call after a fresh ``pip install`` (which writes bytecode at install time);
- bare: cold, and no Python bytecode at all either (a fresh ``PYTHONPYCACHEPREFIX``: every module,
  refimpl's and its dependencies', compiles from source): the worst case;
- warm: a Numba cache and bytecode written by an earlier (untimed) run.

Candidates: refimpl's default (``--backend auto``: the NumPy reference for this tiny model),
``--backend numba`` (the fast path, compiled on first use), ``refimpl --version``, and
transformers' ``pipeline("fill-mask", model=<the same folder>)`` in a fresh process (bare and warm:
it has no compile cache). The acceptance bounds of the default command (cold and bare <= 3 s,
warm <= 1 s) are checked and reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TEXT = "Hello <mask> world"
BOUNDS = {"refimpl auto cold": 3.0, "refimpl auto bare": 3.0, "refimpl auto warm": 1.0}  # s, wall clock of the process

HF_SCRIPT = """
import sys
from transformers import pipeline
fill = pipeline("fill-mask", model=sys.argv[1], device="cpu")
for r in fill(sys.argv[2], top_k=5):
    print(f"{r['score']:.3e}  {r['token_str']!r}")
"""


def refimpl_command() -> list[str]:
    """The installed console script when there is one (what a user runs), else ``python -m refimpl``."""
    script = os.path.join(os.path.dirname(sys.executable), "refimpl")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "refimpl"]


def run(argv: list[str], env: dict, cwd: str | None = None) -> tuple[float, float, float]:
    """(wall-clock seconds, CPU seconds: user + system, peak resident memory in MiB) of the process
    (with its threads; ``os.wait4`` reads the process's own resource usage)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {err.read().decode(errors='replace')[-2000:]}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cli_latency.json"))
    ap.add_argument("--no-transformers", action="store_true", help="leave out transformers' pipeline")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="another refimpl source tree (e.g. `git archive OLD | tar -x -C DIR`): its default command, "
                         "cold and warm, joins the candidates (run as python -m refimpl with PYTHONPATH=DIR)")
    args = ap.parse_args()

    from refimpl.hub import SHIPPED

    tiny = SHIPPED["tiny"]
    cli = refimpl_command()
    work = tempfile.mkdtemp(prefix="cli-latency-")
    warm_numba, warm_pyc = os.path.join(work, "numba-warm"), os.path.join(work, "pyc-warm")
    # Bytecode is written, as in a normal install (PYTHONDONTWRITEBYTECODE would make every run compile
    # every module from source, warm ones included).
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("NUMBA_CACHE_DIR", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    base_env.update(OMP_NUM_THREADS=base_env.get("OMP_NUM_THREADS", "2"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    TOKENIZERS_PARALLELISM="false")

    def env(mode: str, n: int, baseline: bool = False) -> dict:
        e = dict(base_env, PYTHONPATH=os.path.abspath(args.baseline)) if baseline else base_env
        # the baseline's Numba cache is its own (the same kernel sources may differ)
        numba_dir = os.path.join(work, f"numba-{n}") if mode != "warm" else warm_numba + ("-baseline" if baseline else "")
        return dict(e, NUMBA_CACHE_DIR=numba_dir, PYTHONPYCACHEPREFIX=os.path.join(work, f"pyc-{n}") if mode == "bare" else warm_pyc)

    fill = [*cli, "fill-mask", "--model", "tiny", TEXT]
    numba = [*fill[:-1], "--backend", "numba", TEXT]
    candidates = {  # name: (argv, mode, baseline); mode: bare (no Numba cache, no bytecode), cold (no Numba cache), warm
        "refimpl auto bare": (fill, "bare", False),
        "refimpl auto cold": (fill, "cold", False),
        "refimpl auto warm": (fill, "warm", False),
        "refimpl numba cold": (numba, "cold", False),
        "refimpl numba warm": (numba, "warm", False),
        "refimpl --version warm": ([*cli, "--version"], "warm", False),
    }
    if args.baseline:
        base_fill = [sys.executable, "-m", "refimpl", *fill[len(cli):]]
        candidates["baseline default cold"] = (base_fill, "cold", True)
        candidates["baseline default warm"] = (base_fill, "warm", True)
    if not args.no_transformers:
        hf = [sys.executable, "-c", HF_SCRIPT, tiny, TEXT]
        candidates["transformers bare"] = (hf, "bare", False)
        candidates["transformers warm"] = (hf, "warm", False)
    for argv, mode, baseline in candidates.values():  # untimed: fills the warm caches (and checks each one runs)
        if mode == "warm":
            run(argv, env(mode, 0, baseline), cwd=work)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    cpu: dict[str, list[float]] = {name: [] for name in candidates}
    peak: dict[str, list[float]] = {name: [] for name in candidates}
    n = 0
    try:
        for r in range(args.rounds):
            order = list(candidates) if r % 2 == 0 else list(reversed(candidates))
            for name in order:
                argv, mode, baseline = candidates[name]
                n += 1
                wall, used, mib = run(argv, env(mode, n, baseline), cwd=work)  # cwd: no checkout shadows PYTHONPATH
                times[name].append(wall)
                cpu[name].append(used)
                peak[name].append(mib)
                for d in (f"numba-{n}", f"pyc-{n}"):  # a cold run's caches are thrown away
                    shutil.rmtree(os.path.join(work, d), ignore_errors=True)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    med_cpu = {name: statistics.median(ts) for name, ts in cpu.items()}
    med_peak = {name: statistics.median(ts) for name, ts in peak.items()}
    launcher_mib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
    print(f"peak MiB: at least this script's own {launcher_mib:.0f} MiB (ru_maxrss starts from the launcher's)")
    ref = med.get("transformers warm")
    print(f"{'candidate':26s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'CPU s':>7s} {'peak MiB':>9s}"
          + ("  / transformers warm" if ref else ""))
    for name, ts in times.items():
        ratio = f"  {med[name] / ref:6.2f}x" if ref else ""
        print(f"{name:26s} {med[name]:9.2f} {min(ts):7.2f} {max(ts):7.2f} {med_cpu[name]:7.2f} {med_peak[name]:9.0f}{ratio}")
    acceptance = {name: {"median_s": med[name], "bound_s": bound, "ok": med[name] <= bound} for name, bound in BOUNDS.items()}
    for name, a in acceptance.items():
        print(f"acceptance: {name} median {a['median_s']:.2f} s <= {a['bound_s']:.1f} s: {'yes' if a['ok'] else 'NO'}")
    result = {
        "command": " ".join(fill),
        "rounds": args.rounds,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "seconds": times,
        "median_s": med,
        "cpu_seconds": cpu,
        "median_cpu_s": med_cpu,
        "peak_rss_mib": peak,
        "median_peak_rss_mib": med_peak,
        "launcher_peak_rss_mib": launcher_mib,
        "ratio_to_transformers_warm": {name: m / ref for name, m in med.items()} if ref else None,
        "acceptance": acceptance,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.json}")
    return 0 if all(a["ok"] for a in acceptance.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
