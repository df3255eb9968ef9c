"""The losses written with PyTorch ops, differentiable to any order: what the fused ops compute,
term for term (csrc/params.h), for the paths the kernels do not take. Their backward uses this to
build a gradient that is itself differentiable when the backward runs with create_graph=True
(double backward, gradient penalties, Hessian-vector products, torch.func.grad of grad or jvp of
grad); a first-order backward never comes here.

They call PyTorch's implementations themselves (torch.log_softmax, torch.log1p, torch.exp),
never a name in torch.nn.functional: a user may have swapped those for ours (wl.patch_torch),
which would call back here forever. They compute one precision up (float32 for 16-bit logits,
float64 for float32 ones; _acc_dtype; the sigmoid focal loss in float64), the result cast back.
"""
import torch

def _reduce(rows, divisor, reduction):
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / divisor if reduction == "mean" else total


def _focal_factor(logp, gamma):
    """(1 - p)^gamma from log p, without cancelling where p is near 1."""
    return (-torch.expm1(logp)) ** gamma


def _acc_dtype(dtype):
    """One precision up: float32 for the 16-bit dtypes, float64 for float32. A second derivative
    is a sum of products of first-order terms that cancel; computed in the logits' own dtype it
    is 2-20x less exact than PyTorch's own formulas at times. The result is rounded back once."""
    return {torch.float16: torch.float32, torch.bfloat16: torch.float32,
            torch.float32: torch.float64}.get(dtype, dtype)


def _acc(x):
    return x.to(_acc_dtype(x.dtype))


def _batched_capped(input, target, softcap, adjust=None):
    """(C,) logits and their target as a batch of one; the logits as the loss sees them
    (softcap tanh(x / softcap) when softcap is given, + the logit adjustment when given), one
    precision up (_acc_dtype)."""
    x, t = _acc(input), target
    if x.dim() == 1:
        x, t = x.unsqueeze(0), t.unsqueeze(0)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    if adjust is not None:
        x = x + adjust.to(x.dtype).view((1, -1) + (1,) * (x.dim() - 2))
    return x, t


def cross_entropy(input, target, weight=None, reduction="mean", ignore_index=-100,
                  label_smoothing=0.0, z_loss=0.0, softcap=None, gamma=None,
                  logit_adjustment=None, out_dtype=None):
    """The cross_entropy_forward op's loss (class indices): weighted, smoothed, with z-loss,
    softcap, the logit adjustment and the focal factor; the mean's divisor sum(weight[target])
    over kept rows."""
    x, y = _batched_capped(input, target, softcap, logit_adjustment)
    C = x.shape[1]
    logp = torch.log_softmax(x, 1)
    y = y.long()  # a uint8 target beside ignore_index 256 compares as int64, not modulo 256
    valid = y != ignore_index
    yc = torch.where(valid, y, torch.zeros_like(y))
    # (no classes: every item is ignored, the kernels checked it; nothing to gather)
    lp_y = logp.gather(1, yc.unsqueeze(1)).squeeze(1) if C else logp.new_zeros(y.shape)
    w_y = valid.to(logp.dtype) if weight is None or not C else \
        weight.to(logp.dtype)[yc] * valid  # (no classes: no weight to gather, all ignored)
    term_y = -lp_y if not gamma else -_focal_factor(lp_y, gamma) * lp_y
    rows = (1.0 - label_smoothing) * w_y * term_y if label_smoothing > 0 else w_y * term_y
    if label_smoothing > 0 and C:
        shape = (1, C) + (1,) * (x.dim() - 2)
        wc = 1.0 if weight is None else weight.to(logp.dtype).view(shape)
        terms = -logp if not gamma else -_focal_factor(logp, gamma) * logp
        rows = rows + label_smoothing / C * (wc * terms).sum(1) * valid
    if z_loss > 0:
        lse = torch.logsumexp(x, 1)
        rows = rows + z_loss * w_y * lse * lse
    rows = torch.where(valid, rows, torch.zeros_like(rows))  # an ignored row's NaN stays out
    if input.dim() == 1:
        rows = rows.squeeze(0)
    out = _reduce(rows, w_y.sum(), reduction)
    return out.to(out_dtype or input.dtype)


def cross_entropy_prob(input, target, weight=None, reduction="mean", label_smoothing=0.0,
                       z_loss=0.0, softcap=None, gamma=None, logit_adjustment=None,
                       out_dtype=None):
    """The cross_entropy_prob_forward op's loss: sum_c w_c t'_c (focal factor) (-log p_c) per
    row, t' = (1 - s) t + s / C, plus the z-loss; the mean divides by the number of rows."""
    x, t = _batched_capped(input, target, softcap, logit_adjustment)
    C = x.shape[1]
    dtype = torch.promote_types(x.dtype, _acc_dtype(t.dtype))
    logp = torch.log_softmax(x, 1).to(dtype)
    tt = t.to(dtype)
    if label_smoothing > 0 and C:
        tt = (1.0 - label_smoothing) * tt + label_smoothing / C
    if weight is not None:
        tt = tt * weight.to(dtype).view((1, C) + (1,) * (x.dim() - 2))
    terms = -logp if not gamma else -_focal_factor(logp, gamma) * logp
    rows = (tt * terms).sum(1)
    if z_loss > 0:
        lse = torch.logsumexp(x, 1).to(dtype)
        rows = rows + z_loss * lse * lse
    if input.dim() == 1:
        rows = rows.squeeze(0)
    out = _reduce(rows, rows.numel(), reduction)  # 0 rows: 0 / 0, NaN as PyTorch's
    return out.to(out_dtype or target.dtype)


