"""The tests' references: the losses written with PyTorch's ops, as users write them or by their
definitions, independent of the library. bench/suite_focal.py measures the focal composites here
as the "native" column (what users write without a fused kernel)."""
import torch
import torch.nn.functional as F


def sigmoid_focal_composite(input, target, alpha=0.25, gamma=2.0, reduction="none", weight=None,
                            pos_weight=None):
    """torchvision.ops.sigmoid_focal_loss's formula, op for op."""
    p = torch.sigmoid(input)
    ce = F.binary_cross_entropy_with_logits(input, target, weight=weight, pos_weight=pos_weight,
                                            reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if isinstance(alpha, torch.Tensor) or alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def focal_composite(input, target, gamma=2.0, weight=None, ignore_index=-100, reduction="mean",
                    label_smoothing=0.0):
    """-weight[y] (1 - p_y)^gamma log p_y over (N, C, d...) logits; the mean over the kept
    items' sum of weight[y], as cross-entropy's. With label smoothing s each item's loss is
    -sum_c w_c t'_c (1 - p_c)^gamma log p_c, t' = (1 - s) onehot(y) + s / C."""
    logp = F.log_softmax(input, dim=1)
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    w = valid.to(lp.dtype) if weight is None else weight[y] * valid
    loss = -w * (1 - lp.exp()) ** gamma * lp
    if label_smoothing > 0:
        C = input.shape[1]
        wc = 1.0 if weight is None else weight.reshape(C, *([1] * (input.dim() - 2)))
        spread = (-wc * (1 - logp.exp()) ** gamma * logp).sum(1)
        loss = (1 - label_smoothing) * loss + (label_smoothing / C) * spread * valid
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / w.sum()


def focal_reference(input, target, gamma=2.0, weight=None, ignore_index=-100,
                     reduction="mean", label_smoothing=0.0):
    """The softmax focal loss in PyTorch ops: focal_composite for class indices, the
    composite written here for probabilities (focal_prob_composite); (C,)
    logits as a batch of one."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if input.shape[0 if input.dim() == 1 else 1] == 0:  # no classes: no item to weigh
        return F.cross_entropy(input, target, weight, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
    if target.is_floating_point():
        out = focal_prob_composite(input, target, gamma, weight, reduction, label_smoothing)
        dt = torch.promote_types(input.dtype, target.dtype)  # and the weight's, as F.cross_entropy
        return out.to(dt if weight is None else torch.promote_types(dt, weight.dtype))
    target = target.long()  # uint8 indices: gathered, and compared with ignore_index, as int64
    if input.dim() == 1:
        out = focal_reference(input.unsqueeze(0), target.unsqueeze(0), gamma, weight,
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


def focal_prob_composite(input, target, gamma, weight, reduction, label_smoothing):
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


def sfocal_reference(input, target, alpha=0.25, gamma=2.0, reduction="none", weight=None,
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


def reweighted(ref):
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


def cross_entropy_terms(x, t, weight=None, ignore_index=-100, reduction="mean",
                        label_smoothing=0.0, z_loss=0.0, softcap=None):
    """F.cross_entropy with z_loss and softcap by their definitions: softcap * tanh(x / softcap)
    before the loss, z_loss * logsumexp^2 per row weighted as the row's loss (weight[target], 1
    for probabilities), in the same weighted mean."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    ce = F.cross_entropy(x, t, weight=weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=0 if x.dim() == 1 else 1)
    if t.is_floating_point():
        wy = torch.ones_like(lse)
        divisor = torch.tensor(float(lse.numel()), dtype=x.dtype, device=x.device)
    else:
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        wy = (weight[safe] if weight is not None else torch.ones_like(lse)) * valid
        divisor = wy.sum()
    rows = ce + z_loss * wy * lse * lse
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / divisor
