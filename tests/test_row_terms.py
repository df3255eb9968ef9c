"""z_loss and softcap of wl.cross_entropy / wl.CrossEntropyLoss / wl.linear_cross_entropy against
their composite definitions: softcap * tanh(logits / softcap) before F.cross_entropy, and
z_loss * logsumexp^2 per row weighted as the row's loss (weight[target], 1 for probabilities),
in the same weighted mean. Every kernel path (rows, few-class rows, (N, C, d...) lanes) on the CPU
and through the emulated CUDA kernels (the modes: tests/test_modes.py)."""
import pytest
import torch

import weighted_loss as wl
from bars import assert_within_2x
from references import cross_entropy_terms as composite

_ops = torch.ops.weighted_loss


def _inputs(shape, prob, dtype=torch.float64, seed=0, scale=4.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    C = shape[0] if len(shape) == 1 else shape[1]
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.3).to(dtype)
    if prob:
        t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), 0 if len(shape) == 1 else 1).to(dtype)
    else:
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.randint(0, C, tshape, generator=g)
        if t.dim():
            t.view(-1)[::3] = -100
    return x.to(device), t.to(device), w.to(device)


# rows (C > 64), few-class rows (C <= 64: transposed tiles), lanes ((N, C, d...))
SHAPES = [(12, 100), (12, 10), (3, 5, 4, 6)]
TERMS = [(0.01, None), (0.0, 5.0), (0.05, 2.0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("z,cap", TERMS)
@pytest.mark.parametrize("ls,weighted,reduction", [(0.0, True, "mean"), (0.1, True, "none"),
                                                   (0.1, False, "sum")])
def test_matches_composite(device, shape, prob, z, cap, ls, weighted, reduction):
    x, t, w = _inputs(shape, prob, device=device)
    w = w if weighted else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=ls)
    x1 = x.clone().requires_grad_()
    ours = wl.cross_entropy(x1, t, z_loss=z, softcap=cap, **kw)
    x2 = x.clone().requires_grad_()
    ref = composite(x2, t, z_loss=z, softcap=cap, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    go = torch.rand(ref.shape, dtype=ref.dtype).to(device)
    torch.testing.assert_close(torch.autograd.grad(ours, x1, go)[0],
                               torch.autograd.grad(ref, x2, go)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 1000), (16, 19, 8, 8)])
def test_within_2x_of_composite_error(device, dtype, shape):
    x, t, w = _inputs(shape, False, dtype, seed=3, scale=6.0, device=device)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=15.0)
    x1 = x.clone().requires_grad_()
    ours = wl.cross_entropy(x1, t, **kw)
    (g1,) = torch.autograd.grad(ours, x1)
    x2 = x.clone().requires_grad_()
    ref = composite(x2, t, **kw)
    (g2,) = torch.autograd.grad(ref, x2)
    x3 = x.double().requires_grad_()
    exact = composite(x3, t, **{**kw, "weight": w.double()})
    (g3,) = torch.autograd.grad(exact, x3)
    for o, r, e in ((ours, ref, exact), (g1, g2, g3)):
        assert_within_2x(o, r, e, dtype)


def test_defaults_are_exactly_without_terms():
    x, t, w = _inputs((32, 100), False, torch.float32)
    a = _ops.cross_entropy_forward(x, t, w, label_smoothing=0.1)
    b = _ops.cross_entropy_forward(x, t, w, label_smoothing=0.1, z_loss=0.0, softcap=None)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.equal(wl.cross_entropy(x, t, weight=w, z_loss=0.0, softcap=None),
                       wl.cross_entropy(x, t, weight=w))


def test_module_and_linear():
    x, t, w = _inputs((12, 100), False)
    crit = wl.CrossEntropyLoss(weight=w, z_loss=0.01, softcap=5.0)
    torch.testing.assert_close(crit(x, t), composite(x, t, weight=w, z_loss=0.01, softcap=5.0))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(100, 8, generator=g, dtype=torch.float64, requires_grad=True)
    for red in ("mean", "none"):
        ours = wl.linear_cross_entropy(h, lw, t, weight=w, reduction=red, z_loss=0.01,
                                       softcap=5.0, chunk_size=5)
        ref = composite(h @ lw.t(), t, weight=w, reduction=red, z_loss=0.01, softcap=5.0)
        torch.testing.assert_close(ours, ref)
        go = torch.rand(ref.shape, dtype=ref.dtype)
        for a, b in zip(torch.autograd.grad(ours, (h, lw), go), torch.autograd.grad(ref, (h, lw), go)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kw,text", [
    ({"z_loss": -1.0}, "z_loss must be a finite number >= 0, got -1.0"),
    ({"z_loss": float("nan")}, "z_loss must be a finite number >= 0, got nan"),
    ({"softcap": 0.0}, "softcap must be a finite number > 0 or None, got 0.0"),
    ({"softcap": -2}, "softcap must be a finite number > 0 or None, got -2"),
    ({"softcap": float("inf")}, "softcap must be a finite number > 0 or None, got inf")])
def test_errors_name_the_argument(kw, text):
    x, t, _ = _inputs((4, 6), False, torch.float32)
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        wl.cross_entropy(x, t, **kw)
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        wl.CrossEntropyLoss(**kw)
    with pytest.raises(ValueError, match=text.replace("(", r"\(")):
        wl.linear_cross_entropy(torch.randn(4, 3), torch.randn(6, 3), t, **kw)


def test_op_checks_its_arguments():
    x, t, _ = _inputs((4, 6), False, torch.float32)
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0, got -1"):
        _ops.cross_entropy_forward(x, t, z_loss=-1.0)
    for cap in (-1.0, 0.0):  # given is on: 0 is no longer "off" (None is)
        with pytest.raises(ValueError, match=f"softcap must be a finite number > 0 .or None., "
                                             f"got {cap:g}"):
            _ops.cross_entropy_prob_forward(x, torch.rand(4, 6), softcap=cap)
