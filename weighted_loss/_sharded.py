"""Cross-entropy of logits whose classes are split over the ranks of a process group (the
vocab-parallel path: weighted_loss/vocab_parallel.py's entry point, and DTensor logits sharded on
their classes, _dtensor.py).

Every rank runs the fused cross-entropy kernels in shard mode over its own logits, once: per row
the shard's max, log-sum-exp, the target's logit where the target is in the shard, and the
weighted sum of the logits that label smoothing needs (csrc/params.h). One all-gather of those
(5 numbers per row per rank, O(rows), functional collectives: no host synchronization) gives
every rank all the shards' statistics, which it merges in float64 into the loss of the unsharded
problem. The backward is local: the same kernels write the shard's slice of the unsharded
gradient from the merged log-sum-exp, in one pass, without communication.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _dtypes, _forward_ad, _named, _reweight
from ._options import CrossEntropyOptions
from .distributed import _all_gather

_ops = torch.ops.weighted_loss
_OP = "vocab_parallel_cross_entropy"


def _gather(stats: Tensor, group, size: int) -> Tensor:
    """Every rank's (5, rows) statistics, (size, 5, rows), in rank order."""
    if size == 1:
        return stats.unsqueeze(0)
    return _all_gather(stats, group).view(size, *stats.shape)


def _merge(g: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
           label_smoothing: float, sizes: tuple):
    """The unsharded rows from the shards' statistics g (R, 5, rows): per-row losses and weights
    (float64), and the (shift, log-sum) planes the backward reads (acc dtype). ``sizes``: each
    rank's number of classes, as torch.chunk splits them (all equal, or the last ones fewer).

    Per row, with shard r's max m_r, log-sum L_r = log sum exp(x - s_r) (s_r = m_r, 0 when -inf),
    target logit (in one shard) and smoothing sum a_r = sum (s / C) w_c (x_c - ref_r) (scaled
    per term, so that it stays finite where the loss is) over W_r = sum of its weights:
    lse = M + log sum_r exp(s_r - M + L_r) with M = max_r s_r, and
      loss = (1 - s) w_y (lse - x_y) + sum_r ((s / C) W_r (lse - ref_r) - a_r)
    with every difference taken against M first, as the kernels take it against a row's max."""
    R = g.shape[0]
    d = g.double()
    m, L, xy, ref, a = d.unbind(1)
    sh = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    M = sh.amax(0)  # NaN if a shard holds NaN; +inf if one holds +inf
    S = torch.exp((sh - M) + L).sum(0)  # NaN where M is not finite
    Lg = torch.where(S == 0, torch.full_like(S, float("nan")), torch.log(S))  # all -inf: NaN
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    if weight is None:
        wy = valid.double()
    else:
        wy = weight.detach().double().index_select(0, y) * valid
    row = wy * ((M - xy.sum(0)) + Lg)
    if label_smoothing > 0:
        C = sum(sizes)
        if weight is None:
            Wr = torch.tensor(sizes, dtype=torch.float64, device=g.device).view(R, 1)
        else:
            # sizes split as torch.chunk does (rank r from r * sizes[0]): one padded view
            w = weight.detach().double()
            w = torch.nn.functional.pad(w, (0, R * sizes[0] - C))
            Wr = w.view(R, sizes[0]).sum(1, keepdim=True)
        smooth = ((label_smoothing / C) * Wr * ((M - ref) + Lg) - a).sum(0)
        row = (1.0 - label_smoothing) * row + smooth
    row = torch.where(valid, row, torch.zeros_like(row))  # an ignored row's NaN stays out
    # ignored rows: (0, +inf), gradient 0; (0, NaN) where the unsharded log_softmax is NaN
    inf = torch.full_like(Lg, float("inf"))
    planes = torch.stack([torch.where(valid, M, torch.zeros_like(M)),
                          torch.where(valid | Lg.isnan(), Lg, inf)])
    return row, wy, planes.to(g.dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, target, weight, sample_weight, ignore_index, label_smoothing,
                reduction, group, sizes, rank, out_dtype):
        """``input``: this rank's (rows, classes) shard; ``sample_weight``: per-row weights (the
        ignored rows' 0) or None."""
        offset, total, size = sum(sizes[:rank]), sum(sizes), len(sizes)
        stats = _ops.cross_entropy_shard_forward(input, target, weight, ignore_index,
                                                 label_smoothing, offset, total)
        row, wy, planes = _merge(_gather(stats, group, size), target, weight, ignore_index,
                                 label_smoothing, sizes)
        if sample_weight is not None:  # per-item weights (_reweight), the ignored items' 0
            vd = sample_weight.double()
            row, wy = row * vd, wy * vd
        total_weight = wy.sum()
        if reduction == "none":
            loss = row
        elif reduction == "sum":
            loss = row.sum()
        else:
            loss = row.sum() / total_weight
        _named.save(ctx, input=input, target=target, weight=weight, sample_weight=sample_weight,
                    lse=planes, total_weight=total_weight.to(planes.dtype))
        ctx.options = dict(reduction=reduction, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, class_offset=offset,
                           total_classes=total)
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if not _ARGS.needs(ctx, "input"):
            return _ARGS.grads()
        s, options = _named.saved(ctx), ctx.options
        if s.sample_weight is not None:
            # each item's upstream gradient, v (over the divisor for the mean), per row in the
            # accumulation dtype
            g = s.sample_weight.double() * grad_loss.double()
            if options["reduction"] == "mean":
                g = g / s.total_weight.double()
            grad_loss, options = g.to(s.lse.dtype), dict(options, reduction="none")
        # grad_loss in the loss's dtype (float32 beside 16-bit logits under autocast)
        grad = _ops.cross_entropy_shard_backward(grad_loss.contiguous(), s.input, s.target,
                                                 s.weight, s.lse, s.total_weight, **options)
        return _ARGS.grads(input=grad)


