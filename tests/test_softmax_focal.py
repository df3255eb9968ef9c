"""wl.focal_loss (the softmax focal loss) against its composite, on the CPU and the CUDA kernels
(emulated, and a GPU when there is one): float64 parity, float32/bfloat16 within 2x of the
composite's own error, confident rows without NaN, errors (the modes: tests/test_modes.py)."""
import itertools

import pytest
import torch

import weighted_loss as wl
from bars import assert_within_2x

_ops = torch.ops.weighted_loss


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


def _index_inputs(shape, dtype=torch.float64, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    C = shape[1]
    t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
    t.view(-1)[::5] = -100
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    return x.to(device), t.to(device), w.to(device)


@pytest.mark.parametrize("shape", [(24, 100), (24, 10), (3, 5, 4, 6)])
@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("weighted,reduction", [(True, "mean"), (False, "none"), (True, "sum")])
def test_softmax_focal_matches_composite(device, shape, gamma, weighted, reduction):
    x, t, w = _index_inputs(shape, device=device)
    w = w if weighted else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.focal_loss(x1, t, gamma, w, reduction=reduction)
    ref = softmax_reference(x2, t, gamma, w, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-13)
    go = torch.rand(ref.shape, dtype=ref.dtype).to(device)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, go)[0],
                               torch.autograd.grad(ref, x2, go)[0], rtol=1e-9, atol=1e-12)


def test_softmax_focal_gamma_zero_is_cross_entropy(device):
    x, t, w = _index_inputs((16, 30), torch.float32, device=device)
    assert torch.equal(wl.focal_loss(x, t, 0.0, w), wl.cross_entropy(x, t, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1000), (4, 19, 16, 16)])
def test_softmax_focal_within_2x_of_composite_error(device, dtype, shape):
    x, t, w = _index_inputs(shape, dtype, seed=6, scale=4.0, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.focal_loss(x1, t, 2.0, w)
    ref = softmax_reference(x2, t, 2.0, w)
    x3 = x.double().requires_grad_()
    exact = softmax_reference(x3, t, 2.0, w.double())
    grads = [torch.autograd.grad(v, a)[0] for v, a in ((ours, x1), (ref, x2), (exact, x3))]
    for o, r, e in ((ours, ref, exact), tuple(grads)):
        assert_within_2x(o, r, e, dtype)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0, 3.0])
def test_softmax_focal_confident_rows_no_nan(device, gamma):
    """p_y = 1 in float32 (logit gaps of 1e4, 100, 30): the loss 0 and the gradient its limit,
    never NaN; against float64 where that is finite."""
    x = torch.zeros(3, 4)
    x[0, 1], x[1, 2], x[2, 0] = 1e4, 100.0, 30.0
    x, t = x.to(device), torch.tensor([1, 2, 0], device=device)
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


def test_softmax_focal_module_and_errors():
    x, t, w = _index_inputs((12, 9), torch.float32)
    crit = wl.FocalLoss(gamma=1.5, weight=w)
    assert "weight" in crit.state_dict()
    torch.testing.assert_close(crit(x, t), softmax_reference(x, t, 1.5, w))
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -0.5"):
        wl.focal_loss(x, t, -0.5)
    with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        wl.focal_loss(x, t, 2.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"probability targets must have the input's shape"):
        wl.focal_loss(x, torch.softmax(x, 1)[:3], 2.0)
    with pytest.raises(ValueError, match=r"weight must have one value per class, shape \(9,\)"):
        wl.focal_loss(x, t, 2.0, w[:4], label_smoothing=0.1)
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        wl.focal_loss(x, torch.full_like(t, 9), 2.0, label_smoothing=0.1)
    # the soft-target forms: smoothing saves a third lse plane (Q), probabilities Q as tsum
    assert _ops.cross_entropy_forward(x, t, w, label_smoothing=0.1, gamma=2.0)[1].shape == (3, 12)


# ---------------------------------------------------------------- soft targets

