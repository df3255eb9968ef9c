"""logit_adjustment= and sample_weight= on the cross-entropy losses (weighted_loss/_reweight.py),
against their composites: ``F.cross_entropy(input + a, ...)`` and
``(v * F.cross_entropy(..., reduction="none")).sum() / (v * weight[y] * kept).sum()``; float64 to
rounding, float32 and bfloat16 within 2x of the composite's own error against float64; the
helpers wl.logit_adjustment and wl.adjust_logits; the modules' buffers; the errors."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl
from bars import assert_within_2x
from references import focal_reference

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _view(a, x):
    cdim = 0 if x.dim() == 1 else 1
    return a.view((a.shape[0],) + (1,) * (x.dim() - cdim - 1))


def composite(x, y, *, a=None, v=None, weight=None, reduction="mean", ignore_index=-100,
              label_smoothing=0.0, gamma=0.0):
    """The reference: PyTorch's ops (the focal loss: tests/fuzz_references.py's)."""
    z = x if a is None else x + _view(a, x)
    prob = y.is_floating_point()

    def rows(red):
        if gamma:  # tests/references.py's
            return focal_reference(z, y, gamma, weight, ignore_index, red, label_smoothing)
        return F.cross_entropy(z, y, weight, ignore_index=ignore_index, reduction=red,
                               label_smoothing=label_smoothing)
    if v is None:
        return rows(reduction)
    r = rows("none")
    if prob:
        vk, div = v.expand(r.shape), v.expand(r.shape).sum()
    else:
        valid = y != ignore_index
        vk = torch.where(valid, v.expand(y.shape), torch.zeros((), dtype=v.dtype))
        wy = valid.to(v.dtype) if weight is None else \
            weight[torch.where(valid, y, 0)].to(v.dtype) * valid
        div = (vk * wy).sum()
    if reduction == "none":
        return r * vk
    s = (r * vk).sum()
    return s if reduction == "sum" else s / div


def _grads(fn, x, y, extra=(), **kw):
    """(loss, d/dx, d/d each of `extra`'s tensors (by keyword name)) with a fixed upstream."""
    x = x.detach().clone().requires_grad_()
    ex = {k: kw[k].detach().clone().requires_grad_() for k in extra}
    kw = {**kw, **ex}
    loss = fn(x, y, **kw)
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=D).reshape(loss.shape).to(loss.dtype)
    gs = torch.autograd.grad(loss, [x, *ex.values()], go)
    return [loss.detach(), *gs]


def ours(x, y, *, gamma=0.0, **kw):
    if gamma:
        return wl.focal_loss(x, y, gamma, **kw)
    return wl.cross_entropy(x, y, **kw)


CASES = [  # (input shape, target kind)
    ((6, 5), "index"), ((5,), "index"), ((3, 4, 5, 2), "index"), ((6, 5), "prob"),
    ((2, 7, 3), "prob"), ((4, 2100), "index"), ((2, 8300), "index"), ((2, 8300), "prob"),
    ((0, 5), "index"), ((0, 5, 3), "index"), ((0, 4), "prob"),
]


def _case(shape, kind, seed, dtype=D):
    g = _gen(seed)
    x = (torch.randn(shape, generator=g, dtype=D) * 2).to(dtype)
    cdim = 0 if len(shape) == 1 else 1
    C = shape[cdim]
    items = shape[:cdim] + shape[cdim + 1:]
    if kind == "prob":
        y = torch.softmax(torch.randn(shape, generator=g, dtype=D), cdim).to(dtype)
    else:
        y = torch.randint(0, max(C, 1), items, generator=g)
        if C == 0:  # no class: every item ignored
            y.fill_(-100)
        elif y.numel() > 2:
            y.view(-1)[1] = -100
    a = torch.randn(C, generator=g, dtype=D) * 3
    v = torch.rand(items, generator=g, dtype=D) * 2
    w = torch.rand(C, generator=g, dtype=D) + 0.2
    return x, y, a, v, w


