"""Logit adjustment and per-item (sample) weights of the cross-entropy losses: their checks and
the little arithmetic around the fused ops that every path (one device, a process group's part,
a DTensor's shard, linear chunks, vocab-parallel shards) shares.

- ``logit_adjustment`` a: a ``(C,)`` floating tensor added to every item's logits before the
  softmax, as ``F.cross_entropy(input + a, ...)`` (PyTorch's promotion included: a float32
  adjustment beside bfloat16 logits computes, and returns, float32). Its gradient is the
  composite's (the sum of the logits' gradient over the items) where it requires grad.
- ``sample_weight`` v: one weight per item (the target's item shape; broadcast to it as PyTorch
  broadcasts), multiplying the item's loss. ``reduction="mean"`` divides by
  ``sum(v * weight[target])`` over the kept items for class indices (PyTorch's weighted mean,
  extended), by ``sum(v)`` for probabilities. The fused ops give each item's loss in the
  accumulation dtype (float32 for 16-bit logits) in their one pass; the sum, the divisor and the
  upstream gradient v / divisor of each item are O(items) tensor arithmetic in float64. The
  values are not checked (that would synchronize with the device): the result is the composite
  ``(v * F.cross_entropy(..., reduction="none")).sum() / (v * weight[target] * kept).sum()``'s,
  NaN and inf included; a negative weight is taken as PyTorch takes a negative class weight.

A leaf of the package below the entry points: it imports nothing of it.
"""
from typing import Optional

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused ops accumulate (and give per-item losses) in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def class_dim(input: Tensor) -> int:
    """The class dim of logits: 0 of ``(C,)``, 1 of ``(N, C, d...)``."""
    return 0 if input.dim() == 1 else 1


def along_classes(a: Tensor, input: Tensor) -> Tensor:
    """The ``(C,)`` tensor ``a`` viewed to broadcast along ``input``'s class dim."""
    return a.view((a.shape[0],) + (1,) * (input.dim() - class_dim(input) - 1))


def check_adjustment(a, input: Tensor, op: str) -> Optional[Tensor]:
    """The logit adjustment of ``input``'s classes (``(C,)`` or ``(N, C, d...)`` logits), checked
    against them (its type and dtype are the options' checks: _options.cross_entropy)."""
    if a is None:
        return None
    classes = input.shape[class_dim(input)] if input.dim() else None
    if a.dim() != 1 or (classes is not None and a.shape[0] != classes):
        raise ValueError(f"{op}: logit_adjustment must have one value per class, shape "
                         f"({classes},), got {tuple(a.shape)}")
    if a.device != input.device:
        raise ValueError(f"{op}: logit_adjustment is on {a.device}, the input on {input.device}")
    return a


def fused_adjustment(input: Tensor, a: Tensor, softcap: float) -> bool:
    """Whether the kernels read the adjustment beside the logits (params.h: logit_adjust), its
    result the composite's: ``a`` of the logits' dtype (added in the accumulation dtype, where
    the composite rounds input + a to 16 bits: closer to float64), or float32 beside 16-bit
    logits (the composite's float32 logits; the loss float32). Otherwise (a wider dtype, softcap,
    integer logits) input + a is formed once."""
    if softcap or not input.is_floating_point():
        return False
    return a.dtype == input.dtype or (input.dtype in (torch.bfloat16, torch.float16)
                                      and a.dtype == torch.float32)


def adjusted(input: Tensor, a: Tensor, start: int = 0) -> Tensor:
    """``input + a[start:start + C]`` along the class dim (dim 1; 0 for ``(C,)``)."""
    classes = input.shape[class_dim(input)]
    part = a.narrow(0, start, classes) if (start or a.shape[0] != classes) else a
    return input + along_classes(part, input)


def item_shape(input: Tensor, target: Tensor) -> tuple:
    """The shape of the loss's items: the index target's, or the logits' without the class dim."""
    if target.is_floating_point() and target.shape == input.shape:
        cdim = class_dim(input)
        return tuple(input.shape[:cdim]) + tuple(input.shape[cdim + 1:])
    return tuple(target.shape)


def check_sample_weight(v, items: tuple, device, op: str) -> Optional[Tensor]:
    """The sample weight broadcast to the items' shape (a view), checked."""
    if v is None:
        return None
    if not isinstance(v, Tensor):
        raise TypeError(f"{op}: sample_weight must be a tensor of the items' shape {items}, got "
                        f"{type(v).__name__}")
    if v.is_complex():
        raise TypeError(f"{op}: sample_weight must be real, got {v.dtype}")
    try:
        ok = torch.broadcast_shapes(tuple(v.shape), items) == torch.Size(items)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: sample_weight of shape {tuple(v.shape)} does not broadcast to "
                         f"the items' shape {items} (the target's shape for class indices)")
    if v.device != device:
        raise ValueError(f"{op}: sample_weight is on {v.device}, the input on {device}")
    return v.expand(items)


def kept_weight(target: Tensor, weight: Optional[Tensor], ignore_index: int,
                sample_weight: Optional[Tensor] = None) -> Tensor:
    """The weighted mean's divisor of class-index targets: ``sum(v * weight[y])`` over the items
    whose target is not ignore_index (``weight`` 1 and ``v`` 1 where absent), in float64 on the
    target's device, without a host synchronization (no boolean indexing). Differentiable with
    respect to ``sample_weight``."""
    y = target.reshape(-1).long()
    valid = y != ignore_index
    if weight is None or weight.numel() == 0:  # (no class: the items count 1, as PyTorch's)
        w = valid.double()
    else:
        w = weight.detach().double().index_select(0, torch.where(valid, y, torch.zeros_like(y)))
        w = w * valid
    if sample_weight is None:
        return w.sum()
    v = sample_weight.reshape(-1).double()
    return torch.where(valid, v * w, torch.zeros_like(w)).sum()  # (kept's rule)


def kept(v: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """The sample weights of class-index items with the ignored ones' set to 0: an ignored item's
    weight is not read (its NaN or inf stays out of the loss, as its class weight does)."""
    # compared as int64: a uint8 target beside an ignore_index of 256 or 2^40 matches no item
    return torch.where(target.long() == ignore_index, torch.zeros_like(v), v)


def divisor(v: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
            prob: bool) -> Tensor:
    """The weighted mean's divisor, float64: ``sum(v)`` for probability targets, for class
    indices ``sum(v * weight[y])`` over the kept items (:func:`kept_weight`)."""
    if prob:
        return v.double().sum()
    return kept_weight(target, weight, ignore_index, v)


def reduce(rows: Tensor, v: Tensor, divisor: Tensor, reduction: str, out_dtype: torch.dtype,
           mean=None) -> Tensor:
    """The loss from the items' losses ``rows`` (accumulation dtype) and their weights ``v``:
    ``v * rows`` (none), its sum, or the sum over ``divisor`` (mean); ``mean`` (the process-group
    layer's hook, the options' reduction then "sum") turns the sum into the group's mean."""
    if reduction == "none":
        return (rows * v.to(rows.dtype)).to(out_dtype)
    total = (rows.double() * v.double()).sum()
    if mean is not None:
        return mean(total, divisor.detach()).to(out_dtype)
    if reduction == "mean":
        total = total / divisor
    return total.to(out_dtype)
