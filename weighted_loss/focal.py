"""The focal loss (Lin et al., 2017), fused: the other standard answer to class imbalance beside
class weights, down-weighting the easy examples by (1 - p_t)^gamma.

``sigmoid_focal_loss`` is ``torchvision.ops.sigmoid_focal_loss`` (same arguments, defaults and
results) computed by the BCE-with-logits kernels with their focal switch (csrc/params.h), in one
pass forward and one backward, plus ``weight`` and ``pos_weight`` as in
``F.binary_cross_entropy_with_logits`` and a per-element ``alpha`` tensor. ``focal_loss`` is the
softmax focal loss ``-w[y] (1 - p_y)^gamma log p_y`` computed by the cross-entropy kernels with
theirs, over class indices, probability targets or with label smoothing.
"""
import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from . import _dtensor, _dtypes, _forward_ad


__all__ = ["sigmoid_focal_loss", "SigmoidFocalLoss", "focal_loss", "FocalLoss"]

_ops = torch.ops.weighted_loss


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or math.isnan(gamma) \
            or gamma < 0 or math.isinf(gamma):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return float(gamma)


def _check_alpha(alpha):
    """A float in [0, 1] or -1 (off), as torchvision checks it, or a floating tensor (its values
    are not checked: that would synchronize with the device)."""
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating point tensor, got {alpha.dtype}")
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or \
            not (0 <= alpha <= 1 or alpha == -1):
        raise ValueError(f"Invalid alpha value: {alpha!r}. alpha must be in the range [0,1] or -1 "
                         "for ignore.")
    return float(alpha)


