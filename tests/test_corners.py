"""Corners where the fused losses once parted from PyTorch (each named for what it holds): empty
shapes, infinite logits, the dtypes PyTorch accepts, copy-on-write inputs, exception types, and
float32 exactness with label smoothing and class weights at language-model class counts."""
import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl

import emulation
from bars import assert_within_2x
from references import focal_composite, sigmoid_focal_composite

INF = float("inf")


def _both(fn_ours, fn_ref, *args, **kw):
    """(ours, PyTorch's): the loss and, where the input requires grad, its gradient."""
    out = []
    for fn in (fn_ours, fn_ref):
        xs = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a)
              else a for a in args]
        loss = fn(*xs, **kw)
        wrt = [a for a in xs if torch.is_tensor(a) and a.requires_grad]
        grads = torch.autograd.grad(loss.sum(), wrt, allow_unused=True) if loss.numel() else []
        out.append([loss.detach()] + [g for g in grads])
    return out


def _same(a, b, **tol):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    torch.testing.assert_close(a, b, equal_nan=True, **tol)


# ------------------------------------------------------------------------------ empty shapes

EMPTY = {
    "no-positions": (lambda d: (torch.randn(2, 5, 0, 3, device=d),
                                torch.zeros(2, 0, 3, dtype=torch.long, device=d)), {}),
    "no-rows": (lambda d: (torch.randn(0, 5, device=d), torch.zeros(0, dtype=torch.long,
                                                                      device=d)), {}),
    "no-classes-prob": (lambda d: (torch.rand(5, 0, device=d), torch.rand(5, 0, device=d)), {}),
    "no-classes-prob-ls": (lambda d: (torch.rand(5, 0, device=d), torch.rand(5, 0, device=d)),
                           {"label_smoothing": 0.1}),
    "no-classes-unbatched-prob": (lambda d: (torch.randn(0, device=d), torch.rand(0, device=d)),
                                  {}),
    "no-classes-ignored": (lambda d: (torch.rand(5, 0, device=d),
                                      torch.full((5,), -100, device=d)), {}),
    "no-classes-ignored-ls": (lambda d: (torch.rand(5, 0, device=d),
                                         torch.full((5,), -100, device=d)),
                              {"label_smoothing": 0.1}),
    "no-rows-prob": (lambda d: (torch.randn(0, 5, device=d), torch.rand(0, 5, device=d)), {}),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", EMPTY)
def test_empty_shapes_as_pytorch(device, case, reduction):
    """PyTorch's values (NaN where it divides 0 by 0, and where label smoothing's s / C meets
    no classes), shapes and (empty) gradients; never an assert (issue 73165's regression)."""
    make, kw = EMPTY[case]
    x, t = make(device)
    ours, ref = _both(wl.cross_entropy, F.cross_entropy, x, t, reduction=reduction, **kw)
    for a, b in zip(ours, ref):
        _same(a, b)


def test_empty_bce_and_focal(device):
    for red in ("none", "mean", "sum"):
        x, t = torch.randn(0, 3, device=device), torch.rand(0, 3, device=device)
        for a, b in zip(*_both(wl.binary_cross_entropy_with_logits,
                               F.binary_cross_entropy_with_logits, x, t, reduction=red)):
            _same(a, b)
        y = torch.zeros(2, 0, 3, dtype=torch.long, device=device)
        xs = torch.randn(2, 5, 0, 3, device=device)
        for a, b in zip(*_both(wl.focal_loss, focal_composite, xs, y, reduction=red)):
            _same(a, b)


# ------------------------------------------------------------------------------ infinities

def _bce_inf_case(device):
    x = torch.tensor([-INF, INF, -INF, INF, -INF, INF, 2.0, -3.0], dtype=torch.float64,
                     device=device)
    t = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 1.0, 0.0], dtype=torch.float64, device=device)
    return x, t


