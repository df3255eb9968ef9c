"""wl.sigmoid_focal_loss against torchvision.ops.sigmoid_focal_loss (its 0.28 body written out in
reference() below: the only torchvision wheel for this torch offline is a CUDA build, which cannot
load against a CPU torch), with weight and pos_weight as in F.binary_cross_entropy_with_logits
and alpha a float or a broadcast tensor, on the CPU and the CUDA kernels (emulated, and a GPU when
there is one): float64 parity of the loss and both gradients (input and target), float32/bfloat16
within 2x of the composite's own error, |logits| up to 1e4, gamma in [0, 5] including gamma < 1
at p_t -> 1, errors (the modes: tests/test_modes.py)."""
import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl
from bars import assert_within_2x

_ops = torch.ops.weighted_loss


def reference(x, t, alpha=0.25, gamma=2.0, reduction="none", weight=None, pos_weight=None,
              stable=False):
    """torchvision.ops.sigmoid_focal_loss, with BCE's weight and pos_weight and alpha possibly a
    tensor. stable: the BCE term as pw t softplus(-x) + (1 - t) softplus(x), which float64 keeps
    to the last bits where F.binary_cross_entropy_with_logits' float64 log(1 + e) loses them
    (1.3% at x = -30)."""
    p = torch.sigmoid(x)
    q = 1 - (p * t + (1 - p) * (1 - t))  # torchvision's 1 - p_t
    if stable:  # without its cancellation either
        q = t * torch.sigmoid(-x) + (1 - t) * p
        pw = 1.0 if pos_weight is None else pos_weight
        ce = pw * t * F.softplus(-x) + (1 - t) * F.softplus(x)
        ce = ce if weight is None else ce * weight
    else:
        ce = F.binary_cross_entropy_with_logits(x, t, weight=weight, pos_weight=pos_weight,
                                                reduction="none")
    loss = ce * (q ** gamma)
    if isinstance(alpha, torch.Tensor) or alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()


def _inputs(shape, dtype=torch.float64, seed=0, scale=3.0, hard=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.rand(shape, generator=g) < 0.2).to(dtype) if hard else \
        torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.to(device), t.to(device)


def _rand(shape, device, lo=0.0, hi=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(device)


def _check_both_grads(ours, ref, x1, t1, x2, t2, device, rtol=1e-10, atol=1e-13):
    go = _rand(ref.shape, device, seed=9)
    got = torch.autograd.grad(ours, (x1, t1), go)
    want = torch.autograd.grad(ref, (x2, t2), go)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape,wshape", [((40, 7), (7,)), ((4, 3, 5, 5), (3, 1, 1)),
                                          ((33,), None)])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 0.5), (0.75, 0.0), (0.5, 5.0),
                                         (0.3, 1.0), (-1, 0.3)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("hard", [True, False])
