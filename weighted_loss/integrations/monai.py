"""MONAI's segmentation losses with the fused overlap sums (docs/segmentation.md): ``DiceLoss``,
``DiceCELoss``, ``DiceFocalLoss``, ``GeneralizedDiceLoss`` and ``TverskyLoss``, subclasses of
``monai.losses``' classes with their constructors, attributes and state_dict.

A forward is fused where the options allow: a softmax over more than one channel (``softmax=True``,
no ``other_act``), class indices (``to_onehot_y=True``, a (B, 1, ...) target) or a one-hot
target, and no soft-label formula for soft targets. The Dice part then reads the logits once for
its sums (and DiceCELoss's cross-entropy in the same pass); the formulas are MONAI's, on the
same sums. Anything else (a sigmoid, ``other_act``, one channel, a shape MONAI rejects) runs
MONAI's own forward: never a different answer, only a slower one.

``wl.patch_monai()`` swaps these for MONAI's names in ``monai.losses`` and their defining modules;
a context manager, undone on exit or by ``wl.unpatch_monai()``.
"""
import collections
from typing import Optional

import torch
from monai import losses as _ml
from monai.losses import dice as _dice, tversky as _tversky
from torch import Tensor

from .. import _composite, _overlap, _swap

__all__ = ["DiceLoss", "DiceCELoss", "DiceFocalLoss", "GeneralizedDiceLoss", "TverskyLoss",
           "patch_monai", "unpatch_monai"]


def _fusable(loss, input: Tensor, target: Tensor) -> Optional[Tensor]:
    """The target as the fused op takes it (class indices (B, ...) or a one-hot / soft target of
    the input's shape), or None where MONAI's own forward must run."""
    if not (getattr(loss, "softmax", False) and loss.other_act is None and input.dim() >= 3
            and input.is_floating_point() and input.shape[1] > 1 and target.dim() == input.dim()):
        return None
    if getattr(loss, "to_onehot_y", False):
        if target.shape[1] != 1 or target.shape[0] != input.shape[0] or \
                target.shape[2:] != input.shape[2:]:
            return None
        return target.squeeze(1).long()  # MONAI's one_hot takes labels.long() too
    if target.shape != input.shape or getattr(loss, "soft_label", False):
        return None  # (a soft label's L1 formula needs sum |p - t|: MONAI's own)
    wide = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    return target if target.dtype in (input.dtype, wide) else target.to(wide)


def _sums(input, target, squared, weight=None, reduction="mean", label_smoothing=0.0):
    """(cross-entropy, sums (B, 3, C)) in one pass."""
    return _overlap.softmax_terms(input, target, weight, reduction, -100, label_smoothing, None,
                                  squared)


def _tp_p_t(loss, sums: Tensor):
    """tp, P, T as MONAI's loss reduces them: over the batch too with ``batch``, without class 0
    unless ``include_background``."""
    sums = sums.sum(0) if loss.batch else sums
    if not loss.include_background:
        sums = sums.narrow(-1, 1, sums.shape[-1] - 1)
    return sums.unbind(-2)


def _reduce(loss, f: Tensor, input: Tensor) -> Tensor:
    """MONAI's reduction of f: mean, sum, or f viewed broadcastable against the input."""
    if loss.reduction == "mean":
        return torch.mean(f)
    if loss.reduction == "sum":
        return torch.sum(f)
    if loss.reduction == "none":
        return f.view(list(f.shape[0:2]) + [1] * (len(input.shape) - 2))
    raise ValueError(f'Unsupported reduction: {loss.reduction}, available options are '
                     '["mean", "sum", "none"].')


class _Scriptable:
    """TorchScript cannot compile the fused forward: ``torch.jit.script`` takes a copy of the
    module as MONAI's own class (its parameters, buffers and submodules shared), which scripts,
    saves and loads as MONAI's does."""

    def __prepare_scriptable__(self):
        monai_class = next(c for c in type(self).__mro__ if c.__module__.startswith("monai."))
        m = object.__new__(monai_class)
        m.__dict__.update(self.__dict__)
        for name in ("_modules", "_buffers", "_parameters"):
            setattr(m, name, collections.OrderedDict(getattr(self, name)))
        return m


def _dice_of(loss, sums: Tensor, input: Tensor) -> Tensor:
    """MONAI DiceLoss.forward from the sums on: tp, fp, fn, the score, the class weight, the
    reduction."""
    tp, p, t = _tp_p_t(loss, sums)
    f = _composite.dice_from_sums(tp, p, t, loss.smooth_nr, loss.smooth_dr, loss.jaccard)
    C = f.shape[-1]
    if loss.class_weight is not None and C != 1:
        if loss.class_weight.ndim == 0:
            loss.class_weight = torch.as_tensor([loss.class_weight] * C)
        elif loss.class_weight.shape[0] != C:
            raise ValueError("the length of the `weight` sequence should be the same as the "
                             "number of classes. If `include_background=False`, the weight "
                             "should not include the background category class 0.")
        if loss.class_weight.min() < 0:
            raise ValueError("the value/values of the `weight` should be no less than 0.")
        f = f * loss.class_weight.to(f)
    return _reduce(loss, f.to(input.dtype), input)


