"""transformers causal LMs trained with the fused linear cross-entropy, in one call:

    from weighted_loss.integrations.transformers import fuse_linear_cross_entropy
    model = fuse_linear_cross_entropy(AutoModelForCausalLM.from_config(cfg), weight=class_w)

Any causal LM whose output embedding is a linear head (found with ``get_output_embeddings()``, no
list of architectures): in training with labels, the forward runs the model up to its head (the
head's slot passes the hidden states through), then ``wl.linear_cross_entropy`` over them
and the head's weight, so the ``(B, T, vocab)`` logits are never formed. What the model's own
loss honours is honoured: the label shift (or ``shift_labels=``), ``ignore_index=-100``,
``num_items_in_batch`` (Trainer's: the loss is the sum over it), ``final_logit_softcapping``
(read as ``softcap=``, the config's value held off the hidden states meanwhile), ``logits_to_keep``
(the labels of the positions kept), and the float32 loss of 16-bit models. ``output.logits`` is
None then. In eval mode, without labels, or under ``torch.no_grad()`` the model's own forward runs
unchanged (generation, metrics on logits). Optionally class weights, label smoothing and z-loss.

With class weights, train under ``WeightedLossTrainer`` (weighted_loss/integrations/trainer.py),
whose ``num_items_in_batch`` is the step's summed label weight; ``CrossEntropyTrainerLoss`` is the
``compute_loss_func=`` for models whose logits are formed (classification, segmentation, LMs).
"""
import contextlib
import inspect
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..linear import linear_cross_entropy
from . import trainer as _trainer
from .trainer import CrossEntropyTrainerLoss

__all__ = ["fuse_linear_cross_entropy", "CrossEntropyTrainerLoss", "WeightedLossTrainer"]

_IGNORE = -100


def _slot_of(model, head):
    """(parent module, attribute name) that holds the head."""
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is head:
                return parent, name
    raise TypeError(f"fuse_linear_cross_entropy: the output embedding {type(head).__name__} is "
                    "not a submodule of the model")


@contextlib.contextmanager
def _head_passes_hidden_states(model, head, config):
    """For one call the head's slot holds a module that returns its input (the head itself is not
    called: no hooks of its own run, such as FSDP2's all-gather of its weight, which the loss
    reads as it is), and the config's logit softcapping is off."""
    parent, name = _slot_of(model, head)
    parent._modules[name] = torch.nn.Identity()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        config.final_logit_softcapping = None
    try:
        yield cap
    finally:
        parent._modules[name] = head
        if cap is not None:
            config.final_logit_softcapping = cap


def _loss(hidden: Tensor, head, labels, shift_labels, num_items, cap, options) -> Tensor:
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=_IGNORE)[..., 1:]
    if hidden.shape[-2] != shift_labels.shape[-1]:  # logits_to_keep: the last positions' labels
        shift_labels = shift_labels[..., shift_labels.shape[-1] - hidden.shape[-2]:]
    _trainer.check_denominator(num_items, options["weight"], "fuse_linear_cross_entropy")
    x = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1).to(x.device)
    reduction = "mean" if num_items is None else "sum"
    ctx = contextlib.nullcontext()
    if x.dtype in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(x.device.type):
        # the model's loss upcasts its logits: a float32 loss here too, from 16-bit matmuls
        ctx = torch.autocast(x.device.type, dtype=x.dtype)
    with ctx:
        loss = linear_cross_entropy(x, head.weight, y, getattr(head, "bias", None),
                                    ignore_index=_IGNORE, reduction=reduction, softcap=cap,
                                    **options)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss


def fuse_linear_cross_entropy(model, weight: Optional[Tensor] = None, label_smoothing: float = 0.0,
                              z_loss: float = 0.0, chunk_size: Optional[int] = None):
    """Makes ``model`` (a transformers causal LM) compute its training loss with
    :func:`weighted_loss.linear_cross_entropy`; returns the model, patched in place (again: the
    options replaced). ``weight``: a ``(vocab,)`` class weight (the mean then divides by the sum
    of the weights of the labels kept, or by ``num_items_in_batch`` when the Trainer gives it, as
    the model's own loss does); ``label_smoothing``, ``z_loss``, ``chunk_size`` as for
    ``linear_cross_entropy``."""
    head = model.get_output_embeddings()
    if not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise TypeError(f"fuse_linear_cross_entropy: the model's output embedding must be a linear "
                        f"head with a (vocab, hidden) weight, got {type(head).__name__}")
    original = getattr(model, "_wl_original_forward", None) or model.forward
    options = {"weight": weight, "label_smoothing": float(label_smoothing),
               "z_loss": float(z_loss), "chunk_size": chunk_size}

    def forward(self, *args, **kwargs):  # self's original forward: a deepcopy runs its own
        labels, shift = kwargs.get("labels"), kwargs.get("shift_labels")
        if not (self.training and torch.is_grad_enabled()) or (labels is None and shift is None):
            return self._wl_original_forward(*args, **kwargs)
        kwargs.pop("labels", None)
        kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        head = self.get_output_embeddings()
        with _head_passes_hidden_states(self, head, self.config) as cap:
            out = self._wl_original_forward(*args, **kwargs)
        loss = _loss(out.logits, head, labels, shift, num_items, cap, options)
        out.loss, out.logits = loss, None
        return out

    # the model's own signature: Trainer keeps the dataset columns it names
    forward.__signature__ = inspect.signature(getattr(original, "__func__", original))
    model._wl_original_forward = original
    model.forward = types.MethodType(forward, model)
    model._wl_step_denominator = _StepDenominator(weight)  # WeightedLossTrainer's
    return model


class _StepDenominator:
    """The fused model's mean divides by the summed weight of the shifted labels of a step."""

    def __init__(self, weight):
        self.weight = weight

    def step_denominator(self, batches) -> Tensor:
        return _trainer.step_denominator(batches, self.weight, shift=True)


def __getattr__(name):
    if name == "WeightedLossTrainer":
        return _trainer.WeightedLossTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