def soft_reference(x, t, gamma=2.0, weight=None, ignore_index=-100, reduction="mean", s=0.0):
    """-sum_c w_c t'_c (1 - p_c)^gamma log p_c per item, t' = (1 - s) t + s / C, t one-hot for
    indices; the mean over items (probabilities) or over sum(w[y]) of the kept items."""
    d = 0 if x.dim() == 1 else 1
    C = x.shape[d]
    logp = torch.log_softmax(x, dim=d)
    phi = (-torch.expm1(logp)) ** gamma * -logp
    shape = [1] * x.dim()
    shape[d] = C
    w = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    w = w.reshape(shape)
    if t.is_floating_point():
        rows = (w * ((1 - s) * t + s / C) * phi).sum(d)
        return rows if reduction == "none" else rows.sum() if reduction == "sum" else rows.mean()
    valid = t != ignore_index
    y = torch.where(valid, t, torch.zeros_like(t))
    onehot = torch.nn.functional.one_hot(y, C).movedim(-1, d).to(x.dtype)
    rows = (w * ((1 - s) * onehot + s / C) * phi).sum(d) * valid
    if reduction == "none":
        return rows
    wy = w.reshape(-1)[y] * valid
    return rows.sum() if reduction == "sum" else rows.sum() / wy.sum()


def _soft_inputs(shape, prob, dtype=torch.float64, seed=0, device="cpu"):
    x, t, w = _index_inputs(shape, dtype, seed, device=device)
    if prob:
        t = torch.softmax(torch.randn(shape, dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(seed + 1)) * 2, 1)
        t = t.to(device=device, dtype=dtype)
    return x, t, w


@pytest.mark.parametrize("shape", [(24, 10), (3, 5, 4, 6), (7,)])
@pytest.mark.parametrize("prob,s", [(True, 0.0), (True, 0.2), (False, 0.1), (False, 1.0)])
@pytest.mark.parametrize("weighted,reduction", [(True, "mean"), (False, "none"), (True, "sum")])
def test_soft_targets_match_formula(device, shape, prob, s, weighted, reduction):
    if len(shape) == 1:
        x, t, w = _soft_inputs((1, 7), prob, device=device)
        x, t = x[0], t[0] if prob else torch.tensor(3, device=device)
    else:
        x, t, w = _soft_inputs(shape, prob, device=device)
    w = w if weighted else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.focal_loss(x1, t, 1.5, w, reduction=reduction, label_smoothing=s)
    ref = soft_reference(x2, t, 1.5, w, reduction=reduction, s=s)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    go = torch.rand(ref.shape, dtype=ref.dtype).to(device)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, go)[0],
                               torch.autograd.grad(ref, x2, go)[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("s", [0.0, 0.2])
def test_soft_targets_gradient_for_the_target(device, s):
    """Probability targets get their gradient, as PyTorch's cross-entropy gives them; a weight
    that needs one is refused, as there."""
    x, t, w = _soft_inputs((10, 6), True, device=device)
    t1, t2 = t.clone().requires_grad_(), t.clone().requires_grad_()
    ours = wl.focal_loss(x, t1, 2.0, w, label_smoothing=s)
    ref = soft_reference(x, t2, 2.0, w, s=s)
    torch.testing.assert_close(torch.autograd.grad(ours, t1)[0], torch.autograd.grad(ref, t2)[0],
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(NotImplementedError, match="derivative for 'weight'"):
        wl.focal_loss(x, t, 2.0, w.clone().requires_grad_(), label_smoothing=s)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point"):
        wl.focal_loss(x, t, 2.0, w, ignore_index=0, label_smoothing=s)  # as cross-entropy


def test_soft_targets_gamma_zero_is_cross_entropy(device):
    for prob, s in ((True, 0.0), (True, 0.3), (False, 0.1)):
        x, t, w = _soft_inputs((12, 9), prob, device=device)
        torch.testing.assert_close(
            wl.focal_loss(x, t, 1e-300, w, label_smoothing=s),  # gamma > 0: the soft path
            wl.cross_entropy(x, t, w, label_smoothing=s), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_targets_within_2x_of_composite_error(device, dtype):
    for (prob, s), shape in itertools.product(((True, 0.1), (False, 0.1)),
                                              ((128, 300), (4, 19, 16, 16))):
        x, t, w = _soft_inputs(shape, prob, dtype, seed=3, device=device)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = wl.focal_loss(x1, t, 2.0, w, label_smoothing=s)
        ref = soft_reference(x2, t, 2.0, w, s=s)
        x3 = x.double().requires_grad_()
        exact = soft_reference(x3, t.double() if prob else t, 2.0, w.double(), s=s)
        grads = [torch.autograd.grad(v, a)[0] for v, a in ((ours, x1), (ref, x2), (exact, x3))]
        for o, r, e in ((ours, ref, exact), tuple(grads)):
            assert_within_2x(o, r, e, dtype, prob)


def test_soft_targets_confident_rows(device):
    x = torch.zeros(3, 4, device=device)
    x[0, 1], x[1, 2], x[2, 0] = 1e4, 100.0, 30.0
    t = torch.tensor([1, 2, 0], device=device)
    p = torch.softmax(x / 1e4, 1).flip(1)  # probabilities away from the confident class
    for gamma, target in itertools.product((0.25, 1.0, 3.0, 5.0), (t, p)):
        xr, tr = x.clone().requires_grad_(), target.clone().requires_grad_(target is p)
        loss = wl.focal_loss(xr, tr, gamma, reduction="sum", label_smoothing=0.1)
        grads = torch.autograd.grad(loss, [xr, tr] if target is p else [xr])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads), (gamma, loss)


@pytest.mark.parametrize("shape", [(6, 2000), (2, 8192), (2, 150, 3, 5), (4, 70)])
@pytest.mark.parametrize("prob,s", [(True, 0.0), (True, 0.2), (False, 0.3)])
def test_soft_targets_every_kernel_path(device, shape, prob, s):
    """Long rows (a block per row on CUDA; rows few enough to be split for cross-entropy, which
    the focal loss's second pass must not be), lanes over more classes than the CPU's tile holds,
    rows just past the few-class paths; a NaN row and ignored rows (indices) among them."""
    x, t, w = _soft_inputs(shape, prob, device=device)
    x[1].view(-1)[3] = float("nan")  # item(s) of row 1: NaN loss and gradient, as log_softmax
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = wl.focal_loss(x1, t, 0.5, w, reduction="none", label_smoothing=s)
    ref = soft_reference(x2, t, 0.5, w, reduction="none", s=s)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert ours.isnan().any() and not ours[0].isnan().any()
    go = torch.rand(ref.shape, dtype=ref.dtype).to(device)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, go)[0],
                               torch.autograd.grad(ref, x2, go)[0], rtol=1e-10, atol=1e-13,
                               equal_nan=True)


