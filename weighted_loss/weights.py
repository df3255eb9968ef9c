"""Class weights from data: what to pass as `weight=` (cross-entropy) or `pos_weight=` (BCE).

    w = wl.class_weights([2741, 37919, 22858, 31235, 5499], "max_ratio")   # counts, any dtype
    w = wl.class_weights(labels=train_labels, method="effective_number", num_classes=5)
                                                                 # labels (keyword only): counted
    pw = wl.pos_weight(targets)                                  # (N,) -> (1,), (N, K) -> (K,)
    counts = wl.count_labels(train_loader, num_classes=19, ignore_index=255)
    sampler = wl.sampler(labels, "inverse")                      # oversample instead of weighting

Zero counts. A class with no samples gets weight 0 and a `UserWarning` that names it: its weight
never multiplies anything during training (no target has that class), and 0 keeps inf and NaN out
of the weights. A column of binary targets with no positives gets pos_weight 0 the same way (there
is no positive term to weight); a column with no negatives gets #neg/#pos = 0, with a warning,
since that removes its positive term.
"""
import math
import numbers
import sys
import warnings
from collections.abc import Sequence

import torch

METHODS = ("inverse", "max_ratio", "balanced", "median", "effective_number")


def _as_tensor(v, name):
    """A tensor from a tensor, numpy array or sequence of numbers; a clear error otherwise."""
    if isinstance(v, torch.Tensor):
        return v.detach()
    if type(v).__module__ == "numpy" and hasattr(v, "dtype"):
        return torch.as_tensor(v)
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) and \
            all(isinstance(u, numbers.Real) for u in v):
        return torch.tensor([float(u) for u in v], dtype=torch.float64)
    raise TypeError(f"{name}: expected a tensor, numpy array or sequence of numbers, got "
                    f"{type(v).__name__}")


_WHICH = ("pass the per-class counts positionally, class_weights([2741, 37919, ...]), or the "
          "labels to count by keyword, class_weights(labels=train_labels, num_classes=C)")


def _counts_of(counts, labels, num_classes, ignore_index):
    """Class counts as a float64 tensor, from exactly one of counts (used as given, whatever the
    dtype) and labels (counted). Nothing is guessed from a dtype."""
    if (counts is None) == (labels is None):
        both = "both counts and labels were given" if counts is not None else \
            "neither counts nor labels was given"
        raise ValueError(f"class_weights: {both}; {_WHICH}")
    if labels is not None:
        y = _as_tensor(labels, "labels")
        if y.is_floating_point() and not torch.equal(y, y.round()) or y.dtype == torch.bool:
            raise TypeError(f"labels: expected integer class indices, got {y.dtype} values such as "
                            f"{y.reshape(-1)[0].item()}; for per-class counts pass them positionally")
        return count_labels_tensor(y.long(), num_classes, ignore_index).double()
    if ignore_index is not None:
        raise ValueError(f"class_weights: ignore_index={ignore_index} applies to labels= (a label "
                         "equal to it is not counted), not to counts")
    n = _as_tensor(counts, "counts").double()
    if n.dim() != 1 or n.numel() == 0:
        raise ValueError(f"counts: expected a non-empty 1-D sequence of per-class counts, got shape "
                         f"{tuple(n.shape)}" + ("; for labels pass labels=" if n.dim() > 1 else ""))
    bad = (~torch.isfinite(n)) | (n < 0)
    if bad.any():
        k = int(bad.nonzero()[0])
        raise ValueError(f"counts: must be finite and >= 0, got {n[k].item()} for class {k}")
    if num_classes is not None and num_classes != n.numel():
        raise ValueError(f"num_classes={num_classes} does not match the {n.numel()} counts given")
    return n


def count_labels_tensor(labels, num_classes=None, ignore_index=None):
    """Counts of each class in an integer tensor of labels (any shape), as int64 (C,), with
    labels equal to ignore_index left out. C is num_classes, else the largest label + 1."""
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    y = labels.reshape(-1).long()
    if ignore_index is not None:
        y = y[y != ignore_index]
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            hint = "" if ignore_index is not None else " (pass ignore_index= to leave it out)"
            raise ValueError(f"labels: label {lo} is negative{hint}")
        if num_classes is not None and hi >= num_classes:
            hint = "" if ignore_index is not None else " (pass ignore_index= to leave it out)"
            raise ValueError(f"labels: label {hi} is out of range for num_classes={num_classes}{hint}")
    elif num_classes is None:
        raise ValueError("labels: no labels to count (after ignore_index) and no num_classes")
    return torch.bincount(y, minlength=num_classes or 0)


def _zero_rule(weights, zero, message, stacklevel=3):
    """Weight 0 where `zero`, with a warning: message.format(the indices)."""
    if zero.any():
        warnings.warn(message.format(zero.nonzero().flatten().tolist()), UserWarning,
                      stacklevel=stacklevel)
        weights = torch.where(zero, torch.zeros_like(weights), weights)
    return weights


