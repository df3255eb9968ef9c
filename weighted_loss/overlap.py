"""The overlap losses of segmentation: Dice, Jaccard, Tversky (and focal Tversky) and generalized
Dice, each optionally plus the class-weighted cross-entropy or softmax focal term, in one pass
over the logits each way (docs/segmentation.md).

Every loss here is a formula on three sums per item and class, I = sum p t, P = sum p (or p^2),
T = sum t (or t^2) over the positions not ignored, p the softmax (or sigmoid) of the logits:
``overlap_sums`` returns them, differentiable, for a loss of one's own. The formulas follow
MONAI's (monai.losses 1.5): the same smoothing, class weights and reductions.

Logits are (N, C, d1, ..., dk), k >= 1. Targets are class indices (N, d1, ..., dk) of an integer
dtype, never one-hot encoded, or a one-hot or soft target of the logits' shape (of any dtype:
uint8 or bool one-hot targets are converted once). ``ignore_index`` keeps a position out of the
sums and the cross-entropy (class indices).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _composite, _overlap
from . import distributed as _dist
from ._options import check_gamma, check_reduction

__all__ = ["overlap_sums", "dice_loss", "tversky_loss", "generalized_dice_loss", "DiceLoss",
           "TverskyLoss", "GeneralizedDiceLoss"]

_ACTIVATIONS = ("softmax", "sigmoid")


def _check(input: Tensor, target: Tensor, activation: str, op: str) -> bool:
    """The arguments every loss here takes; whether the target holds class indices."""
    if not isinstance(input, Tensor) or not input.is_floating_point():
        raise TypeError(f"{op}: input must be a floating point tensor of logits, got "
                        f"{getattr(input, 'dtype', type(input).__name__)}")
    if input.dim() < 3:
        raise ValueError(f"{op}: input must be (N, C, d1, ..., dk) with k >= 1, got shape "
                         f"{tuple(input.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{op}: activation must be 'softmax' or 'sigmoid', got {activation!r}")
    if target.shape == input.shape:
        return False
    expected = (input.shape[0], *input.shape[2:])
    if target.shape != expected or target.is_floating_point():
        raise ValueError(f"{op}: target must be class indices of shape {expected} (an integer "
                         f"dtype) or a one-hot or soft target of the input's shape "
                         f"{tuple(input.shape)}, got {tuple(target.shape)} {target.dtype}")
    if activation == "sigmoid":
        raise ValueError(f"{op}: the sigmoid (multi-label) activation takes a target of the "
                         f"input's shape {tuple(input.shape)}, got class indices")
    return True


def _soft_target(input: Tensor, target: Tensor) -> Tensor:
    """A target of the input's shape as the kernels read it: the input's dtype, or float32
    beside 16-bit logits (a uint8 or bool one-hot, or another float, converted once)."""
    wide = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    if target.dtype in (input.dtype, wide):
        return target
    return target.to(wide)


def _terms(input, target, *, weight, ignore_index, label_smoothing, gamma, squared, activation,
           lambda_ce, reduction_ce, op, process_group=None, batch=False):
    """(cross-entropy term or None, sums (N, 3, C); with ``batch`` summed over the items, (3, C)).
    With a process group: the group's cross-entropy mean, and the group's batch sums."""
    index = _check(input, target, activation, op)
    if not index:
        target = _soft_target(input, target)
    grouped = process_group is not None
    if activation == "sigmoid":
        sums = _overlap.sigmoid_sums(input, target, squared)
        ce = None
        if lambda_ce:
            from .functional import binary_cross_entropy_with_logits
            pw = None if weight is None else weight.view((-1,) + (1,) * (input.dim() - 2))
            ce = binary_cross_entropy_with_logits(input, target.to(input.dtype), pos_weight=pw,
                                                  reduction=reduction_ce,
                                                  process_group=process_group)
    else:
        gamma = check_gamma(gamma) if gamma is not None else None
        ce, sums = _overlap.softmax_terms(input, target, weight,
                                          "sum" if grouped else reduction_ce, ignore_index,
                                          label_smoothing, gamma, squared)
        if not lambda_ce:
            ce = None
        elif grouped:
            divisor = _overlap.cross_entropy_divisor(input, target, weight, ignore_index)
            ce = _dist._global_mean(ce, divisor, process_group, None)
    if batch:
        sums = sums.sum(0)
        if grouped:
            sums = _overlap.group_sums(sums, process_group)
    return ce, sums


def overlap_sums(input: Tensor, target: Tensor, *, ignore_index: int = -100,
                 squared_pred: bool = False, batch: bool = False, activation: str = "softmax",
                 process_group=None) -> Tuple[Tensor, Tensor, Tensor]:
    """(I, P, T), each (N, C) (or (C,) with ``batch``): I = sum p t, P = sum p (p^2 with
    ``squared_pred``), T = sum t (t^2) over each item's positions not ignored, p the softmax
    (``activation="sigmoid"``: the sigmoid) of the logits, t the one-hot or given target.
    Differentiable in the logits; computed in float32 (float64 for float64 logits). With
    ``batch`` and ``process_group``: the group's batch sums on every rank."""
    _, sums = _terms(input, target, weight=None, ignore_index=ignore_index, label_smoothing=0.0,
                     gamma=None, squared=squared_pred, activation=activation, lambda_ce=0.0,
                     reduction_ce="sum", op="overlap_sums", process_group=process_group,
                     batch=batch)
    i, p, t = sums.unbind(-2)
    return i, p, t


