"""The focal losses' benchmark cases and the composites they are measured against (the "native"
column of python bench/suite.py): what users write, or call, without a fused kernel.

``sigmoid_focal_composite`` is the body of ``torchvision.ops.sigmoid_focal_loss`` (0.28), with
``weight`` and ``pos_weight`` passed to the BCE term; ``focal_composite`` the softmax focal loss as
it is usually written, from ``log_softmax`` and a gather. Both have wl's arguments, so the
benchmark calls every implementation the same way; neither is used by the library itself.
"""
import torch
import torch.nn.functional as F

# name, loss, shape of the logits, dtype, extra keyword arguments (bench.py's QUICK and FULL)
QUICK = [
    ("focal-8192x1000-f32", "focal", (8192, 1000), torch.float32, {}),
    ("focal-seg-16x19x128x128-f32", "focal", (16, 19, 128, 128), torch.float32, {}),
    ("focal-ls-8192x1000-f32", "focal", (8192, 1000), torch.float32, {"label_smoothing": 0.1}),
    ("focal-ls-seg-16x19x128x128-f32", "focal", (16, 19, 128, 128), torch.float32,
     {"label_smoothing": 0.1}),
    ("sfocal-8192x1000-f32", "sfocal", (8192, 1000), torch.float32, {"reduction": "mean"}),
    ("sfocal-seg-16x19x128x128-f32", "sfocal", (16, 19, 128, 128), torch.float32,
     {"reduction": "mean"}),
]
FULL = [
    ("focal-seg-16x19x512x512-bf16", "focal", (16, 19, 512, 512), torch.bfloat16, {}),
    ("sfocal-8192x8192-bf16", "sfocal", (8192, 8192), torch.bfloat16, {"reduction": "mean"}),
]


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