def test_matches_formula(device, shape, wshape, alpha, gamma, reduction, hard):
    x, t = _inputs(shape, hard=hard, device=device)
    w = None if wshape is None else _rand(wshape, device, 0.5, 1.5)
    pw = None if wshape is None else _rand(wshape, device, 0.0, 4.0, seed=2)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    t1, t2 = t.clone().requires_grad_(), t.clone().requires_grad_()
    ours = wl.sigmoid_focal_loss(x1, t1, alpha, gamma, reduction, w, pw)
    ref = reference(x2, t2, alpha, gamma, reduction, w, pw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    _check_both_grads(ours, ref, x1, t1, x2, t2, device)


# alpha shapes: per class on the last dim, per channel of (N, C, H, W), per row (a column), one
# value, the full shape; rows short enough to be gathered, long ones, and the joined rows of
# inputs of 64K elements or more whose weights repeat row after row.
@pytest.mark.parametrize("shape,ashape,wshape", [
    ((40, 7), (7,), (7,)), ((4, 3, 5, 5), (3, 1, 1), (5,)), ((6, 40), (6, 1), None),
    ((33,), (), None), ((5, 9), (5, 9), (9,)), ((1024, 70), (70,), (1024, 1)),
    ((2, 3, 4, 130), (3, 1, 130), (4, 1))])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_tensor_alpha(device, shape, ashape, wshape, reduction):
    x, t = _inputs(shape, hard=False, device=device)
    a = _rand(ashape, device, seed=3)
    w = None if wshape is None else _rand(wshape, device, 0.5, 1.5)
    pw = _rand(shape[-1:], device, 0.5, 3.0, seed=4)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    t1, t2 = t.clone().requires_grad_(), t.clone().requires_grad_()
    ours = wl.sigmoid_focal_loss(x1, t1, a, 1.5, reduction, w, pw)
    ref = reference(x2, t2, a, 1.5, reduction, w, pw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-13)
    _check_both_grads(ours, ref, x1, t1, x2, t2, device)


def test_tensor_alpha_of_one_value_is_the_float(device):
    x, t = _inputs((64, 50), torch.float32, hard=False, device=device)
    xr = x.clone().requires_grad_()
    for a in (0.25, 0.0, 1.0):
        at = torch.full((50,), a, device=device)
        got = wl.sigmoid_focal_loss(xr, t, at, 2.0)
        want = wl.sigmoid_focal_loss(xr, t, a, 2.0)
        assert torch.equal(got, want)
        assert torch.equal(torch.autograd.grad(got.sum(), xr)[0],
                           torch.autograd.grad(want.sum(), xr)[0])


def test_torchvision_defaults_and_bce_special_case(device):
    x, t = _inputs((64, 5), device=device)
    torch.testing.assert_close(wl.sigmoid_focal_loss(x, t), reference(x, t))
    torch.testing.assert_close(wl.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0, reduction="mean"),
                               wl.binary_cross_entropy_with_logits(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_within_2x_of_composite_error(device, dtype):
    x, t = _inputs((256, 40), dtype, seed=4, scale=4.0, hard=False, device=device)
    pw = torch.linspace(0.5, 9, 40, device=device).to(dtype)
    alpha = torch.linspace(0.1, 0.9, 40, device=device).to(dtype)
    x1, x2, x3 = (v.requires_grad_() for v in (x.clone(), x.clone(), x.double()))
    t1, t2, t3 = (v.requires_grad_() for v in (t.clone(), t.clone(), t.double()))
    ours = wl.sigmoid_focal_loss(x1, t1, alpha, 2.0, "mean", pos_weight=pw)
    ref = reference(x2, t2, alpha, 2.0, "mean", pos_weight=pw)
    exact = reference(x3, t3, alpha.double(), 2.0, "mean", pos_weight=pw.double())
    triples = [(ours, ref, exact)] + list(zip(torch.autograd.grad(ours, (x1, t1)),
                                              torch.autograd.grad(ref, (x2, t2)),
                                              torch.autograd.grad(exact, (x3, t3))))
    for o, r, e in triples:
        assert_within_2x(o, r, e, dtype)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_stable_for_large_logits(device, gamma):
    """|logits| up to 1e4: finite, and as float64's formula where that is finite; where p_t -> 1
    with gamma < 1 the gradients are their limits, not NaN."""
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=device)
    for t in (torch.zeros_like(x), torch.ones_like(x), torch.full_like(x, 0.3)):
        xr, tr = x.clone().requires_grad_(), t.clone().requires_grad_()
        loss = wl.sigmoid_focal_loss(xr, tr, 0.25, gamma)
        g, gt = torch.autograd.grad(loss.sum(), (xr, tr))
        assert all(torch.isfinite(v).all() for v in (loss, g, gt)), (t, loss, g, gt)
        x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
        ref = reference(x64, t64, 0.25, gamma, stable=True)
        gr, gtr = torch.autograd.grad(ref.sum(), (x64, t64))
        ok = torch.isfinite(ref)
        torch.testing.assert_close(loss.double()[ok], ref[ok], rtol=2e-6, atol=1e-30)
        # the target gradient's atol: at x = -100, t = 0 it is 1.5e-20 through q = sigmoid(-100),
        # a float32 subnormal (3.7e-44) that no float32 formula keeps to relative precision
        for a, b, atol in ((g, gr, 1e-30), (gt, gtr, 1e-19)):
            okg = torch.isfinite(b)
            torch.testing.assert_close(a.double()[okg], b[okg], rtol=2e-5, atol=atol)
        # (the gradient is exact here too: dce as (1 - t) sigmoid(x) - P t sigmoid(-x) keeps
        # the -sigmoid(-30) at t = 1, x = 30 that sigmoid(x) - t rounds to 0)


def test_module():
    x, t = _inputs((16, 4), torch.float32)
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    crit = wl.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="mean", pos_weight=pw)
    assert "pos_weight" in crit.state_dict()
    torch.testing.assert_close(crit(x, t), reference(x, t, 0.5, 1.5, "mean", pos_weight=pw))
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.9])
    crit = wl.SigmoidFocalLoss(alpha=alpha, gamma=1.5, reduction="sum")
    assert "alpha" in crit.state_dict()
    torch.testing.assert_close(crit(x, t), reference(x, t, alpha, 1.5, "sum"))


@pytest.mark.parametrize("kw,exc,text", [
    ({"gamma": -1.0}, ValueError, "gamma must be a finite number >= 0, got -1.0"),
    ({"gamma": float("nan")}, ValueError, "gamma must be a finite number >= 0, got nan"),
    ({"alpha": float("nan")}, ValueError, "Invalid alpha value: nan"),
    ({"alpha": 1.5}, ValueError, r"Invalid alpha value: 1.5. alpha must be in the range \[0,1\]"),
    ({"alpha": -0.5}, ValueError, "Invalid alpha value: -0.5"),
    ({"alpha": torch.tensor([1, 0, 1])}, TypeError, "alpha must be a floating point tensor"),
    ({"alpha": torch.rand(2)}, RuntimeError, r"alpha of shape \[2\] cannot be broadcast"),
    ({"alpha": torch.rand(3, requires_grad=True)}, NotImplementedError,
     "derivative for 'alpha'"),
    ({"reduction": "avg"}, ValueError, "Invalid Value for arg 'reduction'")])
def test_errors_name_the_argument(kw, exc, text):
    x, t = _inputs((4, 3), torch.float32)
    with pytest.raises(exc, match=text):
        wl.sigmoid_focal_loss(x, t, **kw)
    with pytest.raises(ValueError, match="must be the same as input size"):
        wl.sigmoid_focal_loss(x, t[:2])
    with pytest.raises(NotImplementedError, match="derivative for 'pos_weight'"):
        wl.sigmoid_focal_loss(x, t, pos_weight=torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="alpha and alpha_tensor are exclusive"):
        _ops.sigmoid_focal_loss_forward(x, t, gamma=2.0, alpha=0.5, alpha_tensor=torch.rand(3))
    with pytest.raises(ValueError, match="sigmoid_focal_loss: gamma must be a finite number"):
        _ops.sigmoid_focal_loss_forward(x, t, gamma=-1.0, alpha=None)
