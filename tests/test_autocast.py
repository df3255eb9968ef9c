"""Every loss under torch.autocast (CPU autocast on the CPU and emulated CUDA kernels, CUDA
autocast on a GPU), bfloat16 and float16, with float32 and 16-bit class weights, against PyTorch
under the same autocast: the same output dtype, gradients in the logits' own dtype, and the loss
and every gradient within 2x of PyTorch's own error against float64. The logits are read in
place: no float32 copy of them is made (a dispatch mode watches every aten op)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import weighted_loss as wl
from references import focal_composite, sigmoid_focal_composite

LOW = [torch.bfloat16, torch.float16]
BAR = 2.0
HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}


def _kind(device):
    return device.type  # CPU autocast for the CPU and the emulated kernels, CUDA autocast on a GPU


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# Each case: make(seed) -> (x, args, kwargs) in float64 on the CPU; args[0] is the target.
def _ce(shape, prob=False, weight=True, ignore=None, smoothing=0.0):
    def make(seed):
        g = _gen(seed)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        C = shape[1]
        kw = {"label_smoothing": smoothing}
        if weight:
            counts = torch.randint(1, 5000, (C,), generator=g).double()
            kw["weight"] = counts.max() / counts
        if prob:
            t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * 2, 1)
        else:
            t = torch.randint(0, C, (shape[0], *shape[2:]), generator=g)
            if ignore is not None:
                t[torch.rand(t.shape, generator=g) < 0.1] = ignore
                kw["ignore_index"] = ignore
        return x, (t,), kw
    return make


def _bce(shape, weights=True):
    def make(seed):
        g = _gen(seed)
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
        t = (torch.rand(shape, generator=g) < 0.2).double()
        kw = {}
        if weights:
            kw["pos_weight"] = torch.rand(shape[-1], generator=g, dtype=torch.float64) * 8 + 1
            kw["weight"] = torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5
        return x, (t,), kw
    return make


def focal_fp32(input, target, **kw):
    """The softmax focal loss as PyTorch's float32 policy would run it under autocast (a loss,
    like cross_entropy): the composite on float32 logits (and probability targets)."""
    if torch.is_autocast_enabled(input.device.type):
        input = input.float()
        target = target.float() if target.is_floating_point() else target
        kw = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in kw.items()}
        with torch.autocast(input.device.type, enabled=False):
            return focal_composite(input, target, **kw)
    return focal_composite(input, target, **kw)


CE = (F.cross_entropy, wl.cross_entropy)
BCE = (F.binary_cross_entropy_with_logits, wl.binary_cross_entropy_with_logits)
FOCAL = (focal_fp32, wl.focal_loss)
SFOCAL = (sigmoid_focal_composite, wl.sigmoid_focal_loss)
CASES = {
    "ce-64x1000-w-ls": (CE, _ce((64, 1000), smoothing=0.1)),
    "ce-64x1000-w-ign": (CE, _ce((64, 1000), ignore=3)),
    "ce-rows-40x70": (CE, _ce((40, 70), weight=False)),
    "ce-seg-2x5x8x8-w-ign255": (CE, _ce((2, 5, 8, 8), ignore=255)),
    "ce-prob-32x300-w": (CE, _ce((32, 300), prob=True)),
    "ce-prob-seg-2x5x8x8": (CE, _ce((2, 5, 8, 8), prob=True, weight=False)),
    "bce-64x100-w-posw": (BCE, _bce((64, 100))),
    "bce-seg-2x3x8x8": (BCE, _bce((2, 3, 8, 8), weights=False)),
    "focal-64x300-w": (FOCAL, _ce((64, 300))),
    "focal-ls-seg-2x5x8x8-w": (FOCAL, _ce((2, 5, 8, 8), smoothing=0.1)),
    "sfocal-64x100": (SFOCAL, _bce((64, 100), weights=False)),
}


def _run(fn, x, args, kw, reduction, grad_out, kind=None, ac_dtype=None):
    """The loss and the gradient of every floating tensor argument that requires one (logits,
    probability targets), under autocast when kind is given."""
    x = x.detach().requires_grad_()
    args = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    ctx = torch.autocast(kind, dtype=ac_dtype) if kind else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn(x, *args, reduction=reduction, **kw)
    wrt = [x] + [a for a in args if a.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype))
    return out.detach(), list(grads)


def _measure(case, device, low, wdtype, reduction, draws=3):
    """(errors of ours, errors of PyTorch, floors, dtypes) per output, over `draws` draws."""
    (tfn, ofn), make = CASES[case]
    kind = _kind(device)
    ours_err = torch_err = floor = None
    dtypes = None
    for seed in range(draws):
        x, args, kw = make(seed)
        # the inputs as the user has them: 16-bit logits (and 16-bit or float32 targets: the
        # seed picks), weights of wdtype; the float64 reference sees exactly those values
        xl = x.to(low)
        tl = [a.to(low if seed % 2 == 0 else torch.float32) if a.is_floating_point() else a
              for a in args]
        kwl = {k: v.to(wdtype) if torch.is_tensor(v) else v for k, v in kw.items()}
        dev = lambda v: v.to(device) if torch.is_tensor(v) else v
        ref_kw = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in kwl.items()}
        ref_args = [a.double() if a.is_floating_point() else a for a in tl]
        with torch.no_grad():
            shape = tfn(xl.double(), *ref_args, reduction=reduction, **ref_kw).shape
        g = torch.randn(shape, generator=_gen(100 + seed), dtype=torch.float64)
        ref = _run(tfn, xl.double(), ref_args, ref_kw, reduction, g)
        theirs = _run(tfn, dev(xl), [dev(a) for a in tl], {k: dev(v) for k, v in kwl.items()},
                      reduction, dev(g), kind, low)
        ours = _run(ofn, dev(xl), [dev(a) for a in tl], {k: dev(v) for k, v in kwl.items()},
                    reduction, dev(g), kind, low)
        outs_r, outs_t, outs_o = [ref[0]] + ref[1], [theirs[0]] + theirs[1], [ours[0]] + ours[1]
        # (PyTorch's, ours) per output; targets alternate between 16-bit and float32
        dtypes = (dtypes or []) + [(t.dtype, o.dtype) for t, o in zip(outs_t, outs_o)]
        assert outs_o[1].dtype == low, "the logits' gradient is in their own dtype"
        if ours_err is None:
            ours_err, torch_err, floor = [0.0] * len(outs_r), [0.0] * len(outs_r), [0.0] * len(outs_r)
        for k, (r, t, o) in enumerate(zip(outs_r, outs_t, outs_o)):
            # NaN and inf where PyTorch has them (a mean over nothing but ignored rows; a float16
            # gradient beyond float16's range), nowhere else
            assert torch.equal(torch.isnan(o.cpu()), torch.isnan(t.cpu())), (case, k)
            assert torch.equal(torch.isinf(o.cpu()), torch.isinf(t.cpu())), (case, k)
            fin = torch.isfinite(r) & (r.abs() <= torch.finfo(o.dtype).max)
            if not fin.any():
                continue
            r = r[fin]
            torch_err[k] = max(torch_err[k], (t.cpu().double()[fin] - r).abs().max().item())
            ours_err[k] = max(ours_err[k], (o.cpu().double()[fin] - r).abs().max().item())
            floor[k] = max(floor[k], HALF_ULP[o.dtype] * r.abs().max().item())
    return ours_err, torch_err, floor, dtypes


@pytest.mark.parametrize("wdtype", ["float32", "low"])
@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_autocast_matches_pytorch(device, case, low, wdtype):
    if device.type == "cpu" and low == torch.float16 and not _cpu_fp16_autocast():
        pytest.fail("CPU autocast does not take float16 in this torch")
    wd = torch.float32 if wdtype == "float32" else low
    for reduction in ("mean", "none"):
        if case.startswith("sfocal") and reduction == "mean":
            continue  # torchvision's default is "none"; "mean" is the same kernel
        ours, theirs, floor, dtypes = _measure(case, device, low, wd, reduction)
        assert all(od == td for td, od in dtypes), f"{case}: dtypes (PyTorch's, ours) {dtypes}"
        for k, (o, t, f) in enumerate(zip(ours, theirs, floor)):
            what = "loss" if k == 0 else f"gradient {k}"
            ratio = o / max(t, f, 1e-300)
            assert ratio <= BAR, f"{case} {reduction} {what}: ours {o:.3e}, PyTorch {t:.3e}, " \
                                 f"ratio {ratio:.2f}"


def _cpu_fp16_autocast():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return True
    except (RuntimeError, AssertionError):
        return False


class _Copies(TorchDispatchMode):
    """Records every aten op's floating outputs as (op, dtype, numel)."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("case", ["ce", "ce-prob-f32-target", "bce-f32-target", "focal"])
