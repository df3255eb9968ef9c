"""weighted_loss.binary_cross_entropy_with_logits against F.binary_cross_entropy_with_logits:
values and both gradients over shapes, weight / pos_weight broadcast patterns, reductions and
dtypes; saturated logits; corner cases; the module; errors; determinism across runs and thread
counts. (gradcheck, opcheck, torch.compile: tests/test_modes.py.)"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl

from bars import assert_within_2x

LOW = (torch.bfloat16, torch.float16)
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# shape -> the broadcast weight shapes tried on it (None: absent)
PATTERNS = {
    "0d": ((), [None, ()]),
    "N": ((37,), [None, (1,), (37,), ()]),
    "NC": ((33, 7), [None, (7,), (1, 7), (33, 1), (33, 7)]),
    "NC-long": ((5, 2100), [None, (2100,), (5, 1)]),  # rows of more than one block
    "NC-few": ((300, 3), [None, (3,)]),  # few classes: short rows
    "NC-few-joined": ((22000, 3), [None, (3,)]),  # large enough for rows joined, weights repeated
    "NCHW": ((2, 5, 6, 7), [None, (5, 1, 1), (1, 5, 1, 1), (2, 1, 6, 7), (7,), (6, 1),
                            (2, 5, 6, 7)]),
}


def _cases():
    for name, (shape, pats) in PATTERNS.items():
        pairs = {(w, None) for w in pats} | {(None, p) for p in pats}
        pairs |= {(pats[-1], pats[1 if len(pats) > 1 else 0]), (pats[1 if len(pats) > 1 else 0], pats[-1])}
        for w, p in sorted(pairs, key=str):
            yield name, w, p


CASES = list(_cases())


def make(shape, dtype, device, wshape=None, pshape=None, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64))
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    hard = torch.rand(shape, generator=g, dtype=torch.float64) < 0.4
    t = torch.where(hard, t.round(), t)  # hard 0/1 labels among the soft ones
    w = None if wshape is None else 0.1 + 2 * torch.rand(wshape, generator=g, dtype=torch.float64)
    pw = None if pshape is None else 0.1 + 10 * torch.rand(pshape, generator=g, dtype=torch.float64)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    cast = lambda v: None if v is None else v.to(device=device, dtype=wdt)  # noqa: E731
    return (x.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype), cast(w), cast(pw))


def run(fn, x, t, w, pw, reduction, target_grad=True):
    # detach() keeps the storage offset and strides the case was built with (clone() would not)
    x = x.detach().requires_grad_(True)
    t = t.detach().requires_grad_(target_grad)
    loss = fn(x, t, weight=w, pos_weight=pw, reduction=reduction)
    # upstream gradients exact in every dtype (bfloat16's 8 bits), so that the float64 reference
    # sees the values the 16-bit runs see
    go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    go = go.to(torch.bfloat16).to(device=loss.device, dtype=loss.dtype)
    grads = torch.autograd.grad(loss, [x, t] if target_grad else [x], go)
    return [loss.detach()] + [g.detach() for g in grads]


def reference(x, t, w, pw, reduction, target_grad=True):
    d = lambda v: None if v is None else v.double()  # noqa: E731
    return run(F.binary_cross_entropy_with_logits, x.double(), t.double(), d(w), d(pw), reduction,
               target_grad)


def check_close(fused, native, ref, dtype):
    """float64: fused == native to rounding. float32, bfloat16, float16: fused's error against the
    float64 reference within twice PyTorch's own error in that dtype, over the finite elements
    (tests/bars.py), or of an ulp of the largest value: both compute (P - 1) softplus(-x) - x and
    the like, which cancel near their zeros."""
    for a, b, r in zip(fused, native, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-10, atol=1e-12)
            continue
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        # a floor of an ulp, as the fuzzer's: every gradient element is a product of 4-5 rounded
        # terms, ~1 ulp of error for PyTorch too (over 30 seeds of the NCHW case, float32: max
        # 1.06 ulp of the largest value for PyTorch, 1.31 for us; means 0.61 and 0.72)
        assert_within_2x(a, b, r, dtype, where=torch.isfinite(b.double()) & torch.isfinite(r),
                         ulps=1)


@pytest.mark.grid
@pytest.mark.parametrize("name,wshape,pshape", CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_parity(device, name, wshape, pshape, reduction, dtype):
    x, t, w, pw = make(PATTERNS[name][0], dtype, device, wshape, pshape)
    fused = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    native = run(F.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    check_close(fused, native, reference(x, t, w, pw, reduction), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("wshape", [None, (5, 1, 1)], ids=["unweighted", "broadcast"])
def test_input_grad_only(device, dtype, reduction, wshape):
    x, t, w, pw = make((4, 5, 6, 7), dtype, device, wshape, wshape)
    fused = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, reduction, target_grad=False)
    native = run(F.binary_cross_entropy_with_logits, x, t, w, pw, reduction, target_grad=False)
    check_close(fused, native, reference(x, t, w, pw, reduction, False), dtype)


def _target_grad(fn, x, t, w, pw, reduction):
    t = t.detach().requires_grad_(True)
    loss = fn(x.detach(), t, weight=w, pos_weight=pw, reduction=reduction)
    return [loss.detach(), torch.autograd.grad(loss, t, torch.ones_like(loss))[0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("wshape", [None, (9,)], ids=["unweighted", "broadcast"])
def test_target_grad_only(device, dtype, reduction, wshape):
    x, t, w, pw = make((6, 9), dtype, device, wshape, wshape)
    fused = _target_grad(wl.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    native = _target_grad(F.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    d = lambda v: None if v is None else v.double()  # noqa: E731
    ref = _target_grad(F.binary_cross_entropy_with_logits, x.double(), t.double(), d(w), d(pw),
                       reduction)
    check_close(fused, native, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("big", [100.0, 1e4])
def test_saturated_logits(device, dtype, big):
    """|x| up to 1e4 with pos_weight: finite wherever PyTorch is finite, and the same numbers."""
    x = torch.tensor([big, -big, big, -big, big, -big, 0.5, -0.5], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.7, 1.0, 0.0], dtype=torch.float64)
    x = x.repeat(5).to(device=device, dtype=dtype)
    t = t.repeat(5).to(device=device, dtype=dtype)
    pw = torch.full((40,), 9.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                    device=device)
    for reduction in ("none", "sum"):
        fused = run(wl.binary_cross_entropy_with_logits, x, t, None, pw, reduction)
        native = run(F.binary_cross_entropy_with_logits, x, t, None, pw, reduction)
        for a, b in zip(fused, native):
            assert not (torch.isnan(a) & ~torch.isnan(b)).any()
            assert not (torch.isinf(a) & ~torch.isinf(b)).any()
        check_close(fused, native, reference(x, t, None, pw, reduction), dtype)


def test_saturated_values_exact():
    """The split on the sign of x keeps log1p(exp(-|x|)) where the linear term is zero."""
    x = torch.tensor([20.0, -20.0, 1e4, -1e4], dtype=torch.float32)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0])
    loss = wl.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor([9.0]),
                                               reduction="none")
    expected = torch.tensor([9 * 2.0611536e-09, 2.0611536e-09, 0.0, 0.0])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_nan_propagates(device):
    x = torch.tensor([0.3, float("nan"), -2.0], device=device, requires_grad=True)
    t = torch.tensor([1.0, 0.5, 0.0], device=device)
    loss = wl.binary_cross_entropy_with_logits(x, t, pos_weight=torch.tensor([2.0], device=device),
                                               reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[1]) and torch.isnan(x.grad[1])
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty(device, reduction):
    x, t, w, pw = make((0, 3), torch.float32, device, (3,), (3,))
    fused = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    native = run(F.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    for a, b in zip(fused, native):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("in_dt,t_dt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float64), (torch.float16, torch.float32)])
def test_mixed_dtypes(device, in_dt, t_dt):
    """The result has the target's dtype, as PyTorch's; gradients have their tensors' dtypes."""
    x, t, w, pw = make((16, 9), torch.float64, device, (9,), (9,))
    x, t = x.to(in_dt), t.to(t_dt)
    fused = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, "mean")
    native = run(F.binary_cross_entropy_with_logits, x, t, w, pw, "mean")
    for a, b in zip(fused, native):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("wshape", [None, (9,)], ids=["unweighted", "broadcast"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("wrt", ["input", "target", "both"])
def test_float32_targets_beside_16bit_logits(device, dtype, wshape, reduction, wrt):
    """Mixed precision: 16-bit logits read in place beside float32 targets (no float32 copy of the
    logits; the kernels' own path): a float32 result as PyTorch's promotion gives, the logits'
    gradient in their dtype, the target's in float32; within 2x of PyTorch's error."""
    x, t, w, pw = make((40, 9), dtype, device, wshape, wshape, seed=3)
    t = t.float()
    need_x, need_t = wrt in ("input", "both"), wrt in ("target", "both")

    def grads(fn, x, t, w, pw):
        x = x.detach().requires_grad_(need_x)
        t = t.detach().requires_grad_(need_t)
        loss = fn(x, t, weight=w, pos_weight=pw, reduction=reduction)
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype,
                            device=loss.device).reshape(loss.shape)
        wrt_ = [v for v, need in ((x, need_x), (t, need_t)) if need]
        return [loss.detach()] + list(torch.autograd.grad(loss, wrt_, go))

    fused = grads(wl.binary_cross_entropy_with_logits, x, t, w, pw)
    native = grads(F.binary_cross_entropy_with_logits, x, t, w, pw)
    d = lambda v: None if v is None else v.double()  # noqa: E731
    ref = grads(F.binary_cross_entropy_with_logits, x.double(), t.double(), d(w), d(pw))
    assert fused[0].dtype == native[0].dtype == torch.float32
    check_close(fused, native, ref, torch.float32)


def test_weight_dtypes(device):
    """weight and pos_weight may have any floating dtype, as in PyTorch."""
    x, t, w, pw = make((16, 9), torch.float32, device, (9,), (16, 1))
    for wd in (torch.float64, torch.bfloat16, torch.float16):
        fused = run(wl.binary_cross_entropy_with_logits, x, t, w.to(wd), pw.to(wd), "sum")
        native = run(F.binary_cross_entropy_with_logits, x, t, w.to(wd), pw.to(wd), "sum")
        check_close(fused, native, reference(x, t, w.to(wd), pw.to(wd), "sum"), torch.float32)


def test_layouts(device):
    """Non-contiguous input and target, an expanded target, an expanded upstream gradient."""
    x, t, w, pw = make((9, 12), torch.float32, device, (9, 1), None)
    xt, tt = x.t(), t.t()  # (12, 9) transposed views
    for xs, ts in [(xt, tt), (xt, tt.contiguous()), (x[:, ::2], t[:, ::2]),
                   (x, t[:1].expand(9, 12))]:
        pws = torch.rand(xs.shape[-1], device=device) * 4
        fused = run(wl.binary_cross_entropy_with_logits, xs, ts, None, pws, "none")
        native = run(F.binary_cross_entropy_with_logits, xs, ts, None, pws, "none")
        check_close(fused, native, reference(xs, ts, None, pws, "none"), torch.float32)
    # loss.sum() of the unreduced loss hands back one value expanded to the input's shape
    xg = x.clone().requires_grad_(True)
    wl.binary_cross_entropy_with_logits(xg, t, w, reduction="none").sum().backward()
    xn = x.clone().requires_grad_(True)
    F.binary_cross_entropy_with_logits(xn, t, w, reduction="none").sum().backward()
    torch.testing.assert_close(xg.grad, xn.grad)


def test_many_broadcast_dims(device):
    """A weight broadcast differently along 10 dimensions (more than the kernels index)."""
    shape = (2,) * 10
    x, t, w, pw = make(shape, torch.float64, device, (2, 1) * 5, (1, 2) * 5)
    fused = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, "mean")
    native = run(F.binary_cross_entropy_with_logits, x, t, w, pw, "mean")
    check_close(fused, native, native, torch.float64)


