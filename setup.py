"""Builds resfast._C: the C++ (always) and CUDA (when a toolkit is found) kernels.

CUDA is built when torch is a CUDA build and nvcc is found (CUDA_HOME), or when
FORCE_CUDA=1; FORCE_CUDA=0 builds CPU only. Whether a GPU is present does not
matter, so the CUDA objects build on GPU-less CI machines. TORCH_CUDA_ARCH_LIST
picks the architectures (default: scripts/build_config.py).
"""

import glob
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts"))
import build_config  # noqa: E402


def _find_cuda_home():
    """torch guesses CUDA_HOME as the parent of nvcc's folder, which is wrong
    when nvcc on PATH is a link or wrapper (/usr/local/bin/nvcc): take the
    first candidate that really holds the toolkit's headers."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

def want_cuda() -> bool:
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def limit_parallel_jobs():
    """nvcc and the torch headers take ~2 GB per job: cap ninja by memory."""
    if "MAX_JOBS" in os.environ:
        return
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, int(pages * page_size / 2.5e9))
    except (ValueError, OSError):
        by_memory = 1
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, by_memory)))


def extension():
    # The libtorch build (CMakeLists.txt) compiles the same sources but for
    # the Python bindings (python_module.cpp) and the CUDA ones.
    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp"))
        + glob.glob(os.path.join("csrc", "common", "*.cpp"))
        + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    macros = [("RESFAST_TORCH_VERSION", f'"{torch.__version__}"')]
    # The C++ standard is left to torch.utils.cpp_extension: torch 2.14 needs C++20.
    # OpenMP makes at::parallel_for parallel; the runtime is the one torch loads.
    # -fno-trapping-math: the code never reads floating-point exception flags,
    # and without it GCC keeps the float clamps of exp_vectorizable
    # (norm_act_math.h) as branches, which stops the SiLU loops vectorising.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    link = ["-fopenmp"]
    if not want_cuda():
        return CppExtension("resfast._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.cuda_archs()
    includes, libs = build_config.nvidia_wheel_paths()
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    macros.append(("RESFAST_WITH_CUDA", None))
    return CUDAExtension(
        "resfast._C",
        sources,
        define_macros=macros,
        include_dirs=includes,
        library_dirs=libs,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link,
    )


limit_parallel_jobs()

# Package metadata lives in pyproject.toml.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