@pytest.mark.parametrize("shape, kind", CASES)
@pytest.mark.parametrize("what", ["adjust", "sample", "both"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_equals_the_composite(device, shape, kind, what, reduction):
    for gamma, smoothing, weighted in itertools.product((0.0, 2.0), (0.0, 0.1), (False, True)):
        if gamma and shape == (4, 2100):
            continue
        x, y, a, v, w = _case(shape, kind, 1)
        kw = dict(reduction=reduction, label_smoothing=smoothing, weight=w if weighted else None,
                  gamma=gamma)
        extra = []
        if what in ("adjust", "both"):
            kw["logit_adjustment"], extra = a, extra + ["logit_adjustment"]
        if what in ("sample", "both"):
            kw["sample_weight"], extra = v, extra + ["sample_weight"]
        ref_kw = {k: v_ for k, v_ in kw.items() if k not in ("logit_adjustment", "sample_weight")}
        ref_kw.update(a=kw.get("logit_adjustment"), v=kw.get("sample_weight"))
        got = _grads(ours, x, y, extra, **kw)

        def ref(x, y, logit_adjustment=None, sample_weight=None, **k):
            return composite(x, y, a=logit_adjustment, v=sample_weight, **k)
        want = _grads(ref, x, y, extra, **kw)
        for i, (p, q) in enumerate(zip(got, want)):
            assert p.shape == q.shape, (i, gamma, smoothing, weighted)
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, equal_nan=True,
                                       msg=f"{i} gamma={gamma} s={smoothing} w={weighted}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, kind", [((64, 40), "index"), ((4, 6, 8, 8), "index"),
                                         ((32, 40), "prob"), ((8, 3000), "index")])
def test_low_precision_within_2x_of_the_composite(device, dtype, shape, kind):
    x, y, a, v, w = _case(shape, kind, 2)
    for red, weighted in itertools.product(("mean", "none"), (False, True)):
        wt = w.to(dtype) if weighted else None
        kw = dict(reduction=red, weight=wt)
        lo = dict(logit_adjustment=a.to(dtype), sample_weight=v.to(dtype))
        got = _grads(ours, x.to(dtype), y.to(dtype) if kind == "prob" else y, (), **kw, **lo)

        def ref(x, y, **k):
            return composite(x, y, a=lo["logit_adjustment"].to(x.dtype),
                             v=lo["sample_weight"].to(x.dtype), **k)
        theirs = _grads(ref, x.to(dtype), y.to(dtype) if kind == "prob" else y, (), **kw)
        exact = _grads(ref, x.to(dtype).double(), y.to(dtype).double() if kind == "prob" else y,
                       (), reduction=red, weight=None if wt is None else wt.double())
        for i, (o, t, e) in enumerate(zip(got, theirs, exact)):
            assert o.dtype == t.dtype, (i, o.dtype, t.dtype)
            # the floor an ulp, the fuzzer's: the CUDA kernels' gradient of a row is within ~1.5
            # ulp, where the composite is exact by luck on some draws
            assert_within_2x(o, t, e, dtype, i, red, weighted, ulps=1.0)


def test_adjustment_in_float32_beside_bfloat16_logits_computes_in_float32():
    """PyTorch's promotion: bfloat16 logits + a float32 adjustment are float32 logits."""
    x, y, a, _, _ = _case((16, 10), "index", 3)
    xb = x.to(torch.bfloat16)
    loss = wl.cross_entropy(xb, y, logit_adjustment=a.float())
    want = F.cross_entropy(xb + a.float(), y)
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want)