_ARGS = _named.Signature.of_forward(_VocabParallelCrossEntropy)


def cross_entropy(logits: Tensor, target: Tensor, o: CrossEntropyOptions, group, sizes,
                  rank: int) -> Tensor:
    """The loss over a split of the classes known to every rank: rank r holds ``sizes[r]``
    classes from ``sum(sizes[:r])`` on (a DTensor's ``Shard``: torch.chunk's sizes, the last
    ones possibly smaller or empty). ``o``: weight, ignore_index, reduction, label_smoothing."""
    if _forward_ad.active():
        raise NotImplementedError(
            f"{_OP}: forward-mode AD and torch.func transforms are not supported across shards "
            "(the gathered statistics carry no tangents); use wl.cross_entropy on gathered logits")
    weight = o.weight
    cdim = 0 if logits.dim() == 1 else 1
    shard, total = logits.shape[cdim], sum(sizes)
    want = () if logits.dim() == 1 else (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != want:
        raise ValueError(f"{_OP}: target must have shape {want} for logits of shape "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != total:
            raise ValueError(
                f"{_OP}: weight must hold all {total} classes ({len(sizes)} ranks, {shard} "
                f"classes in this rank's logits), got shape {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                f"{_OP}: the derivative for 'weight' is not implemented (as in PyTorch)")
    v = o.sample_weight
    if v is not None:
        v = _reweight.check_sample_weight(v, want, logits.device, _OP)
        if v.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{_OP}: the derivative for 'sample_weight' is not "
                                      "implemented across shards")
        v = _reweight.kept(v, target, o.ignore_index).reshape(-1)
    a = o.logit_adjustment
    if a is not None:
        if a.dim() != 1 or a.shape[0] != total:  # (its dtype: the options' check)
            raise ValueError(f"{_OP}: logit_adjustment must be a floating tensor holding all "
                             f"{total} classes, got {a.dtype} {tuple(a.shape)}")
        logits = _reweight.adjusted(logits, a.to(logits.device), sum(sizes[:rank]))
    out_dtype = _dtypes.loss_dtype(logits)
    x = logits.unsqueeze(0) if logits.dim() == 1 else logits
    if x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, shard)  # rows along the classes (a copy)
    loss = _VocabParallelCrossEntropy.apply(x, target.reshape(-1), weight, v, o.ignore_index,
                                            max(o.label_smoothing, 0.0), o.reduction, group,
                                            tuple(sizes), rank, out_dtype)
    return loss.view(want) if o.reduction == "none" else loss
