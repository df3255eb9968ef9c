"""The table of the library's losses that the cross-cutting checks run on (tests/test_modes.py:
gradcheck, forward-mode AD, double backward, parity with PyTorch in float64, opcheck of every op a
loss calls, torch.compile), as PyTorch's OpInfo database does: a new loss gets every mode by
adding its rows here.

A row names a loss and one way of calling it; ``sample(device, dtype, n)`` gives the call, its
PyTorch reference (the same loss by PyTorch's ops) and the tensors that carry gradients, with a
batch of ``n`` items. Flags say which modes the loss supports (those it does not raise: a test in
test_modes checks that too).
"""
import dataclasses
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

import weighted_loss as wl
from references import (cross_entropy_terms, focal_reference, overlap_reference, reweighted,
                        sigmoid_focal_composite)

D = torch.float64


@dataclasses.dataclass(frozen=True)
class Sample:
    call: Callable  # call(*tensors) -> the loss
    reference: Optional[Callable]  # reference(*tensors) -> the same loss by PyTorch's ops
    tensors: Tuple[torch.Tensor, ...]  # the tensors that carry gradients, in call's order


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    sample: Callable[..., Sample]  # sample(device, dtype, n=6)
    forward_ad: bool = True  # torch.func.jvp / forward_ad: tangents flow
    double_backward: bool = True  # create_graph=True gives a differentiable gradient
    compile: bool = False  # one of the rows that torch.compile(fullgraph=True) runs
    # the devices whose kernels the loss has (conftest leaves the others uncollected)
    devices: Tuple[str, ...] = ("cpu", "emulated", "cuda")

    def __str__(self):
        return self.name


