"""The overlap sums beside the cross-entropy (the cross_entropy_overlap ops) and the losses on
them (weighted_loss/overlap.py): the fused op against its composite over the options and layouts
the lane code has paths for, on the CPU and CUDA kernels (the emulator's, a GPU's), the precision
bar in float32 and bfloat16, determinism, empty shapes and bad arguments. Every mode (gradcheck, jvp, compile, opcheck) runs on the rows of
tests/losses.py."""
import pytest
import torch

import weighted_loss as wl
from bars import assert_within_2x
from emulation import cpu_kernels
from references import overlap_reference
from weighted_loss import _composite

D = torch.float64
_ops = torch.ops.weighted_loss


def _inputs(shape, index, dtype=D, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    x = (torch.randn(shape, generator=g, dtype=D) * 3).to(dtype)
    if index:
        y = torch.randint(0, C, (N, *shape[2:]), generator=g)
        if ignore and y.numel():
            y.view(-1)[::7] = -100
        return x, y
    return x, torch.softmax(torch.randn(shape, generator=g, dtype=D) * 2, 1).to(dtype)


# (N, C, d...): spatial sizes below, at and above a block of lanes (32 float32, 16 float64),
# classes in the lane tile and beyond it (128), one class, a 3-D volume
SHAPES = [(2, 5, 7), (3, 4, 33, 5), (1, 130, 40), (2, 1, 9, 4), (2, 14, 6, 5, 4), (4, 3, 1)]
OPTIONS = [
    dict(),
    dict(weight=True, reduction="sum", squared=True),
    dict(label_smoothing=0.2, reduction="none"),
    dict(label_smoothing=0.1, weight=True),
    dict(gamma=2.0, weight=True),
    dict(gamma=1.5, label_smoothing=0.1, squared=True),
]


def _kwargs(opt, C):
    kw = dict(opt)
    if kw.pop("weight", False):
        kw["weight"] = torch.linspace(0.5, 2.0, C, dtype=D)
    return kw


@pytest.mark.parametrize("index", [True, False], ids=["indices", "soft"])
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: "-".join(f"{k}" for k in o) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_equals_composite_float64(device, shape, opt, index):
    """The loss, the sums and the logits' gradient (of the loss and of every sum at once) agree
    with the composite to float64 rounding."""
    x, t = (v.to(device) for v in _inputs(shape, index))
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _kwargs(opt, shape[1]).items()}
    if index:
        kw["ignore_index"] = -100
    xf, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, sums, _, _ = _ops.cross_entropy_overlap_forward(xf, t, **kw)
    ref_loss, ref_sums = _composite.cross_entropy_overlap(xc, t, **kw)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, **close)
    torch.testing.assert_close(sums, ref_sums, **close)
    g = torch.Generator().manual_seed(1)
    gl = torch.randn(loss.shape, generator=g, dtype=D).to(device)
    gs = torch.randn(sums.shape, generator=g, dtype=D).to(device)
    (gx,) = torch.autograd.grad((loss * gl).sum() + (sums * gs).sum(), xf)
    (rx,) = torch.autograd.grad((ref_loss * gl).sum() + (ref_sums * gs).sum(), xc)
    torch.testing.assert_close(gx, rx, **close)


def _cuda_case(device, dtype, target, weighted):
    """(loss, sums, gradient) of the fused op on device, with the upstream gradients fixed."""
    x, t = _inputs((2, 6, 9, 7), target in ("index", "smooth"), dtype=torch.float32, seed=3)
    kw = dict(reduction="sum", squared=True)
    if target == "prob":
        t = t.to(dtype)
    elif target == "float-prob":
        pass  # float32 probabilities beside 16-bit logits
    else:
        kw["ignore_index"] = -100
        if target == "smooth":
            kw["label_smoothing"] = 0.1
    if weighted:
        kw["weight"] = torch.linspace(0.5, 2.0, 6, dtype=torch.float32).to(device)
    xi = x.to(dtype).to(device).requires_grad_()
    loss, sums, _, _ = _ops.cross_entropy_overlap_forward(xi, t.to(device), **kw)
    g = torch.Generator().manual_seed(1)
    gs = torch.randn(sums.shape, generator=g, dtype=sums.dtype).to(device)
    (gx,) = torch.autograd.grad(loss * 0.5 + (sums * gs).sum(), xi)
    return loss.cpu(), sums.cpu(), gx.cpu()