def test_no_float32_copy_of_the_logits(device, case):
    """Forward and backward make no float32 tensor of the logits' size (PyTorch's autocast makes
    two: the upcast logits and their gradient) beside a probability target the user gave in
    float32."""
    kind = _kind(device)
    N, C = 64, 500
    x = torch.randn(N, C, device=device).bfloat16().requires_grad_()
    w = torch.rand(C, device=device) + 0.5
    y = torch.randint(0, C, (N,), device=device)
    tf = torch.rand(N, C, device=device)  # the user's float32 targets
    pf = tf.softmax(1)
    calls = {
        "ce": lambda: wl.cross_entropy(x, y, weight=w, label_smoothing=0.1),
        "ce-prob-f32-target": lambda: wl.cross_entropy(x, pf, weight=w),
        "bce-f32-target": lambda: wl.binary_cross_entropy_with_logits(x, tf, pos_weight=w),
        "focal": lambda: wl.focal_loss(x, y, weight=w),
    }
    with torch.autocast(kind, dtype=torch.bfloat16), _Copies() as seen:
        loss = calls[case]()
        (gx,) = torch.autograd.grad(loss, x)
    assert loss.dtype == torch.float32 and gx.dtype == torch.bfloat16
    big = [(op, dt) for op, dt, n in seen.outputs if n >= N * C and dt == torch.float32]
    assert not big, f"float32 tensors of the logits' size: {big}"
    with torch.autocast(kind, dtype=torch.bfloat16), _Copies() as native:
        F.cross_entropy(x, y, weight=w).backward()
    assert any(n >= N * C and dt == torch.float32 for _, dt, n in native.outputs), \
        "the watch sees PyTorch's copy (so its silence above means something)"


