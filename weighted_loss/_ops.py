"""Fake kernels (shapes for torch.compile / meta tensors) and autograd for the weighted_loss ops.

The schemas live in csrc/ops.cpp. Each cross-entropy forward saves the per-row log-sum-exp as two
(2, rows) planes, each row's max and the log-sum shifted by it (never an N x C tensor; a third
plane for the focal loss); BCE saves only its inputs. Each backward is an op of its own that recomputes
what it needs in one pass. The forwards' out_dtype (the loss's dtype; float32 under autocast for
16-bit logits: csrc/autocast.cpp) is not an input of the backward, which reads it off grad_loss.
"""
import torch

from . import _composite, _reweight

_ops = torch.ops.weighted_loss
_NONE = 0


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(input):
    n = 1 if input.dim() == 1 else input.shape[0]
    for d in input.shape[2:]:
        n = n * d
    return n


def _row_shape(input):
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


# ---------------------------------------------------------------- class-index targets

@torch.library.register_fake("weighted_loss::cross_entropy_forward")
def _(input, target, weight, reduction, ignore_index, label_smoothing, z_loss=0.0, softcap=0.0,
      gamma=0.0, out_dtype=None, logit_adjustment=None):
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(target.shape if reduction == _NONE else (),
                           dtype=out_dtype or input.dtype)
    planes = 3 if gamma > 0 else 2  # csrc/cross_entropy.cpp: lse_planes
    return loss, input.new_empty((planes, _rows(input)), dtype=acc), input.new_empty((), dtype=acc)


@torch.library.register_fake("weighted_loss::cross_entropy_backward")
def _(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
      label_smoothing, z_loss=0.0, softcap=0.0, gamma=0.0, logit_adjustment=None):
    return torch.empty_like(input)


@torch.library.register_fake("weighted_loss::cross_entropy_backward_")
def _(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
      label_smoothing, z_loss=0.0, softcap=0.0, gamma=0.0, logit_adjustment=None):
    return None


def _no_weight_grad(ctx, index):
    if ctx.needs_input_grad[index]:
        raise NotImplementedError(
            "weighted_loss: the derivative for 'weight' is not implemented (as in PyTorch)")


def _differentiable_grads(composite, args, grad_loss, wrt):
    """The gradients of the loss with respect to the tensors `wrt` (a list, None where no gradient
    is wanted), as a graph of PyTorch ops: a backward run with create_graph=True (double backward,
    gradient penalties, torch.func.grad of grad) gets a gradient it can differentiate again. The
    fused backward ops are first-order only."""
    order = [next(i for i, a in enumerate(args) if a is t) for t in wrt if t is not None]

    def loss_of(*tensors):
        full = list(args)
        for i, v in zip(order, tensors):
            full[i] = v
        return composite(*full)

    # torch.func.vjp rather than autograd.grad: it composes with the torch.func transforms that
    # call this backward (jacrev, hessian) as well as with create_graph=True
    loss, pullback = torch.func.vjp(loss_of, *[args[i] for i in order])
    got = iter(pullback(grad_loss.to(loss.dtype)))
    return [None if t is None else next(got) for t in wrt]


def _adjust_grad(grad_input, input):
    """The logit adjustment's gradient from the logits' (the adjustment is added to every item):
    their sum over every dim but the classes'."""
    cdim = _reweight.class_dim(input)
    dims = [d for d in range(grad_input.dim()) if d != cdim]
    return grad_input.sum(dims) if dims else grad_input


def _ce_setup(ctx, inputs, output):
    # reduction, ignore_index, smoothing[, z, cap, gamma[, out_dtype[, logit_adjustment]]]
    input, target, weight, *args = inputs
    _, lse, total_weight = output
    ctx.adjust = args[7] if len(args) > 7 else None
    ctx.to_save = (input, target, weight, lse, total_weight, ctx.adjust)  # (and _forward_ad's)
    ctx.save_for_backward(*ctx.to_save)
    ctx.n_inputs = len(inputs)
    ctx.args = tuple(args[:6])
    ctx.out_dtype = output[0].dtype
    # lse and total_weight get no gradient: without this autograd would fill a zero (2, rows)
    # tensor for lse every backward (0.15 ms of 2.4 at (16, 19, 128, 128) float32 on the CPU)
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, _grad_lse, _grad_total_weight):
    input, target, weight, lse, total_weight, adjust = ctx.saved_tensors
    _no_weight_grad(ctx, 2)
    need_a = adjust is not None and len(ctx.needs_input_grad) > 10 and ctx.needs_input_grad[10]
    grad_input = grad_adjust = None
    if (ctx.needs_input_grad[0] or need_a) and grad_loss is not None:  # None: only lse was
        if torch.is_grad_enabled():  # create_graph=True: a gradient to differentiate again
            grad_input, grad_adjust = _differentiable_grads(
                _composite.cross_entropy,
                (input, target, weight, *ctx.args, ctx.out_dtype, adjust), grad_loss,
                [input if ctx.needs_input_grad[0] else None, adjust if need_a else None])
        else:
            grad_input = _ops.cross_entropy_backward(grad_loss, input, target, weight, lse,
                                                     total_weight, *ctx.args,
                                                     logit_adjustment=adjust)
            if need_a:
                grad_adjust = _adjust_grad(grad_input, input).to(adjust.dtype)
            if not ctx.needs_input_grad[0]:
                grad_input = None
    out = [grad_input] + [None] * (ctx.n_inputs - 1)
    if need_a:
        out[10] = grad_adjust
    return tuple(out)


