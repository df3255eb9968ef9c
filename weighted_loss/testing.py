"""Testing helpers: the CUDA kernels on CPU tensors, through the emulator of the CUDA execution
model (csrc/cuda/emulator/), so that they run, and are checked against PyTorch, on any machine.

    with weighted_loss.testing.emulated_cuda():
        loss = wl.cross_entropy(x, t, weight=w)   # CPU tensors, CUDA kernels
        loss.backward()
    weighted_loss.testing.emulated_launches()    # {"forward_rows_kernel<float, 0, true, 32>": 3, ...}

The emulator runs each block's threads as fibers, so barriers and warp shuffles are real, and it
fails a launch loudly on barrier divergence, missing shuffle lanes, bad launch shapes and device
asserts. It cannot show timing, the memory model or bank conflicts: those need a GPU.
"""
import contextlib
from typing import Dict, Iterator

import torch

__all__ = ["emulator_available", "emulated_cuda", "emulating", "emulated_launches"]

_ops = torch.ops.weighted_loss
_active = []  # (sm_count, shuffle_blocks) of each emulated_cuda() entered and not left


def emulator_available() -> bool:
    """Whether this build has the emulated CUDA kernels (the CUDA headers were found)."""
    return hasattr(_ops, "_emulator_enable")


def _require():
    if not emulator_available():
        raise RuntimeError(
            "weighted_loss was built without the CUDA emulator, which needs the CUDA headers "
            "(cuda_runtime_api.h, cuda_bf16.h, cuda_fp16.h) at build time: a CUDA toolkit, or "
            "`pip install nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl`; then rebuild "
            "(`make build`)")


@contextlib.contextmanager
def emulated_cuda(sm_count: int = 132, shuffle_blocks: bool = True) -> Iterator[None]:
    """Within this context, ``wl.cross_entropy``, ``wl.binary_cross_entropy_with_logits``,
    ``wl.CrossEntropyLoss`` and ``wl.BCEWithLogitsLoss`` on CPU tensors run the CUDA kernels
    (forward, backward, autograd, every semantic) through the emulator, in this process.

    ``sm_count``: what the emulated device reports as its number of SMs (an H100's 132 by
    default), which the kernels' launch plans read; a small value reaches the paths meant for few
    rows on a large GPU. ``shuffle_blocks``: run each launch's blocks in a fresh random order (and
    alternate the order of threads between barriers), so that an order dependence shows as a
    run-to-run difference. Contexts nest; leaving the outermost puts the CPU kernels back.
    """
    _require()
    if not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 1:
        raise ValueError(f"emulated_cuda: sm_count must be a positive int, got {sm_count!r}")
    _ops._emulator_enable(sm_count, bool(shuffle_blocks))
    _active.append((sm_count, bool(shuffle_blocks)))
    try:
        yield
    finally:
        _active.pop()
        if _active:
            _ops._emulator_enable(*_active[-1])
        else:
            _ops._emulator_disable()


def emulating() -> bool:
    """Whether an emulated_cuda() context is active."""
    return bool(_active)


def emulated_launches() -> Dict[str, int]:
    """How often each kernel instantiation that the launchers can choose has run in the emulator
    in this process, by name and template arguments (0 for those never launched)."""
    _require()
    names, counts = _ops._emulator_launches()
    return dict(zip(names, counts))
