"""wl.binary_cross_entropy / wl.BCELoss: F.binary_cross_entropy's drop-in (probabilities after a
sigmoid) with pos_weight, on the CPU kernels and the emulated CUDA kernels: PyTorch's values and
gradients without pos_weight (float64 to rounding, 16-bit and float32 within 2x of PyTorch's own
error), the composite's with it, PyTorch's clamps, errors and autocast rule; second derivatives
as PyTorch's (the other modes: tests/test_modes.py)."""
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl
from bars import assert_within_2x

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def composite(p, t, weight=None, reduction="mean", pos_weight=None):
    """-w (P t max(log p, -100) + (1 - t) max(log1p(-p), -100)) in PyTorch ops."""
    if pos_weight is None:
        return F.binary_cross_entropy(p, t, weight, reduction=reduction)
    lp = torch.clamp(torch.log(p), min=-100)
    lq = torch.clamp(torch.log1p(-p), min=-100)
    loss = -(pos_weight * t * lp + (1 - t) * lq)
    loss = loss if weight is None else loss * weight
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _grads(fn, p, t, order=1, **kw):
    p = p.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = fn(p, t, **kw)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=D).reshape(loss.shape).to(loss.dtype)
    gp, gt = torch.autograd.grad(loss, (p, t), go, create_graph=order == 2)
    out = [loss.detach(), gp.detach(), gt.detach()]
    if order == 2:
        v = torch.linspace(-1, 1, gp.numel(), dtype=D).reshape(gp.shape).to(gp.dtype)
        out += list(torch.autograd.grad((gp * v).sum(), (p, t)))
    return out


def _inputs(shape, seed, dtype=D):
    g = _gen(seed)
    p = torch.sigmoid(torch.randn(shape, generator=g, dtype=D) * 3).to(dtype)
    t = torch.rand(shape, generator=g, dtype=D).to(dtype)
    return p, t


SHAPES = [(), (7,), (6, 5), (2, 3, 4, 5), (0, 3), (3, 4097)]
WEIGHTS = {"none": lambda s: None, "last": lambda s: torch.rand(s[-1:], dtype=D) + 0.5,
           "full": lambda s: torch.rand(s, dtype=D) + 0.5}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighting", ["none", "last", "full"])
def test_float64_equals_pytorch_and_the_composite(device, shape, reduction, weighting):
    if weighting == "last" and not shape:
        return
    p, t = _inputs(shape, 1)
    w = WEIGHTS[weighting](shape)
    pw = torch.rand(shape[-1:], dtype=D) * 3 + 0.1
    for pos in (None, pw):
        got = _grads(wl.binary_cross_entropy, p, t, weight=w, reduction=reduction, pos_weight=pos)
        want = _grads(composite, p, t, weight=w, reduction=reduction, pos_weight=pos)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == b.dtype and a.shape == b.shape, i
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13, equal_nan=True,
                                       msg=f"{i} pos_weight={pos is not None}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 33), (4, 8, 16, 16)])
def test_within_2x_of_pytorch(device, dtype, shape):
    p, t = _inputs(shape, 2, dtype)
    w = (torch.rand(shape[-1:], generator=_gen(20), dtype=D) + 0.5).to(dtype)
    for reduction in ("mean", "none"):
        ours = _grads(wl.binary_cross_entropy, p, t, weight=w, reduction=reduction)
        theirs = _grads(F.binary_cross_entropy, p, t, weight=w, reduction=reduction)
        exact = _grads(F.binary_cross_entropy, p.double(), t.double(), weight=w.double(),
                       reduction=reduction)
        for i, (o, th, e) in enumerate(zip(ours, theirs, exact)):
            assert o.dtype == th.dtype
            # p rounded to 0 or 1 in 16 bits: the target's gradient -logit(p) is infinite, ours too
            fin = torch.isfinite(e)
            assert torch.equal(o.double()[~fin], e[~fin]), i
            assert_within_2x(o, th, e, dtype, i, reduction, where=fin)


def test_pos_weight_low_precision_within_2x_of_the_composite(device):
    p, t = _inputs((128, 20), 3, torch.float32)
    pw = torch.rand(20) * 4 + 0.2
    ours = _grads(wl.binary_cross_entropy, p, t, pos_weight=pw)
    theirs = _grads(composite, p, t, pos_weight=pw)
    exact = _grads(composite, p.double(), t.double(), pos_weight=pw.double())
    for o, th, e in zip(ours, theirs, exact):
        assert_within_2x(o, th, e, torch.float32)


