"""Fake kernels (shapes for torch.compile / meta tensors) and autograd for the weighted_loss ops.

The schemas live in csrc/ops.cpp; every rule here reads its arguments and returns its gradients
by schema name (_named.Signature), never by position. Each cross-entropy forward saves the
per-row log-sum-exp as two (2, rows) planes, each row's max and the log-sum shifted by it (never
an N x C tensor; a third plane for the focal loss); the elementwise losses save only their
inputs. Each backward is an op of its own that recomputes what it needs in one pass. The
forwards' out_dtype (the loss's dtype; float32 under autocast for 16-bit logits:
csrc/autocast.cpp) is not an input of the backward, which reads it off grad_loss.

``RULES`` maps each differentiable forward op to its Rule: its signature, the tensors its
backward needs, its options, and the composite (_composite) that a differentiable backward and
the forward-mode path (_forward_ad) differentiate.
"""
import dataclasses
from typing import Callable, Optional, Tuple

import torch

from . import _composite, _named, _reweight

_ops = torch.ops.weighted_loss


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(input):
    n = 1 if input.dim() == 1 else input.shape[0]
    for d in input.shape[2:]:
        n = n * d
    return n


def _row_shape(input):
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


def _is_tensor_arg(arg) -> bool:
    return str(arg.type) in ("Tensor", "Optional[Tensor]", "Tensor?")


@dataclasses.dataclass(frozen=True, eq=False)
class Rule:
    """What autograd needs of one forward op. ``signature``: its arguments' names; ``inputs``:
    its tensor arguments, saved for the backward op, which takes them by the same names;
    ``options``: the other arguments, passed on by name; ``outputs``: the names of the
    forward's saved outputs (lse, tsum...), read by the backward op too; ``parameters``: tensor
    arguments with no derivative (weights), whose gradient raises as PyTorch's does."""
    forward: Callable
    composite: Callable
    signature: _named.Signature
    inputs: Tuple[str, ...]
    options: Tuple[str, ...]
    outputs: Tuple[str, ...] = ()
    parameters: Tuple[str, ...] = ()
    backward: Optional[Callable] = None


_DIFFERENTIABLE = ("input", "target", "logit_adjustment")


def _rule(op, composite, outputs=(), backward=None):
    """A Rule read off the op's schema: every tensor argument is saved, the others are options
    (out_dtype aside, which the backward reads off grad_loss)."""
    args = op.default._schema.arguments
    tensors = tuple(a.name for a in args if _is_tensor_arg(a))
    options = tuple(a.name for a in args if not _is_tensor_arg(a) and a.name != "out_dtype")
    return Rule(op, composite, _named.Signature.of_op(op), tensors, options, outputs,
                tuple(t for t in tensors if t not in _DIFFERENTIABLE), backward)


def _setup(rule: Rule, ctx, inputs, output):
    """Saves the rule's inputs and the forward's saved outputs by name, and its options."""
    a = rule.signature.bind(inputs)
    loss, *rest = output if isinstance(output, tuple) else (output,)
    saved_outputs = dict(zip(rule.outputs, rest))
    _named.save(ctx, **_named.tensors_of(a, rule.inputs), **saved_outputs)
    ctx.options = {k: a[k] for k in rule.options}
    ctx.out_dtype = loss.dtype
    ctx.loss_shape = loss.shape


def _no_parameter_grads(rule: Rule, ctx) -> None:
    sig = rule.signature
    for name in rule.parameters:
        if sig.needs(ctx, name):
            shown = "alpha" if name == "alpha_tensor" else name
            raise NotImplementedError(
                f"weighted_loss: the derivative for '{shown}' is not implemented (as in PyTorch)")


