"""Vocab-parallel cross-entropy: the classes split over the ranks of a group (Megatron-style
column-parallel LM heads), each rank holding a contiguous shard of the logits. The entry point:
its arguments checked, the group resolved, the split checked even; the loss itself is
weighted_loss/_sharded.py's (one pass over the shard, one all-gather of per-row statistics).
"""
from typing import Optional

import torch
from torch import Tensor

from . import _dtensor, _options, _sharded
from .distributed import _all_gather

__all__ = ["vocab_parallel_cross_entropy"]

_OP = _sharded._OP


def _group_of(process_group):
    """(group, size, rank): the default group when torch.distributed is initialized and no group
    is given; a single shard (None, 1, 0) when it is not."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError(f"{_OP}: process_group= needs torch.distributed initialized "
                               "(torch.distributed.init_process_group)")
        return None, 1, 0
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group), dist.get_rank(group)


def _check_even_split(group, size: int, local: int, device) -> None:
    """Every rank must hold the same number of classes (rank r holds [r C / R, (r + 1) C / R)),
    and every rank raises the same ValueError otherwise. Checked on every eager call, before
    anything a rank could raise alone (the weight's length, the shard's offsets): a check that
    one rank skipped (a cache of earlier even splits) while another entered it would hang NCCL.
    It costs one all-gather of an int and one host synchronization per call; torch.compile
    cannot trace it and skips it."""
    if size == 1 or torch.compiler.is_compiling():
        return
    sizes = _all_gather(torch.tensor([local], device=device), group).tolist()
    if len(set(sizes)) != 1:
        raise ValueError(
            f"{_OP}: the classes are split unevenly over the {size} ranks of the group: their "
            f"logits hold {sizes} classes; each rank must hold C / {size} of them, rank r the "
            f"classes [r C / {size}, (r + 1) C / {size}) (pad the classes to a multiple of {size})")


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    process_group=None,
    *,
    logit_adjustment: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
) -> Tensor:
    """``F.cross_entropy`` of logits whose classes are split over the ranks of ``process_group``
    (the default group when None and torch.distributed is initialized; one shard otherwise).

    ``logits``: this rank's contiguous shard of the classes, ``(N, C / R)``, ``(C / R,)`` or
    ``(N, C / R, d...)``; rank r holds classes ``[r C / R, (r + 1) C / R)``. ``target``: global
    class indices (the same on every rank), shaped as for ``F.cross_entropy``. ``weight``: the full
    ``(C,)`` class weight. Every rank returns the loss of the unsharded problem; the gradient of its
    logits is its slice of the unsharded gradient. Costs one all-gather of 5 float32 per row (per
    rank) in the forward, and in eager mode one of the shard sizes (with a host synchronization:
    an uneven split raises the same ValueError on every rank); the backward communicates
    nothing. DTensor logits (the output of a ``ColwiseParallel`` head) go to
    :func:`weighted_loss.cross_entropy`, which takes this path over their mesh when they are
    sharded on the classes.

    ``logit_adjustment``: the full ``(C,)`` adjustment (each rank adds its slice to its shard);
    ``sample_weight``: one weight per item, the target's shape (as for
    :func:`weighted_loss.cross_entropy`)."""
    o = _options.cross_entropy(weight, ignore_index, reduction, label_smoothing, op=_OP,
                               logit_adjustment=logit_adjustment, sample_weight=sample_weight)
    if _dtensor.any_dtensor(logits, target, weight, logit_adjustment, sample_weight):  # the DTensor's mesh and placement say it
        # (process_group is refused there: the mesh gives the group)
        return _dtensor.cross_entropy(logits, target, o.but(process_group=process_group))
    if target.is_floating_point():
        raise TypeError(f"{_OP}: target must hold class indices (int64, int32 or uint8), got "
                        f"{target.dtype}; probability targets are not supported across shards")
    if logits.dim() == 0:
        raise ValueError(f"{_OP}: logits must have a class dimension, got a 0-d tensor")
    group, size, rank = _group_of(process_group)
    shard = logits.shape[0 if logits.dim() == 1 else 1]
    _check_even_split(group, size, shard, logits.device)  # first: every rank gets here alike
    return _sharded.cross_entropy(logits, target, o, group, (shard,) * size, rank)
