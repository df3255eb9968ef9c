"""Builds weighted_loss._C against the torch already installed (use --no-build-isolation).

CPU kernels always; CUDA kernels too when torch has CUDA and CUDA_HOME is set, or FORCE_CUDA=1.
"""
import glob
import os

import torch
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
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        return CUDAExtension(
            "weighted_loss._C",
            srcs + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx + ["-DWEIGHTED_LOSS_CUDA"],
                                "nvcc": ["-O3", "-DWEIGHTED_LOSS_CUDA", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("weighted_loss._C", srcs, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


setup(
    name="weighted_loss",
    packages=find_packages(include=["weighted_loss", "weighted_loss.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