torch.library.register_autograd("weighted_loss::cross_entropy_forward", _ce_backward,
                                setup_context=_ce_setup)


# ---------------------------------------------------------------- probability targets

@torch.library.register_fake("weighted_loss::cross_entropy_prob_forward")
def _(input, target, weight, reduction, label_smoothing, z_loss=0.0, softcap=0.0, gamma=0.0,
      out_dtype=None, logit_adjustment=None):
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(_row_shape(input) if reduction == _NONE else (),
                           dtype=out_dtype or target.dtype)
    rows = _rows(input)
    return loss, input.new_empty((2, rows), dtype=acc), input.new_empty((rows,), dtype=acc)


@torch.library.register_fake("weighted_loss::cross_entropy_prob_backward")
def _(grad_loss, input, target, weight, lse, tsum, reduction, label_smoothing, z_loss=0.0,
      softcap=0.0, gamma=0.0, logit_adjustment=None):
    return torch.empty_like(input)


@torch.library.register_fake("weighted_loss::cross_entropy_prob_target_backward")
def _(grad_loss, input, weight, lse, reduction, label_smoothing, z_loss=0.0, softcap=0.0,
      gamma=0.0, target_dtype=None, logit_adjustment=None):
    return torch.empty_like(input, dtype=target_dtype or input.dtype)


def _ce_prob_setup(ctx, inputs, output):
    # reduction, label_smoothing[, z, softcap, gamma[, out_dtype[, logit_adjustment]]]
    input, target, weight, *args = inputs
    _, lse, tsum = output
    ctx.adjust = args[6] if len(args) > 6 else None
    ctx.to_save = (input, target, weight, lse, tsum, ctx.adjust)
    ctx.save_for_backward(*ctx.to_save)
    ctx.n_inputs = len(inputs)
    ctx.args = tuple(args[:5])
    ctx.out_dtype = output[0].dtype
    ctx.set_materialize_grads(False)  # no zero gradients for lse and tsum (as above)


def _ce_prob_backward(ctx, grad_loss, _grad_lse, _grad_tsum):
    input, target, weight, lse, tsum, adjust = ctx.saved_tensors
    _no_weight_grad(ctx, 2)
    need_a = adjust is not None and len(ctx.needs_input_grad) > 9 and ctx.needs_input_grad[9]
    grad_input = grad_target = grad_adjust = None
    if grad_loss is None:  # only lse or tsum was differentiated: they carry no gradient
        return (None,) * ctx.n_inputs
    out = [None] * ctx.n_inputs
    if torch.is_grad_enabled():  # create_graph=True: gradients to differentiate again
        out[0], out[1], grad_adjust = _differentiable_grads(
            _composite.cross_entropy_prob,
            (input, target, weight, *ctx.args, ctx.out_dtype, adjust), grad_loss,
            [input if ctx.needs_input_grad[0] else None,
             target if ctx.needs_input_grad[1] else None, adjust if need_a else None])
        if need_a:
            out[9] = grad_adjust
        return tuple(out)
    if ctx.needs_input_grad[0] or need_a:
        grad_input = _ops.cross_entropy_prob_backward(grad_loss, input, target, weight, lse,
                                                      tsum, *ctx.args, logit_adjustment=adjust)
        if need_a:
            out[9] = _adjust_grad(grad_input, input).to(adjust.dtype)
        if ctx.needs_input_grad[0]:
            out[0] = grad_input
    if ctx.needs_input_grad[1]:
        out[1] = _ops.cross_entropy_prob_target_backward(
            grad_loss, input, weight, lse, *ctx.args, target_dtype=target.dtype,
            logit_adjustment=adjust)
    return tuple(out)


