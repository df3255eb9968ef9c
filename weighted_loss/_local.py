"""The losses on one device: plain tensors in, the fused ops called (through _forward_ad, which
adds the jvps where tangents may flow), the loss out. Knows nothing of DTensors or process groups:
the layers above (_grouped, _dtensor) call these on whole tensors or on a rank's part.

Each takes the loss's options (_options) and, from the process-group layer, ``mean``: where
given, the loss is a sum and ``mean(sum, divisor)`` turns it into the mean to return, the divisor
being this call's share of the weighted mean's (sum of weight[target] over the kept items, or the
number of items).
"""
import torch
from torch import Tensor

from . import _dtypes, _forward_ad, _reweight
from . import _ops as _autograd
from ._options import BinaryOptions, CrossEntropyOptions

_ops = torch.ops.weighted_loss


def count(n: int, device) -> Tensor:
    """n as a mean's divisor: a float64 0-d tensor on the device."""
    return torch.tensor(float(n), dtype=torch.float64, device=device)


def prob_target_inputs(input, target, weight, ignore_index):
    """Class-probability targets as cross-entropy takes them: floating, no ignore_index, promoted
    with the logits and the weight as PyTorch's arithmetic would (a float64 weight beside float32
    logits gives a float64 loss; an integer weight is promoted), 16-bit logits read in place
    (``_dtypes.floating_pair``)."""
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {target.dtype}")
    if ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if weight is not None and input.is_floating_point():
        if weight.is_floating_point():  # PyTorch's -(logp t w).sum() promotes with w's dtype too
            target = target.to(torch.promote_types(target.dtype, weight.dtype))
        else:  # integer weights: promoted, as that arithmetic promotes them
            weight = weight.to(torch.promote_types(input.dtype, target.dtype))
    input, target = _dtypes.floating_pair(input, target)
    return input, target, weight


