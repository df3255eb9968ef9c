"""Class-weighted losses under transformers' ``Trainer``, exact over gradient accumulation and
devices.

``Trainer`` divides each micro-batch's summed loss by ``num_items_in_batch``: the number of labels
that are not -100 over all the micro-batches of an optimizer step (and over every process with
``average_tokens_across_devices``, the loss then multiplied by the number of processes, which
DDP's gradient averaging undoes). Without class weights that is the exact mean of the step's
batch. With class weights the mean divides by the sum of the labels' weights instead, and a count
gives ``sum(w l) / N``: a step whose labels are rare classes moves the model more than its weight
says, and gradient accumulation no longer equals one large batch.

:class:`WeightedLossTrainer` is ``Trainer`` with that denominator: the sum of ``weight[label]``
over the step's micro-batches (gathered over the processes as Trainer gathers its count), in
float64, passed as ``num_items_in_batch`` to :class:`CrossEntropyTrainerLoss` (``compute_loss_func=``)
or to a model fused with class weights (``fuse_linear_cross_entropy(model, weight=...)``). Either
refuses a weighted loss over an unweighted count (an integer or float32 ``num_items_in_batch``: the
plain ``Trainer``'s) rather than return the biased mean.
"""
from typing import Optional

import torch
from torch import Tensor

from ..distributed import total_weight
from ..functional import cross_entropy

__all__ = ["CrossEntropyTrainerLoss", "WeightedLossTrainer"]

_IGNORE = -100


def _labels_for_count(batch, shift: bool):
    """The labels a step's loss reads, as Trainer counts them: ``shift_labels`` when the collator
    gives them, else ``labels[..., 1:]`` for a causal LM's shifted loss, else ``labels``."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return batch["labels"][..., 1:] if shift else batch["labels"]


def step_denominator(batches, weight: Optional[Tensor], shift: bool) -> Tensor:
    """sum of ``weight[label]`` (the count without ``weight``) over the labels that are not -100
    in every batch of a step: float64, on the labels' device."""
    return total_weight([_labels_for_count(b, shift) for b in batches], weight, _IGNORE)


def check_denominator(num_items, weight: Optional[Tensor], who: str) -> None:
    """With class weights, a denominator must be a weighted one: float64 (WeightedLossTrainer's,
    wl.total_weight's), not Trainer's count of labels."""
    if weight is None or num_items is None:
        return
    if not (isinstance(num_items, Tensor) and num_items.dtype == torch.float64):
        kind = type(num_items).__name__ if not isinstance(num_items, Tensor) else num_items.dtype
        raise ValueError(
            f"{who}: with class weights, num_items_in_batch must be the step's summed label weight "
            f"(a float64 tensor, as WeightedLossTrainer or wl.total_weight give), got {kind}: the "
            "plain Trainer's count of labels would make the mean sum(w l) / N. Train with "
            "weighted_loss.integrations.transformers.WeightedLossTrainer")


class CrossEntropyTrainerLoss:
    """``compute_loss_func=`` for ``Trainer``: the weighted cross-entropy of ``outputs.logits``
    and the labels, divided by ``num_items_in_batch`` when Trainer gives it (the whole step's
    denominator; :class:`WeightedLossTrainer`'s summed label weight with ``weight``), else the
    batch's weighted mean.

    ``weight``: ``(C,)`` class weights; ``shift_labels=True`` for a causal LM (logits at position
    t predict label t + 1, the last position none); ``label_smoothing``, ``z_loss`` as for
    :func:`weighted_loss.cross_entropy`. Logits ``(..., C)`` with labels ``(...)`` (sequence and
    token classification, language models) or ``(N, C, d...)`` with labels ``(N, d...)``
    (segmentation); labels -100 are ignored."""

    def __init__(self, weight: Optional[Tensor] = None, *, shift_labels: bool = False,
                 label_smoothing: float = 0.0, z_loss: float = 0.0):
        self.weight, self.shift_labels = weight, bool(shift_labels)
        self.label_smoothing, self.z_loss = float(label_smoothing), float(z_loss)

    def step_denominator(self, batches) -> Tensor:
        return step_denominator(batches, self.weight, self.shift_labels)

    def __call__(self, outputs, labels: Tensor, num_items_in_batch=None, **_) -> Tensor:
        if labels is None:
            raise ValueError("CrossEntropyTrainerLoss: the batch has no labels")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.shift_labels:
            labels = torch.nn.functional.pad(labels, (0, 1), value=_IGNORE)[..., 1:]
        labels = labels.to(logits.device)
        if logits.shape[:-1] == labels.shape:  # classes last: rows of (C,)
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        weight = None if self.weight is None else self.weight.to(logits.device)
        options = {"weight": weight, "ignore_index": _IGNORE,
                   "label_smoothing": self.label_smoothing, "z_loss": self.z_loss}
        if num_items_in_batch is None:
            return cross_entropy(logits, labels, **options)
        check_denominator(num_items_in_batch, self.weight, "CrossEntropyTrainerLoss")
        return cross_entropy(logits, labels, total_weight=num_items_in_batch, **options)


def _make_trainer_class():
    """WeightedLossTrainer, built on first use: importing this module does not import
    transformers."""
    from transformers import Trainer

    class WeightedLossTrainer(Trainer):
        """``transformers.Trainer`` whose ``num_items_in_batch`` is the step's summed label weight
        when the loss has class weights: ``compute_loss_func=CrossEntropyTrainerLoss(weight=w)``
        or a model from ``fuse_linear_cross_entropy(model, weight=w)``. The mean of every
        optimizer step is then the weighted mean of all its micro-batches on all processes
        (``average_tokens_across_devices=True``, Trainer's default), the same update as one
        large batch. Anything else is Trainer's own behaviour."""

        def _wl_denominator_source(self):
            if hasattr(self.compute_loss_func, "step_denominator"):
                return self.compute_loss_func
            if self.compute_loss_func is None:
                model = self.accelerator.unwrap_model(self.model)
                if hasattr(model, "_wl_step_denominator"):
                    return model._wl_step_denominator
            return None

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            source = self._wl_denominator_source()
            if source is None or count is None:
                return batches, count
            w = source.step_denominator(batches).to(device)
            if self.args.average_tokens_across_devices:
                if self.args.world_size > 1:
                    w = self.accelerator.gather(w.reshape(1)).sum()
            elif self.args.n_gpu > 1:  # nn.DataParallel: Trainer's approximation, as for its count
                w = w / self.args.n_gpu
            if self.args.n_gpu > 1 and w.dim() == 0:
                w = w.unsqueeze(0).expand(self.args.n_gpu, -1)
            # processes that share one batch (tensor / context / sequence parallel), as Trainer
            replicas = 1
            for name in ("get_tp_size", "get_cp_size", "get_sp_size"):
                replicas *= getattr(self, name, lambda: 1)()
            return batches, w / replicas

    WeightedLossTrainer.__module__ = __name__
    return WeightedLossTrainer


def __getattr__(name):
    if name == "WeightedLossTrainer":
        cls = _make_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
