"""Drop-in functional losses: same signatures and results as torch.nn.functional. The entry
points: legacy arguments, the options checked once (_options), the dispatch to the DTensor path
(_dtensor) or to the process-group and single-device ones (_grouped, _local)."""
from typing import Optional

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from . import _dtensor, _dtypes, _grouped, _options, _script

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits", "binary_cross_entropy"]


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    process_group=None,
    total_weight=None,
    logit_adjustment: Optional[Tensor] = None,
    sample_weight: Optional[Tensor] = None,
) -> Tensor:
    """Fused ``F.cross_entropy``: log-softmax, class-weight gather and (weighted) reduction in one
    pass over the logits forward and one backward. Same arguments, results and corner cases.
    Under ``torch.autocast`` the loss is float32, as PyTorch's, but bfloat16/float16 logits are
    read in place rather than copied to float32; ``weight`` may have any floating dtype.

    ``input`` is ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)`` logits; ``target`` holds class
    indices (int64, int32 or uint8, shape without the class dim) or class probabilities (the
    input's shape). ``reduction="mean"`` divides by ``sum(weight[target])`` over non-ignored items
    for class indices and by the number of items for probabilities.

    ``z_loss``: adds ``z_loss * lse**2`` per row (PaLM's auxiliary loss, lse the row's
    log-sum-exp), weighted as the row's loss (``weight[target]``; 1 for probabilities) and so
    counted in the weighted mean with the same divisor. ``softcap``: the logits are read as
    ``softcap * tanh(logits / softcap)`` (Gemma's logit softcapping), in the same passes, with the
    gradient through it. The defaults leave both off and every result as without them.

    ``process_group`` (with ``reduction="mean"``): the weighted mean over the whole group's batch,
    the same on every rank, with a gradient that DDP's averaging turns into the gradient of the
    concatenated batch (``weighted_loss.distributed``). ``total_weight``: the denominator to use
    instead of this batch's (``wl.total_weight`` over a step's micro-batches).

    ``logit_adjustment``: a ``(C,)`` floating tensor added to every item's logits before the
    softmax (``wl.logit_adjustment(counts, tau)``: Menon et al.'s logit-adjusted loss, Balanced
    Softmax at ``tau=1``); the same as ``F.cross_entropy(input + logit_adjustment, ...)``, its
    gradient included where it requires grad. ``sample_weight``: one weight per item (the
    target's shape for class indices, the logits' without the class dim for probabilities;
    broadcast as PyTorch broadcasts), multiplying the item's loss; ``reduction="mean"`` divides by
    ``sum(sample_weight * weight[target])`` over the items not ignored (by ``sum(sample_weight)``
    for probabilities). See docs/api.md for the rules on ignored items and odd values.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    o = _options.cross_entropy(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                               process_group=process_group, total_weight=total_weight,
                               logit_adjustment=logit_adjustment, sample_weight=sample_weight)
    if _dtensor.any_dtensor(input, target, weight, logit_adjustment, sample_weight):
        return _dtensor.cross_entropy(input, target, o)
    return _grouped.cross_entropy(input, target, o)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
    *,
    process_group=None,
    total_weight=None,
) -> Tensor:
    """Fused ``F.binary_cross_entropy_with_logits``: the stable log-sigmoid, ``pos_weight``,
    ``weight`` and the reduction in one pass over the logits forward and one backward. Same
    arguments, results and corner cases.

    ``input`` has any shape (0-d included); ``target`` the same shape, probabilities in [0, 1].
    ``weight`` and ``pos_weight`` broadcast against ``input`` as in PyTorch (``(C,)`` on the last
    dim, ``(C, 1, 1)`` for ``(N, C, H, W)``, ``(N, 1)``, ...) and are read in place, not expanded.
    The result has the target's dtype, as PyTorch's does (float32 under ``torch.autocast``,
    with bfloat16/float16 logits read in place). ``process_group`` / ``total_weight``: the mean
    over the whole group's elements (or over ``total_weight`` elements), as for
    :func:`cross_entropy`.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    o = _options.binary(weight, pos_weight, reduction, process_group=process_group,
                        total_weight=total_weight)
    if _dtensor.any_dtensor(input, target, weight, pos_weight):
        return _dtensor.elementwise(input, target, o)
    return _grouped.elementwise(input, target, o)