@pytest.mark.parametrize("pos_weight", [None, 2.0, 0.5])
def test_bce_at_infinite_logits(device, pos_weight):
    """PyTorch's NaN/inf pattern at x = +-inf: the loss NaN at -inf (its formula's -inf + inf;
    once inf here for t > 0) and at (+inf, t = 1), the input's gradient finite, the target's
    +inf at -inf (once NaN here: (P - 1) inf + inf) and -inf at +inf."""
    x, t = _bce_inf_case(device)
    pw = None if pos_weight is None else torch.tensor([pos_weight], dtype=torch.float64,
                                                      device=device)
    ours, ref = _both(wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                      x, t, pos_weight=pw, reduction="none")
    for a, b in zip(ours, ref):
        _same(a, b)


def test_sigmoid_focal_at_infinite_logits(device):
    """gamma = 0, alpha = -1 is BCE: its loss and gradients at +-inf too (the gradient was NaN
    there). gamma > 0: the loss's NaN/inf pattern is the composite's (BCE's); the input's
    gradient is its limit, finite, where torchvision's composite gives NaN (README: Where it
    differs)."""
    x, t = _bce_inf_case(device)
    bce = _both(wl.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t,
                reduction="none")[1]
    plain = _both(wl.sigmoid_focal_loss, sigmoid_focal_composite, x, t, alpha=-1, gamma=0.0)[0]
    for a, b in zip(plain, bce):
        _same(a, b)
    ours, ref = _both(wl.sigmoid_focal_loss, sigmoid_focal_composite, x, t, alpha=0.25,
                      gamma=2.0)
    assert torch.equal(ours[0].isnan(), ref[0].isnan()) and torch.equal(ours[0].isinf(),
                                                                        ref[0].isinf())
    assert torch.isfinite(ours[1]).all(), ours[1]


def test_cross_entropy_infinite_logits_pattern(device):
    """-inf (masked) classes, +inf and NaN logits: PyTorch's NaN/inf pattern, loss and gradient."""
    x = torch.tensor([[0.0, -INF, 1.0], [INF, 0.0, 1.0], [-INF, -INF, -INF], [float("nan"), 0, 1],
                      [-INF, 2.0, 1.0]], device=device)
    for t in (torch.tensor([0, 0, 1, 2, 0], device=device),
              torch.tensor([2, 1, -100, 1, 1], device=device)):
        for red in ("none", "sum"):
            for a, b in zip(*_both(wl.cross_entropy, F.cross_entropy, x, t, reduction=red)):
                assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
                _same(a, b)


# ------------------------------------------------------------------------------ dtypes

def test_integer_and_bool_bce_weights_promote(device):
    x, t = torch.randn(4, 5, device=device), torch.rand(4, 5, device=device)
    for kw in ({"weight": torch.arange(5, device=device)}, {"pos_weight": torch.full(
            (5,), 3, device=device)}, {"weight": torch.ones(5, dtype=torch.bool, device=device)}):
        for a, b in zip(*_both(wl.binary_cross_entropy_with_logits,
                               F.binary_cross_entropy_with_logits, x, t, **kw)):
            _same(a, b)


def test_probability_targets_promote_with_the_weight(device):
    """PyTorch's -(log_softmax t w).sum() promotes with w: a float64 weight beside float32
    logits gives a float64 loss; an integer weight is promoted; a float32 weight beside
    bfloat16 logits and targets gives float32."""
    x = torch.randn(4, 5, device=device)
    p = torch.softmax(torch.randn(4, 5, device=device), 1)
    for xd, pd, w in ((torch.float32, torch.float32, torch.rand(5, dtype=torch.float64)),
                      (torch.float32, torch.float32, torch.arange(1, 6)),
                      (torch.bfloat16, torch.bfloat16, torch.rand(5)),
                      (torch.bfloat16, torch.float32, torch.rand(5, dtype=torch.float64))):
        xx, pp, ww = x.to(xd), p.to(pd), w.to(device)
        ours, ref = _both(wl.cross_entropy, F.cross_entropy, xx, pp, weight=ww)
        assert ours[0].dtype == ref[0].dtype, (xd, pd, w.dtype, ours[0].dtype, ref[0].dtype)
        for a, b in zip(ours, ref):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-2, atol=1e-3)


