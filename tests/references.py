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


def _monai_tp_fp_fn(p, t, axes, squared):
    """monai.losses.utils.compute_tp_fp_fn (1.5) for hard or soft targets: the L1 form, or with
    squared predictions its norm form, whose tp cancels (|p|^2 + |t|^2 - |p - t|^2) / 2."""
    if not squared:
        tp = (p * t).sum(axes)
        return tp, p.sum(axes) - tp, t.sum(axes) - tp
    po, go = (p * p).sum(axes), (t * t).sum(axes)
    tp = (po + go - ((p - t) ** 2).sum(axes)) / 2
    return tp, po - tp, go - tp


def overlap_reference(x, target, weight=None, *, kind="dice", include_background=True,
                      squared_pred=False, jaccard=False, batch=False, smooth_nr=1e-5,
                      smooth_dr=1e-5, ignore_index=-100, reduction="mean", lambda_overlap=1.0,
                      lambda_ce=0.0, label_smoothing=0.0, gamma=None, alpha=0.5, beta=0.5,
                      focal_exponent=1.0, w_type="square"):
    """MONAI's DiceLoss / TverskyLoss / GeneralizedDiceLoss (softmax=True, to_onehot_y=True for
    class indices; monai/losses 1.5) written out in PyTorch's ops, plus lambda_ce times
    F.cross_entropy (focal_reference with gamma) with the same class weight. An ignored
    position (ignore_index) is in neither term."""
    C = x.shape[1]
    p = torch.softmax(x, 1)
    if target.shape == x.shape:
        t = target.to(p.dtype)
    else:
        keep = (target != ignore_index).unsqueeze(1)
        y = torch.where(keep.squeeze(1), target, torch.zeros_like(target)).long()
        t = F.one_hot(y, C).movedim(-1, 1).to(p.dtype) * keep
        p = torch.where(keep, p, torch.zeros_like(p))
    if not include_background and C > 1:
        p, t = p[:, 1:], t[:, 1:]
    axes = list(range(2, x.dim()))
    if batch:
        axes = [0] + axes
    tp, fp, fn = _monai_tp_fp_fn(p, t, axes, squared_pred and kind == "dice")
    if kind == "dice":
        if not jaccard:
            fp, fn = 0.5 * fp, 0.5 * fn
        f = 1.0 - (2 * tp + smooth_nr) / (2 * (tp + fp + fn) + smooth_dr)
    elif kind == "tversky":
        f = 1.0 - (tp + smooth_nr) / (tp + alpha * fp + beta * fn + smooth_dr)
        if focal_exponent != 1.0:
            f = f.clamp_min(0) ** focal_exponent
    else:  # generalized Dice
        ground = t.sum(axes)
        w = {"simple": 1 / ground, "square": 1 / (ground * ground)}.get(w_type,
                                                                       torch.ones_like(ground))
        infs = torch.isinf(w)
        w = torch.where(infs, torch.zeros_like(w), w)
        w = w + infs * (w.max() if batch else w.max(1, keepdim=True).values)
        dim = 0 if batch else 1
        f = 1.0 - (2 * (tp * w).sum(dim, keepdim=True) + smooth_nr) / \
            ((2 * (tp + 0.5 * fp + 0.5 * fn) * w).sum(dim, keepdim=True) + smooth_dr)
    if weight is not None and kind != "generalized" and f.shape[-1] > 1:
        f = f * (weight if include_background else weight[1:]).to(f)
    f = {"mean": f.mean, "sum": f.sum}.get(reduction, lambda: f)()
    if not lambda_ce:
        return lambda_overlap * f
    red = "sum" if reduction == "sum" else "mean"
    if gamma:
        ce = focal_reference(x, target, gamma, weight, ignore_index=ignore_index, reduction=red,
                             label_smoothing=label_smoothing)
    else:
        ce = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=red,
                             label_smoothing=label_smoothing)
    return lambda_overlap * f + lambda_ce * ce


def nnunet_reference(x, target, *, batch_dice=False, do_bg=True, smooth=1e-5, ignore_label=None,
                     memory_efficient=False, weight_ce=1.0, weight_dice=1.0):
    """nnU-Net v2's DC_and_CE_loss (SoftDiceLoss or MemoryEfficientSoftDiceLoss with its softmax)
    written out in PyTorch's ops at the input's precision (nnU-Net's own sums in float32)."""
    y = target[:, 0].long()
    keep = torch.ones_like(y, dtype=torch.bool) if ignore_label is None else y != ignore_label
    p = torch.softmax(x, 1)
    t = F.one_hot(torch.where(keep, y, 0), x.shape[1]).movedim(-1, 1).to(p.dtype)
    m = keep.unsqueeze(1).to(p.dtype)
    axes = ([0] if batch_dice else []) + list(range(2, x.dim()))
    tp, sp, st = (p * t * m).sum(axes), (p * m).sum(axes), (t * m).sum(axes)
    if memory_efficient:
        if not do_bg:
            tp, sp, st = tp[..., 1:], sp[..., 1:], st[..., 1:]
        dc = (2 * tp + smooth) / (st + sp + smooth).clamp_min(1e-8)
    else:
        dc = (2 * tp + smooth) / torch.clip(2 * tp + (sp - tp) + (st - tp) + smooth, 1e-8)
        if not do_bg:
            dc = dc[..., 1:]
    ce = F.cross_entropy(x, y, ignore_index=-100 if ignore_label is None else ignore_label)
    if ignore_label is not None and not keep.any():
        ce = 0
    return weight_ce * ce - weight_dice * dc.mean()
