"""wl.linear_cross_entropy against the unfused composite F.cross_entropy(F.linear(...)): loss and
the gradients of input, linear_weight and bias, over chunk sizes (one row, a chunk that does not
divide N, the default), class weights, ignore_index (all ignored too), label smoothing,
probability targets, reductions and dtypes; errors (the modes: tests/test_modes.py)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl
from bars import assert_within_2x


def _case(device, dtype, N=23, H=16, C=40, prob=False, ignore_every=4, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    lead = lead or (N,)
    x = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    lw = torch.randn(C, H, generator=g, dtype=torch.float64) / H ** 0.5 * 3
    b = torch.randn(C, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.2
    if prob:
        t = torch.softmax(torch.randn(*lead, C, generator=g, dtype=torch.float64), -1).to(dtype)
    else:
        t = torch.multinomial(torch.linspace(1, 10, C), x[..., 0].numel(), replacement=True,
                              generator=g).reshape(lead)
        if ignore_every:
            t.view(-1)[::ignore_every] = -100
        t = t.to(device)
    cast = [v.to(device=device, dtype=dtype).requires_grad_() for v in (x, lw, b)]
    return (*cast, t.to(device), w.to(device=device, dtype=dtype))


def _composite(x, lw, t, b, **kw):
    return F.cross_entropy(F.linear(x, lw, b).reshape(-1, lw.shape[0]),
                           t.reshape(-1, lw.shape[0]) if t.is_floating_point() else t.reshape(-1),
                           **kw)


def _both(x, lw, b, t, w, reduction, ls, chunk, prob=False):
    kw = dict(weight=w, reduction=reduction, label_smoothing=ls)
    ref = _composite(x, lw, t, b, **kw)
    if reduction == "none":
        ref = ref.reshape(t.shape[:-1] if prob else t.shape)
    ours = wl.linear_cross_entropy(x, lw, t, b, chunk_size=chunk, **kw)
    go = torch.rand(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref)
    return ours, ref, torch.autograd.grad(ours, (x, lw, b), go), \
        torch.autograd.grad(ref, (x, lw, b), go)


@pytest.mark.parametrize("reduction,ls,prob,chunk", list(itertools.product(
    ["mean", "sum", "none"], [0.0, 0.1], [False, True], [1, 7, 23, None])))
def test_matches_composite_float64(reduction, ls, prob, chunk):
    x, lw, b, t, w = _case("cpu", torch.float64, prob=prob)
    ours, ref, gs, gr = _both(x, lw, b, t, w, reduction, ls, chunk, prob)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(gs, gr):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_composite_within_2x_of_its_error(device, dtype, reduction):
    """Against float64 on the same rounded inputs: loss and every gradient within 2x of the
    composite's own error in the same dtype (or of half an ulp of the largest value)."""
    x, lw, b, t, w = _case(device, dtype, N=64, H=32, C=300, seed=5)
    ours, ref, gs, gr = _both(x, lw, b, t, w, reduction, 0.1, 10)
    x64, lw64, b64 = (v.detach().double().requires_grad_() for v in (x, lw, b))
    exact, _, ge, _ = _both(x64, lw64, b64, t, w.double(), reduction, 0.1, None)
    for o, r, e in zip((ours, *gs), (ref, *gr), (exact, *ge)):
        assert_within_2x(o, r, e, dtype)


def test_leading_dims_weights_ignore_and_all_ignored(device):
    x, lw, b, t, w = _case(device, torch.float32, lead=(3, 7))
    ours, ref, gs, gr = _both(x, lw, b, t, w, "mean", 0.0, 5)
    torch.testing.assert_close(ours, ref)
    for a, c in zip(gs, gr):
        torch.testing.assert_close(a, c)
    t_all = torch.full_like(t, -100)
    ours, ref, gs, gr = _both(x, lw, b, t_all, w, "mean", 0.0, 5)
    assert ours.isnan() and ref.isnan()  # a mean over nothing, as PyTorch
    for a, c in zip(gs, gr):
        torch.testing.assert_close(a, c, equal_nan=True)


