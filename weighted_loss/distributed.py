"""The exact weighted mean under data parallelism and gradient accumulation.

Under DDP or FSDP each rank computes its own ``sum_i w[y_i] l_i / sum_i w[y_i]`` and the gradients
are then averaged over the ranks: with class weights, ignored targets or unequal batches the
ranks' denominators differ, so the result is not the weighted mean of the global batch. With
``process_group=`` the losses reduce their sum and denominator over the group on the device
(functional collectives: no host synchronization, traceable by ``torch.compile``); the returned
loss is the group's weighted mean on every rank, and its gradient is the rank's share scaled by the
group size, so that DDP's averaging gives exactly the gradient of one process on the concatenated
batch. ``total_weight=`` gives the denominator outright (``total_weight()`` computes it from all
the micro-batches of a step, over the group), which makes gradient accumulation exact too.
"""
import numbers
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from . import _reweight

__all__ = ["total_weight"]


def _all_reduce(t: Tensor, group) -> Tensor:
    import torch.distributed._functional_collectives as funcol
    return funcol.all_reduce(t, "sum", group)


def _all_gather(t: Tensor, group) -> Tensor:
    """The group's tensors concatenated along dim 0, in rank order (functional: traceable, no host
    synchronization)."""
    import torch.distributed._functional_collectives as funcol
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # torch < 2.12
    return gather(t, 0, group)


def _reduce_scatter(t: Tensor, group) -> Tensor:
    """The group's sum of ``t``, this rank's block of dim 0 (functional)."""
    import torch.distributed._functional_collectives as funcol
    scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
    return scatter(t, "sum", 0, group)


def _group_size(group) -> int:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group= needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    return dist.get_world_size(group)


def _local_weight(target: Tensor, weight: Optional[Tensor], ignore_index: int) -> Tensor:
    """sum of weight[y] over the targets that are not ignore_index (their count without weight),
    in float64 on the target's device, without a host synchronization (no boolean indexing)."""
    return _reweight.kept_weight(target, weight, ignore_index)


def total_weight(targets: Union[Tensor, Iterable[Tensor]], weight: Optional[Tensor] = None,
                 ignore_index: int = -100, process_group=None, *,
                 sample_weights: Union[None, Tensor, Iterable[Tensor]] = None) -> Tensor:
    """The denominator of the weighted mean over every micro-batch of a step (and every rank of
    ``process_group``): ``sum weight[y]`` over the class-index targets that are not
    ``ignore_index``, their count without ``weight``; with ``sample_weights`` (one per target
    tensor, each broadcast to its target's shape, as the losses' ``sample_weight=``)
    ``sum sample_weight * weight[y]``. Pass it as ``total_weight=`` to each micro-batch's loss.
    A float64 0-d tensor on the targets' device."""
    ts = [targets] if isinstance(targets, Tensor) else list(targets)
    if not ts:
        raise ValueError("total_weight: targets is empty")
    for t in ts:
        if t.is_floating_point():
            raise TypeError(f"total_weight: targets must hold class indices, got {t.dtype} (for "
                            "probability targets the denominator is the number of rows)")
    if sample_weights is None:
        w = sum(_local_weight(t, weight, ignore_index) for t in ts)
    else:
        vs = [sample_weights] if isinstance(sample_weights, Tensor) else list(sample_weights)
        if len(vs) != len(ts):
            raise ValueError(f"total_weight: {len(vs)} sample_weights for {len(ts)} targets")
        w = 0
        for t, v in zip(ts, vs):
            v = _reweight.check_sample_weight(v, tuple(t.shape), t.device, "total_weight")
            w = w + _reweight.kept_weight(t, weight, ignore_index, v.detach())
    if process_group is not None:
        _group_size(process_group)
        w = _all_reduce(w, process_group)
    return w


def _as_denominator(total_weight, like: Tensor) -> Tensor:
    if isinstance(total_weight, Tensor):
        if total_weight.numel() != 1:
            raise ValueError(f"total_weight must be a number or a 1-element tensor, got shape "
                             f"{tuple(total_weight.shape)}")
        return total_weight.detach().reshape(()).to(device=like.device, dtype=torch.float64)
    if isinstance(total_weight, numbers.Real):
        return torch.tensor(float(total_weight), dtype=torch.float64, device=like.device)
    raise TypeError(f"total_weight must be a number or a tensor, got {type(total_weight).__name__}")


def _global_mean(local_sum: Tensor, local_weight: Tensor, process_group, total_weight,
                 replicas_average: bool = True) -> Tensor:
    """The mean to return from a local sum and its denominator (see the module's docstring); the
    callers check that reduction is "mean". ``replicas_average=False``: the gradient is this
    rank's share itself (a DTensor shard's gradient, which nothing averages afterwards)."""
    denom = None if total_weight is None else _as_denominator(total_weight, local_sum)
    if process_group is None:
        return (local_sum.double() / denom).to(local_sum.dtype)
    size = _group_size(process_group)
    s = local_sum.double()
    if denom is None:  # the sum and the denominator in one all-reduce
        both = _all_reduce(torch.stack([s.detach().reshape(()),
                                        local_weight.detach().double().reshape(())]), process_group)
        group_sum, denom = both.unbind()
        s_all = group_sum.reshape(s.shape)
    else:
        s_all = _all_reduce(s.detach(), process_group)
    # value: the group's sum over its denominator; gradient: size x this rank's share, which
    # DDP's (or FSDP's) averaging over the group turns into the gradient of the whole batch
    # (a DTensor shard: the share alone)
    scaled = s * size if replicas_average else s
    return ((scaled + (s_all - scaled).detach()) / denom).to(local_sum.dtype)
