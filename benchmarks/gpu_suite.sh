#!/usr/bin/env bash
# On a GPU machine without network access (torch, triton and the build tools
# already installed): build the extension, run the CUDA test suite and the
# benchmark, and write logs and JSON to $OUT (default: benchmarks/results/gpu-<date>).
# Fits in 10 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}"
mkdir -p "$OUT"
# Build for this GPU only (the default list, scripts/build_config.py, takes twice as long).
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -m pytest tests -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"
python -m resfast.bench --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
bench_rc=$?
cat "$OUT/bench.txt"
exit $(( tests_rc || bench_rc ))