def differentiable_grads(rule: Rule, args: dict, grad_loss, wrt):
    """The gradients of the loss with respect to the arguments named in ``wrt``, as a graph of
    PyTorch ops (the rule's composite, called with ``args`` by name): a backward run with
    create_graph=True (double backward, gradient penalties, torch.func.grad of grad) gets a
    gradient it can differentiate again. The fused backward ops are first-order only."""
    def loss_of(*tensors):
        return rule.composite(**dict(args, **dict(zip(wrt, tensors))))

    # torch.func.vjp rather than autograd.grad: it composes with the torch.func transforms that
    # call this backward (jacrev, hessian) as well as with create_graph=True
    loss, pullback = torch.func.vjp(loss_of, *[args[n] for n in wrt])
    return dict(zip(wrt, pullback(grad_loss.to(loss.dtype))))


def _adjust_grad(grad_input, input):
    """The logit adjustment's gradient from the logits' (the adjustment is added to every item):
    their sum over every dim but the classes'."""
    cdim = _reweight.class_dim(input)
    dims = [d for d in range(grad_input.dim()) if d != cdim]
    return grad_input.sum(dims) if dims else grad_input


# ---------------------------------------------------------------- cross-entropy

@torch.library.register_fake("weighted_loss::cross_entropy_forward")
def _(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
      z_loss=0.0, softcap=None, gamma=None, logit_adjustment=None, out_dtype=None):
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(target.shape if reduction == "none" else (),
                           dtype=out_dtype or input.dtype)
    planes = 3 if gamma else 2  # csrc/cross_entropy.cpp: lse_planes
    return loss, input.new_empty((planes, _rows(input)), dtype=acc), input.new_empty((), dtype=acc)


@torch.library.register_fake("weighted_loss::cross_entropy_backward")
def _(grad_loss, input, target, weight, lse, total_weight, reduction="mean", ignore_index=-100,
      label_smoothing=0.0, z_loss=0.0, softcap=None, gamma=None, logit_adjustment=None):
    return torch.empty_like(input)


@torch.library.register_fake("weighted_loss::cross_entropy_backward_")
def _(grad_loss, input, target, weight, lse, total_weight, reduction="mean", ignore_index=-100,
      label_smoothing=0.0, z_loss=0.0, softcap=None, gamma=None, logit_adjustment=None):
    return None


@torch.library.register_fake("weighted_loss::cross_entropy_prob_forward")
def _(input, target, weight=None, reduction="mean", label_smoothing=0.0, z_loss=0.0,
      softcap=None, gamma=None, logit_adjustment=None, out_dtype=None):
    acc = _acc_dtype(input.dtype)
    loss = input.new_empty(_row_shape(input) if reduction == "none" else (),
                           dtype=out_dtype or target.dtype)
    rows = _rows(input)
    return loss, input.new_empty((2, rows), dtype=acc), input.new_empty((rows,), dtype=acc)


@torch.library.register_fake("weighted_loss::cross_entropy_prob_backward")
def _(grad_loss, input, target, weight, lse, tsum, reduction="mean", label_smoothing=0.0,
      z_loss=0.0, softcap=None, gamma=None, logit_adjustment=None):
    return torch.empty_like(input)


@torch.library.register_fake("weighted_loss::cross_entropy_prob_target_backward")
def _(grad_loss, input, weight, lse, reduction="mean", label_smoothing=0.0, z_loss=0.0,
      softcap=None, gamma=None, logit_adjustment=None, target_dtype=None):
    return torch.empty_like(input, dtype=target_dtype or input.dtype)


CROSS_ENTROPY = _rule(_ops.cross_entropy_forward, _composite.cross_entropy,
                      outputs=("lse", "total_weight"))
CROSS_ENTROPY_PROB = _rule(_ops.cross_entropy_prob_forward, _composite.cross_entropy_prob,
                           outputs=("lse", "tsum"))


def _ce_setup(rule, ctx, inputs, output):
    _setup(rule, ctx, inputs, output)
    # the saved outputs get no gradient: without this autograd would fill a zero (2, rows)
    # tensor for lse every backward (0.15 ms of 2.4 at (16, 19, 128, 128) float32 on the CPU)
    ctx.set_materialize_grads(False)


