"""What ``torch.jit.script`` compiles in place of the library's functions and modules.

TorchScript cannot compile the fused functions: they take keyword-only arguments and run an op
layer in Python. TorchScript asks an object for a scriptable stand-in through its
``__prepare_scriptable__``: a module scripted whole (or inside a model), and a function that a
scripted function calls. Each export names one here:

- the drop-ins (``cross_entropy``, the two BCEs, their modules, and every name ``patch_torch``
  swaps): PyTorch's own, or torchvision's ``sigmoid_focal_loss``. Their values are the fused
  ones' to rounding, and a patched program scripts as it did unpatched.
- ``focal_loss``, ``sigmoid_focal_loss`` and their modules: the composites below, in PyTorch's ops,
  one precision up as ``_composite`` computes.

A module with an option its stand-in lacks (z-loss, softcap, a process group, a logit
adjustment, BCELoss's pos_weight) raises, naming the option. The scripted forms run PyTorch's
kernels; ``torch.compile`` and ``torch.export`` keep the fused ops. A leaf: PyTorch only.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

# PyTorch's functions and modules as they were when the package was imported: before any patch
TORCH_FUNCTIONS = {name: getattr(nn.functional, name) for name in
                   ("cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy",
                    "linear_cross_entropy") if hasattr(nn.functional, name)}


def scripts_as(fn, stand_in) -> None:
    """Make ``torch.jit.script`` compile ``stand_in`` wherever it meets ``fn``."""
    fn.__prepare_scriptable__ = lambda: stand_in


def refuse_options(module: nn.Module, options: Dict[str, object]) -> None:
    """Raise where an option is set that the module's TorchScript stand-in cannot express."""
    on = {k: v for k, v in options.items()
          if v is not None and not (isinstance(v, (int, float)) and v == 0)}
    if on:
        named = ", ".join(k if isinstance(v, Tensor) else f"{k}={v!r}" for k, v in on.items())
        raise RuntimeError(
            f"torch.jit.script: {type(module).__name__} with {named} has no TorchScript form "
            "(its scripted stand-in is PyTorch's loss, which has no such option); torch.compile "
            "and torch.export run it fused")


def _up(x: Tensor) -> Tensor:
    """One precision up: float32 for 16-bit floats, float64 for float32."""
    if x.dtype == torch.float32:
        return x.double()
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        return x.float()
    return x


def _reduce(rows: Tensor, divisor: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / divisor.sum()


def focal_loss(input: Tensor, target: Tensor, gamma: float = 2.0, weight: Optional[Tensor] = None,
               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
               logit_adjustment: Optional[Tensor] = None,
               sample_weight: Optional[Tensor] = None) -> Tensor:
    """``wl.focal_loss`` in PyTorch's ops (focal.py gives the formula), its keyword-only
    arguments positional."""
    x, t = _up(input), target
    if input.dim() == 1:
        x, t = x.unsqueeze(0), t.unsqueeze(0)
    classes = x.size(1)
    shape: List[int] = [1, classes] + [1] * (x.dim() - 2)
    if logit_adjustment is not None:
        x = x + logit_adjustment.to(x.dtype).view(shape)
    logp = torch.log_softmax(x, 1)
    terms = -((-torch.expm1(logp)) ** gamma) * logp  # (1 - p)^gamma (-log p), per class
    wc = torch.ones(classes, dtype=x.dtype, device=x.device) if weight is None else \
        weight.to(x.dtype)
    s = label_smoothing
    out_dtype = input.dtype
    if target.is_floating_point():  # probabilities, the logits' shape
        out_dtype = torch.promote_types(input.dtype, target.dtype)
        tt = t.to(x.dtype)
        if s > 0:
            tt = (1.0 - s) * tt + s / classes
        rows = (wc.view(shape) * tt * terms).sum(1)
        divisor = torch.ones_like(rows)
    else:
        y = t.long()
        valid = y != ignore_index
        yc = torch.where(valid, y, torch.zeros_like(y))
        w_y = wc[yc] * valid
        rows = w_y * terms.gather(1, yc.unsqueeze(1)).squeeze(1)
        if s > 0:
            rows = (1.0 - s) * rows + s / classes * (wc.view(shape) * terms).sum(1) * valid
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        divisor = w_y
    if sample_weight is not None:
        sw = sample_weight.to(x.dtype)
        if input.dim() == 1:
            sw = sw.unsqueeze(0)
        rows, divisor = rows * sw, divisor * sw
    if input.dim() == 1:
        rows, divisor = rows.squeeze(0), divisor.squeeze(0)
    return _reduce(rows, divisor, reduction).to(out_dtype)


def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", weight: Optional[Tensor] = None,
                       pos_weight: Optional[Tensor] = None,
                       alpha_tensor: Optional[Tensor] = None) -> Tensor:
    """``wl.sigmoid_focal_loss`` in PyTorch's ops (focal.py gives the formula): a float
    ``alpha`` (-1: no alpha_t), or ``alpha_tensor`` in its place."""
    x, t = _up(input), target.to(_up(input).dtype)
    pt = t if pos_weight is None else pos_weight.to(x.dtype) * t
    ce = -(pt * nn.functional.logsigmoid(x) + (1.0 - t) * nn.functional.logsigmoid(-x))
    if weight is not None:
        ce = ce * weight.to(x.dtype)
    # 1 - p_t as p (1 - t) + (1 - p) t, with 1 - p = sigmoid(-x): no cancellation near p_t = 1
    loss = ce * (torch.sigmoid(x) * (1.0 - t) + torch.sigmoid(-x) * t) ** gamma
    if alpha_tensor is not None:
        a = alpha_tensor.to(x.dtype)
        loss = (a * t + (1.0 - a) * (1.0 - t)) * loss
    elif alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return _reduce(loss, torch.full((1,), float(loss.numel()), dtype=loss.dtype), reduction) \
        .to(torch.promote_types(input.dtype, target.dtype))


class FocalLoss(nn.Module):
    """``wl.FocalLoss``'s TorchScript stand-in: the same buffers, the composite above."""
    weight: Optional[Tensor]
    logit_adjustment: Optional[Tensor]

    def __init__(self, gamma: float, weight: Optional[Tensor], ignore_index: int, reduction: str,
                 label_smoothing: float, logit_adjustment: Optional[Tensor]):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight)
        self.register_buffer("logit_adjustment", logit_adjustment)

    def forward(self, input: Tensor, target: Tensor,
                sample_weight: Optional[Tensor] = None) -> Tensor:
        return focal_loss(input, target, self.gamma, self.weight, self.ignore_index,
                          self.reduction, self.label_smoothing, self.logit_adjustment,
                          sample_weight)


class SigmoidFocalLoss(nn.Module):
    """``wl.SigmoidFocalLoss``'s TorchScript stand-in: the same buffers, the composite above."""
    alpha_tensor: Optional[Tensor]
    weight: Optional[Tensor]
    pos_weight: Optional[Tensor]

    def __init__(self, alpha: float, alpha_tensor: Optional[Tensor], gamma: float,
                 reduction: str, weight: Optional[Tensor], pos_weight: Optional[Tensor]):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction
        self.register_buffer("alpha_tensor", alpha_tensor)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction,
                                  self.weight, self.pos_weight, self.alpha_tensor)