def test_sigmoid_focal_alpha_near_one(device):
    """1 - alpha from the double alpha, as torchvision's Python float: at alpha = 0.9923888
    float32's 1 - float(alpha) was 2e-6 off (relative) in the loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 9, generator=g).to(device)
    t = (torch.rand(64, 9, generator=g) < 0.3).float().to(device)
    a = 0.9923888
    ref = sigmoid_focal_composite(x.double(), t.double(), alpha=a, reduction="none")
    ours = wl.sigmoid_focal_loss(x, t, alpha=a, reduction="none")
    theirs = sigmoid_focal_composite(x, t, alpha=a, reduction="none")
    neg = t == 0  # where alpha_t = 1 - alpha
    err_o = ((ours.double() - ref).abs() / ref.abs().clamp_min(1e-30))[neg].max()
    err_t = ((theirs.double() - ref).abs() / ref.abs().clamp_min(1e-30))[neg].max()
    assert err_o <= max(2 * err_t, 4 * 2 ** -24), (err_o, err_t)


def test_copy_on_write_inputs_are_not_materialized(device):
    """torch._lazy_clone inputs are read in place (const_data_ptr): they stay copy-on-write."""
    if not torch._C._is_cow_tensor(torch._lazy_clone(torch.zeros(1, device=device))):
        pytest.skip(f"this torch makes no copy-on-write tensors on {device.type}")
    x = torch._lazy_clone(torch.randn(6, 5, device=device)).requires_grad_()
    y = torch.randint(0, 5, (6,), device=device)
    w = torch._lazy_clone(torch.rand(5, device=device) + 0.5)
    t = torch._lazy_clone(torch.rand(6, 5, device=device))
    wl.cross_entropy(x, y, weight=w, label_smoothing=0.1).backward()
    wl.cross_entropy(x, t.softmax(1)).backward()
    wl.binary_cross_entropy_with_logits(x, t, pos_weight=w).backward()
    for v in (x, w, t):
        assert torch._C._is_cow_tensor(v)


# ------------------------------------------------------------------------------ exceptions

ERRORS = [
    ("integer logits", lambda m, d: m.cross_entropy(torch.ones(3, 4, dtype=torch.long, device=d),
                                                   torch.zeros(3, dtype=torch.long, device=d))),
    ("integer logits bce", lambda m, d: m.binary_cross_entropy_with_logits(
        torch.ones(3, 4, dtype=torch.long, device=d), torch.rand(3, 4, device=d))),
    ("float class indices", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                        torch.zeros(3, device=d))),
    ("integer probabilities", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                          torch.zeros(3, 4, dtype=torch.int32,
                                                                      device=d))),
    ("target out of range", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                        torch.tensor([0, 4, 1], device=d))),
    ("batch mismatch", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                   torch.zeros(2, dtype=torch.long, device=d))),
    ("weight length", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                  torch.zeros(3, dtype=torch.long, device=d),
                                                  weight=torch.ones(5, device=d))),
    ("smoothing above 1", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                      torch.zeros(3, dtype=torch.long, device=d),
                                                      label_smoothing=1.5)),
    ("bad reduction", lambda m, d: m.cross_entropy(torch.randn(3, 4, device=d),
                                                  torch.zeros(3, dtype=torch.long, device=d),
                                                  reduction="avg")),
    ("ignore_index with probabilities", lambda m, d: m.cross_entropy(
        torch.randn(3, 4, device=d), torch.rand(3, 4, device=d), ignore_index=1)),
    ("bce shapes", lambda m, d: m.binary_cross_entropy_with_logits(torch.randn(3, 4, device=d),
                                                                  torch.rand(2, 4, device=d))),
    ("bce weight broadcast", lambda m, d: m.binary_cross_entropy_with_logits(
        torch.randn(3, 4, device=d), torch.rand(3, 4, device=d), weight=torch.ones(3,
                                                                                   device=d))),
    ("bce bad reduction", lambda m, d: m.binary_cross_entropy_with_logits(
        torch.randn(3, 4, device=d), torch.rand(3, 4, device=d), reduction="avg")),
]


@pytest.mark.parametrize("name", [e[0] for e in ERRORS])
def test_exception_types_match_pytorch(device, name):
    """The class PyTorch raises on the same device: an out-of-range class index is an IndexError
    on the CPU and a device-side assert (RuntimeError) on a GPU, in PyTorch's CUDA kernels and
    in ours (and so in the emulator's, beside PyTorch's CPU one)."""
    call = next(c for n, c in ERRORS if n == name)
    kinds = []
    for m in (F, wl):
        try:
            call(m, device)
            kinds.append(None)
        except Exception as e:  # noqa: BLE001 - the class is what is compared
            kinds.append(type(e))
    if name == "target out of range" and emulation.emulating():
        assert kinds == [IndexError, RuntimeError], kinds
        return
    assert kinds[0] is not None and kinds[0] is kinds[1], kinds


# ------------------------------------------------------------------------------ precision

@pytest.mark.parametrize("C", [4096, 32000, 128256])
@pytest.mark.parametrize("ls", [0.1, 1.0])
@pytest.mark.parametrize("focal", [False, True])
def test_smoothing_with_weights_at_large_class_counts(device, C, ls, focal):
    """Per-row float32 loss (reduction none) within 2x of PyTorch's own error against float64,
    with max(n)/n weights up to 10,000 and label smoothing up to 1 (the sum of the weights and
    the weighted sums of a row once went in float32: 4x-74x PyTorch's error)."""
    ratios = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, C, generator=g) * 3
        y = torch.randint(0, C, (8,), generator=g)
        counts = torch.randint(1, 10000, (C,), generator=g).float()
        w = counts.max() / counts
        ref_fn = focal_composite if focal else F.cross_entropy
        ours_fn = wl.focal_loss if focal else wl.cross_entropy
        ref = ref_fn(x.double(), y, weight=w.double(), label_smoothing=ls, reduction="none")
        theirs = ref_fn(x, y, weight=w, label_smoothing=ls, reduction="none")
        ours = ours_fn(x.to(device), y.to(device), weight=w.to(device), label_smoothing=ls,
                       reduction="none").cpu()
        e_o = (ours.double() - ref).abs().max().item()
        e_t = (theirs.double() - ref).abs().max().item()
        ratios.append(e_o / max(e_t, 2 ** -24 * ref.abs().max().item()))
    assert max(ratios) <= 2.0, ratios


