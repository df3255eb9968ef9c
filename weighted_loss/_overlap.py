"""The overlap sums of the Dice family on one device, beside the cross-entropy or focal term.

One pass over the logits gives both (the cross_entropy_overlap_forward op, csrc/ops.cpp): the
loss of the cross-entropy term, and per item and class I = sum p t, P = sum p (p^2 when squared),
T = sum t (t^2) over the positions not ignored, p the softmax. The overlap formulas (Dice,
Tversky, generalized Dice: overlap.py) are PyTorch arithmetic on those (N, C) sums, which
autograd differentiates; the op's backward takes their gradient and writes the logits' in one
more pass.

Where the kernels do not run, the composite (_composite.cross_entropy_overlap) computes the same
with PyTorch's ops: where tangents may flow (forward AD, torch.func), on a device without the
fused kernel, and for the sigmoid activation (multi-label), whose terms are elementwise.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _composite, _forward_ad, _reweight
from . import distributed as _dist

_ops = torch.ops.weighted_loss
_OP = "weighted_loss::cross_entropy_overlap_forward"


def _fused_on(device: torch.device) -> bool:
    """Whether the fused kernel runs on this device (the CPU's and CUDA's)."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return True  # the fake kernel (torch.compile, meta tensors)
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key)


def softmax_terms(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
                  ignore_index: int, label_smoothing: float, gamma: Optional[float],
                  squared: bool) -> Tuple[Tensor, Tensor]:
    """(loss, sums): the cross-entropy (focal where gamma is set) of the softmax and the sums
    (N, 3, C), in one pass each way where the fused kernel runs. An integer target holds class
    indices (N, d...), a floating one probabilities or a one-hot (N, C, d...)."""
    kwargs = dict(weight=weight, reduction=reduction, ignore_index=ignore_index,
                  label_smoothing=label_smoothing, gamma=gamma or None, squared=squared)
    if _forward_ad.active() or not _fused_on(input.device):
        return _composite.cross_entropy_overlap(input, target, **kwargs)
    loss, sums, _, _ = _ops.cross_entropy_overlap_forward(input, target, **kwargs)
    return loss, sums


def cross_entropy_divisor(input: Tensor, target: Tensor, weight: Optional[Tensor],
                          ignore_index: int) -> Tensor:
    """The cross-entropy term's mean divisor on this device: sum(weight[y]) over the positions
    not ignored (class indices), or the positions' count (a target of the input's shape)."""
    if target.is_floating_point() or target.shape == input.shape:
        return torch.tensor(float(input.numel() // max(1, input.shape[1])), dtype=torch.float64,
                            device=input.device)
    return _reweight.kept_weight(target, weight, ignore_index)


def group_sums(sums: Tensor, process_group) -> Tensor:
    """The group's sums (all-reduced) on every rank; their gradient the rank's own times the group
    size, which DDP's averaging of the parameters' gradients turns into one process's on the
    whole batch (weighted_loss/distributed.py)."""
    size = _dist._group_size(process_group)
    total = _dist._all_reduce(sums.detach(), process_group)
    scaled = sums * size
    return scaled + (total - scaled).detach()


def sigmoid_sums(input: Tensor, target: Tensor, squared: bool) -> Tensor:
    """The sums (N, 3, C) of the sigmoid (multi-label): each class on its own, so each is a
    reduction of elementwise terms, which PyTorch fuses as well as a kernel of ours would."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    p = torch.sigmoid(input.to(acc))
    t = target.to(acc)
    dims = list(range(2, input.dim()))
    pp = p * p if squared else p
    tt = t * t if squared else t
    return torch.stack([(p * t).sum(dims), pp.sum(dims), tt.sum(dims)], 1)