@pytest.mark.parametrize("shape", [(12, 100), (12, 10), (3, 5, 4, 6)])
@pytest.mark.parametrize("prob,s", [(False, 0.0), (False, 0.2), (True, 0.1)])
def test_focal_with_z_loss_and_softcap(device, shape, prob, s):
    """The kernels' other row terms compose with the focal switch (the ops take all three):
    softcap * tanh(x / softcap) read before the focal loss, plus z_loss * w_y * lse^2 per row."""
    x, t, w = _soft_inputs(shape, prob, device=device)
    z, cap, gamma = 0.05, 3.0, 1.5
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    if prob:
        ours = _ops.cross_entropy_prob_forward(x1, t, w, label_smoothing=s, z_loss=z,
                                               softcap=cap, gamma=gamma)[0]
    else:
        ours = _ops.cross_entropy_forward(x1, t, w, label_smoothing=s, z_loss=z, softcap=cap,
                                          gamma=gamma)[0]
    xc = cap * torch.tanh(x2 / cap)
    if prob or s > 0:
        rows = soft_reference(xc, t, gamma, w, reduction="none", s=s)
    else:
        rows = softmax_reference(xc, t, gamma, w, reduction="none")
    lse = torch.logsumexp(xc, 1)
    if prob:
        wy, divisor = torch.ones_like(lse), lse.numel()
    else:
        valid = t != -100
        wy = w[torch.where(valid, t, 0)] * valid
        divisor = wy.sum()
    ref = (rows + z * wy * lse * lse).sum() / divisor
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(ours, x1)[0], torch.autograd.grad(ref, x2)[0],
                               rtol=1e-10, atol=1e-13)