_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16",
                torch.float16: "Half", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}

_BCE_AUTOCAST = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits"
    "\nor torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast.")


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average: Optional[bool] = None,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
    *,
    process_group=None,
    total_weight=None,
) -> Tensor:
    """Fused ``F.binary_cross_entropy`` (inputs are probabilities, after a sigmoid), with
    ``pos_weight`` as :func:`binary_cross_entropy_with_logits` has it: each element's loss
    ``-weight * (pos_weight * t * max(log p, -100) + (1 - t) * max(log(1 - p), -100))``, one pass
    forward and one backward. Without ``pos_weight`` it is PyTorch's: the same values and
    gradients (``(p - t) / max(p (1 - p), 1e-12)``), the log clamped at -100, a RuntimeError for
    an input outside [0, 1], ``target`` of the input's dtype and shape, ``weight`` broadcast to
    the input. ``pos_weight`` broadcasts as ``weight`` does (``(C,)`` on the last dim). Under
    CUDA autocast it raises as PyTorch does; under CPU autocast the loss is float32 (16-bit
    inputs read in place). ``process_group`` / ``total_weight``: as for
    :func:`binary_cross_entropy_with_logits`."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    if target.size() != input.size():
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input "
                         f"size ({input.size()}) is deprecated. Please ensure they have the same "
                         "size.")
    if weight is not None:  # PyTorch's broadcast check (torch 2.13's message) before the op's
        torch.broadcast_shapes(target.size(), weight.size())
    # PyTorch's CUDA autocast bans the op at dispatch, after the size checks and before any dtype
    # check; the op's own AutocastCUDA rule (csrc/autocast.cpp) says the same to direct callers
    if _dtypes.autocast_on(input) and input.device.type == "cuda":
        raise RuntimeError(_BCE_AUTOCAST)
    if target.dtype != input.dtype:
        if not (_dtypes.autocast_on(input) and input.is_floating_point() and
                target.is_floating_point()):
            name = lambda d: _DTYPE_NAMES.get(d, str(d))  # noqa: E731
            raise RuntimeError(f"Found dtype {name(target.dtype)} but expected "
                               f"{name(input.dtype)}")
        # PyTorch's CPU autocast runs it on float32 copies of both
        input, target = input.float(), target.float()
    if not input.is_floating_point():
        raise NotImplementedError(f'"binary_cross_entropy" not implemented for '
                                  f"'{_DTYPE_NAMES.get(input.dtype, input.dtype)}'")
    o = _options.binary(weight, pos_weight, reduction, process_group=process_group,
                        total_weight=total_weight, loss=_options.PROBABILITIES)
    if _dtensor.any_dtensor(input, target, weight, pos_weight):
        return _dtensor.elementwise(input, target, o)
    return _grouped.elementwise(input, target, o)


# torch.jit.script compiles PyTorch's own in their place (_script.py says why)
for _fn in (cross_entropy, binary_cross_entropy_with_logits, binary_cross_entropy):
    _script.scripts_as(_fn, _script.TORCH_FUNCTIONS[_fn.__name__])


# Every functional of the package, so that wl.functional holds them all as torch.nn.functional
# does (each is defined beside its feature: focal.py, linear.py, vocab_parallel.py).
from .focal import focal_loss, sigmoid_focal_loss  # noqa: E402
from .linear import linear_cross_entropy  # noqa: E402
from .vocab_parallel import vocab_parallel_cross_entropy  # noqa: E402

__all__ += ["focal_loss", "sigmoid_focal_loss", "linear_cross_entropy",
            "vocab_parallel_cross_entropy"]