_NO_SAMPLES = ("class_weights: classes {} have a count of 0; their weight is 0 (no target has "
               "them, so it is never used)")
_NO_POSITIVES = ("pos_weight: columns {} have no positives; their pos_weight is 0 (there is no "
                 "positive term to weight)")


def class_weights(counts=None, method="inverse", *, labels=None, num_classes=None,
                  ignore_index=None, beta=0.999):
    """Per-class weights, a float32 (C,) tensor ready to pass as `weight=`.

    Give exactly one of:
      counts   per-class counts, positionally: a tensor of any dtype, a numpy array or a
               sequence, used as given (`class_weights(torch.tensor([2741, 37919]), "max_ratio")`
               reads 2741 and 37919 as counts, whatever the dtype)
      labels=  class indices to count (a tensor of any shape, an array or a sequence of ints),
               keyword only: `num_classes` sets C (else the largest label + 1), labels equal to
               `ignore_index` are left out
    method, with n the class counts and N their sum:
      "inverse"           1 / n
      "max_ratio"         max(n) / n                (the most frequent class gets 1)
      "balanced"          N / (C n)                 (scikit-learn's "balanced")
      "median"            median(n) / n             (median-frequency balancing, segmentation)
      "effective_number"  (1 - beta) / (1 - beta^n), scaled to sum to the number of classes that
                          occur (Cui et al., CVPR 2019); beta in [0, 1)
    Classes with a count of 0 get weight 0 and a warning naming them; max and median are taken
    over the classes that occur. The result is on the input's device (CPU for sequences); cast it
    to the logits' dtype for bfloat16/float16 logits, as PyTorch requires.
    """
    if isinstance(counts, str) and counts in METHODS:
        raise TypeError(f"class_weights: {counts!r} was given as the counts; {_WHICH}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (isinstance(beta, numbers.Real) and 0 <= beta < 1):
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    given = counts if counts is not None else labels
    device = given.device if isinstance(given, torch.Tensor) else None
    n = _counts_of(counts, labels, num_classes, ignore_index).cpu()
    zero = n == 0
    if zero.all():
        raise ValueError("class_weights: every class has a count of 0")
    present = n[~zero]
    safe = torch.where(zero, torch.ones_like(n), n)
    C = n.numel()
    if method == "inverse":
        w = 1.0 / safe
    elif method == "max_ratio":
        w = present.max() / safe
    elif method == "balanced":
        w = n.sum() / (C * safe)
    elif method == "median":
        w = _median(present) / safe
    else:  # effective number of samples
        w = (1.0 - beta) / (-torch.expm1(safe * math.log(beta))) if beta > 0 else torch.ones_like(n)
        w = _zero_rule(w, zero, _NO_SAMPLES)
        return (w * (present.numel() / w.sum())).float().to(device or "cpu")
    return _zero_rule(w, zero, _NO_SAMPLES).float().to(device or "cpu")


def _median(v):
    """The median (the mean of the two middle values for an even count), as numpy's."""
    s = v.sort().values
    k = s.numel()
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2


def pos_weight(targets):
    """#negatives / #positives per column of 0/1 (or boolean) targets, float32, for
    `BCEWithLogitsLoss(pos_weight=...)`: (N,) gives (1,), (N, K) gives (K,), and (N, K, d...) gives
    (K,) counted over N and d. Columns with no positives get 0 (with a warning naming them)."""
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    if targets.dim() == 0 or targets.numel() == 0:
        raise ValueError(f"pos_weight: targets must be (N,) or (N, K, ...) with N > 0, got shape "
                         f"{tuple(targets.shape)}")
    t = targets.detach()
    if t.dtype != torch.bool:
        bad = (t != 0) & (t != 1)
        if bad.any():
            raise ValueError(f"pos_weight: targets must be 0/1 (or boolean), got "
                             f"{t[bad].reshape(-1)[0].item()}")
    t = t.to(torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    dims = [d for d in range(t.dim()) if d != 1]
    return _pos_weight(t.sum(dims), t[:, :1].numel()).to(targets.device)


def _pos_weight(pos, total):
    """#neg/#pos per column from positive counts and the count per column, float32, with the
    zero rules of the module's docstring."""
    neg = total - pos
    no_pos = pos == 0
    w = neg / torch.where(no_pos, torch.ones_like(pos), pos)
    w = _zero_rule(w, no_pos, _NO_POSITIVES, stacklevel=4)
    no_neg = (neg == 0) & ~no_pos
    if no_neg.any():
        warnings.warn(f"pos_weight: columns {no_neg.nonzero().flatten().tolist()} have no "
                      "negatives: #neg/#pos = 0 removes their positive term", UserWarning,
                      stacklevel=3)
    return w.float()


# ------------------------------------------------------------------------- datasets, samplers

def _labels_of(batch):
    """The y of an (x, y) sample or batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        _, labels, *_ = batch
        return labels
    if isinstance(batch, dict) and "label" in batch:
        return batch["label"]
    raise TypeError(f"expected (x, y) pairs (or dicts with 'label'), got {type(batch).__name__}")


def _iterate(data, progress, desc):
    """Iterates a Dataset (by index) or a DataLoader / iterable, with a progress bar."""
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(
            data, torch.utils.data.DataLoader):
        items = (data[i] for i in range(len(data)))
    else:
        items = iter(data)
    total = len(data) if hasattr(data, "__len__") else None
    if not progress:
        yield from items
        return
    try:
        from rich.progress import track
        yield from track(items, total=total, description=desc, transient=True)
        return
    except ImportError:
        pass
    for k, item in enumerate(items, 1):
        if k == 1 or k % 100 == 0 or k == total:
            print(f"\r{desc} {k}/{total if total is not None else '?'}", end="", file=sys.stderr,
                  flush=True)
        yield item
    print(file=sys.stderr)


def count_labels(data, num_classes=None, ignore_index=None, progress=True):
    """Class counts over a Dataset or DataLoader of (x, y) in one pass: int64 (C,). y may be a
    class index (int or 0-d tensor) or a tensor of them (a batch, a segmentation mask)."""
    counts = None
    for batch in _iterate(data, progress, "counting labels"):
        y = _labels_of(batch)
        y = torch.as_tensor(y).reshape(-1)
        if ignore_index is not None:
            y = y[y != ignore_index]
        if y.numel() == 0:
            continue
        c = count_labels_tensor(y)
        if counts is None:
            counts = c
        else:
            if c.numel() > counts.numel():
                counts = torch.nn.functional.pad(counts, (0, c.numel() - counts.numel()))
            counts[: c.numel()] += c
    if counts is None:
        if num_classes is None:
            raise ValueError("count_labels: the data holds no labels and num_classes is not given")
        return torch.zeros(num_classes, dtype=torch.long)
    if num_classes is not None:
        if counts.numel() > num_classes:
            raise ValueError(f"count_labels: label {counts.numel() - 1} is out of range for "
                             f"num_classes={num_classes}")
        counts = torch.nn.functional.pad(counts, (0, num_classes - counts.numel()))
    return counts


def count_positives(data, progress=True):
    """(positives, total) per column over a Dataset or DataLoader of (x, y) with 0/1 targets y of
    shape (K,) per sample (or (B, K) per batch): what pos_weight() needs, in one pass."""
    pos, total = None, 0
    for batch in _iterate(data, progress, "counting positives"):
        y = torch.as_tensor(_labels_of(batch))
        y = y.reshape(1, -1) if y.dim() <= 1 else y.reshape(y.shape[0], -1)
        if y.dtype != torch.bool and ((y != 0) & (y != 1)).any():
            raise ValueError("count_positives: targets must be 0/1 (or boolean)")
        p = y.to(torch.float64).sum(0)
        pos = p if pos is None else pos + p
        total += y.shape[0]
    if pos is None:
        raise ValueError("count_positives: the data holds no targets")
    return pos, total


def pos_weight_from_counts(positives, total):
    """#neg/#pos per column from count_positives()'s result, with pos_weight()'s zero rules."""
    return _pos_weight(torch.as_tensor(positives, dtype=torch.float64), total)


def sampler(labels, method="inverse", num_classes=None, num_samples=None, beta=0.999,
            generator=None):
    """A WeightedRandomSampler that draws each sample with probability proportional to its
    class's weight (class_weights(labels=labels, method=method)): rare classes are oversampled instead of
    weighted in the loss. labels: the dataset's per-sample class indices, in dataset order.
    Draws len(labels) samples per epoch with replacement unless num_samples says otherwise."""
    y = torch.as_tensor(labels)
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"sampler: labels must be a 1-D integer sequence, got shape "
                         f"{tuple(y.shape)} of {y.dtype}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class with no samples is never drawn either way
        w = class_weights(labels=y.cpu(), method=method, num_classes=num_classes, beta=beta)
    per_sample = w[y.cpu().long()].double()
    return torch.utils.data.WeightedRandomSampler(
        per_sample, num_samples if num_samples is not None else len(y), replacement=True,
        generator=generator)


def class_weights_from(data, method="inverse", num_classes=None, beta=0.999, ignore_index=None,
                       progress=True):
    """class_weights() from a Dataset or DataLoader of (x, y), counted in one pass."""
    counts = count_labels(data, num_classes, ignore_index, progress)
    return class_weights(counts, method, beta=beta)


__all__ = ["class_weights", "pos_weight", "count_labels", "count_positives",
           "pos_weight_from_counts", "class_weights_from", "sampler", "METHODS"]