def test_without_bias_and_partial_grads():
    x, lw, _, t, w = _case("cpu", torch.float32)
    lw.requires_grad_(False)
    loss = wl.linear_cross_entropy(x, lw, t, weight=w, chunk_size=6)
    (gx,) = torch.autograd.grad(loss, x)
    ref = _composite(x, lw, t, None, weight=w)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, torch.autograd.grad(ref, x)[0])
    with torch.no_grad():
        torch.testing.assert_close(wl.linear_cross_entropy(x, lw, t, weight=w), ref)


def test_module():
    x, lw, b, t, w = _case("cpu", torch.float32)
    crit = wl.LinearCrossEntropyLoss(weight=w.detach(), label_smoothing=0.1, chunk_size=8)
    assert "weight" in crit.state_dict()
    loss = crit(x, lw, t, b)
    torch.testing.assert_close(loss, _composite(x, lw, t, b, weight=w, label_smoothing=0.1))


def test_default_chunk_is_bounded():
    from weighted_loss._linear_chunks import chunk_rows as _chunk_rows
    assert _chunk_rows(16384, 128256, torch.bfloat16, torch.device("cuda")) == 1046
    assert _chunk_rows(8192, 32000, torch.float32, torch.device("cpu")) == 1048
    assert _chunk_rows(10, 32000, torch.float32, torch.device("cpu")) == 10
    assert _chunk_rows(10, 10 ** 9, torch.float32, torch.device("cpu")) == 1


