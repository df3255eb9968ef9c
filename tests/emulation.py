"""The CUDA kernels on CPU tensors, through the emulator of the CUDA execution model
(tests/emulator/), so that they run, and are checked against PyTorch, on any machine. Test
infrastructure: a separate extension (op namespace ``weighted_loss_emulated``) that the product
(weighted_loss._C) neither compiles nor imports.

    python tests/emulation.py             builds it (make test does), into build/emulated/
    from emulation import emulated_cuda   (tests/ on sys.path)
    with emulated_cuda():
        loss = wl.cross_entropy(x, t, weight=w)   # CPU tensors, CUDA kernels
        loss.backward()
    emulated_launches()                   # {"forward_rows_kernel<float, 0, true, 32>": 3, ...}

The extension is the .cu files built by the host compiler against the emulator
(tests/emulated/*.cpp) with the device-agnostic glue (csrc/cross_entropy.cpp, ...); within
emulated_cuda() it registers their launchers for the CPU dispatch key of the weighted_loss ops,
over the CPU kernels. The emulator runs each block's threads as fibers, so barriers and warp
shuffles are real, and it fails a launch loudly on barrier divergence, missing shuffle lanes, bad
launch shapes and device asserts. It cannot show timing, the memory model or bank conflicts.

WEIGHTED_LOSS_SANITIZE=1 builds and loads an AddressSanitizer/UBSan build (build/asan/emulated,
for make cuda-emu-asan). The build needs the CUDA headers (a toolkit's or NVIDIA's header wheels:
tests/emulated/headers.py).
"""
import contextlib
import os
import runpy
import sys
from typing import Dict, Iterator

import torch

import weighted_loss  # noqa: F401  (defines the ops the emulated kernels are registered for)

__all__ = ["build", "emulator_available", "emulated_cuda", "emulating", "cpu_kernels",
           "emulated_launches"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the emulator (header-only) and the .cu files built for it, beside this file
EMULATOR = os.path.join(ROOT, "tests", "emulator")
EMULATED = os.path.join(ROOT, "tests", "emulated")
NAME = "weighted_loss_emulated"
_active = []  # (sm_count, shuffle_blocks) of each emulated_cuda() entered and not left
_loaded = []  # the error of a failed build, or True once loaded


def _sanitized():
    return os.environ.get("WEIGHTED_LOSS_SANITIZE", "0") == "1"


def _flags():
    # the flags setup.py gives the product's host code, and those torch gives nvcc (no implicit
    # half/bfloat16 conversions); -ffp-contract=off as the product: the same FMAs in every copy
    cxx = ["-std=c++20", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off", "-g0",
           "-Wno-unknown-pragmas", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    link = ["-fopenmp"]
    if _sanitized():
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        # -O0 -g1: a quarter of -O1's compile time, and line numbers in the reports
        cxx = ["-O0", "-g1", "-fno-omit-frame-pointer"] + [f for f in cxx if f != "-g0"] + san
        link += san
    else:
        # -O1: half of -O3's compile time (53 -> 25 s for the largest file), and the emulated suite
        # runs as fast (128 s vs 140 s); the same results bit for bit (tests/snapshot.py
        # --device emulated, 398 cases) but for the sign of some NaNs
        cxx = ["-O1"] + cxx
    return cxx, link


def _sources():
    glue = ["cross_entropy.cpp", "cross_entropy_layout.cpp", "cross_entropy_shard.cpp",
            "cross_entropy_overlap.cpp", "binary_cross_entropy.cpp"]
    return ([os.path.join(ROOT, "csrc", f) for f in glue] +
            sorted(os.path.join(EMULATED, f) for f in os.listdir(EMULATED) if f.endswith(".cpp")))


def build(verbose: bool = False) -> str:
    """Builds the extension where it is out of date (ninja: only what changed) and loads it into
    torch.ops.weighted_loss_emulated; returns the library's path."""
    from torch.utils.cpp_extension import load
    find = runpy.run_path(os.path.join(EMULATED, "headers.py"))["find"]
    includes = find()
    if includes is None:
        raise RuntimeError(
            "the CUDA emulator needs the CUDA headers (cuda_runtime_api.h, cuda_bf16.h, "
            "cuda_fp16.h): a CUDA toolkit, or `make cuda-headers` (NVIDIA's header wheels)")
    where = os.path.join(ROOT, "build", "asan" if _sanitized() else "", "emulated")
    os.makedirs(where, exist_ok=True)
    cxx, link = _flags()
    load(NAME, _sources(), extra_cflags=cxx, extra_ldflags=link,
         extra_include_paths=[os.path.join(ROOT, "csrc"), EMULATOR] + includes,
         build_directory=where, is_python_module=False, verbose=verbose)
    return os.path.join(where, NAME + ".so")


def _load():
    if not _loaded:
        try:
            build()
            _loaded.append(True)
        except Exception as e:  # noqa: BLE001  (said again by every use, below)
            _loaded.append(e)
    return _loaded[0]


def emulator_available() -> bool:
    """Whether the emulated CUDA kernels are built (building them if they are not) and loaded."""
    return _load() is True


def _require():
    state = _load()
    if state is not True:
        raise RuntimeError(f"the emulated CUDA kernels could not be built: {state}")


@contextlib.contextmanager
def emulated_cuda(sm_count: int = 132, shuffle_blocks: bool = True) -> Iterator[None]:
    """Within this context, ``wl.cross_entropy``, ``wl.binary_cross_entropy_with_logits`` and every
    loss built on their ops run, on CPU tensors, the CUDA kernels (forward, backward, autograd,
    every semantic) through the emulator, in this process.

    ``sm_count``: what the emulated device reports as its number of SMs (an H100's 132 by
    default), which the kernels' launch plans read; a small value reaches the paths meant for few
    rows on a large GPU. ``shuffle_blocks``: run each launch's blocks in a fresh random order (and
    alternate the order of threads between barriers), so that an order dependence shows as a
    run-to-run difference. Contexts nest; leaving the outermost puts the CPU kernels back.
    """
    _require()
    if not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 1:
        raise ValueError(f"emulated_cuda: sm_count must be a positive int, got {sm_count!r}")
    ops = torch.ops.weighted_loss_emulated
    ops.enable(sm_count, bool(shuffle_blocks))
    _active.append((sm_count, bool(shuffle_blocks)))
    try:
        yield
    finally:
        _active.pop()
        if _active:
            ops.enable(*_active[-1])
        else:
            ops.disable()


def emulating() -> bool:
    """Whether an emulated_cuda() context is active."""
    return bool(_active)


@contextlib.contextmanager
def cpu_kernels() -> Iterator[None]:
    """Within emulated_cuda(), the CPU kernels for the length of this context (a reference
    computed beside the emulated kernels'); the emulation is back after it."""
    if _active:
        torch.ops.weighted_loss_emulated.disable()
    try:
        yield
    finally:
        if _active:
            torch.ops.weighted_loss_emulated.enable(*_active[-1])


def emulated_launches() -> Dict[str, int]:
    """How often each kernel instantiation that the launchers can choose has run in the emulator
    in this process, by name and template arguments (0 for those never launched)."""
    _require()
    names, counts = torch.ops.weighted_loss_emulated.launches()
    return dict(zip(names, counts))


if __name__ == "__main__":
    path = build(verbose="-v" in sys.argv[1:])
    print(f"emulated CUDA kernels: {os.path.relpath(path, ROOT)} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB)")