def _ce_backward(rule, ctx, grad_loss, *_grad_saved_outputs):
    """Both cross-entropy rules: the logits' gradient from the backward op, the probability
    targets' from the target-backward op, the logit adjustment's the logits' summed."""
    sig, s = rule.signature, _named.saved(ctx)
    _no_parameter_grads(rule, ctx)
    prob = rule is CROSS_ENTROPY_PROB
    adjust = s.logit_adjustment
    need_x, need_t = sig.needs(ctx, "input"), prob and sig.needs(ctx, "target")
    need_a = adjust is not None and sig.needs(ctx, "logit_adjustment")
    if grad_loss is None or not (need_x or need_t or need_a):  # only lse (or tsum) was used
        return sig.grads()
    if torch.is_grad_enabled():  # create_graph=True: gradients to differentiate again
        wrt = [n for n, need in (("input", need_x), ("target", need_t),
                                 ("logit_adjustment", need_a)) if need]
        args = dict(input=s.input, target=s.target, weight=s.weight, logit_adjustment=adjust,
                    out_dtype=ctx.out_dtype, **ctx.options)
        return sig.grads(**differentiable_grads(rule, args, grad_loss, wrt))
    grads = {}
    if need_x or need_a:
        saved = (s.lse, s.tsum) if prob else (s.lse, s.total_weight)
        backward = _ops.cross_entropy_prob_backward if prob else _ops.cross_entropy_backward
        gx = backward(grad_loss, s.input, s.target, s.weight, *saved, **ctx.options,
                      logit_adjustment=adjust)
        if need_a:
            grads["logit_adjustment"] = _adjust_grad(gx, s.input).to(adjust.dtype)
        if need_x:
            grads["input"] = gx
    if need_t:
        grads["target"] = _ops.cross_entropy_prob_target_backward(
            grad_loss, s.input, s.weight, s.lse, **ctx.options, logit_adjustment=adjust,
            target_dtype=s.target.dtype)
    return sig.grads(**grads)


# ---------------------------------------------------------------- the overlap sums

@torch.library.register_fake("weighted_loss::cross_entropy_overlap_forward")
def _(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
      gamma=None, squared=False, out_dtype=None):
    acc = _acc_dtype(input.dtype)
    prob = target.is_floating_point()
    row_shape = _row_shape(input) if prob else target.shape
    loss = input.new_empty(row_shape if reduction == "none" else (),
                           dtype=out_dtype or (target.dtype if prob else input.dtype))
    sums = input.new_empty((input.shape[0], 3, input.shape[1]), dtype=acc)
    if not gamma:  # nothing per position: the backward recomputes it (cross_entropy_overlap.cpp)
        return (loss, sums, input.new_empty((0,), dtype=acc),
                input.new_empty((0,) if prob else (), dtype=acc))
    rows = _rows(input)
    planes = 2 if prob else 3  # the focal term's (csrc/cross_entropy.cpp: lse_planes)
    aux = input.new_empty((rows,) if prob else (), dtype=acc)
    return loss, sums, input.new_empty((planes, rows), dtype=acc), aux


@torch.library.register_fake("weighted_loss::cross_entropy_overlap_backward")
def _(grad_loss, grad_sums, input, target, weight, lse, aux, reduction="mean",
      ignore_index=-100, label_smoothing=0.0, gamma=None, squared=False):
    return torch.empty_like(input)


CROSS_ENTROPY_OVERLAP = _rule(_ops.cross_entropy_overlap_forward,
                              _composite.cross_entropy_overlap, outputs=("sums", "lse", "aux"))


