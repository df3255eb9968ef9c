"""wl.sigmoid_focal_loss against torchvision.ops.sigmoid_focal_loss's formula (written out below:
no torchvision wheel matches this torch offline), with weight and pos_weight as in
F.binary_cross_entropy_with_logits, on the CPU and the emulated CUDA kernels: float64 parity,
gradcheck, float32/bfloat16 within 2x of the composite's own error, |logits| up to 1e4, gamma in
[0, 5] including gamma < 1 at p_t -> 1, opcheck, compile, errors."""
import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl

_ops = torch.ops.weighted_loss


def reference(x, t, alpha=0.25, gamma=2.0, reduction="none", weight=None, pos_weight=None,
              stable=False):
    """torchvision.ops.sigmoid_focal_loss, with BCE's weight and pos_weight. stable: the BCE term
    as pw t softplus(-x) + (1 - t) softplus(x), which float64 keeps to the last bits where
    F.binary_cross_entropy_with_logits' float64 log(1 + e) loses them (1.3% at x = -30)."""
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
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()


def _inputs(shape, dtype=torch.float64, seed=0, scale=3.0, hard=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.rand(shape, generator=g) < 0.2).to(dtype) if hard else \
        torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, t


@pytest.mark.parametrize("shape,wshape", [((40, 7), (7,)), ((4, 3, 5, 5), (3, 1, 1)),
                                          ((33,), None)])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1, 0.5), (0.75, 0.0), (0.5, 5.0)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("hard", [True, False])
def test_matches_formula(device, shape, wshape, alpha, gamma, reduction, hard):
    x, t = _inputs(shape, hard=hard)
    g = torch.Generator().manual_seed(1)
    w = None if wshape is None else torch.rand(wshape, generator=g, dtype=torch.float64) + 0.5
    pw = None if wshape is None else torch.rand(wshape, generator=g, dtype=torch.float64) * 4
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.sigmoid_focal_loss(x1, t, alpha, gamma, reduction, w, pw)
    ref = reference(x2, t, alpha, gamma, reduction, w, pw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    go = torch.rand(ref.shape, dtype=ref.dtype)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, go)[0],
                               torch.autograd.grad(ref, x2, go)[0], rtol=1e-10, atol=1e-13)


def test_torchvision_defaults_and_bce_special_case():
    x, t = _inputs((64, 5))
    torch.testing.assert_close(wl.sigmoid_focal_loss(x, t), reference(x, t))
    torch.testing.assert_close(wl.sigmoid_focal_loss(x, t, alpha=-1, gamma=0.0, reduction="mean"),
                               wl.binary_cross_entropy_with_logits(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0, 2.0, 5.0])
def test_gradcheck(device, gamma):
    x, t = _inputs((6, 5), scale=2.0, hard=False)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    x.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda v: wl.sigmoid_focal_loss(v, t, 0.3, gamma, "sum", weight=w, pos_weight=w * 2), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_within_2x_of_composite_error(device, dtype):
    x, t = _inputs((256, 40), dtype, seed=4, scale=4.0)
    pw = torch.linspace(0.5, 9, 40).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.sigmoid_focal_loss(x1, t, 0.25, 2.0, "mean", pos_weight=pw)
    ref = reference(x2, t, 0.25, 2.0, "mean", pos_weight=pw)
    x3 = x.double().requires_grad_()
    exact = reference(x3, t.double(), 0.25, 2.0, "mean", pos_weight=pw.double())
    pairs = [(ours, ref, exact)] + [tuple(torch.autograd.grad(v, a)[0] for v, a in
                                          ((ours, x1), (ref, x2), (exact, x3)))]
    half_ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9}[dtype]
    for o, r, e in pairs:
        err = (o.double() - e).abs().max().item()
        bar = max((r.double() - e).abs().max().item(), half_ulp * e.abs().max().item())
        assert err <= 2 * bar, (err, bar)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_stable_for_large_logits(device, gamma):
    """|logits| up to 1e4: finite, and as float64's formula where that is finite; where p_t -> 1
    with gamma < 1 the gradient is its limit (0), not NaN."""
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], dtype=torch.float32)
    for t in (torch.zeros_like(x), torch.ones_like(x), torch.full_like(x, 0.3)):
        xr = x.clone().requires_grad_()
        loss = wl.sigmoid_focal_loss(xr, t, 0.25, gamma)
        (g,) = torch.autograd.grad(loss.sum(), xr)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all(), (t, loss, g)
        x64 = x.double().requires_grad_()
        ref = reference(x64, t.double(), 0.25, gamma, stable=True)
        (gr,) = torch.autograd.grad(ref.sum(), x64)
        ok = torch.isfinite(ref)
        torch.testing.assert_close(loss.double()[ok], ref[ok], rtol=2e-6, atol=1e-30)
        okg = torch.isfinite(gr)
        torch.testing.assert_close(g.double()[okg], gr[okg], rtol=2e-5, atol=1e-30)
        # (the gradient is exact here too: dce as (1 - t) sigmoid(x) - P t sigmoid(-x) keeps
        # the -sigmoid(-30) at t = 1, x = 30 that sigmoid(x) - t rounds to 0)


def test_module_opcheck_compile():
    x, t = _inputs((16, 4), torch.float32)
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    crit = wl.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="mean", pos_weight=pw)
    assert "pos_weight" in crit.state_dict()
    torch.testing.assert_close(crit(x, t), reference(x, t, 0.5, 1.5, "mean", pos_weight=pw))
    torch.library.opcheck(_ops.binary_cross_entropy_with_logits_forward.default,
                          (x, t, None, pw, 1, 1.5, 0.5))
    torch.library.opcheck(_ops.binary_cross_entropy_with_logits_backward.default,
                          (torch.tensor(1.0), x, t, None, pw, 1, True, False, 1.5, 0.5))
    xr = x.clone().requires_grad_()
    fn = torch.compile(lambda v: wl.sigmoid_focal_loss(v, t, 0.5, 1.5, "sum"), fullgraph=True,
                       backend="aot_eager")
    loss = fn(xr)
    xr2 = x.clone().requires_grad_()
    ref = reference(xr2, t, 0.5, 1.5, "sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, xr)[0], torch.autograd.grad(ref, xr2)[0])


@pytest.mark.parametrize("kw,exc,text", [
    ({"gamma": -1.0}, ValueError, "gamma must be a finite number >= 0, got -1.0"),
    ({"gamma": float("nan")}, ValueError, "gamma must be a finite number >= 0, got nan"),
    ({"alpha": float("nan")}, ValueError, "alpha must be a finite number"),
    ({"alpha": torch.tensor([0.25])}, TypeError, "a tensor alpha is not supported yet"),
    ({"reduction": "avg"}, ValueError, "Invalid Value for arg 'reduction'")])
def test_errors_name_the_argument(kw, exc, text):
    x, t = _inputs((4, 3), torch.float32)
    with pytest.raises(exc, match=text):
        wl.sigmoid_focal_loss(x, t, **kw)
    with pytest.raises(ValueError, match="must be the same as input size"):
        wl.sigmoid_focal_loss(x, t[:2])
    with pytest.raises(NotImplementedError, match="derivative for 'target'"):
        wl.sigmoid_focal_loss(x, t.clone().requires_grad_())
