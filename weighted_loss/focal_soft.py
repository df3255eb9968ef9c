"""The softmax focal loss over soft targets: class probabilities, or class indices with label
smoothing. Each item's loss is a sum over its classes, ``sum_c w_c t_c phi(p_c)`` with
``phi(p) = -(1 - p)^gamma log p``, which, unlike cross-entropy's, is not linear in ``log p`` and
so needs the log-sum-exp before its sum: the kernels' one-pass forms do not cover it. This is the
one part of the focal losses computed by PyTorch ops (log_softmax, elementwise terms, a sum over
the classes) under one autograd function, in float32 for narrower inputs: several passes and one
logits-sized buffer saved for the backward, the gradient written by its formula.

Targets t' per class: probabilities ``(1 - s) t + s / C``; indices ``(1 - s) onehot(y) + s / C``
(label smoothing s, as PyTorch's cross-entropy). The gradient for logit j is
``w_j t'_j psi_j - p_j sum_c w_c t'_c psi_c`` with ``psi = p phi'(p) = -(1 - p)^gamma
(1 + gamma p nll / (1 - p))``, ``nll = -log p`` and the ratio at its limit 1 where ``p = 1`` (the
kernels' focal gradient factor), so ``gamma < 1`` gives no NaN.
"""
import torch
from torch import Tensor


def _factors(logp: Tensor, gamma: float):
    """phi = -(1 - p)^gamma log p and psi (module docstring), elementwise."""
    nll = -logp
    q = -torch.expm1(logp)
    m = q.pow(gamma)
    p = logp.exp()
    ratio = torch.where(q > 0, nll / torch.where(q > 0, q, 1.0), 1.0)
    psi = -m * (1 + gamma * p * ratio)
    return m * nll, psi


class _SoftFocal(torch.autograd.Function):
    """Per-item losses of (..., C) logits (classes last) against (..., C) weighted targets wt
    (w_c t'_c, no gradient)."""

    @staticmethod
    def forward(ctx, x, wt, gamma):
        logp = torch.log_softmax(x, dim=-1)
        phi, _ = _factors(logp, gamma)
        ctx.save_for_backward(logp, wt)
        ctx.gamma = gamma
        return (wt * phi).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        logp, wt = ctx.saved_tensors
        _, psi = _factors(logp, ctx.gamma)
        a = wt * psi
        gx = a - logp.exp() * a.sum(-1, keepdim=True)
        return gx * grad.unsqueeze(-1), None, None


def soft_focal_loss(input: Tensor, target: Tensor, gamma: float, weight, ignore_index: int,
                    reduction: str, label_smoothing: float) -> Tensor:
    """wl.focal_loss for probability targets or label smoothing (arguments checked there)."""
    if input.dim() == 1:
        item = soft_focal_loss(input.unsqueeze(0), target.unsqueeze(0), gamma, weight,
                               ignore_index, reduction, label_smoothing)
        return item.squeeze(0) if reduction == "none" else item
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.movedim(1, -1).to(acc)
    C = x.shape[-1]
    w = torch.ones(C, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    s = label_smoothing
    if target.is_floating_point():  # probabilities of the input's shape
        t = target.movedim(1, -1).to(acc)
        wt = w * ((1 - s) * t + s / C) if s > 0 else w * t
        loss = _SoftFocal.apply(x, wt, gamma)
        if reduction == "none":
            return loss.to(input.dtype)
        total = loss.sum()
        return (total if reduction == "sum" else total / max(loss.numel(), 1)).to(input.dtype)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = torch.nn.functional.one_hot(y, C).to(acc)  # checks 0 <= y < C
    wt = w * ((1 - s) * onehot + s / C) * valid.unsqueeze(-1)
    loss = _SoftFocal.apply(x, wt, gamma)
    if reduction == "none":
        return loss.to(input.dtype)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    return (loss.sum() / (w[y] * valid).sum()).to(input.dtype)