def _data(device, dtype, n, seed=0):
    """The inputs the rows share: logits (n, 5) and (2, 5, 3, 4), class indices (one ignored:
    index 2), a class weight, probabilities, binary targets, pos_weight, a logit adjustment and
    per-item weights; float64 drawn, then cast."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.rand(shape, generator=g, dtype=D) * scale + shift).to(device, dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=D) * scale).to(device, dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    y[1] = 2
    yv = torch.randint(0, 5, (2, 3, 7), generator=g)  # a volume's labels, a few ignored (2)
    yv[0, 0, :3] = 2
    return dict(
        x=randn(n, 5, scale=2.0), xs=randn(2, 5, 3, 4, scale=2.0), x1=randn(5, scale=2.0),
        y=y.to(device), ys=torch.randint(0, 5, (2, 3, 4), generator=g).to(device),
        y1=torch.tensor(3, device=device), w=rand(5, shift=0.5),
        p=torch.softmax(torch.randn(n, 5, generator=g, dtype=D), 1).to(device, dtype),
        t=rand(n, 5), pw=rand(5, scale=3.0, shift=0.5), a=randn(5), v=rand(n, scale=2.0),
        prob=rand(n, 5, scale=0.9, shift=0.05),
        h=randn(n, 8), lw=randn(5, 8, scale=0.5), b=randn(5),
        xv=randn(2, 5, 3, 7, scale=2.0), yv=yv.to(device),
        pv=torch.softmax(torch.randn(2, 5, 3, 7, generator=g, dtype=D) * 2, 1).to(device, dtype))


def _row(name, make, **flags):
    def sample(device, dtype=D, n=6):
        return make(_data(device, dtype, n))
    return Row(name, sample, **flags)


REDUCTIONS = ("mean", "sum", "none")


def _cross_entropy_rows():
    rows = []
    for red in REDUCTIONS:
        kw = dict(ignore_index=2, label_smoothing=0.1, reduction=red)
        rows += [
            _row(f"cross_entropy-{red}", lambda d, kw=kw: Sample(
                lambda x: wl.cross_entropy(x, d["y"], d["w"], **kw),
                lambda x: F.cross_entropy(x, d["y"], d["w"], **kw), (d["x"],)),
                compile=red == "mean"),
            _row(f"cross_entropy-seg-{red}", lambda d, red=red: Sample(
                lambda x: wl.cross_entropy(x, d["ys"], d["w"], reduction=red),
                lambda x: F.cross_entropy(x, d["ys"], d["w"], reduction=red), (d["xs"],)),
                compile=red == "sum"),
            _row(f"cross_entropy-prob-{red}", lambda d, red=red: Sample(
                lambda x, p: wl.cross_entropy(x, p, d["w"], label_smoothing=0.2, reduction=red),
                lambda x, p: F.cross_entropy(x, p, d["w"], label_smoothing=0.2, reduction=red),
                (d["x"], d["p"])), compile=red == "none"),
        ]
    terms = dict(z_loss=0.01, softcap=3.0, label_smoothing=0.1)
    rows += [
        _row("cross_entropy-unbatched", lambda d: Sample(
            lambda x: wl.cross_entropy(x, d["y1"], d["w"]),
            lambda x: F.cross_entropy(x, d["y1"], d["w"]), (d["x1"],))),
        _row("cross_entropy-z_loss-softcap", lambda d: Sample(
            lambda x: wl.cross_entropy(x, d["y"], d["w"], ignore_index=2, **terms),
            lambda x: cross_entropy_terms(x, d["y"], d["w"], ignore_index=2, **terms),
            (d["x"],)), compile=True),
        _row("cross_entropy-prob-z_loss-softcap", lambda d: Sample(
            lambda x, p: wl.cross_entropy(x, p, d["w"], reduction="sum", **terms),
            lambda x, p: cross_entropy_terms(x, p, d["w"], reduction="sum", **terms),
            (d["x"], d["p"]))),
        _row("cross_entropy-adjustment-sample_weight", lambda d: Sample(
            lambda x, a, v: wl.cross_entropy(x, d["y"], d["w"], ignore_index=2,
                                             label_smoothing=0.1, logit_adjustment=a,
                                             sample_weight=v),
            lambda x, a, v: reweighted(F.cross_entropy)(x, d["y"], weight=d["w"], ignore_index=2,
                                                        label_smoothing=0.1, logit_adjustment=a,
                                                        sample_weight=v),
            (d["x"], d["a"], d["v"])), compile=True),
        _row("cross_entropy-prob-adjustment-sample_weight", lambda d: Sample(
            lambda x, p, a, v: wl.cross_entropy(x, p, d["w"], reduction="sum",
                                                logit_adjustment=a, sample_weight=v),
            lambda x, p, a, v: reweighted(F.cross_entropy)(x, p, weight=d["w"], reduction="sum",
                                                           logit_adjustment=a, sample_weight=v),
            (d["x"], d["p"], d["a"], d["v"]))),
        _row("CrossEntropyLoss-module", lambda d: Sample(
            lambda x: wl.CrossEntropyLoss(d["w"], label_smoothing=0.1)(x, d["y"]),
            lambda x: torch.nn.CrossEntropyLoss(d["w"], label_smoothing=0.1)(x, d["y"]),
            (d["x"],)), compile=True),
    ]
    return rows


def _focal_rows():
    rows = []
    for red in REDUCTIONS:
        kw = dict(ignore_index=2, label_smoothing=0.1, reduction=red)
        rows.append(_row(f"focal_loss-{red}", lambda d, kw=kw: Sample(
            lambda x: wl.focal_loss(x, d["y"], 2.0, d["w"], **kw),
            lambda x: focal_reference(x, d["y"], 2.0, d["w"], **kw), (d["x"],)),
            compile=red == "mean"))
    rows += [
        _row("focal_loss-plain-gamma-0.5", lambda d: Sample(
            lambda x: wl.focal_loss(x, d["ys"], 0.5, d["w"]),
            lambda x: focal_reference(x, d["ys"], 0.5, d["w"]), (d["xs"],))),
        _row("focal_loss-prob", lambda d: Sample(
            lambda x, p: wl.focal_loss(x, p, 2.0, d["w"], label_smoothing=0.05),
            lambda x, p: focal_reference(x, p, 2.0, d["w"], label_smoothing=0.05),
            (d["x"], d["p"])), compile=True),
    ]
    return rows


def _bce_prob_pos_weight(p, t, weight, pos_weight, reduction="mean"):
    """BCE of probabilities with pos_weight by its definition (PyTorch's -100 clamps)."""
    loss = -weight * (pos_weight * t * torch.clamp(torch.log(p), min=-100) +
                      (1 - t) * torch.clamp(torch.log1p(-p), min=-100))
    return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()


def _elementwise_rows():
    rows = []
    for red in REDUCTIONS:
        rows += [
            _row(f"binary_cross_entropy_with_logits-{red}", lambda d, red=red: Sample(
                lambda x, t: wl.binary_cross_entropy_with_logits(
                    x, t, d["w"], pos_weight=d["pw"], reduction=red),
                lambda x, t: F.binary_cross_entropy_with_logits(
                    x, t, d["w"], pos_weight=d["pw"], reduction=red), (d["x"], d["t"])),
                compile=red == "mean"),
            _row(f"sigmoid_focal_loss-{red}", lambda d, red=red: Sample(
                lambda x, t: wl.sigmoid_focal_loss(x, t, reduction=red),
                lambda x, t: sigmoid_focal_composite(x, t, reduction=red), (d["x"], d["t"])),
                compile=red == "none"),
            _row(f"binary_cross_entropy-{red}", lambda d, red=red: Sample(
                lambda p, t: wl.binary_cross_entropy(p, t, d["w"], reduction=red),
                lambda p, t: F.binary_cross_entropy(p, t, d["w"], reduction=red),
                (d["prob"], d["t"])), compile=red == "sum"),
        ]
    rows += [
        _row("binary_cross_entropy_with_logits-broadcast", lambda d: Sample(
            lambda x, t: wl.binary_cross_entropy_with_logits(
                x, t, d["v"][:, None], pos_weight=d["pw"][:1]),
            lambda x, t: F.binary_cross_entropy_with_logits(
                x, t, d["v"][:, None], pos_weight=d["pw"][:1]), (d["x"], d["t"]))),
        _row("sigmoid_focal_loss-alpha-tensor-weights", lambda d: Sample(
            lambda x, t: wl.sigmoid_focal_loss(x, t, d["w"] / 2, 1.5, "mean", d["w"], d["pw"]),
            lambda x, t: sigmoid_focal_composite(x, t, d["w"] / 2, 1.5, "mean", d["w"], d["pw"]),
            (d["x"], d["t"]))),
        _row("sigmoid_focal_loss-no-alpha", lambda d: Sample(
            lambda x, t: wl.sigmoid_focal_loss(x, t, -1, 0.5, "sum"),
            lambda x, t: sigmoid_focal_composite(x, t, -1, 0.5, "sum"), (d["x"], d["t"]))),
        _row("binary_cross_entropy-pos_weight", lambda d: Sample(
            lambda p, t: wl.binary_cross_entropy(p, t, d["w"], pos_weight=d["pw"]),
            lambda p, t: _bce_prob_pos_weight(p, t, d["w"], d["pw"]), (d["prob"], d["t"]))),
        _row("BCEWithLogitsLoss-module", lambda d: Sample(
            lambda x, t: wl.BCEWithLogitsLoss(d["w"], pos_weight=d["pw"])(x, t),
            lambda x, t: torch.nn.BCEWithLogitsLoss(d["w"], pos_weight=d["pw"])(x, t),
            (d["x"], d["t"])), compile=True),
    ]
    return rows


def _linear(h, lw, b, y, **kw):
    return F.cross_entropy(F.linear(h, lw, b), y, **kw)


def _chunked_rows():
    kw = dict(ignore_index=2, label_smoothing=0.1)
    return [
        # the chunks' gradients are formed in the forward; a second derivative forms the loss
        # again through the composite (weighted_loss/_linear_chunks.py: _second_order)
        _row("linear_cross_entropy", lambda d: Sample(
            lambda h, lw, b: wl.linear_cross_entropy(h, lw, d["y"], b, d["w"], chunk_size=4,
                                                     **kw),
            lambda h, lw, b: _linear(h, lw, b, d["y"], weight=d["w"], **kw),
            (d["h"], d["lw"], d["b"])), compile=True),
        # (probability targets get no gradient here yet: issue 48)
        _row("linear_cross_entropy-prob-none", lambda d: Sample(
            lambda h, lw: wl.linear_cross_entropy(h, lw, d["p"], reduction="none", chunk_size=4),
            lambda h, lw: _linear(h, lw, None, d["p"], reduction="none"),
            (d["h"], d["lw"]))),
        # one shard: the statistics gathered across ranks carry no tangents (forward AD raises)
        # and its backward is first-order
        _row("vocab_parallel_cross_entropy", lambda d: Sample(
            lambda x: wl.vocab_parallel_cross_entropy(x, d["y"], d["w"], **kw),
            lambda x: F.cross_entropy(x, d["y"], d["w"], **kw), (d["x"],)),
            forward_ad=False, double_backward=False, compile=True),
    ]


def _overlap_rows():
    """The overlap losses (weighted_loss/overlap.py) against MONAI's formulas written out
    (references.overlap_reference), on every device."""
    rows = []
    for red in ("mean", "sum"):
        kw = dict(ignore_index=2, label_smoothing=0.1, lambda_ce=1.0, reduction=red)
        rows.append(_row(f"dice_loss-ce-{red}", lambda d, kw=kw: Sample(
            lambda x: wl.dice_loss(x, d["yv"], weight=d["w"], **kw),
            lambda x: overlap_reference(x, d["yv"], d["w"], **kw), (d["xv"],)),
            compile=red == "mean"))
    jk = dict(include_background=False, jaccard=True, batch=True, reduction="none")
    sq = dict(squared_pred=True, lambda_ce=0.5, reduction="sum")
    tv = dict(alpha=0.3, beta=0.7, focal_exponent=0.75, gamma=2.0, lambda_ce=1.0,
              ignore_index=2)
    gd = dict(w_type="simple", lambda_ce=1.0, ignore_index=2)
    rows += [
        _row("dice_loss-jaccard-batch-none", lambda d: Sample(
            lambda x: wl.dice_loss(x, d["yv"], ignore_index=2, **jk),
            lambda x: overlap_reference(x, d["yv"], ignore_index=2, **jk), (d["xv"],))),
        _row("dice_loss-soft-squared", lambda d: Sample(
            lambda x, t: wl.dice_loss(x, t, weight=d["w"], **sq),
            lambda x, t: overlap_reference(x, t, d["w"], **sq), (d["xv"], d["pv"]))),
        _row("tversky_loss-focal", lambda d: Sample(
            lambda x: wl.tversky_loss(x, d["yv"], weight=d["w"], **tv),
            lambda x: overlap_reference(x, d["yv"], d["w"], kind="tversky", **tv),
            (d["xv"],)), compile=True),
        _row("generalized_dice_loss-ce", lambda d: Sample(
            lambda x: wl.generalized_dice_loss(x, d["yv"], weight=d["w"], **gd),
            lambda x: overlap_reference(x, d["yv"], d["w"], kind="generalized", **gd),
            (d["xv"],))),
        _row("overlap_sums", lambda d: Sample(
            lambda x: torch.stack(wl.overlap_sums(x, d["yv"], ignore_index=2)),
            lambda x: _sums_reference(x, d["yv"], ignore_index=2), (d["xv"],))),
        _row("DiceLoss-module", lambda d: Sample(
            lambda x: wl.DiceLoss(d["w"], lambda_ce=1.0)(x, d["yv"]),
            lambda x: overlap_reference(x, d["yv"], d["w"], lambda_ce=1.0), (d["xv"],)),
            compile=True),
    ]
    return rows


def _sums_reference(x, y, ignore_index):
    keep = (y != ignore_index).unsqueeze(1)
    t = F.one_hot(torch.where(keep.squeeze(1), y, 0), x.shape[1]).movedim(-1, 1).to(x) * keep
    p = torch.softmax(x, 1) * keep
    return torch.stack([(p * t).sum((2, 3)), p.sum((2, 3)), t.sum((2, 3))])


LOSSES = _cross_entropy_rows() + _focal_rows() + _elementwise_rows() + _chunked_rows() + \
    _overlap_rows()
BY_NAME = {row.name: row for row in LOSSES}
