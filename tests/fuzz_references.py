"""The differential fuzzer's references (tests/fuzz.py): PyTorch's function for each loss (its
composites for the focal losses, F.cross_entropy of F.linear for linear_cross_entropy), a float64
reference where PyTorch's own formula loses digits, and the scales of the terms that cancel in a
gradient, at which its floor is set."""
import os
import sys

import torch
import torch.nn.functional as F

import weighted_loss as wl

# the benchmark's focal composites (bench/suite_focal.py), also when run as a script (tests/fuzz.py)
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from suite_focal import focal_composite, sigmoid_focal_composite  # noqa: E402


def _focal_reference(input, target, gamma=2.0, weight=None, ignore_index=-100,
                     reduction="mean", label_smoothing=0.0):
    """The softmax focal loss in PyTorch ops: suite_focal's composite for class indices, the
    composite written here for probabilities (_focal_prob_composite); (C,)
    logits as a batch of one."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if input.shape[0 if input.dim() == 1 else 1] == 0:  # no classes: no item to weigh
        return F.cross_entropy(input, target, weight, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    if target.is_floating_point():
        out = _focal_prob_composite(input, target, gamma, weight, reduction, label_smoothing)
        dt = torch.promote_types(input.dtype, target.dtype)  # and the weight's, as F.cross_entropy
        return out.to(dt if weight is None else torch.promote_types(dt, weight.dtype))
    target = target.long()  # uint8 indices: gathered, and compared with ignore_index, as int64
    if input.dim() == 1:
        out = _focal_reference(input.unsqueeze(0), target.unsqueeze(0), gamma, weight,
                               ignore_index, reduction, label_smoothing)
        return out.squeeze(0) if reduction == "none" else out
    # as F.cross_entropy (focal at gamma 0) treats ignored items: their logits never read (a
    # NaN there stays out of the loss) and, when every item is ignored, the mean NaN with a
    # zero gradient
    keep = (target != ignore_index).unsqueeze(1)
    input = torch.where(keep, input, torch.zeros((), dtype=input.dtype))
    out = focal_composite(input, target, gamma, weight, ignore_index,
                          "sum" if reduction == "mean" else reduction, label_smoothing)
    out = out.to(input.dtype)  # a weight of another dtype (accepted, README): the logits' dtype
    if reduction != "mean":
        return out
    y = torch.where(keep.squeeze(1), target, 0)
    total = keep.squeeze(1).sum() if weight is None else (weight[y] * keep.squeeze(1)).sum()
    # every item ignored: NaN with a zero gradient; kept items of total weight 0: 0 / 0, NaN
    # gradients too, as F.cross_entropy's
    return (out / total).to(input.dtype) if keep.any() else out * 0 + float("nan")


def _focal_prob_composite(input, target, gamma, weight, reduction, label_smoothing):
    """The softmax focal loss over probability targets as a user writes it, in the promoted
    dtype: -sum_c w_c t'_c (1 - p_c)^gamma log p_c per item, t' = (1 - s) t + s / C, the mean
    over the items; (C,) logits as a batch of one."""
    x, t = (input, target) if input.dim() > 1 else (input.unsqueeze(0), target.unsqueeze(0))
    dtype = torch.promote_types(x.dtype, t.dtype)
    C = x.shape[1]
    logp = torch.log_softmax(x, 1).to(dtype)
    tt = t.to(dtype)
    if label_smoothing > 0:
        tt = (1.0 - label_smoothing) * tt + label_smoothing / C
    if weight is not None:
        tt = tt * weight.to(dtype).view((1, C) + (1,) * (x.dim() - 2))
    rows = (tt * -(-torch.expm1(logp)) ** gamma * logp).sum(1)
    rows = rows if input.dim() > 1 else rows.squeeze(0)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / rows.numel()


def _sfocal_reference(input, target, alpha=0.25, gamma=2.0, reduction="none", weight=None,
                      pos_weight=None):
    """The float64 reference of the sigmoid focal loss: torchvision's formula with 1 - p_t formed
    without cancelling, p (1 - t) + sigmoid(-x) t, and the BCE without cancelling either (the
    composite loses most digits of p = 1e-15 at x = -34 even in float64; the kernels keep
    them: checked against mpmath)."""
    q = torch.sigmoid(input) * (1 - target) + torch.sigmoid(-input) * target
    # BCE as softplus terms: PyTorch's log(exp(-m) + exp(-x - m)) keeps 4% of a loss of 3e-15
    pw = 1 if pos_weight is None else pos_weight
    ce = (1 - target) * F.softplus(input, threshold=50) + \
        pw * target * F.softplus(-input, threshold=50)
    ce = ce if weight is None else ce * weight
    loss = ce * q ** gamma
    if isinstance(alpha, torch.Tensor) or alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def _reweighted(ref):
    """ref (a loss of (logits, target, **kw)) with logit_adjustment= and sample_weight= as their
    composites: ref(logits + a, ...), and (v * ref(..., "none")).sum() over
    sum(v * weight[y]) of the kept items (sum(v) for probabilities)."""
    def fn(x, y, logit_adjustment=None, sample_weight=None, **kw):
        if logit_adjustment is not None and x.dim() >= 1:
            a = logit_adjustment
            x = x + a.view((a.shape[0],) + (1,) * (x.dim() - (1 if x.dim() == 1 else 2)))
        if sample_weight is None:
            return ref(x, y, **kw)
        red = kw.pop("reduction", "mean")
        if red not in ("none", "mean", "sum"):  # PyTorch's error for it
            return ref(x, y, reduction=red, **kw)
        rows = ref(x, y, reduction="none", **kw)
        v = sample_weight.expand(rows.shape)
        if y.is_floating_point():
            div = v.sum()
        else:
            keep = y.long() != kw.get("ignore_index", -100)
            v = torch.where(keep, v, torch.zeros((), dtype=v.dtype))
            w = kw.get("weight")
            wy = keep.to(v.dtype) if w is None or w.shape[0] == 0 else \
                w[torch.where(keep, y.long(), 0)].to(v.dtype) * keep
            div = (v * wy).sum()
        if red == "none":
            return rows * v
        s = (rows * v).sum()
        return s if red == "sum" else s / div
    return fn


def _fns(loss):
    if loss in ("ce", "ce-prob"):
        return wl.cross_entropy, _reweighted(F.cross_entropy)
    if loss == "bce":
        return wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
    if loss == "bce-prob":
        return wl.binary_cross_entropy, F.binary_cross_entropy
    if loss == "focal":
        return wl.focal_loss, _reweighted(_focal_reference)
    if loss == "sfocal":
        return wl.sigmoid_focal_loss, sigmoid_focal_composite
    ref = _reweighted(F.cross_entropy)
    return (wl.linear_cross_entropy,
            lambda h, lw, y, chunk_size=None, **kw: ref(F.linear(h, lw), y, **kw))


def _softmax_terms(case, logits):
    """A logit gradient is g (W_i p_c - w_c t'_c): two terms that cancel (at the target as p_y
    nears 1; everywhere under heavy smoothing), so its floor is at their scale, the first term
    g W_i p_c with W_i = sum_c w_c t'_c, in float64 (g: the upstream gradient, over the total
    weight for a mean). Class indices only (else None)."""
    t = case["target"]
    kw = case["kw"]
    if t.is_floating_point() or logits.dim() < 1:
        return None
    a = kw.get("logit_adjustment")
    if a is not None and logits.shape[0 if logits.dim() == 1 else 1] == a.shape[0]:
        logits = logits.double() + a.double().view(
            (a.shape[0],) + (1,) * (logits.dim() - (1 if logits.dim() == 1 else 2)))
    lg = logits.unsqueeze(0) if logits.dim() == 1 else logits
    tt = t.reshape(1) if logits.dim() == 1 else t
    C = lg.shape[1]
    keep = tt.long() != kw.get("ignore_index", -100)
    w = kw.get("weight")
    w = torch.ones(C, dtype=torch.float64) if w is None else w.double()
    s = kw.get("label_smoothing", 0.0)
    wy = torch.where(keep, w[torch.where(keep, tt, 0).long()], 0.0) if C else keep.double()
    v = kw.get("sample_weight")
    v = torch.ones((), dtype=torch.float64) if v is None else v.double()
    try:
        v = torch.where(keep, v.reshape(v.shape if logits.dim() > 1 else (1,) * v.dim())
                        .expand(tt.shape), 0.0).abs()
    except RuntimeError:  # an invalid case's sample weight: no floor from it
        v = torch.ones(tt.shape, dtype=torch.float64)
    W = ((1 - s) * wy + (s / C * w.sum() if C else 0.0) * keep) * v
    red = kw.get("reduction", "mean")
    if red == "none":
        go = torch.linspace(0.5, 1.5, tt.numel(), dtype=torch.float64).reshape(tt.shape)
    else:
        total = (wy * v).sum() if red == "mean" else 1.0
        go = torch.full(tt.shape, 0.5, dtype=torch.float64) / (total if total > 0 else 1.0)
    return (go * W).unsqueeze(1) * torch.softmax(lg.double(), 1).nan_to_num(0, 0, 0)


def _term_scales(case):
    """The floors' scales of the gradients whose terms cancel (0: the result's own scale): a
    logit gradient (_softmax_terms); linear_cross_entropy's, sums of products (dlogits @ weight,
    dlogits^T @ h) at the scale of their terms, |dlogits| + those terms, times |weight| or |h|."""
    if case["loss"] in ("ce", "focal"):
        a = _softmax_terms(case, case["x"])
        return [0.0, a.max().item() if a is not None and a.numel() else 0.0, 0.0]
    if case["loss"] != "linear":
        return [0.0] * 3
    h, lw = case["x"].double(), case["lw"].double()
    logits = (h @ lw.T).requires_grad_()
    kw = {k: (v.double() if torch.is_tensor(v) else v) for k, v in case["kw"].items()
          if k != "chunk_size"}
    out = _reweighted(F.cross_entropy)(logits, case["target"], **kw)
    go = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
    dl, = torch.autograd.grad(out, logits, go)
    if not dl.numel() or not lw.shape[1]:
        return [0.0] * 3
    dl = dl.nan_to_num(0, 0, 0).abs() + _softmax_terms(case, logits.detach())
    # the weight's gradient is added up chunk by chunk in its dtype (README: one rounding per
    # chunk; a chunk_size of a row or two costs more than PyTorch's one matmul)
    chunks = -(-h.shape[0] // (case["kw"].get("chunk_size") or h.shape[0]))
    # chunks of one row: matrix-vector products, which BLAS sums along one chain of C terms
    # (docs/semantics.md): sqrt(C) roundings at the terms' scale
    gemv = lw.shape[0] ** 0.5 if case["kw"].get("chunk_size") == 1 else 1.0
    return [0.0, gemv * (dl @ lw.abs()).max().item(),
            gemv * chunks * (dl.T @ h.abs()).max().item()]
