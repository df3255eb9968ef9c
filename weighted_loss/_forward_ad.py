"""Forward-mode AD of the fused losses: torch.autograd.forward_ad and the torch.func transforms
(jvp, grad, jacfwd, hessian...).

The ops' autograd (torch.library.register_autograd, _ops.py) is reverse-mode only: an op called
with dual tensors would drop their tangents. So where a forward-AD level or a torch.func transform
is active, the functions call the ops through the autograd.Functions below instead: the same
forward and backward (_ops.py's), plus a jvp. The tangent of a loss is its gradient contracted
with the inputs' tangents, d loss = sum_k (d loss / d x_k) dx_k (and the target's likewise), with
the gradient from the fused backward op at an upstream gradient of ones: one more pass over the
logits. Tangents of the gradient (forward-over-reverse, Hessian-vector products) come from the
backward's differentiable path (_ops._differentiable_grads), which torch.func.grad takes.
torch.compile traces the plain ops (it cannot trace a custom jvp), so none of this runs there.
"""
import torch
import torch.autograd.forward_ad as _fwad

from . import _ops as _autograd
from . import _reweight

_ops = torch.ops.weighted_loss
_NONE = 0


def active() -> bool:
    """Whether tangents may flow: a dual level of torch.autograd.forward_ad, or a torch.func
    transform, is on (never under torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    return _fwad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def _ones_like_loss(ctx, like):
    return torch.ones(ctx.loss_shape, dtype=ctx.out_dtype, device=like.device)


def _contract(grad, tangent, reduction, class_dim, out_dtype):
    """sum_k grad_k tangent_k: over the class dim per row (reduction none), over everything
    otherwise; accumulated in float32 at least (float64 for float64)."""
    acc = torch.promote_types(torch.promote_types(grad.dtype, tangent.dtype), torch.float32)
    prod = grad.to(acc) * tangent.to(acc)
    if reduction == _NONE:
        out = prod.sum(class_dim) if class_dim is not None else prod
    else:
        out = prod.sum()
    return out.to(out_dtype)


def _add(a, b):
    return b if a is None else a + b


def _with_adjust(d_input, d_adjust, input):
    """The logits' tangent with the logit adjustment's added to every item (None: neither)."""
    if d_adjust is None:
        return d_input
    da = _reweight.along_classes(d_adjust, input).expand(input.shape)
    return da if d_input is None else d_input + da


def _setup(ctx, setup, inputs, output):
    """An op's autograd setup (_ops), its saved tensors kept for the jvp too."""
    setup(ctx, inputs, output)
    ctx.save_for_forward(*ctx.to_save)
    ctx.loss_shape = output[0].shape
    ctx.mark_non_differentiable(output[1], output[2])


