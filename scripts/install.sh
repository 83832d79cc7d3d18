#!/usr/bin/env bash
# Installs resfast's dependencies into the active Python environment and builds
# the extension in place (editable). The CUDA kernels are compiled whenever a
# CUDA toolkit is found, GPU or not (FORCE_CUDA=0 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q torch==2.14.1 torchvision==0.29.1 pybind11 ninja setuptools wheel \
  pytest pytest-benchmark hypothesis expecttest timm matplotlib tqdm \
  diffusers monai segmentation-models-pytorch

# setup.py finds the CUDA headers and libraries of the nvidia wheels torch
# depends on, and the GPU architectures (scripts/build_config.py).
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import resfast, resfast._C as c; print('resfast built: torch', c.torch_version, '| CUDA kernels:', c.with_cuda)"
