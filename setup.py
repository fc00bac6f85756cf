"""Build of the fused_softmax_ce extension.

CUDA is built when torch has CUDA, nvcc is found and a GPU is visible;
FSCE_CUDA=0 skips it and FSCE_CUDA=1 requires it (a machine with no GPU
building for a GPU cluster, or CI). ccache, when on PATH, wraps the compilers
(torch's BuildExtension does it). TORCH_CUDA_ARCH_LIST picks the GPU architectures
(default: the visible GPU, else a list of current data-centre and desktop
parts). Use `pip install --no-build-isolation .` so that the build compiles
against the torch already installed (see README).
"""
import glob
import os
import shutil

from setuptools import setup

# torch otherwise guesses /usr/local when nvcc is not on PATH.
if "CUDA_HOME" not in os.environ and shutil.which("nvcc") is None:
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name} must be 0, 1 or auto, got {value!r}")


def _build_cuda():
    forced = _flag("FSCE_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced and not available:
        raise RuntimeError(
            f"FSCE_CUDA=1 but torch {torch.__version__} has CUDA {torch.version.cuda} "
            f"and CUDA_HOME is {CUDA_HOME}; install a CUDA build of torch and the CUDA toolkit"
        )
    # Auto: only where the kernels can run; compiling them for six
    # architectures on a machine with no GPU takes most of a fresh set-up.
    return available and torch.cuda.is_available() if forced is None else forced


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline OpenMP in the headers; the runtime is
    # the libgomp torch has already loaded.
    cxx = ["-O3", "-fno-math-errno", "-fopenmp"]
    if not _build_cuda():
        return CppExtension("fused_softmax_ce._C", sources, extra_compile_args={"cxx": cxx})
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-std=c++17"]
    return CUDAExtension(
        "fused_softmax_ce._C",
        sources,
        extra_compile_args={"cxx": cxx + ["-DFSCE_WITH_CUDA"], "nvcc": nvcc},
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
