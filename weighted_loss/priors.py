"""Logit adjustment from the class priors (Menon et al., "Long-tail learning via logit adjustment",
ICLR 2021; Balanced Softmax, Ren et al., NeurIPS 2020, is tau = 1): the ``(C,)`` vector
``tau * log(n / N)`` from the label counts, to train with (``logit_adjustment=`` of the losses) or
to take off a plainly trained model's logits at inference (:func:`adjust_logits`).
"""
import warnings

import torch
from torch import Tensor

from ._reweight import along_classes, class_dim
from .weights import _counts_of

__all__ = ["logit_adjustment", "adjust_logits"]

# the pseudo-count of a class with no sample: half a sample, so that its prior is finite and below
# every class that occurs (log 0 would make its adjusted logit -inf in training, an inf loss for
# any target of it, and +inf after the post-hoc adjustment, every prediction it)
ZERO_COUNT = 0.5


def logit_adjustment(counts=None, tau: float = 1.0, *, labels=None, num_classes=None,
                     ignore_index=None) -> Tensor:
    """``tau * log(n / N)`` per class, a float32 ``(C,)`` tensor: pass it as ``logit_adjustment=``
    to :func:`weighted_loss.cross_entropy` (and the other cross-entropy losses) to train the
    logit-adjusted loss, or to :func:`adjust_logits` to correct a model trained without it.

    Counts as :func:`weighted_loss.class_weights` takes them: per-class counts positionally (any
    dtype, used as given) or ``labels=`` to count (with ``num_classes`` and ``ignore_index``).
    ``tau`` >= 0 (1: the Bayes-optimal adjustment for the balanced error; 0: no adjustment).
    A class with a count of 0 gets the prior of half a sample (``0.5 / N``, N counting it), with a
    warning naming it: finite, and below every class that occurs, never -inf (which would make any
    target of that class an infinite loss)."""
    tau_f = float(tau)
    if not tau_f >= 0 or tau_f == float("inf"):
        raise ValueError(f"logit_adjustment: tau must be a finite number >= 0, got {tau!r}")
    given = counts if counts is not None else labels
    device = given.device if isinstance(given, Tensor) else "cpu"
    n = _counts_of(counts, labels, num_classes, ignore_index).cpu()
    zero = n == 0
    if zero.all():
        raise ValueError("logit_adjustment: every class has a count of 0")
    if zero.any():
        warnings.warn(f"logit_adjustment: classes {zero.nonzero().flatten().tolist()} have a count "
                      f"of 0; their prior is taken as {ZERO_COUNT} samples", UserWarning,
                      stacklevel=2)
        n = torch.where(zero, torch.full_like(n, ZERO_COUNT), n)
    return (tau_f * torch.log(n / n.sum())).float().to(device)


def adjust_logits(logits: Tensor, adjustment: Tensor) -> Tensor:
    """``logits - adjustment`` over the class dim (dim 1 of ``(N, C, d...)``, dim 0 of ``(C,)``):
    the post-hoc logit adjustment of a model trained with the plain loss, whose argmax is then the
    balanced-error classifier (``adjustment`` = :func:`logit_adjustment` of the training counts).
    Differentiable; the result in PyTorch's promoted dtype of the two."""
    if not isinstance(adjustment, Tensor) or adjustment.dim() != 1:
        raise ValueError(f"adjust_logits: adjustment must be a (C,) tensor, got "
                         f"{getattr(adjustment, 'shape', type(adjustment).__name__)}")
    if logits.dim() == 0:
        raise ValueError("adjust_logits: logits must have a class dim, (C,) or (N, C, d...), got "
                         "a 0-d tensor")
    cdim = class_dim(logits)
    if logits.shape[cdim] != adjustment.shape[0]:
        raise ValueError(f"adjust_logits: logits have {logits.shape[cdim]} classes (dim {cdim} of "
                         f"{tuple(logits.shape)}), the adjustment {adjustment.shape[0]}")
    return logits - along_classes(adjustment.to(logits.device), logits)
