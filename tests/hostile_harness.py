"""Loading hostile files in a child process, under a memory cap and a timeout, measuring each load.

``run_cases(cases)`` starts one Python process, warms it up (imports, the shipped tiny model, a
BLAS call, so that lazy one-time allocations are not billed to a case) and runs the cases one
after the other. For each case it sets ``RLIMIT_AS`` to the current address space plus
:data:`CAP` plus the bytes the case may legitimately map, resets the peak-RSS counter
(``/proc/self/clear_refs``), runs the case's code and reports: the outcome (or the exception's
type, class hierarchy and message), the CPU seconds and the peak RSS growth. A case that hangs is
killed after :data:`CASE_TIMEOUT` wall seconds and reported as ``Timeout``; the remaining cases run
in a fresh process. So the suite can never hang, and a bomb costs at most the cap.

The acceptance for every file of at most 2 MB: at most :data:`MAX_CPU` CPU seconds and
:data:`MAX_RSS` bytes of peak RSS beyond the bytes the load legitimately maps (the file size).
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading

MAX_CPU = 2.0  # seconds of CPU per load
MAX_RSS = 256 * 2**20  # peak RSS growth per load, beyond the file's own bytes
CAP = 768 * 2**20  # RLIMIT_AS headroom: a bomb stops here (MemoryError) instead of taking the machine
CASE_TIMEOUT = 30.0  # wall seconds per case (the CPU limit is what is asserted)
START_TIMEOUT = 120.0  # wall seconds for the child's imports and warm-up

_CHILD = r"""
import contextlib, gc, io, json, os, resource, sys, time
import numpy as np
import refimpl, refimpl.torch_pickle, refimpl.tokenizer, refimpl.golden, refimpl.cli
import refimpl_conversion, refimpl_conversion.loaders, refimpl_conversion.fairseq

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

def reset_peak():  # (where clear_refs is not writable, the peak since start-up is measured instead)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

refimpl.from_pretrained("tiny")  # warm-up: lazy imports, the numba backend, BLAS threads
np.ones((64, 64)) @ np.ones((64, 64))
cases = json.loads(sys.stdin.read())
print(json.dumps({"ready": True}), flush=True)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
for case in cases:
    namespace = {"P": case["path"], "refimpl": refimpl, "np": np}
    gc.collect()
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + case["cap"], hard))
    reset_peak()
    rss0 = status("VmHWM")
    t0 = time.process_time()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # stdout carries the results
            exec(case["code"], namespace)
        out = {"ok": True}
    except BaseException as e:
        out = {"ok": False, "type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
               "message": str(e)[:4000], "message_length": len(str(e))}
    cpu = time.process_time() - t0
    peak = status("VmHWM") - rss0
    namespace.clear()
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print(json.dumps({"name": case["name"], "cpu": cpu, "peak": peak, **out}), flush=True)
"""


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    return env


class Cases:
    """A test module's hostile cases, registered with ``@cases(name, error=..., match=...)`` on a
    function that builds the case's files in a folder and returns ``{"path", "code", "mapped"}``."""

    def __init__(self, default_error: str | None):
        self.builders: dict = {}
        self.expect: dict = {}
        self.default_error = default_error

    def __call__(self, name: str, error: str | None = "default", match: str | None = None):
        def register(build):
            self.builders[name] = build
            self.expect[name] = (self.default_error if error == "default" else error, match)
            return build

        return register

    def names(self) -> list[str]:
        return list(self.builders)

    def run(self, folder) -> tuple[dict, dict]:
        return run_module_cases(self.builders, folder)

    def check(self, outcomes: tuple[dict, dict], name: str) -> None:
        specs, results = outcomes
        error, match = self.expect[name]
        check(results[name], error=error, match=match, mapped=specs[name]["mapped"])


def run_module_cases(builders: dict, folder) -> tuple[dict[str, dict], dict[str, dict]]:
    """Build every case's files in ``folder`` (``builders``: name -> function(folder) -> case dict)
    and run them in one child: -> (the case dicts, the results), both by name."""
    specs = {}
    for name, build in builders.items():
        where = folder / name
        where.mkdir()
        specs[name] = {"name": name, "path": "", "mapped": 0, **build(where)}
    results = run_cases(list(specs.values()))
    print("\n" + summary(results))
    return specs, results


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_cases(cases: list[dict]) -> dict[str, dict]:
    """Run ``cases`` (dicts with ``name``, ``path``, ``code`` and optional ``mapped`` bytes) -> results by name."""
    todo = [{"cap": CAP + int(c.get("mapped", 0)), **c} for c in cases]
    results: dict[str, dict] = {}
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        proc.stdin.write(json.dumps(todo))
        proc.stdin.close()
        timeout = START_TIMEOUT
        try:
            while todo:
                try:
                    line = lines.get(timeout=timeout)
                except queue.Empty:
                    results[todo[0]["name"]] = {"ok": False, "type": "Timeout", "mro": ["Timeout"], "cpu": None,
                                                "peak": None, "message": f"still running after {timeout:.0f} s"}
                    todo.pop(0)
                    break
                if line is None:  # the child died (killed for memory, or crashed)
                    proc.wait(timeout=10)
                    err = proc.stderr.read()[-2000:]
                    results[todo[0]["name"]] = {"ok": False, "type": "Died", "mro": ["Died"], "cpu": None, "peak": None,
                                                "message": f"exit status {proc.returncode}: {err}"}
                    todo.pop(0)
                    break
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # not a result line (something printed below Python's sys.stdout)
                if r.get("ready"):
                    timeout = CASE_TIMEOUT
                    continue
                results[r["name"]] = r
                todo = [c for c in todo if c["name"] != r["name"]]
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()
    return results


def check(result: dict, *, error: str | None = None, match: str | None = None, mapped: int = 0) -> None:
    """A bounded load: within MAX_CPU and MAX_RSS (+ ``mapped``), ending in ``error`` (a class name
    in the exception's hierarchy) whose one bounded message matches ``match`` (None: success)."""
    assert result.get("type") not in ("Timeout", "Died"), result
    assert result["cpu"] <= MAX_CPU, f"{result['cpu']:.2f} s of CPU: {result}"
    assert result["peak"] <= MAX_RSS + mapped, f"peak RSS grew by {result['peak'] / 2**20:.0f} MiB: {result}"
    if error is None:
        assert result["ok"], result
        return
    assert not result["ok"] and error in result["mro"], result
    assert result["message_length"] <= 2000, f"a {result['message_length']}-character message"
    assert "MemoryError" not in result["message"], result  # the cap was hit (and the error disguised)
    if match is not None:
        assert re.search(match, result["message"]), result["message"]


def summary(results: dict[str, dict]) -> str:
    """One line per case: CPU seconds and peak RSS growth (for the record)."""
    rows = []
    for name, r in sorted(results.items()):
        cpu = "-" if r.get("cpu") is None else f"{r['cpu']:.3f}s"
        peak = "-" if r.get("peak") is None else f"{r['peak'] / 2**20:.1f}MiB"
        rows.append(f"{name:40} {cpu:>8} {peak:>9} {r.get('type', 'ok')}")
    return "\n".join(rows)
