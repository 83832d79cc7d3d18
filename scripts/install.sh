#!/usr/bin/env bash
# Installs resfast's dependencies into the active Python environment and builds
# the extension in place (editable). The CUDA kernels are compiled whenever a
# CUDA toolkit is found, GPU or not (FORCE_CUDA=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q torch==2.14.1 torchvision==0.29.1 pybind11 ninja setuptools wheel \
  pytest pytest-benchmark hypothesis expecttest timm matplotlib tqdm

# The CUDA 13 headers and libraries torch's headers need ship in the nvidia
# wheels torch depends on.
NV=$(python -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))" 2>/dev/null || true)
if [ -n "$NV" ] && [ -d "$NV/include" ]; then
  export CPATH="$NV/include${CPATH:+:$CPATH}" LIBRARY_PATH="$NV/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import resfast, resfast._C as c; print('resfast built: torch', c.torch_version, '| CUDA kernels:', c.with_cuda)"