def test_issue_example(device):
    """The issue's session: max_ratio weights (float32) with bfloat16 logits under autocast."""
    kind = _kind(device)
    counts = torch.tensor([5000.0, 120, 40, 900, 7])
    w = wl.class_weights(counts, "max_ratio").to(device)
    g = _gen(0)
    logits = torch.randn(256, 5, generator=g).to(device).bfloat16()
    y = torch.randint(0, 5, (256,), generator=g).to(device)
    with torch.autocast(kind, dtype=torch.bfloat16):
        for kw in ({"weight": w}, {}):
            ref = F.cross_entropy(logits, y, **kw)
            ours = wl.cross_entropy(logits, y, **kw)
            assert ours.dtype == ref.dtype == torch.float32
            torch.testing.assert_close(ours, ref)
        module = wl.CrossEntropyLoss(weight=w)
        assert module(logits, y).dtype == torch.float32
        h = torch.randn(256, 16, generator=g).to(device)
        W = torch.randn(5, 16, generator=g).to(device).requires_grad_()
        ref = F.cross_entropy(F.linear(h, W), y, weight=w)
        ours = wl.linear_cross_entropy(h, W, y, weight=w)
        assert ours.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(ours, ref)
    (gw,) = torch.autograd.grad(ours, W)
    (gw_ref,) = torch.autograd.grad(ref, W)
    assert gw.dtype == W.dtype
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=1e-3)


