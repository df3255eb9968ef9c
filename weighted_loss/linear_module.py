"""PyTorch's linear cross-entropy API on the fused kernels (weighted_loss/linear.py):

- ``torch_linear_cross_entropy``: ``F.linear_cross_entropy`` exactly, its checks and errors
  included (what ``wl.patch_torch()`` puts in its place); ``wl.linear_cross_entropy`` takes the
  same call and more (any leading input dims, z-loss, softcap, process groups).
- ``LinearCrossEntropyLoss``: ``nn.LinearCrossEntropyLoss``'s module, which owns the projection
  (``LinearCrossEntropyLoss(in_features, num_classes, ...)``: the same parameters, initialization
  and state_dict keys), or without one as before (``LinearCrossEntropyLoss(weight=w, ...)``,
  ``forward(input, linear_weight, target, bias)``).
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _options, _script
from .linear import linear_cross_entropy

__all__ = ["LinearCrossEntropyLoss", "torch_linear_cross_entropy"]

# PyTorch's module where this torch has it (2.13 on): ours is its subclass, so a checkpoint, an
# isinstance check and repr() carry over. Bound here, before any patch swaps the name.
_TORCH_MODULE = getattr(torch.nn, "LinearCrossEntropyLoss", None)
_Base = _TORCH_MODULE if _TORCH_MODULE is not None else torch.nn.modules.loss._WeightedLoss


def torch_linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                               linear_bias: Optional[Tensor] = None,
                               weight: Optional[Tensor] = None, reduction: str = "mean",
                               ignore_index: Optional[int] = None,
                               label_smoothing: float = 0.0, options=None) -> Tensor:
    """``torch.nn.functional.linear_cross_entropy``: its signature, its shape checks (input 1-D
    or 2-D, RuntimeError for a shape it rejects), computed by :func:`linear_cross_entropy`."""
    _check_torch_api(input, linear_weight, target, linear_bias, ignore_index)
    return linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                weight=weight, reduction=reduction, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, options=options)


if "linear_cross_entropy" in _script.TORCH_FUNCTIONS:  # torch.jit.script meets PyTorch's own
    _script.scripts_as(torch_linear_cross_entropy, _script.TORCH_FUNCTIONS["linear_cross_entropy"])


def _check_torch_api(input, linear_weight, target, linear_bias, ignore_index):
    """F.linear_cross_entropy's checks, with its messages."""
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError("expected linear_weight with dimensionality at least 2, got "
                           f"{linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    classes, out = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (classes, *out):
        raise RuntimeError(f"expected linear_bias shape {(classes, *out)}, got "
                           f"{tuple(linear_bias.shape)}")
    if out and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {input.shape[-1]}), got unbatched input with shape "
            f"{tuple(input.shape)}")
    logits_shape = (*input.shape[:-1], classes, *out)
    if tuple(target.shape) == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")


class LinearCrossEntropyLoss(_Base):
    """``torch.nn.LinearCrossEntropyLoss`` on the fused kernels, in two forms.

    ``LinearCrossEntropyLoss(in_features, num_classes, *, out_features=(), bias=False, device=None,
    dtype=None, reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0,
    options=None)``: PyTorch's module, which owns ``linear`` (an ``nn.Linear`` of
    ``num_classes * prod(out_features)`` outputs, initialized as PyTorch's) and a ``weight``
    buffer; ``forward(input, target)``. A checkpoint of either loads into the other.

    ``LinearCrossEntropyLoss(weight=None, ignore_index=-100, reduction="mean", ...)`` with no
    sizes: no parameters; ``forward(input, linear_weight, target, bias=None, total_weight=None,
    sample_weight=None)``, with z_loss, softcap, chunk_size, process_group and logit_adjustment
    as :func:`weighted_loss.linear_cross_entropy` takes them."""

    def __init__(self, in_features: Optional[int] = None, num_classes: Optional[int] = None, *,
                 out_features: Tuple[int, ...] = (), bias: bool = False, device=None, dtype=None,
                 reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, process_group=None,
                 logit_adjustment: Optional[Tensor] = None):
        if torch.is_tensor(in_features):  # the parameter-free form's first positional: weight
            in_features, weight = None, in_features
        owns_linear = in_features is not None
        if owns_linear:
            if num_classes is None:
                raise TypeError("LinearCrossEntropyLoss: num_classes is required with "
                                "in_features")
            if _TORCH_MODULE is not None:
                super().__init__(in_features, num_classes, out_features=out_features, bias=bias,
                                 device=device, dtype=dtype, reduction=reduction, weight=weight,
                                 ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 options=options)
            else:  # a torch without the module: its construction, written out
                self._init_head(in_features, num_classes, out_features, bias, device, dtype,
                                reduction, weight, ignore_index, label_smoothing, options)
        else:
            torch.nn.modules.loss._WeightedLoss.__init__(self, weight, None, None, reduction)
            self.num_classes, self.out_features, self.linear = None, (), None
            self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
            self.options = options
        self.owns_linear = owns_linear
        _options.row_terms(z_loss, softcap)
        self.z_loss, self.softcap, self.chunk_size = z_loss, softcap, chunk_size
        self.process_group = process_group
        self.register_buffer("logit_adjustment", logit_adjustment)

    def _init_head(self, in_features, num_classes, out_features, bias, device, dtype, reduction,
                   weight, ignore_index, label_smoothing, options):
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got "
                               f"{tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError("expected label_smoothing to be in range [0, 1], got "
                               f"{label_smoothing}")
        torch.nn.modules.loss._WeightedLoss.__init__(self, weight, None, None, reduction)
        self.num_classes, self.out_features = num_classes, tuple(out_features)
        self.ignore_index, self.label_smoothing, self.options = ignore_index, label_smoothing, \
            options
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor, linear_weight: Optional[Tensor] = None,
                target: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                total_weight=None, sample_weight=None) -> Tensor:
        if self.owns_linear:  # forward(input, target), PyTorch's
            if target is None:
                target, linear_weight = linear_weight, None
            if linear_weight is not None or bias is not None or target is None:
                raise TypeError("LinearCrossEntropyLoss(in_features, num_classes): forward takes "
                                "(input, target); the module holds the projection")
            shape = (self.num_classes, *self.out_features)
            linear_weight = self.linear.weight.reshape(*shape, self.linear.in_features)
            bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
            _check_torch_api(input, linear_weight, target, bias, self.ignore_index)
        elif linear_weight is None or target is None:
            raise TypeError("LinearCrossEntropyLoss: forward takes (input, linear_weight, "
                            "target, bias=None) without in_features and num_classes")
        return linear_cross_entropy(
            input, linear_weight, target, bias, self.weight, self.ignore_index, self.reduction,
            self.label_smoothing, self.z_loss, self.softcap, self.chunk_size,
            options=self.options, process_group=self.process_group, total_weight=total_weight,
            logit_adjustment=self.logit_adjustment, sample_weight=sample_weight)

    def extra_repr(self) -> str:
        if self.owns_linear:
            return super().extra_repr() if _TORCH_MODULE is not None else (
                f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
        return f"reduction={self.reduction}, ignore_index={self.ignore_index}"
