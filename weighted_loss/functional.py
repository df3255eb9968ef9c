"""Drop-in functional losses: same signatures and results as torch.nn.functional."""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from . import _dtensor, _dtypes, _forward_ad
from . import distributed as _dist

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits"]

_ops = torch.ops.weighted_loss


def _row_terms(z_loss, softcap):
    """(z_loss, softcap) as the kernels take them (softcap 0: off), checked."""
    z = float(z_loss)
    if not z >= 0 or z == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is None:
        return z, 0.0
    cap = float(softcap)
    if not cap > 0 or cap == float("inf"):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    return z, cap


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    process_group=None,
    total_weight=None,
) -> Tensor:
    """Fused ``F.cross_entropy``: log-softmax, class-weight gather and (weighted) reduction in one
    pass over the logits forward and one backward. Same arguments, results and corner cases.
    Under ``torch.autocast`` the loss is float32, as PyTorch's, but bfloat16/float16 logits are
    read in place rather than copied to float32; ``weight`` may have any floating dtype.

    ``input`` is ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits; ``target`` holds class
    indices (int64, int32 or uint8, shape without the class dim) or class probabilities (the
    input's shape). ``reduction="mean"`` divides by ``sum(weight[target])`` over non-ignored items
    for class indices and by the number of items for probabilities.

    ``z_loss``: adds ``z_loss * lse**2`` per row (PaLM's auxiliary loss, lse the row's
    log-sum-exp), weighted as the row's loss (``weight[target]``; 1 for probabilities) and so
    counted in the weighted mean with the same divisor. ``softcap``: the logits are read as
    ``softcap * tanh(logits / softcap)`` (Gemma's logit softcapping), in the same passes, with the
    gradient through it. The defaults leave both off and every result as without them.

    ``process_group`` (with ``reduction="mean"``): the weighted mean over the whole group's batch,
    the same on every rank, with a gradient that DDP's averaging turns into the gradient of the
    concatenated batch (``weighted_loss.distributed``). ``total_weight``: the denominator to use
    instead of this batch's (``wl.total_weight`` over a step's micro-batches).
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if _dtensor.any_dtensor(input, target, weight):
        return _dtensor.cross_entropy(input, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, process_group,
                                      total_weight)
    grouped = process_group is not None or total_weight is not None
    if grouped:
        red = _Reduction.get_enum("sum")
        if reduction != "mean":
            raise ValueError(f"process_group= and total_weight= apply to reduction='mean', got "
                             f"reduction={reduction!r}")
    else:
        red = _Reduction.get_enum(reduction)
    label_smoothing = float(label_smoothing)
    z, cap = _row_terms(z_loss, softcap)
    if input.shape == target.shape:
        input, target, weight = _prob_target_inputs(input, target, weight, ignore_index)
        loss, _, _ = _forward_ad.cross_entropy_prob_forward(input, target, weight, red,
                                                            max(label_smoothing, 0.0), z, cap)
        if grouped:
            rows = input.numel() // max(1, input.shape[0 if input.dim() == 1 else 1])
            local = torch.tensor(float(rows), dtype=torch.float64, device=input.device)
            return _dist._global_mean(loss, local, process_group, total_weight)
        return loss
    loss, _, local = _forward_ad.cross_entropy_forward(input, target, weight, red,
                                                       int(ignore_index), max(label_smoothing, 0.0),
                                                       z, cap)
    if grouped:
        return _dist._global_mean(loss, local, process_group, total_weight)
    return loss


def _prob_target_inputs(input, target, weight, ignore_index):
    """Class-probability targets as cross-entropy takes them: floating, no ignore_index, promoted
    with the logits and the weight as PyTorch's arithmetic would (a float64 weight beside float32
    logits gives a float64 loss; an integer weight is promoted), 16-bit logits read in place
    (``_dtypes.floating_pair``)."""
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {target.dtype}")
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if weight is not None and input.is_floating_point():
        if weight.is_floating_point():  # PyTorch's -(logp t w).sum() promotes with w's dtype too
            target = target.to(torch.promote_types(target.dtype, weight.dtype))
        else:  # integer weights: promoted, as that arithmetic promotes them
            weight = weight.to(torch.promote_types(input.dtype, target.dtype))
    input, target = _dtypes.floating_pair(input, target)
    return input, target, weight


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
    *,
    process_group=None,
    total_weight=None,
) -> Tensor:
    """Fused ``F.binary_cross_entropy_with_logits``: the stable log-sigmoid, ``pos_weight``,
    ``weight`` and the reduction in one pass over the logits forward and one backward. Same
    arguments, results and corner cases.

    ``input`` has any shape (0-d included); ``target`` the same shape, probabilities in [0, 1].
    ``weight`` and ``pos_weight`` broadcast against ``input`` as in PyTorch (``(C,)`` on the last
    dim, ``(C, 1, 1)`` for ``(N, C, H, W)``, ``(N, 1)``, ...) and are read in place, not expanded.
    The result has the target's dtype, as PyTorch's does (float32 under ``torch.autocast``,
    with bfloat16/float16 logits read in place). ``process_group`` / ``total_weight``: the mean
    over the whole group's elements (or over ``total_weight`` elements), as for
    :func:`cross_entropy`.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if _dtensor.any_dtensor(input, target, weight, pos_weight):
        return _dtensor.binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                         reduction, process_group, total_weight)
    grouped = process_group is not None or total_weight is not None
    if grouped and reduction != "mean":
        raise ValueError(f"process_group= and total_weight= apply to reduction='mean', got "
                         f"reduction={reduction!r}")
    red = _Reduction.get_enum("sum" if grouped else reduction)
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    if torch.is_grad_enabled():
        for name, w in (("weight", weight), ("pos_weight", pos_weight)):
            if w is not None and w.requires_grad:
                raise RuntimeError(
                    "The function 'binary_cross_entropy_with_logits' is not differentiable with "
                    f"respect to argument '{name}'. This input cannot have requires_grad True.")
    # PyTorch computes in the promoted dtype and returns the target's; under autocast, float32
    # (the op's rule), which this cast must leave alone
    out_dtype = None if _dtypes.autocast_on(input) else target.dtype
    if target.is_floating_point():
        input, target = _dtypes.floating_pair(input, target)
    loss = _forward_ad.binary_cross_entropy_with_logits_forward(input, target, weight, pos_weight,
                                                                red)
    if grouped:
        local = torch.tensor(float(input.numel()), dtype=torch.float64, device=input.device)
        loss = _dist._global_mean(loss, local, process_group, total_weight)
    return loss if out_dtype is None or loss.dtype == out_dtype else loss.to(out_dtype)


# Every functional of the package, so that wl.functional holds them all as torch.nn.functional
# does (each is defined beside its feature: focal.py, linear.py, vocab_parallel.py).
from .focal import focal_loss, sigmoid_focal_loss  # noqa: E402
from .linear import linear_cross_entropy  # noqa: E402
from .vocab_parallel import vocab_parallel_cross_entropy  # noqa: E402

__all__ += ["focal_loss", "sigmoid_focal_loss", "linear_cross_entropy",
            "vocab_parallel_cross_entropy"]