def test_ops_autocast_rule_on_their_own(device):
    """The rule is the ops' (csrc/autocast.cpp), not only the functions': the op itself gives a
    float32 loss under autocast and takes float32 weights, targets and alphas."""
    kind = _kind(device)
    ops = torch.ops.weighted_loss
    x = torch.randn(8, 7, device=device).bfloat16()
    y = torch.randint(0, 7, (8,), device=device)
    w = torch.rand(7, device=device)
    t = torch.rand(8, 7, device=device)
    with torch.autocast(kind, dtype=torch.bfloat16):
        assert ops.cross_entropy_forward(x, y, w)[0].dtype == torch.float32
        assert ops.cross_entropy_prob_forward(x, t, w)[0].dtype == torch.float32
        assert ops.cross_entropy_prob_forward(x, t.bfloat16(), w)[0].dtype == torch.float32
        assert ops.binary_cross_entropy_with_logits_forward(
            x, t, pos_weight=w, reduction="none").dtype == torch.float32
        assert ops.sigmoid_focal_loss_forward(
            x, t.bfloat16(), gamma=2.0, alpha=None, alpha_tensor=t, weight=w,
            reduction="none").dtype == torch.float32
        if kind == "cpu":  # (CUDA autocast refuses BCE of probabilities, as PyTorch's)
            p = torch.rand(8, 7, device=device).bfloat16()
            assert ops.binary_cross_entropy_forward(p, p, w).dtype == torch.float32
    # outside autocast the loss keeps the logits' dtype (the targets' for probabilities)
    assert ops.cross_entropy_forward(x, y, w)[0].dtype == torch.bfloat16
    assert ops.cross_entropy_prob_forward(x, t.bfloat16(), w)[0].dtype == torch.bfloat16
    assert ops.cross_entropy_prob_forward(x, t, w)[0].dtype == torch.float32


def test_outside_autocast_dtypes_are_pytorchs(device):
    """Without autocast every result has PyTorch's dtype; a float32 weight beside bfloat16 logits,
    which PyTorch refuses, is accepted (its values are used as they are)."""
    x = torch.randn(16, 9, device=device).bfloat16()
    y = torch.randint(0, 9, (16,), device=device)
    t = torch.rand(16, 9, device=device)
    for tt in (t, t.bfloat16(), t.double()):
        assert wl.binary_cross_entropy_with_logits(x, tt).dtype == \
            F.binary_cross_entropy_with_logits(x, tt).dtype
        assert wl.binary_cross_entropy_with_logits(x.float(), tt).dtype == \
            F.binary_cross_entropy_with_logits(x.float(), tt).dtype
        p = tt.softmax(1)
        assert wl.cross_entropy(x, p).dtype == F.cross_entropy(x, p).dtype
    assert wl.cross_entropy(x, y).dtype == torch.bfloat16
    w = torch.rand(9, device=device) + 0.5
    ours = wl.cross_entropy(x, y, weight=w)
    ref = F.cross_entropy(x.double(), y, weight=w.double())
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), ref, rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("grad_ctx", ["no_grad", "inference_mode"])
def test_linear_cross_entropy_eval_is_forward_only(device, grad_ctx):
    """An eval loop over parameters that require grad: the loss only, no gradient buffers."""
    h = torch.randn(64, 32, device=device, requires_grad=True)
    W = torch.randn(300, 32, device=device, requires_grad=True)
    y = torch.randint(0, 300, (64,), device=device)
    ctx = torch.no_grad() if grad_ctx == "no_grad" else torch.inference_mode()
    with ctx, _Copies() as seen:
        loss = wl.linear_cross_entropy(h, W, y)
    # one matmul: the logits (no gradient matmuls), and no buffer for a gradient
    # (inference mode dispatches linear whole)
    matmuls = [op for op, _, _ in seen.outputs if "mm" in op or "linear" in op]
    assert matmuls in (["aten.mm.default"], ["aten.linear.default"]), matmuls
    buffers = [(op, n) for op, _, n in seen.outputs if "zeros" in op or "empty" in op]
    assert not any(n in (W.numel(), h.numel()) for _, n in buffers), buffers
    torch.testing.assert_close(loss, F.cross_entropy(h.detach() @ W.detach().t(), y))


