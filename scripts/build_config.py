"""Build settings shared by setup.py (the Python extension) and CMakeLists.txt
(the libtorch build), stated once here.

`python scripts/build_config.py cmake` prints them as CMake `set()` lines.
"""

import os
import sys

# The GPU architectures compiled when TORCH_CUDA_ARCH_LIST is not set: Ampere
# and Hopper (the machines resfast targets; no GPU is needed to build them).
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_archs() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)


def nvidia_wheel_paths():
    """(include dirs, library dirs) of the CUDA wheels torch depends on
    (nvidia/cu13 or cu12), which hold headers and libraries (cuBLAS, cuSPARSE,
    nvrtc, ...) that the system toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return [], []
    includes, libs = [], []
    for root in nvidia.__path__:
        for sub in ("cu13", "cu12"):
            base = os.path.join(root, sub)
            if os.path.isdir(os.path.join(base, "include")):
                includes.append(os.path.join(base, "include"))
                libs.append(os.path.join(base, "lib"))
    return includes, libs


if __name__ == "__main__":
    if sys.argv[1:] != ["cmake"]:
        sys.exit("usage: python scripts/build_config.py cmake")
    print(f'set(RESFAST_CUDA_ARCHS "{cuda_archs()}")')
    print(f'set(RESFAST_NVIDIA_WHEEL_LIBS "{";".join(nvidia_wheel_paths()[1])}")')