def test_sample_weight_keeps_the_loss_dtype():
    x, y, _, v, _ = _case((16, 10), "index", 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        loss = wl.cross_entropy(x.to(dtype), y, sample_weight=v)  # a float64 v
        assert loss.dtype == dtype


def test_sample_weight_broadcasts_and_ignored_items_are_not_read():
    x, y, _, _, w = _case((4, 5, 3), "index", 4)
    y[0, 0] = -100
    v = torch.rand(4, 1, dtype=D)
    got = wl.cross_entropy(x, y, weight=w, sample_weight=v)
    torch.testing.assert_close(got, composite(x, y, weight=w, v=v.expand(4, 3)))
    # an ignored item's NaN or inf weight stays out of the loss and its divisor
    vv = torch.rand(4, 3, dtype=D)
    vv[0, 0] = float("nan")
    got = wl.cross_entropy(x, y, weight=w, sample_weight=vv)
    vv0 = vv.clone()
    vv0[0, 0] = 0
    torch.testing.assert_close(got, composite(x, y, weight=w, v=vv0))
    assert torch.isfinite(got)


def test_all_ones_sample_weight_is_the_plain_loss():
    for kind in ("index", "prob"):
        x, y, _, _, w = _case((8, 6, 2), kind, 5)
        kw = dict(weight=w) if kind == "index" else {}
        for red in ("mean", "sum", "none"):
            plain = wl.cross_entropy(x, y, reduction=red, **kw)
            ones = wl.cross_entropy(x, y, reduction=red, sample_weight=torch.ones(8, 2, dtype=D),
                                    **kw)
            torch.testing.assert_close(ones, plain, rtol=1e-13, atol=1e-14)


def test_zero_adjustment_is_the_plain_loss_bit_for_bit():
    x, y, _, _, w = _case((8, 6), "index", 6, torch.float32)
    plain = wl.cross_entropy(x, y, weight=w.float())
    assert torch.equal(wl.cross_entropy(x, y, weight=w.float(),
                                        logit_adjustment=torch.zeros(6)), plain)


def test_total_weight_with_sample_weights_over_micro_batches():
    x, y, _, v, w = _case((12, 5), "index", 7)
    parts = [(x[:5], y[:5], v[:5]), (x[5:], y[5:], v[5:])]
    tw = wl.total_weight([p[1] for p in parts], w, sample_weights=[p[2] for p in parts])
    total = sum(wl.cross_entropy(px, py, weight=w, sample_weight=pv, total_weight=tw)
                for px, py, pv in parts)
    torch.testing.assert_close(total, composite(x, y, weight=w, v=v), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="sample_weights for 2 targets"):
        wl.total_weight([p[1] for p in parts], w, sample_weights=[v])


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_linear_cross_entropy(device, chunk, kind):
    g = _gen(8)
    x = torch.randn(10, 6, dtype=D, generator=g)
    lw = torch.randn(7, 6, dtype=D, generator=g)
    b = torch.randn(7, dtype=D, generator=g)
    y = torch.softmax(torch.randn(10, 7, generator=g, dtype=D), 1) if kind == "prob" else \
        torch.tensor([0, 1, 2, 3, 4, 5, 6, -100, 1, 2])
    a = torch.randn(7, dtype=D, generator=g)
    v = torch.rand(10, dtype=D, generator=g)
    w = None if kind == "prob" else torch.rand(7, dtype=D, generator=g) + 0.5
    for red, (use_a, use_v) in itertools.product(("mean", "sum", "none"),
                                                 ((1, 0), (0, 1), (1, 1))):
        ts = [t.clone().requires_grad_() for t in (x, lw, b, a, v)]
        kw = dict(weight=w, reduction=red, chunk_size=chunk)
        if use_a:
            kw["logit_adjustment"] = ts[3]
        if use_v:
            kw["sample_weight"] = ts[4]
        got = wl.linear_cross_entropy(ts[0], ts[1], y, ts[2], **kw)
        rs = [t.clone().requires_grad_() for t in (x, lw, b, a, v)]
        want = composite(F.linear(rs[0], rs[1], rs[2]), y, a=rs[3] if use_a else None,
                         v=rs[4] if use_v else None, weight=w, reduction=red)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
        go = torch.linspace(0.5, 1.5, got.numel(), dtype=D).reshape(got.shape)
        got.backward(go)
        want.backward(go)
        for i, (p, q) in enumerate(zip(ts, rs)):
            if q.grad is None:
                assert p.grad is None or not (use_a if i == 3 else use_v if i == 4 else 1)
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=f"{i} {red}")


