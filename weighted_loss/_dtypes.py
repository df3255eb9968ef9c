"""The dtypes the losses compute and return in, PyTorch's, without upcasting 16-bit logits.

PyTorch promotes mixed floating inputs (bfloat16 logits with float32 targets compute in float32)
and, under ``torch.autocast``, runs its losses on a float32 copy of bfloat16/float16 logits. The
kernels read 16-bit logits in place and accumulate in float32 either way, and take float32
targets (and return a float32 loss) beside them (csrc/params.h: mixed precision), so the results
match PyTorch's dtypes without the copy. The ops' own autocast rule is csrc/autocast.cpp; this
module holds the same rule for what is assembled in Python (linear and vocab-parallel
cross-entropy) and the promotion of a pair of floating inputs.
"""
import torch
from torch import Tensor

_LOW = (torch.bfloat16, torch.float16)


def is_16bit(t: Tensor) -> bool:
    return t.dtype in _LOW


def autocast_on(t: Tensor) -> bool:
    """Whether autocast is on for t's device type (traceable by torch.compile)."""
    return torch.is_autocast_enabled(t.device.type)


def loss_dtype(logits: Tensor) -> torch.dtype:
    """The dtype of a loss of these logits: float32 for 16-bit logits under autocast (PyTorch's
    float32 policy for its losses), else the logits' own."""
    return torch.float32 if is_16bit(logits) and autocast_on(logits) else logits.dtype


def floating_dtypes(input: torch.dtype, target: torch.dtype):
    """The dtypes the kernels take floating logits and targets of dtypes (input, target) in:
    promoted as PyTorch's arithmetic promotes them, except that 16-bit logits whose promoted
    dtype is float32 stay 16-bit (read in place) and only the target becomes float32."""
    if input == target:
        return input, target
    dtype = torch.promote_types(input, target)
    if input in _LOW and dtype == torch.float32:
        return input, dtype
    return dtype, dtype


def floating_pair(input: Tensor, target: Tensor):
    """(input, target), a floating target, converted to floating_dtypes'. Integer logits pass
    through (the ops reject them with a message that names them)."""
    if not input.is_floating_point():
        return input, target
    di, dt = floating_dtypes(input.dtype, target.dtype)
    return input.to(di), target.to(dt)
