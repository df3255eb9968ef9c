"""Cross-entropy's errors that name the argument (out-of-range targets on every device), its
determinism across runs and thread counts, and the CPU kernel builds. The modes every loss runs in
(gradcheck, opcheck, compile...) are tests/test_modes.py's."""
import pytest
import torch
import torch.nn.functional as F

import weighted_loss as wl

import emulation


def _inputs(shape, kind, device, dtype=torch.float64, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype).to(device)
    if kind == "prob":
        t = torch.rand(shape, generator=g, dtype=dtype).to(device)
    else:
        tshape = () if len(shape) == 1 else (shape[0], *shape[2:])
        t = torch.randint(0, C, tshape, generator=g)
        if ignore is not None and t.dim():
            t[0] = ignore
        t = t.to(device)
    w = (0.5 + torch.rand(C, generator=g, dtype=dtype)).to(device)
    return x, t, w


# ------------------------------------------------------------------------------------ errors

def _x(device, *shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("bad", [5, 7, -1, -2])
def test_target_out_of_range(device, bad):
    if device.type == "cuda":
        # a device-side assert, as in PyTorch's CUDA kernels: it ends the CUDA context, so it runs
        # in a process of its own
        import subprocess
        import sys
        code = ("import torch, weighted_loss as wl\n"
                "x = torch.randn(4, 5, device='cuda')\n"
                f"t = torch.tensor([0, 1, {bad}, 3], device='cuda')\n"
                "wl.cross_entropy(x, t)\n"
                "torch.cuda.synchronize()\n")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode != 0
        assert "device-side assert" in run.stderr + run.stdout
        assert "Target is out of bounds" in run.stderr + run.stdout
        return
    x = _x(device, 4, 5)
    t = torch.tensor([0, 1, bad, 3], device=device)
    if emulation.emulating():
        # the CUDA kernels' device-side assert, raised at the launch, naming the row's thread
        for args in ((x, t), (_x(device, 2, 5, 3), t[:3].repeat(2, 1).contiguous())):
            with pytest.raises(RuntimeError, match="(?s)device-side assert triggered.*block: "
                               r"\[0,0,0\], thread: \[\d+,0,0\].*Target is out of bounds"):
                wl.cross_entropy(*args)
        return
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        wl.cross_entropy(x, t)
    with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        wl.cross_entropy(_x(device, 2, 5, 3), t[:3].repeat(2, 1).contiguous())


def test_ignored_index_out_of_range_is_fine(device):
    x = _x(device, 4, 5)
    t = torch.tensor([0, 255, 2, 255], device=device)
    torch.testing.assert_close(wl.cross_entropy(x, t, ignore_index=255),
                               F.cross_entropy(x, t, ignore_index=255))


@pytest.mark.parametrize("args,exc,match", [
    (lambda d: (_x(d, 4, 5), torch.zeros(4, dtype=torch.long, device=d), torch.ones(4, device=d)),
     RuntimeError, r"weight tensor should be defined either for all 5 classes.*\[4\]"),
    (lambda d: (_x(d, 4, 5), torch.zeros(4, dtype=torch.long, device=d), torch.ones(1, 5, device=d)),
     RuntimeError, r"weight tensor should be defined either for all 5 classes.*\[1, 5\]"),
    (lambda d: (_x(d, 4, 5), torch.zeros(4, dtype=torch.long, device=d),
                torch.ones(5, dtype=torch.long, device=d)),
     RuntimeError, "weight must be a floating point tensor, got Long"),
    (lambda d: (_x(d, 4, 5), torch.zeros(3, dtype=torch.long, device=d), None),
     ValueError, r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
    (lambda d: (_x(d, 2, 3, 4), torch.zeros(2, 5, dtype=torch.long, device=d), None),
     RuntimeError, r"Expected target size \[2, 4\], got \[2, 5\]"),
    (lambda d: (torch.ones(4, 5, dtype=torch.long, device=d),
                torch.zeros(4, dtype=torch.long, device=d), None),
     RuntimeError, "input must be a floating point tensor.*got Long"),
    (lambda d: (_x(d, 4, 5), torch.zeros(4, device=d), None),
     RuntimeError, "expected target dtype to be Long or Byte, but got Float"),
    (lambda d: (_x(d, 4, 5), torch.zeros(4, 5, dtype=torch.long, device=d), None),
     RuntimeError, "Expected floating point type for target with class probabilities, got torch.int64"),
    (lambda d: (torch.randn((), device=d), torch.tensor(0.5, device=d), None),
     RuntimeError, "input must have at least one dimension"),
])
def test_errors(device, args, exc, match):
    x, t, w = args(device)
    with pytest.raises(exc, match=match):
        wl.cross_entropy(x, t, weight=w)


def test_error_label_smoothing(device):
    x = _x(device, 4, 5)
    t = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        wl.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0. Got: 1.5"):
        wl.cross_entropy(x, torch.rand(4, 5, device=device), label_smoothing=1.5)


def test_error_reduction(device):
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        wl.cross_entropy(_x(device, 4, 5), torch.zeros(4, dtype=torch.long, device=device),
                         reduction="bogus")


def test_error_prob_ignore_index(device):
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        wl.cross_entropy(_x(device, 4, 5), torch.rand(4, 5, device=device), ignore_index=3)


def test_error_weight_requires_grad(device):
    x = _x(device, 4, 5).requires_grad_()
    w = torch.ones(5, device=device, requires_grad=True)
    loss = wl.cross_entropy(x, torch.zeros(4, dtype=torch.long, device=device), weight=w)
    with pytest.raises(NotImplementedError, match="derivative for 'weight' is not implemented"):
        loss.backward()


@pytest.mark.cuda  # a second device
def test_error_weight_device():
    x = torch.randn(4, 5, device="cuda")
    t = torch.zeros(4, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        wl.cross_entropy(x, t, weight=torch.ones(5))


# ------------------------------------------------------------------------------- determinism

DET_CASES = {
    "rows": ((512, 3000), "index", {"label_smoothing": 0.1}),
    "lanes": ((4, 19, 33, 45), "index", {"ignore_index": 3}),
    "prob": ((300, 70), "prob", {}),
    "prob-lanes": ((3, 7, 40, 41), "prob", {"label_smoothing": 0.2}),
    "small-rows": ((5000, 19), "index", {"label_smoothing": 0.1}),
    "bf16": ((256, 5000), "index", {}),
}


def _loss_and_grad(shape, kind, kw, device):
    dtype = torch.bfloat16 if shape == (256, 5000) else torch.float32
    x, t, w = _inputs(shape, kind, device, dtype, seed=3)
    x.requires_grad_(True)
    loss = wl.cross_entropy(x, t, weight=w, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("case", DET_CASES)
def test_deterministic_runs_and_threads(case):
    shape, kind, kw = DET_CASES[case]
    threads = torch.get_num_threads()
    try:
        ref = _loss_and_grad(shape, kind, kw, "cpu")
        for n in (1, 2, 3, threads):
            torch.set_num_threads(n)
            for _ in range(2):
                loss, g = _loss_and_grad(shape, kind, kw, "cpu")
                assert torch.equal(loss, ref[0]) and torch.equal(g, ref[1]), f"{n} threads"
    finally:
        torch.set_num_threads(threads)


def test_cpu_capability_reported():
    assert wl.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")


def test_baseline_build_matches(both_builds):
    """The DEFAULT (no AVX) kernel build gives the results of the build in use here."""
    base, here = both_builds(
        "g = torch.Generator().manual_seed(0)\n"
        "for shape in [(64, 3000), (40, 19), (2, 7, 9, 11)]:\n"
        "    x = torch.randn(shape, generator=g).requires_grad_()\n"
        "    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=g)\n"
        "    w = torch.rand(shape[1], generator=g) + 0.5\n"
        "    loss = wl.cross_entropy(x, t, weight=w, label_smoothing=0.1)\n"
        "    out[shape] = (loss.detach(), torch.autograd.grad(loss, x)[0])\n")
    assert base.keys() == here.keys()
    for shape, (loss, grad) in base.items():
        torch.testing.assert_close(here[shape][0], loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(here[shape][1], grad, rtol=1e-5, atol=1e-7)


def test_functional_and_modules_hold_every_loss():
    """wl.functional holds every functional and wl.modules every module, as torch.nn.functional
    and torch.nn do (each is defined beside its feature)."""
    import weighted_loss.functional as WF
    import weighted_loss.modules as WM
    for name in ("cross_entropy", "binary_cross_entropy_with_logits", "focal_loss",
                 "sigmoid_focal_loss", "linear_cross_entropy", "vocab_parallel_cross_entropy"):
        assert getattr(WF, name) is getattr(wl, name) and name in WF.__all__
    for name in ("CrossEntropyLoss", "BCEWithLogitsLoss", "FocalLoss", "SigmoidFocalLoss",
                 "LinearCrossEntropyLoss"):
        assert getattr(WM, name) is getattr(wl, name) and name in WM.__all__
