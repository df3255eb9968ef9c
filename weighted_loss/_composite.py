"""The losses written with PyTorch ops, differentiable to any order: what the fused ops compute,
term for term (csrc/params.h), for the paths the kernels do not take. Their backward uses this to
build a gradient that is itself differentiable when the backward runs with create_graph=True
(double backward, gradient penalties, Hessian-vector products, torch.func.grad of grad or jvp of
grad); a first-order backward never comes here.
"""
import torch
import torch.nn.functional as F

_NONE, _MEAN, _SUM = 0, 1, 2


def _reduce(rows, divisor, reduction):
    if reduction == _NONE:
        return rows
    total = rows.sum()
    return total / divisor if reduction == _MEAN else total


def _focal_factor(logp, gamma):
    """(1 - p)^gamma from log p, without cancelling where p is near 1."""
    return (-torch.expm1(logp)) ** gamma


def _batched_capped(input, target, softcap):
    """(C,) logits and their target as a batch of one; the logits as the loss sees them
    (softcap tanh(x / softcap) when softcap > 0)."""
    x, t = input, target
    if x.dim() == 1:
        x, t = x.unsqueeze(0), t.unsqueeze(0)
    if softcap > 0:
        x = softcap * torch.tanh(x / softcap)
    return x, t


def cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing, z_loss=0.0,
                  softcap=0.0, gamma=0.0, out_dtype=None):
    """The cross_entropy_forward op's loss (class indices): weighted, smoothed, with z-loss,
    softcap and the focal factor; the mean's divisor sum(weight[target]) over kept rows."""
    x, y = _batched_capped(input, target, softcap)
    C = x.shape[1]
    logp = F.log_softmax(x, 1)
    valid = y != ignore_index
    yc = torch.where(valid, y, torch.zeros_like(y)).long()
    lp_y = logp.gather(1, yc.unsqueeze(1)).squeeze(1)
    w_y = valid.to(logp.dtype) if weight is None else weight.to(logp.dtype)[yc] * valid
    term_y = -lp_y if gamma <= 0 else -_focal_factor(lp_y, gamma) * lp_y
    rows = (1.0 - label_smoothing) * w_y * term_y if label_smoothing > 0 else w_y * term_y
    if label_smoothing > 0:
        shape = (1, C) + (1,) * (x.dim() - 2)
        wc = 1.0 if weight is None else weight.to(logp.dtype).view(shape)
        terms = -logp if gamma <= 0 else -_focal_factor(logp, gamma) * logp
        rows = rows + label_smoothing / C * (wc * terms).sum(1) * valid
    if z_loss > 0:
        lse = torch.logsumexp(x, 1)
        rows = rows + z_loss * w_y * lse * lse
    rows = torch.where(valid, rows, torch.zeros_like(rows))  # an ignored row's NaN stays out
    if input.dim() == 1:
        rows = rows.squeeze(0)
    out = _reduce(rows, w_y.sum(), reduction)
    return out.to(out_dtype or input.dtype)


def cross_entropy_prob(input, target, weight, reduction, label_smoothing, z_loss=0.0, softcap=0.0,
                       gamma=0.0, out_dtype=None):
    """The cross_entropy_prob_forward op's loss: sum_c w_c t'_c (focal factor) (-log p_c) per
    row, t' = (1 - s) t + s / C, plus the z-loss; the mean divides by the number of rows."""
    x, t = _batched_capped(input, target, softcap)
    C = x.shape[1]
    dtype = torch.promote_types(x.dtype, t.dtype)
    logp = F.log_softmax(x, 1).to(dtype)
    tt = t.to(dtype)
    if label_smoothing > 0:
        tt = (1.0 - label_smoothing) * tt + label_smoothing / C
    if weight is not None:
        tt = tt * weight.to(dtype).view((1, C) + (1,) * (x.dim() - 2))
    terms = -logp if gamma <= 0 else -_focal_factor(logp, gamma) * logp
    rows = (tt * terms).sum(1)
    if z_loss > 0:
        lse = torch.logsumexp(x, 1).to(dtype)
        rows = rows + z_loss * lse * lse
    if input.dim() == 1:
        rows = rows.squeeze(0)
    out = _reduce(rows, rows.numel(), reduction)  # 0 rows: 0 / 0, NaN as PyTorch's
    return out.to(out_dtype or target.dtype)


def binary_cross_entropy(input, target, weight, pos_weight, reduction, gamma=-1.0, alpha=-1.0,
                         alpha_tensor=None, out_dtype=None):
    """The binary_cross_entropy_with_logits_forward op's loss, the sigmoid focal loss's with
    gamma >= 0 (alpha_t (1 - p_t)^gamma times the weighted BCE; alpha_tensor per element)."""
    dtype = torch.promote_types(input.dtype, target.dtype)
    x, t = input.to(dtype), target.to(dtype)
    cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
    if gamma < 0:
        out = F.binary_cross_entropy_with_logits(x, t, cast(weight), pos_weight=cast(pos_weight),
                                                 reduction=["none", "mean", "sum"][reduction])
        return out.to(out_dtype or target.dtype)
    ce = F.binary_cross_entropy_with_logits(x, t, cast(weight), pos_weight=cast(pos_weight),
                                            reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    a = cast(alpha_tensor) if alpha_tensor is not None else (alpha if alpha >= 0 else None)
    if a is not None:
        loss = (a * t + (1 - a) * (1 - t)) * loss
    out = _reduce(loss, loss.numel(), reduction)
    return out.to(out_dtype or target.dtype)