def test_clamps_and_the_gradient_eps_as_pytorch(device):
    p = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-13, 1 - 1e-13, 0.5], dtype=D)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 0.2], dtype=D)
    for dtype in (D, torch.float32):
        got = _grads(wl.binary_cross_entropy, p.to(dtype), t.to(dtype), reduction="none")
        want = _grads(F.binary_cross_entropy, p.to(dtype), t.to(dtype), reduction="none")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)
    assert wl.binary_cross_entropy(torch.tensor([0.0]), torch.tensor([1.0])).item() == 100.0


def test_double_backward_as_pytorch():
    p, t = _inputs((5, 4), 4)
    w, pw = torch.rand(4, dtype=D) + 0.5, torch.rand(4, dtype=D) + 0.5
    got = _grads(wl.binary_cross_entropy, p, t, order=2, weight=w)
    want = _grads(F.binary_cross_entropy, p, t, order=2, weight=w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    got = _grads(wl.binary_cross_entropy, p, t, order=2, weight=w, pos_weight=pw)
    want = _grads(composite, p, t, order=2, weight=w, pos_weight=pw)
    for a, b in zip(got, want):  # (1 / p + 1 / (1 - p) and 1 / (p (1 - p)): a few ulp apart)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_errors_as_pytorch(device):
    p, t = _inputs((3, 4), 6, torch.float32)
    for bad in (1.5, -0.1, float("nan")):
        q = p.clone()
        q[1, 2] = bad
        with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
            wl.binary_cross_entropy(q, t)
        with pytest.raises(RuntimeError, match="all elements of input should be between 0 and 1"):
            F.binary_cross_entropy(q, t)
    with pytest.raises(ValueError, match="Using a target size"):
        wl.binary_cross_entropy(p, t[0])
    with pytest.raises(RuntimeError, match="Found dtype Double but expected Float"):
        wl.binary_cross_entropy(p, t.double())
    with pytest.raises(NotImplementedError, match="not implemented for 'Long'"):
        wl.binary_cross_entropy(p.long(), t.long())
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        wl.binary_cross_entropy(p, t, torch.ones(4, requires_grad=True))
    with pytest.raises(RuntimeError) as want:  # torch 2.13's F.binary_cross_entropy's check
        torch.broadcast_shapes(t.size(), torch.Size([3]))
    for fn in (F.binary_cross_entropy, wl.binary_cross_entropy):
        with pytest.raises(RuntimeError, match=re.escape(str(want.value))):
            fn(p, t, torch.ones(3))
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        wl.binary_cross_entropy(p, t, reduction="bad")


def test_cpu_autocast_float32_loss_from_16bit_inputs():
    p, t = _inputs((16, 8), 7, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = wl.binary_cross_entropy(p, t)
        want = F.binary_cross_entropy(p, t)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)


@pytest.mark.cuda
def test_cuda_autocast_raises_as_pytorch():
    """PyTorch's CUDA autocast bans binary_cross_entropy at dispatch: its size check comes first,
    then the ban, whatever the dtypes; the op's own rule gives direct callers the same message."""
    p, t = (x.cuda() for x in _inputs((16, 8), 11, torch.float32))
    cases = [(p, t, None), (p.bfloat16(), t, None), (p, t.double(), None), (p, t[0], None),
             (p, t, torch.ones(8, device="cuda")), (p, t, torch.ones(3, device="cuda"))]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for a, b, w in cases:
            errors = []
            for fn in (F.binary_cross_entropy, wl.binary_cross_entropy):
                with pytest.raises((RuntimeError, ValueError)) as info:
                    fn(a, b, w)
                errors.append((info.type, str(info.value)))
            # the message of a weight that does not broadcast is torch-version specific
            assert errors[0] == errors[1] or (w is not None and w.numel() == 3 and
                                              errors[0][0] == errors[1][0] == RuntimeError)
        with pytest.raises(RuntimeError, match="unsafe to autocast"):
            torch.ops.weighted_loss.binary_cross_entropy_forward(p, t)


def test_module_and_patch():
    w, pw = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    m = wl.BCELoss(weight=w, pos_weight=pw, reduction="sum")
    assert set(m.state_dict()) == {"weight", "pos_weight"}
    assert isinstance(m, torch.nn.BCELoss)
    assert set(wl.BCELoss(weight=w).state_dict()) == set(torch.nn.BCELoss(weight=w).state_dict())
    p, t = _inputs((3, 4), 8, torch.float32)
    torch.testing.assert_close(m(p, t), composite(p, t, w, "sum", pw))
    with wl.patch_torch():
        assert F.binary_cross_entropy is wl.binary_cross_entropy
        assert torch.nn.BCELoss is wl.BCELoss
        torch.testing.assert_close(torch.nn.BCELoss()(p, t), composite(p, t))
    assert F.binary_cross_entropy is not wl.binary_cross_entropy


def test_legacy_arguments_and_empty():
    p, t = _inputs((0, 3), 9, torch.float32)
    assert torch.isnan(wl.binary_cross_entropy(p, t))
    assert wl.binary_cross_entropy(p, t, reduction="sum").item() == 0
    p, t = _inputs((4, 3), 9, torch.float32)
    with pytest.warns(UserWarning):
        got = wl.binary_cross_entropy(p, t, size_average=False)
    torch.testing.assert_close(got, F.binary_cross_entropy(p, t, reduction="sum"))


@pytest.mark.parametrize("shape, pw_shape", [((8, 5), (5,)), ((2, 3, 4, 4), (3, 1, 1)),
                                            ((6, 1), (1,))])
def test_pos_weight_broadcasts_as_for_logits(device, shape, pw_shape):
    p, t = _inputs(shape, 10)
    pw = torch.rand(pw_shape, dtype=D) * 3
    for red, w in itertools.product(("mean", "none"), (None, torch.rand(shape[-1:], dtype=D))):
        got = _grads(wl.binary_cross_entropy, p, t, weight=w, reduction=red, pos_weight=pw)
        want = _grads(composite, p, t, weight=w, reduction=red, pos_weight=pw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [D, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("indexed", [False, True])
def test_every_cuda_instantiation(gpu, dtype, indexed):
    """The CUDA kernels' probability instantiations, each once (tests/test_emulator.py checks
    that every one ran): reduced and per-element losses (a float32 loss of 16-bit inputs under
    autocast), the input's, the target's and both gradients, scalar and per-element upstream
    gradients; against the composite in float64."""
    p, t = _inputs((6, 8), 20, dtype)
    w = (torch.rand(6, 1, dtype=D) + 0.5).to(dtype) if indexed else None  # read by row
    for red, wants in itertools.product(("none", "mean"), ((1, 0), (0, 1), (1, 1))):
        for per_element in ((False, True) if red == "none" else (False,)):
            pr = p.detach().clone().requires_grad_(bool(wants[0]))
            tr = t.detach().clone().requires_grad_(bool(wants[1]))
            loss = wl.binary_cross_entropy(pr, tr, w, reduction=red)
            go = torch.rand(loss.shape, dtype=D).to(loss.dtype) if per_element else \
                torch.ones_like(loss)
            got = torch.autograd.grad(loss, [v for v in (pr, tr) if v.requires_grad], go)
            pd, td = p.detach().double().requires_grad_(), t.detach().double().requires_grad_()
            want_loss = F.binary_cross_entropy(pd, td, None if w is None else w.double(),
                                               reduction=red)
            want = torch.autograd.grad(want_loss, [v for v, k in ((pd, wants[0]), (td, wants[1]))
                                                   if k], go.double())
            tol = dict(rtol=1e-10, atol=1e-12) if dtype == D else dict(rtol=2e-2, atol=1e-2)
            torch.testing.assert_close(loss.double(), want_loss, **tol)
            for a, b in zip(got, want):
                fin = torch.isfinite(b)
                torch.testing.assert_close(a.double()[fin], b[fin], **tol)
    if dtype in (torch.bfloat16, torch.float16):  # a float32 loss of 16-bit inputs
        with torch.autocast("cpu", dtype=dtype):
            loss = wl.binary_cross_entropy(p, t, w, reduction="none")
            loss2 = wl.binary_cross_entropy(p, t, w, reduction="mean")
        assert loss.dtype == loss2.dtype == torch.float32
