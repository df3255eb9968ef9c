"""A loss's options as one value, checked once where they enter the library.

Each entry point (functional, focal, linear, vocab_parallel, the modules) turns its keyword
arguments into one of these, and everything below it (the DTensor and process-group paths, the
single-device losses, the op calls) reads the fields it needs: adding an option is a field, its
check here, and its uses. The ops' schemas stay flat (torch.library needs them so): their
arguments are made here, by schema name, in ``op_kwargs``, and nowhere else.

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
    """The options of cross-entropy, and of the softmax focal loss where ``gamma`` is set."""
    weight: Optional[Tensor] = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None
    gamma: Optional[float] = None  # the focal loss's exponent (0 computes cross-entropy)
    process_group: Any = None
    total_weight: Any = None
    # (weighted_loss/_reweight.py) a (C,) tensor added to the logits; one weight per item
    logit_adjustment: Optional[Tensor] = None
    sample_weight: Optional[Tensor] = None

    @property
    def loss(self) -> str:
        """The loss's name, as its messages say it."""
        return "focal_loss" if self.gamma else "cross_entropy"

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

    def op_kwargs(self, prob: bool, reduction: Optional[str] = None) -> dict:
        """The options of the cross_entropy_* ops by schema name (csrc/ops.cpp), beside
        (input, target, weight): class indices, or probabilities (``prob``: no ignore_index);
        ``reduction`` overrides the options'."""
        out = dict(reduction=reduction or self.reduction,
                   label_smoothing=max(self.label_smoothing, 0.0), z_loss=self.z_loss,
                   softcap=self.softcap, gamma=self.gamma)
        if not prob:
            out["ignore_index"] = self.ignore_index
        return out


# The elementwise losses of the BCE kernels, by the names of their ops (csrc/ops.cpp)
WITH_LOGITS = "binary_cross_entropy_with_logits"
SIGMOID_FOCAL = "sigmoid_focal_loss"
PROBABILITIES = "binary_cross_entropy"


@dataclasses.dataclass(frozen=True, eq=False)
class BinaryOptions:
    """The options of the elementwise losses: ``loss`` names which (BCE with logits, the sigmoid
    focal loss, BCE of probabilities)."""
    loss: str = WITH_LOGITS
    weight: Optional[Tensor] = None
    pos_weight: Optional[Tensor] = None
    reduction: str = "mean"
    gamma: Optional[float] = None  # the sigmoid focal loss's exponent
    # its alpha: a float, a tensor per element, or None for no alpha_t (torchvision's -1)
    alpha: Union[None, float, Tensor] = None
    process_group: Any = None
    total_weight: Any = None

    @property
    def focal(self) -> bool:
        return self.loss == SIGMOID_FOCAL

    @property
    def grouped(self) -> bool:
        return self.process_group is not None or self.total_weight is not None

    def but(self, **changes) -> "BinaryOptions":
        return dataclasses.replace(self, **changes)

    def local(self, reduction: str) -> "BinaryOptions":
        return dataclasses.replace(self, reduction=reduction, process_group=None,
                                   total_weight=None)

    def op_kwargs(self) -> dict:
        """The arguments of the loss's forward op by schema name, beside (input, target)."""
        out = dict(weight=self.weight, pos_weight=self.pos_weight, reduction=self.reduction)
        if self.focal:
            tensor_alpha = isinstance(self.alpha, Tensor)
            out.update(gamma=self.gamma, alpha=None if tensor_alpha else self.alpha,
                       alpha_tensor=self.alpha if tensor_alpha else None)
        return out


# ------------------------------------------------------------------------------ the checks

def row_terms(z_loss, softcap):
    """(z_loss, softcap) as the ops take them, checked (softcap None: off)."""
    z = float(z_loss)
    if not z >= 0 or z == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is None:
        return z, None
    cap = float(softcap)
    if not cap > 0 or cap == float("inf"):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    return z, cap


def check_gamma(gamma) -> float:
    # comparisons rather than math.isnan / isinf: torch.compile(dynamic=True) traces them (a
    # float argument is symbolic there; math.isnan broke the graph)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or gamma != gamma \
            or gamma < 0 or gamma == math.inf:
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
                  z_loss=0.0, softcap=None, gamma=None, process_group=None, total_weight=None,
                  op: Optional[str] = None, logit_adjustment=None,
                  sample_weight=None) -> CrossEntropyOptions:
    """Checked options of cross-entropy (``gamma``: the focal loss's, checked by the caller).
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


def binary(weight=None, pos_weight=None, reduction="mean", gamma=None, alpha=None,
           process_group=None, total_weight=None, loss=WITH_LOGITS) -> BinaryOptions:
    """Checked options of an elementwise loss (gamma and alpha: the sigmoid focal loss's, checked
    by its entry point with torchvision's messages; alpha -1 is None, no alpha_t)."""
    _check_grouped(reduction, process_group, total_weight, None)
    check_reduction(reduction)
    if gamma is not None:
        loss = SIGMOID_FOCAL
    if not isinstance(alpha, Tensor) and alpha is not None and alpha < 0:
        alpha = None
    return BinaryOptions(loss, weight, pos_weight, reduction, gamma, alpha, process_group,
                         total_weight)