def _overlap_backward(rule, ctx, grad_loss, grad_sums, *_grad_saved_outputs):
    """The logits' gradient of the loss and of the sums I and P (T has none), from the
    backward op; a probability target's, and any gradient to differentiate again, from the
    composite."""
    sig, s = rule.signature, _named.saved(ctx)
    _no_parameter_grads(rule, ctx)
    prob = s.target.is_floating_point()
    need_x, need_t = sig.needs(ctx, "input"), prob and sig.needs(ctx, "target")
    if (grad_loss is None and grad_sums is None) or not (need_x or need_t):
        return sig.grads()
    # the cross-entropy term unused (a Dice alone): no gradient of it, not 0 times its NaN
    with_loss = grad_loss is not None
    if grad_loss is None:
        grad_loss = torch.zeros(ctx.loss_shape, dtype=ctx.out_dtype, device=s.input.device)
    if grad_sums is None:
        grad_sums = s.lse.new_zeros((s.input.shape[0], 3, s.input.shape[1]))
    if torch.is_grad_enabled() or need_t:  # create_graph=True, or the target's gradient
        wrt = [n for n, need in (("input", need_x), ("target", need_t)) if need]
        args = dict(input=s.input, target=s.target, weight=s.weight, out_dtype=ctx.out_dtype,
                    **ctx.options)

        def of(*tensors):
            loss, sums = rule.composite(**dict(args, **dict(zip(wrt, tensors))))
            return (loss, sums) if with_loss else sums
        if with_loss:
            (loss, sums), pullback = torch.func.vjp(of, *[args[n] for n in wrt])
            grads = pullback((grad_loss.to(loss.dtype), grad_sums.to(sums.dtype)))
        else:
            sums, pullback = torch.func.vjp(of, *[args[n] for n in wrt])
            grads = pullback(grad_sums.to(sums.dtype))
        return sig.grads(**dict(zip(wrt, grads)))
    gx = _ops.cross_entropy_overlap_backward(grad_loss, grad_sums, s.input, s.target,
                                             s.weight, s.lse, s.aux, **ctx.options)
    return sig.grads(input=gx)


# ---------------------------------------------------------------- vocab-parallel shards