def test_legacy_reduction_args(device):
    x, t, w, pw = make((6, 4), torch.float32, device, (4,), (4,))
    for kw in (dict(size_average=False), dict(reduce=False), dict(size_average=True, reduce=True)):
        torch.testing.assert_close(
            wl.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, **kw),
            F.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw, **kw))


# ------------------------------------------------------------------------------------ module

def test_module_drop_in(device):
    x, t, w, pw = make((8, 5), torch.float32, device, (5,), (5,))
    ours = wl.BCEWithLogitsLoss(weight=w, pos_weight=pw)
    theirs = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw)
    assert isinstance(ours, torch.nn.BCEWithLogitsLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    fresh = wl.BCEWithLogitsLoss(weight=torch.zeros(5), pos_weight=torch.zeros(5))
    fresh.load_state_dict(theirs.state_dict())
    fresh = fresh.to(device)
    torch.testing.assert_close(fresh(x, t), theirs(x, t))
    assert copy.deepcopy(ours)(x, t).item() == ours(x, t).item()
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is wl.BCEWithLogitsLoss
    torch.testing.assert_close(loaded(x, t), ours(x, t))
    summed = wl.BCEWithLogitsLoss(reduction="sum", pos_weight=pw)
    torch.testing.assert_close(summed(x, t),
                               torch.nn.BCEWithLogitsLoss(reduction="sum", pos_weight=pw)(x, t))


def test_module_to_dtype(device):
    m = wl.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 1.0])).to(device, torch.float64)
    assert m.pos_weight.dtype == torch.float64 and m.pos_weight.device.type == device.type
    x = torch.randn(4, 2, dtype=torch.float64, device=device)
    t = torch.rand(4, 2, dtype=torch.float64, device=device)
    torch.testing.assert_close(m(x, t), torch.nn.BCEWithLogitsLoss(pos_weight=m.pos_weight)(x, t))


