"""The differential fuzzer's references (tests/fuzz.py): PyTorch's function for each loss (its
composites for the focal losses, F.cross_entropy of F.linear for linear_cross_entropy), a float64
reference where PyTorch's own formula loses digits, and the scales of the terms that cancel in a
gradient, at which its floor is set."""
import torch
import torch.nn.functional as F

import weighted_loss as wl

from references import focal_reference, overlap_reference, reweighted, sigmoid_focal_composite

_OVERLAP = {"dice": wl.dice_loss, "tversky": wl.tversky_loss,
            "generalized": wl.generalized_dice_loss}


def _overlap(x, target, kind="dice", **kw):
    return _OVERLAP[kind](x, target, **kw)


def _overlap_reference(x, target, weight=None, **kw):
    return overlap_reference(x, target, weight, **kw)


def _fns(loss):
    if loss in ("ce", "ce-prob"):
        return wl.cross_entropy, reweighted(F.cross_entropy)
    if loss == "bce":
        return wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits
    if loss == "bce-prob":
        return wl.binary_cross_entropy, F.binary_cross_entropy
    if loss == "focal":
        return wl.focal_loss, reweighted(focal_reference)
    if loss == "sfocal":
        return wl.sigmoid_focal_loss, sigmoid_focal_composite
    if loss == "overlap":
        return _overlap, _overlap_reference
    ref = reweighted(F.cross_entropy)
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
    out = reweighted(F.cross_entropy)(logits, case["target"], **kw)
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
