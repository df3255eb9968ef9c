"""Builds weighted_loss._C against the torch already installed (use --no-build-isolation).

- CPU kernels always.
- CUDA kernels when torch has CUDA and a CUDA toolkit with its headers is found: CUDA_HOME, else
  where the `nvcc` on PATH says it lives (it may be a wrapper script), else torch's guess. Without
  one the build says why in one line and builds the CPU kernels. WEIGHTED_LOSS_CUDA=1 forces the
  CUDA build (FORCE_CUDA=1 too), WEIGHTED_LOSS_CUDA=0 the CPU-only one.
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
import shutil
import subprocess

from setuptools import find_packages, setup
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_home():
    """The toolkit the `nvcc` on PATH belongs to, as nvcc itself reports it (a wrapper script's
    own folder is not the toolkit's), or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in dry.splitlines():
        if "_HERE_=" in line:
            return os.path.dirname(line.split("_HERE_=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def has_headers(home):
    return home is not None and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def want_cuda():
    """Whether to build the CUDA kernels; points torch's build at the toolkit found."""
    switch = os.environ.get("WEIGHTED_LOSS_CUDA", os.environ.get("FORCE_CUDA", ""))
    if switch == "0":
        return False
    candidates = [("CUDA_HOME", os.environ.get("CUDA_HOME")), ("nvcc on PATH", nvcc_home()),
                  ("torch's guess", cpp_extension.CUDA_HOME)]
    home = next((h for _, h in candidates if has_headers(h)), None)
    if switch != "1" and (torch.version.cuda is None or home is None):
        if torch.version.cuda is not None:
            tried = ", ".join(f"{what} {h}" for what, h in candidates if h) or "none found"
            print(f"weighted_loss: building the CPU kernels only: torch has CUDA "
                  f"{torch.version.cuda} but no CUDA toolkit with include/cuda_runtime.h "
                  f"({tried}); set CUDA_HOME, or WEIGHTED_LOSS_CUDA=0 to silence this",
                  file=sys.stderr)
        return False
    if home is not None:  # torch's build reads nvcc and the headers from its CUDA_HOME
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
    return True


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


if __name__ == "__main__":  # (pip's build runs this file as __main__; tests import its functions)
    setup(
        name="weighted_loss",
        packages=find_packages(include=["weighted_loss", "weighted_loss.*"]),
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
