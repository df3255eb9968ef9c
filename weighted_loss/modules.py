"""Drop-in loss modules: subclasses of the torch.nn losses with the same constructor, buffers and
state_dict, whose forward runs the fused kernels."""
import torch
from torch import Tensor

from . import _options, _script
from . import functional as F

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "BCELoss"]


# PyTorch's modules, bound before any patch: the stand-ins torch.jit.script compiles (_script.py)
_TorchCrossEntropyLoss = torch.nn.CrossEntropyLoss
_TorchBCEWithLogitsLoss = torch.nn.BCEWithLogitsLoss
_TorchBCELoss = torch.nn.BCELoss


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`weighted_loss.cross_entropy`;
    ``z_loss=`` and ``softcap=`` as there; ``process_group=`` makes the mean the whole group's
    (see :mod:`weighted_loss.distributed`), and ``forward(..., total_weight=)`` divides by a given
    denominator. ``logit_adjustment=`` (a buffer, carried by ``state_dict`` as ``weight`` is;
    absent from it when None) and ``forward(..., sample_weight=)`` as for the function."""

    def __init__(self, *args, z_loss=0.0, softcap=None, process_group=None,
                 logit_adjustment=None, **kwargs):
        super().__init__(*args, **kwargs)
        _options.row_terms(z_loss, softcap)
        self.z_loss, self.softcap = z_loss, softcap
        self.process_group = process_group
        self.register_buffer("logit_adjustment", logit_adjustment)

    def forward(self, input: Tensor, target: Tensor, total_weight=None,
                sample_weight=None) -> Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap,
                               process_group=self.process_group, total_weight=total_weight,
                               logit_adjustment=self.logit_adjustment,
                               sample_weight=sample_weight)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles: PyTorch's module with these buffers (_script.py)."""
        _script.refuse_options(self, {"z_loss": self.z_loss, "softcap": self.softcap,
                                      "process_group": self.process_group,
                                      "logit_adjustment": self.logit_adjustment})
        return _TorchCrossEntropyLoss(self.weight, ignore_index=self.ignore_index,
                                      reduction=self.reduction,
                                      label_smoothing=self.label_smoothing).train(self.training)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by :func:`weighted_loss.binary_cross_entropy_with_logits`;
    ``process_group=`` and ``total_weight=`` as for :class:`CrossEntropyLoss`."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor, total_weight=None) -> Tensor:
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  pos_weight=self.pos_weight,
                                                  reduction=self.reduction,
                                                  process_group=self.process_group,
                                                  total_weight=total_weight)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles: PyTorch's module with these buffers (_script.py)."""
        _script.refuse_options(self, {"process_group": self.process_group})
        return _TorchBCEWithLogitsLoss(self.weight, reduction=self.reduction,
                                       pos_weight=self.pos_weight).train(self.training)


class BCELoss(torch.nn.BCELoss):
    """``torch.nn.BCELoss`` computed by :func:`weighted_loss.binary_cross_entropy`, with
    ``pos_weight=`` as ``torch.nn.BCEWithLogitsLoss`` has it (a buffer, carried by ``state_dict``;
    absent from it when None); ``process_group=`` and ``total_weight=`` as for
    :class:`CrossEntropyLoss`."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight=None, *, process_group=None):
        super().__init__(weight, size_average, reduce, reduction)
        self.register_buffer("pos_weight", pos_weight)
        self.process_group = process_group

    def forward(self, input: Tensor, target: Tensor, total_weight=None) -> Tensor:
        return F.binary_cross_entropy(input, target, self.weight, reduction=self.reduction,
                                      pos_weight=self.pos_weight,
                                      process_group=self.process_group,
                                      total_weight=total_weight)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """What ``torch.jit.script`` compiles: PyTorch's module with these buffers (_script.py)."""
        _script.refuse_options(self, {"pos_weight": self.pos_weight,
                                      "process_group": self.process_group})
        return _TorchBCELoss(self.weight, reduction=self.reduction).train(self.training)


# Every module of the package, as torch.nn holds them (each defined beside its feature).
from .focal import FocalLoss, SigmoidFocalLoss  # noqa: E402
from .linear_module import LinearCrossEntropyLoss  # noqa: E402

__all__ += ["FocalLoss", "SigmoidFocalLoss", "LinearCrossEntropyLoss"]