def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: Union[float, Tensor] = 0.25,
                       gamma: float = 2.0,
                       reduction: str = "none", weight: Optional[Tensor] = None,
                       pos_weight: Optional[Tensor] = None) -> Tensor:
    """``torchvision.ops.sigmoid_focal_loss``, fused:
    ``alpha_t * (1 - p_t)**gamma * BCE(input, target)`` per element, with
    ``p_t = p t + (1 - p)(1 - t)``, ``p = sigmoid(input)``,
    ``alpha_t = alpha t + (1 - alpha)(1 - t)`` (no alpha_t when ``alpha = -1``). ``alpha`` is a
    float in [0, 1] or -1 (torchvision's check), or a tensor broadcast against ``input`` like
    ``weight`` (a per-class alpha: shape ``(C,)`` for ``(N, C)`` logits). ``weight`` and
    ``pos_weight`` weigh the BCE term as in ``F.binary_cross_entropy_with_logits`` (broadcast, read
    in place); ``reduction`` "none" (torchvision's default), "mean" over elements, or "sum".
    Gradients flow to ``input`` and ``target``; ``gamma=0, alpha=-1`` is exactly
    ``wl.binary_cross_entropy_with_logits``."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction "
                         "modes: 'none', 'mean', 'sum'")
    g, a = _check_gamma(gamma), _check_alpha(alpha)
    if _dtensor.any_dtensor(input, target, weight, pos_weight, a):
        return _dtensor.binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                         reduction, None, None, focal=(a, g))
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size "
                         f"({input.size()})")
    if torch.is_grad_enabled():
        for name, t in (("weight", weight), ("pos_weight", pos_weight), ("alpha", a)):
            if isinstance(t, Tensor) and t.requires_grad:
                raise NotImplementedError(
                    f"sigmoid_focal_loss: the derivative for '{name}' is not implemented")
    if target.is_floating_point():  # the promoted dtype, 16-bit logits read in place
        input, target = _dtypes.floating_pair(input, target)
    tensor_alpha = isinstance(a, Tensor)  # the kernels' alpha switch on, each element's alpha read
    return _forward_ad.binary_cross_entropy_with_logits_forward(
        input, target, weight, pos_weight, _Reduction.get_enum(reduction), g,
        0.0 if tensor_alpha else a, a if tensor_alpha else None)


class SigmoidFocalLoss(torch.nn.Module):
    """:func:`sigmoid_focal_loss` as a module; ``weight``, ``pos_weight`` and a tensor ``alpha``
    are buffers, as in ``torch.nn.BCEWithLogitsLoss``."""

    def __init__(self, alpha=0.25, gamma: float = 2.0, reduction: str = "none",
                 weight: Optional[Tensor] = None, pos_weight: Optional[Tensor] = None):
        super().__init__()
        alpha, self.gamma = _check_alpha(alpha), _check_gamma(gamma)
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction,
                                  self.weight, self.pos_weight)


def focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, weight: Optional[Tensor] = None,
               ignore_index: int = -100, reduction: str = "mean",
               label_smoothing: float = 0.0) -> Tensor:
    """The softmax focal loss ``-weight[y] * (1 - p_y)**gamma * log p_y`` per item (``p`` the
    softmax over the classes, dim 1 of ``(N, C, d...)`` logits read in place), with ``weight`` as
    the per-class alpha. ``reduction="mean"`` divides by ``sum(weight[target])`` over the items
    that are not ``ignore_index``, as cross-entropy does; ``gamma=0`` is exactly
    ``wl.cross_entropy``. One pass forward and one backward (the cross-entropy kernels' focal
    switch); ``(1 - p_y)`` as ``-expm1(log p_y)`` and the gradient's ``(1 - p_y)^(gamma - 1)``
    at its limit, so ``gamma < 1`` gives no NaN where ``p_y`` is 1.

    Class probabilities as ``target`` (the input's shape) or ``label_smoothing > 0`` make each
    item's loss the sum over its classes ``-sum_c w_c t'_c (1 - p_c)^gamma log p_c`` with
    ``t' = (1 - s) t + s / C`` (``t`` the one-hot target for indices), the mean dividing by the
    number of items for probabilities and by ``sum(weight[target])`` for indices, as
    cross-entropy. The kernels take it in the same single pass backward and one more read of
    each row forward (its classes' terms need the row's log-sum-exp first: from cache, or from
    the tile of the (N, C, d...) lanes); probability targets get their gradient too."""
    from .functional import cross_entropy, _prob_target_inputs
    g = _check_gamma(gamma)
    if g != 0 and _dtensor.any_dtensor(input, target, weight):
        return _dtensor.cross_entropy(input, target, weight, ignore_index, reduction,
                                      label_smoothing, 0.0, None, None, None, gamma=g)
    if g == 0:
        return cross_entropy(input, target, weight, ignore_index=ignore_index,
                             reduction=reduction, label_smoothing=label_smoothing)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    s = float(label_smoothing)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if input.dim() == 0:
        raise ValueError("focal_loss: input must have the class dim (C,), (N, C) or (N, C, d...)")
    prob = target.is_floating_point()
    if prob or s > 0:
        if prob and target.shape != input.shape:
            raise ValueError(f"focal_loss: probability targets must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        C = input.shape[1 if input.dim() > 1 else 0]
        if weight is not None and weight.shape != (C,):
            raise ValueError(f"focal_loss: weight must have one value per class, shape ({C},), "
                             f"got {tuple(weight.shape)}")
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("focal_loss: the derivative for 'weight' is not implemented "
                                      "(as in PyTorch's cross-entropy)")
    red = _Reduction.get_enum(reduction)
    if prob:
        input, target, weight = _prob_target_inputs(input, target, weight, ignore_index)
        loss, _, _ = _forward_ad.cross_entropy_prob_forward(input, target, weight, red, s, 0.0,
                                                            0.0, g)
        return loss
    loss, _, _ = _forward_ad.cross_entropy_forward(input, target, weight, red, int(ignore_index),
                                                   s, 0.0, 0.0, g)
    return loss


class FocalLoss(torch.nn.Module):
    """:func:`focal_loss` as a module, ``weight`` a buffer as in ``torch.nn.CrossEntropyLoss``."""

    def __init__(self, gamma: float = 2.0, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = _check_gamma(gamma)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return focal_loss(input, target, self.gamma, self.weight, self.ignore_index,
                          self.reduction, self.label_smoothing)
