"""Forward-mode AD of the fused losses: torch.autograd.forward_ad and the torch.func transforms
(jvp, grad, jacfwd, hessian...).

The ops' autograd (torch.library.register_autograd, _ops.py) is reverse-mode only: an op called
with dual tensors would drop their tangents. So where a forward-AD level or a torch.func transform
is active, ``call`` runs the ops through the autograd.Functions below instead: the same forward
and backward (_ops.py's rules), plus a jvp. The tangent of a loss is its gradient contracted
with the inputs' tangents, d loss = sum_k (d loss / d x_k) dx_k (and the target's likewise), with
the gradient from the fused backward op at an upstream gradient of ones: one more pass over the
logits. Tangents of the gradient (forward-over-reverse, Hessian-vector products) come from the
backward's differentiable path (_ops.differentiable_grads), which torch.func.grad takes.
torch.compile traces the plain ops (it cannot trace a custom jvp), so none of this runs there.
"""
import functools

import torch
import torch.autograd.forward_ad as _fwad

from . import _named, _reweight
from . import _ops as _autograd

_ops = torch.ops.weighted_loss


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
    if reduction == "none":
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


def _ce_jvp(ctx, d):
    """Class indices: the logits' tangent (with the adjustment's) against their gradient. (The
    cross-entropy jvps return the tangents of the op's outputs: the loss's, and none for the
    saved lse and total_weight or tsum.)"""
    s = _named.saved(ctx)
    if d.input is None and d.logit_adjustment is None:
        return None, None, None
    g = _ops.cross_entropy_backward(_ones_like_loss(ctx, s.input), s.input, s.target, s.weight,
                                    s.lse, s.total_weight, **ctx.options,
                                    logit_adjustment=s.logit_adjustment)
    d_input = _with_adjust(d.input, d.logit_adjustment, s.input)
    return _contract(g, d_input, ctx.options["reduction"], _reweight.class_dim(s.input),
                     ctx.out_dtype), None, None


def _ce_prob_jvp(ctx, d):
    """Probabilities: the logits' and the target's tangents."""
    s = _named.saved(ctx)
    ones, red, cdim = _ones_like_loss(ctx, s.input), ctx.options["reduction"], \
        _reweight.class_dim(s.input)
    out = None
    d_input = _with_adjust(d.input, d.logit_adjustment, s.input)
    if d_input is not None:
        g = _ops.cross_entropy_prob_backward(ones, s.input, s.target, s.weight, s.lse, s.tsum,
                                             **ctx.options, logit_adjustment=s.logit_adjustment)
        out = _contract(g, d_input, red, cdim, ctx.out_dtype)
    if d.target is not None:
        g = _ops.cross_entropy_prob_target_backward(ones, s.input, s.weight, s.lse, **ctx.options,
                                                    logit_adjustment=s.logit_adjustment,
                                                    target_dtype=s.target.dtype)
        out = _add(out, _contract(g, d.target, red, cdim, ctx.out_dtype))
    return out, None, None


def _elementwise_jvp(rule, ctx, d):
    """The elementwise losses: the input's and the target's tangents."""
    s = _named.saved(ctx)
    if d.input is None and d.target is None:
        return None
    gx, gt = rule.backward(_ones_like_loss(ctx, s.input),
                           **{n: s[n] for n in rule.inputs}, **ctx.options,
                           input_grad=d.input is not None, target_grad=d.target is not None)
    red = ctx.options["reduction"]
    out = None
    if d.input is not None:
        out = _contract(gx, d.input, red, None, ctx.out_dtype)
    if d.target is not None:
        out = _add(out, _contract(gt, d.target, red, None, ctx.out_dtype))
    return out


def _function(rule) -> type:
    """The op as an autograd.Function: its rule's setup and backward (_ops), plus a jvp."""
    if rule is _autograd.CROSS_ENTROPY:
        jvp = _ce_jvp
    elif rule is _autograd.CROSS_ENTROPY_PROB:
        jvp = _ce_prob_jvp
    else:
        jvp = functools.partial(_elementwise_jvp, rule)
    setup, backward = _autograd.setup_of(rule), _autograd.backward_of(rule)

    def setup_context(ctx, inputs, output):
        ctx.for_forward = True  # (_named.save: the jvp reads the saved tensors too)
        setup(rule, ctx, inputs, output)
        if isinstance(output, tuple):  # (loss, saved outputs: lse, total_weight or tsum)
            _, *saved_outputs = output
            ctx.mark_non_differentiable(*saved_outputs)

    _, _, name = rule.signature.owner.rpartition("::")
    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(lambda *args: rule.forward(*args)),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(lambda ctx, *grads: backward(rule, ctx, *grads)),
        "jvp": staticmethod(lambda ctx, *tangents: jvp(ctx, rule.signature.bind(tangents))),
    })


# (the overlap op's sums have tangents of their own, (N, 3, C) of them: where tangents may flow,
# its callers run its composite instead, _overlap.py)
FUNCTIONS = {op: _function(rule) for op, rule in _autograd.RULES.items()
             if rule is not _autograd.CROSS_ENTROPY_OVERLAP}


def call(op, *args, **kwargs):
    """The forward op ``op`` (a key of _ops.RULES), through its autograd.Function where tangents
    may flow."""
    if active():
        return FUNCTIONS[op].apply(*_positional(op, args, kwargs))
    return op(*args, **kwargs)


def _positional(op, args, kwargs):
    """Every argument of the op's schema, positionally, its defaults filled in (what
    register_autograd's setup_context sees, and what Function.apply takes)."""
    schema = op.default._schema
    out = list(args)
    for a in schema.arguments[len(args):]:
        out.append(kwargs[a.name] if a.name in kwargs else a.default_value)
    return out
