"""The focal loss (Lin et al., 2017), fused: the other standard answer to class imbalance beside
class weights, down-weighting the easy examples by (1 - p_t)^gamma.

``sigmoid_focal_loss`` is ``torchvision.ops.sigmoid_focal_loss`` (same arguments, defaults and
results) computed by the BCE-with-logits kernels with their focal switch (csrc/params.h), in one
pass forward and one backward, plus ``weight`` and ``pos_weight`` as in
``F.binary_cross_entropy_with_logits`` and a per-element ``alpha`` tensor. ``focal_loss`` is the
softmax focal loss ``-w[y] (1 - p_y)^gamma log p_y`` computed by the cross-entropy kernels with
theirs, over class indices, probability targets or with label smoothing.
"""
from typing import Optional, Union

import torch
from torch import Tensor

from . import _dtensor, _local, _options, _script

__all__ = ["sigmoid_focal_loss", "SigmoidFocalLoss", "focal_loss", "FocalLoss"]


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
    o = _options.binary(weight, pos_weight, reduction, _options.check_gamma(gamma),
                        _options.check_alpha(alpha))
    if _dtensor.any_dtensor(input, target, weight, pos_weight, o.alpha):
        return _dtensor.elementwise(input, target, o)
    return _local.elementwise(input, target, o)


class SigmoidFocalLoss(torch.nn.Module):
    """:func:`sigmoid_focal_loss` as a module; ``weight``, ``pos_weight`` and a tensor ``alpha``
    are buffers, as in ``torch.nn.BCEWithLogitsLoss``."""

    def __init__(self, alpha=0.25, gamma: float = 2.0, reduction: str = "none",
                 weight: Optional[Tensor] = None, pos_weight: Optional[Tensor] = None):
        super().__init__()
        alpha, self.gamma = _options.check_alpha(alpha), _options.check_gamma(gamma)
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

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles: the composite in PyTorch's ops (_script.py)."""
        tensor = isinstance(self.alpha, Tensor)
        return _script.SigmoidFocalLoss(-1.0 if tensor else self.alpha,
                                        self.alpha if tensor else None, self.gamma,
                                        self.reduction, self.weight,
                                        self.pos_weight).train(self.training)


def focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, weight: Optional[Tensor] = None,
               ignore_index: int = -100, reduction: str = "mean",
               label_smoothing: float = 0.0, *, logit_adjustment: Optional[Tensor] = None,
               sample_weight: Optional[Tensor] = None) -> Tensor:
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
    the tile of the (N, C, d...) lanes); probability targets get their gradient too.

    ``logit_adjustment`` and ``sample_weight`` as for :func:`weighted_loss.cross_entropy` (the
    focal factor is taken from the adjusted logits' softmax)."""
    g = _options.check_gamma(gamma)
    o = _options.cross_entropy(weight, ignore_index, reduction, label_smoothing, gamma=g,
                               logit_adjustment=logit_adjustment, sample_weight=sample_weight)
    if _dtensor.any_dtensor(input, target, weight, logit_adjustment, sample_weight):
        return _dtensor.cross_entropy(input, target, o)
    return _local.cross_entropy(input, target, o)  # gamma 0: wl.cross_entropy's path


class FocalLoss(torch.nn.Module):
    """:func:`focal_loss` as a module, ``weight`` and ``logit_adjustment`` buffers as ``weight`` is
    in ``torch.nn.CrossEntropyLoss``; ``forward(input, target, sample_weight=None)``."""

    def __init__(self, gamma: float = 2.0, weight: Optional[Tensor] = None,
                 ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, logit_adjustment: Optional[Tensor] = None):
        super().__init__()
        self.gamma = _options.check_gamma(gamma)
        self.register_buffer("weight", weight)
        self.register_buffer("logit_adjustment", logit_adjustment)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = label_smoothing

    def forward(self, input: Tensor, target: Tensor, sample_weight=None) -> Tensor:
        return focal_loss(input, target, self.gamma, self.weight, self.ignore_index,
                          self.reduction, self.label_smoothing,
                          logit_adjustment=self.logit_adjustment, sample_weight=sample_weight)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles: the composite in PyTorch's ops (_script.py)."""
        return _script.FocalLoss(self.gamma, self.weight, self.ignore_index, self.reduction,
                                 self.label_smoothing, self.logit_adjustment).train(self.training)


# torch.jit.script compiles the composites in their place (_script.py)
_script.scripts_as(sigmoid_focal_loss, _script.sigmoid_focal_loss)
_script.scripts_as(focal_loss, _script.focal_loss)
