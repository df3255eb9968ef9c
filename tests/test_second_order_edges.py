"""Second derivatives at the edges, against the exact value (mpmath at 400 digits, rounded to the
dtype): BCE with pos_weight in the logits' tails, where aten's log_sigmoid forms sigmoid(x) - 1 and
gets 0 (or a stray value) for e^-|x|; the sigmoid focal loss with respect to targets exactly 0 or
1, where torchvision's 1 - p_t cancels to 0 and its double backward is NaN or 80x off."""
import mpmath
import pytest
import torch

import weighted_loss as wl

mpmath.mp.dps = 400
LOGITS = (1e4, -1e4, 700.0, -700.0, 100.0, -100.0, 88.0, -88.0, 50.0, -50.0, 3.0, -3.0, 0.0)


def _close(got, exact, dtype):
    """Within 1e-4 relative, or both below the dtype's smallest normal (denormals round)."""
    tiny = torch.finfo(dtype).tiny
    return max(abs(got), abs(exact)) < tiny or abs(got - exact) <= 1e-4 * abs(exact)


def _bce_exact(x, t, pw, w):
    e = mpmath.exp(-abs(mpmath.mpf(x)))
    return float(((1 - t) + pw * t) * w * e / (1 + e) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_pos_weight_second_derivative_in_the_tails(device, dtype):
    bad = []
    for x0 in LOGITS:
        for t0, pw0, w0 in ((0.0, 0.5, 1.0), (0.25, 10.0, 3.0), (1.0, 2.0, 1.0)):
            x = torch.tensor([x0], dtype=dtype, device=device, requires_grad=True)
            t = torch.tensor([t0], dtype=dtype, device=device)
            pw = torch.tensor([pw0], dtype=dtype, device=device)
            w = torch.tensor([w0], dtype=dtype, device=device)
            loss = wl.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, reduction="sum")
            g, = torch.autograd.grad(loss, x, create_graph=True)
            h, = torch.autograd.grad(g.sum(), x)
            exact = torch.tensor(_bce_exact(x0, t0, pw0, w0), dtype=dtype).item()
            if not _close(h.item(), exact, dtype):
                bad.append((x0, t0, pw0, w0, h.item(), exact))
    assert not bad, bad


def _focal_exact(x, t, gamma, alpha):
    def loss(tt):
        p = 1 / (1 + mpmath.exp(-mpmath.mpf(x)))
        ce = -(tt * mpmath.log(p) + (1 - tt) * mpmath.log(1 - p))
        q = p * (1 - tt) + (1 - p) * tt
        return (alpha * tt + (1 - alpha) * (1 - tt)) * ce * q ** gamma
    return float(mpmath.diff(loss, mpmath.mpf(t), 2))


@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0, 3.0])
def test_sigmoid_focal_second_derivative_in_the_target_at_0_and_1(device, gamma):
    """Exact where the value is representable: at |x| = 40 in float64 1 - p_t is e^-40, not the
    0 that torchvision's p * t + (1 - p) * (1 - t) rounds to."""
    for x0, t0 in ((40.0, 1.0), (-40.0, 0.0), (3.0, 0.0), (-2.0, 1.0)):
        x = torch.tensor([x0], dtype=torch.float64, device=device)
        t = torch.tensor([t0], dtype=torch.float64, device=device, requires_grad=True)
        g, = torch.autograd.grad(wl.sigmoid_focal_loss(x, t, 0.25, gamma, "sum"), t,
                                 create_graph=True)
        h, = torch.autograd.grad(g.sum(), t)
        exact = _focal_exact(x0, t0, gamma, 0.25)
        assert _close(h.item(), exact, torch.float64), (x0, t0, h.item(), exact)