def _log_sigmoid(x):
    """log sigmoid(x) whose derivatives autograd forms without cancelling, to every order:
    -log1p(e^-x) for x >= 0, x - log1p(e^x) below (NaN there too), each branch fed a finite
    stand-in where it is not taken. Its second derivative is -e^-|x| / (1 + e^-|x|)^2 on both
    sides; aten's log_sigmoid forms sigmoid(x) - 1 for it, which is 0 below an ulp of 1
    (x > 37 in float64) where the exact value is e^-x."""
    pos = x >= 0
    xp, xn = torch.where(pos, x, 0.0), torch.where(pos, 0.0, x)
    return torch.where(pos, -torch.log1p(torch.exp(-xp)), xn - torch.log1p(torch.exp(xn)))


def _bce_terms(x, t, weight, pos_weight, focal=False):
    """PyTorch's BCE with logits per element, w ((1 - t) softplus(x) + P t softplus(-x)), written
    so that its derivatives are PyTorch's where the logits are infinite or NaN too, under autograd
    and under the torch.func transforms alike (the aten op's decomposition, which torch.func
    differentiates, gives NaN at -inf): the input's (1 - t) p - P t (1 - p), finite at +-inf; the
    target's -P log sigmoid(x) + log sigmoid(-x), P inf at -inf. Without pos_weight it is
    softplus(x) - t x, whose mixed derivative is -1 also at a NaN logit, as PyTorch's; but whose
    input derivative sigmoid(x) - t cancels to 0 where the true one is -sigmoid(-x) (PyTorch's
    too): the focal loss, which multiplies it by (1 - p_t)^(gamma - 2), takes the other form."""
    log_sigmoid = _log_sigmoid
    if pos_weight is None and not focal:
        ce = -log_sigmoid(-x) - t * x
    else:
        pt = t if pos_weight is None else pos_weight * t
        ce = -(pt * log_sigmoid(x) + (1 - t) * log_sigmoid(-x))
    return ce if weight is None else ce * weight


def _bce_prob_terms(p, t, weight, pos_weight):
    """BCE of probabilities per element through PyTorch's own op (its -100 clamps, and its
    gradients' eps, to every order): with pos_weight P, P t bce(p, 1) + (1 - t) bce(p, 0), whose
    input gradient is the fused kernels' (p (1 + (P - 1) t) - P t) / max(p (1 - p), eps)."""
    bce = torch.ops.aten.binary_cross_entropy
    if pos_weight is None:
        ce = bce(p, t, None, 0)
    else:
        ce = pos_weight * t * bce(p, torch.ones_like(p), None, 0) + \
            (1 - t) * bce(p, torch.zeros_like(p), None, 0)
    return ce if weight is None else ce * weight


def _cast_all(dtype, *tensors):
    return [None if v is None else v.to(dtype) for v in tensors]


def binary_cross_entropy_with_logits(input, target, weight=None, pos_weight=None,
                                     reduction="mean", out_dtype=None):
    """The binary_cross_entropy_with_logits_forward op's loss."""
    dtype = _acc_dtype(torch.promote_types(input.dtype, target.dtype))
    x, t, w, pw = _cast_all(dtype, input, target, weight, pos_weight)
    ce = _bce_terms(x, t, w, pw)
    return _reduce(ce, ce.numel(), reduction).to(out_dtype or target.dtype)


def sigmoid_focal_loss(input, target, gamma, alpha, alpha_tensor=None, weight=None,
                       pos_weight=None, reduction="none", out_dtype=None):
    """The sigmoid_focal_loss_forward op's loss: alpha_t (1 - p_t)^gamma times the weighted BCE
    (alpha_tensor per element; alpha None: no alpha_t). In float64: the focal factor's
    derivatives (singular at p_t = 1 for gamma < 1, terms of e^-1.5x that cancel) lose 3-4
    digits even in float32."""
    x, t, w, pw, at = _cast_all(torch.float64, input, target, weight, pos_weight, alpha_tensor)
    ce = _bce_terms(x, t, w, pw, focal=True)
    # 1 - p_t = p (1 - t) + (1 - p) t with 1 - p = sigmoid(-x): no cancellation where p_t is
    # near 1, whose derivatives (gamma < 1) are singular there
    loss = ce * (torch.sigmoid(x) * (1 - t) + torch.sigmoid(-x) * t) ** gamma
    a = at if at is not None else alpha
    if a is not None:
        loss = (a * t + (1 - a) * (1 - t)) * loss
    out = _reduce(loss, loss.numel(), reduction)
    return out.to(out_dtype or target.dtype)


