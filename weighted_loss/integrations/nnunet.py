"""nnU-Net v2's default loss, Dice + cross-entropy, fused: ``DC_and_CE_loss`` with nnU-Net's
constructor (soft_dice_kwargs, ce_kwargs, weight_ce, weight_dice, ignore_label, dice_class), its
``.dc`` and ``.ce`` attributes, and its value: -mean Dice plus the cross-entropy
(docs/segmentation.md).

Its forward reads the logits once for both terms (the cross_entropy_overlap op) where nnU-Net's
own would run a softmax, a one-hot target and their products: a label map target (B, 1, ...),
``dice_class`` SoftDiceLoss (without ``clip_tp``) or MemoryEfficientSoftDiceLoss with nnU-Net's
softmax. Its ``ddp=True`` batch Dice sums over the processes as nnU-Net's AllGatherGrad does.
Anything else runs nnU-Net's forward. ``wl.patch_nnunet()`` swaps it where nnU-Net's trainer finds it.
"""
import importlib

import torch
from nnunetv2.training.loss import compound_losses as _cl
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss, SoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1
from torch import Tensor

from .. import _overlap, _swap

__all__ = ["DC_and_CE_loss", "patch_nnunet", "unpatch_nnunet"]


def _dice_module(dc):
    """The Dice module behind ``.dc``, which nnU-Net's trainer may wrap in torch.compile."""
    return getattr(dc, "_orig_mod", dc)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _fusable(loss, x: Tensor, target: Tensor) -> bool:
    dc = _dice_module(loss.dc)
    if type(dc) not in (SoftDiceLoss, MemoryEfficientSoftDiceLoss):
        return False
    if dc.apply_nonlin is not softmax_helper_dim1 or getattr(dc, "clip_tp", None) is not None:
        return False
    ce = loss.ce
    return (type(ce).forward is _cl.RobustCrossEntropyLoss.forward and x.dim() >= 3
            and x.is_floating_point() and x.shape[1] > 1 and target.dim() == x.dim()
            and target.shape[1] == 1 and target.shape[0] == x.shape[0]
            and target.shape[2:] == x.shape[2:] and ce.reduction == "mean")


def _dice_of(dc, sums: Tensor) -> Tensor:
    """nnU-Net's -mean Dice of the sums (B, 3, C), as SoftDiceLoss or MemoryEfficientSoftDiceLoss
    compute it from tp, fp, fn (in float32 as theirs, float64 for float64 logits)."""
    if dc.batch_dice:
        sums = sums.sum(0)
        if dc.ddp and _distributed():  # nnU-Net's AllGatherGrad: the group's batch sums
            sums = _overlap.group_sums(sums, torch.distributed.group.WORLD)
    i, p, t = sums.unbind(-2)
    if type(dc) is SoftDiceLoss:
        tp, fp, fn = i, p - i, t - i
        dice = (2 * tp + dc.smooth) / torch.clip(2 * tp + fp + fn + dc.smooth, 1e-8)
    else:
        dice = (2 * i + dc.smooth) / (t + p + float(dc.smooth)).clamp_min(1e-8)
    if not dc.do_bg:
        dice = dice.narrow(-1, 1, dice.shape[-1] - 1)
    return -dice.mean()


class DC_and_CE_loss(_cl.DC_and_CE_loss):
    """nnU-Net v2's ``DC_and_CE_loss``, both terms in one pass over the logits (module doc)."""

    def forward(self, net_output: Tensor, target: Tensor):
        if not _fusable(self, net_output, target):
            return super().forward(net_output, target)
        ce = self.ce
        y = target[:, 0].long()  # (RobustCrossEntropyLoss's target[:, 0], .long())
        ignore = self.ignore_label if self.ignore_label is not None else ce.ignore_index
        ce_loss, sums = _overlap.softmax_terms(net_output, y, ce.weight, "mean", ignore,
                                               ce.label_smoothing, None, False)
        dc_loss = _dice_of(_dice_module(self.dc), sums) if self.weight_dice != 0 else 0
        if self.weight_ce == 0 or (self.ignore_label is not None and
                                   not bool((y != self.ignore_label).any())):
            ce_loss = 0  # (nnU-Net's: no cross-entropy without a labelled voxel)
        return self.weight_ce * ce_loss + self.weight_dice * dc_loss


_SWAPS = _swap.Swaps()
# where nnU-Net's code finds the class: its module, and the trainer that imports it by name
_WHERE = ("nnunetv2.training.loss.compound_losses",
          "nnunetv2.training.nnUNetTrainer.nnUNetTrainer")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:  # the trainer without its dependencies: nothing to swap there
        return False
    return True


def patch_nnunet() -> _swap.Restore:
    """Swap nnU-Net's ``DC_and_CE_loss`` for this one, in its module and in the trainer's (where
    the trainer imports: it needs nnU-Net's full dependencies). Returns a context manager that
    undoes this call on exit."""
    return _SWAPS.apply([(m, "DC_and_CE_loss", DC_and_CE_loss) for m in _WHERE
                         if _importable(m)])


def unpatch_nnunet() -> None:
    """Restore nnU-Net's ``DC_and_CE_loss`` wherever ``patch_nnunet`` swapped it."""
    _SWAPS.restore_originals()