def _classes(sums: Tensor, include_background: bool) -> Tensor:
    """The sums without class 0 unless ``include_background`` (as MONAI: a single class stays)."""
    C = sums.shape[-1]
    return sums if include_background or C == 1 else sums.narrow(-1, 1, C - 1)


def _reduce(f: Tensor, reduction: str, process_group=None, batch=False) -> Tensor:
    """f per item (or, with ``batch``, the batch's) and class, reduced; with a process group the
    mean over the group's items (a batch's f is the group's already, the same on every rank)."""
    if process_group is not None and not batch and reduction == "mean":
        count = torch.tensor(float(f.numel()), dtype=torch.float64, device=f.device)
        return _dist._global_mean(f.sum(), count, process_group, None)
    if reduction == "mean":
        return f.mean()
    if reduction == "sum":
        return f.sum()
    return f


def _class_weight(weight: Optional[Tensor], f: Tensor, include_background: bool, op: str):
    """f (..., C') times the class weight: one value, or one per class (C, class 0's dropped
    with the background, or C'). A single class is not weighted, as in MONAI."""
    C = f.shape[-1]
    if weight is None or C == 1:
        return f
    w = weight.to(f)
    if w.numel() == 1 and w.dim() <= 1:
        w = w.reshape(())
    else:
        if not include_background and w.shape == (C + 1,):
            w = w.narrow(0, 1, C)
        if w.shape != (C,):
            raise ValueError(f"{op}: weight must have one value per class ({C}"
                             f"{'' if include_background else ' without the background'}), got "
                             f"shape {tuple(weight.shape)}")
    if not torch.compiler.is_compiling() and bool((w < 0).any()):
        raise ValueError(f"{op}: weight must be >= 0, got {weight.tolist()}")
    return f * w


def _combine(overlap: Tensor, ce: Optional[Tensor], lambda_overlap: float,
             lambda_ce: float) -> Tensor:
    if ce is None:
        return overlap if lambda_overlap == 1.0 else lambda_overlap * overlap
    return lambda_overlap * overlap + lambda_ce * ce.to(overlap.dtype)