@pytest.mark.parametrize("weighted", [False, True], ids=["", "weighted"])
@pytest.mark.parametrize("dtype, target", [
    (dt, t) for dt in (torch.float32, torch.bfloat16, torch.float16)
    for t in ("index", "smooth", "prob") + (("float-prob",) if dt.itemsize == 2 else ())])
def test_cuda_kernels_equal_the_cpu_kernels(gpu, dtype, target, weighted):
    """Each dtype and target kind of the CUDA kernels (16-bit logits with float probabilities
    beside them too) against the CPU's in the same dtype."""
    ours = _cuda_case(gpu, dtype, target, weighted)
    with cpu_kernels():
        cpu = _cuda_case(torch.device("cpu"), dtype, target, weighted)
    for a, b in zip(ours, cpu):
        torch.testing.assert_close(a, b)


@pytest.mark.asan_skip
def test_cuda_deterministic_runs(gpu):
    """The sums' fixed order (blocks in item order, in double): the same bits on every run, the
    emulator's blocks run in a different order each time."""
    x, y = (v.to(gpu) for v in _inputs((2, 5, 40, 70), True, dtype=torch.float32))
    outs = []
    for _ in range(3):
        xi = x.clone().requires_grad_()
        loss = wl.dice_loss(xi, y, lambda_ce=1.0, batch=True)
        (gx,) = torch.autograd.grad(loss, xi)
        outs.append((loss, gx))
    for loss, gx in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(gx, outs[0][1])


def test_strided_layouts_are_read_as_contiguous():
    """Channels-last and sliced logits give the contiguous logits' results (and gradient in
    the input's strides)."""
    x, y = _inputs((2, 6, 8, 9), True)
    cl = x.to(memory_format=torch.channels_last)
    wide = torch.randn(2, 6, 8, 12, dtype=D)
    wide[..., :9] = x
    for v in (cl, wide[..., :9]):
        a = v.clone().requires_grad_() if v.is_leaf else v.detach().requires_grad_()
        b = x.clone().requires_grad_()
        la = wl.dice_loss(a, y, lambda_ce=1.0)
        lb = wl.dice_loss(b, y, lambda_ce=1.0)
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
        (ga,), (gb,) = torch.autograd.grad(la, a), torch.autograd.grad(lb, b)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


LOSSES = {
    "dice+ce": (lambda x, y, w: wl.dice_loss(x, y, weight=w, lambda_ce=1.0),
                lambda x, y, w: overlap_reference(x, y, w, lambda_ce=1.0)),
    "dice-batch-squared": (
        lambda x, y, w: wl.dice_loss(x, y, squared_pred=True, batch=True),
        lambda x, y, w: overlap_reference(x, y, squared_pred=True, batch=True)),
    "tversky+focal": (
        lambda x, y, w: wl.tversky_loss(x, y, alpha=0.3, beta=0.7, gamma=2.0, lambda_ce=1.0),
        lambda x, y, w: overlap_reference(x, y, kind="tversky", alpha=0.3, beta=0.7, gamma=2.0,
                                          lambda_ce=1.0)),
    "generalized+ce": (
        lambda x, y, w: wl.generalized_dice_loss(x, y, weight=w, lambda_ce=1.0),
        lambda x, y, w: overlap_reference(x, y, w, kind="generalized", lambda_ce=1.0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
def test_precision_within_twice_the_composites(name, dtype):
    """At a realistic size ((2, 14, 24, 24, 24): 27,648 positions an item), the loss and the
    logits' gradient in float32 / bfloat16 are within 2x of the reference's own error in that
    dtype, against float64 (tests/bars.py)."""
    fused, reference = LOSSES[name]
    x, y = _inputs((2, 14, 24, 24, 24), True, ignore=False)
    w = torch.linspace(0.5, 3.0, 14, dtype=D)
    x = x.to(dtype).to(D)  # the same values in every dtype
    outs = {}
    for label, fn, dt in (("exact", reference, D), ("ours", fused, dtype),
                          ("theirs", reference, dtype)):
        xi = x.to(dt).requires_grad_()
        loss = fn(xi, y, w.to(dt))
        (gx,) = torch.autograd.grad(loss, xi)
        outs[label] = (loss.detach().to(D), gx.to(D))
    for k, what in enumerate(("loss", "gradient")):
        assert_within_2x(outs["ours"][k], outs["theirs"][k], outs["exact"][k], dtype, name, what)


def test_deterministic_across_thread_counts():
    x, y = _inputs((2, 14, 30, 30), True, dtype=torch.float32)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xi = x.clone().requires_grad_()
            loss = wl.dice_loss(xi, y, lambda_ce=1.0)
            (gx,) = torch.autograd.grad(loss, xi)
            outs.append((loss, gx))
    finally:
        torch.set_num_threads(threads)
    for loss, gx in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(gx, outs[0][1])


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (2, 3, 0, 5)])
def test_empty(shape):
    """No items or no positions: sums of nothing (0), the cross-entropy's mean of nothing (NaN,
    as PyTorch's), gradients of the input's shape."""
    x = torch.randn(shape, dtype=D, requires_grad=True)
    y = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    i, p, t = wl.overlap_sums(x, y)
    assert i.shape == (shape[0], 3) and not i.any() and not p.any() and not t.any()
    loss = wl.dice_loss(x, y, lambda_ce=1.0, reduction="sum")
    ref = overlap_reference(x, y, lambda_ce=1.0, reduction="sum")
    torch.testing.assert_close(loss, ref, equal_nan=True)
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.shape == x.shape


def test_ignored_position_is_in_neither_term():
    x, y = _inputs((2, 4, 10), True, ignore=False)
    y2 = y.clone()
    y2[0, 3] = -100
    x2 = x.clone()
    x2[0, :, 3] = float("nan")  # whatever an ignored position holds
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    a = wl.dice_loss(x2, y2, ignore_index=-100, lambda_ce=1.0, reduction="sum")
    b = overlap_reference(x, y2, ignore_index=-100, lambda_ce=1.0, reduction="sum")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call, match", [
    (lambda: wl.dice_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long)), "k >= 1"),
    (lambda: wl.dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long)),
     "target must be class indices of shape"),
    (lambda: wl.dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long),
                          activation="relu"), "activation"),
    (lambda: wl.dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long),
                          lambda_ce=1.0, reduction="none"), "reduction='none'"),
    (lambda: wl.tversky_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long),
                             focal_exponent=0), "focal_exponent"),
    (lambda: wl.generalized_dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long),
                                      w_type="cubic"), "w_type"),
])
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_weight_of_another_length_raises():
    with pytest.raises(RuntimeError, match="weight tensor should be defined either for all 3"):
        wl.dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long),
                     weight=torch.ones(4))
    with pytest.raises(ValueError, match="weight must have one value per class"):
        wl.dice_loss(torch.randn(2, 3, 4), torch.zeros(2, 3, 4), weight=torch.ones(2),
                     activation="sigmoid")