@torch.library.register_fake("weighted_loss::cross_entropy_shard_forward")
def _(input, target, weight, ignore_index, label_smoothing, class_offset, total_classes):
    return input.new_empty((5, input.shape[0]), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("weighted_loss::cross_entropy_shard_backward")
def _(grad_loss, input, target, weight, lse, total_weight, reduction, ignore_index,
      label_smoothing, class_offset, total_classes):
    return torch.empty_like(input)


# Their autograd is weighted_loss/_sharded.py's, around the merge across the group: called on
# its own and differentiated, the forward raises rather than give a silent zero.
def _shard_forward_backward(ctx, *grads):
    raise NotImplementedError(
        "weighted_loss: cross_entropy_shard_forward returns per-shard statistics; differentiate "
        "wl.vocab_parallel_cross_entropy, which merges them across the group")


torch.library.register_autograd("weighted_loss::cross_entropy_shard_forward",
                                _shard_forward_backward)


# ---------------------------------------------------------------- the elementwise losses

@torch.library.register_fake("weighted_loss::binary_cross_entropy_with_logits_forward")
def _(input, target, weight=None, pos_weight=None, reduction="mean", out_dtype=None):
    return _fake_elementwise_loss(input, target, reduction, out_dtype)


@torch.library.register_fake("weighted_loss::sigmoid_focal_loss_forward")
def _(input, target, gamma, alpha, alpha_tensor=None, weight=None, pos_weight=None,
      reduction="none", out_dtype=None):
    return _fake_elementwise_loss(input, target, reduction, out_dtype)


@torch.library.register_fake("weighted_loss::binary_cross_entropy_forward")
def _(input, target, weight=None, pos_weight=None, reduction="mean", out_dtype=None):
    return _fake_elementwise_loss(input, target, reduction, out_dtype)


@torch.library.register_fake("weighted_loss::binary_cross_entropy_with_logits_backward")
def _(grad_loss, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    return _fake_elementwise_grads(input, target, input_grad, target_grad)


@torch.library.register_fake("weighted_loss::sigmoid_focal_loss_backward")
def _(grad_loss, input, target, gamma, alpha, alpha_tensor, weight, pos_weight, reduction,
      input_grad, target_grad):
    return _fake_elementwise_grads(input, target, input_grad, target_grad)


@torch.library.register_fake("weighted_loss::binary_cross_entropy_backward")
def _(grad_loss, input, target, weight, pos_weight, reduction, input_grad, target_grad):
    return _fake_elementwise_grads(input, target, input_grad, target_grad)


def _fake_elementwise_loss(input, target, reduction, out_dtype):
    return input.new_empty(input.shape if reduction == "none" else (),
                           dtype=out_dtype or target.dtype)


def _fake_elementwise_grads(input, target, input_grad, target_grad):
    # contiguous, as the kernels write them; the target's in its dtype
    grad_input = input.new_empty(input.shape if input_grad else (0,))
    grad_target = target.new_empty(input.shape) if target_grad else input.new_empty((0,))
    return grad_input, grad_target


# by loss name (_options.BinaryOptions.loss): each forward op's rule, and its backward op
ELEMENTWISE = {name: _rule(getattr(_ops, f"{name}_forward"), composite,
                           backward=getattr(_ops, f"{name}_backward"))
               for name, composite in (
                   ("binary_cross_entropy_with_logits",
                    _composite.binary_cross_entropy_with_logits),
                   ("sigmoid_focal_loss", _composite.sigmoid_focal_loss),
                   ("binary_cross_entropy", _composite.binary_cross_entropy))}


def _elementwise_backward(rule, ctx, grad_loss):
    sig, s = rule.signature, _named.saved(ctx)
    _no_parameter_grads(rule, ctx)
    need_x, need_t = sig.needs(ctx, "input"), sig.needs(ctx, "target")
    if not (need_x or need_t):
        return sig.grads()
    tensors = {n: s[n] for n in rule.inputs}
    if torch.is_grad_enabled():  # create_graph=True (above)
        wrt = [n for n, need in (("input", need_x), ("target", need_t)) if need]
        args = dict(tensors, out_dtype=ctx.out_dtype, **ctx.options)
        return sig.grads(**differentiable_grads(rule, args, grad_loss, wrt))
    gx, gt = rule.backward(grad_loss, **tensors, **ctx.options, input_grad=need_x,
                                        target_grad=need_t)
    return sig.grads(input=gx if need_x else None, target=gt if need_t else None)


# ---------------------------------------------------------------- registration

def setup_of(rule: Rule):
    return _ce_setup if rule in (CROSS_ENTROPY, CROSS_ENTROPY_PROB, CROSS_ENTROPY_OVERLAP) \
        else _setup


def backward_of(rule: Rule):
    if rule is CROSS_ENTROPY_OVERLAP:
        return _overlap_backward
    return _ce_backward if rule in (CROSS_ENTROPY, CROSS_ENTROPY_PROB) else _elementwise_backward


RULES = {rule.forward: rule for rule in (CROSS_ENTROPY, CROSS_ENTROPY_PROB, CROSS_ENTROPY_OVERLAP,
                                         *ELEMENTWISE.values())}

for _rule_ in RULES.values():
    torch.library.register_autograd(
        _rule_.forward.default._schema.name,
        lambda ctx, *grads, rule=_rule_: backward_of(rule)(rule, ctx, *grads),
        setup_context=lambda ctx, inputs, output, rule=_rule_: setup_of(rule)(
            rule, ctx, inputs, output))


# ---------------------------------------------------------------- second derivatives

# The backward ops compute first-order gradients only: a backward with create_graph=True goes
# through differentiable_grads instead (above). Called directly and differentiated, they raise.
def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "weighted_loss: the fused backward ops are first-order; differentiate the losses "
        "(a backward with create_graph=True builds a differentiable gradient)")


for _op in ("cross_entropy_backward", "cross_entropy_prob_backward",
            "cross_entropy_overlap_backward",
            "cross_entropy_prob_target_backward", "cross_entropy_shard_backward",
            *(f"{name}_backward" for name in ELEMENTWISE)):
    torch.library.register_autograd(f"weighted_loss::{_op}", _no_double_backward)