torch.library.register_autograd("weighted_loss::cross_entropy_prob_forward", _ce_prob_backward,
                                setup_context=_ce_prob_setup)


# ---------------------------------------------------------------- vocab-parallel shards

@torch.library.register_fake("weighted_loss::cross_entropy_shard_forward")
def _(input, target, weight, ignore_index, label_smoothing, class_offset, total_classes):
    return input.new_empty((5, input.shape[0]), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("weighted_loss::cross_entropy_shard_backward")
def _(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
      label_smoothing, class_offset, total_classes):
    return torch.empty_like(input)


# (their autograd is weighted_loss/vocab_parallel.py's, around the merge across the group)


# ---------------------------------------------------------------- BCE with logits

@torch.library.register_fake("weighted_loss::binary_cross_entropy_with_logits_forward")
def _(input, target, weight, pos_weight, reduction, gamma=-1.0, alpha=-1.0, alpha_tensor=None,
      out_dtype=None, prob_input=False):
    return input.new_empty(input.shape if reduction == _NONE else (),
                           dtype=out_dtype or target.dtype)


@torch.library.register_fake("weighted_loss::binary_cross_entropy_with_logits_backward")
def _(grad_loss, input, target, weight, pos_weight, reduction, input_grad, target_grad,
      gamma=-1.0, alpha=-1.0, alpha_tensor=None, prob_input=False):
    # contiguous, as the kernels write them; the target's in its dtype
    grad_input = input.new_empty(input.shape if input_grad else (0,))
    grad_target = target.new_empty(input.shape) if target_grad else input.new_empty((0,))
    return grad_input, grad_target


def _bce_setup(ctx, inputs, output):
    # [gamma, alpha, alpha_tensor, out_dtype, prob_input]
    input, target, weight, pos_weight, reduction, *focal = inputs
    alpha_tensor = focal[2] if len(focal) > 2 else None
    ctx.prob_input = bool(focal[4]) if len(focal) > 4 else False
    ctx.to_save = (input, target, weight, pos_weight, alpha_tensor)
    ctx.save_for_backward(*ctx.to_save)
    ctx.reduction, ctx.focal = reduction, tuple(focal[:2])
    ctx.has_alpha_tensor = alpha_tensor is not None
    ctx.out_dtype = output.dtype


def _bce_backward(ctx, grad_loss):
    input, target, weight, pos_weight, alpha_tensor = ctx.saved_tensors
    for index, name in ((2, "weight"), (3, "pos_weight"), (7, "alpha")):
        if index < len(ctx.needs_input_grad) and ctx.needs_input_grad[index]:
            raise NotImplementedError(
                f"weighted_loss: the derivative for '{name}' is not implemented (as in PyTorch)")
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input = grad_target = None
    if (need_input or need_target) and torch.is_grad_enabled():  # create_graph=True (above)
        grad_input, grad_target = _differentiable_grads(
            _composite.binary_cross_entropy,
            (input, target, weight, pos_weight, ctx.reduction, *ctx.focal, alpha_tensor,
             ctx.out_dtype, ctx.prob_input),
            grad_loss, [input if need_input else None, target if need_target else None])
    elif need_input or need_target:
        gx, gt = _ops.binary_cross_entropy_with_logits_backward(
            grad_loss, input, target, weight, pos_weight, ctx.reduction, need_input, need_target,
            *ctx.focal, *((alpha_tensor,) if ctx.has_alpha_tensor else ()),
            **({"prob_input": True} if ctx.prob_input else {}))
        grad_input = gx if need_input else None
        grad_target = gt if need_target else None
    return (grad_input, grad_target) + (None,) * (len(ctx.needs_input_grad) - 2)


torch.library.register_autograd("weighted_loss::binary_cross_entropy_with_logits_forward",
                                _bce_backward, setup_context=_bce_setup)


# ---------------------------------------------------------------- second derivatives

# The backward ops compute first-order gradients only: a backward with create_graph=True goes
# through _differentiable_grads instead (above). Called directly and differentiated, they raise.
def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "weighted_loss: the fused backward ops are first-order; differentiate the losses "
        "(a backward with create_graph=True builds a differentiable gradient)")


for _name in ("cross_entropy_backward", "cross_entropy_prob_backward",
              "cross_entropy_prob_target_backward", "binary_cross_entropy_with_logits_backward",
              "cross_entropy_shard_backward"):
    torch.library.register_autograd(f"weighted_loss::{_name}", _no_double_backward)