def test_out_of_range_class_index_raises():
    with pytest.raises(IndexError, match="out of bounds"):
        wl.dice_loss(torch.randn(2, 3, 4), torch.full((2, 4), 3, dtype=torch.long))


@pytest.mark.parametrize("index", [True, False], ids=["indices", "soft"])
@pytest.mark.parametrize("opt", [dict(), dict(label_smoothing=0.1, weight=True, squared_pred=True),
                                 dict(gamma=2.0)], ids=["plain", "smoothed", "focal"])
def test_nothing_of_the_logits_size_lives_between_the_passes(device, opt, index):
    """Between the forward and the backward the fused loss keeps its inputs and the (N, 3, C)
    sums: the backward recomputes each position's log-sum-exp. Only the focal term keeps its
    per-position planes (two or three floats a position)."""
    shape = (2, 5, 33, 7)
    x, t = (v.to(device) for v in _inputs(shape, index))
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _kwargs(opt, shape[1]).items()}
    x.requires_grad_()
    saved = []

    def pack(v):
        saved.append(v)
        return v
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        loss = wl.dice_loss(x, t, lambda_ce=1.0, **kw)
    own = {v.data_ptr() for v in (x, t, kw.get("weight")) if v is not None}
    positions = x.numel() // shape[1]
    big = sorted(tuple(v.shape) for v in saved if v.data_ptr() not in own and v.numel() >= positions)
    if "gamma" in opt:
        assert big, "the focal term's planes"
        assert all(v.numel() <= 3 * positions for v in saved if v.data_ptr() not in own)
    else:
        assert big == []
    # the gradient from the recomputed planes: test_fused_equals_composite_float64 checks it
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()


def test_autocast_reads_16bit_logits_in_place():
    """Under autocast the loss is float32 (the cross-entropy's rule), the gradient the logits'
    dtype, and the value the float32 logits' to bfloat16 rounding."""
    x, y = _inputs((2, 4, 8, 9), True, dtype=torch.bfloat16)
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wl.dice_loss(xb, y, lambda_ce=1.0)
    (g,) = torch.autograd.grad(loss, xb)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    ref = wl.dice_loss(x.float(), y, lambda_ce=1.0)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
