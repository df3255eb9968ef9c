"""A loss's options as one value, checked once where they enter the library.

Each entry point (functional, focal, linear, vocab_parallel, the modules) turns its keyword
arguments into one of these, and everything below it (the DTensor and process-group paths, the
single-device losses, the op calls) reads the fields it needs: adding an option is a field, its
check here, and its uses. The ops' schemas stay flat (torch.library needs them so): the flat
argument lists are made here, in ``*_args``, and nowhere else.

A leaf of the package: it imports nothing of it.
"""
import dataclasses
import math
import numbers
from typing import Any, Optional, Union

from torch import Tensor
from torch.nn import _reduction as _Reduction

_REDUCTIONS = ("none", "mean", "sum")


@dataclasses.dataclass(frozen=True, eq=False)
class CrossEntropyOptions:
    """The options of cross-entropy and of the softmax focal loss (``gamma > 0``)."""
    weight: Optional[Tensor] = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # the kernels' convention: 0 is off (None at the API)
    gamma: float = 0.0  # the focal loss's exponent; 0 is cross-entropy
    process_group: Any = None
    total_weight: Any = None
    # (weighted_loss/_reweight.py) a (C,) tensor added to the logits; one weight per item
    logit_adjustment: Optional[Tensor] = None
    sample_weight: Optional[Tensor] = None

    @property
    def grouped(self) -> bool:
        """Whether the mean is a group's or a step's (process_group= / total_weight=)."""
        return self.process_group is not None or self.total_weight is not None

    def but(self, **changes) -> "CrossEntropyOptions":
        """A copy with some fields changed (already checked: no check runs again)."""
        return dataclasses.replace(self, **changes)

    def local(self, reduction: str) -> "CrossEntropyOptions":
        """The options of one device's (or one shard's) part: ``reduction``, no group."""
        return dataclasses.replace(self, reduction=reduction, process_group=None,
                                   total_weight=None)

    def index_args(self, reduction: Optional[str] = None) -> tuple:
        """After (input, target, weight): the flat arguments of the cross_entropy_forward /
        _backward ops (class indices), ``reduction`` overriding the options'."""
        return (_Reduction.get_enum(reduction or self.reduction), self.ignore_index,
                max(self.label_smoothing, 0.0), self.z_loss, self.softcap, self.gamma)

    def prob_args(self, reduction: Optional[str] = None) -> tuple:
        """The same for the cross_entropy_prob_* ops (probability targets: no ignore_index)."""
        return (_Reduction.get_enum(reduction or self.reduction), max(self.label_smoothing, 0.0),
                self.z_loss, self.softcap, self.gamma)


@dataclasses.dataclass(frozen=True, eq=False)
class BinaryOptions:
    """The options of BCE with logits and of the sigmoid focal loss (``gamma >= 0``)."""
    weight: Optional[Tensor] = None
    pos_weight: Optional[Tensor] = None
    reduction: str = "mean"
    gamma: float = -1.0  # the sigmoid focal loss's exponent; < 0 is BCE
    alpha: Union[float, Tensor] = -1.0  # its alpha: a float (-1: off) or a tensor per element
    process_group: Any = None
    total_weight: Any = None
    prob_input: bool = False  # BCE of probabilities (F.binary_cross_entropy), not of logits

    @property
    def focal(self) -> bool:
        return self.gamma >= 0

    @property
    def grouped(self) -> bool:
        return self.process_group is not None or self.total_weight is not None

    def but(self, **changes) -> "BinaryOptions":
        return dataclasses.replace(self, **changes)

    def local(self, reduction: str) -> "BinaryOptions":
        return dataclasses.replace(self, reduction=reduction, process_group=None,
                                   total_weight=None)

    def op_args(self) -> tuple:
        """After (input, target): the flat arguments of binary_cross_entropy_with_logits_forward,
        the focal ones only for the focal loss (a tensor alpha switches the kernels' per-element
        alpha on, the float one then unused)."""
        red = _Reduction.get_enum(self.reduction)
        if self.prob_input:  # (gamma, alpha, alpha_tensor, out_dtype, prob_input)
            return (self.weight, self.pos_weight, red, -1.0, -1.0, None, None, True)
        if not self.focal:
            return (self.weight, self.pos_weight, red)
        tensor_alpha = isinstance(self.alpha, Tensor)
        return (self.weight, self.pos_weight, red, self.gamma,
                0.0 if tensor_alpha else self.alpha, self.alpha if tensor_alpha else None)


# ------------------------------------------------------------------------------ the checks

def row_terms(z_loss, softcap):
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


def check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or math.isnan(gamma) \
            or gamma < 0 or math.isinf(gamma):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    return float(gamma)


def check_alpha(alpha):
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


def check_reduction(reduction, op: Optional[str] = None) -> str:
    """PyTorch's message (``_Reduction.get_enum``'s) where ``op`` is None, else one naming op."""
    if op is None:
        _Reduction.get_enum(reduction)
    elif reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def _check_grouped(reduction, process_group, total_weight, op):
    if (process_group is not None or total_weight is not None) and reduction != "mean":
        prefix = f"{op}: " if op else ""
        raise ValueError(f"{prefix}process_group= and total_weight= apply to reduction='mean', "
                         f"got reduction={reduction!r}")


def cross_entropy(weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, gamma=0.0, process_group=None, total_weight=None,
                  op: Optional[str] = None, logit_adjustment=None,
                  sample_weight=None) -> CrossEntropyOptions:
    """Checked options of cross-entropy (``gamma``: of the focal loss, checked by the caller).
    ``op`` names the entry point in the messages that name it (linear, vocab-parallel)."""
    if op is not None:  # the entry points that name themselves check the reduction first
        check_reduction(reduction, op)
    _check_grouped(reduction, process_group, total_weight, op)
    check_reduction(reduction, op)
    z, cap = row_terms(z_loss, softcap)
    name = op or ("focal_loss" if gamma else "cross_entropy")
    for arg, t in (("logit_adjustment", logit_adjustment), ("sample_weight", sample_weight)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor or None, got {type(t).__name__}")
    if logit_adjustment is not None and not logit_adjustment.is_floating_point():
        raise TypeError(f"{name}: logit_adjustment must be a floating tensor, got "
                        f"{logit_adjustment.dtype}")
    return CrossEntropyOptions(weight, int(ignore_index), reduction, float(label_smoothing), z,
                               cap, gamma, process_group, total_weight, logit_adjustment,
                               sample_weight)


def binary(weight=None, pos_weight=None, reduction="mean", gamma=-1.0, alpha=-1.0,
           process_group=None, total_weight=None, prob_input=False) -> BinaryOptions:
    """Checked options of BCE with logits (gamma and alpha: the sigmoid focal loss's, checked by
    its entry point with torchvision's messages)."""
    _check_grouped(reduction, process_group, total_weight, None)
    check_reduction(reduction)
    return BinaryOptions(weight, pos_weight, reduction, gamma, alpha, process_group,
                         total_weight, prob_input)
