"""Fused linear + cross-entropy that never holds the logits: the loss of
``F.cross_entropy(F.linear(input, linear_weight, bias), target, ...)`` over row chunks. The entry
point: the arguments checked, an FSDP2-sharded head read whole (_dtensor), the dtypes and the
chunk planned; the chunks themselves are weighted_loss/_linear_chunks.py's. PyTorch's own API
(``F.linear_cross_entropy``'s keywords, ``nn.LinearCrossEntropyLoss``): linear_module.py.
"""
from typing import Optional

import torch
from torch import Tensor

from . import _dtensor, _dtypes, _grouped, _linear_chunks, _options, _reweight

__all__ = ["linear_cross_entropy"]

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
    ignore_index: Optional[int] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    *,
    linear_bias: Optional[Tensor] = None,
    options=None,
    process_group=None,
    total_weight=None,
    logit_adjustment: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, bias), target, weight=weight, ...)``
    without the ``(N, C)`` logits: computed over chunks of ``chunk_size`` rows (chosen from C and
    the dtype when None: 128 MiB of logits per chunk on the CPU, 256 MiB on a GPU).

    PyTorch's ``F.linear_cross_entropy`` call works as it is: ``linear_bias=`` (or ``bias``),
    ``ignore_index=None`` (-100 for class indices; any value beside probabilities raises, as
    PyTorch's), ``options=`` (a ``torch.nn.LinearCrossEntropyOptions``: its ``batch_chunk_size``
    is the chunk's rows where ``chunk_size`` is None; the rest tunes PyTorch's own chunking).

    ``input`` ``(N, H)``, ``(H,)`` or ``(B, T, H)`` (any leading dims); ``linear_weight``
    ``(C, H)``, or ``(C, d1, ..., dK, H)`` for PyTorch's K-dimensional loss (its logits
    ``(N, C, d1, ..., dK)`` are made, then the fused cross-entropy reads them: no chunking);
    ``bias`` ``(C,)`` (``(C, d1, ..., dK)``); ``target`` class indices of the leading shape, or
    class probabilities of the logits' shape (a target of that shape is probabilities, as in
    PyTorch); ``weight`` the ``(C,)`` class weight; ``z_loss`` and ``softcap`` as for
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
    if linear_bias is not None:
        if bias is not None:
            raise TypeError(f"{_OP}: got both bias and linear_bias (the same argument)")
        bias = linear_bias
    if options is not None:
        chunk_size = _options_chunk(options, chunk_size)
    if linear_weight.dim() > 2:
        return _through_logits(input, linear_weight, target, bias, weight, ignore_index,
                               reduction, label_smoothing, z_loss, softcap, logit_adjustment,
                               sample_weight, process_group, total_weight)
    classes = linear_weight.shape[0] if linear_weight.dim() == 2 else None
    prob = classes is not None and input.dim() >= 1 and \
        tuple(target.shape) == tuple(input.shape[:-1]) + (classes,)
    if prob and ignore_index is not None:
        raise RuntimeError(f"{_OP}: ignore_index cannot be specified when target contains "
                           "probabilities")
    if prob and not target.is_floating_point():
        raise RuntimeError(f"{_OP}: Expected floating point type for target with class "
                           f"probabilities, got {target.dtype}")
    if prob and target.requires_grad and torch.is_grad_enabled():
        # probabilities with a gradient of their own: through the logits (the fused
        # cross-entropy's target backward), which this call then holds
        return _through_logits(input, linear_weight, target, bias, weight, None, reduction,
                               label_smoothing, z_loss, softcap, logit_adjustment,
                               sample_weight, process_group, total_weight)
    ignore_index = -100 if ignore_index is None else ignore_index
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
    want = lead + (classes,) if prob else lead
    if tuple(target.shape) != want:
        # the exception F.cross_entropy raises on its logits: ValueError for another batch size,
        # RuntimeError for float class indices or probabilities of the wrong shape
        batch = bool(lead) and target.dim() > 0 and target.shape[0] != lead[0]
        exc = ValueError if target.dim() == 0 or batch else RuntimeError
        said = (f"Expected input batch_size ({lead[0]}) to match target batch_size "
                f"({target.shape[0]}). ") if batch else ""
        raise exc(f"{said}{_OP}: target must have shape {want} ("
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



def _options_chunk(options, chunk_size):
    """The chunk's rows a ``torch.nn.LinearCrossEntropyOptions`` asks for (its batch_chunk_size,
    where chunk_size is None); its accumulation settings tune PyTorch's chunking alone."""
    cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if cls is not None and not isinstance(options, cls) and \
            type(options).__name__ != "LinearCrossEntropyOptions":
        raise TypeError(f"{_OP}: options must be a torch.nn.LinearCrossEntropyOptions or None, "
                        f"got {type(options).__name__}")
    rows = getattr(options, "batch_chunk_size", None)
    return chunk_size if chunk_size is not None or rows is None else int(rows)


def _through_logits(input, linear_weight, target, bias, weight, ignore_index, reduction,
                    label_smoothing, z_loss, softcap, logit_adjustment, sample_weight,
                    process_group, total_weight):
    """The logits made by one matmul, then the fused cross-entropy over them: PyTorch's
    K-dimensional form (linear_weight (C, d1, ..., dK, H), logits (N, C, d1, ..., dK)), and
    probability targets that require a gradient."""
    def cross_entropy(logits, t, w, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                      z_loss=0.0, softcap=None, logit_adjustment=None, sample_weight=None,
                      process_group=None, total_weight=None):  # wl.cross_entropy's, no DTensor
        o = _options.cross_entropy(w, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                   process_group=process_group, total_weight=total_weight,
                                   logit_adjustment=logit_adjustment, sample_weight=sample_weight)
        return _grouped.cross_entropy(logits, t, o)
    C, out = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    H = linear_weight.shape[-1]
    if not out:  # (..., H) rows: (rows, C) logits, the result in the target's leading shape
        lead = tuple(input.shape[:-1])
        logits = torch.nn.functional.linear(input.reshape(-1, H), linear_weight, bias)
        v = None if sample_weight is None else sample_weight.reshape(-1)
        loss = cross_entropy(logits, target.reshape(-1, C), weight, reduction=reduction,
                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                             logit_adjustment=logit_adjustment, sample_weight=v,
                             process_group=process_group, total_weight=total_weight)
        return loss.reshape(lead) if reduction == "none" else loss
    if input.dim() != 2 or input.shape[-1] != H:
        raise RuntimeError(f"{_OP}: K-dimensional loss defined by linear_weight shape "
                           f"{tuple(linear_weight.shape)} requires batched input, "
                           f"(N, {H}), got {tuple(input.shape)}")
    if bias is not None and tuple(bias.shape) != (C, *out):
        raise RuntimeError(f"{_OP}: expected linear_bias shape {(C, *out)}, got "
                           f"{tuple(bias.shape)}")
    flat = linear_weight.reshape(-1, H)
    logits = torch.nn.functional.linear(input, flat, None if bias is None else bias.reshape(-1))
    logits = logits.reshape(input.shape[0], C, *out)
    prob = tuple(target.shape) == tuple(logits.shape)
    if prob and ignore_index is not None:
        raise RuntimeError(f"{_OP}: ignore_index cannot be specified when target contains "
                           "probabilities")
    return cross_entropy(logits, target, weight, ignore_index=-100 if ignore_index is None
                         else ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                         logit_adjustment=logit_adjustment, sample_weight=sample_weight,
                         process_group=process_group, total_weight=total_weight)