# ------------------------------------------------------------------------------ op layer

@pytest.mark.parametrize("make_args,exc,match", [
    (lambda d: (torch.randn(4, 3, device=d), torch.rand(4, 2, device=d)), ValueError,
     r"Target size \(torch.Size\(\[4, 2\]\)\) must be the same as input size"),
    (lambda d: (torch.randint(0, 3, (4, 3), device=d), torch.rand(4, 3, device=d)), RuntimeError,
     "input must be a floating point tensor"),
    (lambda d: (torch.randn(4, 3, device=d), torch.randint(0, 2, (4, 3), device=d)), RuntimeError,
     "target must be a floating point tensor, got Long"),
    (lambda d: (torch.randn(4, 3, device=d), torch.rand(4, 3, device=d), torch.rand(2, device=d)),
     RuntimeError, r"weight of shape \[2\] cannot be broadcast to the input's shape \[4, 3\]"),
    (lambda d: (torch.randn(4, 3, device=d), torch.rand(4, 3, device=d), None, None, None, "mean",
                torch.rand(4, device=d)),
     RuntimeError, r"pos_weight of shape \[4\] cannot be broadcast to the input's shape \[4, 3\]"),
    (lambda d: (torch.randn(4, 3, device=d), torch.rand(4, 3, device=d), torch.rand(2, 4, 3, device=d)),
     RuntimeError, r"weight of shape \[2, 4, 3\] cannot be broadcast"),
    (lambda d: (torch.randn(4, 3, device=d), torch.rand(4, 3, device=d), None, None, None, "mean",
                torch.ones(3, dtype=torch.complex64, device=d)),
     RuntimeError, "pos_weight must be a real tensor, got ComplexFloat"),
])
def test_errors(device, make_args, exc, match):
    with pytest.raises(exc, match=match):
        wl.binary_cross_entropy_with_logits(*make_args(device))