def test_linear_cross_entropy_bfloat16_within_2x():
    g = _gen(9)
    x = torch.randn(64, 32, generator=g, dtype=D)
    lw = torch.randn(50, 32, generator=g, dtype=D) * 0.3
    y = torch.randint(0, 50, (64,), generator=g)
    a = torch.randn(50, generator=g, dtype=D)
    v = torch.rand(64, generator=g, dtype=D)
    lo = torch.bfloat16
    got = _grads(lambda x, y, **k: wl.linear_cross_entropy(x, lw.to(lo), y, chunk_size=16, **k),
                 x.to(lo), y, (), logit_adjustment=a.to(lo), sample_weight=v.to(lo))
    theirs = _grads(lambda x, y: composite(F.linear(x, lw.to(lo)), y, a=a.to(lo), v=v.to(lo)),
                    x.to(lo), y)
    exact = _grads(lambda x, y: composite(F.linear(x, lw.to(lo).double()), y,
                                          a=a.to(lo).double(), v=v.to(lo).double()),
                   x.to(lo).double(), y)
    for o, t, e in zip(got, theirs, exact):
        assert_within_2x(o, t, e, lo)


def test_autocast_reads_16bit_logits_with_sample_weight():
    x, y, a, v, w = _case((16, 12), "index", 11)
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = wl.cross_entropy(xb, y, weight=w.float(), sample_weight=v.float())
        want = composite(xb.float(), y, weight=w.float(), v=v.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_modules_carry_the_adjustment_in_state_dict():
    a = wl.logit_adjustment([10, 100, 1000])
    m = wl.CrossEntropyLoss(weight=torch.ones(3), logit_adjustment=a)
    assert set(m.state_dict()) == {"weight", "logit_adjustment"}
    m2 = wl.CrossEntropyLoss(weight=torch.ones(3), logit_adjustment=torch.zeros(3))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.logit_adjustment, a)
    plain = wl.CrossEntropyLoss(weight=torch.ones(3))
    assert set(plain.state_dict()) == set(torch.nn.CrossEntropyLoss(
        weight=torch.ones(3)).state_dict())
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    v = torch.rand(4)
    torch.testing.assert_close(m(x, y, sample_weight=v),
                               composite(x, y, a=a, v=v, weight=torch.ones(3)))
    f = wl.FocalLoss(gamma=2.0, logit_adjustment=a)
    assert "logit_adjustment" in f.state_dict()
    torch.testing.assert_close(f(x, y, sample_weight=v), composite(x, y, a=a, v=v, gamma=2.0))
    lin = wl.LinearCrossEntropyLoss(logit_adjustment=a)
    h, lw = torch.randn(4, 5), torch.randn(3, 5)
    torch.testing.assert_close(lin(h, lw, y, sample_weight=v),
                               composite(F.linear(h, lw), y, a=a, v=v))


def test_logit_adjustment_helper():
    a = wl.logit_adjustment([1, 3, 6], tau=2.0)
    torch.testing.assert_close(a, (2 * torch.log(torch.tensor([1, 3, 6.]) / 10)).float())
    assert a.dtype == torch.float32
    a = wl.logit_adjustment(labels=torch.tensor([0, 1, 1, 2, 2, 2, -1]), ignore_index=-1)
    torch.testing.assert_close(a, torch.log(torch.tensor([1, 2, 3.]) / 6))
    with pytest.warns(UserWarning, match=r"classes \[1\] have a count of 0"):
        a = wl.logit_adjustment([4, 0, 4])
    assert torch.isfinite(a).all() and a[1] < a[0]
    torch.testing.assert_close(a, torch.log(torch.tensor([4, 0.5, 4]) / 8.5))
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        wl.logit_adjustment([1, 2], tau=-1)
    with pytest.raises(ValueError, match="every class has a count of 0"):
        wl.logit_adjustment([0, 0])
    # a zero-count class's target gives a finite loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = wl.logit_adjustment([5, 0, 5])
    assert torch.isfinite(wl.cross_entropy(torch.zeros(2, 3), torch.tensor([1, 1]),
                                           logit_adjustment=a))