def test_linear_cross_entropy_autocast_gradients_in_parameter_dtypes(device):
    """Under autocast: the matmuls in bfloat16 as F.linear's, the loss float32, and every gradient
    (float32 parameters, bfloat16 or float32 hidden states) in its own dtype, within 2x of
    autocast's F.linear + F.cross_entropy error against float64 (of the same bfloat16 operands)."""
    kind = _kind(device)
    g = _gen(1)
    for hdtype in (torch.float32, torch.bfloat16):
        h = torch.randn(96, 48, generator=g).to(device, hdtype).requires_grad_()
        W = (torch.randn(500, 48, generator=g) * 0.2).to(device).requires_grad_()
        b = torch.randn(500, generator=g).to(device).requires_grad_()
        y = torch.randint(0, 500, (96,), generator=g).to(device)
        w = (torch.rand(500, generator=g) + 0.5).to(device)
        for reduction in ("mean", "none"):
            with torch.autocast(kind, dtype=torch.bfloat16):
                ours = wl.linear_cross_entropy(h, W, y, bias=b, weight=w, reduction=reduction,
                                               chunk_size=40)
                ref = F.cross_entropy(F.linear(h, W, b), y, weight=w, reduction=reduction)
            assert ours.dtype == ref.dtype == torch.float32
            go = torch.randn(ours.shape, generator=g).to(device)
            got = [ours] + list(torch.autograd.grad(ours, (h, W, b), go))
            want = [ref] + list(torch.autograd.grad(ref, (h, W, b), go))
            for a, r, p in zip(got[1:], want[1:], (h, W, b)):
                assert a.dtype == p.dtype == r.dtype
            # float64 of the operands autocast hands the matmul: bfloat16-rounded
            o64 = [t.detach().bfloat16().double().requires_grad_() for t in (h, W, b)]
            r64 = F.cross_entropy(F.linear(*o64), y, weight=w.double(), reduction=reduction)
            exact = [r64] + list(torch.autograd.grad(r64, o64, go.double()))
            for k, (a, r, e) in enumerate(zip(got, want, exact)):
                ours_err = (a.double() - e).abs().max().item()
                torch_err = (r.double() - e).abs().max().item()
                floor = 2.0 ** -9 * e.abs().max().item()  # half a bfloat16 ulp: the matmuls'
                assert ours_err <= BAR * max(torch_err, floor), \
                    (hdtype, reduction, k, ours_err, torch_err, floor)


@pytest.mark.asan_skip
def test_compile_fullgraph_under_autocast(device):
    """A model's forward and the loss, compiled with fullgraph=True, under autocast."""
    kind = _kind(device)
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10)).to(device)
    w = (torch.rand(10) + 0.5).to(device)
    crit = wl.CrossEntropyLoss(weight=w, label_smoothing=0.1)

    def step(x, y):
        with torch.autocast(kind, dtype=torch.bfloat16):
            return crit(model(x), y)

    x = torch.randn(64, 16, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, y)
    want = step(x, y)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    got.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("low", LOW, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_op_every_target_and_loss_dtype(device, low, weighted):
    """The BCE op takes 16-bit or float32 targets beside 16-bit logits and writes its loss in
    either dtype (out_dtype), each read and written in place: every combination against float64."""
    g = _gen(3)
    x = (torch.randn(8, 33, generator=g) * 3).to(device, low)
    t = torch.rand(8, 33, generator=g, dtype=torch.float64)
    pw = (torch.rand(33, generator=g) + 0.5).to(device) if weighted else None
    for tdtype in (low, torch.float32):
        tt = t.to(device, tdtype)
        ref = F.binary_cross_entropy_with_logits(
            x.double(), tt.double(), pos_weight=None if pw is None else pw.double(),
            reduction="none")
        for out_dtype in (None, low, torch.float32):
            loss = torch.ops.weighted_loss.binary_cross_entropy_with_logits_forward(
                x, tt, pos_weight=pw, reduction="none", out_dtype=out_dtype)
            assert loss.dtype == (out_dtype or tdtype)
            torch.testing.assert_close(loss.double(), ref.to(loss.dtype).double(),
                                       rtol=2 * HALF_ULP[loss.dtype] * 2, atol=1e-6)