class DiceLoss(_Scriptable, _ml.DiceLoss):
    """``monai.losses.DiceLoss``, its sums fused (module doc)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        t = _fusable(self, input, target)
        if t is None:
            return super().forward(input, target)
        _, sums = _sums(input, t, self.squared_pred)
        return _dice_of(self, sums, input)


class DiceCELoss(_Scriptable, _ml.DiceCELoss):
    """``monai.losses.DiceCELoss``: its Dice sums and its cross-entropy in one pass (module
    doc); one channel (BCE) runs MONAI's."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        t = _fusable(self.dice, input, target) if input.dim() == target.dim() else None
        if t is None or (target.shape[1] != 1 and target.shape[1] != input.shape[1]):
            return super().forward(input, target)
        ce = self.cross_entropy
        ce_loss, sums = _sums(input, t, self.dice.squared_pred, ce.weight, ce.reduction,
                              ce.label_smoothing)
        dice_loss = _dice_of(self.dice, sums, input)
        return self.lambda_dice * dice_loss + self.lambda_ce * ce_loss


class DiceFocalLoss(_Scriptable, _ml.DiceFocalLoss):
    """``monai.losses.DiceFocalLoss``: its Dice sums fused (module doc), its focal term
    MONAI's."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.dim() != target.dim() or input.shape[1] == 1 or \
                (target.shape[1] != 1 and target.shape[1] != input.shape[1]):
            return super().forward(input, target)
        if self.to_onehot_y:
            target = _dice.one_hot(target, num_classes=input.shape[1])
        t = _fusable(self.dice, input, target)
        if t is None:  # (MONAI's forward from here: the target is one-hot already)
            return self.lambda_dice * self.dice(input, target) + \
                self.lambda_focal * self.focal(input, target)
        _, sums = _sums(input, t, self.dice.squared_pred)
        return self.lambda_dice * _dice_of(self.dice, sums, input) + \
            self.lambda_focal * self.focal(input, target)


class GeneralizedDiceLoss(_Scriptable, _ml.GeneralizedDiceLoss):
    """``monai.losses.GeneralizedDiceLoss``, its sums fused (module doc)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        t = _fusable(self, input, target)
        if t is None:
            return super().forward(input, target)
        _, sums = _sums(input, t, False)
        tp, p, gt = _tp_p_t(self, sums)
        # (MONAI's weights come from the volumes in float32, w_func(ground_o.float()))
        f = _composite.generalized_dice_from_sums(tp, p, gt, str(self.w_type), self.smooth_nr,
                                                  self.smooth_dr, self.batch, gt.float())
        return _reduce(self, f.to(input.dtype), input)


class TverskyLoss(_Scriptable, _tversky.TverskyLoss):
    """``monai.losses.TverskyLoss``, its sums fused (module doc)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        t = _fusable(self, input, target)
        if t is None:
            return super().forward(input, target)
        _, sums = _sums(input, t, False)
        tp, p, gt = _tp_p_t(self, sums)
        f = _composite.tversky_from_sums(tp, p, gt, self.alpha, self.beta, self.smooth_nr,
                                         self.smooth_dr).to(input.dtype)
        return f if self.reduction == "none" else _reduce(self, f, input)  # (MONAI's: unshaped)


# ---------------------------------------------------------------- the patch

_SWAPS = _swap.Swaps()
_OURS = {"DiceLoss": DiceLoss, "DiceCELoss": DiceCELoss, "DiceFocalLoss": DiceFocalLoss,
         "GeneralizedDiceLoss": GeneralizedDiceLoss, "TverskyLoss": TverskyLoss}
_WHERE = {"DiceLoss": _dice.__name__, "DiceCELoss": _dice.__name__,
          "DiceFocalLoss": _dice.__name__, "GeneralizedDiceLoss": _dice.__name__,
          "TverskyLoss": _tversky.__name__}


def patch_monai() -> _swap.Restore:
    """Swap MONAI's DiceLoss, DiceCELoss, DiceFocalLoss, GeneralizedDiceLoss and TverskyLoss (in
    ``monai.losses`` and their defining modules) for these. Returns a context manager that undoes
    this call on exit. Objects made before the patch stay MONAI's."""
    return _SWAPS.apply([(where, name, ours) for name, ours in _OURS.items()
                         for where in ("monai.losses", _WHERE[name])])


def unpatch_monai() -> None:
    """Restore MONAI's originals of every name ``patch_monai`` swapped."""
    _SWAPS.restore_originals()
