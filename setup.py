"""Builds weighted_loss._C against the torch already installed (use --no-build-isolation).

- CPU kernels always.
- CUDA kernels when torch has CUDA and CUDA_HOME is set, or FORCE_CUDA=1.
- Without debug info (-g0) unless WEIGHTED_LOSS_DEBUG=1.
The CUDA emulator (test infrastructure) is not part of it: tests/emulation.py builds it as an
extension of its own.
"""
import glob
import os
import sys

try:
    import torch
except ModuleNotFoundError:
    sys.exit("weighted_loss builds against the torch you have installed: install torch first, then "
             "`pip install --no-build-isolation .` (an isolated build cannot see your torch)")
TORCH_MIN = (2, 11)  # the oldest built and tested; pyproject.toml's dependencies say the same
if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < TORCH_MIN:
    sys.exit(f"weighted_loss needs torch>={TORCH_MIN[0]}.{TORCH_MIN[1]}, found {torch.__version__}")
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    # -ffp-contract=off: the compiler may fuse a * b - c into an FMA in one inlined copy of a
    # kernel and not in another (at::parallel_for inlines the body once for the one-thread path
    # and once for the threaded one), which changed the last bit of results with the thread
    # count. FMAs are written out (at::vec::fmadd) where they are wanted.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
    # Python's CFLAGS carry -g: without -g0 after them _C.so is ~10x its code in debug info
    # (WEIGHTED_LOSS_DEBUG=1 keeps it)
    if os.environ.get("WEIGHTED_LOSS_DEBUG", "0") != "1":
        cxx.append("-g0")
    link = ["-fopenmp"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # +PTX: GPUs newer than sm_90 (Blackwell) JIT-compile the sm_90 PTX instead of failing
            # with "no kernel image is available"
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        return CUDAExtension(
            "weighted_loss._C",
            srcs + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DWEIGHTED_LOSS_CUDA"],
                                # no --use_fast_math: it turns logf and float division into
                                # approximations and flushes denormals, so results would differ
                                # from PyTorch's; the kernels call __expf where they mean it
                                "nvcc": ["-O3", "-DWEIGHTED_LOSS_CUDA"]},
            extra_link_args=link,
        )
    return CppExtension("weighted_loss._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="weighted_loss",
    packages=find_packages(include=["weighted_loss", "weighted_loss.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