def _check_lambdas(lambda_overlap, lambda_ce, reduction, op, process_group=None):
    for name, v in (("lambda_dice", lambda_overlap), ("lambda_ce", lambda_ce)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
            raise ValueError(f"{op}: {name} must be a number >= 0, got {v!r}")
    check_reduction(reduction, op)
    if process_group is not None and reduction != "mean":
        raise ValueError(f"{op}: process_group= applies to reduction='mean', got "
                         f"reduction={reduction!r}")
    if lambda_ce and reduction == "none":
        raise ValueError(f"{op}: reduction='none' with the cross-entropy term (lambda_ce > 0): "
                         "the two terms have different shapes; use 'mean' or 'sum'")


def _overlap_loss(op, input, target, formula, *, weight, include_background, squared, batch,
                  ignore_index, activation, reduction, lambda_overlap, lambda_ce,
                  label_smoothing, gamma, process_group, class_weighted=True):
    """What every loss here does around its formula: the sums (and the cross-entropy term) in
    one pass, the background dropped, ``formula(I, P, T)`` per item and class (or over the batch),
    the class weight, the reduction, the two terms' factors."""
    _check_lambdas(lambda_overlap, lambda_ce, reduction, op, process_group)
    ce, sums = _terms(input, target, weight=weight, ignore_index=ignore_index,
                      label_smoothing=label_smoothing, gamma=gamma, squared=squared,
                      activation=activation, lambda_ce=lambda_ce,
                      reduction_ce="sum" if reduction == "sum" else "mean", op=op,
                      process_group=process_group, batch=batch)
    f = formula(*_classes(sums, include_background).unbind(-2))
    if class_weighted:
        f = _class_weight(weight, f, include_background, op)
    return _combine(_reduce(f, reduction, process_group, batch), ce, lambda_overlap, lambda_ce)


def dice_loss(input: Tensor, target: Tensor, *, weight: Optional[Tensor] = None,
              include_background: bool = True, squared_pred: bool = False, jaccard: bool = False,
              batch: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
              ignore_index: int = -100, activation: str = "softmax", reduction: str = "mean",
              lambda_dice: float = 1.0, lambda_ce: float = 0.0, label_smoothing: float = 0.0,
              gamma: Optional[float] = None, process_group=None) -> Tensor:
    """The Dice loss 1 - (2 I + smooth_nr) / (P + T + smooth_dr) per item and class (the Jaccard
    loss with ``jaccard``), class-weighted by ``weight``, reduced over items and classes; plus
    ``lambda_ce`` times the cross-entropy term (the softmax focal loss with ``gamma``; BCE with
    logits, ``pos_weight=weight``, for the sigmoid), whose class weight is ``weight`` too.
    Reduction none: (N, C') per item and class ((C',) with ``batch``), C' without class 0
    unless ``include_background``."""
    return _overlap_loss(
        "dice_loss", input, target,
        lambda i, p, t: _composite.dice_from_sums(i, p, t, smooth_nr, smooth_dr, jaccard),
        weight=weight, include_background=include_background, squared=squared_pred,
        batch=batch, ignore_index=ignore_index, activation=activation, reduction=reduction,
        lambda_overlap=lambda_dice, lambda_ce=lambda_ce, label_smoothing=label_smoothing,
        gamma=gamma, process_group=process_group)


def tversky_loss(input: Tensor, target: Tensor, *, alpha: float = 0.5, beta: float = 0.5,
                 focal_exponent: float = 1.0, weight: Optional[Tensor] = None,
                 include_background: bool = True, batch: bool = False, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5, ignore_index: int = -100, activation: str = "softmax",
                 reduction: str = "mean", lambda_tversky: float = 1.0, lambda_ce: float = 0.0,
                 label_smoothing: float = 0.0, gamma: Optional[float] = None,
                 process_group=None) -> Tensor:
    """The Tversky loss 1 - (I + smooth_nr) / (I + alpha (P - I) + beta (T - I) + smooth_dr)
    per item and class, raised to ``focal_exponent`` (the focal Tversky loss; 1: plain), class
    weighted and reduced as dice_loss, plus ``lambda_ce`` times the cross-entropy term."""
    op = "tversky_loss"
    if not focal_exponent > 0:
        raise ValueError(f"{op}: focal_exponent must be > 0, got {focal_exponent!r}")

    def formula(i, p, t):
        f = _composite.tversky_from_sums(i, p, t, alpha, beta, smooth_nr, smooth_dr)
        return f if focal_exponent == 1.0 else f.clamp_min(0) ** focal_exponent
    return _overlap_loss(
        op, input, target, formula, weight=weight, include_background=include_background,
        squared=False, batch=batch, ignore_index=ignore_index, activation=activation,
        reduction=reduction, lambda_overlap=lambda_tversky, lambda_ce=lambda_ce,
        label_smoothing=label_smoothing, gamma=gamma, process_group=process_group)


def generalized_dice_loss(input: Tensor, target: Tensor, *, w_type: str = "square",
                          include_background: bool = True, batch: bool = False,
                          smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                          ignore_index: int = -100, activation: str = "softmax",
                          reduction: str = "mean", lambda_gdl: float = 1.0,
                          lambda_ce: float = 0.0, weight: Optional[Tensor] = None,
                          label_smoothing: float = 0.0, gamma: Optional[float] = None,
                          process_group=None) -> Tensor:
    """The generalized Dice loss (Sudre et al. 2017), MONAI's: class weights from each class's
    target volume T (``w_type`` "square": 1 / T^2, "simple": 1 / T, "uniform": 1), a class with
    T = 0 taking the largest weight; 1 - (2 sum_c w I + smooth_nr) / (sum_c w (P + T) +
    smooth_dr) per item (over the batch with ``batch``). ``weight`` weighs only the
    cross-entropy term (``lambda_ce``). Reduction none: (N, 1) ((1,) with ``batch``)."""
    op = "generalized_dice_loss"
    if w_type not in ("square", "simple", "uniform"):
        raise ValueError(f"{op}: w_type must be 'square', 'simple' or 'uniform', got {w_type!r}")
    return _overlap_loss(
        op, input, target,
        lambda i, p, t: _composite.generalized_dice_from_sums(i, p, t, w_type, smooth_nr,
                                                              smooth_dr, batch),
        weight=weight, include_background=include_background, squared=False, batch=batch,
        ignore_index=ignore_index, activation=activation, reduction=reduction,
        lambda_overlap=lambda_gdl, lambda_ce=lambda_ce, label_smoothing=label_smoothing,
        gamma=gamma, process_group=process_group, class_weighted=False)


class _OverlapLoss(nn.Module):
    """A module around one of the functions above: its keyword arguments, the class weight a
    buffer (moved with the module)."""
    _fn = None

    def __init__(self, weight: Optional[Tensor] = None, **kwargs):
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.kwargs = kwargs

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return type(self)._fn(input, target, weight=self.weight, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class DiceLoss(_OverlapLoss):
    """``dice_loss`` as a module: ``DiceLoss(weight=None, **options)``, the options those of
    dice_loss (``lambda_ce=1.0`` makes it nnU-Net's and MONAI's Dice + cross-entropy)."""
    _fn = staticmethod(dice_loss)


class TverskyLoss(_OverlapLoss):
    """``tversky_loss`` as a module."""
    _fn = staticmethod(tversky_loss)


class GeneralizedDiceLoss(_OverlapLoss):
    """``generalized_dice_loss`` as a module."""
    _fn = staticmethod(generalized_dice_loss)