def binary_cross_entropy(input, target, weight=None, pos_weight=None, reduction="mean",
                         out_dtype=None):
    """The binary_cross_entropy_forward op's loss: BCE of probabilities."""
    dtype = _acc_dtype(torch.promote_types(input.dtype, target.dtype))
    ce = _bce_prob_terms(*_cast_all(dtype, input, target, weight, pos_weight))
    return _reduce(ce, ce.numel(), reduction).to(out_dtype or target.dtype)


def overlap_sums(input, target, ignore_index=-100, squared=False):
    """The overlap sums (N, 3, C) of the cross_entropy_overlap_forward op: per item and class,
    I = sum p t, P = sum p (p^2 when squared), T = sum t (t^2) over the positions not ignored, p
    the softmax; an integer target is one-hot, a floating one taken as it is. One precision up."""
    x = _acc(input)
    p = torch.softmax(x, 1)
    if target.is_floating_point():
        t = target.to(p.dtype)
    else:
        y = target.long()
        keep = (y != ignore_index).unsqueeze(1)
        yc = torch.where(keep.squeeze(1), y, torch.zeros_like(y))
        t = torch.zeros_like(p).scatter_(1, yc.unsqueeze(1), 1.0) * keep
        p = torch.where(keep, p, torch.zeros_like(p))  # an ignored position's NaN stays out
    dims = list(range(2, x.dim()))
    pp = p * p if squared else p
    tt = t * t if squared else t
    sums = [(p * t), pp, tt]
    return torch.stack([s.sum(dims) if dims else s for s in sums], 1)


def cross_entropy_overlap(input, target, weight=None, reduction="mean", ignore_index=-100,
                          label_smoothing=0.0, gamma=None, squared=False, out_dtype=None):
    """The cross_entropy_overlap_forward op's (loss, sums): the cross-entropy (or focal) loss of
    cross_entropy / cross_entropy_prob and overlap_sums, the sums in the op's acc dtype."""
    if target.is_floating_point():
        loss = cross_entropy_prob(input, target, weight, reduction, label_smoothing,
                                  gamma=gamma, out_dtype=out_dtype)
    else:
        loss = cross_entropy(input, target, weight, reduction, ignore_index, label_smoothing,
                             gamma=gamma, out_dtype=out_dtype)
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    return loss, overlap_sums(input, target, ignore_index, squared).to(acc)


# ---------------------------------------------------------------- the overlap formulas
# MONAI's (monai.losses 1.5) arithmetic on the sums I, P, T: tp = I, fp = P - I, fn = T - I.

def dice_from_sums(i, p, t, smooth_nr, smooth_dr, jaccard=False):
    """1 - (2 tp + smooth_nr) / (2 (tp + fp + fn) + smooth_dr), fp and fn halved for the Dice
    (not for the Jaccard index)."""
    fp, fn = p - i, t - i
    if not jaccard:
        fp, fn = 0.5 * fp, 0.5 * fn
    return 1.0 - (2.0 * i + smooth_nr) / (2.0 * (i + fp + fn) + smooth_dr)


def tversky_from_sums(i, p, t, alpha, beta, smooth_nr, smooth_dr):
    """1 - (tp + smooth_nr) / (tp + alpha fp + beta fn + smooth_dr)."""
    return 1.0 - (i + smooth_nr) / (i + alpha * (p - i) + beta * (t - i) + smooth_dr)


def generalized_dice_from_sums(i, p, t, w_type, smooth_nr, smooth_dr, batch, volume=None):
    """The generalized Dice over the classes (the last dim) of (N, C) sums, or of (C,) ones
    summed over the batch: the weight 1 / V^2, 1 / V or 1 per class (V the class's volume, T
    unless given: MONAI takes T in float32), a class with none of it (an infinite weight)
    taking the largest finite one (of its item; of the batch)."""
    v = t if volume is None else volume
    if w_type == "simple":
        w = torch.reciprocal(v)
    elif w_type == "square":
        w = torch.reciprocal(v * v)
    else:
        w = torch.ones_like(v)
    infs = torch.isinf(w)
    w = torch.where(infs, torch.zeros_like(w), w)
    top = w.max() if batch else w.max(-1, keepdim=True).values
    w = w + infs * top
    fp, fn = 0.5 * (p - i), 0.5 * (t - i)
    numer = 2.0 * (i * w).sum(-1, keepdim=True) + smooth_nr
    denom = (2.0 * (i + fp + fn) * w).sum(-1, keepdim=True) + smooth_dr
    return 1.0 - numer / denom