def test_error_reduction(device):
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        wl.binary_cross_entropy_with_logits(torch.randn(2, device=device),
                                            torch.rand(2, device=device), reduction="avg")
    # the op's own check names the op and the value
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits: reduction must be "
                                         "'none', 'mean' or 'sum', got 'avg'"):
        torch.ops.weighted_loss.binary_cross_entropy_with_logits_forward(
            torch.randn(2, device=device), torch.rand(2, device=device), reduction="avg")


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
def test_error_weight_requires_grad(device, name):
    w = torch.rand(3, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match=f"not differentiable with respect to argument '{name}'"):
        wl.binary_cross_entropy_with_logits(torch.randn(2, 3, device=device),
                                            torch.rand(2, 3, device=device), **{name: w})
    with torch.no_grad():  # fine without autograd, as in PyTorch
        wl.binary_cross_entropy_with_logits(torch.randn(2, 3, device=device),
                                            torch.rand(2, 3, device=device), **{name: w})


@pytest.mark.cuda  # a second device
def test_error_weight_device():
    x, t = torch.randn(4, 5, device="cuda"), torch.rand(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="pos_weight is on cpu but input is on cuda"):
        wl.binary_cross_entropy_with_logits(x, t, pos_weight=torch.ones(5))


# ------------------------------------------------------------------------------- determinism

DET_CASES = {
    "NC-pos_weight": ((2048, 1000), torch.float32, None, (1000,), "mean"),
    "NCHW-pos_weight": ((16, 5, 64, 64), torch.float32, (5, 1, 1), (5, 1, 1), "sum"),
    "bf16-flat": ((300_001,), torch.bfloat16, None, None, "mean"),
    "short-rows-gathered": ((20000, 7), torch.float32, (20000, 1), (7,), "mean"),
}


