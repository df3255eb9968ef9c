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


# ---------------------------------------------------------------- softmax focal loss

def softmax_reference(x, t, gamma=2.0, weight=None, ignore_index=-100, reduction="mean"):
    """-w[y] (1 - p_y)^gamma log p_y per item; the mean over sum(w[y]) of the kept items."""
    logp = torch.log_softmax(x, dim=0 if x.dim() == 1 else 1)
    valid = t != ignore_index
    y = torch.where(valid, t, torch.zeros_like(t))
    lp = logp.gather(0 if x.dim() == 1 else 1, y.unsqueeze(0 if x.dim() == 1 else 1)).squeeze(
        0 if x.dim() == 1 else 1)
    q = -torch.expm1(lp)
    wy = (weight[y] if weight is not None else torch.ones_like(lp)) * valid
    rows = torch.where(valid, -wy * q ** gamma * lp, torch.zeros_like(lp))
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / wy.sum()


def _index_inputs(shape, dtype=torch.float64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    C = shape[1]
    t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::5] = -100
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    return x, t, w


@pytest.mark.parametrize("shape", [(24, 100), (24, 10), (3, 5, 4, 6)])
@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("weighted,reduction", [(True, "mean"), (False, "none"), (True, "sum")])
def test_softmax_focal_matches_composite(device, shape, gamma, weighted, reduction):
    x, t, w = _index_inputs(shape)
    w = w if weighted else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.focal_loss(x1, t, gamma, w, reduction=reduction)
    ref = softmax_reference(x2, t, gamma, w, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-13)
    go = torch.rand(ref.shape, dtype=ref.dtype)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, go)[0],
                               torch.autograd.grad(ref, x2, go)[0], rtol=1e-9, atol=1e-12)


def test_softmax_focal_gamma_zero_is_cross_entropy_and_gradcheck(device):
    x, t, w = _index_inputs((16, 30), torch.float32)
    assert torch.equal(wl.focal_loss(x, t, 0.0, w), wl.cross_entropy(x, t, w))
    for shape in ((6, 70), (6, 7), (2, 4, 3, 3)):
        x, t, w = _index_inputs(shape, scale=1.5)
        x.requires_grad_()
        for gamma in (0.3, 2.0):
            assert torch.autograd.gradcheck(
                lambda v: wl.focal_loss(v, t, gamma, w, reduction="sum"), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1000), (4, 19, 16, 16)])
def test_softmax_focal_within_2x_of_composite_error(dtype, shape):
    x, t, w = _index_inputs(shape, dtype, seed=6, scale=4.0)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.focal_loss(x1, t, 2.0, w)
    ref = softmax_reference(x2, t, 2.0, w)
    x3 = x.double().requires_grad_()
    exact = softmax_reference(x3, t, 2.0, w.double())
    grads = [torch.autograd.grad(v, a)[0] for v, a in ((ours, x1), (ref, x2), (exact, x3))]
    half_ulp = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9}[dtype]
    for o, r, e in ((ours, ref, exact), tuple(grads)):
        err = (o.double() - e).abs().max().item()
        bar = max((r.double() - e).abs().max().item(), half_ulp * e.abs().max().item())
        assert err <= 2 * bar, (err, bar)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 3.0])
def test_softmax_focal_confident_rows_no_nan(device, gamma):
    """p_y = 1 in float32 (logit gaps of 1e4, 100, 30): the loss 0 and the gradient its limit,
    never NaN; against float64 where that is finite."""
    x = torch.zeros(3, 4)
    x[0, 1], x[1, 2], x[2, 0] = 1e4, 100.0, 30.0
    t = torch.tensor([1, 2, 0])
    xr = x.clone().requires_grad_()
    loss = wl.focal_loss(xr, t, gamma, reduction="none")
    (g,) = torch.autograd.grad(loss.sum(), xr)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all(), (loss, g)
    x64 = x.double().requires_grad_()
    ref = softmax_reference(x64, t, gamma, reduction="none")
    (gr,) = torch.autograd.grad(ref.sum(), x64)
    ok = torch.isfinite(gr).all(1, keepdim=True).expand_as(gr)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-12)  # float32 lse: nll 0
    torch.testing.assert_close(g.double()[ok], gr[ok], rtol=1e-5, atol=1e-12)


def test_softmax_focal_module_opcheck_compile_errors():
    x, t, w = _index_inputs((12, 9), torch.float32)
    crit = wl.FocalLoss(gamma=1.5, weight=w)
    assert "weight" in crit.state_dict()
    torch.testing.assert_close(crit(x, t), softmax_reference(x, t, 1.5, w))
    torch.library.opcheck(_ops.cross_entropy_forward.default,
                          (x, t, w, 1, -100, 0.0, 0.0, 0.0, 1.5))
    xr = x.clone().requires_grad_()
    fn = torch.compile(lambda v: wl.focal_loss(v, t, 1.5, w), fullgraph=True, backend="aot_eager")
    loss = fn(xr)
    xr2 = x.clone().requires_grad_()
    ref = softmax_reference(xr2, t, 1.5, w)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, xr)[0], torch.autograd.grad(ref, xr2)[0])
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -0.5"):
        wl.focal_loss(x, t, -0.5)
    with pytest.raises(NotImplementedError, match="label_smoothing with gamma > 0"):
        wl.focal_loss(x, t, 2.0, label_smoothing=0.1)
    with pytest.raises(NotImplementedError, match="probability targets"):
        wl.focal_loss(x, torch.softmax(x, 1), 2.0)
    with pytest.raises(NotImplementedError, match="label_smoothing is not implemented"):
        _ops.cross_entropy_forward(x, t, w, 1, -100, 0.1, 0.0, 0.0, 2.0)