def _focal_checks(input: Tensor, target: Tensor, o: CrossEntropyOptions) -> bool:
    """The softmax focal loss's arguments checked (gamma > 0); whether the targets are
    probabilities (floating)."""
    s = o.label_smoothing
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {s}")
    if input.dim() == 0:
        raise IndexError("focal_loss: input must have the class dim (C,), (N, C) or (N, C, d...), "
                         "got a 0-d input")  # (the composite's IndexError: no dim 1 to index)
    prob, weight = target.is_floating_point(), o.weight
    if prob or s > 0:
        if prob and target.shape != input.shape:
            raise ValueError(f"focal_loss: probability targets must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        C = input.shape[1 if input.dim() > 1 else 0]
        if weight is not None and weight.shape != (C,):
            raise ValueError(f"focal_loss: weight must have one value per class, shape ({C},), "
                             f"got {tuple(weight.shape)}")
        if weight is not None and weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError("focal_loss: the derivative for 'weight' is not implemented "
                                      "(as in PyTorch's cross-entropy)")
    return prob


def cross_entropy(input: Tensor, target: Tensor, o: CrossEntropyOptions, mean=None,
                  out_dtype=None) -> Tensor:
    """Cross-entropy (the softmax focal loss where ``o.gamma`` is set) of class indices, or of
    probabilities (the input's shape; for the focal loss: a floating target); with
    ``o.logit_adjustment`` and ``o.sample_weight`` as weighted_loss/_reweight.py says.
    ``out_dtype``: the loss's dtype where given (the accumulation dtype's per-item losses)."""
    op = o.loss
    a = o.logit_adjustment
    if a is not None:
        a = _reweight.check_adjustment(a, input, op)
        if _reweight.fused_adjustment(input, a, o.softcap):  # read by the kernels
            if out_dtype is None and a.dtype != input.dtype:
                out_dtype = torch.float32  # float32 beside 16-bit logits, as input + a
        else:  # formed once: input + a in PyTorch's promoted dtype
            input, o, a = _reweight.adjusted(input, a), o.but(logit_adjustment=None), None
    if o.sample_weight is not None:
        return _sample_weighted(input, target, o, mean, op)
    if o.gamma:
        prob = _focal_checks(input, target, o)
    else:
        prob = input.shape == target.shape
    if prob:
        input, target, weight = prob_target_inputs(input, target, o.weight, o.ignore_index)
        loss, _, _ = _forward_ad.call(_ops.cross_entropy_prob_forward, input, target, weight,
                                      **o.op_kwargs(prob=True), logit_adjustment=a,
                                      out_dtype=out_dtype)
        if mean is None:
            return loss
        rows = input.numel() // max(1, input.shape[0 if input.dim() == 1 else 1])
        return mean(loss, count(rows, input.device))
    if input.dim() == 1 and target.dim() == 1 and target.numel() == 1:
        target = target.reshape(())  # PyTorch takes a (1,) target beside (C,) logits as 0-d
    loss, _, divisor = _forward_ad.call(_ops.cross_entropy_forward, input, target, o.weight,
                                        **o.op_kwargs(prob=False), logit_adjustment=a,
                                        out_dtype=out_dtype)
    return loss if mean is None else mean(loss, divisor)


def _sample_weighted(input: Tensor, target: Tensor, o: CrossEntropyOptions, mean, op: str):
    """The loss with per-item weights: the items' losses from the fused op (its one pass each
    way, in the accumulation dtype), weighted and reduced around it (_reweight)."""
    prob = target.is_floating_point() and (o.gamma or input.shape == target.shape)
    if not prob and input.dim() == 1 and target.dim() == 1 and target.numel() == 1:
        target = target.reshape(())
    items = _reweight.item_shape(input, target) if prob or input.dim() != 1 else ()
    v = _reweight.check_sample_weight(o.sample_weight, items, input.device, op)
    # the loss's dtype without sample_weight: float32 for 16-bit logits under autocast, else the
    # logits' (class indices) or the promoted target's (probabilities: prob_target_inputs)
    out = _dtypes.loss_dtype(input)
    if prob and not (_dtypes.autocast_on(input) and _dtypes.is_16bit(input)):
        t = target.dtype
        if o.weight is not None and o.weight.is_floating_point():
            t = torch.promote_types(t, o.weight.dtype)
        out = t
        if input.is_floating_point():
            _, out = _dtypes.floating_dtypes(input.dtype, t)
    if o.logit_adjustment is not None and input.is_floating_point():  # (fused: input + a's)
        out = torch.promote_types(out, o.logit_adjustment.dtype)
    acc = _reweight.acc_dtype(out)
    rows = cross_entropy(input, target, o.but(sample_weight=None, reduction="none"),
                         out_dtype=acc)
    if not prob:
        v = _reweight.kept(v, target, o.ignore_index)
    divisor = _reweight.divisor(v, target, o.weight, o.ignore_index, prob)
    reduction = "sum" if mean is not None else o.reduction
    return _reweight.reduce(rows, v, divisor, reduction, out, mean)


def elementwise(input: Tensor, target: Tensor, o: BinaryOptions, mean=None) -> Tensor:
    """The elementwise loss ``o.loss`` names: BCE with logits, the sigmoid focal loss or BCE of
    probabilities (the entry point checked their dtypes)."""
    if target.size() != input.size():
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    if torch.is_grad_enabled():
        _no_parameter_grads(o)
    # BCE: PyTorch computes in the promoted dtype and returns the target's; under autocast,
    # float32 (the op's rule), which this cast must leave alone. The focal loss (torchvision's
    # arithmetic) returns the promoted dtype.
    out_dtype = None if o.focal or _dtypes.autocast_on(input) else target.dtype
    if target.is_floating_point():  # the promoted dtype, 16-bit logits read in place
        input, target = _dtypes.floating_pair(input, target)
    loss = _forward_ad.call(_autograd.ELEMENTWISE[o.loss].forward, input, target,
                            **o.op_kwargs())
    if mean is not None:
        loss = mean(loss, count(input.numel(), input.device))
    return loss if out_dtype is None or loss.dtype == out_dtype else loss.to(out_dtype)


def _no_parameter_grads(o: BinaryOptions) -> None:
    if not o.focal:
        for name, w in (("weight", o.weight), ("pos_weight", o.pos_weight)):
            if w is not None and w.requires_grad:
                raise RuntimeError(
                    f"The function '{o.loss}' is not differentiable with "
                    f"respect to argument '{name}'. This input cannot have requires_grad True.")
        return
    for name, t in (("weight", o.weight), ("pos_weight", o.pos_weight), ("alpha", o.alpha)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise NotImplementedError(
                f"sigmoid_focal_loss: the derivative for '{name}' is not implemented")