@pytest.mark.parametrize("case", DET_CASES)
def test_deterministic_runs_and_threads(case):
    shape, dtype, wshape, pshape, reduction = DET_CASES[case]
    x, t, w, pw = make(shape, dtype, "cpu", wshape, pshape, seed=3)

    def once():
        return run(wl.binary_cross_entropy_with_logits, x, t, w, pw, reduction)

    threads = torch.get_num_threads()
    try:
        ref = once()
        for n in (1, 2, 3, threads):
            torch.set_num_threads(n)
            for _ in range(2):
                got = once()
                assert all(torch.equal(a, b) for a, b in zip(got, ref)), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


def test_baseline_build_matches(both_builds):
    """The DEFAULT (no AVX) kernel build gives the results of the build in use here."""
    base, here = both_builds(
        "g = torch.Generator().manual_seed(0)\n"
        "for shape in [(64, 3000), (40, 3), (2, 7, 9, 11)]:\n"
        "    x = (4 * torch.randn(shape, generator=g)).requires_grad_()\n"
        "    t = torch.rand(shape, generator=g).requires_grad_()\n"
        "    pw = 10 * torch.rand(shape[1], *([1] * (len(shape) - 2)), generator=g)\n"
        "    loss = wl.binary_cross_entropy_with_logits(x, t, pos_weight=pw)\n"
        "    out[shape] = (loss.detach(), *torch.autograd.grad(loss, (x, t)))\n")
    assert base.keys() == here.keys()
    for shape, (loss, gx, gt) in base.items():
        torch.testing.assert_close(here[shape][0], loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(here[shape][1], gx, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(here[shape][2], gt, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------------ CUDA
# The CUDA kernels, in the emulator always and on a GPU when there is one.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.asan_skip
def test_cuda_deterministic_runs(gpu, dtype):
    """The last-block reduction adds the blocks' sums in a fixed order: the same bits every run
    (in the emulator, with the blocks run in a different order each time)."""
    x, t, w, pw = make((1100, 1000), dtype, gpu, (1100, 1), (1000,), seed=5)
    ref = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, "mean")
    for _ in range(3):
        got = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, "mean")
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (1100, 1000)), (torch.float64, (600, 1000)),
                                         (torch.bfloat16, (2100, 1000))], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_reduction_beyond_one_wave(gpu, dtype, shape, reduction):
    """More elements than the reducing forward's 1024 blocks cover at once: threads loop."""
    x, t, w, pw = make(shape, dtype, gpu, None, (shape[1],), seed=6)
    fused = run(wl.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    native = run(F.binary_cross_entropy_with_logits, x, t, w, pw, reduction)
    check_close(fused, native, reference(x, t, w, pw, reduction), dtype)


@pytest.mark.parametrize("offset", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_unaligned_and_tails(gpu, offset, dtype):
    """Offsets that break 16-byte alignment, and sizes that leave a partial vector."""
    x, t, w, pw = make((8, 1001), dtype, gpu, None, (1001,))
    xs, ts = x.flatten()[offset:], t.flatten()[offset:]
    assert xs.storage_offset() == offset
    for red in ("none", "sum"):
        fused = run(wl.binary_cross_entropy_with_logits, xs, ts, None, None, red)
        native = run(F.binary_cross_entropy_with_logits, xs, ts, None, None, red)
        check_close(fused, native, reference(xs, ts, None, None, red), dtype)


@pytest.mark.cuda
def test_cuda_graph_reduce_overhead():
    """Current stream only and no host sync: forward and backward run under CUDA graphs."""
    torch._dynamo.reset()
    x, t, w, pw = make((256, 300), torch.float32, "cuda", (300,), (256, 1))

    def loss_fn(x, t):
        return wl.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw)

    compiled = torch.compile(loss_fn, mode="reduce-overhead")
    for seed in range(3):
        x2, t2, _, _ = make((256, 300), torch.float32, "cuda", seed=seed)
        xa, xb = x2.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        la = compiled(xa, t2)
        la.backward()
        lb = loss_fn(xb, t2)
        lb.backward()
        torch.testing.assert_close(la.detach().clone(), lb.detach())
        torch.testing.assert_close(xa.grad, xb.grad)
