"""Peak memory of reading a ~400 MB pytorch_model.bin: this repo's reader vs torch.load.

Writes a float32 state dict with torch into a temp dir, then measures each loader in a fresh
subprocess: load, then touch every tensor (sum it), then read the process's peak RSS (VmHWM).
The table reports the peak minus the process's RSS just before loading (imports done), as a
ratio to the tensor bytes, and where the memory sits at the end: anonymous (private copies) or
file-backed (page cache mapped from the checkpoint, which the kernel can drop and re-read).

    python benchmarks/bin_load_memory.py [--mb 400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOADERS = {
    "refimpl load_state_dict (mmap)": (
        "from refimpl.torch_pickle import load_state_dict",
        "sd = load_state_dict(path)",
        "sum(float(a.sum(dtype='float64')) for a in sd.values())",
    ),
    "torch.load(weights_only=True)": (
        "import torch",
        "sd = torch.load(path, weights_only=True)",
        "sum(float(t.sum(dtype=torch.float64)) for t in sd.values())",
    ),
    "torch.load(mmap=True, weights_only=True)": (
        "import torch",
        "sd = torch.load(path, mmap=True, weights_only=True)",
        "sum(float(t.sum(dtype=torch.float64)) for t in sd.values())",
    ),
}

CHILD = """
import json, sys, time
def status():
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, rest = line.partition(':')
            if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
                out[key] = int(rest.split()[0]) * 1024
    return out
path = sys.argv[1]
IMPORT
import numpy
before = status()
t0 = time.perf_counter()
LOAD
t1 = time.perf_counter()
total = TOUCH
t2 = time.perf_counter()
after = status()
print(json.dumps(dict(before=before, after=after, load_s=t1 - t0, touch_s=t2 - t1, total=total)))
"""


def run_child(loader: str, path: str) -> dict:
    imp, load, touch = LOADERS[loader]
    code = CHILD.replace("IMPORT", imp).replace("LOAD", load).replace("TOUCH", touch)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code, path], check=True, capture_output=True, text=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def drop_page_cache_of(path: str) -> None:
    """Ask the kernel to forget the file's cached pages so that each run starts cold-ish."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (AttributeError, OSError):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="tensor megabytes to write")
    args = parser.parse_args()

    import torch

    n_tensors = 25
    per = args.mb * 2**20 // 4 // n_tensors
    cols = 1024
    rows = max(per // cols, 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pytorch_model.bin")
        g = torch.Generator().manual_seed(0)
        sd = {f"layer.{k}.weight": torch.randn(rows, cols, generator=g) for k in range(n_tensors)}
        tensor_bytes = sum(t.numel() * t.element_size() for t in sd.values())
        torch.save(sd, path)
        del sd
        mib = 2**20
        print(f"state dict: {n_tensors} float32 tensors, {tensor_bytes / mib:.0f} MiB "
              f"(file {os.path.getsize(path) / mib:.0f} MiB)")
        header = (f"{'loader':42s} {'peak-base MiB':>13s} {'ratio':>6s} {'anon MiB':>9s} "
                  f"{'file MiB':>9s} {'load s':>7s} {'touch s':>8s}")
        print(header)
        print("-" * len(header))
        sums = set()
        for loader in LOADERS:
            drop_page_cache_of(path)
            r = run_child(loader, path)
            peak = r["after"]["VmHWM"] - r["before"]["VmRSS"]
            anon = r["after"]["RssAnon"] - r["before"]["RssAnon"]
            file_ = r["after"]["RssFile"] - r["before"]["RssFile"]
            sums.add(round(r["total"], 3))
            print(f"{loader:42s} {peak / mib:13.0f} {peak / tensor_bytes:6.2f} "
                  f"{anon / mib:9.0f} {file_ / mib:9.0f} {r['load_s']:7.3f} {r['touch_s']:8.3f}")
        if len(sums) != 1:
            raise SystemExit(f"loaders disagree on the tensor sums: {sums}")
        print("ratio = (peak RSS - RSS after imports) / tensor bytes; anon/file = RSS growth by kind")


if __name__ == "__main__":
    main()