def test_errors_name_the_argument():
    x, lw, b, t, w = _case("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"linear_weight must be \(C, 16\)"):
        wl.linear_cross_entropy(x, lw[:, :5], t)
    with pytest.raises(TypeError, match="linear_weight must have the input's dtype"):
        wl.linear_cross_entropy(x, lw.double(), t)
    with pytest.raises(ValueError, match=r"bias must be \(40,\)"):
        wl.linear_cross_entropy(x, lw, t, bias=b[:3])
    with pytest.raises(ValueError, match=r"target must have shape \(23,\)"):
        wl.linear_cross_entropy(x, lw, t[:5])
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        wl.linear_cross_entropy(x, lw, t, chunk_size=0)
    with pytest.raises(ValueError, match="reduction must be"):
        wl.linear_cross_entropy(x, lw, t, reduction="avg")
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        wl.linear_cross_entropy(x, lw, t, weight=w[:3])
    with pytest.raises(IndexError, match="Target 40 is out of bounds"):
        wl.linear_cross_entropy(x, lw, torch.full_like(t, 40))


@pytest.mark.parametrize("layout", ["rows", "few-classes", "lanes", "row-strided", "transposed"])
@pytest.mark.parametrize("ls,z,cap", [(0.0, 0.0, None), (0.1, 0.01, 4.0)])
def test_backward_over_the_logits_equals_out_of_place(device, layout, ls, z, cap):
    """cross_entropy_backward_ (the gradient written over the logits, as linear_cross_entropy
    uses it) equals cross_entropy_backward on every layout, including those it copies."""
    ops = torch.ops.weighted_loss
    g = torch.Generator().manual_seed(2)
    if layout == "rows":
        x = torch.randn(9, 300, generator=g)
    elif layout == "few-classes":
        x = torch.randn(33, 7, generator=g)
    elif layout == "lanes":
        x = torch.randn(2, 5, 6, 7, generator=g)
    elif layout == "row-strided":
        x = torch.randn(9, 320, generator=g).to(device)[:, :300]
    else:
        x = torch.randn(300, 9, generator=g).t()
    C = x.shape[1]
    t = torch.randint(0, C, (x.shape[0], *x.shape[2:]), generator=g)
    t.view(-1)[::4] = -100
    w = torch.rand(C, generator=g) + 0.5
    x, t, w = x.to(device), t.to(device), w.to(device)  # layouts kept: dense strides move as-is
    kw = dict(label_smoothing=ls, z_loss=z, softcap=cap)
    loss, lse, tw = ops.cross_entropy_forward(x, t, w, **kw)
    one = torch.tensor(0.7, device=device)
    ref = ops.cross_entropy_backward(one, x, t, w, lse, tw, **kw)
    buf = x.clone() if layout not in ("row-strided", "transposed") else x
    if layout == "row-strided":
        base = torch.randn(9, 320, generator=g).to(device)
        base[:, :300] = x
        buf = base[:, :300]
    elif layout == "transposed":
        buf = x.t().clone().t()
    ops.cross_entropy_backward_(one, buf, t, w, lse, tw, **kw)
    torch.testing.assert_close(buf, ref, rtol=0, atol=0)


def test_non_contiguous_input_and_weight():
    x, lw, b, t, w = _case("cpu", torch.float64, N=12, H=8, C=20)
    xt = x.detach().t().contiguous().t().requires_grad_()   # (N, H) with column-major strides
    lwt = lw.detach().t().contiguous().t().requires_grad_()
    ours, ref, gs, gr = _both(xt, lwt, b, t, w, "mean", 0.1, 5)
    torch.testing.assert_close(ours, ref)
    for a, c in zip(gs, gr):
        torch.testing.assert_close(a, c)


def test_total_weight_over_micro_batches_is_the_whole_batch_mean():
    """total_weight= (wl.total_weight of a step's micro-batches): the micro-batches' losses add up
    to the whole batch's weighted mean, and so do their gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64, requires_grad=True)
    lw = torch.randn(9, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (60,), generator=g)
    y[::7] = -100
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.2
    total = wl.total_weight([y[:25], y[25:]], weight=w)
    fn = wl.LinearCrossEntropyLoss(weight=w, chunk_size=7)
    loss = fn(x[:25], lw, y[:25], b, total_weight=total) + fn(x[25:], lw, y[25:], b,
                                                                total_weight=total)
    ref = F.cross_entropy(F.linear(x, lw, b), y, weight=w)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(loss, (x, lw, b)), torch.autograd.grad(ref, (x, lw, b))):
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="reduction='mean'"):
        wl.linear_cross_entropy(x, lw, y, reduction="sum", total_weight=total)


def test_default_chunk_bounds_small_batches():
    """The default chunk holds at most a quarter of the rows' logits (at least 256 rows) and at
    most 128 MiB of logits on the CPU: 1,000 rows at 32,000 classes once held all of them."""
    from weighted_loss._linear_chunks import chunk_rows as _chunk_rows
    cpu = torch.device("cpu")
    assert _chunk_rows(1000, 32000, torch.float32, cpu) == 256
    assert _chunk_rows(100, 32000, torch.float32, cpu) == 100
    assert _chunk_rows(8192, 32000, torch.float32, cpu) == (128 << 20) // (32000 * 4)
    assert _chunk_rows(4000, 1000, torch.bfloat16, cpu) == 1000


@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_derivatives_through_the_fused_path(reduction, prob):
    """gradgradcheck of the fused path (create_graph=True forms the loss again through the
    composite): input, weight, bias and the logit adjustment, with smoothing, z-loss and sample
    weights."""
    g = torch.Generator().manual_seed(3)
    x, lw = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
             for s in ((6, 5), (7, 5)))
    b, a = (torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) for _ in "ba")
    t = torch.softmax(torch.randn(6, 7, generator=g, dtype=torch.float64), 1) if prob else \
        torch.tensor([0, 3, -100, 6, 2, 3])
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    v = torch.rand(6, generator=g, dtype=torch.float64) + 0.5

    def f(x, lw, b, a):
        return wl.linear_cross_entropy(x, lw, t, bias=b, weight=w, reduction=reduction,
                                       label_smoothing=0.1, z_loss=1e-3, logit_adjustment=a,
                                       sample_weight=v)
    assert torch.autograd.gradgradcheck(f, (x, lw, b, a))
