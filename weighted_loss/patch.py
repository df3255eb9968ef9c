"""``wl.patch_torch()``: the drop-in for code that cannot be edited (timm, torchvision's reference
scripts, a Lightning template, a transformers model), by swapping PyTorch's names for ours.

What it changes (and nothing else):
  - ``torch.nn.functional.cross_entropy``, ``binary_cross_entropy_with_logits`` and
    ``binary_cross_entropy``;
  - ``torch.nn.CrossEntropyLoss``, ``BCEWithLogitsLoss`` and ``BCELoss``, under each name PyTorch
    exports them
    (``torch.nn``, ``torch.nn.modules``, ``torch.nn.modules.loss``);
  - where PyTorch has them (2.13 on): ``torch.nn.functional.linear_cross_entropy`` and
    ``torch.nn.LinearCrossEntropyLoss`` (under the same three names), PyTorch's API computed by
    the fused linear cross-entropy (linear_module.py);
  - with ``torchvision=True`` where torchvision is importable: ``torchvision.ops.sigmoid_focal_loss``
    (and ``torchvision.ops.focal_loss.sigmoid_focal_loss``), with torchvision's argument names,
    and the name RetinaNet's and FCOS's modules bound at their import
    (``torchvision.models.detection.retinanet`` and ``.fcos``), so their training steps run it.

PyTorch's own modules look their functional up at call time, so an ``nn.CrossEntropyLoss`` made
before the patch computes with ours too; a name bound before it (``from torch.nn.functional import
cross_entropy`` in a module imported earlier, a class object kept aside) stays PyTorch's: patch at
the program's start, before importing the libraries whose losses should change.

``torch.jit.script`` compiles PyTorch's (and torchvision's) originals in place of the swapped
functions, so a program that scripted unpatched scripts patched (_script.py).

``patch_torch()`` patches at once and returns a handle; ``with wl.patch_torch(): ...`` restores on
exit what each name held when it was entered (so nested uses compose), ``wl.unpatch_torch()``
restores PyTorch's originals. Patching twice changes nothing more; a lock serializes concurrent
calls. The library itself never calls a name this swaps (its composites use PyTorch's
implementations directly, ``_composite``), so patched or not every autograd mode gives the same
result.
"""
import importlib
from typing import List, Tuple

import torch
from torch import Tensor

from . import _script, _swap, focal, functional, linear_module, modules

__all__ = ["patch_torch", "unpatch_torch", "is_patched"]

def _tv_sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25,
                           gamma: float = 2, reduction: str = "none") -> Tensor:
    """``torchvision.ops.sigmoid_focal_loss`` (its signature and argument names), computed by
    :func:`weighted_loss.sigmoid_focal_loss`."""
    return focal.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)


def _torchvision_original():
    """torchvision's own ``sigmoid_focal_loss``: what ``torch.jit.script`` compiles in place of
    the patched name (_script.py)."""
    module, name = "torchvision.ops.focal_loss", "sigmoid_focal_loss"
    return _SWAPS.original(module, name) or getattr(importlib.import_module(module), name)


_tv_sigmoid_focal_loss.__prepare_scriptable__ = _torchvision_original


def _targets(torchvision: bool) -> List[Tuple[str, str, object]]:
    """(module, name, ours) for every name the patch swaps."""
    out = [("torch.nn.functional", "cross_entropy", functional.cross_entropy),
           ("torch.nn.functional", "binary_cross_entropy_with_logits",
            functional.binary_cross_entropy_with_logits),
           ("torch.nn.functional", "binary_cross_entropy", functional.binary_cross_entropy)]
    for where in ("torch.nn", "torch.nn.modules", "torch.nn.modules.loss"):
        out += [(where, "CrossEntropyLoss", modules.CrossEntropyLoss),
                (where, "BCEWithLogitsLoss", modules.BCEWithLogitsLoss),
                (where, "BCELoss", modules.BCELoss)]
    if hasattr(torch.nn.functional, "linear_cross_entropy"):  # PyTorch 2.13 on
        out.append(("torch.nn.functional", "linear_cross_entropy",
                    linear_module.torch_linear_cross_entropy))
        out += [(where, "LinearCrossEntropyLoss", linear_module.LinearCrossEntropyLoss)
                for where in ("torch.nn", "torch.nn.modules", "torch.nn.modules.loss")]
    if torchvision:
        try:
            importlib.import_module("torchvision.ops")
        except Exception:  # noqa: BLE001 - absent or broken: nothing of torchvision to patch
            return out
        out += [(where, "sigmoid_focal_loss", _tv_sigmoid_focal_loss)
                for where in ("torchvision.ops", "torchvision.ops.focal_loss")]
        out += [(where, "sigmoid_focal_loss", _tv_sigmoid_focal_loss)
                for where in _DETECTION if _binds_torchvision_focal(where)]
    return out


# torchvision's modules that bind sigmoid_focal_loss at their import (``from ...ops import``)
_DETECTION = ("torchvision.models.detection.retinanet", "torchvision.models.detection.fcos")


def _binds_torchvision_focal(module: str) -> bool:
    """Whether ``module`` imports and holds torchvision's sigmoid_focal_loss (or ours)."""
    try:
        bound = getattr(importlib.import_module(module), "sigmoid_focal_loss", None)
    except Exception:  # noqa: BLE001 - absent or broken: nothing there to patch
        return False
    return bound is not None and (bound is _tv_sigmoid_focal_loss or
                                  bound is _torchvision_original())


_SWAPS = _swap.Swaps()


def patch_torch(*, torchvision: bool = True) -> _swap.Restore:
    """Swap PyTorch's cross-entropy, BCE-with-logits and BCE (functional and modules), and
    torchvision's ``sigmoid_focal_loss`` with ``torchvision=True``, for the fused ones; see the
    module's doc for the names. Returns a context manager that undoes this call on exit."""
    return _SWAPS.apply(_targets(torchvision))


def unpatch_torch() -> None:
    """Restore PyTorch's (and torchvision's) originals of every name ``patch_torch`` swapped."""
    _SWAPS.restore_originals()


def is_patched() -> bool:
    """Whether ``torch.nn.functional.cross_entropy`` is ours now."""
    import torch.nn.functional as F
    return F.cross_entropy is functional.cross_entropy
