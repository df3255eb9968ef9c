"""Fused linear + cross-entropy that never holds the logits: the loss of
``F.cross_entropy(F.linear(input, linear_weight, bias), target, ...)`` over row chunks. The entry
point: the arguments checked, an FSDP2-sharded head read whole (_dtensor), the dtypes and the
chunk planned; the chunks themselves are weighted_loss/_linear_chunks.py's.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _dtensor, _dtypes, _grouped, _linear_chunks, _options, _reweight

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]

_OP = "linear_cross_entropy"


def _compute_dtype(input: Tensor, linear_weight: Tensor, bias) -> torch.dtype:
    """The matmuls' dtype, as F.linear's: autocast's where autocast is on and no operand is
    float64 (which autocast leaves alone); otherwise the operands must share one dtype."""
    operands = [input, linear_weight] + ([] if bias is None else [bias])
    if _dtypes.autocast_on(input) and all(t.is_floating_point() and t.dtype != torch.float64
                                          for t in operands):
        return torch.get_autocast_dtype(input.device.type)
    for name, t in (("linear_weight", linear_weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{_OP}: {name} must have the input's dtype {input.dtype} (outside "
                            f"autocast, as F.linear), got {t.dtype}")
    return input.dtype


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    *,
    process_group=None,
    total_weight=None,
    logit_adjustment: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, bias), target, weight=weight, ...)``
    without the ``(N, C)`` logits: computed over chunks of ``chunk_size`` rows (chosen from C and
    the dtype when None: 128 MiB of logits per chunk on the CPU, 256 MiB on a GPU).

    ``input`` ``(N, H)`` or ``(B, T, H)`` (any leading dims); ``linear_weight`` ``(C, H)``;
    ``bias`` ``(C,)``; ``target`` class indices of the leading shape, or class probabilities
    ``(..., C)``; ``weight`` the ``(C,)`` class weight; ``z_loss`` and ``softcap`` as for
    :func:`weighted_loss.cross_entropy`. Gradients flow to ``input``, ``linear_weight`` and
    ``bias``, each in its own dtype. Under ``torch.autocast`` the matmuls run in autocast's dtype
    (as ``F.linear`` would) and the loss is float32; under ``torch.no_grad()`` or
    ``torch.inference_mode()`` only the loss is computed.

    ``process_group`` / ``total_weight`` (with ``reduction="mean"``), as for
    :func:`weighted_loss.cross_entropy`: the weighted mean over the whole group's rows (or over a
    given denominator, ``wl.total_weight`` of a step's micro-batches), with a gradient that DDP's
    or FSDP's averaging turns into the gradient of the concatenated batch.

    ``logit_adjustment`` (``(C,)``) is added to each chunk's logits as they are made (never to
    all of them at once), as ``F.cross_entropy(F.linear(...) + logit_adjustment, ...)``, with
    its gradient where it requires grad; ``sample_weight`` (the target's leading shape: a weight
    per token) multiplies each row's loss, the mean dividing by ``sum(sample_weight *
    weight[target])`` over the rows kept, as for :func:`weighted_loss.cross_entropy`; the chunks'
    gradients take it as their rows' upstream gradient, in the same single pass."""
    o = _options.cross_entropy(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                               process_group=process_group, total_weight=total_weight, op=_OP,
                               logit_adjustment=logit_adjustment, sample_weight=sample_weight)
    if _dtensor.any_dtensor(input, target, logit_adjustment, sample_weight):
        raise NotImplementedError(
            f"{_OP}: input and target as DTensors are not supported: pass their local tensors "
            "(with process_group= for the mean over the group)")
    # a head sharded by FSDP2 (fully_shard) read whole; a DTensor class weight, whole
    linear_weight = _dtensor.gathered_weight(linear_weight, _OP)
    bias, weight = _dtensor.gathered_weight(bias, _OP), _dtensor.whole(weight)
    o = o.but(weight=weight)
    if input.dim() < 1:
        raise ValueError(f"{_OP}: input must be (..., H), got a 0-d tensor")
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{_OP}: linear_weight must be (C, {input.shape[-1]}) for input of shape "
                         f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}")
    classes, lead = linear_weight.shape[0], tuple(input.shape[:-1])
    if bias is not None and bias.shape != (classes,):
        raise ValueError(f"{_OP}: bias must be ({classes},), got {tuple(bias.shape)}")
    compute = _compute_dtype(input, linear_weight, bias)
    prob = target.is_floating_point()
    want = lead + (classes,) if prob else lead
    if tuple(target.shape) != want:
        # the exception F.cross_entropy raises on its logits: ValueError for another batch size,
        # RuntimeError for float class indices or probabilities of the wrong shape
        exc = ValueError if target.dim() == 0 or (lead and target.shape[0] != lead[0]) \
            else RuntimeError
        raise exc(f"{_OP}: target must have shape {want} ("
                  f"{'class probabilities' if prob else 'class indices'}) for input of shape "
                  f"{tuple(input.shape)}, got {tuple(target.shape)}")
    if not 0.0 <= o.label_smoothing <= 1.0:  # also with no rows to compute
        raise RuntimeError(f"{_OP}: label_smoothing must be between 0.0 and 1.0. Got: "
                           f"{label_smoothing}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{_OP}: chunk_size must be a positive int, got {chunk_size!r}")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{_OP}: the derivative for 'weight' is not implemented (as in PyTorch)")
    a = logit_adjustment
    if a is not None and (a.shape != (classes,) or a.device != input.device):
        raise ValueError(f"{_OP}: logit_adjustment must be ({classes},) on {input.device}, got "
                         f"{tuple(a.shape)} on {a.device}")
    v = _reweight.check_sample_weight(sample_weight, lead, input.device, _OP)
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1, classes) if prob else target.reshape(-1)
    if v is not None:
        v = v.reshape(-1) if prob else _reweight.kept(v, target, o.ignore_index).reshape(-1)
        o = o.but(sample_weight=v)
    logits = compute
    if a is not None:  # the chunk's logits + a in PyTorch's promoted dtype
        logits = torch.promote_types(logits, a.dtype)
    if prob:
        if o.ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        # F.cross_entropy promotes the logits with the targets (16-bit logits read in place)
        logits, target_dtype = _dtypes.floating_dtypes(logits, t.dtype)
        t = t.to(target_dtype)
    if _dtypes.autocast_on(input) and compute in (torch.bfloat16, torch.float16):
        out = torch.float32  # PyTorch's float32 policy for its losses
    else:
        out = t.dtype if prob else logits
    chunk = chunk_size or _linear_chunks.chunk_rows(x.shape[0], classes, logits, x.device)
    plan = _linear_chunks.Plan(compute, logits, out, chunk, torch.is_grad_enabled(), o.grouped)
    if a is not None:
        plan.adjust = a if a.dtype == logits else a.to(logits)
    loss = _linear_chunks.linear_cross_entropy(x, linear_weight, bias, t, *_grouped.mean(o), plan)
    return loss.view(lead) if o.reduction == "none" else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """:func:`linear_cross_entropy` as a module: ``forward(input, linear_weight, target,
    bias=None)`` with the class weight and the options of :class:`torch.nn.CrossEntropyLoss`
    given at construction (``weight`` and ``logit_adjustment`` buffers, as ``weight`` is there);
    ``process_group=`` and ``forward(..., total_weight=, sample_weight=)`` as for
    :class:`weighted_loss.CrossEntropyLoss`."""

    def __init__(self, weight: Optional[Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None, *,
                 process_group=None, logit_adjustment: Optional[Tensor] = None):
        super().__init__()
        self.process_group = process_group
        _options.row_terms(z_loss, softcap)
        self.register_buffer("weight", weight)
        self.register_buffer("logit_adjustment", logit_adjustment)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size
        self.z_loss, self.softcap = z_loss, softcap

    def forward(self, input: Tensor, linear_weight: Tensor, target: Tensor,
                bias: Optional[Tensor] = None, total_weight=None, sample_weight=None) -> Tensor:
        return linear_cross_entropy(input, linear_weight, target, bias, self.weight,
                                    self.ignore_index, self.reduction, self.label_smoothing,
                                    self.z_loss, self.softcap, self.chunk_size,
                                    process_group=self.process_group, total_weight=total_weight,
                                    logit_adjustment=self.logit_adjustment,
                                    sample_weight=sample_weight)
