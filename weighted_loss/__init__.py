"""Fused, class-weighted losses for PyTorch: drop-in replacements for F.cross_entropy and
nn.CrossEntropyLoss with one forward and one backward pass over the logits."""
import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before the extension)

from . import _C  # noqa: F401  (registers the weighted_loss ops)
from . import _ops  # noqa: F401  (fake kernels and autograd)
from . import functional
from .functional import cross_entropy
from .modules import CrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss", "functional", "cpu_capability"]
__version__ = "0.1.0"


def cpu_capability() -> str:
    """The CPU kernel build in use: "DEFAULT", "AVX2" or "AVX512" (capped by ATEN_CPU_CAPABILITY)."""
    return torch.ops.weighted_loss.cpu_capability()