def test_adjust_logits():
    a = wl.logit_adjustment([1, 10, 100])
    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(wl.adjust_logits(x, a), x - a.view(3, 1))
    torch.testing.assert_close(wl.adjust_logits(x[0, :, 0], a), x[0, :, 0] - a)
    with pytest.raises(ValueError, match="logits have 3 classes"):
        wl.adjust_logits(x, a[:2])
    with pytest.raises(ValueError, match="0-d"):
        wl.adjust_logits(torch.tensor(1.0), a)
    # post-hoc: the argmax moves toward the rare classes
    flat = torch.zeros(5, 3)
    assert (wl.adjust_logits(flat, a).argmax(1) == 0).all()


def test_errors_name_the_argument():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"logit_adjustment must have one value per class, shape "
                                         r"\(3,\), got \(4,\)"):
        wl.cross_entropy(x, y, logit_adjustment=torch.zeros(4))
    with pytest.raises(TypeError, match="logit_adjustment must be a floating tensor"):
        wl.cross_entropy(x, y, logit_adjustment=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="logit_adjustment must be a tensor or None"):
        wl.cross_entropy(x, y, logit_adjustment=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"sample_weight of shape \(5,\) does not broadcast to "
                                         r"the items' shape \(4,\)"):
        wl.cross_entropy(x, y, sample_weight=torch.ones(5))
    with pytest.raises(ValueError, match=r"focal_loss: sample_weight of shape \(4, 1\)"):
        wl.focal_loss(x, y, sample_weight=torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"linear_cross_entropy: sample_weight"):
        wl.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y,
                                sample_weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"linear_cross_entropy: logit_adjustment must be"):
        wl.linear_cross_entropy(torch.randn(4, 2), torch.randn(3, 2), y,
                                logit_adjustment=torch.ones(2))


def test_sample_weight_gradient_and_negative_values_as_the_composite():
    x, y, _, v, w = _case((6, 4), "index", 12)
    v = v - 0.5  # some negative: taken as PyTorch takes a negative class weight
    got = _grads(ours, x, y, ["sample_weight"], weight=w, sample_weight=v)
    want = _grads(lambda x, y, sample_weight, **k: composite(x, y, v=sample_weight, **k), x, y,
                  ["sample_weight"], weight=w, sample_weight=v)
    for p, q in zip(got, want):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_the_kernels_read_the_adjustment_beside_the_logits(monkeypatch):
    """An adjustment of the logits' dtype (or float32 beside 16-bit logits) is read by the fused
    kernels: input + a is never formed (the fallback raises here); with softcap it is."""
    from weighted_loss import _reweight

    def no_copy(*args, **kwargs):
        raise AssertionError("input + logit_adjustment was formed")
    monkeypatch.setattr(_reweight, "adjusted", no_copy)
    for dtype, adt in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                       (torch.bfloat16, torch.bfloat16), (D, D)):
        for kind in ("index", "prob"):
            x, y, a, v, w = _case((6, 5, 3), kind, 13)
            x = x.to(dtype).requires_grad_()
            y = y.to(dtype) if kind == "prob" else y
            loss = wl.cross_entropy(x, y, weight=w.to(dtype), logit_adjustment=a.to(adt),
                                    sample_weight=v.to(dtype), label_smoothing=0.1)
            loss.backward()
            assert loss.dtype == torch.promote_types(dtype, adt)
            wl.focal_loss(x, y, logit_adjustment=a.to(adt)).backward()
    with pytest.raises(AssertionError, match="was formed"):
        wl.cross_entropy(x, y, logit_adjustment=a.to(dtype), softcap=5.0)


def test_adjustment_beside_softcap_caps_the_adjusted_logits(device):
    x, y, a, _, w = _case((6, 7), "index", 14)
    got = _grads(ours, x, y, ["logit_adjustment"], weight=w, softcap=3.0, logit_adjustment=a)

    def ref(x, y, logit_adjustment, **k):
        z = x + logit_adjustment
        return F.cross_entropy(3.0 * torch.tanh(z / 3.0), y, weight=w)
    want = _grads(ref, x, y, ["logit_adjustment"], logit_adjustment=a)
    for p_, q in zip(got, want):
        torch.testing.assert_close(p_, q, rtol=1e-10, atol=1e-12)