class CrossEntropy(torch.autograd.Function):
    """cross_entropy_forward (class indices) with a jvp."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, *args):
        return _ops.cross_entropy_forward(input, target, weight, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, _autograd._ce_setup, inputs, output)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_total_weight):
        return _autograd._ce_backward(ctx, grad_loss, grad_lse, grad_total_weight)

    @staticmethod
    def jvp(ctx, d_input, *rest):
        input, target, weight, lse, total_weight, adjust = ctx.saved_tensors
        d_adjust = rest[9] if len(rest) > 9 else None  # (the inputs after input: 10 with it)
        if d_input is None and d_adjust is None:
            return None, None, None
        g = _ops.cross_entropy_backward(_ones_like_loss(ctx, input), input, target, weight, lse,
                                        total_weight, *ctx.args, logit_adjustment=adjust)
        return _contract(g, _with_adjust(d_input, d_adjust, input), ctx.args[0],
                         _reweight.class_dim(input), ctx.out_dtype), None, None


class CrossEntropyProb(torch.autograd.Function):
    """cross_entropy_prob_forward (probability targets) with a jvp: the target's tangent too."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, *args):
        return _ops.cross_entropy_prob_forward(input, target, weight, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, _autograd._ce_prob_setup, inputs, output)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_tsum):
        return _autograd._ce_prob_backward(ctx, grad_loss, grad_lse, grad_tsum)

    @staticmethod
    def jvp(ctx, d_input, d_target, *rest):
        input, target, weight, lse, tsum, adjust = ctx.saved_tensors
        d_adjust = rest[7] if len(rest) > 7 else None  # (the inputs after target: 8 with it)
        ones, red, cdim = _ones_like_loss(ctx, input), ctx.args[0], _reweight.class_dim(input)
        out = None
        d_input = _with_adjust(d_input, d_adjust, input)
        if d_input is not None:
            g = _ops.cross_entropy_prob_backward(ones, input, target, weight, lse, tsum, *ctx.args,
                                                 logit_adjustment=adjust)
            out = _contract(g, d_input, red, cdim, ctx.out_dtype)
        if d_target is not None:
            g = _ops.cross_entropy_prob_target_backward(ones, input, weight, lse, *ctx.args,
                                                        target_dtype=target.dtype,
                                                        logit_adjustment=adjust)
            out = _add(out, _contract(g, d_target, red, cdim, ctx.out_dtype))
        return out, None, None


class BinaryCrossEntropy(torch.autograd.Function):
    """binary_cross_entropy_with_logits_forward (and the sigmoid focal loss) with a jvp."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight, pos_weight, *args):
        return _ops.binary_cross_entropy_with_logits_forward(input, target, weight, pos_weight,
                                                             *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _autograd._bce_setup(ctx, inputs, output)
        ctx.save_for_forward(*ctx.to_save)
        ctx.loss_shape = output.shape

    @staticmethod
    def backward(ctx, grad_loss):
        return _autograd._bce_backward(ctx, grad_loss)

    @staticmethod
    def jvp(ctx, d_input, d_target, *_):
        input, target, weight, pos_weight, alpha_tensor = ctx.saved_tensors
        if d_input is None and d_target is None:
            return None
        gx, gt = _ops.binary_cross_entropy_with_logits_backward(
            _ones_like_loss(ctx, input), input, target, weight, pos_weight, ctx.reduction,
            d_input is not None, d_target is not None, *ctx.focal,
            *((alpha_tensor,) if ctx.has_alpha_tensor else ()),
            **({"prob_input": True} if ctx.prob_input else {}))
        out = None
        if d_input is not None:
            out = _contract(gx, d_input, ctx.reduction, None, ctx.out_dtype)
        if d_target is not None:
            out = _add(out, _contract(gt, d_target, ctx.reduction, None, ctx.out_dtype))
        return out


def cross_entropy_forward(*args, **kwargs):
    """_ops.cross_entropy_forward, through CrossEntropy where tangents may flow."""
    if active():
        return CrossEntropy.apply(*_positional(_ops.cross_entropy_forward, args, kwargs))
    return _ops.cross_entropy_forward(*args, **kwargs)


def cross_entropy_prob_forward(*args, **kwargs):
    if active():
        return CrossEntropyProb.apply(*_positional(_ops.cross_entropy_prob_forward, args, kwargs))
    return _ops.cross_entropy_prob_forward(*args, **kwargs)


def binary_cross_entropy_with_logits_forward(*args, **kwargs):
    if active():
        return BinaryCrossEntropy.apply(
            *_positional(_ops.binary_cross_entropy_with_logits_forward, args, kwargs))
    return _ops.binary_cross_entropy_with_logits_forward(*args, **kwargs)


def _positional(op, args, kwargs):
    """Every argument of the op's schema, positionally, its defaults filled in (what
    register_autograd's setup_context sees, and what Function.apply takes)."""
    schema = op.default._schema
    out = list(args)
    for a in schema.arguments[len(args):]:
        out.append(kwargs[a.name] if a.name in kwargs else a.default_value)
    return out
