#!/usr/bin/env bash
# On a GPU machine without network access (torch, triton and the build tools
# already installed), in one call of at most 10 minutes: build the extension,
# run the CUDA test suite, check every convolution engine at real layer shapes
# (and the per-shape choice), and benchmark bfloat16 channels_last against
# eager and torch.compile(mode="max-autotune"). Logs and JSON go to $OUT
# (default: benchmarks/results/gpu-<date>).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}"
mkdir -p "$OUT"
# Build for this GPU only (the default list, scripts/build_config.py, takes twice as long).
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST
# Per-shape choices measured here land beside the results.
export RESFAST_CACHE_DIR="$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
  date -u
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
timeout 240 pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
# The cudnn engine's optional package, carried as a wheel (README: "The CUDA design").
for wheel in build/wheels/nvidia_cudnn_frontend-*.whl; do
  [ -e "$wheel" ] && pip install --no-deps "$wheel" >> "$OUT/build.log" 2>&1
done
python -c "import cudnn; print('nvidia-cudnn-frontend', cudnn.__version__, 'backend', cudnn.backend_version())" \
  >> "$OUT/environment.txt" 2>&1 || echo "nvidia-cudnn-frontend: not installed (no cudnn engine)" >> "$OUT/environment.txt"
# The CUDA tests (the gloo ones are CPU-only); what ran before the budget is in the log.
timeout 200 python -m pytest tests -q -p no:cacheprovider --ignore=tests/test_fsdp.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/tests.log"
timeout 90 python benchmarks/gpu_engines.py --json "$OUT/engines.json" > "$OUT/engines.txt" 2>&1
engines_rc=$?
cat "$OUT/engines.txt"
timeout 150 python -m resfast.bench --suite ops --compile-mode max-autotune --json "$OUT/bench-ops.json" \
  > "$OUT/bench-ops.txt" 2>&1
bench_rc=$?
cat "$OUT/bench-ops.txt"
timeout 60 python -m resfast.bench --suite models --quick --no-compile --json "$OUT/bench-models.json" \
  > "$OUT/bench-models.txt" 2>&1 || bench_rc=$?
cat "$OUT/bench-models.txt"
exit $(( tests_rc || engines_rc || bench_rc ))
