#!/usr/bin/env bash
# One command for a person with an NVIDIA GPU: install the gpu extra if needed, run the GPU tests,
# then time refimpl-CuPy against torch CUDA (eager and sdpa). Well under 10 minutes.
#   bash benchmarks/gpu_check.sh            (from the repository root, in the project's venv)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import cupy" 2>/dev/null || pip install --quiet ".[gpu]"
python -c "import torch, transformers" 2>/dev/null || pip install --quiet ".[test]"
python - <<'PY'
from refimpl.backend import cupy_status
ok, what = cupy_status()
print("GPU:", what)
raise SystemExit(0 if ok else 1)
PY
python -m pytest -q -m gpu tests/test_gpu.py
python benchmarks/gpu_bench.py