@pytest.mark.parametrize("C", [19, 300, 4097])
@pytest.mark.parametrize("prob", [False, True])
def test_lane_layout_sums_at_any_class_count(device, C, prob):
    """Class-strided logits (the lane layout: a row per lane, its classes added one by one): the
    loss (reduction none) and the gradient within 2x of PyTorch's error against float64. A plain
    float exp sum cost the CPU's gradient 2x PyTorch's at 19 classes and 27x at 4,097, and the
    CUDA kernels' loss 7-10x at 1,000; now compensated."""
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(256, C, generator=g) * 3).t().contiguous().t()  # strides (1, 256)
    y = torch.rand(256, C, generator=g) if prob else torch.randint(0, C, (256,), generator=g)
    w = torch.rand(C, generator=g) + 0.5

    def run(fn, xx, yy, ww):
        xx = xx.detach().requires_grad_()
        loss = fn(xx, yy, weight=ww, reduction="none")
        grad, = torch.autograd.grad(loss, xx, torch.linspace(0.5, 1.5, loss.numel()).to(loss))
        return loss.detach().cpu().double(), grad.cpu().double()

    ref = run(F.cross_entropy, x.double(), y.double() if prob else y, w.double())
    theirs = run(F.cross_entropy, x, y, w)
    ours = run(wl.cross_entropy, x.to(device), y.to(device), w.to(device))
    for o, t, r in zip(ours, theirs, ref):
        assert_within_2x(o, t, r, torch.float32)
