"""Fused, class-weighted losses for PyTorch: drop-in replacements for F.cross_entropy,
nn.CrossEntropyLoss, F.binary_cross_entropy_with_logits and nn.BCEWithLogitsLoss with one forward
and one backward pass over the logits."""
import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before the extension)

from . import _C  # noqa: F401  (registers the weighted_loss ops)
from . import _ops  # noqa: F401  (fake kernels and autograd)
from . import distributed, functional, vocab_parallel
from .distributed import total_weight
from .functional import binary_cross_entropy, binary_cross_entropy_with_logits, cross_entropy
from .focal import FocalLoss, SigmoidFocalLoss, focal_loss, sigmoid_focal_loss
from .linear import linear_cross_entropy
from .linear_module import LinearCrossEntropyLoss
from .modules import BCELoss, BCEWithLogitsLoss, CrossEntropyLoss
from .overlap import (DiceLoss, GeneralizedDiceLoss, TverskyLoss, dice_loss, generalized_dice_loss,
                      overlap_sums, tversky_loss)
from .patch import is_patched, patch_torch, unpatch_torch
from .priors import adjust_logits, logit_adjustment
from .vocab_parallel import vocab_parallel_cross_entropy
from .weights import (class_weights, class_weights_from, count_labels, count_positives, pos_weight,
                      pos_weight_from_counts, sampler)

__all__ = [
    "cross_entropy", "CrossEntropyLoss", "binary_cross_entropy_with_logits", "BCEWithLogitsLoss",
    "functional", "cpu_capability", "class_weights", "pos_weight", "count_labels",
    "count_positives", "pos_weight_from_counts", "class_weights_from", "sampler", "distributed",
    "total_weight", "vocab_parallel", "vocab_parallel_cross_entropy", "linear_cross_entropy",
    "LinearCrossEntropyLoss", "sigmoid_focal_loss", "SigmoidFocalLoss",
    "focal_loss", "FocalLoss", "patch_torch", "unpatch_torch", "is_patched", "logit_adjustment",
    "adjust_logits", "binary_cross_entropy", "BCELoss", "overlap_sums", "dice_loss", "DiceLoss",
    "tversky_loss", "TverskyLoss", "generalized_dice_loss", "GeneralizedDiceLoss",
]
__version__ = "0.1.0"


def cpu_capability() -> str:
    """The CPU kernel build in use: "DEFAULT", "AVX2" or "AVX512" (capped by ATEN_CPU_CAPABILITY)."""
    return torch.ops.weighted_loss.cpu_capability()
