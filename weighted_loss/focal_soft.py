"""The softmax focal loss over soft targets: class probabilities, or class indices with label
smoothing. Each item's loss is a sum over its classes, ``sum_c w_c t_c phi(p_c)`` with
``phi(p) = -(1 - p)^gamma log p``, which, unlike cross-entropy's, is not linear in ``log p`` and
so needs the log-sum-exp before its sum: the kernels' one-pass forms do not cover it. This is the
one part of the focal losses computed by PyTorch ops (log_softmax, elementwise terms, a sum over
the classes, all along the logits' own class dim) under one autograd function, in float32 for
narrower inputs: several passes and log p saved for the backward (class-index targets are never
expanded to one-hot), the gradient written by its formula.

Targets t' per class: probabilities ``(1 - s) t + s / C``; indices ``(1 - s) onehot(y) + s / C``
(label smoothing s, as PyTorch's cross-entropy). The gradient for logit j is
``w_j t'_j psi_j - p_j sum_c w_c t'_c psi_c`` with ``psi = p phi'(p) = -(1 - p)^gamma
(1 + gamma p nll / (1 - p))``, ``nll = -log p`` and the ratio at its limit 1 where ``p = 1`` (the
kernels' focal gradient factor), so ``gamma < 1`` gives no NaN; for gamma >= 1 it is
``-q^(gamma - 1) (q + gamma p nll)``, ``q = 1 - p``, with no limit to take.
"""
import torch
from torch import Tensor


def _phi(logp: Tensor, gamma: float) -> Tensor:
    """-(1 - p)^gamma log p, elementwise, 1 - p as -expm1(log p)."""
    q = torch.expm1(logp).neg_()
    return (q.square_() if gamma == 2 else q.pow_(gamma)).mul_(logp).neg_()


def _psi(logp: Tensor, gamma: float) -> Tensor:
    """p phi'(p) (module docstring), elementwise."""
    q = torch.expm1(logp).neg_()
    pn = torch.exp(logp).mul_(logp).mul_(-gamma)  # gamma p nll
    if gamma >= 1:
        qg1 = q.clone() if gamma == 2 else q.pow(gamma - 1)
        return q.add_(pn).mul_(qg1).neg_()
    ratio = torch.where(q > 0, pn / torch.where(q > 0, q, 1.0), gamma * logp.exp())
    return q.pow_(gamma).mul_(ratio.add_(1)).neg_()


class _SoftFocal(torch.autograd.Function):
    """Per-item losses of (N, C, d...) logits (acc dtype) along dim 1. The weighted targets
    w_c t'_c are either a dense tensor of the logits' shape `dense` (probabilities; its gradient
    is phi, so that probability targets get theirs through it), or, for class indices y (-1:
    ignored) with label smoothing s, `spread` = w s / C for every class (shaped to broadcast
    along dim 1) plus `peak` = (1 - s) w_y at y, never expanded to the logits' shape."""

    @staticmethod
    def forward(ctx, x, dense, spread, y, peak, gamma):
        logp = torch.log_softmax(x, dim=1)
        phi = _phi(logp, gamma)
        ctx.save_for_backward(logp, dense, spread, y, peak)
        ctx.gamma = gamma
        if dense is not None:
            return (dense * phi).sum(1)
        yi = y.clamp(min=0).unsqueeze(1)
        at_y = phi.gather(1, yi).squeeze(1)
        return torch.where(y >= 0, (phi * spread).sum(1) + peak * at_y, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logp, dense, spread, y, peak = ctx.saved_tensors
        g = grad.unsqueeze(1)
        g_dense = _phi(logp, ctx.gamma).mul_(g) if ctx.needs_input_grad[1] else None
        psi = _psi(logp, ctx.gamma)
        if dense is not None:
            a = psi.mul_(dense)
        else:
            yi = y.clamp(min=0).unsqueeze(1)
            at_y = psi.gather(1, yi)
            a = psi.mul_(spread).scatter_add_(1, yi, peak.unsqueeze(1) * at_y)
            a = a.mul_((y >= 0).unsqueeze(1))
        gx = a.sub_(logp.exp().mul_(a.sum(1, keepdim=True))).mul_(g)
        return gx, g_dense, None, None, None, None


def soft_focal_loss(input: Tensor, target: Tensor, gamma: float, weight, ignore_index: int,
                    reduction: str, label_smoothing: float) -> Tensor:
    """wl.focal_loss for probability targets or label smoothing (arguments checked there)."""
    if input.dim() == 1:
        item = soft_focal_loss(input.unsqueeze(0), target.unsqueeze(0), gamma, weight,
                               ignore_index, reduction, label_smoothing)
        return item.squeeze(0) if reduction == "none" else item
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(acc)
    C = x.shape[1]
    w = torch.ones(C, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    w = w.reshape(C, *([1] * (x.dim() - 2)))  # along dim 1
    s = label_smoothing
    if target.is_floating_point():  # probabilities of the input's shape
        t = target.to(acc)
        dense = w * ((1 - s) * t + s / C) if s > 0 else w * t
        loss = _SoftFocal.apply(x, dense, None, None, None, gamma)
        if reduction == "none":
            return loss.to(input.dtype)
        total = loss.sum()
        return (total if reduction == "sum" else total / max(loss.numel(), 1)).to(input.dtype)
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= C))
    # checked where it costs no device sync (on a GPU, gather's own bounds check fires)
    if input.device.type == "cpu" and not torch.compiler.is_compiling() and bool(bad.any()):
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")
    y = torch.where(valid, target, -1).long()
    wy = w.reshape(-1)[y.clamp(min=0)] * valid
    loss = _SoftFocal.apply(x, None, w * (s / C), y, (1 - s) * wy, gamma)
    if reduction == "none":
        return loss.to(input.dtype)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    return (loss.sum() / wy.sum()).to(input.dtype)
